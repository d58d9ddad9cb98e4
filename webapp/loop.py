"""Loop mode (`--loop`): queue a job that trains the next round, show its progress, run a local worker.

Routes (JSON; writes follow the app's token and same-origin rules like every other write):
    GET  /api/loop                    loop settings, the newest job, the labels on the newest loop round
    POST /api/loop/jobs               queue a job {rater?}; 202, or 409 while one is queued or running
    GET  /api/loop/jobs               the newest jobs (limit=1..100)
    GET  /api/loop/jobs/<id>          one job
    POST /api/loop/jobs/<id>/cancel   cancel a queued job, stop a running one; 409 when it already ended
A label write that brings the newest loop round to --loop_min_labels queues a job by itself (once per round).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from poseloop.data import jobs
from poseloop.data.db import Job, Preference, Rating, Round, Sample

from .config import AppConfig
from .store import ApiError, Store, clean_rater_name

bp = Blueprint("loop", __name__, url_prefix="/api/loop")
LABEL_WRITES = ("/api/scores", "/api/preferences", "/api/import/scores")
WORKER_LOG = ".loop-worker.log"
REQUEUE_EVERY_S = 3.0


def _cfg() -> AppConfig:
    return current_app.config["POSELOOP"]


def _store() -> Store:
    return current_app.extensions["poseloop_store"]


def _require_loop() -> None:
    if not _cfg().loop:
        raise ApiError(404, "loop mode is off; start the app with --loop to train rounds from the page")


class LocalWorker:
    """The app's own `python -m poseloop.worker`, started with the app and again whenever it has died."""

    def __init__(self, cfg: AppConfig, log: Any) -> None:
        self.cfg, self.log = cfg, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_start = 0.0
        self.error: str | None = None
        self.lock = threading.Lock()

    def command(self) -> list[str]:
        """The worker's command line: this app's database, samples and models folders."""
        c = self.cfg
        return [sys.executable, "-m", "poseloop.worker", "--samples_dir", str(Path(c.samples_dir).resolve()),
                "--db_url", c.resolved_db_url, "--models_dir", str(Path(c.models_dir).resolve()),
                "--threads", str(c.loop_worker_threads), "--stale_after", str(c.loop_stale_after), "--exit_with_parent"]

    def ensure(self) -> int | None:
        """Start the worker if it is not running (at most every 5 s); its pid."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return self.proc.pid
            if self.proc is not None and self.proc.returncode == 2:
                # A bad flag or an unusable database: starting it again would fail the same way.
                if self.error is None:
                    log = Path(self.cfg.samples_dir) / WORKER_LOG
                    self.error = f"the loop worker stopped at start (exit 2); see {log}"
                    self.log.error("%s", self.error)
                return None
            if self.proc is not None:
                self.log.warning("loop worker pid %s exited with %s; starting another", self.proc.pid,
                                 self.proc.returncode)
            if time.monotonic() - self.last_start < 5.0 and self.proc is not None:
                return None
            env = dict(os.environ)
            root = str(Path(__file__).resolve().parent.parent)  # poseloop importable also from a checkout
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
            logfile = open(Path(self.cfg.samples_dir) / WORKER_LOG, "ab")  # noqa: SIM115 (the child keeps it)
            try:
                self.proc = subprocess.Popen(self.command(), stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL)
            finally:
                logfile.close()
            self.starts += 1
            self.last_start = time.monotonic()
            return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (its job goes back to the queue), then SIGKILL if it does not exit."""
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        """The running worker's pid, None when it is not running."""
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None


def install(app: Flask, cfg: AppConfig) -> None:
    """Register the loop routes; in loop mode with a local worker, start it (stopped when the app exits)."""
    app.register_blueprint(bp)
    if cfg.loop and cfg.loop_worker == "local":
        worker = LocalWorker(cfg, app.logger)
        app.extensions["poseloop_loop_worker"] = worker
        worker.ensure()
        atexit.register(worker.stop)


def _worker() -> LocalWorker | None:
    return current_app.extensions.get("poseloop_loop_worker")


# ---------------------------------------------------------------- reads


def round_labels(session: Session, round_id: int) -> int:
    """Labels on a round: every rater's scores plus decided (non-skip) pairs."""
    scores = session.scalar(select(func.count()).select_from(Rating).join(Sample, Rating.sample_id == Sample.id)
                            .where(Sample.round_id == round_id)) or 0
    pairs = session.scalar(select(func.count()).select_from(Preference)
                           .join(Sample, Preference.sample_a_id == Sample.id)
                           .where(Sample.round_id == round_id, Preference.choice != "skip")) or 0
    return int(scores) + int(pairs)


def newest_loop_round(session: Session) -> Round | None:
    """The newest finished loop round (what a job now would train after)."""
    finished = [r for r in jobs.loop_rounds(session) if r.status == "complete"]
    return finished[-1] if finished else None


