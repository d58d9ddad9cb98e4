"""A scripted rater and the learning check: does the loop make the model produce what a rater prefers?

The rater likes a warm light (mean red minus mean blue, `world.warmth`); it looks at the PNGs of a
round and labels them through the rating app's JSON API, as a person's browser would: scores -5..+5 by
its taste and, for every pair of images of a group, the warmer one. (The embedded world lights each
image warm or cool, a difference that survives generation; brightness varies little within a group.)
The check then runs the real scripts (train_reward.py, train_policy.py with the preset's defaults,
evaluate.py) and measures, on rounds the models never saw, whether each step moved what the rater wants.
tests/test_learning.py runs it with a CPU-test budget; bench/bench_learning.py with larger ones.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from sqlalchemy import select

from poseloop.data import db
from poseloop.metrics.stats import bootstrap_ci, grouped
from poseloop.world.render import warmth

RULE = "warmth"  # the reward spec that computes the rater's own statistic (for measuring only)


def _rgb(path: Path) -> Image.Image:
    """An image file as RGB, its file closed (a round has hundreds)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def brightness_taste(path: Path) -> float:
    """The rater's taste before the light-modes world: an image file's mean brightness 0..1."""
    return float(np.asarray(_rgb(path), dtype=np.float64).mean() / 255.0)


def image_taste(path: Path) -> float:
    """The rater's taste for one image file: its warmth, mean red minus mean blue -1..1."""
    return float(warmth(np.asarray(_rgb(path))[None])[0])


def round_samples(samples_dir: Path, round_name: str) -> list[tuple[int, int, Path]]:
    """(sample id, group id, image path) of every sample of a round."""
    engine = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(engine) as s:
        rnd = s.scalar(select(db.Round).where(db.Round.name == round_name))
        if rnd is None:
            raise ValueError(f"no round {round_name!r} in {samples_dir}")
        rows = s.execute(select(db.Sample.id, db.Sample.group_id, db.Sample.image_path)
                         .join(db.Group, db.Sample.group_id == db.Group.id)
                         .where(db.Group.round_id == rnd.id)).all()
    return [(int(i), int(g), samples_dir / p) for i, g, p in rows]


def label_round(client: Any, samples_dir: Path, round_name: str, rater: str = "likes-warm-light",
                taste_of: Callable[[Path], float] = image_taste) -> dict[str, int]:
    """Score every image and judge every within-group pair through the JSON API; return the counts."""
    rows = round_samples(samples_dir, round_name)
    taste = {sid: taste_of(path) for sid, _, path in rows}
    ranked = sorted(taste, key=taste.__getitem__)
    n_scores = n_pairs = 0
    for rank, sid in enumerate(ranked):
        score = round(-5 + 10 * rank / max(1, len(ranked) - 1))
        r = client.post("/api/scores", json={"rater": rater, "sample_id": sid, "score": score})
        if r.status_code != 201:
            raise RuntimeError(f"score of sample {sid} refused: {r.status_code} {r.get_json()}")
        n_scores += 1
    groups: dict[int, list[int]] = {}
    for sid, gid, _ in rows:
        groups.setdefault(gid, []).append(sid)
    for members in groups.values():
        for a, b in itertools.combinations(sorted(members), 2):
            choice = "left" if taste[a] > taste[b] else "right"
            r = client.post("/api/preferences", json={"rater": rater, "left_id": a, "right_id": b, "choice": choice})
            if r.status_code != 201:
                raise RuntimeError(f"preference {a} vs {b} refused: {r.status_code} {r.get_json()}")
            n_pairs += 1
    return {"scores": n_scores, "pairs": n_pairs}


def reward_pair_accuracy(reward_dir: Path, samples_dir: Path, round_name: str, seed: int = 0,
                         taste_of: Callable[[Path], float] = image_taste) -> tuple[float, float, float, int]:
    """Within-group pairwise agreement of a reward model (either kind) with the rater on a round: mean, 95% CI, pairs.

    The interval resamples whole groups (pairs of a group share images, so they are not independent).
    """
    flat, labels = grouped(reward_pair_agreement(reward_dir, samples_dir, round_name, taste_of))
    lo, hi = bootstrap_ci(flat, groups=labels, seed=seed)
    return float(flat.mean()), lo, hi, len(flat)


