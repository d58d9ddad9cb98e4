"""Blind comparisons (Flask test client): pairs, hidden identity, verdicts, undo, results and the stats additions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select

from poseloop.data.db import BlindJudgement, Preference, Rater, open_db, session_scope
from webapp_fixtures import BOTH_DATABASES, Blind, Env, app, client, cmp, env, post_json  # noqa: F401  (pytest fixtures)


def judgements(env: Env) -> list[tuple[str, int, int, bool, str]]:
    """(rater, baseline sample, candidate sample, left_is_candidate, outcome) of every blind verdict."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        rows = [tuple(r) for r in s.execute(
            select(Rater.name, BlindJudgement.baseline_sample_id, BlindJudgement.candidate_sample_id,
                   BlindJudgement.left_is_candidate, BlindJudgement.outcome)
            .join(Rater, BlindJudgement.rater_id == Rater.id).order_by(BlindJudgement.id))]
    factory.kw["bind"].dispose()
    return rows  # type: ignore[return-value]


def assert_hidden(text: str, blind: Blind) -> None:
    """No round name, policy, sample or group id or file name of the comparison in `text`."""
    for secret in blind.secrets():
        assert secret not in text, f"{secret!r} leaked in {text[:300]!r}"


def candidate_side(client: FlaskClient, blind: Blind, pair: dict[str, Any]) -> str:
    """Which side ("left"/"right") shows the candidate, found by comparing the served bytes with the files."""
    base_id, cand_id = blind.pairs[pair["pair"]]
    left = client.get(pair["left_url"]).data
    right = client.get(pair["right_url"]).data
    cand, base = blind.files[cand_id].read_bytes(), blind.files[base_id].read_bytes()
    assert {left, right} == {cand, base}
    return "left" if left == cand else "right"


def url(blind: Blind, tail: str) -> str:
    return f"/api/comparisons/{blind.comparison_id}/{tail}"


def all_pairs(client: FlaskClient, blind: Blind, rater: str) -> list[dict[str, Any]]:
    return client.get(url(blind, f"pairs?rater={rater}&count=10")).json["pairs"]


def judge(client: FlaskClient, blind: Blind, rater: str, pair: str, choice: str, **kw: Any) -> Any:
    return post_json(client, url(blind, "judgements"), {"rater": rater, "pair": pair, "choice": choice, **kw})


# ---------------------------------------------------------------- listing and pairs


def test_comparison_listing_names_no_rounds(client: FlaskClient, cmp: Blind) -> None:
    r = client.get("/api/comparisons")
    assert r.status_code == 200
    (c,) = r.json["comparisons"]
    assert set(c) == {"id", "name", "pairs", "created_at"}
    assert (c["id"], c["name"], c["pairs"]) == (cmp.comparison_id, "eval-0001", 6)  # the extra candidate group is no pair
    assert_hidden(r.get_data(as_text=True), cmp)


@BOTH_DATABASES
def test_every_pair_once_per_rater_and_nothing_identifies_a_side(client: FlaskClient, cmp: Blind, env: Env) -> None:
    seen = []
    while True:
        r = client.get(url(cmp, "pairs?rater=ann&count=1"))
        assert r.status_code == 200
        assert_hidden(r.get_data(as_text=True), cmp)
        data = r.json
        assert data["progress"] == {"done": len(seen), "total": 6}
        if not data["pairs"]:
            break
        (p,) = data["pairs"]
        assert set(p) == {"pair", "prompt", "pose_url", "left_url", "right_url"}
        assert p["pair"] not in seen
        seen.append(p["pair"])
        assert p["prompt"] == ["a skater mid-jump", "a yogi in tree pose"][int(p["pair"].split("-")[0])]
        for key in ("left_url", "right_url", "pose_url"):
            img = client.get(p[key])
            assert img.status_code == 200 and img.mimetype == "image/png"
            assert "ETag" not in img.headers and "Last-Modified" not in img.headers
            assert_hidden(str(img.headers), cmp)
        g = int(p["pair"].split("-")[0])
        assert client.get(p["pose_url"]).data == (env.samples_dir / f"baselineRoundQ7/poses/p{g}.png").read_bytes()
        candidate_side(client, cmp, p)  # the two images are the pair's baseline and candidate
        w = judge(client, cmp, "ann", p["pair"], "tie")
        assert w.status_code == 201
        assert_hidden(w.get_data(as_text=True), cmp)
        assert "candidate" not in w.get_data(as_text=True) and "baseline" not in w.get_data(as_text=True)
    assert sorted(seen) == sorted(cmp.pairs)
    # Another rater still gets every pair; exclude leaves out the ones the page already holds.
    bob = all_pairs(client, cmp, "bob")
    assert len(bob) == 6
    ex = ",".join(p["pair"] for p in bob[:2])
    rest = client.get(url(cmp, f"pairs?rater=bob&count=10&exclude={ex}")).json["pairs"]
    assert [p["pair"] for p in rest] == [p["pair"] for p in bob[2:]]


