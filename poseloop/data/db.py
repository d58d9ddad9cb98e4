"""Database schema shared by generate.py, the rating app and the trainers (SQLAlchemy 2.0).

File paths in rows are relative to the samples directory, so a samples folder can be moved or
copied to another machine together with its SQLite file. SQLite is the default; a team shares one
PostgreSQL database instead (`postgresql+psycopg://user:password@host/dbname`, see docs/RATING.md, "Team setup").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from poseloop.config.lib import ConfigError


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of every table."""


LOOP_ROUND = re.compile(r"round-(\d{4,})")


def loop_round_number(name: str) -> int | None:
    """N of a loop round's name 'round-NNNN' (generate.py's default names); None for any other round."""
    m = LOOP_ROUND.fullmatch(name)
    return int(m.group(1)) if m else None


def loop_round_name(number: int) -> str:
    """The name of loop round N."""
    return f"round-{number:04d}"


def next_loop_round(names: Iterable[str]) -> int:
    """The next loop round's number: one past the highest round-NNNN; evaluation and named rounds do not count."""
    return max((n for n in map(loop_round_number, names) if n is not None), default=0) + 1


class Round(Base):
    """One generation round: a set of groups and samples made with one model and one config."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Free-form names and paths are unbounded Text: SQLite never enforces a VARCHAR length, and PostgreSQL would
    # refuse (with an error, mid-run) a long --store.round, model path or pose name that SQLite stores.
    name: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "running" until every planned sample is stored, then "complete"; a re-run resumes a running one.
    status: Mapped[str] = mapped_column(String(20), default="running")
    arch: Mapped[str] = mapped_column(String(20))
    base_model: Mapped[str] = mapped_column(Text)
    controlnet_model: Mapped[str] = mapped_column(Text)
    lora_path: Mapped[str | None] = mapped_column(Text, default=None)
    lora_scale: Mapped[float | None] = mapped_column(Float, default=None)
    # Policy version (models/policies/<version>) that produced this round, when it came from training.
    policy_version: Mapped[str | None] = mapped_column(Text, default=None)
    # Hash of the generation plan (inputs + sampling settings); a resume must match it.
    plan_hash: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    planned_samples: Mapped[int] = mapped_column(Integer, default=0)

    groups: Mapped[list[Group]] = relationship(back_populates="round", cascade="all, delete-orphan")
    samples: Mapped[list[Sample]] = relationship(back_populates="round", viewonly=True)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config that made this round."""
        return json.loads(self.config_json)


