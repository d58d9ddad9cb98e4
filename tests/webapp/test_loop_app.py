"""The loop in one browser tab (headless Chromium, the real worker): rate round-0001 with the keyboard, press
"Train next round", watch the stage and the progress bar move, kill -9 the worker while it trains the policy, and
see round-0002 appear in the selector with a notice; then the progress page shows it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import select

import generate as generate_script
from poseloop.data.db import Comparison, Job, Rating, Round, default_db_url, open_db, session_scope
from webapp_fixtures import LiveServer, make_chrome


def wait_for(fn: Callable[[], Any], timeout: float = 240.0, what: str = "") -> Any:
    """Poll until fn() is truthy (generous: training runs at low priority beside other tests)."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value {value!r}")


def db_read(samples: Path, fn: Callable[[Any], Any]) -> Any:
    factory = open_db(default_db_url(samples))
    try:
        with session_scope(factory) as s:
            return fn(s)
    finally:
        factory.kw["bind"].dispose()


@pytest.mark.slow
def test_loop_in_one_tab_survives_a_killed_worker(models_dir: Path, tmp_path: Path) -> None:
    from webapp import create_app

    samples, models = tmp_path / "samples", tmp_path / "models"
    base = models_dir / "tiny-sd15"
    model = f"--model.base {base} --model.controlnet {base}/controlnet --model.threads 1"
    # Round 1: 2 poses x 4 images, 4 steps (the quick loop preset's steps).
    assert generate_script.main([*model.split(), "--data.poses", "standing", "sitting", "--data.prompts", "a dancer",
                                 "--set", "sample.steps=4", "--store.samples_dir", str(samples)]) == 0
    app = create_app({
        "samples_dir": samples, "models_dir": models, "loop": True, "loop_preset": "quick", "loop_min_labels": 0,
        "loop_worker_threads": 1, "loop_stale_after": 10.0,
        "loop_policy_args": f"{model} --set sample.images_per_group=2 --set train.batch_size=2 --set train.epochs=3",
        "loop_generate_args": model,
    })
    worker = app.extensions["poseloop_loop_worker"]
    driver = make_chrome(tmp_path / "chrome-profile")
    try:
        with LiveServer(app) as srv:
            d = driver
            d.get(srv.url + "/")
            box = WebDriverWait(d, 30).until(lambda drv: drv.find_element(By.ID, "rater-input"))
            WebDriverWait(d, 30).until(lambda _drv: box.is_displayed() and box.is_enabled())
            box.send_keys("ann" + Keys.ENTER)
            wait_for(lambda: d.find_element(By.ID, "loop-bar").is_displayed(), 30, "the loop bar")
            wait_for(lambda: "/media/sample/" in (d.find_element(By.ID, "score-img").get_attribute("src") or ""), 30,
                     "the first image")
            # Rate all 8 images with the keyboard (a digit scores and moves on).
            for k in "31452053":
                ActionChains(d).send_keys(k).perform()
            wait_for(lambda: db_read(samples, lambda s: len(s.scalars(select(Rating)).all())) == 8, 30, "8 scores")
            wait_for(lambda: "8 labels" in d.find_element(By.ID, "loop-labels").text, 30, "the label count")

            d.find_element(By.ID, "loop-train").click()
            stage = d.find_element(By.ID, "loop-stage")
            bar = d.find_element(By.ID, "loop-progress")
            seen: list[float] = []

            def progress_in_policy() -> bool:
                if stage.get_attribute("data-stage") == "policy":
                    value = float(bar.get_attribute("value") or 0)
                    if not seen or value > seen[-1]:
                        seen.append(value)
                return len(seen) >= 2  # in the policy stage and the bar moved within it

            wait_for(progress_in_policy, what="the policy stage with a moving bar")
            assert 0.18 <= seen[0] < seen[-1] < 0.73, seen  # within the policy stage's share
            assert "training the policy" in stage.text
            pid = worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # mid-training

            # The app starts another worker; it takes the job again at once (the old pid is gone) and goes on.
            note = wait_for(lambda: d.find_element(By.ID, "loop-notice") if d.find_element(
                By.ID, "loop-notice").is_displayed() else None, what="the new round's notice")
            assert "round-0002 is ready" in note.text
            options = [o.text for o in Select(d.find_element(By.ID, "round")).options]
            assert any(o.startswith("round-0002 (loop round 2)") for o in options), options
            assert worker.pid not in (None, pid) and worker.starts == 2
            d.find_element(By.ID, "loop-open").click()
            wait_for(lambda: Select(d.find_element(By.ID, "round")).first_selected_option.text.startswith("round-0002"),
                     30, "round-0002 selected")

            job = wait_for(lambda: db_read(samples, lambda s: (lambda j: j if j.state in ("done", "failed") else None)(
                s.scalars(select(Job)).one())), what="the job's end")
            assert job.state == "done" and job.attempts == 2, (job.state, job.error, job.message)
            result = json.loads(job.result_json)
            # The second attempt kept the finished reward model and re-ran the policy step it was killed in.
            assert result["reward_version"] == f"rm-round-0002-job{job.id}"
            policy = result["policy_version"]
            rnd = db_read(samples, lambda s: s.scalar(select(Round).where(Round.name == "round-0002")))
            assert rnd.status == "complete" and rnd.policy_version == policy
            lineage = json.loads((models / "policies" / policy / "lineage.json").read_text())
            assert lineage["inputs"]["reward"] == f"latent:{result['reward_version']}"
            # Nothing half-written is used: one finished policy export, one reward model, no temporary folders.
            assert [p.name for p in (models / "policies").iterdir() if p.is_dir()] == [policy]
            assert [p.name for p in (models / "reward").iterdir() if p.is_dir() and not p.name.startswith(".")] == \
                [result["reward_version"]]
            assert set(result["reward_means"]) == {"round-0001", "round-0002"}
            # The blind A/B of the new policy against the base model it continued is registered for Blind mode.
            assert "ab_error" not in result and result["ab"]["baseline"] == "base", result.get("ab_error")
            assert db_read(samples, lambda s: s.scalar(select(Comparison).where(Comparison.name == "ab-round-0002")))

            # The progress page: both rounds in the table, the plot with a point per scored round.
            d.get(srv.url + "/progress")
            rows = d.find_elements(By.CSS_SELECTOR, "#loop-table tbody tr")
            assert [r.get_attribute("data-round") for r in rows] == ["round-0001", "round-0002"]
            assert policy in rows[1].text and result["reward_version"] in rows[1].text
            assert len(d.find_elements(By.CSS_SELECTOR, "#progress-plot circle.point")) >= 2
            assert not [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
        worker.stop()
        app.extensions["poseloop_store"].dispose()

