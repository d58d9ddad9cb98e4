"""Turning expected user errors into a one-line message and exit status 2 for the scripts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from poseloop.configlib import ConfigError
from poseloop.inputs import InputError
from poseloop.models import ModelLoadError


@contextmanager
def user_errors() -> Iterator[None]:
    """Print bad-input errors as 'error: ...' without a traceback and exit with status 2."""
    try:
        yield
    except (ConfigError, InputError, ModelLoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
