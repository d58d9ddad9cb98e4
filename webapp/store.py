"""Database access of the rating app: short write transactions, idempotent labels, undo, pairs."""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Engine, bindparam, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from poseloop.data.db import (
    Comparison,
    Group,
    LabelEvent,
    Preference,
    Rater,
    Rating,
    Round,
    Sample,
    connect,
    get_or_create_rater,
    loop_round_number,
    make_engine,
    make_session_factory,
    session_scope,
    utcnow,
)

T = TypeVar("T")

CHOICES = ("left", "right", "tie", "skip")
MAX_REQUEST_ID = 64


class ApiError(Exception):
    """A request the app refuses; becomes a JSON error with this HTTP status."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def _immediate_transactions(engine: Engine) -> None:
    """Make every transaction on this SQLite engine take the write lock at BEGIN.

    A deferred transaction that reads and then writes cannot wait for the lock in WAL mode: SQLite
    answers "database is locked" at once instead of honouring busy_timeout. BEGIN IMMEDIATE queues
    the writer at the start, where busy_timeout applies, so concurrent raters wait instead of failing.
    """

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not the sqlite3 module, decide how a transaction starts.
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# Key of the PostgreSQL advisory lock that queues the app's label writes ("poseloop" in ASCII); any number
# works as long as every app process on the database uses the same one.
PG_WRITE_LOCK_KEY = 0x706F73656C6F6F70
# SQLSTATEs PostgreSQL answers when a transaction lost a race and may simply run again.
_PG_RETRY_STATES = frozenset({"40001", "40P01", "55P03"})  # serialization failure, deadlock, lock not available


def _retryable(exc: OperationalError) -> bool:
    """A lock timeout (SQLite) or a lost race (PostgreSQL) that a fresh transaction can redo."""
    if getattr(exc.orig, "sqlstate", None) in _PG_RETRY_STATES:
        return True
    return "locked" in str(exc) or "busy" in str(exc)


@dataclass
class Store:
    """Read and write session factories over one database."""

    read_factory: sessionmaker[Session]
    write_factory: sessionmaker[Session]
    engines: tuple[Engine, ...]
    # SQLite has one writer at a time anyway; queueing this process's writers on a Python lock wakes
    # the next one the moment the previous commits, where SQLite's busy handler would sleep and poll.
    write_lock: threading.Lock | None = None
    cache: IdCache = field(default_factory=lambda: IdCache())
    # Run first in every write transaction (PostgreSQL: take the advisory write lock).
    write_begin_sql: str | None = None

    @classmethod
    def open(cls, url: str, field: str = "db_url") -> Store:
        """Open (and create tables in) the database at `url`; DatabaseUrlError naming `field` if it cannot be used."""
        read_engine = connect(url, field)
        dialect = read_engine.dialect.name
        begin_sql = None
        if dialect == "sqlite" and ":memory:" not in url:
            write_engine = make_engine(url)
            _immediate_transactions(write_engine)
            engines: tuple[Engine, ...] = (read_engine, write_engine)
        else:
            write_engine = read_engine
            engines = (read_engine,)
        if dialect == "postgresql":
            # A label write reads (prior request id, old score, latest event to undo) and then writes. Under
            # READ COMMITTED two such transactions of one rater could both read the same old value, so one
            # label event would record a wrong "old" value and undo would restore the wrong thing. An advisory
            # transaction lock queues writers across every app process, like SQLite's BEGIN IMMEDIATE; each
            # statement after it sees everything committed before. Reads never wait for it, and writes are a
            # few short statements, so the queue costs little (bench/bench_webapp.py --postgresql: p99 30 ms at
            # rater pace with 50 clients); tests/test_webapp_concurrency.py shows the broken history without it.
            begin_sql = f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK_KEY})"
        lock = threading.Lock() if dialect == "sqlite" else None
        return cls(make_session_factory(read_engine), make_session_factory(write_engine), engines, lock,
                   write_begin_sql=begin_sql)

    def dispose(self) -> None:
        """Close every pooled connection."""
        for engine in self.engines:
            engine.dispose()

    def read(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` in a read transaction."""
        with session_scope(self.read_factory) as session:
            return fn(session)

    def _write_once(self, fn: Callable[[Session], T]) -> T:
        with session_scope(self.write_factory) as session:
            if self.write_begin_sql is not None:
                session.execute(text(self.write_begin_sql))
            return fn(session)

    def write(self, fn: Callable[[Session], T], attempts: int = 8) -> T:
        """Run `fn` in a short write transaction, retrying lock timeouts and unique-key races."""
        for attempt in range(attempts):
            try:
                if self.write_lock is None:
                    return self._write_once(fn)
                with self.write_lock:
                    return self._write_once(fn)
            except OperationalError as exc:
                if not _retryable(exc) or attempt == attempts - 1:
                    raise
            except IntegrityError:
                # Two requests created the same rater or request id at once; the retry sees the winner.
                # A constraint failure may also mean cached rows were deleted elsewhere.
                self.cache.clear()
                if attempt == attempts - 1:
                    raise
            time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
        raise AssertionError("unreachable")


