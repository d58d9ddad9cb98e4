"""Flask test-client tests of every route of the rating app and its error answers."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import func, select

from poseloop.data.db import Group, LabelEvent, Preference, Rating, open_db, session_scope
from webapp_fixtures import BOTH_DATABASES, Env, add_round, app, build_comparison, client, env, post_json  # noqa: F401  (fixtures)


def counts(env: Env) -> tuple[int, int, int]:
    """(ratings, preferences, label events) rows in the database."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        out = tuple(s.scalar(select(func.count()).select_from(m)) for m in (Rating, Preference, LabelEvent))
    factory.kw["bind"].dispose()
    return out  # type: ignore[return-value]


def first_group(env: Env) -> list[int]:
    return env.samples[env.groups[env.rounds[0]][0]]


# ---------------------------------------------------------------- pages and media


def test_pages_render_and_list_every_shortcut(client: FlaskClient) -> None:
    from webapp.shortcuts import for_scale

    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    # The help lists the keys of the default scale -5..5: digits 6-9 would only give an error there.
    for _where, keys, what in for_scale(-5, 5):
        assert f"<kbd>{keys}</kbd>" in html
        assert what.replace('"', "&#34;") in html or what in html
    assert "<kbd>0 … 5</kbd>" in html and "<kbd>Shift+1 … Shift+5</kbd>" in html
    assert "0 … 9" not in html and "Shift+9" not in html
    assert "Content-Security-Policy" in page.headers
    assert client.get("/stats").status_code == 200
    assert client.get("/static/app.js").status_code == 200


def test_media_serves_only_database_files(client: FlaskClient, env: Env) -> None:
    sid = first_group(env)[0]
    r = client.get(f"/media/sample/{sid}")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data[:4] == b"\x89PNG"
    gid = env.groups[env.rounds[0]][0]
    assert client.get(f"/media/condition/{gid}").status_code == 200
    assert client.get(f"/media/source/{gid}").status_code == 404  # the group has no source image
    assert client.get("/media/sample/999999").status_code == 404
    assert client.get("/media/sample/../../etc/passwd").status_code == 404
    assert client.get("/media/sample/%2e%2e%2ffeedback.sqlite").status_code == 404


