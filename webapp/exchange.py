"""Export and import of labels: AlmostPerfect scores.json, D3PO per-rater JSON, full JSONL."""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from poseloop.data.db import Group, LabelEvent, Preference, Rater, Rating, Round, Sample, get_or_create_rater, utcnow

from .store import ApiError, clean_rater_name, get_round
from .queries import int_or_none, iso


def file_name(image_path: str) -> str:
    """The file name of a relative image path (the key of scores.json)."""
    return image_path.replace("\\", "/").rsplit("/", 1)[-1]


def round_half_away(x: float) -> int:
    """Round to the nearest integer, halves away from zero (2.5 -> 3, -2.5 -> -3)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _samples(session: Session, round_id: int | None) -> list[Sample]:
    q = select(Sample).join(Group, Sample.group_id == Group.id)
    if round_id is not None:
        get_round(session, round_id)
        q = q.where(Sample.round_id == round_id)
    return list(session.scalars(q.order_by(Sample.round_id, Group.index, Sample.index)))


def _rater_id(session: Session, rater: str | None) -> int | None:
    if rater is None:
        return None
    rid = session.scalar(select(Rater.id).where(Rater.name == rater.strip()))
    if rid is None:
        raise ApiError(404, f"unknown rater {rater!r}")
    return rid


def export_scores_json(session: Session, round_id: int | None, rater: str | None = None) -> dict[str, int]:
    """AlmostPerfect scores.json: {file name: integer score}; several raters are averaged and rounded."""
    samples = _samples(session, round_id)
    by_name: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        by_name[file_name(s.image_path)].append(s.id)
    clashes = sorted(n for n, ids in by_name.items() if len(ids) > 1)
    if clashes:
        raise ApiError(
            409,
            f"{len(clashes)} file name(s) are shared by several samples (e.g. {clashes[0]}), so a flat "
            f"scores.json would mix them; export one round with round_id",
            file_names=clashes[:20],
        )
    rater_id = _rater_id(session, rater)
    ids = {s.id: file_name(s.image_path) for s in samples}
    q = select(Rating.sample_id, Rating.score).where(Rating.sample_id.in_(ids))
    if rater_id is not None:
        q = q.where(Rating.rater_id == rater_id)
    collected: dict[int, list[float]] = defaultdict(list)
    for sid, score in session.execute(q):
        collected[sid].append(score)
    return {ids[s.id]: round_half_away(sum(collected[s.id]) / len(collected[s.id])) for s in samples if collected[s.id]}


# Names Windows reserves for devices, with or without an extension ("CON.json" opens the console there).
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"{dev}{i}" for dev in ("com", "lpt") for i in range(10))}


def safe_file_stem(name: str) -> str:
    """A rater name as a file name stem that is valid on every OS (letters, digits, . _ -; no reserved names)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80].rstrip("._") or "rater"
    head, dot, tail = stem.partition(".")
    if head.lower() in _WINDOWS_RESERVED:
        stem = f"{head}_{dot}{tail}"
    return stem