def reward_pair_agreement(reward_dir: Path, samples_dir: Path, round_name: str,
                          taste_of: Callable[[Path], float] = image_taste) -> list[list[bool]]:
    """Per group of a round (in database order), whether the reward model orders each within-group pair as the rater."""
    import torch

    from poseloop.rewards.loading import load_reward_model
    from poseloop.rewards.versions import reward_model_kind
    from poseloop.data.store import SampleStore, load_trajectory

    store = SampleStore(samples_dir)
    engine = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(engine) as s:
        rows = s.execute(select(db.Sample.id, db.Sample.group_id, db.Sample.image_path, db.Sample.trajectory_path,
                                db.Group.prompt, db.Group.keypoints_json, db.Sample.width, db.Sample.height)
                         .join(db.Group, db.Sample.group_id == db.Group.id)
                         .join(db.Round, db.Group.round_id == db.Round.id)
                         .where(db.Round.name == round_name).order_by(db.Sample.id)).all()
    if reward_model_kind(reward_dir) == "clip":  # a head on CLIP features scores the PNGs with their prompts
        from poseloop.rewards.clip_head import load_clip_reward_model
        from poseloop.sampling.sampler import pil_to_tensor

        clip_model = load_clip_reward_model(reward_dir)
        out = []
        with torch.no_grad():
            for k in range(0, len(rows), 16):
                chunk = rows[k:k + 16]
                images = pil_to_tensor([_rgb(store.abs(r[2])) for r in chunk])
                out.append(clip_model.score_images(images, [r[4] for r in chunk]).float())
        scores = torch.cat(out).numpy()
    else:
        model = load_reward_model(reward_dir)
        latents = torch.stack([load_trajectory(store.abs(r[3])).latents[-1].float() for r in rows])
        meta = [{"keypoints": r[5], "width": r[6], "height": r[7]} for r in rows]
        with torch.no_grad():  # a conditioned model reads each sample's prompt and pose; the latent kind ignores them
            scores = model.score(latents, [r[4] for r in rows], meta).float().numpy()
    taste = np.array([taste_of(samples_dir / r[2]) for r in rows])
    groups: dict[int, list[int]] = {}
    for i, (_, gid, *_rest) in enumerate(rows):
        groups.setdefault(int(gid), []).append(i)
    per_group = []
    for idx in groups.values():
        agree = [(scores[a] > scores[b]) == (taste[a] > taste[b]) for a, b in itertools.combinations(idx, 2)]
        per_group.append([bool(x) for x in agree])
    return per_group


def conditioned_vs_latent(conditioned: Path, latent: Path, samples_dir: Path, round_name: str,
                          seed: int = 0) -> dict[str, Any]:
    """Within-group pairwise agreement with the rater of two reward models on one round, and their paired difference
    (conditioned - latent), each with a 95% interval resampling whole groups."""
    c = reward_pair_agreement(conditioned, samples_dir, round_name)
    lat = reward_pair_agreement(latent, samples_dir, round_name)
    out: dict[str, Any] = {}
    for name, per_group in (("conditioned", c), ("latent", lat)):
        flat, labels = grouped(per_group)
        out[name] = {"mean": float(flat.mean()), "ci": list(bootstrap_ci(flat, groups=labels, seed=seed)),
                     "pairs": len(flat)}
    diffs = np.array([np.mean(a) - np.mean(b) for a, b in zip(c, lat)])  # per group: same pairs, both models
    out["conditioned_minus_latent"] = {"diff": float(diffs.mean()), "ci": list(bootstrap_ci(diffs, seed=seed)),
                                       "groups": len(diffs)}
    return out


# Each policy run of the check and the metric its comparison reports (the key in its results).
RUN_METRIC = {"ddpo_reward_model": RULE, "d3po_pairs": RULE, "ddpo_pose_accuracy": "pose_accuracy",
              "rlcm_pose_accuracy": "pose_accuracy", "rlcm_pose_and_prompt": "pose_accuracy"}
POLICY_RUNS = tuple(RUN_METRIC)
LABELLED_RUNS = ("ddpo_reward_model", "d3po_pairs")
# Pose accuracy is trained and compared at ControlNet scale 0.4 (policy_config.POSE_SCALE), where the world leaves
# room to gain, on the vocabulary's first 6 prompts, which hold the comparison's: what is fresh there is the seeds.
# RLCM runs the tiny-rlcm-pose preset: a LoRA on the ControlNet, the world's LCM-LoRA fused into the UNet, 4 steps,
# no CFG, 8 epochs of one 64-trajectory step; on pose accuracy alone (the (d)) and on the preset's own
# reward (half pose accuracy, half the prompt's attributes). Each pose comparison also reports the prompt's
# attributes (prompt_attributes), which pose accuracy alone can cost. DDPO runs the tiny preset (8 epochs of 32
# trajectories, a UNet LoRA) at 2e-3: the detector's OKS is the measured quantity itself, not a learned stand-in that
# a larger step would over-optimise (the tiny preset's lr 1e-3 is for those).
POSE_DDPO_LR = 2e-3
POSE_RLCM_ARGS = ["--preset", "tiny-rlcm-pose"]


