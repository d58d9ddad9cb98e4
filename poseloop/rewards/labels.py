"""The reward model's labels (scores and preferences from the DB, the samples' final latents) and the group split."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from poseloop.data import db
from poseloop.config.lib import ConfigError
from poseloop.data.inputs import InputError
from poseloop.rewards.losses import normalize_per_rater
from poseloop.config.reward import RewardDataConfig
from poseloop.rewards.model import encode_images
from poseloop.data.store import SampleStore, TrajectoryError, load_trajectory

CHOICE_TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}


class LabelDataError(InputError):
    """The labels cannot be trained on (none yet, too few groups, mixed latent shapes); says how to fix it."""


class MissingTrajectoryError(LabelDataError, FileNotFoundError):
    """Labelled samples whose trajectory files are missing."""


# ---- labels --------------------------------------------------------------------------------------


@dataclass
class LabelSet:
    """Every labelled sample's final latent and the labels on them (indices are into `sample_ids`)."""

    sample_ids: list[int]  # [N] database ids
    latents: torch.Tensor  # [N, C, h, w] float32
    group_of: torch.Tensor  # [N] long: index into group_keys
    group_keys: list[tuple[str, str]]  # (prompt, pose_name) of each group index
    score_idx: torch.Tensor  # [S] long
    score_rater: torch.Tensor  # [S] long (rater id)
    score_raw: torch.Tensor  # [S] float32, the app's scale
    score_z: torch.Tensor  # [S] float32, z-scored per rater
    pref_a: torch.Tensor  # [P] long
    pref_b: torch.Tensor  # [P] long
    pref_target: torch.Tensor  # [P] float32: 1 a preferred, 0 b, 0.5 tie
    pref_rater: torch.Tensor  # [P] long
    rounds: list[str]
    raters: list[str]
    skipped_prefs: int = 0
    left_out_samples: int = 0  # labelled samples left out because their trajectory was unreadable (skip_unreadable)
    image_paths: list[Path] = dc_field(default_factory=list)  # [N] absolute PNG paths (the clip kind reads them)
    prompts: list[str] = dc_field(default_factory=list)  # [N] each sample's prompt
    # Per round: its score and preference counts and the policy that made it; a digest of every label (lineage).
    summary: dict[str, Any] = dc_field(default_factory=dict)
    keypoints: list[str | None] = dc_field(default_factory=list)  # [N] the group's keypoints JSON (None: not stored)
    sizes: list[tuple[int, int]] = dc_field(default_factory=list)  # [N] (width, height) of each image
    round_models: dict[str, dict[str, Any]] = dc_field(default_factory=dict)  # round name -> its ModelConfig dict

    @property
    def n_labels(self) -> int:
        return int(self.score_idx.numel() + self.pref_a.numel())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    def score_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs implied by scores: same rater, same group -> (a [Q], b [Q], target [Q]); equal scores -> 0.5."""
        a, b, t = [], [], []
        by_key: dict[tuple[int, int], list[int]] = {}
        for row in range(self.score_idx.numel()):
            key = (int(self.score_rater[row]), int(self.group_of[self.score_idx[row]]))
            by_key.setdefault(key, []).append(row)
        for rows in by_key.values():
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    ri, rj = rows[i], rows[j]
                    a.append(int(self.score_idx[ri]))
                    b.append(int(self.score_idx[rj]))
                    d = float(self.score_raw[ri] - self.score_raw[rj])
                    t.append(1.0 if d > 0 else 0.0 if d < 0 else 0.5)
        return (torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long),
                torch.tensor(t, dtype=torch.float32))


def resolve_db_url(cfg: RewardDataConfig) -> str:
    """The configured URL or the samples folder's default SQLite file."""
    return cfg.db_url or db.default_db_url(cfg.samples_dir)


def _load_round_vae(round_config: dict[str, Any]) -> Any:
    """The VAE of the model that made a round (for imported images without latents)."""
    from poseloop.config.generation import ModelConfig
    from poseloop.config.lib import from_dict
    from poseloop.models.loading import load_components

    model_cfg = from_dict(ModelConfig, round_config["model"])
    model_cfg.dtype = "float32"  # encoding in float32: a few images, accuracy over speed
    return load_components(model_cfg).vae


