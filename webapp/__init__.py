"""Browser rating app: scores and pairwise preferences from several raters (see docs/RATING.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter, Map

from poseloop.data.db import DatabaseUrlError

from .active import PairRanker
from .blind import load_key
from .config import AppConfig, ConfigError, config_from_mapping
from .store import INT_MAX, ApiError, Store

__all__ = ["AppConfig", "ConfigError", "create_app"]


class IdConverter(IntegerConverter):
    """`<int:...>` limited to the ids both databases store (PostgreSQL's INTEGER is 32 bits): a larger id is no
    row (404), not an overflow (500)."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:  # noqa: A002 (werkzeug's name)
        kwargs.setdefault("max", INT_MAX)
        super().__init__(map, *args, **kwargs)


def create_app(config_or_overrides: AppConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app from an AppConfig or a mapping of AppConfig field overrides."""
    cfg = config_from_mapping(config_or_overrides).validate()
    app = Flask(__name__)
    # Before any blueprint adds its rules, so every <int:...> route gets the bound.
    app.url_map.converters["int"] = IdConverter
    app.config["POSELOOP"] = cfg
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    app.json.sort_keys = False  # type: ignore[attr-defined]
    try:
        app.extensions["poseloop_store"] = Store.open(cfg.resolved_db_url, "db_url")
    except DatabaseUrlError as e:  # the app's ConfigError is what `python -m webapp` prints as one line
        raise ConfigError(str(e)) from None
    app.extensions["poseloop_blind_key"] = load_key(cfg.samples_dir)
    # Active pair order: reads <models_dir>/reward/latest on demand and caches orders in memory.
    app.extensions["poseloop_pair_ranker"] = PairRanker(cfg.samples_dir, cfg.models_dir, app.logger)

    from . import api, loop, pages, progress, security

    security.install(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(progress.bp)
    loop.install(app, cfg)

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return jsonify(error=exc.message, **exc.details), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response | HTTPException:
        # API clients always get JSON, also for 404/405/413 raised by Flask itself.
        if request.path.startswith(("/api/", "/media/")):
            resp = jsonify(error=f"{exc.name}: {exc.description}")
            resp.status_code = exc.code or 500
            return resp
        return exc

    return app
