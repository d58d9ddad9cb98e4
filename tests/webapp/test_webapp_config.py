"""Config flags, early validation, the access token and custom scales."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from webapp import create_app
from webapp.__main__ import main
from poseloop.config import lib as configlib
from webapp.config import AppConfig, ConfigError, build_parser, parse_args
from webapp_fixtures import Env, env, post_json  # noqa: F401  (pytest fixtures)

TOKEN = "s3cret-token-123"


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error `python -m webapp` prints for argv (exit status 2, as the scripts)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_every_field_is_a_documented_flag() -> None:
    parser = build_parser()
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    for f in dataclasses.fields(AppConfig):
        assert f"--{f.name}" in flags
        assert f.metadata["help"]
    doc = (Path(__file__).resolve().parents[2] / "docs" / "RATING.md").read_text()
    for f in dataclasses.fields(AppConfig):
        assert f"`--{f.name}" in doc, f"--{f.name} missing from docs/RATING.md"


def test_the_app_and_the_scripts_share_one_config_mechanism(env: Env, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Same ConfigError, same flag spelling (the field name), --set and --print-config as in generate.py."""
    assert ConfigError is configlib.ConfigError
    cfg = parse_args(["--samples_dir", str(env.samples_dir), "--set", "score_max=7", "--allowed_hosts", "a.lan",
                      "b.lan", "--token", TOKEN])
    assert (cfg.samples_dir, cfg.score_max, cfg.allowed_hosts) == (env.samples_dir, 7, ["a.lan", "b.lan"])
    with pytest.raises(SystemExit) as exc:
        parse_args(["--samples_dir", str(env.samples_dir), "--token", TOKEN, "--print-config"])
    assert exc.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    # The token never reaches a log through --print-config or --help.
    assert printed["samples_dir"] == str(env.samples_dir) and printed["token"] == "<hidden>"
    monkeypatch.setenv("POSELOOP_TOKEN", TOKEN)
    assert TOKEN not in build_parser().format_help()
    assert parse_error(["--set", "samples_dir=/nonexistent"], capsys).startswith(
        "python -m webapp: error: samples_dir: /nonexistent is not a directory")
    assert parse_error(["--set", "colour=red"], capsys).endswith("unknown config field 'colour'. See --help for the list.")
    assert "server: 'gunicorn' is not one of" in parse_error(["--set", "server=gunicorn"], capsys)


def test_every_shortcut_is_documented() -> None:
    from webapp.shortcuts import SHORTCUTS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "RATING.md").read_text()
    for _where, keys, what in SHORTCUTS:
        assert f"`{keys}`" in doc and what in doc, keys


def test_parse_args_defaults_and_values(env: Env) -> None:
    cfg = parse_args(["--samples_dir", str(env.samples_dir), "--score_min", "1", "--score_max", "10", "--port", "9000"])
    assert (cfg.score_min, cfg.score_max, cfg.port, cfg.host) == (1, 10, 9000, "127.0.0.1")
    assert cfg.resolved_db_url.endswith("feedback.sqlite")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--host", "0.0.0.0"], "host"),
        (["--host", "192.168.1.5"], "host"),
        (["--score_min", "3", "--score_max", "3"], "score_min"),
        (["--score_min", "-20"], "score_min"),
        (["--port", "70000"], "port"),
        (["--db_url", "feedback.sqlite"], "db_url"),
        (["--token", "short"], "token"),
        (["--threads", "0"], "threads"),
        (["--port", "http"], "port"),
    ],
)
def test_bad_settings_fail_early_naming_the_flag(env: Env, args: list[str], flag: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_error(["--samples_dir", str(env.samples_dir), *args], capsys).startswith(
        f"python -m webapp: error: {flag}: ")


def test_public_host_needs_a_token_and_says_why(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--samples_dir", str(env.samples_dir), "--host", "0.0.0.0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m webapp: error: host: 0.0.0.0 is not a loopback address")
    assert "pass --token SECRET" in err and "anyone on the network" in err
    cfg = parse_args(["--samples_dir", str(env.samples_dir), "--host", "0.0.0.0", "--token", TOKEN])
    assert cfg.token == TOKEN


def test_token_from_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSELOOP_TOKEN", TOKEN)
    assert parse_args(["--samples_dir", str(env.samples_dir), "--host", "0.0.0.0"]).token == TOKEN
    assert parse_args(["--samples_dir", str(env.samples_dir), "--token", "flag-wins-123"]).token == "flag-wins-123"


def test_missing_samples_dir_and_unknown_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^samples_dir: "):
        create_app({"samples_dir": tmp_path / "nope"})
    with pytest.raises(ConfigError, match="unknown setting"):
        create_app({"samples_dir": tmp_path, "colour": "red"})


def test_token_protects_api_pages_and_media(env: Env) -> None:
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "token": TOKEN})
    c = app.test_client()
    assert c.get("/api/rounds").status_code == 401
    assert "X-Poseloop-Token" in c.get("/api/rounds").json["error"]
    sid = env.samples[env.groups[env.rounds[0]][0]][0]
    assert c.get(f"/media/sample/{sid}").status_code == 401
    page = c.get("/")
    assert page.status_code == 401 and b"access token" in page.data
    assert c.get("/static/style.css").status_code == 200
    assert c.get("/api/rounds", headers={"X-Poseloop-Token": TOKEN}).status_code == 200
    assert c.get("/api/rounds", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/api/rounds", headers={"X-Poseloop-Token": "wrong-token"}).status_code == 401
    assert c.get("/?token=wrong-token").status_code == 401
    r = c.get(f"/stats?token={TOKEN}&round=1")
    assert r.status_code == 302 and r.headers["Location"] == "/stats?round=1"
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    assert TOKEN not in r.headers["Set-Cookie"]
    # The cookie now opens everything, including label writes.
    assert c.get("/").status_code == 200
    assert c.get(f"/media/sample/{sid}").status_code == 200
    assert post_json(c, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 1}).status_code == 201
    assert app.test_client().post("/api/scores", json={"rater": "ann", "sample_id": sid, "score": 2}).status_code == 401
    app.extensions["poseloop_store"].dispose()


