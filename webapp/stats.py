"""Per-rater progress, score histograms and agreement between raters."""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from poseloop.data.db import BlindJudgement, Comparison, Preference, Rater, Rating, Round, Sample

from . import blind

from .store import get_round
from .queries import round_pairs, iso


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (ties get their average rank); None when undefined (n < 2 or no spread)."""
    from scipy.stats import spearmanr

    if len(x) != len(y) or len(x) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: scipy warns and returns nan, reported here as None
        rho = float(spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def round_stats(session: Session, round_id: int | None, score_range: tuple[int, int]) -> dict[str, Any]:
    """Progress, histograms and agreement of every rater, for one round or all rounds."""
    samples_q = select(Sample.id)
    if round_id is not None:
        get_round(session, round_id)
        samples_q = samples_q.where(Sample.round_id == round_id)
    sample_ids = set(session.scalars(samples_q))
    if round_id is not None:
        pair_total = sum(len(p) for p in round_pairs(session, round_id).values())
    else:
        pair_total = 0
        for rid in set(session.scalars(select(Sample.round_id).distinct())):
            pair_total += sum(len(p) for p in round_pairs(session, rid).values())

    names = dict(session.execute(select(Rater.id, Rater.name)).all())
    scores: dict[int, dict[int, float]] = defaultdict(dict)
    for rid, sid, score in session.execute(select(Rating.rater_id, Rating.sample_id, Rating.score)):
        if sid in sample_ids:
            scores[rid][sid] = score
    prefs: dict[int, dict[tuple[int, int], str]] = defaultdict(dict)
    for rid, a, b, choice in session.execute(
        select(Preference.rater_id, Preference.sample_a_id, Preference.sample_b_id, Preference.choice)
    ):
        if a in sample_ids:
            prefs[rid][(a, b)] = choice

    lo, hi = score_range
    raters = []
    for rid in sorted(set(scores) | set(prefs), key=lambda r: names[r].lower()):
        # .get: indexing the defaultdicts here would add empty raters to the agreement tables.
        vals = list(scores.get(rid, {}).values())
        hist = Counter(int(round(v)) for v in vals)
        choices = Counter(prefs.get(rid, {}).values())
        raters.append({
            "rater": names[rid],
            "scored": len(vals),
            "score_total": len(sample_ids),
            "mean_score": round(sum(vals) / len(vals), 3) if vals else None,
            "histogram": [{"score": s, "count": hist.get(s, 0)} for s in range(min([lo, *hist]), max([hi, *hist]) + 1)],
            "pairs": len(prefs.get(rid, {})),
            "pair_total": pair_total,
            "choices": {"left_or_right": choices["a"] + choices["b"], "tie": choices["tie"], "skip": choices["skip"]},
        })

    spearman_rows = []
    for r1, r2 in combinations(sorted(scores, key=lambda r: names[r].lower()), 2):
        shared = sorted(set(scores[r1]) & set(scores[r2]))
        rho = spearman([scores[r1][s] for s in shared], [scores[r2][s] for s in shared])
        spearman_rows.append({"a": names[r1], "b": names[r2], "shared": len(shared),
                              "spearman": None if rho is None else round(rho, 4)})
    pair_rows = []
    for r1, r2 in combinations(sorted(prefs, key=lambda r: names[r].lower()), 2):
        shared = [p for p in set(prefs[r1]) & set(prefs[r2]) if "skip" not in (prefs[r1][p], prefs[r2][p])]
        agree = sum(1 for p in shared if prefs[r1][p] == prefs[r2][p])
        pair_rows.append({"a": names[r1], "b": names[r2], "shared": len(shared),
                          "agreement": round(agree / len(shared), 4) if shared else None})
    return {
        "round_id": round_id,
        "score_range": [lo, hi],
        "samples": len(sample_ids),
        "pairs": pair_total,
        "raters": raters,
        "agreement": {"spearman": spearman_rows, "pairs": pair_rows},
        "rounds": round_means(session),
        "cross_round": cross_round(session),
        "comparisons": [blind.results(session, cid)
                        for cid in session.scalars(select(Comparison.id).order_by(Comparison.id.desc()))],
    }


def _r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def round_means(session: Session) -> list[dict[str, Any]]:
    """Every round (oldest first) with its policy version, the mean of all raters' current scores, and the
    mean of per-rater z-scores (each rater's scores over all rounds centred on the rater's mean and divided
    by the rater's standard deviation; a rater whose scores never vary contributes 0)."""
    rows = session.execute(
        select(Rating.rater_id, Sample.round_id, Rating.score).join(Sample, Rating.sample_id == Sample.id)
    ).all()
    by_rater: dict[int, list[float]] = defaultdict(list)
    for rid, _round, score in rows:
        by_rater[rid].append(score)
    norm: dict[int, tuple[float, float]] = {}
    for rid, vals in by_rater.items():
        mean = sum(vals) / len(vals)
        norm[rid] = (mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)))
    raw: dict[int, list[float]] = defaultdict(list)
    z: dict[int, list[float]] = defaultdict(list)
    raters: dict[int, set[int]] = defaultdict(set)
    for rid, round_id, score in rows:
        mean, sd = norm[rid]
        raw[round_id].append(score)
        z[round_id].append((score - mean) / sd if sd > 0 else 0.0)
        raters[round_id].add(rid)
    out = []
    for r in session.scalars(select(Round).order_by(Round.created_at, Round.id)):
        vals = raw.get(r.id, [])
        out.append({
            "round_id": r.id,
            "name": r.name,
            "policy_version": r.policy_version,
            "created_at": iso(r.created_at),
            "n_scores": len(vals),
            "n_raters": len(raters.get(r.id, ())),
            "mean_score": _r4(sum(vals) / len(vals)) if vals else None,
            "mean_z": _r4(sum(z[r.id]) / len(z[r.id])) if vals else None,
        })
    return out


