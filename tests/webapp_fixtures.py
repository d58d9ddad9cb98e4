"""Shared fixtures of the webapp tests: a temporary samples dir + database (SQLite, or PostgreSQL where a test
parametrizes `db_backend`) with two small rounds."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageDraw
from sqlalchemy import select

from poseloop.data.db import Group, Round, Sample, default_db_url, open_db, session_scope

PROMPTS = ["a dancer <b>on</b> a \"stage\" & friends", "a climber on a wall", "a runner at dawn"]
K = 4


@dataclass
class Env:
    """A built samples dir: where it is and the ids of its rows."""

    samples_dir: Path
    db_url: str
    rounds: list[int] = field(default_factory=list)
    groups: dict[int, list[int]] = field(default_factory=dict)  # round id -> group ids
    samples: dict[int, list[int]] = field(default_factory=dict)  # group id -> sample ids (index order)
    file_names: dict[int, str] = field(default_factory=dict)  # sample id -> file name


def _png(path: Path, color: tuple[int, int, int], label: str, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(img).text((4, 4), label, fill=(255, 255, 255))
    img.save(path)


def build_samples(root: Path, n_rounds: int = 2, n_groups: int = 3, k: int = K, db_url: str | None = None) -> Env:
    """Write PNGs and rows for `n_rounds` rounds of `n_groups` groups with `k` samples each (default: SQLite file)."""
    samples_dir = root / "samples"
    samples_dir.mkdir(parents=True)
    env = Env(samples_dir, db_url or default_db_url(samples_dir))
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        for r in range(n_rounds):
            rnd = Round(name=f"round{r}", status="complete", arch="sd15", base_model="tiny", controlnet_model="tiny",
                        plan_hash="0" * 64, config_json=json.dumps({"r": r}), planned_samples=n_groups * k)
            s.add(rnd)
            s.flush()
            env.rounds.append(rnd.id)
            env.groups[rnd.id] = []
            for g in range(n_groups):
                cond = f"round{r}/poses/group{g:03d}.png"
                _png(samples_dir / cond, (0, 0, 0), f"pose{g}")
                grp = Group(round_id=rnd.id, index=g, prompt=PROMPTS[g % len(PROMPTS)], pose_name=f"pose_{g}",
                            condition_path=cond)
                s.add(grp)
                s.flush()
                env.groups[rnd.id].append(grp.id)
                env.samples[grp.id] = []
                for i in range(k):
                    rel = f"round{r}/images/g{g:03d}_s{i}.png"
                    _png(samples_dir / rel, (40 * i + 40, 30 * g + 60, 90 + 50 * r), f"r{r}g{g}s{i}")
                    smp = Sample(round_id=rnd.id, group_id=grp.id, index=i, seed=1000 + i, image_path=rel,
                                 width=64, height=64, num_steps=4, guidance_scale=7.5, controlnet_scale=1.0, eta=1.0)
                    s.add(smp)
                    s.flush()
                    env.samples[grp.id].append(smp.id)
                    env.file_names[smp.id] = f"g{g:03d}_s{i}.png"
    factory.kw["bind"].dispose()
    return env


def add_round(env: Env, name: str, status: str, k: int = 2) -> tuple[int, list[int]]:
    """A newer round with one group of `k` samples (reusing round0's images) in the given status."""
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        rnd = Round(name=name, status=status, arch="sd15", base_model="tiny", controlnet_model="tiny",
                    plan_hash="2" * 64, config_json="{}", planned_samples=4 * k)
        s.add(rnd)
        s.flush()
        grp = Group(round_id=rnd.id, index=0, prompt="an unfinished prompt", pose_name="p",
                    condition_path="round0/poses/group000.png")
        s.add(grp)
        s.flush()
        ids = []
        for i in range(k):
            smp = Sample(round_id=rnd.id, group_id=grp.id, index=i, seed=i, image_path=f"round0/images/g000_s{i}.png",
                         width=64, height=64, num_steps=4, guidance_scale=7.5, controlnet_scale=1.0, eta=1.0)
            s.add(smp)
            s.flush()
            ids.append(smp.id)
        rid = rnd.id
    factory.kw["bind"].dispose()
    return rid, ids


# The tests that also run on PostgreSQL (a throwaway server, tests/pg_server.py) carry this mark.
BOTH_DATABASES = pytest.mark.parametrize("db_backend", ["sqlite", "postgresql"])


@pytest.fixture()
def env(tmp_path: Path, backend_db_url: str | None) -> Env:
    """Two rounds x 3 groups x 4 samples in a fresh temporary samples dir and database (see `db_backend`)."""
    return build_samples(tmp_path, db_url=backend_db_url)


@pytest.fixture()
def app(env: Env) -> Iterator[Flask]:
    """The app over `env`, without a token."""
    from webapp import create_app

    application = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url})
    application.testing = True
    yield application
    application.extensions["poseloop_store"].dispose()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """A Flask test client of `app`."""
    return app.test_client()


