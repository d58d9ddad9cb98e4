#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv; idempotent.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   plus test dependencies, Debian's chromium for browser tests and
#                                  Debian's postgresql for the PostgreSQL tests
# Output: one line per phase. pip runs with -q (its warnings and errors still show); apt's progress goes to a log
# under .venv/ (its errors to the terminal), and a failed apt command prints the log's tail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# apt_install PACKAGE...: Debian packages, quietly; the log is .venv/apt.log.
apt_install() {
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: apt-get install $* (log: .venv/apt.log)"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"; } >.venv/apt.log ||
    { tail -n 20 .venv/apt.log >&2; return 1; }
}
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    apt_install chromium chromium-driver
  fi
  # Debian's PostgreSQL server: the tests start a throwaway cluster with its initdb / pg_ctl (tests/pg_server.py).
  # Without apt the setup goes on; the PostgreSQL tests then fail, saying what to install.
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    apt_install postgresql ||
      echo "warning: could not install Debian's postgresql package; the PostgreSQL tests will fail until it is" \
           "installed (apt-get install postgresql)" >&2
  fi
  # image-reward 1.5's own code is the reference tests/test_image_reward.py checks poseloop's port against; it
  # cannot be installed beside transformers 5, so only its wheel is fetched (the test unzips it).
  [ -f .test_wheels/image_reward-1.5-py3-none-any.whl ] ||
    .venv/bin/python -m pip download -q image-reward==1.5 --no-deps -d .test_wheels
fi
# torch and torchvision are pinned as a pair that imports cleanly together (see docs/ARCHITECTURE.md).
echo "setup: pip install -e .${extras} (the first time several GB: PyTorch and friends)"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: done ($(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "diffusers", v("diffusers"))'))"
