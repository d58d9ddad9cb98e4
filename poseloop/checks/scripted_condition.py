"""A scripted rater who judges against the condition, and the check that a conditioned reward model learns it.

The rater prefers images that follow their pose and their prompt: its rule is the world's pose detector's
OKS against the group's keypoints plus the share of the prompt's shirt, trousers and background colours the
world's attribute reader finds (both 0..1, summed). It labels rounds through the rating app's JSON API
(scripted.label_round), as the warm-light rater does. The check (run_condition_check) trains the unconditioned
(latent) and the conditioned reward model on the same labels and measures, on rounds no model saw, the
within-group Spearman of each with the rule: (a) on a fresh round of new prompts and seeds, (b) on poses the
labelled round did not have; and (c), when asked, the policy's gain on the rule after DDPO on each reward model.
It also checks the warm-light rater, whose taste needs no condition, on a conditioned model.
bench/bench_reward_condition.py runs it (the learning test checks the warm-light part cheaper, inside the D3PO run of
poseloop.checks.scripted.run_learning_check).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

from poseloop.data import db
from poseloop.metrics.stats import bootstrap_ci

RULES = ("faithful", "oks", "attributes")


@dataclass
class RoundRule:
    """The rule's parts for every sample of a round (database order)."""

    sample_ids: list[int]
    group_ids: list[int]
    paths: list[Path]
    oks: np.ndarray  # [N] detector OKS against the group's keypoints
    attributes: np.ndarray  # [N] share of the prompt's 3 attributes found, 0, 1/3, 2/3 or 1

    @property
    def faithful(self) -> np.ndarray:
        """The rater's rule: OKS + attribute share [N]."""
        return self.oks + self.attributes

    def values(self, rule: str) -> np.ndarray:
        """One of RULES [N]."""
        return {"faithful": self.faithful, "oks": self.oks, "attributes": self.attributes}[rule]


def round_rule(samples_dir: Path, round_name: str, detector_dir: Path) -> RoundRule:
    """Measure the rule on every sample of a round with the world's detector and attribute reader."""
    from poseloop.metrics.scores import multi_person_oks
    from poseloop.data.poses import Pose
    from poseloop.world.render import measure_attributes, parse_prompt
    from poseloop.world.detector import load_detector

    engine = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(engine) as s:
        rows = s.execute(select(db.Sample.id, db.Sample.group_id, db.Sample.image_path, db.Group.prompt,
                                db.Group.keypoints_json)
                         .join(db.Group, db.Sample.group_id == db.Group.id)
                         .join(db.Round, db.Group.round_id == db.Round.id)
                         .where(db.Round.name == round_name).order_by(db.Sample.id)).all()
    if not rows:
        raise ValueError(f"no samples in round {round_name!r} of {samples_dir}")
    detector = load_detector(detector_dir)
    arrs = []
    for r in rows:
        with Image.open(samples_dir / r[2]) as im:
            arrs.append(np.asarray(im.convert("RGB")))
    found: list[list[Pose]] = []
    for k in range(0, len(arrs), 64):
        found.extend(detector.detect(np.stack(arrs[k:k + 64])))
    oks, attrs = [], []
    for r, arr, det in zip(rows, arrs, found):
        gt = [Pose.from_dict(d) for d in json.loads(r[4])]
        h, w = arr.shape[:2]
        oks.append(multi_person_oks(gt, det, width=w, height=h))
        got, want = measure_attributes(arr, gt[0]), parse_prompt(r[3])
        attrs.append(sum(getattr(got, k) == getattr(want, k) for k in ("shirt", "trousers", "background")) / 3)
    return RoundRule([int(r[0]) for r in rows], [int(r[1]) for r in rows], [samples_dir / r[2] for r in rows],
                     np.asarray(oks, dtype=np.float64), np.asarray(attrs, dtype=np.float64))


