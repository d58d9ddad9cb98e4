"""PostgreSQL for teams: URLs, one-line errors naming the field, the write lock, and the test server itself.

The app's API tests, the concurrency test and the label readers of the trainers run on PostgreSQL too
(tests marked BOTH_DATABASES and the postgresql cases here).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from poseloop import db
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
    ("mysql://", ["--db-url", "not"]),
])
def test_bad_urls_stop_the_app_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str,
                                             words: list[str]) -> None:
    (tmp_path / "samples").mkdir()
    assert webapp_main(["--samples-dir", str(tmp_path / "samples"), "--db-url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --db-url: ") and "\n" not in err, err
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
    with pytest.raises(ConfigError, match="^--db-url: cannot open"):
        create_app({"samples_dir": tmp_path / "samples", "db_url": url.replace("/t", "/missing_t")})


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
