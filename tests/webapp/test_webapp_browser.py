"""End to end in headless Chromium: rate images, pairs and blind pairs with the keyboard, reload, check the database."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from poseloop.data.db import BlindJudgement, Preference, Rater, Rating, open_db, session_scope
from webapp_fixtures import (  # noqa: F401  (fixtures)
    Blind, Env, LiveServer, add_round, app, cmp, env, live_server, make_chrome, post_json,
)

RATER = 'Zoë <img src=x onerror="window.pwned=1">'


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile."""
    driver = make_chrome(tmp_path / "chrome-profile")
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll until fn() is truthy; fail with the last value otherwise.

    The timeout is generous because these tests run at low priority beside training jobs, where Chromium
    can stall for seconds; a passing check returns at once.
    """
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


def enter_rater(driver: Any, name: str) -> None:
    """Type the rater's name once the dialog asking for it is open (the page opens it after loading)."""
    box = WebDriverWait(driver, 30).until(lambda drv: drv.find_element(By.ID, "rater-input"))
    WebDriverWait(driver, 30).until(lambda _drv: box.is_displayed() and box.is_enabled())
    box.send_keys(name + Keys.ENTER)


def settle(driver: Any, quiet_s: float = 1.0) -> None:
    """Wait until the page has fetched nothing new for `quiet_s` seconds."""
    def count() -> int:
        return driver.execute_script("return performance.getEntriesByType('resource').length")

    last, since = count(), time.monotonic()
    deadline = since + 30
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


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
    enter_rater(d, RATER)
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


def blind_token(driver: Any) -> str:
    """The pair token of the blind pair on screen (from /media/blind/<cmp>/<token>/left?rater=...)."""
    return src(driver, "blind-left").split("/media/blind/", 1)[1].split("/")[1]


