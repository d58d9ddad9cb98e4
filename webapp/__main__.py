"""`python -m webapp`: run the rating app (flags: python -m webapp --help)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from poseloop.data.db import shown_db_url

from . import create_app
from .config import ConfigError, parse_args
from .server import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, build the app and serve it; config errors exit with status 2."""
    try:
        cfg = parse_args(argv)
        app = create_app(cfg)
        order = f"; pairs in active order from {cfg.models_dir}/reward/latest" if cfg.pair_order == "active" else ""
        print(f"poseloop rating app on http://{cfg.host}:{cfg.port}/  (database {shown_db_url(cfg.resolved_db_url)}{order})",
              flush=True)
        serve(app, cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
