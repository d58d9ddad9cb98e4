"""Config flags, early validation, the access token and custom scales."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from webapp import create_app
from webapp.__main__ import main
from webapp.config import AppConfig, ConfigError, build_parser, flag_name, parse_args
from webapp_fixtures import Env, env, post_json  # noqa: F401  (pytest fixtures)

TOKEN = "s3cret-token-123"


def test_every_field_is_a_documented_flag() -> None:
    parser = build_parser()
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    for f in dataclasses.fields(AppConfig):
        assert flag_name(f.name) in flags
        assert f.metadata["help"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "RATING.md").read_text()
    for f in dataclasses.fields(AppConfig):
        assert f"`{flag_name(f.name)}" in doc, f"{flag_name(f.name)} missing from docs/RATING.md"


def test_every_shortcut_is_documented() -> None:
    from webapp.shortcuts import SHORTCUTS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "RATING.md").read_text()
    for _where, keys, what in SHORTCUTS:
        assert f"`{keys}`" in doc and what in doc, keys


def test_parse_args_defaults_and_values(env: Env) -> None:
    cfg = parse_args(["--samples-dir", str(env.samples_dir), "--score-min", "1", "--score-max", "10", "--port", "9000"])
    assert (cfg.score_min, cfg.score_max, cfg.port, cfg.host) == (1, 10, 9000, "127.0.0.1")
    assert cfg.resolved_db_url.endswith("feedback.sqlite")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--host", "0.0.0.0"], "--host"),
        (["--host", "192.168.1.5"], "--host"),
        (["--score-min", "3", "--score-max", "3"], "--score-min"),
        (["--score-min", "-20"], "--score-min"),
        (["--port", "70000"], "--port"),
        (["--db-url", "feedback.sqlite"], "--db-url"),
        (["--token", "short"], "--token"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_settings_fail_early_naming_the_flag(env: Env, args: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        parse_args(["--samples-dir", str(env.samples_dir), *args])


def test_public_host_needs_a_token_and_says_why(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--samples-dir", str(env.samples_dir), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host" in err and "--token" in err and "anyone on the network" in err
    cfg = parse_args(["--samples-dir", str(env.samples_dir), "--host", "0.0.0.0", "--token", TOKEN])
    assert cfg.token == TOKEN


def test_token_from_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSELOOP_TOKEN", TOKEN)
    assert parse_args(["--samples-dir", str(env.samples_dir), "--host", "0.0.0.0"]).token == TOKEN


def test_missing_samples_dir_and_unknown_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--samples-dir"):
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
def test_bad_rubric_fails_early_naming_the_flag(env: Env, rubric: str, error: str) -> None:
    with pytest.raises(ConfigError, match="^--rubric: ") as exc:
        parse_args(["--samples-dir", str(env.samples_dir), "--rubric", rubric])
    assert error in str(exc.value)


def test_rubric_sentence_or_two_ends(env: Env) -> None:
    cfg = parse_args(["--samples-dir", str(env.samples_dir), "--rubric", "  pose wrong |  pose right  "])
    assert cfg.rubric == "pose wrong | pose right"
    assert cfg.rubric_parts == {"low": "pose wrong", "high": "pose right"}
    cfg = parse_args(["--samples-dir", str(env.samples_dir), "--rubric", "x" * 120])
    assert cfg.rubric_parts == {"sentence": "x" * 120}
    assert parse_args(["--samples-dir", str(env.samples_dir)]).rubric_parts == {}
    # Shown in the start dialog and under the buttons of every mode, escaped.
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "rubric": "match the <pose> exactly"})
    html = app.test_client().get("/").get_data(as_text=True)
    assert html.count('<p class="rubric" id="') == 4
    assert "match the &lt;pose&gt; exactly" in html and "<pose>" not in html
    app.extensions["poseloop_store"].dispose()