def db_blind(env: Env) -> dict[int, tuple[bool, str]]:
    """This rater's blind verdicts: {baseline sample id: (left_is_candidate, outcome)}."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        rows = s.execute(select(BlindJudgement.baseline_sample_id, BlindJudgement.left_is_candidate,
                                BlindJudgement.outcome).join(Rater, BlindJudgement.rater_id == Rater.id)
                         .where(Rater.name == RATER)).all()
    factory.kw["bind"].dispose()
    return {b: (lc, o) for b, lc, o in rows}


# Injected before the page's own scripts: keeps a copy of every fetch answer the page receives (POSTs too).
RECORD_FETCHES = """
window.__answers = [];
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const resp = await realFetch(...args);
  resp.clone().text().then((t) => window.__answers.push([String(args[0]), t]));
  return resp;
};
"""


def assert_page_blind(driver: Any, cmp: Blind) -> None:
    """Neither the DOM nor anything this page fetched (since the last clear) names a round, policy, sample or group."""
    dom = driver.execute_script("return document.documentElement.outerHTML")
    for secret in cmp.secrets():
        assert secret not in dom, secret
    answers = driver.execute_script("return window.__answers")
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => [e.name, e.initiatorType])")
    urls = [u for u, _kind in entries] + [driver.current_url]
    assert any("/api/comparisons/" in u for u, _t in answers) and any("/media/blind/" in u for u in urls)
    # Images, scripts and the page itself are fetched again here (GETs); fetch() answers were recorded.
    replayed = []
    for u, kind in [*entries, (driver.current_url, "navigation")]:
        if kind == "fetch":
            continue
        with urllib.request.urlopen(u) as resp:
            body = resp.read()
            replayed.append((u, str(resp.headers) + (body.decode() if resp.headers.get_content_type() != "image/png" else "")))
    for u, body in [*answers, *replayed]:
        assert "/api/rounds" not in u and "/media/sample/" not in u and "/media/condition/" not in u, u
        for secret in cmp.secrets():
            assert secret not in u and secret not in body, (secret, u)


def test_blind_mode_keyboard_reload_undo_and_hidden_identity(browser: Any, live_server: LiveServer, env: Env,
                                                             cmp: Blind) -> None:
    d = browser
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_FETCHES})
    d.get(live_server.url + "/")
    enter_rater(d, RATER)
    wait_for(lambda: "/media/sample/" in src(d, "score-img"))
    assert "candidateRoundZ9" in d.page_source  # score mode lists every round ...
    # From here on, only what blind mode fetches.
    settle(d)  # score mode's image preloads must not finish after the clear and count as blind mode's
    d.execute_script("performance.clearResourceTimings(); window.__answers = []")
    keys(d, "b")
    wait_for(lambda: "/media/blind/" in src(d, "blind-left"))
    assert_page_blind(d, cmp)  # ... blind mode has dropped them from the page

    # Judge three pairs: left, right (d), tie (t); each verdict is stored as what the side meant.
    shown = []
    for k, choice in ((Keys.ARROW_LEFT, "left"), ("d", "right"), ("t", "tie")):
        token = blind_token(d)
        with urllib.request.urlopen(src(d, "blind-left")) as resp:
            left_bytes = resp.read()
        base_id, cand_id = cmp.pairs[token]
        left_is_cand = left_bytes == cmp.files[cand_id].read_bytes()
        assert left_is_cand or left_bytes == cmp.files[base_id].read_bytes()
        shown.append((token, base_id, left_is_cand, choice))
        keys(d, k)
        wait_for(lambda token=token: len(db_blind(env)) == len(shown) and blind_token(d) != token)
    assert len({t for t, *_ in shown}) == 3
    for _token, base_id, left_is_cand, choice in shown:
        want = "tie" if choice == "tie" else "candidate" if (choice == "left") == left_is_cand else "baseline"
        assert db_blind(env)[base_id] == (left_is_cand, want)
    assert text(d, "progress-text") == "3 / 6"
    on_screen = (blind_token(d), src(d, "blind-left"), src(d, "blind-right"))

    # Reload: the page boots straight into blind mode, with the same pair on the same side.
    d.refresh()
    wait_for(lambda: "/media/blind/" in src(d, "blind-left"))
    assert (blind_token(d), src(d, "blind-left"), src(d, "blind-right")) == on_screen
    wait_for(lambda: text(d, "progress-text") == "3 / 6")
    assert_page_blind(d, cmp)

    # Undo takes back the latest verdict (the tie) and shows that pair again; then skip it.
    keys(d, "u")
    wait_for(lambda: len(db_blind(env)) == 2)
    wait_for(lambda: blind_token(d) == shown[2][0])
    assert text(d, "progress-text") == "2 / 6"
    keys(d, "s")
    wait_for(lambda: db_blind(env).get(shown[2][1], (None, None))[1] == "skip")
    wait_for(lambda: text(d, "progress-text") == "3 / 6")
    assert blind_token(d) not in {t for t, *_ in shown}  # judged pairs are not shown again
    assert d.execute_script("return window.pwned === undefined")
    assert_page_blind(d, cmp)

    # b leaves blind mode: the rounds come back.
    keys(d, "b")
    wait_for(lambda: "/media/sample/" in src(d, "score-img"))


# ---------------------------------------------------------------- which round opens, blind progress, stats layout


def test_page_opens_the_newest_finished_round_outside_comparisons(browser: Any, live_server: LiveServer, env: Env,
                                                                  cmp: Blind) -> None:
    # Newest first: a running round, then the comparison's two rounds, then the fixture's finished rounds.
    running, _ids = add_round(env, "halfwayRound", "running")
    d = browser
    d.get(live_server.url + "/")
    enter_rater(d, "ann")
    rid = max(env.rounds)
    first = env.samples[env.groups[rid][0]][0]
    wait_for(lambda: src(d, "score-img").endswith(f"/media/sample/{first}"))
    options = {o.get_attribute("value"): o.text for o in d.find_elements(By.CSS_SELECTOR, "#round option")}
    assert d.find_element(By.ID, "round").get_attribute("value") == str(rid)
    assert "unfinished" in options[str(running)] and "unfinished" not in options[str(rid)]
    assert "blind evaluation" in options[str(cmp.candidate_round_id)]
    # The selector tells the loop's rounds from evaluation and named rounds (issue 31).
    loop, _ids = add_round(env, "round-0007", "running")
    d.get(live_server.url + "/")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#round option")) == len(options) + 1)
    options = {o.get_attribute("value"): o.text for o in d.find_elements(By.CSS_SELECTOR, "#round option")}
    assert "(loop round 7)" in options[str(loop)] and "(evaluation)" in options[str(cmp.candidate_round_id)]
    assert "(named round)" in options[str(running)]


# Holds back /pairs answers and label posts, so the order that once showed 47 / 48 is forced: the page asks
# for more pairs, the server counts before the last verdict is stored, and the verdict's confirmation
# arrives before that count does.
DELAY_FETCHES = """
window.__pairsDelivered = 0;
const realFetch2 = window.fetch;
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
window.fetch = async (url, opts) => {
  const u = String(url);
  if (opts && opts.method === "POST" && u.includes("/judgements")) await pause(400);
  const resp = await realFetch2(url, opts);
  if (u.includes("/pairs?")) { await pause(1200); window.__pairsDelivered++; }
  return resp;
};
"""


def test_blind_progress_reaches_the_total_when_the_last_verdict_races_the_refill(
        browser: Any, live_server: LiveServer, app: Any, env: Env, cmp: Blind) -> None:
    c = app.test_client()
    tokens = sorted(cmp.pairs)
    for token in tokens[:-1]:  # all but one judged already
        r = post_json(c, f"/api/comparisons/{cmp.comparison_id}/judgements", {"rater": "ann", "pair": token,
                                                                              "choice": "tie"})
        assert r.status_code == 201
    d = browser
    d.get(live_server.url + "/")
    enter_rater(d, "ann")
    keys(d, "b")
    wait_for(lambda: blind_token(d) == tokens[-1] if "/media/blind/" in src(d, "blind-left") else False)
    wait_for(lambda: text(d, "progress-text") == f"{len(tokens) - 1} / {len(tokens)}")
    d.execute_script(DELAY_FETCHES)
    keys(d, "a")
    wait_for(lambda: len(db_blind_of(env, "ann")) == len(tokens))
    wait_for(lambda: d.execute_script("return window.__pairsDelivered") >= 1)
    time.sleep(0.5)  # let every answer land
    assert text(d, "progress-text") == f"{len(tokens)} / {len(tokens)}"
    assert "judged every pair" in text(d, "empty")


def db_blind_of(env: Env, rater: str) -> list[int]:
    """Baseline sample ids of this rater's blind verdicts."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        rows = list(s.scalars(select(BlindJudgement.baseline_sample_id).join(Rater, BlindJudgement.rater_id == Rater.id)
                              .where(Rater.name == rater)))
    factory.kw["bind"].dispose()
    return rows


