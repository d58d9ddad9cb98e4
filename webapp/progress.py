"""The loop's progress page (/progress) and its JSON (/api/loop/progress): per loop round, what made it (policy,
its parent, the reward model and the labels it was trained on), the learned reward's mean on it, the raters'
agreement on it, and the blind A/B of its policy against the one before, with 95% intervals; a plot and a table."""

from __future__ import annotations

import json
import random
from html import escape
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from poseloop.data import jobs
from poseloop.data.db import BlindJudgement, Comparison, Job, Preference, Rating, Round, Sample

from .stats import round_stats

bp = Blueprint("progress", __name__)


def win_rate_ci(outcomes: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the candidate's win rate (ties half, skips left out)."""
    values = [{"candidate": 1.0, "tie": 0.5, "baseline": 0.0}[o] for o in outcomes if o != "skip"]
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[min(n_boot - 1, int(0.975 * n_boot))]


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, None when it is missing or unreadable (a page must not fail on one bad file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _policy_info(models_dir: Path, version: str | None) -> dict[str, Any] | None:
    """What a policy was trained on, from its lineage.json: algorithm, parent, reward model(s) and their labels."""
    if not version:
        return None
    lineage = read_json(models_dir / "policies" / version / "lineage.json")
    if lineage is None:
        return {"version": version, "found": False}
    inputs = lineage.get("inputs") or {}
    rewards = []
    for rm in inputs.get("reward_models") or []:
        labels = rm.get("labels") or {}
        metrics = read_json(models_dir / "reward" / str(rm.get("version")) / "metrics.json") or {}
        rewards.append({"version": rm.get("version"), "n_labels": labels.get("n_labels"),
                        "digest": labels.get("digest"), "rounds": labels.get("rounds") or {},
                        "heldout_accuracy": metrics.get("heldout_pairwise_accuracy")})
    return {"version": version, "found": True, "algo": lineage.get("algo"), "parent": lineage.get("parent"),
            "reward": inputs.get("reward"), "reward_models": rewards, "target": lineage.get("target")}


def _agreement(stats: dict[str, Any]) -> dict[str, Any]:
    """Mean Spearman of score pairs and mean agreement on shared pairs, over rater pairs that share labels."""
    rho = [r["spearman"] for r in stats["agreement"]["spearman"] if r["spearman"] is not None and r["shared"] >= 3]
    agree = [r["agreement"] for r in stats["agreement"]["pairs"] if r["agreement"] is not None]
    return {"raters": len(stats["raters"]), "spearman": _mean(rho), "spearman_rater_pairs": len(rho),
            "pair_agreement": _mean(agree), "pair_rater_pairs": len(agree)}


def _ab(session: Session, policy: str | None, parent: str | None) -> dict[str, Any] | None:
    """The newest blind comparison of `policy` (candidate) against `parent` (or the base model), with its verdicts."""
    if not policy:
        return None
    rounds = {r.id: r for r in session.scalars(select(Round))}
    for comp in session.scalars(select(Comparison).order_by(Comparison.id.desc())):
        cand, base = rounds.get(comp.candidate_round_id), rounds.get(comp.baseline_round_id)
        if cand is None or base is None or cand.policy_version != policy or base.policy_version != parent:
            continue
        outcomes = list(session.scalars(select(BlindJudgement.outcome)
                                        .where(BlindJudgement.comparison_id == comp.id)))
        judged = [o for o in outcomes if o != "skip"]
        ci = win_rate_ci(outcomes)
        wins = sum(1.0 if o == "candidate" else 0.5 if o == "tie" else 0.0 for o in judged)
        return {"comparison_id": comp.id, "name": comp.name, "baseline": parent or "base", "candidate": policy,
                "n": len(judged), "candidate_wins": outcomes.count("candidate"),
                "baseline_wins": outcomes.count("baseline"), "ties": outcomes.count("tie"),
                "win_rate": round(wins / len(judged), 4) if judged else None,
                "ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}
    return None


def loop_progress(session: Session, models_dir: Path, score_range: tuple[int, int]) -> dict[str, Any]:
    """Every loop round, oldest first, with what made it and how it did (see the module docstring)."""
    done = session.scalar(select(Job).where(Job.state == "done").order_by(Job.id.desc()).limit(1))
    result = json.loads(done.result_json) if done is not None else {}
    means = result.get("reward_means") or {}
    job_of = {j.target_round: j for j in session.scalars(select(Job).order_by(Job.id))}
    rows = []
    for rnd in jobs.loop_rounds(session):
        n_samples = session.scalar(select(func.count()).select_from(Sample).where(Sample.round_id == rnd.id)) or 0
        scores = session.scalar(select(func.count()).select_from(Rating).join(Sample, Rating.sample_id == Sample.id)
                                .where(Sample.round_id == rnd.id)) or 0
        pairs = session.scalar(select(func.count()).select_from(Preference)
                               .join(Sample, Preference.sample_a_id == Sample.id)
                               .where(Sample.round_id == rnd.id, Preference.choice != "skip")) or 0
        policy = _policy_info(models_dir, rnd.policy_version)
        parent = policy.get("parent") if policy else None
        job = job_of.get(rnd.name)
        rows.append({
            "round": rnd.name, "round_id": rnd.id, "status": rnd.status, "samples": int(n_samples),
            "scores": int(scores), "pairs": int(pairs), "policy": policy,
            "job": None if job is None else {"id": job.id, "state": job.state, "trigger": job.trigger,
                                             "attempts": job.attempts,
                                             "seconds": json.loads(job.result_json or "{}").get("seconds")},
            "reward_mean": means.get(rnd.name),
            "agreement": _agreement(round_stats(session, rnd.id, score_range)),
            "ab": _ab(session, rnd.policy_version, parent),
        })
    return {"rounds": rows, "reward_means_by": result.get("reward_means_by")}


# ---------------------------------------------------------------- the plot (inline SVG: no script, no style attribute)


def _panel(points: list[tuple[str, float | None, list[float] | None]], title: str, x0: float, width: float,
           height: float, ref: float | None = None) -> list[str]:
    """One panel: a point per round with its interval, the rounds' names under it, an optional reference line."""
    known = [(v, ci) for _n, v, ci in points if v is not None]
    out = [f'<text x="{x0 + width / 2:.1f}" y="16" text-anchor="middle" font-size="13" fill="#223">{escape(title)}'
           "</text>"]
    if not known:
        out.append(f'<text x="{x0 + width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="12" '
                   'fill="#778">no data yet</text>')
        return out
    lo = min([ci[0] if ci else v for v, ci in known] + ([ref] if ref is not None else []))
    hi = max([ci[1] if ci else v for v, ci in known] + ([ref] if ref is not None else []))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad
    top, bottom, left = 28.0, height - 34.0, x0 + 46.0
    right = x0 + width - 10.0

    def y(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#99a"/>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#99a"/>')
    for v in (lo + pad, hi - pad):
        out.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="10" fill="#556">'
                   f"{v:.3g}</text>")
    if ref is not None:
        out.append(f'<line x1="{left}" y1="{y(ref):.1f}" x2="{right}" y2="{y(ref):.1f}" stroke="#c66" '
                   'stroke-dasharray="4 3"/>')
    step = (right - left) / max(1, len(points))
    prev = None
    for i, (name, v, ci) in enumerate(points):
        x = left + step * (i + 0.5)
        out.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10" fill="#556">'
                   f"{escape(name.removeprefix('round-'))}</text>")
        if v is None:
            continue
        if ci:
            out.append(f'<line class="ci" x1="{x:.1f}" y1="{y(ci[0]):.1f}" x2="{x:.1f}" y2="{y(ci[1]):.1f}" '
                       'stroke="#36c" stroke-width="2"/>')
        if prev is not None:
            out.append(f'<line x1="{prev[0]:.1f}" y1="{prev[1]:.1f}" x2="{x:.1f}" y2="{y(v):.1f}" stroke="#9ab"/>')
        out.append(f'<circle class="point" cx="{x:.1f}" cy="{y(v):.1f}" r="4" fill="#36c"><title>{escape(name)}: '
                   f"{v:.4g}{f' [{ci[0]:.4g}, {ci[1]:.4g}]' if ci else ''}</title></circle>")
        prev = (x, y(v))
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{height - 4}" text-anchor="middle" font-size="10" '
               'fill="#556">loop round</text>')
    return out


def progress_svg(data: dict[str, Any], width: int = 860, height: int = 240) -> str:
    """Two panels: the learned reward's mean per round (95% interval), and each policy's blind A/B win rate
    against the one before it (95% interval, 0.5 dashed)."""
    rows = data["rounds"]
    reward = [(r["round"], r["reward_mean"]["mean"] if r["reward_mean"] else None,
               r["reward_mean"]["ci"] if r["reward_mean"] else None) for r in rows]
    ab = [(r["round"], r["ab"]["win_rate"] if r["ab"] else None, r["ab"]["ci"] if r["ab"] else None) for r in rows]
    half = width / 2
    by = f" ({data['reward_means_by']})" if data.get("reward_means_by") else ""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="progress-plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="Loop progress per round">',
             *_panel(reward, f"learned reward, mean per round{by}", 0, half, height),
             *_panel(ab, "blind A/B: new policy's win rate vs the one before", half, half, height, ref=0.5),
             "</svg>"]
    return "\n".join(parts)


# ---------------------------------------------------------------- routes


def _data() -> dict[str, Any]:
    cfg = current_app.config["POSELOOP"]
    return current_app.extensions["poseloop_store"].read(
        lambda s: loop_progress(s, Path(cfg.models_dir), (cfg.score_min, cfg.score_max)))


@bp.get("/progress")
def progress_page() -> str:
    """The loop's rounds as a plot and a table."""
    data = _data()
    return render_template("progress.html", data=data, svg=progress_svg(data))


@bp.get("/api/loop/progress")
def progress_json() -> Response:
    """The progress page's data as JSON."""
    return jsonify(_data())