def cross_round(session: Session) -> list[dict[str, Any]]:
    """How often the newer round (later created_at) wins, over blind verdicts and preferences whose two
    samples come from different rounds; ties count half, skips are left out."""
    rounds = {r.id: r for r in session.scalars(select(Round))}
    order = {rid: (r.created_at, rid) for rid, r in rounds.items()}
    tallies: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)

    def add(r1: int, r2: int, winner: int | None) -> None:
        """One verdict between rounds r1 and r2; winner is a round id or None for a tie."""
        older, newer = sorted((r1, r2), key=order.__getitem__)
        tallies[(older, newer)]["tie" if winner is None else "newer" if winner == newer else "older"] += 1

    for base, cand, outcome in session.execute(
        select(Comparison.baseline_round_id, Comparison.candidate_round_id, BlindJudgement.outcome)
        .join(Comparison, BlindJudgement.comparison_id == Comparison.id)
    ):
        if outcome != "skip" and base != cand:
            add(base, cand, {"candidate": cand, "baseline": base}.get(outcome))
    round_of = dict(session.execute(select(Sample.id, Sample.round_id)).all())
    for a, b, choice in session.execute(select(Preference.sample_a_id, Preference.sample_b_id, Preference.choice)):
        ra, rb = round_of.get(a), round_of.get(b)
        if choice != "skip" and ra is not None and rb is not None and ra != rb:
            add(ra, rb, {"a": ra, "b": rb}.get(choice))
    out = []
    for (older, newer), c in sorted(tallies.items(), key=lambda kv: (order[kv[0][1]], order[kv[0][0]])):
        n = c["newer"] + c["older"] + c["tie"]
        out.append({
            "older": rounds[older].name, "older_round_id": older,
            "newer": rounds[newer].name, "newer_round_id": newer,
            "n": n, "newer_wins": c["newer"], "older_wins": c["older"], "ties": c["tie"],
            "newer_win_rate": _r4((c["newer"] + 0.5 * c["tie"]) / n) if n else None,
        })
    return out