class Group(Base):
    """A (prompt, pose) pair within a round; its K samples are the candidates raters compare."""

    __tablename__ = "sample_groups"
    __table_args__ = (UniqueConstraint("round_id", "index", name="uq_group_round_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    pose_name: Mapped[str] = mapped_column(Text)
    # Pose.to_dict() list as JSON (ground truth for pose rewards / OKS); None when only an image is known.
    keypoints_json: Mapped[str | None] = mapped_column(Text, default=None)
    condition_path: Mapped[str] = mapped_column(Text)
    source_image_path: Mapped[str | None] = mapped_column(Text, default=None)

    round: Mapped[Round] = relationship(back_populates="groups")
    samples: Mapped[list[Sample]] = relationship(
        back_populates="group", cascade="all, delete-orphan", order_by="Sample.index"
    )

    @property
    def keypoints(self) -> list[dict[str, Any]] | None:
        """Ground-truth poses as Pose.to_dict() dicts, or None."""
        return None if self.keypoints_json is None else json.loads(self.keypoints_json)


class Sample(Base):
    """One generated image with its stored denoising trajectory."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("group_id", "index", name="uq_sample_group_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("sample_groups.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    # None for imported images that come without a trajectory.
    trajectory_path: Mapped[str | None] = mapped_column(Text, default=None)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    num_steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    controlnet_scale: Mapped[float] = mapped_column(Float)
    eta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    round: Mapped[Round] = relationship(back_populates="samples", viewonly=True)
    group: Mapped[Group] = relationship(back_populates="samples")


class Rater(Base):
    """A person who labels samples."""

    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Rating(Base):
    """A rater's current score of a sample (one per rater and sample; changeable)."""

    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("rater_id", "sample_id", name="uq_rating_rater_sample"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    score: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    rater: Mapped[Rater] = relationship()
    sample: Mapped[Sample] = relationship()


class Preference(Base):
    """A rater's judgement of two samples of the same group.

    The pair is stored in canonical order (sample_a_id < sample_b_id) so that a pair has one row per
    rater whichever side it was shown on; `left_sample_id` keeps the side for position-bias analysis.
    """

    __tablename__ = "preferences"
    __table_args__ = (
        UniqueConstraint("rater_id", "sample_a_id", "sample_b_id", name="uq_pref_rater_pair"),
        CheckConstraint("sample_a_id < sample_b_id", name="ck_pref_canonical_order"),
        CheckConstraint("choice IN ('a', 'b', 'tie', 'skip')", name="ck_pref_choice"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    sample_a_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    sample_b_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    # 'a' or 'b' names the preferred sample; 'skip' records that the pair was seen but not judged.
    choice: Mapped[str] = mapped_column(String(4))
    left_sample_id: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    rater: Mapped[Rater] = relationship()
    sample_a: Mapped[Sample] = relationship(foreign_keys=[sample_a_id])
    sample_b: Mapped[Sample] = relationship(foreign_keys=[sample_b_id])

    @property
    def winner_id(self) -> int | None:
        """Id of the preferred sample, None for a tie or a skip."""
        return {"a": self.sample_a_id, "b": self.sample_b_id}.get(self.choice)

    @property
    def loser_id(self) -> int | None:
        """Id of the dispreferred sample, None for a tie or a skip."""
        return {"a": self.sample_b_id, "b": self.sample_a_id}.get(self.choice)


def default_db_url(samples_dir: str | Path) -> str:
    """SQLite URL of the default database file inside the samples directory."""
    return f"sqlite:///{Path(samples_dir).resolve() / 'feedback.sqlite'}"


POSTGRES_EXAMPLE = "postgresql+psycopg://user:password@host:5432/dbname"


class DatabaseUrlError(ConfigError):
    """A database URL that cannot be used (bad URL, driver missing, server unreachable); one line naming the field."""


def normalize_db_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3, the PostgreSQL driver this project installs.

    SQLAlchemy would pick psycopg2 for a bare `postgresql://` (and refuses `postgres://`), which is not installed.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def shown_db_url(url: str) -> str:
    """The URL for messages and logs, password hidden."""
    try:
        parsed = make_url(normalize_db_url(url))
    except ArgumentError:
        return url.split("@")[-1] if "@" in url else url
    # Rendering escapes characters such as ':' in file paths, so only a URL with a password is re-rendered.
    return normalize_db_url(url) if parsed.password is None else parsed.render_as_string(hide_password=True)


def make_engine(url: str, echo: bool = False) -> Engine:
    """Create an engine; SQLite gets WAL mode, foreign keys and a busy timeout for concurrent raters."""
    url = normalize_db_url(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        # pre_ping: the rating app keeps running across a server restart; connect_timeout: an unreachable
        # host fails in seconds, not after the operating system's TCP timeout of minutes.
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    engine = create_engine(url, echo=echo, **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets the rating app read while generate.py writes; NORMAL is durable in WAL mode.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    return engine


def init_db(engine: Engine) -> None:
    """Create every missing table."""
    Base.metadata.create_all(engine)


def _one_line(exc: BaseException) -> str:
    """The driver's message on one line (psycopg's span several)."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def connect(url: str, field: str = "db_url") -> Engine:
    """An engine with every table created; DatabaseUrlError naming `field` when the database cannot be used."""
    shown = shown_db_url(url)
    try:
        engine = make_engine(url)
    except (ArgumentError, NoSuchModuleError) as e:
        raise DatabaseUrlError(f"{field}: {shown!r} is not a usable SQLAlchemy URL ({_one_line(e)}); use "
                               f"sqlite:///path/to/feedback.sqlite or {POSTGRES_EXAMPLE}") from None
    except ImportError as e:
        raise DatabaseUrlError(f"{field}: the database driver for {shown} is not installed ({e}); for PostgreSQL "
                               f"run pip install 'psycopg[binary]' and use {POSTGRES_EXAMPLE}") from None
    except OSError as e:  # the SQLite file's folder cannot be created
        raise DatabaseUrlError(f"{field}: cannot create the folder of {shown}: {e}; pass a writable path") from None
    try:
        init_db(engine)
    except DBAPIError as e:
        engine.dispose()
        if engine.dialect.name == "postgresql":
            fix = ("start the PostgreSQL server, create the database (createdb NAME) and check user, password, host "
                   f"and port in the URL ({POSTGRES_EXAMPLE})")
        else:
            fix = "check that the file's folder exists and is writable, or pass another URL"
        raise DatabaseUrlError(f"{field}: cannot open the database {shown}: {_one_line(e)}; {fix}") from None
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def open_db(url: str, field: str = "db_url") -> sessionmaker[Session]:
    """Engine + tables + session factory in one call, for scripts; errors name the config `field`."""
    return make_session_factory(connect(url, field))


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_or_create_rater(session: Session, name: str) -> Rater:
    """The rater with this name, created if new."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("rater name must be 1..100 characters")
    rater = session.scalar(select(Rater).where(Rater.name == name))
    if rater is None:
        rater = Rater(name=name)
        session.add(rater)
        session.flush()
    return rater


# ---- rating app tables ----
from sqlalchemy import Index  # noqa: E402  (kept next to the tables that need it)


class LabelEvent(Base):
    """Append-only log of label changes: powers undo, idempotent retries and the history export.

    Each row records one change of a rater's score (kind "score") or preference (kind "preference")
    with the value before and after, so undo can restore exactly what was there. `request_id` is the
    client-generated id of the submission; it is unique per rater so a retried or double-clicked
    request is recognised instead of stored twice.
    """

    __tablename__ = "label_events"
    __table_args__ = (
        UniqueConstraint("rater_id", "request_id", name="uq_event_rater_request"),
        UniqueConstraint("rater_id", "undo_request_id", name="uq_event_rater_undo_request"),
        CheckConstraint("kind IN ('score', 'preference')", name="ck_event_kind"),
        Index("ix_event_rater_round", "rater_id", "round_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    # Score events use sample_id; preference events use the canonical pair (a < b).
    sample_id: Mapped[int | None] = mapped_column(Integer, default=None)
    sample_a_id: Mapped[int | None] = mapped_column(Integer, default=None)
    sample_b_id: Mapped[int | None] = mapped_column(Integer, default=None)
    old_score: Mapped[float | None] = mapped_column(Float, default=None)
    new_score: Mapped[float | None] = mapped_column(Float, default=None)
    old_choice: Mapped[str | None] = mapped_column(String(4), default=None)
    new_choice: Mapped[str | None] = mapped_column(String(4), default=None)
    old_left_id: Mapped[int | None] = mapped_column(Integer, default=None)
    new_left_id: Mapped[int | None] = mapped_column(Integer, default=None)
    # "web" (the page or the JSON API) or "import" (scores.json import).
    source: Mapped[str] = mapped_column(String(20), default="web")
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    undo_request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    rater: Mapped[Rater] = relationship()


# ---- evaluation tables ----


class Comparison(Base):
    """A blind comparison of a candidate policy with a baseline on the same prompts, poses and seeds.

    Both rounds come from one evaluation plan, so group index i and sample index k of the baseline
    round pair with the same group and sample index of the candidate round (same seed, same pose).
    """

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)  # free-form, see Round.name
    baseline_round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    candidate_round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    baseline_round: Mapped[Round] = relationship(foreign_keys=[baseline_round_id])
    candidate_round: Mapped[Round] = relationship(foreign_keys=[candidate_round_id])


class BlindJudgement(Base):
    """A rater's blind verdict on one baseline/candidate pair of a comparison.

    The page shows the two images in an order the rater cannot relate to their origin;
    `left_is_candidate` records that order, `outcome` what it meant.
    """

    __tablename__ = "blind_judgements"
    __table_args__ = (
        UniqueConstraint("comparison_id", "rater_id", "baseline_sample_id", name="uq_blind_rater_pair"),
        UniqueConstraint("rater_id", "request_id", name="uq_blind_rater_request"),
        CheckConstraint("outcome IN ('candidate', 'baseline', 'tie', 'skip')", name="ck_blind_outcome"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    baseline_sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    candidate_sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    left_is_candidate: Mapped[bool] = mapped_column(Boolean)
    outcome: Mapped[str] = mapped_column(String(10))
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    comparison: Mapped[Comparison] = relationship()
    rater: Mapped[Rater] = relationship()


# ---- loop jobs (poseloop.data.jobs queues them, poseloop.worker runs them) ----


class Job(Base):
    """One loop job: train the reward model, train the policy, generate the next loop round (poseloop.data.jobs)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="ck_job_state"),
        Index("ix_job_state", "state", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(10), default="queued")
    # "button" (a rater asked), "auto" (a round reached the label threshold) or "api".
    trigger: Mapped[str] = mapped_column(String(20), default="api")
    requested_by: Mapped[str | None] = mapped_column(Text, default=None)
    # The newest loop round when the job was queued, and the loop round it makes (named then, so a retry resumes it).
    source_round: Mapped[str | None] = mapped_column(Text, default=None)
    target_round: Mapped[str] = mapped_column(Text)
    # {"preset": ..., "reward": [args], "policy": [args], "generate": [args]}: what every attempt runs.
    plan_json: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(20), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    # The finished steps' outputs (reward / policy version, round), so a retry skips them; learned-reward means.
    result_json: Mapped[str] = mapped_column(Text, default="{}")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # "host:pid" of the worker holding the job, and a token that only that claim knows (heartbeats must match it).
    worker: Mapped[str | None] = mapped_column(Text, default=None)
    claim: Mapped[str | None] = mapped_column(String(32), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
