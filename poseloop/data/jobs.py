"""The loop's job queue: rows of the `jobs` table, shared by the rating app and any number of workers.

States: queued -> running -> done | failed | cancelled; a running job whose worker stopped sending
heartbeats goes back to queued (up to max_attempts) or to failed with the reason. Every change is one
conditional UPDATE (`... WHERE id = ? AND state = ? [AND claim = ?]`), so two workers never hold one job
and a worker that lost its job (reclaimed, cancelled) finds out at its next heartbeat; this works the same
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from poseloop.data.db import Job, Round, loop_round_name, next_loop_round, session_scope, utcnow
from poseloop.config.loop import DEFAULT_STALE_S, LoopPlan

STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
DEFAULT_ATTEMPTS = 3


class JobConflict(Exception):
    """A job cannot be queued or changed now (another one is active, or it already finished)."""

    def __init__(self, message: str, job_id: int | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


def aware(t: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite gives naive datetimes back)."""
    if t is None:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def worker_name() -> str:
    """This process as 'host:pid', what a job row's `worker` names."""
    return f"{socket.gethostname()}:{os.getpid()}"


def job_json(job: Job) -> dict[str, Any]:
    """A job as the API shows it."""
    def iso(t: datetime | None) -> str | None:
        t = aware(t)
        return None if t is None else t.isoformat()

    return {
        "id": job.id, "state": job.state, "trigger": job.trigger, "requested_by": job.requested_by,
        "source_round": job.source_round, "target_round": job.target_round,
        "stage": job.stage, "progress": round(float(job.progress or 0.0), 4), "message": job.message,
        "error": job.error, "attempts": job.attempts, "max_attempts": job.max_attempts, "worker": job.worker,
        "cancel_requested": bool(job.cancel_requested), "plan": json.loads(job.plan_json),
        "result": json.loads(job.result_json or "{}"),
        "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "heartbeat_at": iso(job.heartbeat_at), "finished_at": iso(job.finished_at),
    }


def active_job(session: Session) -> Job | None:
    """The queued or running job, if any (the oldest)."""
    return session.scalar(select(Job).where(Job.state.in_(ACTIVE)).order_by(Job.id).limit(1))


def latest_job(session: Session) -> Job | None:
    """The newest job of any state."""
    return session.scalar(select(Job).order_by(Job.id.desc()).limit(1))


def loop_rounds(session: Session) -> list[Round]:
    """The loop's rounds (round-NNNN), oldest first."""
    from poseloop.data.db import loop_round_number

    rows = [r for r in session.scalars(select(Round)) if loop_round_number(r.name) is not None]
    return sorted(rows, key=lambda r: loop_round_number(r.name) or 0)


def enqueue(session: Session, plan: LoopPlan, trigger: str = "api", requested_by: str | None = None,
            max_attempts: int = DEFAULT_ATTEMPTS) -> Job:
    """Queue a loop job after the newest finished loop round; JobConflict while another job is active.

    The caller's transaction must serialise writers (the rating app's write transactions do; a script
    calling this concurrently with the app may queue two jobs, which then simply run one after another).
    """
    current = active_job(session)
    if current is not None:
        raise JobConflict(f"job {current.id} is {current.state} ({current.stage or 'waiting for a worker'}); "
                          "one loop job runs at a time", current.id)
    rounds = loop_rounds(session)
    finished = [r for r in rounds if r.status == "complete"]
    if not finished:
        raise JobConflict("no finished loop round (round-NNNN) to train on yet; run generate.py first")
    target = loop_round_name(next_loop_round(session.scalars(select(Round.name))))
    job = Job(trigger=trigger, requested_by=requested_by, source_round=finished[-1].name, target_round=target,
              plan_json=json.dumps(plan.to_dict()), max_attempts=max_attempts,
              message=f"queued: train on the labels so far, then make {target}")
    session.add(job)
    session.flush()
    return job


def claim(factory: sessionmaker[Session], worker: str | None = None) -> Job | None:
    """Take the oldest queued job for this worker (state running, attempt counted); None when there is none."""
    worker = worker or worker_name()
    while True:
        with session_scope(factory) as s:
            job_id = s.scalar(select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(1))
            if job_id is None:
                return None
            token = secrets.token_hex(16)
            now = utcnow()
            taken = s.execute(
                update(Job).where(Job.id == job_id, Job.state == "queued")
                .values(state="running", worker=worker, claim=token, attempts=Job.attempts + 1, started_at=now,
                        heartbeat_at=now, message="started")
            ).rowcount
        if taken == 1:
            with session_scope(factory) as s:
                return s.get(Job, job_id)
        # Another worker took it between the select and the update: look for the next one.


