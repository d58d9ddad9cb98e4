#!/usr/bin/env bash
# Set up with test dependencies, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Two pytest-xdist workers, one per core (tests/conftest.py gives each one torch thread). The learning checks
# (marker `slow`, minutes each) run first in their own invocation, spread over both workers by xdist's load
# scheduling; then everything else, where an idle worker steals queued tests from a busy one.
# POSELOOP_TEST_WORKERS=0 runs everything in this process. Exit status 5 (no test matched) is not a failure:
# `bash scripts/test.sh tests/data` has no learning check to run.
workers="${POSELOOP_TEST_WORKERS:-2}"
status=0
.venv/bin/python -m pytest -n "$workers" --dist load -m slow "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }
.venv/bin/python -m pytest -n "$workers" --dist worksteal -m "not slow" "$@" || { rc=$?; [ "$rc" -eq 5 ] || status=$rc; }
exit "$status"