def post_json(client: FlaskClient, path: str, body: Any, **kw: Any) -> Any:
    """POST a JSON body the way the page does."""
    return client.post(path, data=json.dumps(body), content_type="application/json", **kw)


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served by waitress on loopback in a background thread."""

    def __init__(self, app: Flask, threads: int = 8) -> None:
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=free_port(), threads=threads)
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Closing only the listening socket leaves browser keep-alive connections running the loop; closing the
        # channels from this thread races the loop's select() (EBADF), so the loop closes them itself.
        def close_all() -> None:
            for channel in list(self.server._map.values()):
                channel.close()

        self.server.trigger.pull_trigger(close_all)
        self.thread.join(timeout=5)
        self.server.task_dispatcher.shutdown()


@pytest.fixture()
def live_server(app: Flask) -> Iterator[LiveServer]:
    """`app` on a real HTTP port."""
    with LiveServer(app) as srv:
        yield srv


def make_chrome(user_data_dir: Path, width: int = 1400, height: int = 900) -> Any:
    """Headless Debian Chromium via the system chromedriver; nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


# ---------------------------------------------------------------- blind comparisons

# Distinctive strings and ids, so a test can search everything the blind page receives for them.
BASE_ROUND = "baselineRoundQ7"
CAND_ROUND = "candidateRoundZ9"
CAND_POLICY = "policyVersionX3"
BASE_ID0, CAND_ID0, GROUP_ID0 = 7_000_101, 8_000_201, 9_000_301
CMP_PROMPTS = ["a skater mid-jump", "a yogi in tree pose"]


@dataclass
class Blind:
    """A comparison built by `build_comparison`: ids, secrets and where the files are."""

    comparison_id: int
    name: str
    baseline_round_id: int
    candidate_round_id: int
    # token "g-s" -> (baseline sample id, candidate sample id)
    pairs: dict[str, tuple[int, int]] = field(default_factory=dict)
    files: dict[int, Path] = field(default_factory=dict)  # sample id -> image file
    group_ids: list[int] = field(default_factory=list)

    def secrets(self) -> list[str]:
        """Every string that would tell the sides apart if the blind page received it."""
        ids = [i for p in self.pairs.values() for i in p] + self.group_ids
        return [BASE_ROUND, CAND_ROUND, CAND_POLICY, *map(str, ids), *(f.name for f in self.files.values())]


def build_comparison(env: Env, n_groups: int = 2, k: int = 3, name: str = "eval-0001") -> Blind:
    """A baseline round and a candidate round with matching groups/samples and a Comparison row.

    The candidate round has one extra group (index n_groups) that the baseline lacks: it is no pair.
    """
    from poseloop.data.db import Comparison

    factory = open_db(env.db_url)
    gid, ids = GROUP_ID0, {"b": BASE_ID0, "c": CAND_ID0}
    with session_scope(factory) as s:
        rounds = {}
        for side, rname, policy, extra in (("b", BASE_ROUND, None, 0), ("c", CAND_ROUND, CAND_POLICY, 1)):
            rnd = Round(name=rname, status="complete", arch="sd15", base_model="tiny", controlnet_model="tiny",
                        policy_version=policy, plan_hash="1" * 64, config_json="{}",
                        planned_samples=(n_groups + extra) * k)
            s.add(rnd)
            s.flush()
            rounds[side] = rnd.id
            for g in range(n_groups + extra):
                cond = f"{rname}/poses/p{g}.png"
                _png(env.samples_dir / cond, (0, 0, 0), f"pose{g}")
                grp = Group(id=gid, round_id=rnd.id, index=g, prompt=CMP_PROMPTS[g % 2], pose_name=f"pose_{g}",
                            condition_path=cond)
                gid += 1
                s.add(grp)
                s.flush()
                for i in range(k):
                    rel = f"{rname}/images/{rname}_{g}_{i}.png"
                    color = (200, 60 + 40 * i, 60) if side == "c" else (60, 60 + 40 * i, 200)
                    _png(env.samples_dir / rel, color, f"{side}{g}{i}")
                    smp = Sample(id=ids[side], round_id=rnd.id, group_id=grp.id, index=i, seed=500 + i,
                                 image_path=rel, width=64, height=64, num_steps=4, guidance_scale=7.5,
                                 controlnet_scale=1.0, eta=1.0)
                    ids[side] += 1
                    s.add(smp)
                    s.flush()
        comp = Comparison(name=name, baseline_round_id=rounds["b"], candidate_round_id=rounds["c"])
        s.add(comp)
        s.flush()
        blind = Blind(comp.id, name, rounds["b"], rounds["c"], group_ids=list(range(GROUP_ID0, gid)))
        for smp in s.scalars(select(Sample).where(Sample.round_id.in_(rounds.values()))):
            blind.files[smp.id] = env.samples_dir / smp.image_path
        base = {(smp.group.index, smp.index): smp.id for smp in s.scalars(select(Sample).where(Sample.round_id == rounds["b"]))}
        cand = {(smp.group.index, smp.index): smp.id for smp in s.scalars(select(Sample).where(Sample.round_id == rounds["c"]))}
        for key in sorted(base):
            blind.pairs[f"{key[0]}-{key[1]}"] = (base[key], cand[key])
    factory.kw["bind"].dispose()
    return blind


@pytest.fixture()
def cmp(env: Env) -> Blind:
    """A blind comparison (2 groups x 3 samples = 6 pairs) added to `env` before the app opens it."""
    return build_comparison(env)
