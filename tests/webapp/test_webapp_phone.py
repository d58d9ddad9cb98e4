"""The rating page at a phone size (390x844) and at 1280x800 in headless Chromium: element sizes, the
one-row header, readable error toasts, the help of the configured scale, the rubric, crisp pixels and the
stats page's loading state."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from selenium.webdriver.common.by import By

from test_webapp_browser import (  # noqa: F401  (browser: a fixture)
    RATER, browser, db_labels, enter_rater, keys, src, text, wait_for,
)
from webapp_fixtures import (  # noqa: F401  (fixtures)
    Blind, Env, LiveServer, cmp, env,
)

# The rubric carries markup, so the tests also see that it is shown as text.
LOW, HIGH = "pose ignored, or a <b>broken</b> body", "pose matched by a natural, whole person"
LONG_NAME = "anna.katharina.mueller-luedenscheidt@vision-lab.example.org"  # an e-mail address as rater name


@pytest.fixture()
def app(env: Env, cmp: Blind) -> Iterator[Flask]:
    """The app over `env` (with a blind comparison) and a two-ended rubric."""
    from webapp import create_app

    application = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "rubric": f"{LOW} | {HIGH}"})
    yield application
    application.extensions["poseloop_store"].dispose()


@pytest.fixture()
def live(app: Flask) -> Iterator[LiveServer]:
    """`app` on a real HTTP port."""
    with LiveServer(app) as srv:
        yield srv


def emulate(d: Any, width: int, height: int, phone: bool) -> None:
    """Give the page this CSS viewport; a phone also gets touch input and the mobile viewport rules."""
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": phone})
    d.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": phone})


def box(d: Any, selector: str) -> dict[str, float]:
    """The bounding box (left, top, width, height, right, bottom) of the first element matching `selector`."""
    return d.execute_script(
        "const b = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {left: b.left, top: b.top, width: b.width, height: b.height, right: b.right, bottom: b.bottom};",
        selector)


# Every button, link, selector and toggle a person can see (inside the open dialog, if one is open).
SMALL_TARGETS = """
const dlg = document.querySelector('dialog[open]');
const scope = dlg || document;
const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden'
  && (dlg || !e.closest('dialog'));
return [...scope.querySelectorAll('button, a, select, label.toggle, input:not([type=checkbox])')].filter(shown)
  .map((e) => { const b = e.getBoundingClientRect();
                return [e.id || e.className || e.tagName, e.textContent.trim().slice(0, 20), Math.round(b.width),
                        Math.round(b.height)]; })
  .filter(([, , w, h]) => w < 44 || h < 44);
