"""The three steps of a loop job, run in this process: train_reward -> train_policy -> generate, then the learned
reward's mean on every loop round. Each step's outputs are written atomically by the code it calls; each step's
result (a version name) is what the next step uses, so nothing resolves 'latest' behind the job's back."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from poseloop.config.lib import ConfigError, from_dict, parse_step_args
from poseloop.data.db import Group, Job, Round, Sample, open_db, session_scope
from poseloop.config.loop import LoopPlan


@dataclass
class Place:
    """Where this worker finds the shared samples folder and database, and keeps its models."""

    samples_dir: Path
    db_url: str
    models_dir: Path


def _parse(cls: type, presets: dict[str, Callable[[], Any]], default: str, args: list[str], step: str) -> Any:
    """A step's config from its arguments; a bad argument is a ConfigError naming the step."""
    try:
        return parse_step_args(cls, presets, default, args, prog=step)
    except ConfigError as e:
        raise ConfigError(f"{step}: {e}") from None


def reward_version_name(job: Job) -> str:
    """The reward model version a job trains: named after the round it is for and the job, so a retry finds it."""
    return f"rm-{job.target_round}-job{job.id}"


def run_reward(job: Job, plan: LoopPlan, place: Place) -> dict[str, Any]:
    """Train the reward model on every label so far (or reuse the one an earlier attempt of this job finished)."""
    from poseloop.config.reward import PRESETS, TrainRewardConfig
    from poseloop.rewards.versions import reward_root

    version = reward_version_name(job)
    folder = reward_root(place.models_dir) / version
    if (folder / "metrics.json").is_file():  # renamed into place as a whole: a finished version
        return {"reward_version": version, "reward_summary": f"reward {version}: kept from an earlier attempt"}
    cfg = _parse(TrainRewardConfig, PRESETS, "default", [
        *plan.reward, "--data.samples_dir", str(place.samples_dir), "--data.db_url", place.db_url,
        "--output.models_dir", str(place.models_dir), "--output.version", version], "train_reward.py")
    from poseloop.rewards.training import train_reward

    result = train_reward(cfg)
    return {"reward_version": result.version, "reward_summary": result.summary()}


def run_policy(job: Job, plan: LoopPlan, place: Place, reward_version: str) -> dict[str, Any]:
    """Train the policy on that reward model version (a re-run with the same inputs resumes its run)."""
    from poseloop.config.policy import PRESETS, PolicyConfig

    cfg = _parse(PolicyConfig, PRESETS, "tiny", [
        *plan.policy, "--model.models_dir", str(place.models_dir), "--d3po.samples_dir", str(place.samples_dir),
        "--d3po.db_url", place.db_url], "train_policy.py")
    if cfg.reward.strip() in ("latest", "latent:latest"):
        cfg.reward = f"latent:{reward_version}"  # pinned: another train_reward.py may move 'latest' meanwhile
    from poseloop.policy.trainer import train

    result = train(cfg)
    if result.export_dir is None:
        raise RuntimeError(f"train_policy.py exported nothing ({result.summary()})")
    return {"policy_version": result.export_dir.name, "policy_summary": result.summary()}


def _round_data(place: Place, source_round: str | None) -> dict[str, Any] | None:
    """The data section (prompts, poses) and images per group of the round the job follows."""
    if not source_round:
        return None
    with session_scope(open_db(place.db_url)) as s:
        rnd = s.scalar(select(Round).where(Round.name == source_round))
        config = rnd.config if rnd is not None else {}
    if not isinstance(config.get("data"), dict):
        return None
    return {"data": config["data"], "images_per_group": config.get("sample", {}).get("images_per_group")}


def generate_config(job: Job, plan: LoopPlan, place: Place, policy_version: str) -> Any:
    """generate.py's config for the job's round: the preset, the last loop round's prompts and poses, the plan's
    arguments, then the policy and the round name."""
    from poseloop.config.generation import PRESETS, GenerateConfig

    carried = _round_data(place, job.source_round)
    presets = {name: _with_round_data(fn, carried, images_per_group=True) for name, fn in PRESETS.items()}
    return _parse(GenerateConfig, presets, "tiny", [
        *plan.generate, "--store.samples_dir", str(place.samples_dir), "--store.db_url", place.db_url,
        "--model.models_dir", str(place.models_dir), "--model.policy", policy_version,
        "--store.round", job.target_round], "generate.py")