@dataclass
class LearningBudget:
    """How much data and training the check uses (the test's is small, the bench's larger)."""

    train_prompts: int = 2  # prompts of the labelled round (x 12 poses x 4 images)
    fresh_prompts: int = 2  # prompts of the fresh round the reward model is checked on
    eval_prompts: int = 2  # prompts of each shared-seed comparison (x 12 poses x eval_images)
    eval_images: int = 2
    policy_overrides: list[str] = field(default_factory=list)  # extra --set for train_policy (bench budgets)
    threads: int = 1
    # Which policy runs to train and compare (the slow part): any of POLICY_RUNS; empty = none. The pose
    # runs need no labels: with only those, the labelled round and the reward model are skipped.
    policies: tuple[str, ...] = POLICY_RUNS
    # Also train the conditioned reward model kind (it reads prompt and pose too) on the same labels and compare both
    # kinds' within-group agreement with the rater on the fresh round, paired by group.
    conditioned: bool = False


def _prompts(n: int, offset: int) -> list[str]:
    from poseloop.world.quality import vocabulary_prompts

    vocab = vocabulary_prompts()
    return [vocab[(offset + i) % len(vocab)] for i in range(n)]


def _latest(root: Path) -> str:
    from poseloop.models.policy_files import resolve_latest

    return resolve_latest(root).name


