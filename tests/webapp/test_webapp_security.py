"""Hostile requests (Flask test client): DNS rebinding, non-image files, bad values on every route, token guessing."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from poseloop.data.db import Group, LabelEvent, Rating, Sample, open_db, session_scope
from webapp import create_app
from webapp.config import AppConfig, ConfigError, parse_args
from webapp.exchange import d3po_zip, safe_file_stem
from webapp.security import GuessThrottle
from webapp_fixtures import BOTH_DATABASES, Blind, Env, app, client, cmp, env, post_json  # noqa: F401  (pytest fixtures)

TOKEN = "s3cret-token-123"
ATTACKER = {"Host": "attacker.example:8765", "Origin": "http://attacker.example:8765"}


def n_ratings(env: Env) -> int:
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        n = s.scalar(select(func.count()).select_from(Rating)) or 0
    factory.kw["bind"].dispose()
    return n


def first_sample(env: Env) -> int:
    return env.samples[env.groups[env.rounds[0]][0]][0]


def token_app(env: Env, **overrides: Any) -> Flask:
    application = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "token": TOKEN, **overrides})
    application.testing = True
    return application


# ---------------------------------------------------------------- 1. DNS rebinding: Host allow-list


def test_rebound_host_is_refused_without_a_token(client: FlaskClient, env: Env) -> None:
    sid = first_sample(env)
    r = client.get("/api/export/labels.jsonl", headers=ATTACKER)
    assert r.status_code == 421 and "--allowed_hosts" in r.json["error"] and "attacker.example" in r.json["error"]
    r = post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 3}, headers=ATTACKER)
    assert r.status_code == 421 and r.is_json
    for path in ("/", "/stats", f"/media/sample/{sid}", "/static/app.js"):
        assert client.get(path, headers={"Host": "attacker.example"}).status_code == 421, path
    assert n_ratings(env) == 0
    # Every spelling of this machine still works, with any port.
    for host in ("localhost", "LOCALHOST:8765", "127.0.0.1:8765", "127.8.9.10:1", "[::1]:8765", "[::1]"):
        assert client.get("/api/rounds", headers={"Host": host}).status_code == 200, host
    assert post_json(client, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 3},
                     headers={"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"}).status_code == 201
    # Names that only look local are names like any other.
    for host in ("localhost.attacker.example", "127.0.0.1.nip.io", "0.0.0.0", "192.168.1.5"):
        assert client.get("/api/rounds", headers={"Host": host}).status_code == 421, host


def test_with_a_token_only_configured_names_ip_addresses_and_the_bound_host_pass(env: Env) -> None:
    auth = {"X-Poseloop-Token": TOKEN}
    app1 = token_app(env, host="0.0.0.0", allowed_hosts=["Rating.LAN", "gpu-box.local"])
    c = app1.test_client()
    for host in ("rating.lan:8765", "GPU-BOX.local", "192.168.1.5:8765", "[fe80::1]:8765", "localhost", "0.0.0.0"):
        assert c.get("/api/rounds", headers={"Host": host, **auth}).status_code == 200, host
    r = c.get("/api/rounds", headers={**ATTACKER, **auth})  # the right token does not make a rebound name ok
    assert r.status_code == 421 and "--allowed_hosts attacker.example" in r.json["error"]
    app1.extensions["poseloop_store"].dispose()
    app2 = token_app(env, host="gpu-box")  # the name it was started with is always allowed
    assert app2.test_client().get("/api/rounds", headers={"Host": "gpu-box:8765", **auth}).status_code == 200
    assert app2.test_client().get("/api/rounds", headers={"Host": "rating.lan", **auth}).status_code == 421
    app2.extensions["poseloop_store"].dispose()


def test_allowed_hosts_flag(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--samples_dir", str(env.samples_dir)]
    cfg = parse_args([*base, "--token", TOKEN, "--allowed_hosts", "rating.lan, Box.Local,10.0.0.7", "gpu.lan"])
    assert cfg.allowed_hosts == ["rating.lan", "box.local", "10.0.0.7", "gpu.lan"]
    assert parse_args(base).allowed_hosts == []
    for argv, needle in [([*base, "--allowed_hosts", "rating.lan"], "error: allowed_hosts: .*--token"),
                         *[([*base, "--token", TOKEN, "--allowed_hosts", bad], "error: allowed_hosts: ")
                           for bad in ("http://rating.lan", "rating.lan:8765", "bad_name!", "a..b")]]:
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and re.search(needle, capsys.readouterr().err), argv
    with pytest.raises(ConfigError, match="^allowed_hosts: "):  # Python callers get the same check
        AppConfig(samples_dir=env.samples_dir, token=TOKEN, allowed_hosts=["a..b"]).validate()


# ---------------------------------------------------------------- 2. only image files are served


def _point_rows_at(env: Env, image_path: str, condition_path: str) -> tuple[int, int]:
    sid, gid = first_sample(env), env.groups[env.rounds[0]][0]
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        s.get(Sample, sid).image_path = image_path
        s.get(Group, gid).condition_path = condition_path
    factory.kw["bind"].dispose()
    return sid, gid


@pytest.mark.parametrize("rel", [
    "feedback.sqlite", "feedback.sqlite-wal", ".poseloop_blind_key", "round0/../.poseloop_blind_key",
    ".hidden/x.png", "round0/.x.png", "notes.txt", "round0/images", "round0/images/g000_s0.png\x00.txt",
    "round0/images/g000_s0.png\x00", "a" * 5000 + ".png",
])
def test_rows_naming_non_image_files_are_not_served(client: FlaskClient, env: Env, rel: str) -> None:
    (env.samples_dir / "notes.txt").write_text("private notes")
    (env.samples_dir / ".hidden").mkdir()
    (env.samples_dir / ".hidden" / "x.png").write_bytes((env.samples_dir / "round0/images/g000_s1.png").read_bytes())
    (env.samples_dir / "round0" / ".x.png").write_bytes(b"\x89PNG dot")
    client.get("/api/rounds")  # the app has created its blind key
    assert (env.samples_dir / ".poseloop_blind_key").is_file()
    sid, gid = _point_rows_at(env, rel, rel)
    for path in (f"/media/sample/{sid}", f"/media/condition/{gid}"):
        r = client.get(path)
        assert r.status_code == 404 and r.is_json and "error" in r.json, (path, r.status_code)


def test_a_symlink_named_like_an_image_does_not_lead_to_the_database(client: FlaskClient, env: Env) -> None:
    link = env.samples_dir / "round0" / "db.png"
    link.symlink_to(env.samples_dir / "feedback.sqlite")
    sid, _gid = _point_rows_at(env, "round0/db.png", "round0/poses/group000.png")
    assert client.get(f"/media/sample/{sid}").status_code == 404


def test_images_of_every_kind_are_still_served(client: FlaskClient, env: Env) -> None:
    from PIL import Image

    for suffix, fmt in ((".JPG", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(env.samples_dir / f"round0/x{suffix}", fmt)
        sid, _gid = _point_rows_at(env, f"round0/x{suffix}", "round0/poses/group000.png")
        r = client.get(f"/media/sample/{sid}")
        assert r.status_code == 200 and r.mimetype.startswith("image/"), suffix


def test_blind_media_serves_only_images(client: FlaskClient, env: Env, cmp: Blind) -> None:
    base_id, _cand_id = cmp.pairs["0-0"]
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        s.get(Group, s.get(Sample, base_id).group_id).condition_path = "feedback.sqlite"
    factory.kw["bind"].dispose()
    r = client.get(f"/media/blind/{cmp.comparison_id}/0-0/pose?rater=ann")
    assert r.status_code == 404 and r.is_json


# ---------------------------------------------------------------- 3. hostile values: 4xx, never 5xx


SAMPLE_ARGS = {"sample_id", "group_id", "round_id", "comparison_id"}
# Raw JSON texts, so NaN, Infinity and lone surrogates reach the server exactly as an attacker sends them.
HOSTILE_JSON = ["NaN", "Infinity", "-Infinity", "1e400", str(2**63), str(2**64), str(-(2**63) - 1), "1.5",
                '"\\ud800"', '"a\\u0000b"', '"line\\nbreak"', "true", "null", "[]", "{}", '""', '"' + "x" * 5000 + '"',
                "[" * 100_000 + "]" * 100_000]
HOSTILE_QUERY = [str(2**63), str(-(2**63) - 1), "NaN", "inf", "1e400", "%00", "%ED%A0%80", "x" * 5000, "1-2-3",
                 "9" * 5000, "-", ","]
BODY_FIELDS = ["rater", "sample_id", "score", "left_id", "right_id", "choice", "request_id", "round_id", "kind",
               "pair", "scores"]
QUERY_FIELDS = ["rater", "round_id", "count", "exclude", "only_unrated", "history", "token"]


def _valid_body(env: Env, cmp: Blind) -> dict[str, Any]:
    a, b = env.samples[env.groups[env.rounds[0]][0]][:2]
    return {"rater": "ann", "sample_id": a, "score": 1, "left_id": a, "right_id": b, "choice": "left",
            "request_id": "req-1", "round_id": env.rounds[0], "kind": "score", "pair": "0-0",
            "scores": {env.file_names[a]: 1}}


def _fill(rule: str, values: dict[str, Any]) -> str:
    """The URL of a rule with its arguments replaced by `values`."""
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", lambda m: str(values[m.group(1)]), rule)


def _routes(app: Flask, env: Env, cmp: Blind) -> list[tuple[str, set[str], dict[str, Any]]]:
    """(rule, methods, valid arguments) of every route of the app, so a new route is covered too."""
    valid = {"round_id": env.rounds[0], "sample_id": first_sample(env), "group_id": env.groups[env.rounds[0]][0],
             "comparison_id": cmp.comparison_id, "token": "0-0", "what": "left", "filename": "app.js", "job_id": 1}
    out = []
    for rule in app.url_map.iter_rules():
        missing = set(rule.arguments) - set(valid)
        assert not missing, f"{rule.rule}: add a valid value for {missing} to this test"
        out.append((rule.rule, set(rule.methods or ()) - {"HEAD", "OPTIONS"}, valid))
    return out


def _check(r: Any, what: str, must_refuse: bool = False) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.get_data(as_text=True)[:200]}"
    if must_refuse:
        assert 400 <= r.status_code < 500, f"{what}: {r.status_code} accepted"
    if r.status_code >= 400:
        assert r.is_json and r.json.get("error"), f"{what}: {r.status_code} without a JSON error"


@BOTH_DATABASES
def test_hostile_values_on_every_route_get_a_4xx_json_error(app: Flask, env: Env, cmp: Blind) -> None:
    app.testing = False  # an exception must come back as the 500 a real client sees, not be raised here
    c = app.test_client()
    routes = _routes(app, env, cmp)
    assert {"/api/scores", "/api/import/scores", "/media/sample/<int:sample_id>"} <= {r for r, _m, _v in routes}
    for rule, methods, valid in routes:
        url = _fill(rule, valid)
        for arg in re.findall(r"<int:([a-z_]+)>", rule):
            for bad in (2**63, 2**64, 10**30):  # ids SQLite cannot hold name no row
                bad_url = _fill(rule, {**valid, arg: bad})
                for method in methods:
                    r = c.open(bad_url, method=method, data="{}", content_type="application/json")
                    _check(r, f"{method} {bad_url}", must_refuse=True)
        if "GET" in methods:
            for field in QUERY_FIELDS:
                for value in HOSTILE_QUERY:
                    _check(c.get(f"{url}?rater=ann&{field}={value}"), f"GET {url}?{field}={value[:20]}")
        if "POST" in methods:
            body = _valid_body(env, cmp)
            for value in HOSTILE_JSON:
                # One field at a time reaches each field's own check; all at once must be refused.
                for field in BODY_FIELDS:
                    raw = "{" + ", ".join(f"{json.dumps(k)}: {value if k == field else json.dumps(v)}"
                                          for k, v in body.items()) + "}"
                    _check(c.post(url, data=raw, content_type="application/json"), f"POST {url} {field}={value[:20]}")
                raw = "{" + ", ".join(f"{json.dumps(k)}: {value}" for k in body) + "}"
                _check(c.post(url, data=raw, content_type="application/json"), f"POST {url} all={value[:20]}",
                       must_refuse=True)
            for raw in ("[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000, "NaN", "\xff\xfe"):
                _check(c.post(url, data=raw, content_type="application/json"), f"POST {url} raw", must_refuse=True)


def test_specific_hostile_values_are_refused_naming_the_field(client: FlaskClient, env: Env, cmp: Blind) -> None:
    sid = first_sample(env)
    cases = [
        ('{"rater": "ann", "sample_id": %d, "score": NaN}' % sid, "NaN"),
        ('{"rater": "ann", "sample_id": %d, "score": -Infinity}' % sid, "Infinity"),
        ('{"rater": "ann", "sample_id": %d, "score": 1e400}' % sid, "score"),
        ('{"rater": "ann", "sample_id": %d, "score": 1}' % 2**63, "sample_id"),
        ('{"rater": "\\ud800", "sample_id": %d, "score": 1}' % sid, "rater"),
        ('{"rater": "ann", "sample_id": %d, "score": 1, "request_id": "\\udfff"}' % sid, "request_id"),
        ("[" * 100_000 + "]" * 100_000, "nested"),
    ]
    for body, word in cases:
        r = client.post("/api/scores", data=body, content_type="application/json")
        assert r.status_code == 400 and word in r.json["error"], (body[:60], r.json)
    r = post_json(client, "/api/import/scores", {"rater": "ann", "round_id": 2**63, "scores": {}})
    assert r.status_code == 400 and "round_id" in r.json["error"]
    r = client.get(f"/api/stats?round_id={2**63}")
    assert r.status_code == 400 and "round_id" in r.json["error"]
    assert client.get(f"/api/rounds/{2**63}/items").status_code == 404
    assert client.get(f"/api/comparisons/{2**64}/results").status_code == 404
    assert n_ratings(env) == 0


def test_import_refuses_nan_and_infinite_scores(env: Env) -> None:
    from webapp.exchange import import_scores_json

    sid = first_sample(env)
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        for bad in (float("nan"), float("inf"), float("-inf"), 2**63, 1.5, True):
            with pytest.raises(Exception) as info:
                import_scores_json(s, {env.file_names[sid]: bad}, "ann", env.rounds[0], (-5, 5))
            assert getattr(info.value, "status", None) == 400, (bad, info.value)
            assert info.value.details["invalid_scores"] == [env.file_names[sid]]  # type: ignore[attr-defined]
    factory.kw["bind"].dispose()


def test_clean_int_refuses_non_finite_and_out_of_range() -> None:
    from webapp.store import ApiError, clean_int

    assert clean_int(3.0, "score") == 3 and clean_int(2**31 - 1, "id") == 2**31 - 1
    for bad in (float("nan"), float("inf"), -float("inf"), 2**31, 2**63, -(2**63) - 1, 1e30, 1.5, True, "3", None):
        with pytest.raises(ApiError, match="'score'"):
            clean_int(bad, "score")


# ---------------------------------------------------------------- 4. token guessing, rater names, D3PO names


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_doubles_the_lock_after_the_free_failures() -> None:
    clock = Clock()
    th = GuessThrottle(free=3, base_s=1.0, cap_s=8.0, clock=clock)
    assert [th.failed("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert th.retry_after("a") == 0.0
    locks = []
    for _ in range(5):
        locks.append(th.failed("a"))
        clock.t += locks[-1]
    assert locks == [1.0, 2.0, 4.0, 8.0, 8.0]  # doubling, capped
    assert th.retry_after("b") == 0.0  # per address
    th.failed("a")
    assert th.retry_after("a") == 8.0
    th.succeeded("a")
    assert th.retry_after("a") == 0.0
    small = GuessThrottle(max_clients=3, clock=clock)
    for i in range(10):
        small.failed(f"10.0.0.{i}")
    assert len(small._clients) == 3  # a flood of addresses cannot grow the table


def test_wrong_tokens_are_throttled_per_address_without_sleeping(env: Env) -> None:
    application = token_app(env)
    clock = Clock()
    application.extensions["poseloop_throttle"].clock = clock
    c = application.test_client()
    wrong = {"X-Poseloop-Token": "wrong-token-0"}
    statuses = [c.get("/api/rounds", headers=wrong).status_code for _ in range(6)]
    assert statuses == [401] * 6
    r = c.get("/api/rounds", headers={"X-Poseloop-Token": TOKEN})  # locked: not even the right token is checked
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "try again" in r.json["error"]
    assert c.get("/?token=also-wrong").status_code == 429  # the login form counts too
    assert "Too many" in c.get("/?token=also-wrong").get_data(as_text=True)
    # Another address is not affected; a request without any token is no guess.
    other = c.get("/api/rounds", headers={"X-Poseloop-Token": TOKEN}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 200
    assert c.get("/api/rounds").status_code == 401
    clock.t += 1.0
    assert c.get("/api/rounds", headers=wrong).status_code == 401  # the 7th failure: now 2 s
    assert c.get("/api/rounds", headers=wrong).status_code == 429
    clock.t += 1.9
    assert c.get("/api/rounds", headers={"X-Poseloop-Token": TOKEN}).status_code == 429
    clock.t += 0.2
    assert c.get("/api/rounds", headers={"X-Poseloop-Token": TOKEN}).status_code == 200
    assert c.get("/api/rounds", headers=wrong).status_code == 401  # the right token reset the count
    application.extensions["poseloop_store"].dispose()


@pytest.mark.parametrize("name", ["ann\nbob", "an\rn", "a\tb", "nul\x00l", "bell\x07", "del\x7f", "c\x851",
                                  "ls\u2028x", "rtl\u202eevil"])
def test_rater_names_with_control_characters_are_refused(client: FlaskClient, env: Env, name: str) -> None:
    r = post_json(client, "/api/scores", {"rater": name, "sample_id": first_sample(env), "score": 1})
    assert r.status_code == 400 and "'rater'" in r.json["error"] and "U+" in r.json["error"]
    assert n_ratings(env) == 0


def test_rater_names_are_stripped(client: FlaskClient, env: Env) -> None:
    sid = first_sample(env)
    assert post_json(client, "/api/scores", {"rater": "  Zoë 🙂 ", "sample_id": sid, "score": 1}).status_code == 201
    assert client.get(f"/api/rounds/{env.rounds[0]}/items?rater=Zo%C3%AB%20%F0%9F%99%82").json["progress"]["done"] == 1


@pytest.mark.parametrize("name, stem", [("CON", "CON_"), ("con", "con_"), ("Nul.x", "Nul_.x"), ("com1", "com1_"),
                                        ("LPT9", "LPT9_"), ("aux ", "aux_"), ("COM10", "COM10"), ("con.", "con_"),
                                        ("../../x", "x"), ("a:b*c?", "a_b_c"), ("...", "rater")])
def test_d3po_file_names_are_safe_on_every_os(name: str, stem: str) -> None:
    assert safe_file_stem(name) == stem


def test_d3po_zip_names_are_unique_and_never_reserved(client: FlaskClient, env: Env) -> None:
    sid = first_sample(env)
    raters = ["CON", "con", "CON_", "a b", "a_b", "a/b", "Zoë", "Zoe"]
    for name in raters:
        assert post_json(client, "/api/scores", {"rater": name, "sample_id": sid, "score": 1}).status_code == 201
    r = client.get(f"/api/export/d3po.zip?round_id={env.rounds[0]}")
    names = zipfile.ZipFile(io.BytesIO(r.data)).namelist()
    assert len(names) == len(raters) and len({n.lower() for n in names}) == len(raters)
    reserved = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(10))}
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.json", n), n
        assert n.split(".")[0].lower() not in reserved, n
    assert "CON_.json" in names
    assert d3po_zip({}) and zipfile.ZipFile(io.BytesIO(d3po_zip({}))).namelist() == []


def test_label_events_untouched_by_refused_requests(client: FlaskClient, env: Env) -> None:
    sid = first_sample(env)
    for body in ({"rater": "a\nb", "sample_id": sid, "score": 1}, {"rater": "ann", "sample_id": sid, "score": 99}):
        assert post_json(client, "/api/scores", body).status_code == 400
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == 0
    factory.kw["bind"].dispose()


def test_app_factory_still_refuses_unknown_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        create_app({"samples_dir": tmp_path, "allowed_host": ["x"]})
