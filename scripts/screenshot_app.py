"""Screenshots of the rating app in headless Chromium, for the README: desktop and phone views.

    python scripts/screenshot_app.py --samples-dir samples --out docs/images [--rubric "LOW | HIGH"]

Starts `python -m webapp` on a free loopback port over an existing samples folder (run generate.py
first), signs in as a rater and saves, for the newest round, the pairs mode and the grid at 1280x800
(app_pairs.png, app_grid.png) and score, pairs and grid modes at a 390x844 phone size (rating_phone.png,
rating_phone_pairs.png, rating_phone_grid.png). `--only NAME ...` writes just those files.
Needs Debian's chromium and chromium-driver (scripts/setup.sh --test installs them).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class View(NamedTuple):
    """One screenshot: file name, mode, CSS viewport and device pixel ratio."""

    name: str
    mode: str
    width: int
    height: int
    scale: float
    mobile: bool


VIEWS = (
    View("app_pairs.png", "pairs", 1280, 800, 1, False),
    View("app_grid.png", "grid", 1280, 800, 1, False),
    # Phones have 2-3 device pixels per CSS pixel; 2 keeps the file small and the text sharp.
    View("rating_phone.png", "score", 390, 844, 2, True),
    View("rating_phone_pairs.png", "pairs", 390, 844, 2, True),
    View("rating_phone_grid.png", "grid", 390, 844, 2, True),
)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shoot(d: Any, url: str, view: View, path: Path) -> None:
    """Open the page at `view`'s size in `view.mode` and save a PNG of the viewport."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": view.width, "height": view.height,
                                                             "deviceScaleFactor": view.scale, "mobile": view.mobile})
    d.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": view.mobile})
    d.get(url)
    WebDriverWait(d, 30).until(lambda drv: drv.execute_script("return document.readyState") == "complete")
    d.find_element(By.CSS_SELECTOR, f'button[data-mode="{view.mode}"]').click()
    WebDriverWait(d, 30).until(lambda drv: drv.find_element(By.ID, f"view-{view.mode}").is_displayed())
    time.sleep(2.0)  # images load
    d.save_screenshot(str(path))
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Serve, open, shoot, stop."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples-dir", default="samples", help="samples folder with at least one round")
    p.add_argument("--out", default="docs/images", help="folder for the PNG files")
    p.add_argument("--only", nargs="+", choices=[v.name for v in VIEWS], help="write only these files")
    p.add_argument("--rubric", default="", help="passed to the app's --rubric, to show one in the pictures")
    args = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    if not (Path(args.samples_dir) / "feedback.sqlite").is_file():
        print(f"error: {args.samples_dir}/feedback.sqlite not found; run generate.py first", file=sys.stderr)
        return 2
    views = [v for v in VIEWS if not args.only or v.name in args.only]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "webapp", "--samples_dir", args.samples_dir, "--port", str(port),
                               "--rubric", args.rubric], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        with tempfile.TemporaryDirectory() as profile:
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,800",
                        "--hide-scrollbars"):
                opts.add_argument(arg)
            d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
            try:
                d.get(url)
                box = WebDriverWait(d, 30).until(lambda drv: drv.find_element(By.ID, "rater-input"))
                WebDriverWait(d, 30).until(lambda _d: box.is_displayed())
                box.send_keys("ann" + Keys.ENTER)
                WebDriverWait(d, 30).until(lambda _d: not box.is_displayed())
                for view in views:
                    shoot(d, url, view, out / view.name)
            finally:
                d.quit()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
