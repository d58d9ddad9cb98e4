"""End to end in headless Chromium: rate images and pairs with the keyboard, reload, check the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from poseloop.db import Preference, Rater, Rating, open_db, session_scope
from webapp_fixtures import Env, LiveServer, app, env, live_server, make_chrome  # noqa: F401  (fixtures)

RATER = 'Zoë <img src=x onerror="window.pwned=1">'


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile."""
    driver = make_chrome(tmp_path / "chrome-profile")
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until fn() is truthy; fail with the last value otherwise."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out; last value {value!r}")


def db_labels(env: Env) -> tuple[dict[int, float], list[tuple[int, int, str, int | None]]]:
    """This rater's {sample: score} and [(a, b, choice, left)] in the database."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        rater = s.scalar(select(Rater).where(Rater.name == RATER))
        if rater is None:
            out: tuple[dict[int, float], list[Any]] = ({}, [])
        else:
            scores = dict(s.execute(select(Rating.sample_id, Rating.score).where(Rating.rater_id == rater.id)).all())
            prefs = [tuple(r) for r in s.execute(
                select(Preference.sample_a_id, Preference.sample_b_id, Preference.choice, Preference.left_sample_id)
                .where(Preference.rater_id == rater.id)).all()]
            out = (scores, prefs)
    factory.kw["bind"].dispose()
    return out


def keys(driver: Any, *seq: str) -> None:
    for k in seq:
        ActionChains(driver).send_keys(k).perform()


def src(driver: Any, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).get_attribute("src") or ""


def text(driver: Any, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def test_keyboard_rating_survives_reload(browser: Any, live_server: LiveServer, env: Env) -> None:
    d = browser
    d.get(live_server.url + "/")
    name_box = WebDriverWait(d, 10).until(lambda drv: drv.find_element(By.ID, "rater-input"))
    name_box.send_keys(RATER + Keys.ENTER)
    # Newest round first in the selector; the page starts at its first image.
    rid = max(env.rounds)
    order = [s for g in env.groups[rid] for s in env.samples[g]]
    wait_for(lambda: src(d, "score-img").endswith(f"/media/sample/{order[0]}"))

    # Score: 3, Shift+2 = -2, skip one, "-" then 4 = -4, 5.
    keys(d, "3")
    ActionChains(d).key_down(Keys.SHIFT).send_keys("2").key_up(Keys.SHIFT).perform()
    keys(d, Keys.ARROW_RIGHT, "-", "4", "5")
    expected = {order[0]: 3, order[1]: -2, order[3]: -4, order[4]: 5}
    wait_for(lambda: db_labels(env)[0] == expected)
    assert text(d, "progress-text") == "4 / 12"
    assert d.execute_script("return window.pwned === undefined")
    assert d.find_element(By.ID, "rater-btn").text == RATER  # shown as text, not markup

    # Change a score, then undo the change: the previous score is back.
    keys(d, Keys.HOME, "1")
    wait_for(lambda: db_labels(env)[0][order[0]] == 1)
    keys(d, "u")
    wait_for(lambda: db_labels(env)[0][order[0]] == 3)

    # Reload: the saved scores are shown when returning to an image.
    d.refresh()
    wait_for(lambda: src(d, "score-img").endswith(f"/media/sample/{order[0]}"))
    wait_for(lambda: text(d, "score-badge") == "+3")
    keys(d, Keys.ARROW_RIGHT)
    wait_for(lambda: text(d, "score-badge") == "-2")
    assert d.find_element(By.CSS_SELECTOR, "#scale button.current").text == "-2"
    assert text(d, "progress-text") == "4 / 12"

    # Only unrated: Space and the filter skip scored images.
    keys(d, "n", Keys.HOME)
    wait_for(lambda: src(d, "score-img").endswith(f"/media/sample/{order[0]}"))
    keys(d, Keys.ARROW_RIGHT)
    wait_for(lambda: src(d, "score-img").endswith(f"/media/sample/{order[2]}"))
    keys(d, "n")

    # Pairs: left, right, tie, skip; then undo the skip.
    keys(d, "m")
    wait_for(lambda: src(d, "pair-left"))
    shown = []
    for k in (Keys.ARROW_LEFT, "d", "t", Keys.ARROW_UP):
        left = int(src(d, "pair-left").rsplit("/", 1)[1])
        right = int(src(d, "pair-right").rsplit("/", 1)[1])
        shown.append((left, right))
        keys(d, k)
        wait_for(lambda left=left: src(d, "pair-left") != ""
                 and int(src(d, "pair-left").rsplit("/", 1)[1]) != left
                 or len(db_labels(env)[1]) == 4)
    wait_for(lambda: len(db_labels(env)[1]) == 4)
    prefs = {(a, b): (c, left) for a, b, c, left in db_labels(env)[1]}
    assert len({tuple(sorted(p)) for p in shown}) == 4  # no pair shown twice
    for (left, right), want in zip(shown, ("left", "right", "tie", "skip")):
        a, b = sorted((left, right))
        choice, stored_left = prefs[(a, b)]
        assert stored_left == left
        if want == "left":
            assert choice == ("a" if left == a else "b")
        elif want == "right":
            assert choice == ("a" if right == a else "b")
        else:
            assert choice == want
    groups = {g for g in env.groups[rid] for (l, _r) in shown if l in env.samples[g]}
    assert len(groups) == 3  # the first pairs spread over the groups
    keys(d, "u")
    wait_for(lambda: len(db_labels(env)[1]) == 3)
    wait_for(lambda: text(d, "progress-text") == "3 / 18")

    # Reload in pairs mode: progress and the undone pair come back, judged pairs do not.
    d.refresh()
    wait_for(lambda: text(d, "progress-text") == "3 / 18")
    left = int(src(d, "pair-left").rsplit("/", 1)[1])
    right = int(src(d, "pair-right").rsplit("/", 1)[1])
    assert tuple(sorted((left, right))) not in {tuple(sorted(p)) for p in shown[:3]}

    # Grid view shows each image's score badge; help opens on "?".
    keys(d, "g")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#grid .tile")) == 12)
    badges = [b.text for b in d.find_elements(By.CSS_SELECTOR, "#grid .tile .badge")]
    assert badges[:5] == ["+3", "-2", "–", "-4", "+5"]
    keys(d, "?")
    wait_for(lambda: d.find_element(By.ID, "help-dialog").is_displayed())
    assert "Shift+1" in d.find_element(By.ID, "help-dialog").text
    assert db_labels(env)[0] == expected
