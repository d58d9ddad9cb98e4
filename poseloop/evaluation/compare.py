"""Did the new weights help? Baseline vs candidate on the same prompts, poses and seeds.

evaluate() generates two rounds from one plan (one seed namespace, so image k of group g has the
same seed and pose in both), registers them as a blind Comparison for the rating app, scores every
image with the requested metrics, and writes a report beside the candidate policy:

    models/policies/<version>/eval/<name>/report.md, metrics.json, metrics.png, grid.png

Its configuration is poseloop.config.evaluation; the results and the report, poseloop.evaluation.report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from poseloop.data import db
from poseloop.config.generation import GenerateConfig
from poseloop.config.lib import ConfigError, field_names, get_field
from poseloop.config.evaluation import PRESETS, EvaluateConfig
from poseloop.evaluation.report import EvalResult, MetricSummary, Pair, write_report
from poseloop.sampling.round import PlanMismatchError, generate, set_flag
from poseloop.policy.lineage import lineage_line
from poseloop.models.loading import resolve_policy
from poseloop.rewards.spec import pin_reward_versions
from poseloop.sampling.sampler import pil_to_tensor
from poseloop.metrics.stats import bootstrap_ci
from poseloop.data.store import SampleStore, load_trajectory


# ---- statistics -----------------------------------------------------------------------------------


def win_rate(candidate: np.ndarray, baseline: np.ndarray) -> float:
    """Fraction of pairs where the candidate scores higher; ties count half."""
    if candidate.size == 0:
        return math.nan
    return float(np.mean((candidate > baseline) + 0.5 * (candidate == baseline)))


def summarize(name: str, spec: str, baseline: np.ndarray, candidate: np.ndarray, n_boot: int, confidence: float,
              note: str = "") -> MetricSummary:
    """Means, intervals, paired difference and win rate of one metric."""
    return MetricSummary(
        name=name, spec=spec, baseline_mean=float(baseline.mean()),
        baseline_ci=bootstrap_ci(baseline, confidence, n_resamples=n_boot),
        candidate_mean=float(candidate.mean()), candidate_ci=bootstrap_ci(candidate, confidence, n_resamples=n_boot),
        diff_mean=float((candidate - baseline).mean()),
        diff_ci=bootstrap_ci(candidate, confidence, paired=baseline, n_resamples=n_boot),
        win_rate=win_rate(candidate, baseline),
        n=int(baseline.size), note=note,
    )


# ---- the pairs ----------------------------------------------------------------------------------


def load_pairs(session: Session, baseline_round_id: int, candidate_round_id: int) -> list[Pair]:
    """Match the two rounds' samples by (group index, sample index); the seeds must agree."""
    def by_slot(round_id: int) -> dict[tuple[int, int], db.Sample]:
        rows = session.scalars(select(db.Sample).where(db.Sample.round_id == round_id)).all()
        return {(s.group.index, s.index): s for s in rows}

    base, cand = by_slot(baseline_round_id), by_slot(candidate_round_id)
    if set(base) != set(cand):
        raise ValueError("the baseline and candidate rounds do not have the same groups and samples")
    pairs = []
    for slot in sorted(base):
        b, c = base[slot], cand[slot]
        if b.seed != c.seed:
            raise ValueError(f"sample {slot}: seeds differ ({b.seed} vs {c.seed}); the rounds were not made "
                             "from one evaluation plan")
        pairs.append(Pair(b.id, c.id, b.group.prompt, b.group.keypoints, b.group.condition_path,
                          b.group.source_image_path, b.image_path, c.image_path, b.trajectory_path,
                          c.trajectory_path, b.width, b.height))
    return pairs


def ensure_comparison(session: Session, name: str, baseline_round_id: int, candidate_round_id: int) -> db.Comparison:
    """The Comparison row of this evaluation, created once."""
    comp = session.scalar(select(db.Comparison).where(db.Comparison.name == name))
    if comp is None:
        comp = db.Comparison(name=name, baseline_round_id=baseline_round_id, candidate_round_id=candidate_round_id)
        session.add(comp)
        session.flush()
    elif (comp.baseline_round_id, comp.candidate_round_id) != (baseline_round_id, candidate_round_id):
        raise ConfigError(f"eval.name: comparison {name!r} already exists for other rounds; pick another --eval.name")
    return comp