def test_media_refuses_a_row_that_points_outside_the_samples_dir(client: FlaskClient, env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    gid = env.groups[env.rounds[0]][0]
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        s.get(Group, gid).condition_path = "../secret.png"
        s.get(Group, env.groups[env.rounds[0]][1]).condition_path = str(secret)  # absolute path
    factory.kw["bind"].dispose()
    assert client.get(f"/media/condition/{gid}").status_code == 404
    assert client.get(f"/media/condition/{env.groups[env.rounds[0]][1]}").status_code == 404


# ---------------------------------------------------------------- reads


def test_config_and_rounds(client: FlaskClient, env: Env) -> None:
    assert client.get("/api/config").json == {"score_min": -5, "score_max": 5, "token_required": False}
    rounds = client.get("/api/rounds").json["rounds"]
    assert {r["id"] for r in rounds} == set(env.rounds)
    assert all(r["groups"] == 3 and r["samples"] == 12 for r in rounds)


def test_default_round_is_the_newest_finished_one_outside_comparisons(client: FlaskClient, env: Env) -> None:
    newest_finished = max(env.rounds)
    assert client.get("/api/rounds").json["default_round_id"] == newest_finished
    running, _ids = add_round(env, "halfway", "running")
    blind = build_comparison(env)  # two finished rounds, newer still, but to be judged blind first
    data = client.get("/api/rounds").json
    assert [r["id"] for r in data["rounds"]][:3] == [blind.candidate_round_id, blind.baseline_round_id, running]
    assert data["default_round_id"] == newest_finished
    by_id = {r["id"]: r for r in data["rounds"]}
    assert by_id[running]["finished"] is False and by_id[running]["status"] == "running"
    assert by_id[newest_finished]["finished"] is True and by_id[blind.candidate_round_id]["in_comparison"] is True


def test_the_round_list_says_which_rounds_are_the_loops_and_which_evaluations(client: FlaskClient, env: Env) -> None:
    loop, _ids = add_round(env, "round-0002", "complete")
    blind = build_comparison(env)
    by_id = {r["id"]: r for r in client.get("/api/rounds").json["rounds"]}
    assert (by_id[loop]["kind"], by_id[loop]["loop_round"], by_id[loop]["label"]) == ("loop", 2, "loop round 2")
    for side in (blind.baseline_round_id, blind.candidate_round_id):
        assert (by_id[side]["kind"], by_id[side]["loop_round"], by_id[side]["label"]) == ("evaluation", None, "evaluation")
    assert by_id[env.rounds[0]]["kind"] == "named"  # the fixture's 'round0': a --store.round name


def test_default_round_falls_back_when_no_round_is_finished(tmp_path: Path) -> None:
    from webapp import create_app
    from webapp_fixtures import build_samples

    env2 = build_samples(tmp_path, n_rounds=0)
    running, _ids = add_round(env2, "halfway", "running")
    build_comparison(env2)
    application = create_app({"samples_dir": env2.samples_dir, "db_url": env2.db_url})
    data = application.test_client().get("/api/rounds").json
    assert data["default_round_id"] == running  # unfinished beats a round that must be judged blind first
    application.extensions["poseloop_store"].dispose()


def test_items_in_group_then_index_order_with_progress(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    data = client.get(f"/api/rounds/{rid}/items?rater=ann").json
    expected = [sid for gid in env.groups[rid] for sid in env.samples[gid]]
    assert [it["sample_id"] for it in data["items"]] == expected
    assert data["progress"] == {"done": 0, "total": 12}
    assert data["items"][0]["prompt"].startswith("a dancer <b>")  # raw text; the page escapes it
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": expected[0], "score": 2})
    data = client.get(f"/api/rounds/{rid}/items?rater=ann&only_unrated=1").json
    assert data["progress"] == {"done": 1, "total": 12}
    assert expected[0] not in [it["sample_id"] for it in data["items"]] and len(data["items"]) == 11
    assert client.get("/api/rounds/999/items?rater=ann").status_code == 404


def test_progress_route(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    a, b = first_group(env)[:2]
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": a, "score": 1})
    post_json(client, "/api/preferences", {"rater": "ann", "left_id": a, "right_id": b, "choice": "left"})
    data = client.get(f"/api/rounds/{rid}/progress?rater=ann").json
    assert data == {"scores": {"done": 1, "total": 12}, "pairs": {"done": 1, "total": 18}}
    assert client.get(f"/api/rounds/{rid}/progress?rater=nobody").json["scores"]["done"] == 0
    assert client.get("/api/rounds/999/progress").status_code == 404


# ---------------------------------------------------------------- scores


@BOTH_DATABASES
def test_score_is_stored_changed_and_idempotent(client: FlaskClient, env: Env) -> None:
    sid = first_group(env)[0]
    r = post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 4, "request_id": "r1"})
    assert r.status_code == 201 and r.json["duplicate"] is False and r.json["event"]["score"] == 4
    again = post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 4, "request_id": "r1"})
    assert again.status_code == 200 and again.json["duplicate"] is True
    assert again.json["event"]["event_id"] == r.json["event"]["event_id"]
    assert counts(env) == (1, 0, 1)
    changed = post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": -3, "request_id": "r2"})
    assert changed.json["event"]["old_score"] == 4
    assert counts(env) == (1, 0, 2)  # one current score per rater and sample
    reused = post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 1, "request_id": "r1"})
    assert reused.status_code == 409 and "already used" in reused.json["error"]
    items = client.get(f"/api/rounds/{env.rounds[0]}/items?rater=ann").json["items"]
    assert items[0]["score"] == -3


