"""HTML pages and the image routes."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template, request, send_file

from poseloop.db import Group, Sample

from . import blind
from .shortcuts import SHORTCUTS
from .store import Store, clean_rater_name

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


# Ancillary PNG chunks that can carry text (generation parameters, model names) or times.
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_DROP = {b"tEXt", b"iTXt", b"zTXt", b"tIME", b"eXIf"}


def strip_png_text(data: bytes) -> bytes:
    """The PNG without text, time and EXIF chunks; other data unchanged."""
    if not data.startswith(_PNG_SIG):
        return data
    out, pos = [_PNG_SIG], len(_PNG_SIG)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length
        if data[pos + 4:pos + 8] not in _PNG_DROP:
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


@bp.get("/media/blind/<int:comparison_id>/<token>/<what>")
def blind_image(comparison_id: int, token: str, what: str) -> Response:
    """One side (left/right) or the pose of a blind pair, as `rater` sees it.

    Sent without ETag or Last-Modified (a file's time or name hash could tell the rounds apart), and PNG
    text chunks are dropped; the URL names only the comparison, the pair token and the side.
    """
    rater = clean_rater_name(request.args.get("rater"))
    st: Store = current_app.extensions["poseloop_store"]
    key = current_app.extensions["poseloop_blind_key"]
    rel = st.read(lambda s: blind.media_path(s, key, comparison_id, token, what, rater))
    if not rel:
        abort(404)
    root = Path(current_app.config["POSELOOP"].samples_dir).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        abort(404)
    mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    resp = Response(strip_png_text(path.read_bytes()), mimetype=mimetype)
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp
