"""PostgreSQL for teams: URLs, one-line errors naming the field, the write lock, and the test server itself.

The app's API tests, the concurrency test and the label readers of the trainers run on PostgreSQL too
(tests marked BOTH_DATABASES and the postgresql cases here).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from poseloop.data import db
from webapp import create_app
from webapp.__main__ import main as webapp_main
from webapp.config import ConfigError
from webapp.store import Store


def test_bare_postgresql_urls_mean_psycopg_3() -> None:
    assert db.normalize_db_url("postgresql://u:p@h/d") == "postgresql+psycopg://u:p@h/d"
    assert db.normalize_db_url("postgres://u@h:5433/d") == "postgresql+psycopg://u@h:5433/d"
    assert db.normalize_db_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert db.normalize_db_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"
    assert db.shown_db_url("postgresql://ann:s3cret@h/d") == "postgresql+psycopg://ann:***@h/d"


def test_unreachable_server_is_one_line_naming_the_field(tmp_path: Path) -> None:
    # Nothing listens on a socket in an empty folder: the driver fails at once.
    url = f"postgresql://ann:s3cret@/labels?host={tmp_path}&port=5999"
    with pytest.raises(db.DatabaseUrlError) as e:
        db.open_db(url, "data.db_url")
    msg = str(e.value)
    assert msg.startswith("data.db_url: cannot open the database postgresql+psycopg://ann:***@/labels")
    assert "\n" not in msg and "s3cret" not in msg
    assert "start the PostgreSQL server" in msg and "createdb" in msg


def test_missing_database_names_the_fix(postgres_server) -> None:
    with pytest.raises(db.DatabaseUrlError, match=r"^d3po\.db_url: .*database \"nosuchdb\" does not exist.*createdb"):
        db.open_db(postgres_server.url("nosuchdb"), "d3po.db_url")


@pytest.mark.parametrize("url, words", [
    ("postgresq://h/d", ["is not a usable SQLAlchemy URL", "postgresql+psycopg://"]),
    ("postgresql+psycopg2://h/d", ["driver", "is not installed", "psycopg[binary]"]),
    ("mysql://", ["db_url", "not"]),
])
def test_bad_urls_stop_the_app_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str,
                                             words: list[str]) -> None:
    (tmp_path / "samples").mkdir()
    assert webapp_main(["--samples_dir", str(tmp_path / "samples"), "--db_url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: db_url: ") and "\n" not in err, err
    for w in words:
        assert w in err, err


def test_app_on_postgresql_starts_and_hides_the_password(postgres_server, tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    url = postgres_server.create_database()
    app = create_app({"samples_dir": tmp_path / "samples", "db_url": url})
    try:
        assert app.test_client().get("/api/rounds").status_code == 200
    finally:
        app.extensions["poseloop_store"].dispose()
    with pytest.raises(ConfigError, match="^db_url: cannot open"):
        create_app({"samples_dir": tmp_path / "samples", "db_url": url.replace("/t", "/missing_t")})


@pytest.mark.parametrize("db_backend", ["sqlite", "postgresql"])
def test_long_names_and_paths_are_stored_on_both_databases(tmp_path: Path, backend_db_url: str | None) -> None:
    """A long --store.round, model path or pose name: SQLite never enforced lengths, so PostgreSQL must not either."""
    factory = db.open_db(backend_db_url or db.default_db_url(tmp_path))
    long = "x" * 3000
    with db.session_scope(factory) as s:
        rnd = db.Round(name="r" + long, arch="sd15", base_model=long, controlnet_model=long, lora_path=long,
                       policy_version=long, plan_hash="0" * 64, config_json="{}")
        s.add(rnd)
        s.flush()
        grp = db.Group(round_id=rnd.id, index=0, prompt=long, pose_name=long, condition_path=long,
                       source_image_path=long)
        s.add(grp)
        s.flush()
        s.add(db.Sample(round_id=rnd.id, group_id=grp.id, index=0, seed=2**31 - 1, image_path=long,
                        trajectory_path=long, width=64, height=64, num_steps=4, guidance_scale=7.5,
                        controlnet_scale=1.0, eta=1.0))
        s.add(db.Comparison(name="c" + long, baseline_round_id=rnd.id, candidate_round_id=rnd.id))
    with db.session_scope(factory) as s:
        assert s.scalar(select(db.Sample.image_path)) == long
        assert s.scalar(select(db.Comparison.name)) == "c" + long
    factory.kw["bind"].dispose()


def test_write_transactions_queue_on_the_advisory_lock(postgres_server) -> None:
    """Two writers never overlap: the second waits until the first commits, then sees its row."""
    store = Store.open(postgres_server.create_database())
    inside, release, seen = threading.Event(), threading.Event(), []

    def first(s) -> None:
        s.add(db.Rater(name="first"))
        s.flush()
        inside.set()
        release.wait(10)

    def second(s) -> None:
        seen.append(s.scalar(select(func.count()).select_from(db.Rater)))

    t1 = threading.Thread(target=store.write, args=(first,))
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=store.write, args=(second,))
    t2.start()
    t2.join(0.5)
    assert t2.is_alive() and seen == []  # queued behind the first writer
    # A read does not wait for the lock.
    assert store.read(lambda s: s.scalar(text("SELECT 1"))) == 1
    release.set()
    t1.join(10)
    t2.join(10)
    assert seen == [1]
    store.dispose()


def test_missing_server_binaries_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pg_server import PostgresUnavailable, find_bin_dir

    monkeypatch.setenv("POSELOOP_PG_BIN", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match="holds no initdb and pg_ctl; install Debian's postgresql"):
        find_bin_dir()
    # A machine without the package: no Debian folder, nothing on PATH.
    import pg_server

    monkeypatch.delenv("POSELOOP_PG_BIN")
    monkeypatch.setattr(pg_server.glob, "glob", lambda _pattern: [])
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match=r"binaries \(initdb, pg_ctl\) not found; install Debian's postgresql"):
        find_bin_dir()


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_train_reward_and_d3po_read_the_labels_from_postgresql(postgres_server, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The same labelled folder on SQLite and on PostgreSQL gives the same labels, pairs and reward model inputs."""
    import json

    import torch

    import train_reward
    from fake_samples import make_samples
    from poseloop.config.reward import RewardDataConfig
    from poseloop.rewards.labels import load_labels
    from poseloop.config.policy import D3POConfig
    from poseloop.policy.algos.preferences import load_preference_pairs

    url = postgres_server.create_database()
    root_pg, root_sq = tmp_path / "pg", tmp_path / "sq"
    make_samples(root_pg, db_url=url)
    make_samples(root_sq)
    on_pg = load_labels(RewardDataConfig(samples_dir=str(root_pg), db_url=url))
    on_sq = load_labels(RewardDataConfig(samples_dir=str(root_sq)))
    assert on_pg.n_labels == on_sq.n_labels == 6 * 3 + 6 * 3
    assert torch.equal(on_pg.latents, on_sq.latents)
    assert on_pg.score_raw.tolist() == on_sq.score_raw.tolist()
    assert torch.equal(on_pg.pref_target, on_sq.pref_target)

    pairs = load_preference_pairs(D3POConfig(samples_dir=str(root_pg), db_url=url))
    assert len(pairs) == 6 * 3
    assert sorted((p.winner_path.name, p.loser_path.name) for p in pairs) == sorted(
        (p.winner_path.name, p.loser_path.name) for p in load_preference_pairs(D3POConfig(samples_dir=str(root_sq))))

    models = tmp_path / "models"
    assert train_reward.main(["--data.samples_dir", str(root_pg), "--data.db_url", url, "--output.models_dir",
                              str(models), "--output.version", "v1", "--set", "train.epochs=2", "--set",
                              "train.ensemble_size=1", "--set", "train.holdout_fraction=0.34"]) == 0
    metrics = json.loads((models / "reward" / "v1" / "metrics.json").read_text())
    assert metrics["n_scores"] == 18 and metrics["n_preferences"] == 18


