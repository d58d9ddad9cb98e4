"""Turning expected user errors into a one-line message and exit status 2 for the scripts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from poseloop.config.lib import ConfigError
from poseloop.data.inputs import InputError


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The expected errors; ModelLoadError once poseloop.models.loading is loaded (only it raises one, and importing it
    here would import torch into every script's start, --help included)."""
    models = sys.modules.get("poseloop.models.loading")
    return (ConfigError, InputError, FileNotFoundError, *((models.ModelLoadError,) if models else ()))


@contextmanager
def user_errors() -> Iterator[None]:
    """Print bad-input errors as 'error: ...' without a traceback and exit with status 2."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, _user_error_types()):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