def loop_state(session: Session, cfg: AppConfig) -> dict[str, Any]:
    """What the page shows: settings, the newest job and how many labels the newest loop round has."""
    rnd = newest_loop_round(session)
    job = jobs.latest_job(session)
    # The page polls this in every mode, blind mode too: the job's outputs (policy versions, the A/B rounds) stay
    # out of it, except the round it made; /api/loop/jobs/<id> has them all.
    brief = None
    if job is not None:
        brief = jobs.job_json(job)
        brief.pop("plan")
        brief["result"] = {k: v for k, v in brief["result"].items() if k == "round"}
    return {
        "enabled": cfg.loop,
        "min_labels": cfg.loop_min_labels,
        "preset": cfg.loop_preset,
        "worker_mode": cfg.loop_worker,
        "round": None if rnd is None else {"id": rnd.id, "name": rnd.name, "labels": round_labels(session, rnd.id)},
        "job": brief,
    }


def _refresh_workers() -> int | None:
    """Restart a dead local worker and hand a dead worker's job back to the queue; the local worker's pid."""
    worker = _worker()
    pid = worker.ensure() if worker is not None else None
    # Every page polls this route; the scan for dead workers' jobs runs at most once per REQUEUE_EVERY_S.
    now = time.monotonic()
    last = current_app.extensions.get("poseloop_loop_requeued", -REQUEUE_EVERY_S)
    if now - last >= REQUEUE_EVERY_S:
        current_app.extensions["poseloop_loop_requeued"] = now
        jobs.requeue_stale(_store().write_factory, _cfg().loop_stale_after)
    return pid


@bp.get("")
def get_loop() -> Response:
    """Loop settings, the newest job (stage, progress, message) and the newest loop round's label count."""
    cfg = _cfg()
    if not cfg.loop:
        return jsonify(enabled=False)
    pid = _refresh_workers()
    state = _store().read(lambda s: loop_state(s, cfg))
    state["worker_pid"] = pid
    worker = _worker()
    state["worker_error"] = worker.error if worker is not None else None
    return jsonify(state)


@bp.get("/jobs")
def list_jobs() -> Response:
    """The newest jobs first (limit=1..100, default 20)."""
    raw = request.args.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, f"query parameter 'limit' must be an integer in 1..100, got {raw[:40]!r}")
    rows = _store().read(lambda s: [jobs.job_json(j) for j in
                                    s.scalars(select(Job).order_by(Job.id.desc()).limit(int(raw)))])
    return jsonify(jobs=rows)


@bp.get("/jobs/<int:job_id>")
def get_job(job_id: int) -> Response:
    """One job."""
    def fn(s: Session) -> dict[str, Any]:
        job = s.get(Job, job_id)
        if job is None:
            raise ApiError(404, f"job {job_id} does not exist")
        return jobs.job_json(job)

    return jsonify(_store().read(fn))


# ---------------------------------------------------------------- writes


def _json_object() -> dict[str, Any]:
    from .api import json_body

    return json_body() if request.get_data(cache=True).strip() else {}


@bp.post("/jobs")
def post_job() -> tuple[Response, int]:
    """Queue the next round's job: {rater?}. 409 while a job is queued or running, or before any loop round."""
    _require_loop()
    body = _json_object()
    rater = None if body.get("rater") in (None, "") else clean_rater_name(body.get("rater"))
    cfg = _cfg()
    plan = cfg.loop_plan

    def fn(s: Session) -> dict[str, Any]:
        try:
            return jobs.job_json(jobs.enqueue(s, plan, "button", rater))
        except jobs.JobConflict as e:
            raise ApiError(409, str(e), job_id=e.job_id) from None

    _refresh_workers()
    return jsonify(_store().write(fn)), 202


@bp.post("/jobs/<int:job_id>/cancel")
def cancel_job(job_id: int) -> Response:
    """Cancel a queued job, or ask a running job's worker to stop; 409 when it has already ended."""
    _require_loop()
    _json_object()

    def fn(s: Session) -> dict[str, Any]:
        try:
            return jobs.job_json(jobs.request_cancel(s, job_id))
        except LookupError as e:
            raise ApiError(404, str(e)) from None
        except jobs.JobConflict as e:
            raise ApiError(409, str(e), job_id=job_id) from None

    return jsonify(_store().write(fn))


def auto_enqueue(session: Session, cfg: AppConfig) -> Job | None:
    """Queue a job when the newest loop round has reached --loop_min_labels and no job followed it yet."""
    rnd = newest_loop_round(session)
    if rnd is None or round_labels(session, rnd.id) < cfg.loop_min_labels:
        return None
    if session.scalar(select(Job.id).where(Job.source_round == rnd.name).limit(1)) is not None:
        return None
    if jobs.active_job(session) is not None:
        return None
    return jobs.enqueue(session, cfg.loop_plan, "auto")


@bp.after_app_request
def _after_label(resp: Response) -> Response:
    """After a stored label, queue the automatic job if the threshold is reached (never fails the label write)."""
    cfg: AppConfig = current_app.config["POSELOOP"]
    if (cfg.loop and cfg.loop_min_labels > 0 and request.method == "POST" and request.path in LABEL_WRITES
            and resp.status_code == 201):
        try:
            job = _store().write(lambda s: auto_enqueue(s, cfg))
            if job is not None:
                current_app.logger.info("loop: %s reached %d labels; queued job %d", job.source_round,
                                        cfg.loop_min_labels, job.id)
        except Exception:  # the label is stored; the next label (or the button) tries again
            current_app.logger.exception("loop: could not queue the automatic job")
    return resp
