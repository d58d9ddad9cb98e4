#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv; idempotent.
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   plus test dependencies, Debian's chromium for browser tests and
#                                  Debian's postgresql for the PostgreSQL tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
  fi
  # Debian's PostgreSQL server: the tests start a throwaway cluster with its initdb / pg_ctl (tests/pg_server.py).
  # Without apt the setup goes on; the PostgreSQL tests then fail, saying what to install.
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql; } ||
      echo "warning: could not install Debian's postgresql package; the PostgreSQL tests will fail until it is" \
           "installed (apt-get install postgresql)" >&2
  fi
  # image-reward 1.5's own code is the reference tests/test_image_reward.py checks poseloop's port against; it
  # cannot be installed beside transformers 5, so only its wheel is fetched (the test unzips it).
  [ -f .test_wheels/image_reward-1.5-py3-none-any.whl ] ||
    .venv/bin/python -m pip download -q image-reward==1.5 --no-deps -d .test_wheels
fi
# torch and torchvision are pinned as a pair that imports cleanly together (see docs/ARCHITECTURE.md).
.venv/bin/python -m pip install -q -e ".${extras}"