def test_score_errors_say_what_is_wrong_and_change_nothing(client: FlaskClient, env: Env) -> None:
    sid = first_group(env)[0]
    cases = [
        ({"rater": "ann", "sample_id": sid, "score": 6}, 400, "outside the scale -5..5"),
        ({"rater": "ann", "sample_id": sid, "score": -6}, 400, "outside the scale"),
        ({"rater": "ann", "sample_id": sid, "score": 2.5}, 400, "'score' must be an integer"),
        ({"rater": "ann", "sample_id": sid, "score": True}, 400, "'score' must be an integer"),
        ({"rater": "ann", "sample_id": sid}, 400, "'score' must be an integer"),
        ({"rater": "ann", "sample_id": 424242, "score": 1}, 404, "unknown sample 424242"),
        ({"rater": "ann", "sample_id": "x", "score": 1}, 400, "'sample_id' must be an integer"),
        ({"rater": "", "sample_id": sid, "score": 1}, 400, "'rater' is required"),
        ({"rater": "x" * 101, "sample_id": sid, "score": 1}, 400, "at most 100"),
        ({"sample_id": sid, "score": 1}, 400, "'rater' is required"),
        ({"rater": "ann", "sample_id": sid, "score": 1, "request_id": "x" * 65}, 400, "'request_id'"),
    ]
    for body, status, msg in cases:
        r = post_json(client, "/api/scores", body)
        assert r.status_code == status, body
        assert msg in r.json["error"], (body, r.json)
    assert counts(env) == (0, 0, 0)


