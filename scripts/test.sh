#!/usr/bin/env bash
# Set up with test dependencies, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Two pytest-xdist workers, one per core (tests/conftest.py gives each one torch thread); the slow learning
# checks start first and an idle worker steals queued tests from a busy one. POSELOOP_TEST_WORKERS=0 runs
# everything in this process.
exec .venv/bin/python -m pytest -n "${POSELOOP_TEST_WORKERS:-2}" --dist worksteal "$@"
