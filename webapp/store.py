"""Database access of the rating app: the engine, short write transactions with retries, API errors, input checks."""

from __future__ import annotations

import math
import random
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from poseloop.data.db import (
    Rater,
    Round,
    Sample,
    connect,
    get_or_create_rater,
    make_engine,
    make_session_factory,
    session_scope,
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
