"""Serving the app with a multi-threaded WSGI server."""

from __future__ import annotations

from flask import Flask

from .config import AppConfig, ConfigError


def serve(app: Flask, cfg: AppConfig) -> None:
    """Serve `app` until interrupted, with waitress (default) or werkzeug's threaded server."""
    if cfg.server == "waitress":
        try:
            import waitress
        except ImportError:
            raise ConfigError("server: waitress is not installed (pip install waitress==3.0.2) "
                              "or pass --server werkzeug") from None
        # Label submissions are tiny; a short channel timeout frees threads held by idle keep-alives.
        waitress.serve(app, host=cfg.host, port=cfg.port, threads=cfg.threads, channel_timeout=30,
                       connection_limit=200, ident="poseloop")
    else:
        from werkzeug.serving import run_simple

        run_simple(cfg.host, cfg.port, app, threaded=True, use_reloader=False)
