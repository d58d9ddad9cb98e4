"""HTML pages and the image routes."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template, request, send_file

from poseloop.data.db import Group, Sample

from . import blind
from .shortcuts import fmt_score, for_scale, scale_hint
from .store import Store, clean_rater_name

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    """The rating page (score, pairs and grid views)."""
    cfg = current_app.config["POSELOOP"]
    return render_template("index.html", shortcuts=for_scale(cfg.score_min, cfg.score_max),
                           scale_hint=scale_hint(cfg.score_min, cfg.score_max), rubric=cfg.rubric_parts,
                           score_low=fmt_score(cfg.score_min), score_high=fmt_score(cfg.score_max))


@bp.get("/stats")
def stats_page() -> str:
    """Per-rater progress, histograms and agreement."""
    return render_template("stats.html")


# Only generated images, conditions and source photos are ever served; never the database, the blind
# key or any other file that a stray (or hostile) row might name inside the samples directory.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def _database_files() -> set[Path]:
    """The SQLite database of this app and its -wal/-shm/-journal companions (empty for other databases)."""
    from sqlalchemy.engine import make_url

    url = make_url(current_app.config["POSELOOP"].resolved_db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return set()
    db = Path(url.database).resolve()
    return {db, *(db.with_name(db.name + tail) for tail in ("-wal", "-shm", "-journal"))}


def safe_image_path(rel: str | None) -> Path:
    """The image file a database row names, or a 404: it must lie inside the samples directory, be an
    image by extension, and no part of its path may start with '.' (dotfiles such as the blind key)."""
    if not rel or "\x00" in rel:
        abort(404)
    root = Path(current_app.config["POSELOOP"].samples_dir).resolve()
    try:
        path = (root / rel).resolve()
        inside = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):  # a name the file system refuses (too long, bad characters)
        abort(404)
    # A row is data, not trust: a path like ../../etc/passwd or an absolute path must not escape.
    if not inside:
        abort(404)
    # Checked on the resolved path too, so a symlink named x.png cannot lead to a dotfile or the database.
    given = Path(rel.replace("\\", "/"))
    parts = [*(() if given.is_absolute() else given.parts), *path.relative_to(root).parts]
    if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in parts):
        abort(404)
    if path in _database_files():
        abort(404)
    return path


def _send_relative(rel: str | None) -> Response:
    """Serve an image file named by a database row (see safe_image_path)."""
    return send_file(safe_image_path(rel), max_age=3600, conditional=True)


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
    path = safe_image_path(rel)
    mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    resp = Response(strip_png_text(path.read_bytes()), mimetype=mimetype)
    resp.headers["Cache-Control"] = "private, max-age=3600"
    return resp
