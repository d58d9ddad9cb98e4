"""JSON API: everything the page does, usable from scripts (see docs/RATING.md)."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from . import blind, exchange, labels, queries, stats, store
from .config import PAIR_ORDERS, AppConfig
from .store import ApiError, Store

bp = Blueprint("api", __name__, url_prefix="/api")


def _store() -> Store:
    return current_app.extensions["poseloop_store"]


def _cfg() -> AppConfig:
    return current_app.config["POSELOOP"]


def _score_range() -> tuple[int, int]:
    cfg = _cfg()
    return cfg.score_min, cfg.score_max


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (send numbers as finite decimals)")


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 saying what is wrong with it."""
    raw = request.get_data(cache=True)
    try:
        # Python's parser accepts NaN and Infinity, which are not JSON and no field can use.
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply (no field needs more than a few levels)") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    return data


def arg_int(name: str, required: bool = False) -> int | None:
    """An integer query parameter (the 32-bit range both databases store), or a 400 naming it."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        if required:
            raise ApiError(400, f"query parameter '{name}' is required")
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter '{name}' must be an integer, got {raw[:40]!r}") from None
    if not store.INT_MIN <= value <= store.INT_MAX:
        raise ApiError(400, f"query parameter '{name}' must be an integer between {store.INT_RANGE}")
    return value


def arg_flag(name: str) -> bool:
    """A boolean query parameter (1/true/yes)."""
    return request.args.get(name, "").lower() in ("1", "true", "yes", "on")


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> tuple[Response, int]:
    return jsonify(error=exc.message, **exc.details), exc.status


@bp.get("/config")
def get_config() -> Response:
    """Scale and app settings the page needs."""
    cfg = _cfg()
    return jsonify(score_min=cfg.score_min, score_max=cfg.score_max, token_required=bool(cfg.token))


@bp.get("/rounds")
def get_rounds() -> Response:
    """Every round with group and sample counts, and the one the page opens first (default_round_id)."""
    rounds = _store().read(queries.list_rounds)
    return jsonify(rounds=rounds, default_round_id=queries.default_round_id(rounds))


@bp.get("/rounds/<int:round_id>/items")
def get_items(round_id: int) -> Response:
    """Samples of a round in rating order with the rater's scores and progress."""
    rater, only_unrated = request.args.get("rater"), arg_flag("only_unrated")
    return jsonify(_store().read(lambda s: queries.list_items(s, round_id, rater, only_unrated)))


@bp.get("/rounds/<int:round_id>/pairs")
def get_pairs(round_id: int) -> Response:
    """The next pairs this rater has not judged (count=1..10; exclude=a-b,c-d to skip pending ones;
    order=coverage|active overrides --pair_order for this request)."""
    rater = request.args.get("rater")
    order = request.args.get("order") or _cfg().pair_order
    if order not in PAIR_ORDERS:
        raise ApiError(400, f"query parameter 'order' must be one of {', '.join(PAIR_ORDERS)}, got {order[:40]!r}")
    count = arg_int("count")
    count = 1 if count is None else count
    if not 1 <= count <= 10:
        raise ApiError(400, "query parameter 'count' must be in 1..10")
    exclude = []
    for part in filter(None, request.args.get("exclude", "").split(",")):
        try:
            a, b = sorted(int(x) for x in part.split("-"))
        except ValueError:
            raise ApiError(400, f"'exclude' entries look like 12-15, got {part[:40]!r}") from None
        exclude.append((a, b))
    active = current_app.extensions["poseloop_pair_ranker"].order if order == "active" else None
    return jsonify(_store().read(lambda s: queries.next_pairs(s, round_id, rater, count, exclude, active)))


@bp.get("/rounds/<int:round_id>/progress")
def get_progress(round_id: int) -> Response:
    """Score and pair progress of one rater in a round."""
    name = request.args.get("rater")

    def fn(s: Any) -> dict[str, Any]:
        store.get_round(s, round_id)
        rater = store.find_rater(s, name)
        rid = rater.id if rater else None
        return {"scores": queries.score_progress(s, rid, round_id), "pairs": queries.pair_progress(s, rid, round_id)}

    return jsonify(_store().read(fn))


@bp.post("/scores")
def post_score() -> tuple[Response, int]:
    """Store a score: {rater, sample_id, score, request_id?}."""
    body = json_body()
    rater = store.clean_rater_name(body.get("rater"))
    sample_id = store.clean_int(body.get("sample_id"), "sample_id")
    score = store.clean_int(body.get("score"), "score")
    request_id = store.clean_request_id(body.get("request_id"))
    result = _store().write(
        lambda s: labels.submit_score(s, rater, sample_id, score, request_id, _score_range(),
                                     cache=_store().cache)
    )
    return jsonify(result), 200 if result["duplicate"] else 201


@bp.post("/preferences")
def post_preference() -> tuple[Response, int]:
    """Store a preference: {rater, left_id, right_id, choice: left|right|tie|skip, request_id?}."""
    body = json_body()
    rater = store.clean_rater_name(body.get("rater"))
    left_id = store.clean_int(body.get("left_id"), "left_id")
    right_id = store.clean_int(body.get("right_id"), "right_id")
    choice = body.get("choice")
    request_id = store.clean_request_id(body.get("request_id"))
    result = _store().write(
        lambda s: labels.submit_preference(s, rater, left_id, right_id, str(choice), request_id)
    )
    return jsonify(result), 200 if result["duplicate"] else 201