# ---------------------------------------------------------------- validation helpers


# The id and score columns are INTEGER: signed 64 bits on SQLite but 32 bits on PostgreSQL, where binding a
# larger value raises (a 500). One range for both databases: no row can have an id outside it.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
INT_RANGE = "-2**31 and 2**31-1"
MAX_RATER_NAME = 100
# Unicode line and paragraph separators break lines like a newline does; bidi controls can make a name
# display as another (or reorder the columns of an export).
_BAD_NAME_CHARS = {"\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def check_text(value: str, name: str) -> str:
    """`value` if it can be stored as UTF-8 text (no lone surrogates such as "\\ud800"), else a 400."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{name}' contains an unpaired UTF-16 surrogate; send valid Unicode text") from None
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refused on every database so both behave alike
        raise ApiError(400, f"'{name}' contains a NUL character (U+0000); remove it")
    return value


def clean_rater_name(value: Any) -> str:
    """A valid rater name (surrounding whitespace stripped; no control characters) or ApiError."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "'rater' is required: a non-empty name")
    name = check_text(value, "rater").strip()
    if len(name) > MAX_RATER_NAME:
        raise ApiError(400, f"'rater' must be at most {MAX_RATER_NAME} characters")
    for i, ch in enumerate(name):
        if unicodedata.category(ch) == "Cc" or ch in _BAD_NAME_CHARS:
            raise ApiError(400, f"'rater' must not contain control characters or line breaks (U+{ord(ch):04X} at "
                                f"position {i}); use a plain one-line name")
    return name


def clean_request_id(value: Any) -> str | None:
    """A valid client request id (or None) or ApiError."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_REQUEST_ID:
        raise ApiError(400, f"'request_id' must be a string of 1..{MAX_REQUEST_ID} characters")
    return check_text(value, "request_id")


def clean_int(value: Any, name: str) -> int:
    """An integer field (booleans, NaN, infinities and floats with a fraction refused) or ApiError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}")
    if not INT_MIN <= value <= INT_MAX:
        raise ApiError(400, f"'{name}' must be an integer between {INT_RANGE}, got {value!r}")
    return int(value)


def find_rater(session: Session, name: str | None) -> Rater | None:
    """The rater with this name, or None (reads never create raters)."""
    if not name:
        return None
    return session.scalar(select(Rater).where(Rater.name == name.strip()))


def get_round(session: Session, round_id: int) -> Round:
    """The round or a 404 ApiError."""
    rnd = session.get(Round, round_id)
    if rnd is None:
        raise ApiError(404, f"unknown round {round_id}")
    return rnd


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
        out.update(sample_id=ev.sample_id, old_score=_int_or_none(ev.old_score), score=_int_or_none(ev.new_score))
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


def _int_or_none(x: float | None) -> int | float | None:
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
        "score": _int_or_none(score),
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


def _round_pairs(session: Session, round_id: int) -> dict[int, list[tuple[int, int]]]:
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
    pairs = _round_pairs(session, round_id)
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
    pairs_by_group = _round_pairs(session, round_id)
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


# ---------------------------------------------------------------- writes


def _existing_event(session: Session, rater_id: int, request_id: str | None) -> LabelEvent | None:
    if request_id is None:
        return None
    return session.scalar(
        select(LabelEvent).where(LabelEvent.rater_id == rater_id, LabelEvent.request_id == request_id)
    )


class IdCache:
    """Process-wide memo of rater ids and sample rounds, so a label write is three small statements.

    Only rows read from committed data are remembered (a rater created in a transaction that later
    rolls back must not be), and the whole memo is dropped whenever a write fails on a constraint.
    """

    def __init__(self) -> None:
        self.raters: dict[str, int] = {}
        self.sample_rounds: dict[int, int] = {}

    def clear(self) -> None:
        """Forget everything (e.g. after rows were deleted by another program)."""
        self.raters.clear()
        self.sample_rounds.clear()

    def sample_round(self, session: Session, sample_id: int) -> int | None:
        """The round of a sample, or None when there is no such sample."""
        rid = self.sample_rounds.get(sample_id)
        if rid is None:
            rid = session.scalar(select(Sample.round_id).where(Sample.id == sample_id))
            if rid is not None:
                self.sample_rounds[sample_id] = rid
        return rid

    def rater_id(self, session: Session, name: str) -> int:
        """The id of this rater, created if new."""
        rid = self.raters.get(name)
        if rid is None:
            rid = session.scalar(select(Rater.id).where(Rater.name == name))
            if rid is None:
                return get_or_create_rater(session, name).id
            self.raters[name] = rid
        return rid


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