def test_side_is_stable_per_rater_and_pair_and_varies_between_them(client: FlaskClient, cmp: Blind, env: Env) -> None:
    first = all_pairs(client, cmp, "ann")
    assert all_pairs(client, cmp, "ann") == first  # a reload shows the same pairs in the same order
    sides = {p["pair"]: candidate_side(client, cmp, p) for p in first}
    # A restarted app (same samples dir, so the same secret key) shows the same sides.
    from webapp import create_app

    app2 = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url})
    try:
        c2 = app2.test_client()
        assert {p["pair"]: candidate_side(c2, cmp, p) for p in all_pairs(c2, cmp, "ann")} == sides
    finally:
        app2.extensions["poseloop_store"].dispose()
    everyone = [candidate_side(client, cmp, p) for r in ("ann", "bob", "cy", "dee") for p in all_pairs(client, cmp, r)]
    # 24 coin flips under a fresh random key: both sides are used. A balance bound such as 6..18 fails
    # for 0.7% of keys (CI hit one with 20); all 24 on one side happens for 2 in 2**24 keys.
    assert 0 < everyone.count("left") < 24
    key = (env.samples_dir / ".poseloop_blind_key").stat()
    assert key.st_mode & 0o077 == 0  # the key that decides sides is readable by the server's user only


# ---------------------------------------------------------------- verdicts


@BOTH_DATABASES
def test_left_and_right_are_stored_as_candidate_or_baseline(client: FlaskClient, cmp: Blind, env: Env) -> None:
    # Find a rater who is shown the candidate on the left in one pair and on the right in another.
    for rater in [f"rater{i}" for i in range(12)]:
        pairs = all_pairs(client, cmp, rater)
        sides = [candidate_side(client, cmp, p) for p in pairs]
        if "left" in sides and "right" in sides:
            break
    cand_left = pairs[sides.index("left")]
    cand_right = pairs[sides.index("right")]
    others = [p for p in pairs if p not in (cand_left, cand_right)]
    assert judge(client, cmp, rater, cand_left["pair"], "left").status_code == 201
    assert judge(client, cmp, rater, cand_right["pair"], "left").status_code == 201
    judge(client, cmp, rater, others[0]["pair"], "right")
    judge(client, cmp, rater, others[1]["pair"], "tie")
    judge(client, cmp, rater, others[2]["pair"], "skip")
    rows = {base: (cand, left_is_cand, outcome) for _r, base, cand, left_is_cand, outcome in judgements(env)}
    assert rows[cmp.pairs[cand_left["pair"]][0]] == (cmp.pairs[cand_left["pair"]][1], True, "candidate")
    assert rows[cmp.pairs[cand_right["pair"]][0]] == (cmp.pairs[cand_right["pair"]][1], False, "baseline")
    right_is_cand = sides[pairs.index(others[0])] == "right"
    assert rows[cmp.pairs[others[0]["pair"]][0]][1:] == (not right_is_cand, "candidate" if right_is_cand else "baseline")
    assert rows[cmp.pairs[others[1]["pair"]][0]][2] == "tie"
    assert rows[cmp.pairs[others[2]["pair"]][0]][2] == "skip"
    assert client.get(url(cmp, f"pairs?rater={rater}")).json["progress"] == {"done": 5, "total": 6}