def run_generate(job: Job, plan: LoopPlan, place: Place, policy_version: str) -> dict[str, Any]:
    """Generate (or resume) the job's round with that policy."""
    from poseloop.sampling.round import generate

    result = generate(generate_config(job, plan, place, policy_version))
    return {"round": result.round_name, "generate_summary": result.summary()}


def ab_name(job: Job) -> str:
    """The blind A/B of the job's round: its two rounds are <name>-baseline and <name>-candidate."""
    return f"ab-{job.target_round}"


def run_compare(job: Job, plan: LoopPlan, place: Place, reward_version: str, policy_version: str) -> dict[str, Any]:
    """evaluate.py: the new policy against the one it continued (or the base model), on shared seeds, registered as
    a blind comparison for the rating app, with the learned reward's paired difference."""
    from poseloop.evaluation.compare import evaluate
    from poseloop.config.evaluation import PRESETS, EvaluateConfig
    from poseloop.policy.lineage import LINEAGE_FILE

    lineage = json.loads((place.models_dir / "policies" / policy_version / LINEAGE_FILE).read_text())
    baseline = lineage.get("parent") or "base"
    carried = _round_data(place, job.source_round)
    presets = {name: _with_round_data(fn, carried, images_per_group=False) for name, fn in PRESETS.items()}
    cfg = _parse(EvaluateConfig, presets, "tiny", [
        *plan.generate, *plan.compare, "--store.samples_dir", str(place.samples_dir), "--store.db_url", place.db_url,
        "--model.models_dir", str(place.models_dir), "--eval.policy", policy_version, "--eval.baseline", baseline,
        "--eval.metrics", f"latent:{reward_version}", "--eval.name", ab_name(job)], "evaluate.py")
    result = evaluate(cfg)
    return {"ab": {"name": ab_name(job), "baseline": baseline, "candidate": policy_version,
                   "summary": result.summary()}}


def _with_round_data(preset: Callable[[], Any], carried: dict[str, Any] | None, images_per_group: bool
                     ) -> Callable[[], Any]:
    """generate.py's or evaluate.py's preset with the last loop round's prompts and poses (and, for a round, its
    images per group)."""
    from poseloop.config.generation import DataConfig

    def build() -> Any:
        cfg = preset()
        if carried is not None:
            try:
                cfg.data = from_dict(DataConfig, carried["data"])
            except (TypeError, ValueError, ConfigError):
                pass  # a round written by another version of the config: the preset's data stands
            if images_per_group and carried["images_per_group"]:
                cfg.sample.images_per_group = int(carried["images_per_group"])
        return cfg

    return build


def reward_means(place: Place, reward_version: str) -> dict[str, Any]:
    """The reward model's mean (95% bootstrap interval) on every finished loop round's stored final latents."""
    import torch

    from poseloop.data.db import loop_round_number
    from poseloop.metrics.stats import bootstrap_ci
    from poseloop.rewards.loading import load_reward_model
    from poseloop.data.store import SampleStore, load_trajectory

    model = load_reward_model(reward_version, place.models_dir)
    store = SampleStore(place.samples_dir)
    out: dict[str, Any] = {}
    with session_scope(open_db(place.db_url)) as s:
        rounds = [r for r in s.scalars(select(Round).where(Round.status == "complete"))
                  if loop_round_number(r.name) is not None]
        for rnd in sorted(rounds, key=lambda r: r.name):
            rows = s.execute(select(Sample, Group).join(Group, Sample.group_id == Group.id)
                             .where(Sample.round_id == rnd.id, Sample.trajectory_path.is_not(None))
                             .order_by(Group.index, Sample.index)).all()
            values: list[float] = []
            for i in range(0, len(rows), 32):
                chunk = rows[i:i + 32]
                latents = torch.stack([load_trajectory(store.abs(smp.trajectory_path)).latents[-1].float()
                                       for smp, _g in chunk])
                prompts = [g.prompt for _s, g in chunk]
                metadata = [{"keypoints": g.keypoints, "width": smp.width, "height": smp.height} for smp, g in chunk]
                with torch.no_grad():
                    values += [float(v) for v in model.score(latents, prompts, metadata)]
            values = [v for v in values if math.isfinite(v)]
            if values:
                lo, hi = bootstrap_ci(values, n_resamples=1000)
                out[rnd.name] = {"mean": round(sum(values) / len(values), 5), "ci": [round(lo, 5), round(hi, 5)],
                                 "n": len(values), "policy": rnd.policy_version}
    return {"reward_means": out, "reward_means_by": reward_version}