def test_malformed_json_and_wrong_content_type(client: FlaskClient, env: Env) -> None:
    r = client.post("/api/scores", data="{not json", content_type="application/json")
    assert r.status_code == 400 and "malformed JSON" in r.json["error"]
    r = client.post("/api/scores", data="[1, 2]", content_type="application/json")
    assert r.status_code == 400 and "must be an object" in r.json["error"]
    r = client.post("/api/scores", data="rater=ann&sample_id=1&score=1", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 415 and "application/json" in r.json["error"]
    r = client.post("/api/scores", data=json.dumps({"rater": "a", "sample_id": 1, "score": 1}), content_type="text/plain")
    assert r.status_code == 415
    assert counts(env) == (0, 0, 0)


def test_cross_site_posts_are_refused(client: FlaskClient, env: Env) -> None:
    body = {"rater": "ann", "sample_id": first_group(env)[0], "score": 1}
    r = post_json(client, "/api/scores", body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json["error"]
    r = post_json(client, "/api/scores", body, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert counts(env) == (0, 0, 0)
    ok = post_json(client, "/api/scores", body, headers={"Origin": "http://localhost"})
    assert ok.status_code == 201


def test_unknown_routes_and_methods_answer_json(client: FlaskClient) -> None:
    r = client.get("/api/nope")
    assert r.status_code == 404 and "error" in r.json
    r = client.get("/api/scores")
    assert r.status_code == 405 and "error" in r.json


# ---------------------------------------------------------------- pairs


@BOTH_DATABASES
def test_pairs_cover_groups_and_are_never_repeated(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    seen: set[tuple[int, int]] = set()
    groups_in_order = []
    for _ in range(18):
        data = client.get(f"/api/rounds/{rid}/pairs?rater=ann&count=1").json
        (p,) = data["pairs"]
        assert p["left"]["group_id"] == p["right"]["group_id"] == p["group_id"]
        key = tuple(sorted((p["left"]["sample_id"], p["right"]["sample_id"])))
        assert key not in seen
        seen.add(key)
        groups_in_order.append(p["group_id"])
        r = post_json(client, "/api/preferences", {"rater": "ann", "left_id": p["left"]["sample_id"],
                                                   "right_id": p["right"]["sample_id"], "choice": "left"})
        assert r.status_code == 201
    # Coverage is spread: every group appears once in each run of 3 pairs.
    for k in range(0, 18, 3):
        assert len(set(groups_in_order[k:k + 3])) == 3
    done = client.get(f"/api/rounds/{rid}/pairs?rater=ann").json
    assert done["pairs"] == [] and done["progress"] == {"done": 18, "total": 18}
    # Another rater still gets pairs; count and exclude work.
    other = client.get(f"/api/rounds/{rid}/pairs?rater=bob&count=3").json["pairs"]
    assert len(other) == 3 and len({p["group_id"] for p in other}) == 3
    first = other[0]
    ex = f"{first['left']['sample_id']}-{first['right']['sample_id']}"
    again = client.get(f"/api/rounds/{rid}/pairs?rater=bob&count=10&exclude={ex}").json["pairs"]
    keys = [tuple(sorted((p["left"]["sample_id"], p["right"]["sample_id"]))) for p in again]
    assert len(keys) == 10 and tuple(sorted((first["left"]["sample_id"], first["right"]["sample_id"]))) not in keys
    assert client.get(f"/api/rounds/{rid}/pairs?rater=bob&count=0").status_code == 400
    assert client.get(f"/api/rounds/{rid}/pairs?rater=bob&exclude=zz").status_code == 400
    assert client.get("/api/rounds/999/pairs?rater=bob").status_code == 404


def test_same_pair_shown_on_the_same_side_after_reload(client: FlaskClient, env: Env) -> None:
    url = f"/api/rounds/{env.rounds[0]}/pairs?rater=ann&count=2"
    assert client.get(url).json["pairs"] == client.get(url).json["pairs"]


@BOTH_DATABASES
def test_preference_canonical_order_changes_and_idempotency(client: FlaskClient, env: Env) -> None:
    a, b = first_group(env)[:2]
    r = post_json(client, "/api/preferences", {"rater": "ann", "left_id": b, "right_id": a, "choice": "left",
                                               "request_id": "p1"})
    assert r.status_code == 201
    ev = r.json["event"]
    assert (ev["sample_a_id"], ev["sample_b_id"], ev["choice"], ev["left_sample_id"]) == (a, b, "b", b)
    dup = post_json(client, "/api/preferences", {"rater": "ann", "left_id": b, "right_id": a, "choice": "left",
                                                 "request_id": "p1"})
    assert dup.status_code == 200 and dup.json["duplicate"]
    post_json(client, "/api/preferences", {"rater": "ann", "left_id": a, "right_id": b, "choice": "tie"})
    assert counts(env) == (0, 1, 2)
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        pref = s.scalar(select(Preference))
        assert (pref.sample_a_id, pref.sample_b_id, pref.choice, pref.left_sample_id) == (a, b, "tie", a)
    factory.kw["bind"].dispose()


def test_preference_errors(client: FlaskClient, env: Env) -> None:
    g0, g1 = (env.samples[g] for g in env.groups[env.rounds[0]][:2])
    cases = [
        ({"left_id": g0[0], "right_id": g1[0], "choice": "left"}, 400, "different groups"),
        ({"left_id": g0[0], "right_id": g0[0], "choice": "left"}, 400, "two different samples"),
        ({"left_id": g0[0], "right_id": 99999, "choice": "left"}, 404, "unknown sample 99999"),
        ({"left_id": g0[0], "right_id": g0[1], "choice": "best"}, 400, "'choice' must be one of"),
        ({"left_id": g0[0], "choice": "left"}, 400, "'right_id' must be an integer"),
    ]
    for body, status, msg in cases:
        r = post_json(client, "/api/preferences", {"rater": "ann", **body})
        assert r.status_code == status and msg in r.json["error"], (body, r.json)
    assert counts(env) == (0, 0, 0)


# ---------------------------------------------------------------- undo


@BOTH_DATABASES
def test_undo_restores_previous_values_in_order(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    s1, s2 = first_group(env)[:2]
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": s1, "score": 1})
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": s1, "score": 5})
    post_json(client, "/api/preferences", {"rater": "ann", "left_id": s1, "right_id": s2, "choice": "right"})
    r = post_json(client, "/api/undo", {"rater": "ann", "round_id": rid, "kind": "score", "request_id": "u1"})
    assert r.status_code == 200 and r.json["undone"]["score"] == 5 and r.json["undone"]["old_score"] == 1
    dup = post_json(client, "/api/undo", {"rater": "ann", "round_id": rid, "kind": "score", "request_id": "u1"})
    assert dup.json["duplicate"] and dup.json["undone"]["event_id"] == r.json["undone"]["event_id"]
    items = client.get(f"/api/rounds/{rid}/items?rater=ann").json["items"]
    assert items[0]["score"] == 1  # the repeated undo did not undo a second label
    assert post_json(client, "/api/undo", {"rater": "ann", "round_id": rid}).json["undone"]["kind"] == "preference"
    assert counts(env)[1] == 0
    post_json(client, "/api/undo", {"rater": "ann", "round_id": rid})
    assert counts(env)[0] == 0
    assert post_json(client, "/api/undo", {"rater": "ann", "round_id": rid}).json["undone"] is None
    assert post_json(client, "/api/undo", {"rater": "nobody"}).json["undone"] is None
    assert post_json(client, "/api/undo", {"rater": "ann", "kind": "vote"}).status_code == 400
    assert post_json(client, "/api/undo", {"rater": "ann", "round_id": 999}).status_code == 404


@BOTH_DATABASES
def test_undo_is_per_rater(client: FlaskClient, env: Env) -> None:
    sid = first_group(env)[0]
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 1})
    post_json(client, "/api/scores", {"rater": "bob", "sample_id": sid, "score": 2})
    post_json(client, "/api/undo", {"rater": "ann"})
    items = client.get(f"/api/rounds/{env.rounds[0]}/items?rater=bob").json["items"]
    assert items[0]["score"] == 2


# ---------------------------------------------------------------- stats


@BOTH_DATABASES
def test_stats_histograms_and_agreement(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    sids = [s for g in env.groups[rid] for s in env.samples[g]][:5]
    for i, sid in enumerate(sids):
        post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": i - 2})
        post_json(client, "/api/scores", {"rater": "bob", "sample_id": sid, "score": 2 * i - 4})
        post_json(client, "/api/scores", {"rater": "cy", "sample_id": sid, "score": 2 - i})
    a, b, c = first_group(env)[:3]
    for rater, choices in (("ann", ["left", "right"]), ("bob", ["left", "left"])):
        post_json(client, "/api/preferences", {"rater": rater, "left_id": a, "right_id": b, "choice": choices[0]})
        post_json(client, "/api/preferences", {"rater": rater, "left_id": a, "right_id": c, "choice": choices[1]})
    st = client.get(f"/api/stats?round_id={rid}").json
    by = {r["rater"]: r for r in st["raters"]}
    assert by["ann"]["scored"] == 5 and by["ann"]["score_total"] == 12 and by["ann"]["pairs"] == 2
    assert by["ann"]["pair_total"] == 18
    hist = {h["score"]: h["count"] for h in by["bob"]["histogram"]}
    assert hist[-4] == hist[4] == 1 and hist[1] == 0 and min(hist) == -5 and max(hist) == 5
    rho = {(r["a"], r["b"]): r["spearman"] for r in st["agreement"]["spearman"]}
    # scipy divides a covariance by a product of square roots: +-1 up to a few ulps, BLAS-dependent.
    assert abs(rho[("ann", "bob")] - 1.0) < 1e-12 and abs(rho[("ann", "cy")] + 1.0) < 1e-12
    (pair_row,) = st["agreement"]["pairs"]
    assert pair_row == {"a": "ann", "b": "bob", "shared": 2, "agreement": 0.5}
    assert client.get("/api/stats").status_code == 200
    assert client.get("/api/stats?round_id=x").status_code == 400
    assert client.get("/api/stats?round_id=999").status_code == 404


def test_spearman_ties() -> None:
    from webapp.stats import spearman

    assert abs(spearman([1, 2, 2, 3], [1, 2, 2, 3]) - 1.0) < 1e-12  # type: ignore[operator]
    assert spearman([1, 1], [2, 3]) is None
    assert abs(spearman([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-9


# ---------------------------------------------------------------- export / import


def test_export_scores_json_averages_and_rounds(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    s1, s2, s3 = first_group(env)[:3]
    for rater, vals in (("ann", (1, -2, 3)), ("bob", (2, -3, 3))):
        for sid, v in zip((s1, s2, s3), vals):
            post_json(client, "/api/scores", {"rater": rater, "sample_id": sid, "score": v})
    data = client.get(f"/api/export/scores.json?round_id={rid}").json
    assert data == {env.file_names[s1]: 2, env.file_names[s2]: -3, env.file_names[s3]: 3}  # 1.5->2, -2.5->-3
    only_ann = client.get(f"/api/export/scores.json?round_id={rid}&rater=ann").json
    assert only_ann[env.file_names[s2]] == -2
    assert client.get(f"/api/export/scores.json?round_id={rid}&rater=zed").status_code == 404
    clash = client.get("/api/export/scores.json")  # both rounds use the same file names
    assert clash.status_code == 409 and "round_id" in clash.json["error"]


def test_export_d3po_layout(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    g0 = first_group(env)
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": g0[2], "score": 4})
    post_json(client, "/api/scores", {"rater": "b/o b", "sample_id": g0[0], "score": -1})
    data = client.get(f"/api/export/d3po.json?round_id={rid}").json
    assert data["ann"] == [[None, None, 4, None], [None] * 4, [None] * 4]
    assert data["b/o b"][0] == [-1, None, None, None]
    z = zipfile.ZipFile(io.BytesIO(client.get(f"/api/export/d3po.zip?round_id={rid}").data))
    assert sorted(z.namelist()) == ["ann.json", "b_o_b.json"]
    assert json.loads(z.read("ann.json")) == data["ann"]


@BOTH_DATABASES
def test_export_jsonl_current_and_history(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    a, b = first_group(env)[:2]
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": a, "score": 3})
    post_json(client, "/api/scores", {"rater": "ann", "sample_id": a, "score": 4})
    post_json(client, "/api/preferences", {"rater": "ann", "left_id": b, "right_id": a, "choice": "right"})
    lines = [json.loads(x) for x in client.get(f"/api/export/labels.jsonl?round_id={rid}").data.splitlines()]
    assert [x["type"] for x in lines] == ["score", "preference"]
    assert lines[0]["score"] == 4 and lines[0]["sample_id"] == a and lines[0]["rater"] == "ann" and lines[0]["time"]
    assert lines[1]["winner_id"] == a and lines[1]["left_sample_id"] == b
    hist = [json.loads(x) for x in client.get(f"/api/export/labels.jsonl?round_id={rid}&history=1").data.splitlines()]
    assert [h["score"] for h in hist[:2]] == [3, 4] and hist[2]["kind"] == "preference"
    other = client.get(f"/api/export/labels.jsonl?round_id={env.rounds[1]}").data
    assert other == b""


@BOTH_DATABASES
def test_import_scores_roundtrip(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    g0 = first_group(env)
    payload = {env.file_names[g0[0]]: 5, env.file_names[g0[1]]: -5}
    r = post_json(client, "/api/import/scores", {"rater": "almostperfect", "round_id": rid, "scores": payload})
    assert r.status_code == 201 and r.json == {"rater": "almostperfect", "created": 2, "updated": 0, "unchanged": 0}
    exported = client.get(f"/api/export/scores.json?round_id={rid}&rater=almostperfect").json
    assert exported == payload
    r = post_json(client, "/api/import/scores", {"rater": "almostperfect", "round_id": rid,
                                                 "scores": {**payload, env.file_names[g0[0]]: 1}})
    assert r.json["updated"] == 1 and r.json["unchanged"] == 1


@BOTH_DATABASES
def test_import_scores_reports_problems_and_writes_nothing(client: FlaskClient, env: Env) -> None:
    rid = env.rounds[0]
    good = env.file_names[first_group(env)[0]]
    r = post_json(client, "/api/import/scores", {"rater": "ap", "round_id": rid,
                                                 "scores": {good: 1, "missing.png": 2, env.file_names[first_group(env)[1]]: 9}})
    assert r.status_code == 400
    assert "nothing imported" in r.json["error"] and "missing.png" in r.json["error"]
    assert r.json["unknown"] == ["missing.png"] and len(r.json["invalid_scores"]) == 1
    amb = post_json(client, "/api/import/scores", {"rater": "ap", "scores": {good: 1}})  # two rounds share names
    assert amb.status_code == 400 and amb.json["ambiguous"] == [good]
    bad = post_json(client, "/api/import/scores", {"rater": "ap", "scores": [1, 2]})
    assert bad.status_code == 400 and "JSON object" in bad.json["error"]
    assert post_json(client, "/api/import/scores", {"scores": {good: 1}}).status_code == 400
    assert counts(env) == (0, 0, 0)
    assert client.get("/api/stats").json["raters"] == []