def _is_int_in(value: Any, lo: int, hi: int) -> bool:
    """True for an integer (or integral finite float) in lo..hi; False for NaN, infinities, booleans."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return False
    return lo <= value <= hi


def export_d3po(session: Session, round_id: int | None) -> dict[str, list[list[float | None]]]:
    """D3PO layout per rater: a list per group (round, group order) of scores in sample index order."""
    samples = _samples(session, round_id)
    groups: dict[int, list[int]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s.id)
    ids = {s.id for s in samples}
    scores: dict[int, dict[int, float]] = defaultdict(dict)
    for rid, sid, score in session.execute(select(Rating.rater_id, Rating.sample_id, Rating.score)):
        if sid in ids:
            scores[rid][sid] = score
    names = dict(session.execute(select(Rater.id, Rater.name)).all())
    return {
        names[rid]: [[int_or_none(per.get(sid)) for sid in sids] for sids in groups.values()]
        for rid, per in sorted(scores.items(), key=lambda kv: names[kv[0]].lower())
    }


def d3po_zip(per_rater: dict[str, list[list[float | None]]]) -> bytes:
    """A zip of one `<rater>.json` per rater (name made file-safe; clashes get a numeric suffix)."""
    buf = io.BytesIO()
    used: set[str] = set()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, lists in per_rater.items():
            stem, n = safe_file_stem(name), 2
            candidate = stem
            while candidate.lower() in used:
                candidate, n = f"{stem}_{n}", n + 1
            used.add(candidate.lower())
            zf.writestr(f"{candidate}.json", json.dumps(lists))
    return buf.getvalue()


def export_jsonl(session: Session, round_id: int | None, history: bool = False) -> Iterator[str]:
    """Every current label (or, with history, every label event) as one JSON object per line."""
    samples = {s.id: s for s in _samples(session, round_id)}
    rounds = dict(session.execute(select(Round.id, Round.name)).all())
    names = dict(session.execute(select(Rater.id, Rater.name)).all())

    if history:
        q = select(LabelEvent).order_by(LabelEvent.id)
        if round_id is not None:
            q = q.where(LabelEvent.round_id == round_id)
        for ev in session.scalars(q):
            yield json.dumps({
                "type": "event", "event_id": ev.id, "kind": ev.kind, "rater": names[ev.rater_id],
                "rater_id": ev.rater_id, "round": rounds.get(ev.round_id), "round_id": ev.round_id,
                "sample_id": ev.sample_id, "sample_a_id": ev.sample_a_id, "sample_b_id": ev.sample_b_id,
                "old_score": int_or_none(ev.old_score), "score": int_or_none(ev.new_score),
                "old_choice": ev.old_choice, "choice": ev.new_choice, "left_sample_id": ev.new_left_id,
                "source": ev.source, "request_id": ev.request_id,
                "time": iso(ev.created_at), "undone_at": iso(ev.undone_at),
            }) + "\n"
        return
    for r in session.scalars(select(Rating).order_by(Rating.id)):
        s = samples.get(r.sample_id)
        if s is None:
            continue
        yield json.dumps({
            "type": "score", "rater": names[r.rater_id], "rater_id": r.rater_id,
            "round": rounds.get(s.round_id), "round_id": s.round_id, "group_id": s.group_id,
            "sample_id": s.id, "sample_index": s.index, "image": s.image_path,
            "score": int_or_none(r.score), "time": iso(r.updated_at), "created_at": iso(r.created_at),
        }) + "\n"
    for p in session.scalars(select(Preference).order_by(Preference.id)):
        s = samples.get(p.sample_a_id)
        if s is None:
            continue
        yield json.dumps({
            "type": "preference", "rater": names[p.rater_id], "rater_id": p.rater_id,
            "round": rounds.get(s.round_id), "round_id": s.round_id, "group_id": s.group_id,
            "sample_a_id": p.sample_a_id, "sample_b_id": p.sample_b_id, "left_sample_id": p.left_sample_id,
            "choice": p.choice, "winner_id": p.winner_id, "loser_id": p.loser_id,
            "time": iso(p.updated_at), "created_at": iso(p.created_at),
        }) + "\n"


def import_scores_json(
    session: Session,
    data: Any,
    rater: Any,
    round_id: int | None,
    score_range: tuple[int, int],
) -> dict[str, Any]:
    """Store an AlmostPerfect scores.json as one rater's scores; all or nothing.

    Every problem (unknown or ambiguous file name, non-integer or out-of-range score) is collected and
    reported together before anything is written.
    """
    name = clean_rater_name(rater)
    if not isinstance(data, dict):
        raise ApiError(400, "scores.json must be a JSON object {\"<file name>.png\": score}")
    lo, hi = score_range
    by_name: dict[str, list[Sample]] = defaultdict(list)
    by_path: dict[str, Sample] = {}
    for s in _samples(session, round_id):
        by_name[file_name(s.image_path)].append(s)
        by_path[s.image_path.replace("\\", "/")] = s
    unknown, ambiguous, bad = [], [], []
    resolved: list[tuple[Sample, int]] = []
    for key, value in data.items():
        sample = by_path.get(key)
        if sample is None:
            matches = by_name.get(file_name(key), [])
            if not matches:
                unknown.append(key)
                continue
            if len(matches) > 1:
                ambiguous.append(key)
                continue
            sample = matches[0]
        if not _is_int_in(value, lo, hi):
            bad.append(key)
            continue
        resolved.append((sample, int(value)))
    if unknown or ambiguous or bad:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown file name(s): {', '.join(unknown[:10])}")
        if ambiguous:
            parts.append(f"{len(ambiguous)} file name(s) match several samples (pass round_id): "
                         f"{', '.join(ambiguous[:10])}")
        if bad:
            parts.append(f"{len(bad)} score(s) not an integer in {lo}..{hi}: {', '.join(bad[:10])}")
        raise ApiError(400, "nothing imported; " + "; ".join(parts),
                       unknown=unknown, ambiguous=ambiguous, invalid_scores=bad)
    rater_row = get_or_create_rater(session, name)
    existing = {r.sample_id: r for r in session.scalars(select(Rating).where(Rating.rater_id == rater_row.id))}
    created = updated = unchanged = 0
    for sample, score in resolved:
        rating = existing.get(sample.id)
        if rating is not None and rating.score == score:
            unchanged += 1
            continue
        old = rating.score if rating is not None else None
        if rating is None:
            rating = Rating(rater_id=rater_row.id, sample_id=sample.id, score=score)
            session.add(rating)
            existing[sample.id] = rating
            created += 1
        else:
            rating.score, rating.updated_at = score, utcnow()
            updated += 1
        session.add(LabelEvent(rater_id=rater_row.id, round_id=sample.round_id, kind="score", sample_id=sample.id,
                               old_score=old, new_score=score, source="import"))
    session.flush()
    return {"rater": name, "created": created, "updated": updated, "unchanged": unchanged}
