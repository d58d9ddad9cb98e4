"""Generate a round of pose-conditioned samples with their denoising trajectories.

    python generate.py                       # embedded tiny model, built-in poses
    python generate.py --preset sd15 --data.prompts_file prompts.txt
    python generate.py --set sample.steps=30 --data.poses standing sitting
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from poseloop.config.generation import PRESETS, GenerateConfig
from poseloop.config.lib import parse_config
from poseloop.cli import user_errors


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so temporaries are removed and transactions rolled back on the way out."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one round, print a one-line summary; 130 after Ctrl-C, 143 after SIGTERM."""
    cfg, _ = parse_config(GenerateConfig, PRESETS, "tiny", argv, description=__doc__, prog="generate.py")
    # A service manager or `timeout` stops us with SIGTERM: unwind like Ctrl-C (atomic writes drop their
    # temporary files, the open transaction rolls back) and say so with a non-zero status.
    in_main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        with user_errors():
            from poseloop.sampling.round import generate  # torch and diffusers: after --help and argument errors

            result = generate(cfg)
    except (KeyboardInterrupt, Terminated) as e:
        how, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        print(f"generate.py: stopped by {how}; the images stored so far are kept, run the same command again to "
              "finish the round", file=sys.stderr)
        return code
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