# Long but ordinary names: an e-mail address as rater, generated round and comparison names.
LONG_RATERS = ["anna.katharina.mueller-luedenscheidt@vision-lab.example.org",
               "bartholomew.fitzgerald-ramanathan@robotics.example.edu"]
LONG_ROUND = "eval-2025-06-01T12-00-00-policy-v0012-lora-rank16-vs-base-sd15-controlnet-openpose-seed0000-rerun"


def populate_stats(app: Any, env: Env, cmp: Blind) -> None:
    """Scores, preferences and blind verdicts from raters with long names, and long round names."""
    from poseloop.data.db import Comparison, Round
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        s.get(Round, cmp.candidate_round_id).policy_version = "policies/" + LONG_ROUND
        s.get(Round, cmp.baseline_round_id).name = LONG_ROUND + "-baseline"
        s.get(Comparison, cmp.comparison_id).name = LONG_ROUND + "-comparison"
    factory.kw["bind"].dispose()
    c = app.test_client()
    rid = max(env.rounds)
    ids = [s for g in env.groups[rid] for s in env.samples[g]]
    for n, rater in enumerate(LONG_RATERS):
        for i, sid in enumerate(ids):
            assert post_json(c, "/api/scores", {"rater": rater, "sample_id": sid, "score": (i * (n + 1)) % 11 - 5}
                             ).status_code == 201
        a, b = env.samples[env.groups[rid][0]][:2]
        assert post_json(c, "/api/preferences", {"rater": rater, "left_id": a, "right_id": b, "choice": "left"}
                         ).status_code == 201
        for token in sorted(cmp.pairs)[:3]:
            assert post_json(c, f"/api/comparisons/{cmp.comparison_id}/judgements",
                             {"rater": rater, "pair": token, "choice": "left"}).status_code == 201
    # The first stats request imports scipy (seconds; a minute on a busy machine at low priority): done
    # here, so the page's own request is quick and the test is about the layout.
    assert c.get("/api/stats").status_code == 200


def test_stats_page_does_not_scroll_sideways_at_1400_px(browser: Any, live_server: LiveServer, app: Any, env: Env,
                                                        cmp: Blind) -> None:
    populate_stats(app, env, cmp)
    d = browser
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    d.get(live_server.url + "/static/style.css")  # any page of the app's origin, to reach its localStorage
    d.execute_script("localStorage.setItem('poseloop:round', arguments[0])", str(max(env.rounds)))
    d.get(live_server.url + "/stats")
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#spearman-table tbody tr")) == 1, timeout=30)
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#blind-table tbody tr")) >= 3, timeout=30)
    assert d.execute_script("return window.innerWidth") == 1400
    widths = d.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
    assert widths[0] <= widths[1], f"the stats page scrolls sideways: scrollWidth {widths[0]} > {widths[1]}"
    assert LONG_RATERS[0] in d.find_element(By.ID, "spearman-table").text  # names are shown, wrapped