def blind_results(session: Session, comparison_id: int) -> dict[str, Any]:
    """Counts of the rating app's blind verdicts for this comparison (skips left out of the rate)."""
    rows = session.scalars(select(db.BlindJudgement.outcome).where(db.BlindJudgement.comparison_id == comparison_id)).all()
    counts = {k: rows.count(k) for k in ("candidate", "baseline", "tie", "skip")}
    n = counts["candidate"] + counts["baseline"] + counts["tie"]
    rate = (counts["candidate"] + 0.5 * counts["tie"]) / n if n else math.nan
    return {**counts, "n": n, "win_rate": rate}


# ---- metrics ------------------------------------------------------------------------------------


def _image_tensor(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as [3, H, W] in 0..1, resized to `size` when given."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return pil_to_tensor([im])[0]


def auto_metrics(cfg: EvaluateConfig) -> tuple[list[str], dict[str, str]]:
    """Metric specs whose weights are present, and why the others were skipped."""
    from poseloop.world.detector import is_detector_folder

    specs, skipped = [], {}
    models = Path(cfg.model.models_dir)
    detector = cfg.eval.detector_weights or cfg.data.detector_weights or str(models / "annotators")
    embedded = Path(cfg.model.base) / "pose_detector"  # the embedded world ships its own detector
    if not (cfg.eval.detector_weights or cfg.data.detector_weights) and is_detector_folder(embedded):
        detector = str(embedded)
    if (Path(detector) / "body_pose_model.pth").is_file() or is_detector_folder(detector):
        specs.append(f"pose_accuracy:weights={detector}")
    else:
        skipped["pose_accuracy"] = (f"no OpenPose weights in {detector}; download body_pose_model.pth, "
                                    "hand_pose_model.pth, facenet.pth from lllyasviel/Annotators and pass "
                                    "--eval.detector_weights DIR")
    if cfg.eval.clip:
        specs.append(f"text_alignment:{cfg.eval.clip}")
    else:
        skipped["text_alignment"] = ("no CLIP weights given; pass e.g. --eval.clip "
                                     "'arch=ViT-L-14,weights=PATH' (open_clip weights)")
    if (models / "reward" / "latest").exists():
        specs.append("latent:latest")  # pinned to the concrete version by pin_reward_versions
    else:
        skipped["latent"] = "no learned reward model yet; train one with train_reward.py"
    return specs, skipped


def source_file(store: SampleStore, pair: Pair) -> Path:
    """A pair's source photo: relative to the samples folder, or absolute in rounds made by older versions."""
    path = Path(pair.source_image_path or "")
    return path if path.is_absolute() else store.abs(pair.source_image_path or "")


def compute_metric(reward: Any, pairs: list[Pair], store: SampleStore, batch: int = 8
                   ) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, baseline values, candidate values) of one reward over all pairs."""
    out: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for side in ("baseline", "candidate"):
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            images = torch.stack([_image_tensor(store.abs(getattr(p, f"{side}_image"))) for p in chunk])
            trajs = [getattr(p, f"{side}_trajectory") for p in chunk]
            latents = (torch.stack([load_trajectory(store.abs(t)).latents[-1].float() for t in trajs])
                       if all(trajs) else None)
            meta = [{"keypoints": p.keypoints, "width": p.width, "height": p.height,
                     "source_image": None if p.source_image_path is None else str(source_file(store, p))}
                    for p in chunk]
            with torch.no_grad():
                values = reward(images, latents, [p.prompt for p in chunk], meta)
            out[side].extend(values.float().cpu().tolist())
    return reward.name, np.asarray(out["baseline"]), np.asarray(out["candidate"])


def compute_lpips(pairs: list[Pair], store: SampleStore, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """LPIPS of each image to its group's source photo (lower = closer), baseline and candidate."""
    from poseloop.metrics.scores import lpips_distance

    with_source = [p for p in pairs if p.source_image_path]
    out = {}
    for side in ("baseline", "candidate"):
        a = torch.stack([_image_tensor(store.abs(getattr(p, f"{side}_image"))) for p in with_source])
        b = torch.stack([_image_tensor(source_file(store, p), (p.width, p.height)) for p in with_source])
        with torch.no_grad():
            out[side] = lpips_distance(a, b, lpips_weights=weights or None).cpu().numpy()
    return out["baseline"], out["candidate"]


# ---- the re-run command ---------------------------------------------------------------------------------


