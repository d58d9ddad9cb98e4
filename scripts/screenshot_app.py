"""Screenshots of the rating app in headless Chromium, for the README.

    python scripts/screenshot_app.py --samples-dir samples --out docs/images

Starts `python -m webapp` on a free loopback port over an existing samples folder (run generate.py
first), signs in as a rater, and saves the pairs mode and the grid of the newest round as PNGs.
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

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Serve, open, shoot, stop."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples-dir", default="samples", help="samples folder with at least one round")
    p.add_argument("--out", default="docs/images", help="folder for app_pairs.png and app_grid.png")
    args = p.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    if not (Path(args.samples_dir) / "feedback.sqlite").is_file():
        print(f"error: {args.samples_dir}/feedback.sqlite not found; run generate.py first", file=sys.stderr)
        return 2
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "webapp", "--samples-dir", args.samples_dir, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
                        "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,760"):
                opts.add_argument(arg)
            d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
            try:
                d.get(url)
                box = WebDriverWait(d, 30).until(lambda drv: drv.find_element(By.ID, "rater-input"))
                WebDriverWait(d, 30).until(lambda _d: box.is_displayed())
                box.send_keys("ann" + Keys.ENTER)
                for mode, name in (("pairs", "app_pairs.png"), ("grid", "app_grid.png")):
                    d.find_element(By.CSS_SELECTOR, f'button[data-mode="{mode}"]').click()
                    time.sleep(2.0)  # images load
                    d.save_screenshot(str(out / name))
                    print(f"wrote {out / name}")
            finally:
                d.quit()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