def within_group_spearman(pred: np.ndarray, truth: np.ndarray, groups: list[int], seed: int = 0,
                          n_boot: int = 2000) -> dict[str, Any]:
    """Mean over groups of the Spearman of pred with truth within the group; 95% interval resampling groups.

    Groups where truth (or pred) is constant have no rank order to agree with and are left out (counted).
    """
    from scipy.stats import spearmanr

    by: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    rhos = []
    for idx in by.values():
        t, p = truth[idx], pred[idx]
        if len(idx) < 2 or np.ptp(t) == 0 or np.ptp(p) == 0:
            continue
        rhos.append(float(spearmanr(p, t).statistic))
    if not rhos:
        raise ValueError("no group with at least two different rule values: nothing to rank")
    v = np.asarray(rhos)
    return {"mean": float(v.mean()), "ci": list(bootstrap_ci(v, n_resamples=n_boot, seed=seed)),
            "groups": len(v), "groups_constant": len(by) - len(v), "per_group": rhos}


def paired_diff(a: list[float], b: list[float], seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Mean of b - a over paired groups with a 95% bootstrap interval (the groups resampled together)."""
    d = np.asarray(b) - np.asarray(a)
    return {"diff": float(d.mean()), "ci": list(bootstrap_ci(b, paired=a, n_resamples=n_boot, seed=seed)),
            "n": len(d)}


def label_with_rule(client: Any, samples_dir: Path, round_name: str, rule: RoundRule,
                    rater: str = "likes-faithful") -> dict[str, int]:
    """Score and judge every within-group pair of a round through the app's JSON API by the rule's values."""
    from poseloop.checks.scripted import label_round

    value = {p: float(v) for p, v in zip(rule.paths, rule.faithful)}
    return label_round(client, samples_dir, round_name, rater=rater, taste_of=value.__getitem__)


def score_round(reward_dir: Path, samples_dir: Path, round_name: str, shuffle_seed: int | None = None) -> np.ndarray:
    """A latent or conditioned reward model's score of every sample of a round [N] (database order, as round_rule).

    shuffle_seed: give each group the prompt and pose of another group of the round (a random permutation).
    """
    import torch

    from poseloop.rewards.loading import load_reward_model
    from poseloop.data.store import SampleStore, load_trajectory

    store = SampleStore(samples_dir)
    engine = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(engine) as s:
        rows = s.execute(select(db.Sample.id, db.Sample.group_id, db.Sample.trajectory_path, db.Group.prompt,
                                db.Group.keypoints_json, db.Sample.width, db.Sample.height)
                         .join(db.Group, db.Sample.group_id == db.Group.id)
                         .join(db.Round, db.Group.round_id == db.Round.id)
                         .where(db.Round.name == round_name).order_by(db.Sample.id)).all()
    cond = {int(r[1]): (r[3], {"keypoints": r[4], "width": r[5], "height": r[6]}) for r in rows}
    if shuffle_seed is not None:
        gids = sorted(cond)
        perm = np.random.default_rng(shuffle_seed).permutation(len(gids))
        cond = {g: cond[gids[int(perm[i])]] for i, g in enumerate(gids)}
    model = load_reward_model(reward_dir)
    latents = torch.stack([load_trajectory(store.abs(r[2])).latents[-1].float() for r in rows])
    prompts = [cond[int(r[1])][0] for r in rows]
    meta = [cond[int(r[1])][1] for r in rows]
    with torch.no_grad():
        return np.concatenate([model.score(latents[k:k + 128], prompts[k:k + 128], meta[k:k + 128]).float().numpy()
                               for k in range(0, len(rows), 128)])


def fresh_prompts(n: int) -> list[str]:
    """n prompts whose attribute combinations are not among world_eval.vocabulary_prompts (nor each other's)."""
    from poseloop.world.render import BACKGROUNDS, COLOURS, Attributes

    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    # The vocabulary pairs a shirt with the trousers 1 or 2 colours on; 3 on never occurs there.
    return [Attributes(colours[i % 6], colours[(i + 3) % 6], backgrounds[(i + 2 + i // 6) % 4]).prompt()
            for i in range(n)]


def pose_split(n_train: int, n_heldout: int) -> tuple[list[str], list[str]]:
    """Built-in pose names for the labelled round and disjoint ones for the held-out pose round."""
    from poseloop.data.poses import BUILTIN_POSES

    names = sorted(BUILTIN_POSES)
    order = names[0::2] + names[1::2]  # alternate, so both sets mix arm and leg poses
    if n_train + n_heldout > len(order):
        raise ValueError(f"{n_train} + {n_heldout} poses asked for; there are {len(order)} built-in poses")
    return order[:n_train], order[n_train:n_train + n_heldout]


@dataclass
class ConditionBudget:
    """Data and training of the condition check (the test's is small, the bench's larger)."""

    train_prompts: int = 8  # world_eval.vocabulary_prompts of the labelled round
    train_poses: int = 4  # built-in poses of the labelled and the fresh round
    heldout_poses: int = 4  # other built-in poses, for (b)
    fresh_prompts: int = 4  # new attribute combinations of both evaluation rounds
    images: int = 4  # images per group
    controlnet_scale: float = 0.4  # where the world does not always follow the pose, so a rater has pose to judge
    threads: int = 1
    kinds: tuple[str, ...] = ("latent", "conditioned")
    faithful: bool = True  # (a), (b): train on the faithful rater's labels, measure on the fresh and held-out rounds
    warm: bool = True  # also train both kinds on the warm-light rater's labels of the same round
    reward_overrides: list[str] = field(default_factory=list)  # extra train_reward.py arguments
    policy: bool = False  # (c): DDPO on each reward model, compared on the rule (slow: the bench only)
    policy_overrides: list[str] = field(default_factory=list)
    eval_images: int = 4


def _spearman_rows(rule: RoundRule, scores: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, Any]:
    """Within-group Spearman of each model with truth, and the paired difference conditioned - latent."""
    out: dict[str, Any] = {k: within_group_spearman(v, truth, rule.group_ids) for k, v in scores.items()}
    if "latent" in out and "conditioned" in out:
        a, b = out["latent"]["per_group"], out["conditioned"]["per_group"]
        if len(a) == len(b):
            out["conditioned_minus_latent"] = paired_diff(a, b)
    for v in out.values():
        v.pop("per_group", None)
    return out


def run_condition_check(work: Path, embedded: Path, budget: ConditionBudget | None = None,
                        log: Any = print) -> dict[str, Any]:
    """Label a round by the faithful (and the warm-light) rater, train each kind, measure (a), (b), warm, (c)."""
    import torch

    import generate as generate_script
    import train_reward as train_reward_script
    from poseloop.checks.scripted import image_taste, label_round
    from poseloop.world.quality import vocabulary_prompts
    from webapp import create_app

    b = budget or ConditionBudget()
    torch.set_num_threads(b.threads)
    samples, models = work / "samples", work / "models"
    model = ["--model.base", str(embedded), "--model.controlnet", str(embedded / "controlnet"),
             "--model.models_dir", str(models), "--model.threads", str(b.threads)]
    detector = embedded / "pose_detector"
    train_poses, held_poses = pose_split(b.train_poses, b.heldout_poses)
    results: dict[str, Any] = {"train_pose_names": train_poses, "heldout_pose_names": held_poses}
    t0 = time.time()

    def gen(name: str, prompts: list[str], poses: list[str]) -> RoundRule:
        assert generate_script.main([*model, "--store.samples_dir", str(samples), "--store.round", name,
                                     "--data.prompts", *prompts, "--data.poses", *poses,
                                     "--sample.controlnet_scale", str(b.controlnet_scale),
                                     "--set", f"sample.images_per_group={b.images}"]) == 0
        return round_rule(samples, name, detector)

    labelled = gen("labelled", vocabulary_prompts()[:b.train_prompts], train_poses)
    client = create_app({"samples_dir": samples}).test_client()
    if b.faithful:
        results["labels"] = label_with_rule(client, samples, "labelled", labelled)
    if b.warm:
        results["warm_labels"] = label_round(client, samples, "labelled")
    log(f"[{time.time() - t0:.0f} s] labelled: {results.get('labels')} {results.get('warm_labels')}")
    fresh = gen("fresh", fresh_prompts(b.fresh_prompts), train_poses)
    held = gen("heldout-poses", fresh_prompts(b.fresh_prompts), held_poses) if b.faithful else None
    log(f"[{time.time() - t0:.0f} s] evaluation rounds generated")

    def train(kind: str, rater: str) -> Path:
        version = f"{kind}-{rater}"
        assert train_reward_script.main(["--data.samples_dir", str(samples), "--data.rounds", "labelled",
                                         "--data.raters", rater, "--model.kind", kind, "--output.models_dir",
                                         str(models), "--output.version", version, *b.reward_overrides]) == 0
        return models / "reward" / version

    dirs = {k: train(k, "likes-faithful") for k in b.kinds} if b.faithful else {}
    for k, d in dirs.items():
        m = json.loads((d / "metrics.json").read_text())
        results[f"heldout_{k}"] = {"accuracy": m["heldout_pairwise_accuracy"], "spearman": m["heldout_spearman"],
                                   "condition_shuffled": m.get("condition_shuffled"), "seconds": m["train_seconds"]}
    for name, rule, rnd in ((("fresh", fresh, "fresh"), ("heldout_poses", held, "heldout-poses")) if held else ()):
        scores = {k: score_round(d, samples, rnd) for k, d in dirs.items()}
        res = {part: _spearman_rows(rule, scores, rule.values(part)) for part in RULES}
        if "conditioned" in dirs:
            shuffled = score_round(dirs["conditioned"], samples, rnd, shuffle_seed=0)
            res["faithful"]["conditioned_shuffled"] = {
                k: v for k, v in within_group_spearman(shuffled, rule.faithful, rule.group_ids).items()
                if k != "per_group"}
        results[name] = res
        log(f"[{time.time() - t0:.0f} s] {name}: " + json.dumps(res["faithful"]))
    if b.warm:
        warm_dirs = {k: train(k, "likes-warm-light") for k in b.kinds}
        warmth = np.array([image_taste(p) for p in fresh.paths])
        results["warm_fresh"] = _spearman_rows(fresh, {k: score_round(d, samples, "fresh")
                                                       for k, d in warm_dirs.items()}, warmth)
        log(f"[{time.time() - t0:.0f} s] warm-light rater, fresh round: " + json.dumps(results["warm_fresh"]))
    if b.policy and dirs:
        results["policy"] = _policy_runs(work, embedded, model, dirs, b, log, t0)
    results["seconds"] = time.time() - t0
    return results


def _policy_runs(work: Path, embedded: Path, model: list[str], dirs: dict[str, Path], b: ConditionBudget,
                 log: Any, t0: float) -> dict[str, Any]:
    """(c): DDPO on each reward model at the rounds' ControlNet scale, compared on shared seeds of fresh prompts."""
    import train_policy as train_policy_script
    from poseloop.config.lib import parse_config
    from poseloop.evaluation.compare import evaluate
    from poseloop.config.evaluation import PRESETS as EVAL_PRESETS
    from poseloop.config.evaluation import EvaluateConfig
    from poseloop.config.policy import pose_and_prompt_reward
    from poseloop.checks.scripted import _latest
    from poseloop.world.quality import vocabulary_prompts

    detector = embedded / "pose_detector"
    train_poses, _ = pose_split(b.train_poses, b.heldout_poses)
    pose = f"pose_accuracy:weights={detector}"
    # The rule's mean over its two parts: (OKS + attribute share) / 2, on the same pairs, so one paired interval.
    rule = pose_and_prompt_reward(str(detector))
    out: dict[str, Any] = {}
    for kind, d in dirs.items():
        start = time.time()
        assert train_policy_script.main([*model, "--algo", "ddpo", "--reward", f"latent:{d}",
                                         "--sample.controlnet_scale", str(b.controlnet_scale),
                                         "--data.prompts", *vocabulary_prompts()[:b.train_prompts],
                                         "--data.poses", *train_poses, *b.policy_overrides]) == 0
        version = _latest(work / "models" / "policies")
        argv = [*model, "--store.samples_dir", str(work / "samples"), "--data.prompts", *fresh_prompts(b.fresh_prompts),
                "--data.poses", *train_poses, "--sample.controlnet_scale", str(b.controlnet_scale),
                "--set", f"sample.images_per_group={b.eval_images}", "--eval.policy", version,
                "--eval.name", f"eval-{kind}", "--eval.metrics", rule, pose, "prompt_attributes",
                "--set", "eval.bootstrap=2000", "--set", "eval.seeds=condition-check"]
        cfg, _ = parse_config(EvaluateConfig, EVAL_PRESETS, "tiny", argv, description="", prog="evaluate.py")
        res = evaluate(cfg)
        out[kind] = {m.name: {"baseline": m.baseline_mean, "candidate": m.candidate_mean, "diff": m.diff_mean,
                              "ci": list(m.diff_ci), "win_rate": m.win_rate, "n": m.n} for m in res.metrics}
        out[kind]["seconds"] = time.time() - start
        log(f"[{time.time() - t0:.0f} s] DDPO on the {kind} reward model: " + json.dumps(out[kind]))
    return out