def rerun_command(cfg: EvaluateConfig, name: str, candidate: str, baseline: str) -> str:
    """The evaluate.py command that reproduces this evaluation exactly: concrete versions, every changed field."""
    fixed = {"eval.policy", "eval.baseline", "eval.name"}
    leaves = [n for n in field_names(EvaluateConfig) if n not in fixed]

    def changed(preset: str) -> list[str]:
        base = PRESETS[preset]()
        return [n for n in leaves if get_field(base, n) != get_field(cfg, n)]

    preset = min(PRESETS, key=lambda p: (len(changed(p)), p != "tiny"))
    flags = [set_flag(n, get_field(cfg, n)) for n in changed(preset)]
    return " ".join(["python evaluate.py", f"--preset {preset}", f"--eval.policy {candidate}",
                     f"--eval.baseline {baseline}", f"--eval.name {name}", *flags])


def _existing_comparison(cfg: EvaluateConfig, name: str) -> tuple[str, str] | None:
    """(candidate, baseline) policy versions of an existing comparison called `name`, without creating a database."""
    url = cfg.store.db_url or db.default_db_url(SampleStore(cfg.store.samples_dir).root)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    with db.session_scope(db.open_db(url, "store.db_url")) as session:
        comp = session.scalar(select(db.Comparison).where(db.Comparison.name == name))
        if comp is None:
            return None
        return comp.candidate_round.policy_version or "base", comp.baseline_round.policy_version or "base"


def _plan_mismatch(e: PlanMismatchError, side: str, name: str) -> ConfigError:
    """The generation error of a re-run, in evaluate.py's terms: what differs and which flags restore it."""
    what, flags = [], []
    for key, old, new in e.differences:
        if key == "model.policy":
            flag = "--eval.policy" if side == "candidate" else "--eval.baseline"
            what.append(f"the {side} is {old or 'base'!r} in the evaluation but {new or 'base'!r} now")
            flags.append(f"{flag} {old or 'base'}")
        else:
            what.append(f"{key} is {old!r} in the evaluation but {new!r} now")
            flags.append(set_flag(key, old))
    if not what:
        return ConfigError(f"eval.name: evaluation {name!r} (round {e.round_name!r}) was made from other inputs: a "
                           "prompts, dataset, keypoint or condition image file changed content; restore it to refresh "
                           "the evaluation, or pick another --eval.name")
    return ConfigError(f"eval.name: evaluation {name!r} (round {e.round_name!r}) was made with other settings: "
                       f"{'; '.join(what)}; pass {' '.join(flags)} to refresh it (the report shows the full command), "
                       "or pick another --eval.name to evaluate these settings")


# ---- the whole evaluation -------------------------------------------------------------------------


