"""Reads of the rating app: rounds, items and progress as JSON, and which pairs a rater sees next."""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from poseloop.data.db import (
    Comparison,
    Group,
    LabelEvent,
    Preference,
    Rating,
    Round,
    Sample,
    loop_round_number,
)

from .store import find_rater, get_round


# ---------------------------------------------------------------- serialisation


def event_json(ev: LabelEvent, rater_name: str | None = None) -> dict[str, Any]:
    """A label event as JSON."""
    out: dict[str, Any] = {
        "event_id": ev.id,
        "kind": ev.kind,
        "round_id": ev.round_id,
        "rater": rater_name if rater_name is not None else ev.rater.name,
        "request_id": ev.request_id,
        "created_at": iso(ev.created_at),
        "undone": ev.undone_at is not None,
    }
    if ev.kind == "score":
        out.update(sample_id=ev.sample_id, old_score=int_or_none(ev.old_score), score=int_or_none(ev.new_score))
    else:
        out.update(
            sample_a_id=ev.sample_a_id,
            sample_b_id=ev.sample_b_id,
            old_choice=ev.old_choice,
            choice=ev.new_choice,
            left_sample_id=ev.new_left_id,
        )
    return out


def iso(t: datetime | None) -> str | None:
    """ISO-8601 time in UTC (SQLite hands back naive datetimes; they were stored as UTC)."""
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()


def int_or_none(x: float | None) -> int | float | None:
    if x is None:
        return None
    return int(x) if float(x).is_integer() else x


# generate.py sets a round "complete" once every planned sample is stored; until then it is "running"
# (or was interrupted), and rating it would label a partial set of groups.
FINISHED = "complete"


def round_json(rnd: Round, n_groups: int = 0, n_samples: int = 0, in_comparison: bool = False) -> dict[str, Any]:
    """A round as JSON; in_comparison marks a side of a blind comparison (the page does not open it first).

    kind: "loop" (generate.py's round-NNNN, loop_round = N), "evaluation" (a side of a comparison) or "named"
    (any other --store.round name); label says which, for the round selector.
    """
    number = loop_round_number(rnd.name)
    kind = "evaluation" if in_comparison else "loop" if number is not None else "named"
    label = {"loop": f"loop round {number}", "evaluation": "evaluation", "named": "named round"}[kind]
    return {
        "id": rnd.id,
        "name": rnd.name,
        "kind": kind,
        "loop_round": number,
        "label": label,
        "status": rnd.status,
        "finished": rnd.status == FINISHED,
        "arch": rnd.arch,
        "created_at": iso(rnd.created_at),
        "groups": n_groups,
        "samples": n_samples,
        "in_comparison": in_comparison,
    }


# ---------------------------------------------------------------- reads


def list_rounds(session: Session) -> list[dict[str, Any]]:
    """Every round with its group and sample counts, newest first."""
    g_counts = dict(session.execute(select(Group.round_id, func.count()).group_by(Group.round_id)).all())
    s_counts = dict(session.execute(select(Sample.round_id, func.count()).group_by(Sample.round_id)).all())
    rounds = session.scalars(select(Round).order_by(Round.id.desc())).all()
    compared = {rid for pair in session.execute(select(Comparison.baseline_round_id, Comparison.candidate_round_id))
                for rid in pair}
    return [round_json(r, g_counts.get(r.id, 0), s_counts.get(r.id, 0), r.id in compared) for r in rounds]


def default_round_id(rounds: list[dict[str, Any]]) -> int | None:
    """The round the page opens first: the newest finished one outside any blind comparison.

    Evaluation rounds are judged blind first, and an unfinished round has only part of its groups; when
    no round qualifies, the newest outside a comparison, then the newest of all.
    """
    for ok in (lambda r: r["finished"] and not r["in_comparison"] and r["samples"], lambda r: not r["in_comparison"],
               lambda r: True):
        found = next((r["id"] for r in rounds if ok(r)), None)
        if found is not None:
            return found
    return None