@BOTH_DATABASES
def test_judgement_retries_and_conflicts(client: FlaskClient, cmp: Blind, env: Env) -> None:
    p = all_pairs(client, cmp, "ann")[0]["pair"]
    r = judge(client, cmp, "ann", p, "left", request_id="j1")
    assert r.status_code == 201 and r.json["duplicate"] is False and r.json["judgement"]["choice"] == "left"
    again = judge(client, cmp, "ann", p, "left", request_id="j1")
    assert again.status_code == 200 and again.json["duplicate"] is True
    assert judge(client, cmp, "ann", p, "right", request_id="j1").status_code == 409  # id reused for another label
    assert judge(client, cmp, "ann", p, "left").status_code == 200  # the same verdict again: recognised
    changed = judge(client, cmp, "ann", p, "tie", request_id="j2")
    assert changed.status_code == 409 and "undo it first" in changed.json["error"]
    assert len(judgements(env)) == 1


def test_judgement_and_pair_errors_change_nothing(client: FlaskClient, cmp: Blind, env: Env) -> None:
    p = all_pairs(client, cmp, "ann")[0]["pair"]
    cases = [
        (url(cmp, "judgements"), {"rater": "ann", "pair": p, "choice": "best"}, 400, "'choice' must be one of"),
        (url(cmp, "judgements"), {"rater": "ann", "pair": p}, 400, "'choice' must be one of"),
        (url(cmp, "judgements"), {"rater": "ann", "pair": "9-9", "choice": "left"}, 404, "unknown pair '9-9'"),
        (url(cmp, "judgements"), {"rater": "ann", "pair": "2-0", "choice": "left"}, 404, "unknown pair"),  # candidate only
        (url(cmp, "judgements"), {"rater": "ann", "pair": 3, "choice": "left"}, 400, "'pair' must be a pair token"),
        (url(cmp, "judgements"), {"rater": "ann", "pair": "../x", "choice": "left"}, 400, "'pair' must be"),
        (url(cmp, "judgements"), {"pair": p, "choice": "left"}, 400, "'rater' is required"),
        (url(cmp, "judgements"), {"rater": "ann", "pair": p, "choice": "left", "request_id": ""}, 400, "'request_id'"),
        ("/api/comparisons/999/judgements", {"rater": "ann", "pair": p, "choice": "left"}, 404, "unknown comparison 999"),
        (url(cmp, "undo"), {"rater": "ann", "pair": "x"}, 400, "'pair' must be"),
        (url(cmp, "undo"), {"pair": p}, 400, "'rater' is required"),
        ("/api/comparisons/999/undo", {"rater": "ann"}, 404, "unknown comparison 999"),
    ]
    for path, body, status, msg in cases:
        r = post_json(client, path, body)
        assert r.status_code == status and msg in r.json["error"], (body, r.json)
    jpath = url(cmp, "judgements")
    r = client.post(jpath, data="{oops", content_type="application/json")
    assert r.status_code == 400 and "malformed JSON" in r.json["error"]
    r = client.post(jpath, data="[]", content_type="application/json")
    assert r.status_code == 400 and "must be an object" in r.json["error"]
    body = json.dumps({"rater": "ann", "pair": p, "choice": "left"})
    assert client.post(jpath, data=body, content_type="text/plain").status_code == 415
    r = client.post(jpath, data=body, content_type="application/json", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json["error"]
    assert client.post(jpath, data=body, content_type="application/json",
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert judgements(env) == []
    gets = [
        (url(cmp, "pairs?rater=ann&count=0"), 400), (url(cmp, "pairs?rater=ann&count=11"), 400),
        (url(cmp, "pairs?rater=ann&count=x"), 400), (url(cmp, "pairs"), 400),
        (url(cmp, "pairs?rater=ann&exclude=a-b"), 400), ("/api/comparisons/999/pairs?rater=ann", 404),
        ("/api/comparisons/999/results", 404),
        (f"/media/blind/{cmp.comparison_id}/{p}/left", 400),  # the side depends on the rater
        (f"/media/blind/{cmp.comparison_id}/{p}/middle?rater=ann", 404),
        (f"/media/blind/{cmp.comparison_id}/9-9/left?rater=ann", 404),
        (f"/media/blind/{cmp.comparison_id}/nope/left?rater=ann", 400),
        (f"/media/blind/999/{p}/left?rater=ann", 404),
        (url(cmp, "judgements"), 405),
    ]
    for path, status in gets:
        r = client.get(path)
        assert r.status_code == status and "error" in r.json, (path, r.status_code)
        assert_hidden(r.get_data(as_text=True), cmp)


@BOTH_DATABASES
def test_undo_brings_the_pair_back(client: FlaskClient, cmp: Blind, env: Env) -> None:
    pairs = all_pairs(client, cmp, "ann")
    for p, choice in zip(pairs[:3], ("left", "right", "tie")):
        judge(client, cmp, "ann", p["pair"], choice)
    judge(client, cmp, "bob", pairs[0]["pair"], "skip")
    r = post_json(client, url(cmp, "undo"), {"rater": "ann", "pair": pairs[1]["pair"], "request_id": "u1"})
    assert r.status_code == 200
    assert r.json["undone"] == {"pair": pairs[1], "choice": "right"} and r.json["progress"] == {"done": 2, "total": 6}
    assert_hidden(r.get_data(as_text=True), cmp)
    repeat = post_json(client, url(cmp, "undo"), {"rater": "ann", "pair": pairs[1]["pair"], "request_id": "u1"})
    assert repeat.json["undone"] is None  # a retried undo of a named pair removes nothing else
    assert pairs[1]["pair"] in [p["pair"] for p in all_pairs(client, cmp, "ann")]
    latest = post_json(client, url(cmp, "undo"), {"rater": "ann"}).json  # without a pair: the latest verdict
    assert latest["undone"] == {"pair": pairs[2], "choice": "tie"}
    assert [(r, o) for r, *_x, o in judgements(env)] == [("ann", "candidate" if candidate_side(
        client, cmp, pairs[0]) == "left" else "baseline"), ("bob", "skip")]
    assert post_json(client, url(cmp, "undo"), {"rater": "nobody"}).json["undone"] is None
    assert post_json(client, url(cmp, "undo"), {"rater": "ann", "pair": "9-9"}).status_code == 404


# ---------------------------------------------------------------- results and stats


def give(client: FlaskClient, cmp: Blind, rater: str, outcomes: list[str]) -> None:
    """Judge the first pairs of `rater` so that the stored outcomes are `outcomes`."""
    for p, outcome in zip(all_pairs(client, cmp, rater), outcomes):
        side = candidate_side(client, cmp, p)
        other = "right" if side == "left" else "left"
        choice = {"candidate": side, "baseline": other}.get(outcome, outcome)
        assert judge(client, cmp, rater, p["pair"], choice).status_code == 201


@BOTH_DATABASES
def test_results_per_rater_and_total(client: FlaskClient, cmp: Blind) -> None:
    give(client, cmp, "ann", ["candidate", "candidate", "baseline", "tie", "skip"])
    give(client, cmp, "Bob", ["baseline"])
    res = client.get(url(cmp, "results")).json
    assert res["baseline"]["name"] == "baselineRoundQ7" and res["baseline"]["policy_version"] is None
    assert res["candidate"]["name"] == "candidateRoundZ9" and res["candidate"]["policy_version"] == "policyVersionX3"
    assert res["pairs"] == 6 and res["name"] == "eval-0001"
    assert res["raters"] == [
        {"rater": "ann", "candidate_wins": 2, "baseline_wins": 1, "ties": 1, "skips": 1, "n": 4, "candidate_win_rate": 0.625},
        {"rater": "Bob", "candidate_wins": 0, "baseline_wins": 1, "ties": 0, "skips": 0, "n": 1, "candidate_win_rate": 0.0},
    ]
    assert res["total"] == {"candidate_wins": 2, "baseline_wins": 2, "ties": 1, "skips": 1, "n": 5,
                            "candidate_win_rate": 0.5}


def test_stats_rounds_cross_round_and_comparisons(client: FlaskClient, cmp: Blind, env: Env) -> None:
    r0, r1 = env.rounds
    s0 = [s for g in env.groups[r0] for s in env.samples[g]]
    s1 = [s for g in env.groups[r1] for s in env.samples[g]]
    cand = [c for _b, c in cmp.pairs.values()]
    # ann: 2, 4 on round0 and 0, 2 on the candidate: mean 2, sd sqrt(2) -> z 0, +1.414, -1.414, 0.
    # bob: 1, 1 on round0 and 1 on the candidate: sd 0 -> z 0.
    for rater, sid, score in (("ann", s0[0], 2), ("ann", s0[1], 4), ("ann", cand[0], 0), ("ann", cand[1], 2),
                              ("bob", s0[0], 1), ("bob", s0[2], 1), ("bob", cand[0], 1)):
        assert post_json(client, "/api/scores", {"rater": rater, "sample_id": sid, "score": score}).status_code == 201
    give(client, cmp, "ann", ["candidate", "candidate", "baseline", "tie", "skip"])
    # Preferences across rounds (not made by the page, which pairs within a group): round1 is newer.
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        ann = s.scalar(select(Rater.id).where(Rater.name == "ann"))
        s.add_all([Preference(rater_id=ann, sample_a_id=s0[0], sample_b_id=s1[0], choice="b"),
                   Preference(rater_id=ann, sample_a_id=s0[1], sample_b_id=s1[1], choice="tie"),
                   Preference(rater_id=ann, sample_a_id=s0[2], sample_b_id=s1[2], choice="skip")])
    factory.kw["bind"].dispose()
    st = client.get("/api/stats").json
    rounds = [{k: r[k] for k in ("name", "policy_version", "n_scores", "n_raters", "mean_score", "mean_z")}
              for r in st["rounds"]]
    assert rounds == [
        {"name": "round0", "policy_version": None, "n_scores": 4, "n_raters": 2, "mean_score": 2.0, "mean_z": 0.3536},
        {"name": "round1", "policy_version": None, "n_scores": 0, "n_raters": 0, "mean_score": None, "mean_z": None},
        {"name": "baselineRoundQ7", "policy_version": None, "n_scores": 0, "n_raters": 0, "mean_score": None,
         "mean_z": None},
        {"name": "candidateRoundZ9", "policy_version": "policyVersionX3", "n_scores": 3, "n_raters": 2,
         "mean_score": 1.0, "mean_z": -0.4714},
    ]
    assert st["cross_round"] == [
        {"older": "round0", "older_round_id": r0, "newer": "round1", "newer_round_id": r1,
         "n": 2, "newer_wins": 1, "older_wins": 0, "ties": 1, "newer_win_rate": 0.75},
        {"older": "baselineRoundQ7", "older_round_id": cmp.baseline_round_id, "newer": "candidateRoundZ9",
         "newer_round_id": cmp.candidate_round_id, "n": 4, "newer_wins": 2, "older_wins": 1, "ties": 1,
         "newer_win_rate": 0.625},
    ]
    (c,) = st["comparisons"]
    assert c == client.get(url(cmp, "results")).json
    assert client.get(f"/api/stats?round_id={r0}").json["rounds"] == st["rounds"]  # global, whatever the round


def test_pages_offer_blind_mode(client: FlaskClient) -> None:
    html = client.get("/").get_data(as_text=True)
    assert 'data-mode="blind"' in html and 'id="view-blind"' in html and "<kbd>b</kbd>" in html
    stats = client.get("/stats").get_data(as_text=True)
    assert 'id="blind-table"' in stats and 'id="rounds-table"' in stats and 'id="cross-table"' in stats


def test_png_text_chunks_are_dropped(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from webapp.pages import strip_png_text

    info = PngInfo()
    info.add_text("parameters", "policyVersionX3 candidateRoundZ9")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png", pnginfo=info)
    raw = (tmp_path / "a.png").read_bytes()
    assert b"policyVersionX3" in raw
    clean = strip_png_text(raw)
    assert b"policyVersionX3" not in clean
    Image.open(tmp_path / "a.png").load()
    (tmp_path / "b.png").write_bytes(clean)
    with Image.open(tmp_path / "b.png") as im:
        assert im.getpixel((0, 0)) == (1, 2, 3) and "parameters" not in im.info


def test_rounds_mark_the_sides_of_a_comparison_so_the_page_does_not_open_them_first(
    client: FlaskClient, cmp: Blind
) -> None:
    rounds = client.get("/api/rounds").get_json()["rounds"]
    flags = {r["id"]: r["in_comparison"] for r in rounds}
    assert flags[cmp.baseline_round_id] is True and flags[cmp.candidate_round_id] is True
    assert False in flags.values()  # the fixture's ordinary rounds
