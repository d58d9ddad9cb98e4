"""HTML pages and the image routes."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template, send_file

from poseloop.db import Group, Sample

from .shortcuts import SHORTCUTS
from .store import Store

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    """The rating page (score, pairs and grid views)."""
    return render_template("index.html", shortcuts=SHORTCUTS)


@bp.get("/stats")
def stats_page() -> str:
    """Per-rater progress, histograms and agreement."""
    return render_template("stats.html")


def _send_relative(rel: str | None) -> Response:
    """Serve a file named by a database row, only if it lies inside the samples directory."""
    if not rel:
        abort(404)
    root = Path(current_app.config["POSELOOP"].samples_dir).resolve()
    path = (root / rel).resolve()
    # A row is data, not trust: a path like ../../etc/passwd or an absolute path must not escape.
    if not path.is_relative_to(root) or not path.is_file():
        abort(404)
    return send_file(path, max_age=3600, conditional=True)


def _lookup(model: type, ident: int, attr: str) -> str | None:
    st: Store = current_app.extensions["poseloop_store"]
    return st.read(lambda s: getattr(s.get(model, ident), attr, None))


@bp.get("/media/sample/<int:sample_id>")
def sample_image(sample_id: int) -> Response:
    """The generated image of a sample."""
    return _send_relative(_lookup(Sample, sample_id, "image_path"))


@bp.get("/media/condition/<int:group_id>")
def condition_image(group_id: int) -> Response:
    """The pose condition image of a group."""
    return _send_relative(_lookup(Group, group_id, "condition_path"))


@bp.get("/media/source/<int:group_id>")
def source_image(group_id: int) -> Response:
    """The source photo the pose was extracted from, when the group has one."""
    return _send_relative(_lookup(Group, group_id, "source_image_path"))