@bp.post("/undo")
def post_undo() -> Response:
    """Revert the rater's latest label: {rater, round_id?, kind?: score|preference, request_id?}."""
    body = json_body()
    rater = store.clean_rater_name(body.get("rater"))
    round_id = None if body.get("round_id") is None else store.clean_int(body.get("round_id"), "round_id")
    kind = body.get("kind")
    request_id = store.clean_request_id(body.get("request_id"))
    return jsonify(_store().write(lambda s: labels.undo_last(s, rater, round_id, kind, request_id)))


@bp.get("/stats")
def get_stats() -> Response:
    """Per-rater progress, histograms and agreement (round_id optional)."""
    round_id = arg_int("round_id")
    return jsonify(_store().read(lambda s: stats.round_stats(s, round_id, _score_range())))


@bp.get("/export/scores.json")
def export_scores() -> Response:
    """AlmostPerfect scores.json (round_id, rater optional)."""
    round_id, rater = arg_int("round_id"), request.args.get("rater")
    data = _store().read(lambda s: exchange.export_scores_json(s, round_id, rater))
    resp = current_app.response_class(json.dumps(data, indent=1, sort_keys=True), mimetype="application/json")
    resp.headers["Content-Disposition"] = "attachment; filename=scores.json"
    return resp


@bp.get("/export/d3po.json")
def export_d3po_json() -> Response:
    """D3PO per-rater lists as one JSON object {rater: [[score|null, ...] per group]}."""
    round_id = arg_int("round_id")
    return jsonify(_store().read(lambda s: exchange.export_d3po(s, round_id)))


@bp.get("/export/d3po.zip")
def export_d3po_zip() -> Response:
    """D3PO layout: a zip with one <rater>.json per rater."""
    round_id = arg_int("round_id")
    data = exchange.d3po_zip(_store().read(lambda s: exchange.export_d3po(s, round_id)))
    resp = current_app.response_class(data, mimetype="application/zip")
    resp.headers["Content-Disposition"] = "attachment; filename=d3po_feedback.zip"
    return resp


@bp.get("/export/labels.jsonl")
def export_jsonl() -> Response:
    """Every current label (history=1: every label event) as JSON lines."""
    round_id, history = arg_int("round_id"), arg_flag("history")
    lines = _store().read(lambda s: list(exchange.export_jsonl(s, round_id, history)))
    resp = current_app.response_class("".join(lines), mimetype="application/x-ndjson")
    resp.headers["Content-Disposition"] = "attachment; filename=labels.jsonl"
    return resp


@bp.post("/import/scores")
def import_scores() -> tuple[Response, int]:
    """Import an AlmostPerfect scores.json as a named rater: {rater, scores: {...}, round_id?}."""
    body = json_body()
    round_id = None if body.get("round_id") is None else store.clean_int(body.get("round_id"), "round_id")
    scores = body.get("scores")
    result = _store().write(
        lambda s: exchange.import_scores_json(s, scores, body.get("rater"), round_id, _score_range())
    )
    return jsonify(result), 201


# ---------------------------------------------------------------- blind comparisons


def _blind_key() -> bytes:
    return current_app.extensions["poseloop_blind_key"]


@bp.get("/comparisons")
def get_comparisons() -> Response:
    """Every blind comparison: {id, name, pairs, created_at}; nothing about the rounds behind it."""
    return jsonify(comparisons=_store().read(blind.list_comparisons))


@bp.get("/comparisons/<int:comparison_id>/pairs")
def get_blind_pairs(comparison_id: int) -> Response:
    """The next pairs this rater has not judged (count=1..10; exclude=3-1,0-2 leaves out pending ones)."""
    rater = store.clean_rater_name(request.args.get("rater"))
    count = arg_int("count")
    count = 1 if count is None else count
    if not 1 <= count <= 10:
        raise ApiError(400, "query parameter 'count' must be in 1..10")
    exclude = {blind.clean_token(t) for t in filter(None, request.args.get("exclude", "").split(","))}
    return jsonify(_store().read(lambda s: blind.next_pairs(s, comparison_id, rater, count, exclude)))


@bp.post("/comparisons/<int:comparison_id>/judgements")
def post_judgement(comparison_id: int) -> tuple[Response, int]:
    """Record a blind verdict: {rater, pair, choice: left|right|tie|skip, request_id?}."""
    body = json_body()
    rater = store.clean_rater_name(body.get("rater"))
    request_id = store.clean_request_id(body.get("request_id"))
    token, choice = body.get("pair"), body.get("choice")
    result = _store().write(
        lambda s: blind.submit(s, _blind_key(), comparison_id, rater, token, choice, request_id)
    )
    return jsonify(result), 200 if result["duplicate"] else 201


@bp.post("/comparisons/<int:comparison_id>/undo")
def post_blind_undo(comparison_id: int) -> Response:
    """Take back the rater's verdict on `pair` (or the latest one): {rater, pair?, request_id?}."""
    body = json_body()
    rater = store.clean_rater_name(body.get("rater"))
    store.clean_request_id(body.get("request_id"))
    return jsonify(_store().write(lambda s: blind.undo(s, comparison_id, rater, body.get("pair"))))


@bp.get("/comparisons/<int:comparison_id>/results")
def get_comparison_results(comparison_id: int) -> Response:
    """Verdict counts per rater and in total, with both rounds named (for after judging, not the blind page)."""
    return jsonify(_store().read(lambda s: blind.results(s, comparison_id)))
