"""`python -m poseloop.worker`: run the loop's jobs from the shared database, one at a time.

    python -m poseloop.worker                                    # samples/ and its SQLite database, models/
    python -m poseloop.worker --db_url postgresql+psycopg://... --samples_dir /mnt/shared/samples   # a GPU box

A job trains the reward model on every label so far, trains the policy on it (continuing the last policy),
generates the next loop round with that policy, then scores every loop round with the new reward model. The
rating app (`python -m webapp --loop`) queues jobs and starts a worker of its own unless told that one runs
elsewhere (--loop_worker external). Models are imported once per worker, not once per step.

While a job runs a heartbeat thread writes the stage and a progress fraction read from the steps' own tqdm
bars. A killed worker's job is taken again by the next worker (at once on the same host, after --stale_after
seconds elsewhere): the steps it finished are kept, the one it was in is re-run (a policy run resumes from
its checkpoint, a round fills its missing images), and after --attempts tries the job fails with the reason.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any

from poseloop.data import jobs
from poseloop.config.lib import ConfigError
from poseloop.config.lib import parse_config
from poseloop.config.loop import WORKER_PRESETS, WorkerConfig
from poseloop.data.db import DatabaseUrlError, Job, default_db_url, open_db, shown_db_url
from poseloop.config.loop import LoopPlan

# Share of the whole job each stage takes (the embedded world's defaults: 49 s reward, 132 s policy, 35 s round).
STAGES = (("reward", 0.18), ("policy", 0.55), ("generate", 0.15), ("compare", 0.1), ("score", 0.02))


def stage_span(stage: str) -> tuple[float, float]:
    """(start, width) of a stage within the job's 0..1 progress."""
    start = 0.0
    for name, width in STAGES:
        if name == stage:
            return start, width
        start += width
    raise KeyError(stage)


def bars_fraction() -> tuple[float | None, str]:
    """How far the open tqdm bars are (outer bar, refined by the bars nested in it) and the outer bar's label."""
    from tqdm import tqdm

    with tqdm.get_lock():
        bars = [b for b in list(tqdm._instances) if not getattr(b, "disable", False)]
    bars.sort(key=lambda b: abs(getattr(b, "pos", 0) or 0))
    fraction, unit, label = 0.0, 1.0, ""
    for bar in bars:
        total = getattr(bar, "total", None)
        if not total:
            continue
        fraction += unit * min(1.0, max(0.0, bar.n / total))
        unit /= total  # a nested bar refines one step of the bar around it
        label = label or f"{bar.desc} {bar.n}/{total}".strip()
    return (fraction if label else None), label


