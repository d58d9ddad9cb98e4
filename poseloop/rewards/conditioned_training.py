"""Training inputs of the conditioned reward model (poseloop.rewards.conditioned) and its held-out condition check.

The labels keep each sample's prompt and its group's keypoints (poseloop.rewards.labels); here they become the
network's inputs, computed once: [latent, pose map] per sample (a mirrored copy mirrors both), and the token
states of each distinct prompt from the labelled rounds' own text encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from poseloop.config.reward import TrainRewardConfig
from poseloop.rewards.labels import LabelDataError, LabelSet
from poseloop.rewards.fit_data import channel_stats
from poseloop.rewards.fit_data import FitInputs


def text_model_of(labels: LabelSet) -> dict[str, Any]:
    """The ModelConfig dict of the labelled rounds' base model (one for all), its local path made absolute."""
    bases = {(str(m.get("base", "")), str(m.get("arch", "sd15"))) for m in labels.round_models.values()}
    if len(bases) != 1 or not next(iter(bases))[0]:
        raise LabelDataError(f"the labelled rounds {', '.join(labels.rounds)} were made with different (or unrecorded) "
                             f"base models {sorted(bases)}; a conditioned reward model reads prompts with one text "
                             "encoder: pick rounds of one model with --data.rounds, or use --model.kind latent")
    model = dict(next(iter(labels.round_models.values())))
    base = Path(str(model["base"])).expanduser()
    if base.exists():  # loaded later from other working directories (train_policy, the app)
        model["base"] = str(base.resolve())
        for key in ("controlnet", "vae", "lora", "lcm_lora"):
            if model.get(key) and Path(str(model[key])).expanduser().exists():
                model[key] = str(Path(str(model[key])).expanduser().resolve())
    else:
        from poseloop.models.embedded import ensure_embedded
        from poseloop.config.generation import is_embedded

        if is_embedded(base):
            model["base"] = str(ensure_embedded(base).resolve())
    model["policy"] = ""  # the policy's LoRA never touches the text encoder; its folder need not stay
    return model


def check_conditions(labels: LabelSet) -> None:
    """LabelDataError (one line) when labelled samples lost their pose: the conditioned kind cannot see it."""
    missing = [i for i, k in enumerate(labels.keypoints) if k is None]
    if missing:
        raise LabelDataError(
            f"{len(missing)} of {len(labels.sample_ids)} labelled samples have no stored pose keypoints (imported "
            f"images, condition images without keypoints, or rounds from versions that did not store them; e.g. "
            f"sample {labels.sample_ids[missing[0]]}), so the conditioned reward model cannot see their condition: "
            "train the unconditioned kind with --model.kind latent, or pick rounds with poses (--data.rounds ...)")


def conditioned_inputs(labels: LabelSet, cfg: TrainRewardConfig, encoder: Any = None) -> FitInputs:
    """[latent, pose map] of every labelled sample (and their mirror images), the prompts' token states."""
    from poseloop.rewards.conditioned import PromptEncoder, pose_map

    check_conditions(labels)
    if encoder is None:
        encoder = PromptEncoder(text_model_of(labels))
    lat = labels.latents  # [N, C, h, w]
    hw = (lat.shape[-2], lat.shape[-1])
    poses = torch.stack([pose_map(k, w, h, hw) for k, (w, h) in zip(labels.keypoints, labels.sizes)])
    x = torch.cat([lat, poses], dim=1)  # [N, C + 3, h, w]
    distinct = list(dict.fromkeys(labels.prompts))
    states, mask = encoder.encode(distinct)
    where = {p: i for i, p in enumerate(distinct)}
    prompt_idx = torch.tensor([where[p] for p in labels.prompts], dtype=torch.long)
    return FitInputs(x, x.flip(-1) if cfg.train.flip_augment else None, channel_stats(lat),
                     f"per-channel latent mean and std ({2 * lat.shape[1]} features)", text=(states, mask),
                     prompt_idx=prompt_idx, encoder=encoder)


@torch.no_grad()
def input_scores(model: Any, inputs: FitInputs, perm: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """Ensemble-mean scores [N] of the training inputs; perm [N] gives sample i the condition of sample perm[i]."""
    from poseloop.rewards.conditioned import POSE_CHANNELS

    assert inputs.text is not None and inputs.prompt_idx is not None
    x, n = inputs.x, len(inputs.x)
    c = x.shape[1] - POSE_CHANNELS
    src = torch.arange(n) if perm is None else perm
    out = []
    for i in range(0, n, chunk):
        rows = torch.arange(i, min(n, i + chunk))
        xi = torch.cat([x[rows, :c], x[src[rows], c:]], dim=1)
        states, mask = inputs.text_of(src[rows])
        out.append(model.member_scores_inputs(xi, states, mask).mean(0).float().cpu())
    return torch.cat(out)


__all__ = ["check_conditions", "conditioned_inputs", "input_scores", "text_model_of"]