@torch.no_grad()
def _encode_image_files(paths: list[Path], vae: Any) -> torch.Tensor:
    """PNG files -> latents [N, C, h, w] float32 (posterior mean x scaling factor)."""
    from PIL import Image

    from poseloop.sampling.sampler import pil_to_tensor

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(encode_images(vae, pil_to_tensor([im])).float().cpu())
    return torch.cat(out)


def load_labels(cfg: RewardDataConfig, vae: Any = None, with_latents: bool = True) -> LabelSet:
    """Read ratings and preferences from the DB and the final latents of the labelled samples.

    Samples without a trajectory (imported images) are VAE-encoded with `vae`, or with the VAE of the
    model that made their round when `vae` is None. with_latents=False (the clip kind, which reads the
    PNGs) reads no trajectory and leaves `latents` empty ([N, 0]).
    """
    url = resolve_db_url(cfg)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise LabelDataError(f"no database at {path}: generate a round with `python generate.py`, then rate "
                                 "some images with `python -m webapp` first")
    factory = db.open_db(url, "data.db_url")
    store = SampleStore(cfg.samples_dir)
    with db.session_scope(factory) as s:
        rounds = {r.id: r for r in s.scalars(select(db.Round))}
        if cfg.rounds:
            unknown = sorted(set(cfg.rounds) - {r.name for r in rounds.values()})
            if unknown:
                raise ConfigError(f"data.rounds: no round named {', '.join(map(repr, unknown))} in "
                                  f"{db.shown_db_url(url)}; known: "
                                  f"{', '.join(sorted(r.name for r in rounds.values())) or 'none'}")
            rounds = {i: r for i, r in rounds.items() if r.name in cfg.rounds}
        raters = {r.id: r.name for r in s.scalars(select(db.Rater))}
        if cfg.raters:
            unknown = sorted(set(cfg.raters) - set(raters.values()))
            if unknown:
                raise ConfigError(f"data.raters: no rater named {', '.join(map(repr, unknown))}; known: "
                                  f"{', '.join(sorted(raters.values())) or 'none'}")
            raters = {i: n for i, n in raters.items() if n in cfg.raters}
        round_ids, rater_ids = list(rounds), list(raters)

        ratings: list[tuple[int, int, float]] = []
        if cfg.labels in ("scores", "both"):
            ratings = [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(db.Rating.sample_id, db.Rating.rater_id, db.Rating.score).join(db.Sample)
                .where(db.Sample.round_id.in_(round_ids), db.Rating.rater_id.in_(rater_ids))
                .order_by(db.Rating.id))]
        prefs: list[tuple[int, int, int, str]] = []
        skipped = 0
        if cfg.labels in ("prefs", "both"):
            for a, b, rid, choice in s.execute(
                select(db.Preference.sample_a_id, db.Preference.sample_b_id, db.Preference.rater_id,
                       db.Preference.choice).join(db.Sample, db.Sample.id == db.Preference.sample_a_id)
                .where(db.Sample.round_id.in_(round_ids), db.Preference.rater_id.in_(rater_ids))
                .order_by(db.Preference.id)):
                if choice == "skip":  # seen but not judged: no information
                    skipped += 1
                else:
                    prefs.append((a, b, rid, choice))
        if not ratings and not prefs:
            which = f"rounds {', '.join(sorted(r.name for r in rounds.values()))}" if cfg.rounds else "any round"
            who = f" by {', '.join(cfg.raters)}" if cfg.raters else ""
            raise LabelDataError(f"no {cfg.labels if cfg.labels != 'both' else 'scores or preferences'} yet in "
                                 f"{which}{who} ({db.shown_db_url(url)}): rate some images with `python -m webapp` "
                                 "first")

        ids = sorted({r[0] for r in ratings} | {p[0] for p in prefs} | {p[1] for p in prefs})
        samples = {x.id: x for x in s.scalars(select(db.Sample).where(db.Sample.id.in_(ids)))}
        groups = {g.id: g for g in s.scalars(select(db.Group).where(db.Group.id.in_({x.group_id for x in samples.values()})))}
        all_rounds = {r.id: r for r in s.scalars(select(db.Round))}
        # Rows are read inside the session; only plain values leave it.
        info = {i: (samples[i].trajectory_path, samples[i].image_path, samples[i].round_id,
                    groups[samples[i].group_id].prompt, groups[samples[i].group_id].pose_name) for i in ids}
        conds = {i: (groups[samples[i].group_id].keypoints_json, (samples[i].width, samples[i].height)) for i in ids}
        round_names = {i: r.name for i, r in all_rounds.items()}
        round_cfgs = {i: r.config for i, r in all_rounds.items()}
        round_policies = {i: r.policy_version for i, r in all_rounds.items()}

    missing = [(sid, store.abs(tp)) for sid in ids
               if with_latents and (tp := info[sid][0]) is not None and not store.abs(tp).is_file()]
    if missing and not cfg.skip_unreadable:
        by_round = sorted({round_names[info[sid][2]] for sid, _ in missing})
        names = ", ".join(str(p) for _, p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MissingTrajectoryError(
            f"{len(missing)} labelled sample(s) have no trajectory file ({names}). Fix: copy the round's "
            f"trajectories/ folder back into {store.root} (round {', '.join(by_round)}), or re-run generate.py with "
            f"the round's settings and --store.round {by_round[0]} (missing files of existing rows are regenerated "
            f"from their seeds), or train without that round (--data.rounds <other rounds>), or leave those samples "
            f"out with --data.skip_unreadable true")

    # Final latents of the samples with a trajectory; unreadable ones are an error, or left out on request.
    left_out = {sid: f"{path} is missing" for sid, path in missing}
    final: dict[int, torch.Tensor] = {}
    for sid in ids:
        tp = info[sid][0]
        if tp is None or sid in left_out or not with_latents:
            continue
        try:
            final[sid] = load_trajectory(store.abs(tp), sample=f"sample {sid}").latents[-1].float()  # x_0, [C, h, w]
        except TrajectoryError as e:
            if not cfg.skip_unreadable:
                raise TrajectoryError(f"{e}; or leave unreadable samples out with --data.skip_unreadable true",
                                      e.path, e.short) from None
            left_out[sid] = e.short
    if left_out:
        n_r, n_p = len(ratings), len(prefs)
        ratings = [r for r in ratings if r[0] not in left_out]
        prefs = [p for p in prefs if p[0] not in left_out and p[1] not in left_out]
        print(f"warning: data.skip_unreadable: left out {len(left_out)} labelled sample(s) whose trajectory is "
              f"missing or unreadable ({n_r - len(ratings)} scores and {n_p - len(prefs)} preferences on them), "
              f"e.g. {next(iter(left_out.values()))}", file=sys.stderr)
        if not ratings and not prefs:
            raise LabelDataError("every labelled sample's trajectory is missing or unreadable; restore the samples "
                                 "folder or regenerate the round (generate.py --store.round <round name>)")
        ids = sorted({r[0] for r in ratings} | {p[0] for p in prefs} | {p[1] for p in prefs})

    latents: list[torch.Tensor | None] = [None] * len(ids)
    to_encode: dict[int, list[int]] = {}  # round id -> positions in ids
    for pos, sid in enumerate(ids):
        if not with_latents:
            latents[pos] = torch.zeros(0)
        elif info[sid][0] is None:
            to_encode.setdefault(info[sid][2], []).append(pos)
        else:
            latents[pos] = final[sid]
    for rid, positions in to_encode.items():
        round_vae = vae if vae is not None else _load_round_vae(round_cfgs[rid])
        enc = _encode_image_files([store.abs(info[ids[p]][1]) for p in positions], round_vae)
        for k, p in enumerate(positions):
            latents[p] = enc[k]
    shapes = {tuple(x.shape) for x in latents if x is not None}
    if len(shapes) != 1:
        per_round = {round_names[info[sid][2]]: tuple(latents[i].shape) for i, sid in enumerate(ids)}  # type: ignore[union-attr]
        raise LabelDataError(f"labelled latents have different shapes {sorted(shapes)} (per round: {per_round}); "
                             "one reward model takes one latent shape: pick rounds of one model/size with --data.rounds")

    pos_of = {sid: i for i, sid in enumerate(ids)}
    keys = sorted({(info[sid][3], info[sid][4]) for sid in ids})
    key_index = {k: i for i, k in enumerate(keys)}
    score_rater = torch.tensor([r[1] for r in ratings], dtype=torch.long)
    score_raw = torch.tensor([r[2] for r in ratings], dtype=torch.float32)
    summary: dict[str, Any] = {}
    for kind, rows in (("scores", ratings), ("preferences", prefs)):
        for row in rows:
            rid = info[row[0]][2]
            entry = summary.setdefault(round_names[rid], {"scores": 0, "preferences": 0, "policy": round_policies[rid]})
            entry[kind] += 1
    label_digest = hashlib.sha256(json.dumps([sorted(ratings), sorted(prefs)]).encode()).hexdigest()[:16]
    return LabelSet(
        summary={"rounds": dict(sorted(summary.items())), "n_labels": len(ratings) + len(prefs),
                 "digest": label_digest},
        sample_ids=ids,
        latents=torch.stack(latents),  # type: ignore[arg-type]  # [N, C, h, w]
        group_of=torch.tensor([key_index[(info[sid][3], info[sid][4])] for sid in ids], dtype=torch.long),
        group_keys=keys,
        score_idx=torch.tensor([pos_of[r[0]] for r in ratings], dtype=torch.long),
        score_rater=score_rater,
        score_raw=score_raw,
        score_z=normalize_per_rater(score_raw, score_rater) if ratings else torch.zeros(0),
        pref_a=torch.tensor([pos_of[p[0]] for p in prefs], dtype=torch.long),
        pref_b=torch.tensor([pos_of[p[1]] for p in prefs], dtype=torch.long),
        pref_target=torch.tensor([CHOICE_TARGET[p[3]] for p in prefs], dtype=torch.float32),
        pref_rater=torch.tensor([p[2] for p in prefs], dtype=torch.long),
        rounds=sorted({round_names[info[sid][2]] for sid in ids}),
        raters=sorted({raters[i] for i in set(score_rater.tolist()) | {p[2] for p in prefs}}),
        skipped_prefs=skipped,
        left_out_samples=len(left_out),
        image_paths=[store.abs(info[sid][1]) for sid in ids],
        prompts=[info[sid][3] for sid in ids],
        keypoints=[conds[sid][0] for sid in ids],
        sizes=[conds[sid][1] for sid in ids],
        round_models={round_names[info[sid][2]]: dict((round_cfgs[info[sid][2]] or {}).get("model") or {}) for sid in ids},
    )


# ---- split ---------------------------------------------------------------------------------------


@dataclass
class GroupSplit:
    """Which (prompt, pose) groups train and which are held out."""

    train_groups: list[int]
    heldout_groups: list[int]

    def sample_mask(self, labels: LabelSet, heldout: bool) -> torch.Tensor:
        """[N] bool: samples on the requested side."""
        side = torch.tensor(self.heldout_groups if heldout else self.train_groups, dtype=torch.long)
        return torch.isin(labels.group_of, side)


def split_groups(labels: LabelSet, holdout_fraction: float, seed: int) -> GroupSplit:
    """Hold out round(fraction x groups) whole groups (at least 1, leaving at least 1 for training)."""
    n = len(labels.group_keys)
    if n < 2:
        raise LabelDataError(f"too few groups for a held-out split: the labels cover {n} (prompt, pose) group; at least "
                             "2 are needed (one to train, one to evaluate). Rate images of more groups.")
    n_hold = min(n - 1, max(1, round(holdout_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return GroupSplit(train_groups=sorted(perm[n_hold:]), heldout_groups=sorted(perm[:n_hold]))


__all__ = ["GroupSplit", "LabelDataError", "LabelSet", "MissingTrajectoryError", "load_labels", "split_groups"]