def round_samples(session: Session, round_id: int) -> list[tuple[Sample, Group]]:
    """(sample, group) of a round in rating order: group index, then sample index."""
    rows = session.execute(
        select(Sample, Group)
        .join(Group, Sample.group_id == Group.id)
        .where(Sample.round_id == round_id)
        .order_by(Group.index, Sample.index)
    ).all()
    return [(s, g) for s, g in rows]


def rater_scores(session: Session, rater_id: int | None, round_id: int) -> dict[int, float]:
    """{sample id: score} of one rater in one round."""
    if rater_id is None:
        return {}
    rows = session.execute(
        select(Rating.sample_id, Rating.score)
        .join(Sample, Rating.sample_id == Sample.id)
        .where(Rating.rater_id == rater_id, Sample.round_id == round_id)
    ).all()
    return dict(rows)


def score_progress(session: Session, rater_id: int | None, round_id: int) -> dict[str, int]:
    """How many samples of the round this rater has scored."""
    total = session.scalar(select(func.count()).select_from(Sample).where(Sample.round_id == round_id)) or 0
    done = 0
    if rater_id is not None:
        done = session.scalar(
            select(func.count())
            .select_from(Rating)
            .join(Sample, Rating.sample_id == Sample.id)
            .where(Rating.rater_id == rater_id, Sample.round_id == round_id)
        ) or 0
    return {"done": done, "total": total}


def item_json(sample: Sample, group: Group, score: float | None) -> dict[str, Any]:
    """One sample as an item of the rating page."""
    return {
        "sample_id": sample.id,
        "group_id": group.id,
        "group_index": group.index,
        "index": sample.index,
        "prompt": group.prompt,
        "pose_name": group.pose_name,
        "image_url": f"/media/sample/{sample.id}",
        "condition_url": f"/media/condition/{group.id}",
        "file_name": sample.image_path.replace("\\", "/").rsplit("/", 1)[-1],
        "width": sample.width,
        "height": sample.height,
        "score": int_or_none(score),
    }


def list_items(session: Session, round_id: int, rater_name: str | None, only_unrated: bool) -> dict[str, Any]:
    """The samples of a round for score mode, with this rater's scores and progress."""
    rnd = get_round(session, round_id)
    rater = find_rater(session, rater_name)
    scores = rater_scores(session, rater.id if rater else None, round_id)
    items = [item_json(s, g, scores.get(s.id)) for s, g in round_samples(session, round_id)]
    progress = {"done": sum(1 for it in items if it["score"] is not None), "total": len(items)}
    if only_unrated:
        items = [it for it in items if it["score"] is None]
    return {"round": round_json(rnd), "items": items, "progress": progress}


# ---------------------------------------------------------------- pairs


def _stable_hash(*parts: object) -> int:
    """A hash that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def round_pairs(session: Session, round_id: int) -> dict[int, list[tuple[int, int]]]:
    """{group id: every canonical pair (a < b) of its samples}."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for gid, sid in session.execute(
        select(Sample.group_id, Sample.id).where(Sample.round_id == round_id).order_by(Sample.id)
    ):
        by_group[gid].append(sid)
    return {
        gid: [(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))]
        for gid, ids in by_group.items()
    }


def _round_preferences(session: Session, round_id: int) -> list[tuple[int, int, int, str]]:
    """(rater id, a, b, choice) of every preference in the round."""
    rows = session.execute(
        select(Preference.rater_id, Preference.sample_a_id, Preference.sample_b_id, Preference.choice)
        .join(Sample, Preference.sample_a_id == Sample.id)
        .where(Sample.round_id == round_id)
    ).all()
    return [(r, a, b, c) for r, a, b, c in rows]


def pair_progress(session: Session, rater_id: int | None, round_id: int) -> dict[str, int]:
    """How many pairs of the round this rater has judged (skips included) out of all pairs."""
    pairs = round_pairs(session, round_id)
    total = sum(len(p) for p in pairs.values())
    done = 0
    if rater_id is not None:
        done = session.scalar(
            select(func.count())
            .select_from(Preference)
            .join(Sample, Preference.sample_a_id == Sample.id)
            .where(Preference.rater_id == rater_id, Sample.round_id == round_id)
        ) or 0
    return {"done": done, "total": total}