def run_learning_check(work: Path, embedded: Path, budget: LearningBudget | None = None,
                       log: Any = print) -> dict[str, Any]:
    """Generate, label through the API, train reward + DDPO + D3PO + pose DDPO / RLCM, measure each on fresh rounds."""
    import torch

    import generate as generate_script
    import train_policy as train_policy_script
    import train_reward as train_reward_script
    from poseloop.config.lib import parse_config
    from poseloop.evaluation.compare import evaluate
    from poseloop.config.evaluation import PRESETS as EVAL_PRESETS
    from poseloop.config.evaluation import EvaluateConfig
    from poseloop.config.policy import POSE_SCALE, pose_and_prompt_reward
    from poseloop.config.generation import LCM_LORA_FILE
    from webapp import create_app

    b = budget or LearningBudget()
    unknown = set(b.policies) - set(POLICY_RUNS)
    if unknown:
        raise ValueError(f"LearningBudget.policies: unknown run(s) {sorted(unknown)}; choose from {POLICY_RUNS}")
    torch.set_num_threads(b.threads)
    samples, models = work / "samples", work / "models"
    model = ["--model.base", str(embedded), "--model.controlnet", str(embedded / "controlnet"),
             "--model.models_dir", str(models), "--model.threads", str(b.threads)]
    detector = embedded / "pose_detector"
    results: dict[str, Any] = {}
    t0 = time.time()

    def gen(round_name: str, prompts: list[str]) -> None:
        assert generate_script.main([*model, "--store.samples_dir", str(samples), "--store.round", round_name,
                                     "--data.prompts", *prompts]) == 0

    if not b.policies or set(b.policies) & set(LABELLED_RUNS):
        # 1. A round, labelled by the scripted rater through the app's JSON API.
        gen("labelled", _prompts(b.train_prompts, 0))
        client = create_app({"samples_dir": samples}).test_client()
        results["labels"] = label_round(client, samples, "labelled")
        log(f"[{time.time() - t0:.0f} s] labelled: {results['labels']}")

        # 2. The reward model, checked on a fresh round it never saw.
        assert train_reward_script.main(["--data.samples_dir", str(samples), "--data.rounds", "labelled",
                                         "--output.models_dir", str(models), "--output.version", "rm"]) == 0
        gen("fresh", _prompts(b.fresh_prompts, 6))
        acc = reward_pair_accuracy(models / "reward" / "rm", samples, "fresh")
        results["reward_fresh_pair_accuracy"] = {"mean": acc[0], "ci": [acc[1], acc[2]], "pairs": acc[3]}
        if b.conditioned:
            assert train_reward_script.main(["--data.samples_dir", str(samples), "--data.rounds", "labelled",
                                             "--model.kind", "conditioned", "--output.models_dir", str(models),
                                             "--output.version", "rm-conditioned"]) == 0
            results["conditioned_reward"] = conditioned_vs_latent(models / "reward" / "rm-conditioned",
                                                                  models / "reward" / "rm", samples, "fresh")
            log(f"[{time.time() - t0:.0f} s] conditioned reward model on the fresh round: "
                + json.dumps(results["conditioned_reward"]))
        log(f"[{time.time() - t0:.0f} s] reward model on a fresh round: pairwise accuracy {acc[0]:.3f} "
            f"[{acc[1]:.3f}, {acc[2]:.3f}] over {acc[3]} pairs")

    def train(args: list[str]) -> str:
        # Every run from the base model: each is measured against the base, not stacked on the run before it.
        assert train_policy_script.main([*model, "--parent", "base", *args, *b.policy_overrides]) == 0
        return _latest(models / "policies")

    def compare(name: str, version: str, metrics: list[str], preset: str, extra: list[str], seed_set: str
                ) -> dict[str, Any]:
        argv = [*model, "--store.samples_dir", str(samples), "--data.prompts", *_prompts(b.eval_prompts, 3),
                "--set", f"sample.images_per_group={b.eval_images}", *extra, "--eval.policy", version,
                "--eval.name", f"eval-{name}", "--eval.metrics", *metrics, "--set", "eval.bootstrap=2000",
                # every comparison with one sampler and ControlNet scale shares one baseline round
                "--set", f"eval.seeds={seed_set}"]
        cfg, _ = parse_config(EvaluateConfig, EVAL_PRESETS, preset, argv, description="", prog="evaluate.py")
        res = evaluate(cfg)
        return {m.name: {"baseline": m.baseline_mean, "candidate": m.candidate_mean, "diff": m.diff_mean,
                         "ci": list(m.diff_ci), "win_rate": m.win_rate, "n": m.n} for m in res.metrics}

    # 3. DDPO on the learned reward, D3PO straight from the rater's pairs, DDPO and RLCM on pose accuracy.
    # Each run: its train_policy.py arguments, the metrics compared, the evaluation's preset and arguments, and
    # the seed set of its comparison (runs that share one share the baseline round).
    pose = f"pose_accuracy:weights={detector}"
    lcm = ["--model.lcm_lora", str(embedded / LCM_LORA_FILE)]
    # Pose comparisons at the training's ControlNet scale, with twice the images: OKS is noisy at scale 0.4.
    pose_eval = ["--sample.controlnet_scale", str(POSE_SCALE), "--set", f"sample.images_per_group={2 * b.eval_images}"]

    def rlcm_pose_run(reward: str) -> tuple[list[str], list[str], str, list[str], str]:
        # compared decoded by the world's VAE, as the policy's rewards were (not the tiny-lcm preset's preview decoder)
        return ([*POSE_RLCM_ARGS, *lcm, "--reward", reward, "--data.prompts", *_prompts(6, 0)],
                [pose, "prompt_attributes"], "tiny-lcm", [*lcm, "--model.vae", "", *pose_eval], "learning-check-tiny-lcm")

    runs = {
        "ddpo_reward_model": (["--algo", "ddpo", "--reward", f"latent:{models / 'reward' / 'rm'}"], [RULE], "tiny", [],
                              "learning-check"),
        "d3po_pairs": (["--algo", "d3po", "--d3po.samples_dir", str(samples), "--d3po.rounds", "labelled"], [RULE],
                       "tiny", [], "learning-check"),
        # at RLCM's ControlNet scale, where the world leaves room to gain, and on the same prompts
        "ddpo_pose_accuracy": (["--algo", "ddpo", "--reward", pose, "--sample.controlnet_scale", str(POSE_SCALE),
                                "--optim.lr", str(POSE_DDPO_LR), "--data.prompts", *_prompts(6, 0)],
                               [pose, "prompt_attributes"], "tiny", pose_eval, "learning-check-pose"),
        "rlcm_pose_accuracy": rlcm_pose_run(pose),
        "rlcm_pose_and_prompt": rlcm_pose_run(pose_and_prompt_reward(str(detector))),
    }
    for name, (args, metrics, preset, extra, seed_set) in runs.items():
        if name not in b.policies:
            continue
        start = time.time()
        version = train(args)
        results[name] = compare(name, version, metrics, preset, extra, seed_set)
        results[name]["train_seconds"] = time.time() - start
        log(f"[{time.time() - t0:.0f} s] {name}: " + json.dumps(results[name]))
    results["seconds"] = time.time() - t0
    return results