"""


def loaded(d: Any, *ids: str) -> bool:
    """True when each of these images has its file decoded (until then its height is 0)."""
    return d.execute_script("return arguments[0].every((id) => { const i = document.getElementById(id);"
                            "return i.complete && i.naturalWidth > 0; })", list(ids))


def assert_page_fits(d: Any) -> None:
    """No horizontal scrolling, and every visible tap target at least 44 px each way."""
    sw, cw = d.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
    assert sw <= cw, f"the page scrolls sideways: {sw} > {cw}"
    small = d.execute_script(SMALL_TARGETS)
    assert not small, f"tap targets under 44 px: {small}"


def test_phone_every_mode_is_usable(browser: Any, live: LiveServer, env: Env) -> None:
    d = browser
    vw, vh = 390, 844
    emulate(d, vw, vh, phone=True)
    d.get(live.url + "/")
    # The start dialog says what the ends of the scale mean.
    wait_for(lambda: d.find_element(By.ID, "start-rubric").is_displayed())
    assert text(d, "start-rubric").split("\n") == ["-5", LOW, "+5", HIGH]
    assert_page_fits(d)
    enter_rater(d, RATER)

    # Score: the image spans the width above the buttons; the header is two rows.
    wait_for(lambda: "/media/sample/" in src(d, "score-img") and loaded(d, "score-img", "score-pose"))
    img, header = box(d, "#score-img"), box(d, "#bar")
    assert header["height"] <= 120, header
    assert img["width"] >= 0.9 * vw and img["height"] >= 0.9 * vw, img  # square renders stay square
    assert img["top"] >= header["bottom"] - 1
    buttons = d.find_elements(By.CSS_SELECTOR, "#scale button")
    assert [b.text for b in buttons] == ["-5", "-4", "-3", "-2", "-1", "0", "+1", "+2", "+3", "+4", "+5"]
    scale, rubric = box(d, "#scale"), box(d, "#score-rubric")
    assert scale["top"] >= img["bottom"] and scale["bottom"] <= vh, "the buttons are below the image, on screen"
    assert scale["bottom"] <= rubric["top"] <= scale["bottom"] + 20  # the rubric right under the buttons
    assert "<b>broken</b>" in text(d, "score-rubric")
    assert d.execute_script("return window.pwned === undefined")
    assert_page_fits(d)
    # A tap on +2 scores the image and shows the next one.
    first = src(d, "score-img")
    buttons[7].click()
    wait_for(lambda: src(d, "score-img") != first)
    wait_for(lambda: list(db_labels(env)[0].values()) == [2])

    # The options menu: the toggles behind "⋯", as large tap targets.
    assert not d.find_element(By.ID, "overlay-toggle").is_displayed()
    d.find_element(By.ID, "opts-btn").click()
    wait_for(lambda: d.find_element(By.ID, "crisp-toggle").is_displayed())
    assert_page_fits(d)
    assert box(d, "#opts")["right"] <= vw
    d.find_element(By.ID, "score-meta").click()  # a tap elsewhere closes it
    wait_for(lambda: not d.find_element(By.ID, "crisp-toggle").is_displayed())

    # Fullscreen has a close button (a phone has no Esc key).
    d.find_element(By.ID, "score-img").click()
    wait_for(lambda: d.find_element(By.CSS_SELECTOR, "#lightbox .lightbox-close").is_displayed())
    assert_page_fits(d)
    d.find_element(By.CSS_SELECTOR, "#lightbox .lightbox-close").click()
    wait_for(lambda: not d.find_element(By.ID, "lightbox").is_displayed())

    # Pairs: both images side by side at nearly half the width, the choices under them on screen.
    d.find_element(By.CSS_SELECTOR, 'button[data-mode="pairs"]').click()
    wait_for(lambda: "/media/sample/" in src(d, "pair-left") and loaded(d, "pair-left", "pair-right", "pair-pose"))
    left, right, pose = box(d, "#pair-left"), box(d, "#pair-right"), box(d, "#pair-pose")
    assert left["width"] >= 0.4 * vw and right["width"] >= 0.4 * vw, (left, right)
    assert abs(left["top"] - right["top"]) < 1 and left["right"] <= right["left"]
    choices = box(d, "#view-pairs .choices")
    assert choices["top"] >= left["bottom"] and choices["bottom"] <= vh
    assert pose["height"] <= left["height"], "the pose is no larger than the images it conditions"
    assert_page_fits(d)
    d.find_element(By.CSS_SELECTOR, '#view-pairs button[data-choice="left"]').click()
    wait_for(lambda: len(db_labels(env)[1]) == 1)

    # Grid: tiles of at least a quarter of the width, inside the screen.
    d.find_element(By.CSS_SELECTOR, 'button[data-mode="grid"]').click()
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#grid .tile")) == 12)
    tiles = d.execute_script("return [...document.querySelectorAll('#grid .tile')].map((t) => {"
                             "const b = t.getBoundingClientRect(); return [b.width, b.right]; })")
    assert all(w >= 0.25 * vw and r <= vw for w, r in tiles), tiles
    assert_page_fits(d)

    # Blind: laid out like pairs.
    d.find_element(By.CSS_SELECTOR, 'button[data-mode="blind"]').click()
    wait_for(lambda: "/media/blind/" in src(d, "blind-left") and loaded(d, "blind-left", "blind-right", "blind-pose"))
    assert min(box(d, "#blind-left")["width"], box(d, "#blind-right")["width"]) >= 0.4 * vw
    assert box(d, "#view-blind .choices")["bottom"] <= vh
    assert box(d, "#bar")["height"] <= 120
    assert_page_fits(d)

    # Help: says how to use a touch screen and closes with a tap.
    d.find_element(By.ID, "help-btn").click()
    wait_for(lambda: d.find_element(By.ID, "help-dialog").is_displayed())
    assert "touch screen" in text(d, "help-dialog")
    assert_page_fits(d)
    d.find_element(By.ID, "help-close").click()
    wait_for(lambda: not d.find_element(By.ID, "help-dialog").is_displayed())


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two computed CSS colours such as 'rgb(255, 255, 255)'."""
    def lum(css: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"\d+", css)[:3])
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((lum(fg), lum(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_of_known_colours() -> None:
    assert contrast("rgb(255, 255, 255)", "rgb(0, 0, 0)") == pytest.approx(21.0)
    assert contrast("rgb(214, 69, 69)", "rgb(214, 69, 69)") == pytest.approx(1.0)


def change_rater(d: Any, name: str) -> None:
    """Open the rater dialog from the header and sign in as `name`."""
    d.find_element(By.ID, "rater-btn").click()
    wait_for(lambda: d.find_element(By.ID, "rater-input").is_displayed())
    d.find_element(By.ID, "rater-input").clear()
    enter_rater(d, name)
    wait_for(lambda: d.find_element(By.ID, "rater-btn").text == name)


def rendering(d: Any) -> str:
    return d.execute_script("return getComputedStyle(document.getElementById('score-img')).imageRendering")


def test_desktop_header_help_toast_rubric_and_crisp_pixels(browser: Any, live: LiveServer) -> None:
    d = browser
    emulate(d, 1280, 800, phone=False)
    d.get(live.url + "/")
    # A long rater name must not push anything onto a second row.
    enter_rater(d, LONG_NAME)
    wait_for(lambda: "/media/sample/" in src(d, "score-img"))

    # The header is one row, inside the window.
    items = d.execute_script("return [...document.querySelectorAll('#bar > *, #opts > *')]"
                             ".filter((e) => e.getClientRects().length && e.offsetWidth > 0)"
                             ".map((e) => { const b = e.getBoundingClientRect();"
                             "return [e.id || e.className, b.top + b.height / 2, b.right]; })")
    assert {"round", "help-btn", "rater-btn", "stats-link", "progress"} <= {i[0] for i in items}
    middles = [m for _n, m, _r in items]
    assert max(middles) - min(middles) < 4, f"the header wraps: {items}"
    assert box(d, "#bar")["height"] <= 50
    assert max(r for _n, _m, r in items) <= d.execute_script("return document.documentElement.clientWidth")
    assert d.find_element(By.ID, "crisp-toggle").is_displayed() and not d.find_element(By.ID, "opts-btn").is_displayed()

    # Help: the keys of the scale -5..5, none that would fail.
    keys(d, "?")
    wait_for(lambda: d.find_element(By.ID, "help-dialog").is_displayed())
    shown = [k.text for k in d.find_elements(By.CSS_SELECTOR, "#help-dialog .keys kbd")]
    assert "0 … 5" in shown and "Shift+1 … Shift+5" in shown and "- then 1 … 5" in shown
    assert not [k for k in shown if re.search(r"[6-9]", k)], shown
    keys(d, "?")
    wait_for(lambda: not d.find_element(By.ID, "help-dialog").is_displayed())
    assert "0 … 5 score" in text(d, "scale-hint") and "Shift+1 … 5" in text(d, "scale-hint")

    # An error toast can be read: 8 is outside the scale.
    keys(d, "8")
    wait_for(lambda: d.find_element(By.ID, "toast").is_displayed())
    toast = d.find_element(By.ID, "toast")
    assert "+8 is outside the scale" in toast.text
    fg, bg = toast.value_of_css_property("color"), toast.value_of_css_property("background-color")
    assert contrast(fg, bg) >= 4.5, (fg, bg)

    # The rubric beside the buttons, as text.
    rubric, scale = box(d, "#score-rubric"), box(d, "#scale")
    assert text(d, "score-rubric").split("\n") == ["-5", LOW, "+5", HIGH]
    assert 0 <= rubric["top"] - scale["bottom"] <= 20 and abs(rubric["left"] - scale["left"]) < 2

    # Crisp pixels: off by default, remembered for this rater only.
    assert rendering(d) == "auto"
    d.find_element(By.ID, "crisp-toggle").click()
    wait_for(lambda: rendering(d) == "pixelated")
    d.refresh()
    wait_for(lambda: "/media/sample/" in src(d, "score-img") and rendering(d) == "pixelated")
    assert d.find_element(By.ID, "crisp-toggle").is_selected()
    change_rater(d, "bob")
    wait_for(lambda: rendering(d) == "auto")
    assert not d.find_element(By.ID, "crisp-toggle").is_selected()
    change_rater(d, LONG_NAME)
    wait_for(lambda: rendering(d) == "pixelated")


# Holds every /api/stats answer back until the test calls window.__release().
HOLD_STATS = """
let release;
const held = new Promise((r) => { release = r; });
window.__release = () => release();
const realFetch3 = window.fetch;
window.fetch = async (url, opts) => {
  const resp = await realFetch3(url, opts);
  if (String(url).includes("/api/stats")) await held;
  return resp;
};
"""


def test_stats_page_says_it_is_loading_until_the_numbers_arrive(browser: Any, live: LiveServer, app: Flask,
                                                                 env: Env) -> None:
    d = browser
    emulate(d, 1280, 800, phone=False)
    # The first stats request imports scipy (seconds): done here, so the page's request is the one held.
    assert app.test_client().get("/api/stats").status_code == 200
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HOLD_STATS})
    d.get(live.url + "/stats")
    wait_for(lambda: d.execute_script("return typeof window.__release === 'function'"))
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#round option"))  # /api/rounds answered; stats held
    assert d.find_element(By.ID, "stats-loading").is_displayed()
    assert d.find_element(By.TAG_NAME, "main").get_attribute("aria-busy") == "true"
    for table in ("rater-table", "blind-table", "rounds-table", "cross-table", "spearman-table", "pair-table"):
        rows = d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
        assert [r.text for r in rows] == ["Loading…"], table
    d.execute_script("window.__release()")
    wait_for(lambda: not d.find_element(By.ID, "stats-loading").is_displayed())
    assert d.find_element(By.TAG_NAME, "main").get_attribute("aria-busy") == "false"
    assert not d.find_elements(By.CSS_SELECTOR, "tr.loading-row")
    assert len(d.find_elements(By.CSS_SELECTOR, "#rounds-table tbody tr")) == 4  # env's two rounds and cmp's two
    assert d.find_element(By.ID, "no-raters").is_displayed()