class Heartbeat(threading.Thread):
    """Writes the job's stage, progress and heartbeat every `interval` s; interrupts the main thread when the job
    was cancelled or taken away."""

    def __init__(self, factory: Any, job: Job, interval: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-job{job.id}")
        self.factory, self.job, self.interval = factory, job, interval
        self.stage, self.stage_fraction, self.message = "start", 0.0, "started"
        self.stopped = threading.Event()
        self.lost = False

    def set_stage(self, stage: str, message: str) -> None:
        """Enter a stage (its progress starts at 0) and write it at once."""
        self.stage, self.stage_fraction, self.message = stage, 0.0, message
        self.beat()

    def beat(self) -> None:
        """One heartbeat with the bars' current progress (never backwards within a stage)."""
        fraction, label = bars_fraction()
        if fraction is not None:
            self.stage_fraction = max(self.stage_fraction, fraction)
        start, width = stage_span(self.stage) if self.stage != "start" else (0.0, 0.0)
        message = f"{self.message}: {label}" if label else self.message
        try:
            alive = jobs.heartbeat(self.factory, self.job, self.stage, start + width * self.stage_fraction, message)
        except Exception as e:  # a database hiccup: the next beat tries again; the stale timeout is minutes
            print(f"worker: heartbeat of job {self.job.id} failed ({e}); retrying", file=sys.stderr, flush=True)
            return
        if not alive and not self.lost:
            self.lost = True
            _thread.interrupt_main()  # the step unwinds like Ctrl-C: atomic writes drop their temporaries

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        """End the thread (after its current beat)."""
        self.stopped.set()
        self.join(timeout=30)


class Stop(BaseException):
    """SIGTERM: leave the job for the next worker, as Ctrl-C does."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def run_job(factory: Any, job: Job, place: Any, interval: float) -> str:
    """Run a claimed job to its end; returns the state it ended in ('released' when this worker is stopping)."""
    from poseloop.loop import steps as loop_steps

    plan = LoopPlan.from_dict(json.loads(job.plan_json))
    done: dict[str, Any] = json.loads(job.result_json or "{}")
    beat = Heartbeat(factory, job, interval)
    beat.start()
    started = time.perf_counter()
    try:
        try:
            if "reward_version" not in done:
                beat.set_stage("reward", "training the reward model on every label so far")
                done.update(loop_steps.run_reward(job, plan, place))
                jobs.save_result(factory, job, done)
            if "policy_version" not in done:
                beat.set_stage("policy", f"training the policy on reward model {done['reward_version']}")
                done.update(loop_steps.run_policy(job, plan, place, done["reward_version"]))
                jobs.save_result(factory, job, done)
            if "round" not in done:
                beat.set_stage("generate", f"generating {job.target_round} with policy {done['policy_version']}")
                done.update(loop_steps.run_generate(job, plan, place, done["policy_version"]))
                jobs.save_result(factory, job, done)
            if plan.blind_ab and "ab" not in done:
                beat.set_stage("compare", "making the blind A/B rounds of the new policy and the one before")
                try:
                    done.update(loop_steps.run_compare(job, plan, place, done["reward_version"],
                                                       done["policy_version"]))
                except Exception as e:  # the round is made and announced; a failed A/B is reported, not fatal
                    done["ab_error"] = f"{type(e).__name__}: {e}"
                    print(f"worker: job {job.id}: the blind A/B failed ({done['ab_error']})", file=sys.stderr,
                          flush=True)
                jobs.save_result(factory, job, done)
            beat.set_stage("score", f"scoring the loop rounds with reward model {done['reward_version']}")
            try:
                done.update(loop_steps.reward_means(place, done["reward_version"]))
            except Exception as e:  # the round is made; a reward model that cannot score stored latents says why
                done["reward_means_error"] = f"{type(e).__name__}: {e}"
            done["seconds"] = round(time.perf_counter() - started, 1)
            jobs.save_result(factory, job, done)
        except (KeyboardInterrupt, Stop):
            if beat.lost:
                with jobs.session_scope(factory) as s:
                    row = s.get(Job, job.id)
                    cancel = row is not None and row.cancel_requested and row.claim == job.claim
                if cancel:
                    jobs.finish(factory, job, "cancelled", f"cancelled during stage {beat.stage}")
                    return "cancelled"
                return "lost"
            jobs.release(factory, job, f"worker {job.worker} stopped during stage {beat.stage}; queued again")
            raise
    except (KeyboardInterrupt, Stop):
        raise
    except Exception as e:
        reason = f"stage {beat.stage}: {type(e).__name__}: {e}"
        print(f"worker: job {job.id} failed, {reason}", file=sys.stderr, flush=True)
        traceback.print_exc()
        jobs.finish(factory, job, "failed", "failed", reason)
        return "failed"
    finally:
        beat.stop()
    jobs.finish(factory, job, "done", f"{done['round']} is ready ({done['seconds']:.0f} s)")
    return "done"


def preload() -> None:
    """Import what every job needs once, before any job: each step then starts without the seconds of importing
    torch, diffusers and transformers that three separate scripts pay each time."""
    import poseloop.evaluation.compare  # noqa: F401
    import poseloop.sampling.round  # noqa: F401
    import poseloop.loop.steps  # noqa: F401
    import poseloop.rewards.training  # noqa: F401
    import poseloop.policy.trainer  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Run jobs until stopped; 2 on a bad flag or database, 130 after Ctrl-C, 143 after SIGTERM."""
    args, _ = parse_config(WorkerConfig, WORKER_PRESETS, "default", argv, description=__doc__.split("\n\n")[0],
                           prog="python -m poseloop.worker")
    url = args.db_url or default_db_url(args.samples_dir)
    try:
        factory = open_db(url, "db_url")
    except (DatabaseUrlError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from poseloop.loop.steps import Place

    place = Place(args.samples_dir.resolve(), url, args.models_dir.resolve())
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.preload:
        t0 = time.perf_counter()
        preload()
        print(f"worker: torch, diffusers and the steps' code imported in {time.perf_counter() - t0:.1f} s", flush=True)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
    me, parent = jobs.worker_name(), os.getppid()
    print(f"poseloop worker {me}: database {shown_db_url(url)}, samples {place.samples_dir}, models "
          f"{place.models_dir}", flush=True)
    try:
        while True:
            for job_id, state in jobs.requeue_stale(factory, args.stale_after):
                print(f"worker: job {job_id} of a stopped worker is {state}", flush=True)
            if args.exit_with_parent and os.getppid() != parent:
                print("worker: the process that started this worker is gone; exiting", flush=True)
                return 0
            job = jobs.claim(factory, me)
            if job is None:
                if args.exit_when_idle:
                    return 0
                time.sleep(args.poll)
                continue
            print(f"worker: job {job.id} (attempt {job.attempts} of {job.max_attempts}): {job.source_round} -> "
                  f"{job.target_round}", flush=True)
            state = run_job(factory, job, place, args.heartbeat)
            print(f"worker: job {job.id} {state}", flush=True)
            if args.once:
                return 0 if state == "done" else 1
    except KeyboardInterrupt:
        print("worker: stopped by Ctrl-C; a running job was queued again", file=sys.stderr)
        return 130
    except Stop:
        print("worker: stopped by SIGTERM; a running job was queued again", file=sys.stderr)
        return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
