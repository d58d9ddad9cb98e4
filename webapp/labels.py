"""Writes of the rating app: scores and preferences stored once per request id, and undo."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from poseloop.data.db import (
    LabelEvent,
    Preference,
    Rating,
    Sample,
    get_or_create_rater,
    utcnow,
)

from .queries import event_json
from .store import ApiError, CHOICES, IdCache, find_rater, get_round


# ---------------------------------------------------------------- writes


def _existing_event(session: Session, rater_id: int, request_id: str | None) -> LabelEvent | None:
    if request_id is None:
        return None
    return session.scalar(
        select(LabelEvent).where(LabelEvent.rater_id == rater_id, LabelEvent.request_id == request_id)
    )


_EVENTS = LabelEvent.__table__
_RATINGS = Rating.__table__
# Built once: constructing statements costs more than running them on SQLite.
_SEL_PRIOR = select(_EVENTS).where(_EVENTS.c.rater_id == bindparam("b_rid"), _EVENTS.c.request_id == bindparam("b_req"))
_RATING_KEY = (_RATINGS.c.rater_id == bindparam("b_rid"), _RATINGS.c.sample_id == bindparam("b_sid"))
_SEL_SCORE = select(_RATINGS.c.score).where(*_RATING_KEY)
_UPD_SCORE = update(_RATINGS).where(*_RATING_KEY).values(score=bindparam("b_score"), updated_at=bindparam("b_now"))
_INS_RATING = insert(_RATINGS)
_INS_EVENT = insert(_EVENTS)


def submit_score(
    session: Session,
    rater_name: str,
    sample_id: int,
    score: int,
    request_id: str | None,
    score_range: tuple[int, int],
    source: str = "web",
    cache: IdCache | None = None,
) -> dict[str, Any]:
    """Store (or change) a rater's score of a sample; a repeated request id returns the first result."""
    lo, hi = score_range
    if not lo <= score <= hi:
        raise ApiError(400, f"score {score} is outside the scale {lo}..{hi}")
    cache = cache or IdCache()
    round_id = cache.sample_round(session, sample_id)
    if round_id is None:
        raise ApiError(404, f"unknown sample {sample_id}")
    rater_id = cache.rater_id(session, rater_name)
    # Core statements on the session's connection, not ORM objects: this is the hot path of every keypress.
    conn = session.connection()
    if request_id is not None:
        prior = conn.execute(_SEL_PRIOR, {"b_rid": rater_id, "b_req": request_id}).first()
        if prior is not None:
            if prior.kind != "score" or prior.sample_id != sample_id or prior.new_score != score:
                raise ApiError(409, f"request_id {request_id!r} was already used for a different label")
            return {"event": event_json(prior, rater_name), "duplicate": True}  # type: ignore[arg-type]
    old = conn.execute(_SEL_SCORE, {"b_rid": rater_id, "b_sid": sample_id}).scalar()
    now = utcnow()
    if old is None:
        conn.execute(_INS_RATING, {"rater_id": rater_id, "sample_id": sample_id, "score": score,
                                   "created_at": now, "updated_at": now})
    else:
        conn.execute(_UPD_SCORE, {"b_rid": rater_id, "b_sid": sample_id, "b_score": score, "b_now": now})
    values = dict(rater_id=rater_id, round_id=round_id, kind="score", sample_id=sample_id, old_score=old,
                  new_score=score, source=source, request_id=request_id, created_at=now)
    event_id = conn.execute(_INS_EVENT, values).inserted_primary_key[0]
    ev = LabelEvent(id=event_id, undone_at=None, **values)
    return {"event": event_json(ev, rater_name), "duplicate": False}