def test_scripts_name_their_db_url_field_when_the_server_is_down(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import train_policy
    import train_reward

    url = f"postgresql://ann@/labels?host={tmp_path}&port=5999"  # no server on this socket
    (tmp_path / "samples").mkdir()
    with pytest.raises(SystemExit) as exc:
        train_reward.main(["--data.samples_dir", str(tmp_path / "samples"), "--data.db_url", url])
    assert exc.value.code == 2
    assert _one_error_line(capsys).startswith("error: data.db_url: cannot open the database postgresql+psycopg://ann@")
    with pytest.raises(SystemExit) as exc:
        train_policy.main(["--algo", "d3po", "--d3po.samples_dir", str(tmp_path / "samples"), "--d3po.db_url", url,
                           "--model.models_dir", str(tmp_path / "models")])
    assert exc.value.code == 2
    assert _one_error_line(capsys).startswith("error: d3po.db_url: cannot open the database")


def test_generate_writes_resumes_and_numbers_rounds_on_postgresql(postgres_server, tiny_cfg,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """generate.py against a PostgreSQL URL: rows after files, an interrupted run resumes, the next run is round 2."""
    from poseloop.sampling import round as generation
    from tiny_helpers import assert_round_is_consistent, snapshot

    tiny_cfg.store.db_url = postgres_server.create_database()
    tiny_cfg.sample.batch_size = 2
    real_save = generation.save_trajectory
    calls = {"n": 0}

    def crash_on_third(traj, path):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_save(traj, path)

    monkeypatch.setattr(generation, "save_trajectory", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        generation.generate(tiny_cfg)
    assert snapshot(tiny_cfg)[0]["samples"] == 2
    assert not any(p.name.startswith("feedback") for p in Path(tiny_cfg.store.samples_dir).iterdir())
    monkeypatch.setattr(generation, "save_trajectory", real_save)
    resumed = generation.generate(tiny_cfg)
    assert (resumed.round_name, resumed.samples_new) == ("round-0001", 2)
    assert_round_is_consistent(tiny_cfg, "round-0001", 4)
    assert generation.generate(tiny_cfg).round_name == "round-0002"