def _previous_pins(path: Path) -> dict[str, str]:
    """{metric spec as asked: spec with concrete versions} recorded by an earlier run of this evaluation."""
    try:
        pins = json.loads(path.read_text()).get("pinned_specs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in pins.items()} if isinstance(pins, dict) else {}


def evaluate(cfg: EvaluateConfig) -> EvalResult:
    """Generate both sides (or reuse them), score every pair, write the report."""
    start = time.perf_counter()
    cfg.validate()
    candidate = resolve_policy(dataclasses.replace(cfg.model, policy=cfg.eval.policy)).policy
    baseline = "base" if cfg.eval.baseline == "base" else \
        resolve_policy(dataclasses.replace(cfg.model, policy=cfg.eval.baseline)).policy
    if candidate == baseline:
        raise ConfigError(f"eval.baseline: the candidate and the baseline are the same ({candidate})")
    name = cfg.eval.name or f"eval-{candidate}-vs-{baseline}"
    pinned = _existing_comparison(cfg, name)
    if pinned is not None and pinned != (candidate, baseline):
        was_cand, was_base = pinned
        if cfg.eval.policy == "latest" and was_base == baseline:
            # 'latest' has moved on since the evaluation was made: a re-run refreshes it, it does not switch versions.
            print(f"note: evaluation {name!r} compares {was_cand} with {was_base}; 'latest' is {candidate} now and is "
                  f"not used (pass --eval.name <new name> to evaluate {candidate})", file=sys.stderr)
            candidate = was_cand
        else:
            raise ConfigError(f"eval.name: evaluation {name!r} compares candidate {was_cand} with baseline {was_base}, "
                              f"not {candidate} with {baseline}; pass --eval.policy {was_cand} --eval.baseline "
                              f"{was_base} to refresh it, or pick another --eval.name")
    report_dir = Path(cfg.model.models_dir) / "policies" / candidate / "eval" / name
    want_lpips = cfg.eval.metrics == ["auto"] or "lpips" in cfg.eval.metrics
    if cfg.eval.metrics == ["auto"]:
        specs, skipped = auto_metrics(cfg)
    else:
        specs, skipped = [m for m in cfg.eval.metrics if m != "lpips"], {}
    from poseloop.rewards.spec import build_reward

    # A re-run keeps the reward model versions of the first run (recorded in metrics.json).
    previous = _previous_pins(report_dir / "metrics.json")
    rewards, versions, requested = {}, {}, {}
    for spec in specs:  # a bad spec or a missing weights file fails here, before any image is generated
        try:
            concrete = previous.get(spec) or pin_reward_versions(spec, cfg.model.models_dir)[0]
            versions[concrete] = pin_reward_versions(concrete, cfg.model.models_dir)[1]
            rewards[concrete] = build_reward(concrete, models_dir=cfg.model.models_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"eval.metrics: {spec!r}: {e}") from None
        requested[concrete] = spec
    specs = list(rewards)

    round_ids = {}
    seeds = cfg.eval.seeds or name
    for side, policy in (("baseline", baseline), ("candidate", candidate)):
        # A shared seed set names the baseline round after itself and the baseline, so later evaluations reuse it
        # (generate resumes a round only when its plan, seeds included, is the same).
        round_name = f"{seeds}-baseline-{baseline}" if cfg.eval.seeds and side == "baseline" else f"{name}-{side}"
        gcfg = GenerateConfig(
            model=dataclasses.replace(cfg.model, policy="" if policy == "base" else policy),
            sample=dataclasses.replace(cfg.sample, seed_namespace=seeds),
            data=cfg.data, store=dataclasses.replace(cfg.store, round=round_name),
        )
        try:
            round_ids[side] = generate(gcfg).round_name
        except PlanMismatchError as e:
            raise _plan_mismatch(e, side, name) from None
    store = SampleStore(cfg.store.samples_dir)
    factory = db.open_db(cfg.store.db_url or db.default_db_url(store.root), "store.db_url")
    with db.session_scope(factory) as session:
        ids = {side: session.scalar(select(db.Round.id).where(db.Round.name == rn)) for side, rn in round_ids.items()}
        comparison = ensure_comparison(session, name, ids["baseline"], ids["candidate"])
        pairs = load_pairs(session, ids["baseline"], ids["candidate"])
        blind = blind_results(session, comparison.id)

    from poseloop.rewards.spec import parse_reward_spec

    summaries = []
    for spec in specs:
        usable, note = pairs, ""
        if any(t.name == "pose_accuracy" for t in parse_reward_spec(spec)):
            # Pose accuracy is defined against the condition's keypoints; image-only conditions have none.
            usable = [p for p in pairs if p.keypoints]
            if not usable:
                skipped[spec] = "no pair has ground-truth keypoints (the conditions were given as images only)"
                continue
            if len(usable) < len(pairs):
                note = f"over the {len(usable)} of {len(pairs)} pairs whose condition has known keypoints"
        metric_name, b, c = compute_metric(rewards[spec], usable, store)
        summary = summarize(metric_name, spec, b, c, cfg.eval.bootstrap, cfg.eval.confidence, note=note)
        if versions[spec]:
            summary.reward_model_version = ", ".join(versions[spec])
            why = (f" (what {requested[spec]!r} named when this evaluation was first run; kept on re-runs)"
                   if requested[spec] != spec else "")
            summary.note = "; ".join(filter(None, [summary.note,
                                                   f"learned reward model version {summary.reward_model_version}{why}"]))
        summaries.append(summary)
    if want_lpips and any(p.source_image_path for p in pairs):
        b, c = compute_lpips(pairs, store, cfg.eval.lpips_weights)
        # Lower LPIPS is better: negate for the win rate, report the distances themselves.
        s = summarize("lpips_to_source", "lpips", b, c, cfg.eval.bootstrap, cfg.eval.confidence,
                      note="" if cfg.eval.lpips_weights else
                      "computed with a random AlexNet backbone (no weights given): not a meaningful distance; "
                      "pass --eval.lpips_weights")
        s.win_rate = win_rate(-c, -b)
        summaries.append(s)
    elif want_lpips:
        skipped["lpips_to_source"] = "no group has a source image (use a jsonl dataset with \"image\")"

    result = EvalResult(name=name, candidate=candidate, baseline=baseline, pairs=len(pairs), metrics=summaries,
                        skipped=skipped, blind=blind, report_dir=report_dir, seconds=time.perf_counter() - start,
                        command=rerun_command(cfg, name, candidate, baseline),
                        pinned_specs={req: concrete for concrete, req in requested.items()},
                        lineage=lineage_line(Path(cfg.model.models_dir) / "policies", candidate))
    write_report(result, cfg, pairs, store)
    return result