def submit_preference(
    session: Session,
    rater_name: str,
    left_id: int,
    right_id: int,
    choice: str,
    request_id: str | None,
) -> dict[str, Any]:
    """Store (or change) a rater's judgement of two samples of one group."""
    if choice not in CHOICES:
        raise ApiError(400, f"'choice' must be one of {', '.join(CHOICES)}, got {choice!r}")
    if left_id == right_id:
        raise ApiError(400, f"a pair needs two different samples, got {left_id} twice")
    left, right = session.get(Sample, left_id), session.get(Sample, right_id)
    for sid, s in ((left_id, left), (right_id, right)):
        if s is None:
            raise ApiError(404, f"unknown sample {sid}")
    assert left is not None and right is not None
    if left.group_id != right.group_id:
        raise ApiError(
            400,
            f"samples {left_id} and {right_id} are in different groups ({left.group_id} and {right.group_id}); "
            f"a pair must share prompt and pose",
        )
    a, b = min(left_id, right_id), max(left_id, right_id)
    stored = {"left": "a" if left_id == a else "b", "right": "a" if right_id == a else "b"}.get(choice, choice)
    rater = get_or_create_rater(session, rater_name)
    prior = _existing_event(session, rater.id, request_id)
    if prior is not None:
        if (prior.kind, prior.sample_a_id, prior.sample_b_id, prior.new_choice, prior.new_left_id) != (
            "preference", a, b, stored, left_id
        ):
            raise ApiError(409, f"request_id {request_id!r} was already used for a different label")
        return {"event": event_json(prior, rater.name), "duplicate": True}
    pref = session.scalar(
        select(Preference).where(
            Preference.rater_id == rater.id, Preference.sample_a_id == a, Preference.sample_b_id == b
        )
    )
    old_choice, old_left = (pref.choice, pref.left_sample_id) if pref is not None else (None, None)
    if pref is None:
        session.add(Preference(rater_id=rater.id, sample_a_id=a, sample_b_id=b, choice=stored, left_sample_id=left_id))
    else:
        pref.choice, pref.left_sample_id, pref.updated_at = stored, left_id, utcnow()
    ev = LabelEvent(
        rater_id=rater.id, round_id=left.round_id, kind="preference", sample_a_id=a, sample_b_id=b,
        old_choice=old_choice, new_choice=stored, old_left_id=old_left, new_left_id=left_id,
        request_id=request_id,
    )
    session.add(ev)
    session.flush()
    return {"event": event_json(ev, rater.name), "duplicate": False}


def undo_last(
    session: Session, rater_name: str, round_id: int | None, kind: str | None, request_id: str | None
) -> dict[str, Any]:
    """Revert this rater's latest label (optionally within a round / of one kind) to its prior value."""
    if kind not in (None, "score", "preference"):
        raise ApiError(400, f"'kind' must be 'score' or 'preference', got {kind!r}")
    if round_id is not None:
        get_round(session, round_id)
    rater = find_rater(session, rater_name)
    if rater is None:
        return {"undone": None, "duplicate": False}
    if request_id is not None:
        prior = session.scalar(
            select(LabelEvent).where(LabelEvent.rater_id == rater.id, LabelEvent.undo_request_id == request_id)
        )
        if prior is not None:
            return {"undone": event_json(prior, rater.name), "duplicate": True}
    q = select(LabelEvent).where(LabelEvent.rater_id == rater.id, LabelEvent.undone_at.is_(None))
    if round_id is not None:
        q = q.where(LabelEvent.round_id == round_id)
    if kind is not None:
        q = q.where(LabelEvent.kind == kind)
    ev = session.scalar(q.order_by(LabelEvent.id.desc()).limit(1))
    if ev is None:
        return {"undone": None, "duplicate": False}
    if ev.kind == "score":
        rating = session.scalar(select(Rating).where(Rating.rater_id == rater.id, Rating.sample_id == ev.sample_id))
        if ev.old_score is None:
            if rating is not None:
                session.delete(rating)
        elif rating is None:
            session.add(Rating(rater_id=rater.id, sample_id=ev.sample_id, score=ev.old_score))
        else:
            rating.score, rating.updated_at = ev.old_score, utcnow()
    else:
        pref = session.scalar(
            select(Preference).where(
                Preference.rater_id == rater.id,
                Preference.sample_a_id == ev.sample_a_id,
                Preference.sample_b_id == ev.sample_b_id,
            )
        )
        if ev.old_choice is None:
            if pref is not None:
                session.delete(pref)
        elif pref is None:
            session.add(Preference(rater_id=rater.id, sample_a_id=ev.sample_a_id, sample_b_id=ev.sample_b_id,
                                   choice=ev.old_choice, left_sample_id=ev.old_left_id))
        else:
            pref.choice, pref.left_sample_id, pref.updated_at = ev.old_choice, ev.old_left_id, utcnow()
    ev.undone_at = utcnow()
    ev.undo_request_id = request_id
    session.flush()
    return {"undone": event_json(ev, rater.name), "duplicate": False}