def next_pairs(
    session: Session, round_id: int, rater_name: str | None, count: int, exclude: Iterable[tuple[int, int]] = (),
    active: Callable[[Session, int, dict[int, list[tuple[int, int]]]], Any] | None = None,
) -> dict[str, Any]:
    """The next `count` pairs this rater has not judged, spread over groups (coverage order).

    The group this rater has judged least comes first (ties: the group all raters judged least), then
    the pair judged least by anyone; the remaining ties are broken by a per-rater hash so two raters
    working at once see different pairs, and a reload shows the same pair on the same side.

    With `active` (webapp.active.PairRanker.order), the pair judged least by anyone still comes first,
    then the pair the latest reward model is least sure about (ensemble std in 20 levels, then P(a beats b)
    near 0.5 in 20 levels), then the per-rater hash. When `active` returns None (no usable reward model) coverage order is used; the
    answer's "order" says which order it is.
    """
    get_round(session, round_id)
    rater = find_rater(session, rater_name)
    rater_key = rater_name or ""
    pairs_by_group = round_pairs(session, round_id)
    ranked = active(session, round_id, pairs_by_group) if active is not None else None
    group_of = {p: gid for gid, ps in pairs_by_group.items() for p in ps}
    done: set[tuple[int, int]] = set(exclude)
    pair_counts: Counter[tuple[int, int]] = Counter()
    group_counts: Counter[int] = Counter()
    rater_group_counts: Counter[int] = Counter()
    for rid, a, b, _choice in _round_preferences(session, round_id):
        pair_counts[(a, b)] += 1
        group_counts[group_of.get((a, b), -1)] += 1
        if rater is not None and rid == rater.id:
            done.add((a, b))
            rater_group_counts[group_of.get((a, b), -1)] += 1
    for p in exclude:
        rater_group_counts[group_of.get(p, -1)] += 1

    chosen: list[tuple[int, int, int]] = []
    if ranked is not None:
        last = (math.inf, math.inf)  # a pair the order does not know (none while the round is unchanged) goes last
        open_pairs = [p for p in group_of if p not in done]
        open_pairs.sort(key=lambda p: (pair_counts[p], ranked.priority.get(p, last), _stable_hash(rater_key, *p)))
        chosen = [(group_of[p], *p) for p in open_pairs[:max(count, 0)]]
    for _ in range(max(count, 0) if ranked is None else 0):
        best: tuple[Any, ...] | None = None
        for gid, ps in pairs_by_group.items():
            open_pairs = [p for p in ps if p not in done]
            if not open_pairs:
                continue
            pair = min(open_pairs, key=lambda p: (pair_counts[p], _stable_hash(rater_key, *p)))
            key = (rater_group_counts[gid], group_counts[gid] / len(ps), _stable_hash(rater_key, gid))
            if best is None or key < best[0]:
                best = (key, gid, pair)
        if best is None:
            break
        _key, gid, pair = best
        chosen.append((gid, *pair))
        done.add(pair)
        rater_group_counts[gid] += 1
        group_counts[gid] += 1

    samples = {s.id: s for s in session.scalars(select(Sample).where(Sample.id.in_({x for c in chosen for x in c[1:]})))}
    groups = {g.id: g for g in session.scalars(select(Group).where(Group.id.in_({c[0] for c in chosen})))}
    out = []
    for gid, a, b in chosen:
        left, right = (a, b) if _stable_hash(rater_key, "side", a, b) % 2 == 0 else (b, a)
        g = groups[gid]
        out.append({
            "group_id": gid,
            "group_index": g.index,
            "prompt": g.prompt,
            "pose_name": g.pose_name,
            "condition_url": f"/media/condition/{gid}",
            "left": item_json(samples[left], g, None),
            "right": item_json(samples[right], g, None),
        })
    return {"pairs": out, "progress": pair_progress(session, rater.id if rater else None, round_id),
            "order": "active" if ranked is not None else "coverage",
            "reward_model": ranked.version if ranked is not None else None}