def test_custom_scale(env: Env) -> None:
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "score_min": 1, "score_max": 10})
    c = app.test_client()
    sid = env.samples[env.groups[env.rounds[0]][0]][0]
    assert c.get("/api/config").json["score_max"] == 10
    assert post_json(c, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 0}).status_code == 400
    assert post_json(c, "/api/scores", {"rater": "ann", "sample_id": sid, "score": 10}).status_code == 201
    hist = c.get("/api/stats").json["raters"][0]["histogram"]
    assert [h["score"] for h in hist] == list(range(1, 11))
    app.extensions["poseloop_store"].dispose()


def test_help_and_hint_name_only_keys_of_the_scale(env: Env) -> None:
    from webapp.shortcuts import for_scale, scale_hint

    # 1..10: digits 1-9 and 0 for ten; no negative keys at all.
    rows = {keys: what for where, keys, what in for_scale(1, 10) if where in ("score", "grid")}
    assert rows["1 … 9"] == "give that score (+1 … +9) and go to the next image"
    assert rows["0"] == "give +10 and go to the next image" and rows["1 … 9, 0 (+10)"] == "score the selected image"
    assert not [k for k in rows if "Shift" in k or "then" in k]
    assert scale_hint(1, 10) == "1 … 9, 0 for +10 score and advance"
    # -2..2: two negative keys.
    rows = {keys: what for where, keys, what in for_scale(-2, 2) if where == "score"}
    assert "0 … 2" in rows and rows["Shift+1 / Shift+2"].startswith("give the negative score (-1 / -2)")
    assert scale_hint(-2, 2) == "0 … 2 score and advance · Shift+1 / 2 for -1 / -2"
    # The page renders the configured scale's keys.
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "score_min": 1, "score_max": 10})
    html = app.test_client().get("/").get_data(as_text=True)
    assert "<kbd>1 … 9</kbd>" in html and "<kbd>0</kbd>" in html and "Shift+" not in html
    app.extensions["poseloop_store"].dispose()


@pytest.mark.parametrize(
    "rubric, error",
    [
        ("a | b | c", "at most one '|'"),
        (" | high end only", "at most one '|'"),
        ("x" * 121, "the sentence is 121 characters"),
        ("short | " + "y" * 130, "the high end is 130 characters"),
        ("line one\nline two", "one line"),
    ],
)
def test_bad_rubric_fails_early_naming_the_flag(env: Env, rubric: str, error: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    msg = parse_error(["--samples_dir", str(env.samples_dir), "--rubric", rubric], capsys)
    assert msg.startswith("python -m webapp: error: rubric: ") and error in msg


def test_rubric_sentence_or_two_ends(env: Env) -> None:
    cfg = parse_args(["--samples_dir", str(env.samples_dir), "--rubric", "  pose wrong |  pose right  "])
    assert cfg.rubric == "pose wrong | pose right"
    assert cfg.rubric_parts == {"low": "pose wrong", "high": "pose right"}
    cfg = parse_args(["--samples_dir", str(env.samples_dir), "--rubric", "x" * 120])
    assert cfg.rubric_parts == {"sentence": "x" * 120}
    assert parse_args(["--samples_dir", str(env.samples_dir)]).rubric_parts == {}
    # Shown in the start dialog and under the buttons of every mode, escaped.
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "rubric": "match the <pose> exactly"})
    html = app.test_client().get("/").get_data(as_text=True)
    assert html.count('<p class="rubric" id="') == 4
    assert "match the &lt;pose&gt; exactly" in html and "<pose>" not in html
    app.extensions["poseloop_store"].dispose()