def heartbeat(factory: sessionmaker[Session], job: Job, stage: str | None = None, progress: float | None = None,
              message: str | None = None) -> bool:
    """Record that the job's worker is alive (and its stage / progress / message); False when the claim was lost
    (the job was reclaimed as stale, cancelled or finished elsewhere) or a cancel was requested."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    if message is not None:
        values["message"] = message[:2000]
    with session_scope(factory) as s:
        n = s.execute(update(Job).where(Job.id == job.id, Job.claim == job.claim, Job.state == "running")
                      .values(**values)).rowcount
        cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job.id))
    return n == 1 and not cancel


def save_result(factory: sessionmaker[Session], job: Job, result: dict[str, Any]) -> bool:
    """Store the finished steps' outputs (merged into the job's result); False when the claim was lost."""
    with session_scope(factory) as s:
        row = s.get(Job, job.id)
        if row is None or row.claim != job.claim or row.state != "running":
            return False
        merged = {**json.loads(row.result_json or "{}"), **result}
        row.result_json = json.dumps(merged)
    job.result_json = json.dumps(merged)
    return True


def finish(factory: sessionmaker[Session], job: Job, state: str, message: str = "", error: str | None = None) -> bool:
    """End a claimed job as done, failed or cancelled; False when the claim was lost meanwhile."""
    if state not in ("done", "failed", "cancelled"):
        raise ValueError(f"finish: {state!r} is not done, failed or cancelled")
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "message": message[:2000], "error": error}
    if state == "done":
        values["progress"] = 1.0
    with session_scope(factory) as s:
        return s.execute(update(Job).where(Job.id == job.id, Job.claim == job.claim, Job.state == "running")
                         .values(**values)).rowcount == 1


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel a queued job at once, ask a running one's worker to stop; JobConflict for a finished job."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} does not exist")
    if job.state == "queued":
        job.state, job.finished_at, job.message = "cancelled", utcnow(), "cancelled before a worker took it"
    elif job.state == "running":
        job.cancel_requested = True
        job.message = "cancel requested; the worker stops at its next heartbeat"
    else:
        raise JobConflict(f"job {job_id} is already {job.state}", job_id)
    session.flush()
    return job


def _pid_gone(worker: str | None) -> bool:
    """True when `worker` ('host:pid') is a process of this host that no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def requeue_stale(factory: sessionmaker[Session], stale_after_s: float = DEFAULT_STALE_S,
                  now: datetime | None = None) -> list[tuple[int, str]]:
    """Running jobs whose worker died (no heartbeat for stale_after_s, or its pid on this host is gone): queued
    again while attempts remain, else failed with the reason. Returns (job id, new state) of each one changed."""
    now = now or utcnow()
    changed = []
    with session_scope(factory) as s:
        running = [(j.id, j.claim, j.worker, aware(j.heartbeat_at), j.attempts, j.max_attempts, j.stage,
                    j.cancel_requested) for j in s.scalars(select(Job).where(Job.state == "running"))]
    for job_id, token, worker, beat, attempts, max_attempts, stage, cancel in running:
        age = (now - beat).total_seconds() if beat else float("inf")
        gone = _pid_gone(worker)
        if age < stale_after_s and not gone:
            continue
        why = (f"worker {worker} exited" if gone else f"worker {worker} sent no heartbeat for {age:.0f} s") + \
              f" during stage {stage or 'start'} (attempt {attempts} of {max_attempts})"
        if cancel:
            values: dict[str, Any] = {"state": "cancelled", "finished_at": now, "message": f"cancelled; {why}"}
        elif attempts < max_attempts:
            values = {"state": "queued", "claim": None, "message": f"{why}; queued again, finished steps are kept"}
        else:
            values = {"state": "failed", "finished_at": now, "error": f"{why}; gave up after {attempts} attempts",
                      "message": "failed"}
        with session_scope(factory) as s:
            n = s.execute(update(Job).where(Job.id == job_id, Job.claim == token, Job.state == "running")
                          .values(**values)).rowcount
        if n == 1:
            changed.append((job_id, values["state"]))
    return changed



def release(factory: sessionmaker[Session], job: Job, message: str) -> bool:
    """Put a claimed job back in the queue (its worker is stopping); False when the claim was lost meanwhile."""
    with session_scope(factory) as s:
        return s.execute(update(Job).where(Job.id == job.id, Job.claim == job.claim, Job.state == "running")
                         .values(state="queued", claim=None, message=message[:2000])).rowcount == 1
