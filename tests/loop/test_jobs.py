"""The loop's job queue (poseloop.data.jobs), the worker's failure paths, and the app's loop routes: on a temporary
SQLite database, the claim race also on PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from poseloop.data import jobs
from poseloop.config.lib import ConfigError
from poseloop.data.db import Job, Round, open_db, session_scope, utcnow
from poseloop.config.loop import LOOP_PRESETS, LoopPlan, check_plan, make_plan
from webapp_fixtures import BOTH_DATABASES, Env, add_round, build_samples, post_json


@pytest.fixture()
def loop_env(tmp_path: Path, backend_db_url: str | None) -> Env:
    """The fixture rounds plus a finished loop round, round-0001."""
    env = build_samples(tmp_path, db_url=backend_db_url)
    add_round(env, "round-0001", "complete")
    return env


def queue_one(factory, plan: LoopPlan | None = None, **kw) -> int:  # noqa: ANN001, ANN003
    with session_scope(factory) as s:
        return jobs.enqueue(s, plan or make_plan("quick"), **kw).id


def test_enqueue_names_the_next_loop_round_and_allows_one_active_job(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    job_id = queue_one(factory, trigger="button", requested_by="ann")
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        # Named rounds (round0, round1) do not count as loop rounds.
        assert (job.state, job.source_round, job.target_round) == ("queued", "round-0001", "round-0002")
        assert LoopPlan.from_dict(json.loads(job.plan_json)) == make_plan("quick")
    with pytest.raises(jobs.JobConflict, match=f"job {job_id} is queued"):
        queue_one(factory)


def test_enqueue_needs_a_finished_loop_round(tmp_path: Path) -> None:
    env = build_samples(tmp_path)
    add_round(env, "round-0001", "running")
    with pytest.raises(jobs.JobConflict, match="no finished loop round"):
        queue_one(open_db(env.db_url))


@BOTH_DATABASES
def test_two_workers_never_claim_one_job(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    job_id = queue_one(factory)
    won: list[Job | None] = []
    barrier = threading.Barrier(6)

    def take(i: int) -> None:
        barrier.wait()
        won.append(jobs.claim(factory, f"host:{1000 + i}"))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [j for j in won if j is not None]
    assert len(taken) == 1 and taken[0].id == job_id
    with session_scope(factory) as s:
        row = s.get(Job, job_id)
        assert (row.state, row.attempts, row.worker, row.claim) == ("running", 1, taken[0].worker, taken[0].claim)
    assert jobs.claim(factory, "host:1") is None


def test_heartbeat_progress_and_a_lost_claim(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    queue_one(factory)
    job = jobs.claim(factory, "host:1")
    assert jobs.heartbeat(factory, job, "policy", 1.7, "epoch 2/8")
    with session_scope(factory) as s:
        row = s.get(Job, job.id)
        assert (row.stage, row.progress, row.message) == ("policy", 1.0, "epoch 2/8")  # clamped to 0..1
    # Another worker took the job over (this one was presumed dead): this worker's writes no longer land.
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == job.id).values(claim="someone-else"))
    assert not jobs.heartbeat(factory, job, "policy", 0.5)
    assert not jobs.save_result(factory, job, {"policy_version": "x"})
    assert not jobs.finish(factory, job, "done")
    with session_scope(factory) as s:
        row = s.get(Job, job.id)
        assert (row.state, row.progress, json.loads(row.result_json)) == ("running", 1.0, {})


def test_stale_job_is_retried_then_failed_with_the_reason(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    with session_scope(factory) as s:
        job_id = jobs.enqueue(s, make_plan("quick"), max_attempts=2).id
    job = jobs.claim(factory, "gpu-box:4242")  # another host: only the heartbeat's age tells
    jobs.heartbeat(factory, job, "policy", 0.4)
    jobs.save_result(factory, job, {"reward_version": "rm-1"})
    assert jobs.requeue_stale(factory, 60) == []  # fresh heartbeat: alive
    later = utcnow() + timedelta(seconds=61)
    assert jobs.requeue_stale(factory, 60, now=later) == [(job_id, "queued")]
    with session_scope(factory) as s:
        row = s.get(Job, job_id)
        assert row.state == "queued" and row.claim is None
        assert "gpu-box:4242 sent no heartbeat" in row.message and "stage policy" in row.message
        assert json.loads(row.result_json) == {"reward_version": "rm-1"}  # finished steps are kept
    assert not jobs.heartbeat(factory, job, "policy", 0.5)  # the dead worker's claim is void
    second = jobs.claim(factory, "gpu-box:5000")
    assert second is not None and second.attempts == 2
    assert jobs.requeue_stale(factory, 60, now=utcnow() + timedelta(seconds=61)) == [(job_id, "failed")]
    with session_scope(factory) as s:
        row = s.get(Job, job_id)
        assert row.state == "failed" and row.finished_at is not None
        assert row.error.startswith("worker gpu-box:5000 sent no heartbeat") and "gave up after 2 attempts" in row.error


def test_a_dead_pid_on_this_host_is_stale_at_once(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    job_id = queue_one(factory)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    jobs.claim(factory, f"{jobs.worker_name().rpartition(':')[0]}:{proc.pid}")
    assert jobs.requeue_stale(factory, 3600) == [(job_id, "queued")]
    with session_scope(factory) as s:
        assert "exited during stage start" in s.get(Job, job_id).message


def test_cancel_queued_and_running_jobs(loop_env: Env) -> None:
    factory = open_db(loop_env.db_url)
    first = queue_one(factory)
    with session_scope(factory) as s:
        assert jobs.request_cancel(s, first).state == "cancelled"
    second = queue_one(factory)  # a cancelled job is not active
    job = jobs.claim(factory, "host:1")
    assert job.id == second
    with session_scope(factory) as s:
        row = jobs.request_cancel(s, second)
        assert row.state == "running" and row.cancel_requested
    assert not jobs.heartbeat(factory, job, "reward", 0.1)  # the worker stops at its next heartbeat
    assert jobs.finish(factory, job, "cancelled", "cancelled during stage reward")
    with session_scope(factory) as s, pytest.raises(jobs.JobConflict, match="already cancelled"):
        jobs.request_cancel(s, second)
    with session_scope(factory) as s, pytest.raises(LookupError):
        jobs.request_cancel(s, 999)


def test_loop_plans_parse_and_bad_arguments_name_the_flag() -> None:
    for name in LOOP_PRESETS:
        check_plan(make_plan(name))
    plan = make_plan("default", policy="--set train.epochs=2", generate="--data.prompts 'a robot'")
    assert plan.policy[-2:] == ["--set", "train.epochs=2"] and plan.generate == ["--data.prompts", "a robot"]
    with pytest.raises(ConfigError, match="loop_policy_args: .*train.epochs"):
        check_plan(make_plan("default", policy="--set train.epochs=-1"))
    with pytest.raises(ConfigError, match="loop_generate_args: No closing quotation"):
        make_plan("default", generate="--data.prompts 'a robot")
    with pytest.raises(ConfigError, match="loop_preset: 'fast' is not one of"):
        make_plan("fast")
    with pytest.raises(ConfigError, match="'policy' must be a list"):
        LoopPlan.from_dict({"policy": "--algo d3po"})


def test_worker_fails_a_job_with_the_reason_and_exits(loop_env: Env, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from poseloop.worker import main as worker_main

    factory = open_db(loop_env.db_url)
    # A plan an older app queued with an argument this worker refuses: the job fails naming it, no model loads.
    job_id = queue_one(factory, LoopPlan("quick", ["--set", "train.epochs=0"]))
    assert worker_main(["--samples_dir", str(loop_env.samples_dir), "--db_url", loop_env.db_url, "--models_dir",
                        str(tmp_path / "models"), "--once", "--preload", "false"]) == 1
    with session_scope(factory) as s:
        row = s.get(Job, job_id)
        assert row.state == "failed" and row.attempts == 1
        assert row.error.startswith("stage reward: ConfigError: train_reward.py: ") and "train.epochs" in row.error
    assert worker_main(["--samples_dir", str(loop_env.samples_dir), "--db_url", loop_env.db_url,
                        "--exit_when_idle", "--preload", "false"]) == 0
    for argv, field in (([str(tmp_path / "nowhere")], "samples_dir: "),
                        ([str(loop_env.samples_dir), "--heartbeat", "5", "--stale_after", "10"], "stale_after: ")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            worker_main(["--samples_dir", *argv])
        assert exit_info.value.code == 2 and field in capsys.readouterr().err


# ---------------------------------------------------------------- the app's routes


def loop_app(env: Env, **overrides):  # noqa: ANN003, ANN201
    from webapp import create_app

    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "loop": True, "loop_worker": "external",
                      "loop_preset": "quick", **overrides})
    app.testing = True
    return app


def test_loop_routes_queue_show_and_cancel(loop_env: Env) -> None:
    app = loop_app(loop_env, loop_min_labels=0)
    c = app.test_client()
    state = c.get("/api/loop").get_json()
    assert state["enabled"] and state["job"] is None and state["round"]["name"] == "round-0001"
    r = post_json(c, "/api/loop/jobs", {"rater": "ann"})
    assert r.status_code == 202, r.get_json()
    job = r.get_json()
    assert (job["state"], job["trigger"], job["requested_by"], job["target_round"]) == \
        ("queued", "button", "ann", "round-0002")
    assert job["plan"]["preset"] == "quick"
    r = post_json(c, "/api/loop/jobs", {})
    assert r.status_code == 409 and r.get_json()["job_id"] == job["id"]
    assert c.get(f"/api/loop/jobs/{job['id']}").get_json()["state"] == "queued"
    assert c.get("/api/loop/jobs?limit=5").get_json()["jobs"][0]["id"] == job["id"]
    assert c.get("/api/loop").get_json()["job"]["id"] == job["id"]
    r = post_json(c, f"/api/loop/jobs/{job['id']}/cancel", {})
    assert r.status_code == 200 and r.get_json()["state"] == "cancelled"
    assert post_json(c, f"/api/loop/jobs/{job['id']}/cancel", {}).status_code == 409
    app.extensions["poseloop_store"].dispose()


def test_loop_routes_refuse_bad_input_with_4xx_json(loop_env: Env) -> None:
    app = loop_app(loop_env)
    c = app.test_client()
    cases = [
        c.post("/api/loop/jobs", data="{", content_type="application/json"),
        post_json(c, "/api/loop/jobs", [1]),
        post_json(c, "/api/loop/jobs", {"rater": "x" * 200}),
        c.post("/api/loop/jobs", data="{}", content_type="text/plain"),
        c.get("/api/loop/jobs?limit=0"),
        c.get("/api/loop/jobs?limit=abc"),
        c.get("/api/loop/jobs/99999"),
        c.get("/api/loop/jobs/99999999999999"),
        post_json(c, "/api/loop/jobs/99999/cancel", {}),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500 and isinstance(r.get_json()["error"], str), (r.status_code, r.data)
    app.extensions["poseloop_store"].dispose()
    from webapp import create_app

    off = create_app({"samples_dir": loop_env.samples_dir, "db_url": loop_env.db_url})
    r = post_json(off.test_client(), "/api/loop/jobs", {})
    assert r.status_code == 404 and "--loop" in r.get_json()["error"]
    assert off.test_client().get("/api/loop").get_json()["enabled"] is False
    off.extensions["poseloop_store"].dispose()


def test_loop_writes_need_the_token(loop_env: Env) -> None:
    app = loop_app(loop_env, token="s3cret-token-1")
    c = app.test_client()
    assert post_json(c, "/api/loop/jobs", {}).status_code == 401
    assert post_json(c, "/api/loop/jobs", {}, headers={"Origin": "http://evil.example",
                                                       "X-Poseloop-Token": "s3cret-token-1"}).status_code == 403
    assert post_json(c, "/api/loop/jobs", {}, headers={"X-Poseloop-Token": "s3cret-token-1"}).status_code == 202
    app.extensions["poseloop_store"].dispose()


def test_enough_labels_queue_the_job_once(loop_env: Env) -> None:
    app = loop_app(loop_env, loop_min_labels=3)
    c = app.test_client()
    from poseloop.data.db import Sample

    factory = open_db(loop_env.db_url)
    with session_scope(factory) as s:
        rid = s.scalar(select(Round.id).where(Round.name == "round-0001"))
        sample_ids = list(s.scalars(select(Sample.id).where(Sample.round_id == rid)))
    assert post_json(c, "/api/scores", {"rater": "ann", "sample_id": sample_ids[0], "score": 1}).status_code == 201
    assert post_json(c, "/api/scores", {"rater": "bob", "sample_id": sample_ids[0], "score": 2}).status_code == 201
    assert c.get("/api/loop").get_json()["job"] is None
    assert post_json(c, "/api/scores", {"rater": "ann", "sample_id": sample_ids[1], "score": 3}).status_code == 201
    job = c.get("/api/loop").get_json()["job"]
    assert (job["trigger"], job["source_round"]) == ("auto", "round-0001")
    with session_scope(factory) as s:
        s.execute(update(Job).values(state="failed"))
    # A failed automatic job is not queued again by more labels on the same round; the button still works.
    assert post_json(c, "/api/scores", {"rater": "bob", "sample_id": sample_ids[1], "score": 3}).status_code == 201
    assert len(c.get("/api/loop/jobs").get_json()["jobs"]) == 1
    app.extensions["poseloop_store"].dispose()


def test_loop_flags_are_checked_at_start(loop_env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    from webapp.config import parse_args

    base = ["--samples_dir", str(loop_env.samples_dir), "--loop"]
    assert parse_args(base).loop and not parse_args(base[:2]).loop and not parse_args([*base, "false"]).loop
    for extra, said in ((["--loop_policy_args=--set sample.steps=0"], r"loop_policy_args: .*sample.steps"),
                        (["--loop_min_labels", "-1"], "loop_min_labels: "),
                        (["--loop_stale_after", "1"], "loop_stale_after: ")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse_args([*base, *extra])
        assert re.search(said, capsys.readouterr().err)
    # An external worker's paths are its own: only the quoting is checked here.
    assert parse_args([*base, "--loop_worker", "external", "--loop_generate_args=--model.base /gpu/sd15"]).loop


def test_progress_page_table_and_plot(loop_env: Env, tmp_path: Path) -> None:
    from poseloop.data.db import BlindJudgement, Comparison, Rater, Sample

    models = tmp_path / "models"
    (models / "policies" / "pol-1").mkdir(parents=True)
    (models / "policies" / "pol-1" / "lineage.json").write_text(json.dumps({
        "algo": "ddpo", "parent": None, "inputs": {"reward": "latent:rm-1", "reward_models": [
            {"version": "rm-1", "labels": {"n_labels": 8, "digest": "abcd1234abcd1234",
                                            "rounds": {"round-0001": {"scores": 8, "preferences": 0}}}}]}}))
    rid2, _ = add_round(loop_env, "round-0002", "complete")
    base_rid, base_ids = add_round(loop_env, "ab-round-0002-baseline", "complete", k=2)
    cand_rid, cand_ids = add_round(loop_env, "ab-round-0002-candidate", "complete", k=2)
    factory = open_db(loop_env.db_url)
    with session_scope(factory) as s:
        s.execute(update(Round).where(Round.id.in_([rid2, cand_rid])).values(policy_version="pol-1"))
        comp = Comparison(name="ab-round-0002", baseline_round_id=base_rid, candidate_round_id=cand_rid)
        s.add(comp)
        rater = Rater(name="ann")
        s.add(rater)
        s.flush()
        for b, c_, outcome in zip(base_ids, cand_ids, ["candidate", "tie"], strict=True):
            s.add(BlindJudgement(comparison_id=comp.id, rater_id=rater.id, baseline_sample_id=b,
                                 candidate_sample_id=c_, left_is_candidate=True, outcome=outcome))
        s.add(Job(state="done", target_round="round-0002", source_round="round-0001", plan_json="{}",
                  result_json=json.dumps({"reward_means_by": "rm-1", "reward_means": {
                      "round-0001": {"mean": 0.1, "ci": [0.0, 0.2], "n": 2},
                      "round-0002": {"mean": 0.4, "ci": [0.3, 0.5], "n": 2}}})))
        assert s.scalar(select(Sample.id).where(Sample.round_id == rid2)) is not None
    app = loop_app(loop_env, models_dir=models)
    c = app.test_client()
    data = c.get("/api/loop/progress").get_json()
    rows = {r["round"]: r for r in data["rounds"]}
    assert list(rows) == ["round-0001", "round-0002"]  # loop rounds only, oldest first
    r2 = rows["round-0002"]
    assert r2["policy"]["reward_models"][0]["version"] == "rm-1" and r2["reward_mean"]["mean"] == 0.4
    assert (r2["ab"]["n"], r2["ab"]["win_rate"], r2["ab"]["baseline"]) == (2, 0.75, "base")
    assert 0.5 <= r2["ab"]["ci"][0] <= 0.75 <= r2["ab"]["ci"][1] <= 1.0
    html = c.get("/progress").get_data(as_text=True)
    assert html.count('class="point"') == 3  # two reward means and one A/B win rate
    assert "rm-1" in html and "75%" in html and "<script" not in html
    app.extensions["poseloop_store"].dispose()
