"""Active pair choice: pairs mode ordered by the latest reward model's ensemble disagreement.

A tiny round (3 groups x 4 samples, PNGs from webapp_fixtures) gets stored trajectories whose final
latent is constant (value v_s) per sample, and a 2-member reward model whose members are set by hand:
member m scores a latent as sign_m * v (AlmostPerfect's CNN passing channel 0 through). The members
then disagree on P(a beats b) by |2 sigmoid(v_a - v_b) - 1| / 2, largest for the pair with the largest
|v_a - v_b|, which must come first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from flask.testing import FlaskClient
from sqlalchemy import update

from poseloop.data.db import Sample, open_db, session_scope
from poseloop.rewards.model import LatentRewardModel
from poseloop.rewards.versions import save_reward_model, write_latest
from poseloop.config.reward import RewardModelConfig
from poseloop.data.store import SampleStore, Trajectory, save_trajectory
from webapp import create_app
from webapp.config import ConfigError, parse_args
from webapp.__main__ import main
from webapp_fixtures import Env, build_samples, post_json

SHAPE = (4, 4, 4)


def _add_trajectories(env: Env, values: dict[int, float], shape: tuple[int, int, int] = SHAPE) -> None:
    """A trajectory per sample of `values` whose final latent is `values[sid]` in every channel/pixel."""
    store = SampleStore(env.samples_dir)
    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        for sid, v in values.items():
            rel = f"traj/{sid}.safetensors"
            path = store.abs(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            latents = torch.zeros((3, *shape), dtype=torch.float16)
            latents[-1] = v
            save_trajectory(Trajectory(latents, torch.zeros(2), torch.tensor([500, 0]), {}), path)
            s.execute(update(Sample).where(Sample.id == sid).values(trajectory_path=rel))
    factory.kw["bind"].dispose()


def _hand_set_model(models_dir: Path, version: str, signs: tuple[float, ...], shape: tuple[int, int, int] = SHAPE) -> None:
    """Save a reward model whose member m scores a constant latent v as signs[m] * v (v >= 0)."""
    model = LatentRewardModel(RewardModelConfig(arch="almostperfect"), shape, len(signs), version=version)
    with torch.no_grad():
        for net, sign in zip(model.members, signs):
            for p in net.parameters():
                p.zero_()
            for conv in (net.features[0], net.features[3], net.features[6]):
                conv.weight[0, 0, 1, 1] = 1.0  # channel 0 passes through (ReLU, max-pool) unchanged
            net.head[1].weight[0, :64] = 1 / 64  # hidden unit 0: mean of the pooled channel 0 (= v)
            net.head[3].weight[0, 0] = sign
    save_reward_model(model, models_dir / "reward" / version)
    write_latest(models_dir, version)


@pytest.fixture()
def world(tmp_path: Path) -> Env:
    """One round (3 groups x 4 samples) with trajectories; in group 1, samples 1 and 3 differ the most."""
    env = build_samples(tmp_path, n_rounds=1)
    values = {sid: 0.0 for sids in env.samples.values() for sid in sids}
    g1 = env.samples[env.groups[env.rounds[0]][1]]
    values.update({g1[0]: 1.0, g1[1]: 0.0, g1[2]: 1.2, g1[3]: 3.0})
    _add_trajectories(env, values)
    env.file_names.clear()
    env.known_pair = (g1[1], g1[3])  # type: ignore[attr-defined]
    return env


def _client(env: Env, models_dir: Path, **cfg: object) -> FlaskClient:
    app = create_app({"samples_dir": env.samples_dir, "db_url": env.db_url, "models_dir": models_dir, **cfg})
    app.testing = True
    return app.test_client()


def _pairs(client: FlaskClient, rid: int, query: str) -> dict:
    r = client.get(f"/api/rounds/{rid}/pairs?{query}")
    assert r.status_code == 200, r.json
    return r.json


def _key(p: dict) -> tuple[int, int]:
    return tuple(sorted((p["left"]["sample_id"], p["right"]["sample_id"])))  # type: ignore[return-value]


def test_the_pair_the_members_disagree_on_comes_first(world: Env, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _hand_set_model(models, "rm1", (1.0, -1.0))
    client = _client(world, models, pair_order="active")
    rid = world.rounds[0]
    data = _pairs(client, rid, "rater=ann&count=4")
    assert (data["order"], data["reward_model"]) == ("active", "rm1")
    keys = [_key(p) for p in data["pairs"]]
    assert keys[0] == world.known_pair
    # Then the other pairs of that group by disagreement: |v_a - v_b| 2.0, 1.8, 1.2 (the other groups: 0).
    g1 = world.samples[world.groups[rid][1]]
    assert keys[1:] == [(g1[0], g1[3]), (g1[2], g1[3]), (g1[1], g1[2])]
    # The same request again (a reload) gives the same pairs on the same sides.
    assert _pairs(client, rid, "rater=ann&count=4")["pairs"] == data["pairs"]
    # Coverage order is still there per request, and is what the default app serves.
    cov = _pairs(client, rid, "rater=ann&count=3&order=coverage")
    assert cov["order"] == "coverage" and cov["reward_model"] is None
    assert len({p["group_id"] for p in cov["pairs"]}) == 3  # coverage: one pair of every group
    assert _pairs(_client(world, models), rid, "rater=ann&count=3")["pairs"] == cov["pairs"]


def test_never_twice_exclude_and_raters_spread(world: Env, tmp_path: Path) -> None:
    models = tmp_path / "models"
    _hand_set_model(models, "rm1", (1.0, -1.0))
    client = _client(world, models, pair_order="active")
    rid = world.rounds[0]
    # exclude leaves out the pending first pair.
    a, b = world.known_pair  # type: ignore[attr-defined]
    first = _pairs(client, rid, f"rater=ann&count=1&exclude={b}-{a}")["pairs"]
    assert _key(first[0]) != world.known_pair
    # A rater judges every pair once; none comes back.
    seen = []
    while True:
        data = _pairs(client, rid, "rater=ann&count=1")
        if not data["pairs"]:
            break
        (p,) = data["pairs"]
        assert _key(p) not in seen
        seen.append(_key(p))
        r = post_json(client, "/api/preferences",
                      {"rater": "ann", "left_id": p["left"]["sample_id"], "right_id": p["right"]["sample_id"],
                       "choice": "left"})
        assert r.status_code == 201, r.json
    assert len(seen) == 18 and seen[0] == world.known_pair
    assert data["progress"] == {"done": 18, "total": 18}
    # Other raters: the six pairs of group 1 differ in disagreement (no tie), so everyone gets them in
    # the same order; the 12 pairs of groups 0 and 2, where the members agree (std 0), tie, and there two
    # raters asking at once get different pairs.
    bob = [_key(p) for p in _pairs(client, rid, "rater=bob&count=10")["pairs"]]
    cy = [_key(p) for p in _pairs(client, rid, "rater=cy&count=10")["pairs"]]
    assert bob[:6] == cy[:6] == seen[:6]
    assert bob[6:] != cy[6:]
    # A pair nobody judged comes before one judged already.
    (p,) = _pairs(client, rid, "rater=bob&count=1")["pairs"]
    post_json(client, "/api/preferences", {"rater": "bob", "left_id": p["left"]["sample_id"],
                                           "right_id": p["right"]["sample_id"], "choice": "left"})
    assert _key(p) == world.known_pair
    dan = [_key(p) for p in _pairs(client, rid, "rater=dan&count=10")["pairs"]]
    assert dan[:5] == seen[1:6] and world.known_pair not in dan


def test_fallback_to_coverage_is_said_once(world: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rid = world.rounds[0]
    models = tmp_path / "models"
    coverage = _pairs(_client(world, models), rid, "rater=ann&count=3")["pairs"]
    client = _client(world, models, pair_order="active")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            data = _pairs(client, rid, "rater=ann&count=3")
            assert (data["order"], data["reward_model"]) == ("coverage", None) and data["pairs"] == coverage
    said = [r.getMessage() for r in caplog.records if "no usable reward model" in r.getMessage()]
    assert len(said) == 1 and "train_reward.py" in said[0]

    # A reward model trained on latents of another channel count does not fit the round.
    _hand_set_model(models, "other-vae", (1.0, -1.0), shape=(3, 4, 4))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            data = _pairs(client, rid, "rater=ann&count=3")
            assert data["order"] == "coverage" and data["pairs"] == coverage
    said = [r.getMessage() for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(said) == 1 and "other-vae" in said[0]

    # A newer version that fits is picked up on the next request, without restarting the app.
    _hand_set_model(models, "rm2", (1.0, -1.0))
    data = _pairs(client, rid, "rater=ann&count=1")
    assert (data["order"], data["reward_model"]) == ("active", "rm2")
    assert _key(data["pairs"][0]) == world.known_pair


def test_round_without_trajectories_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = build_samples(tmp_path, n_rounds=1)  # images only, like an imported round
    models = tmp_path / "models"
    _hand_set_model(models, "rm1", (1.0, -1.0))
    client = _client(env, models, pair_order="active")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert _pairs(client, env.rounds[0], "rater=ann&count=2")["order"] == "coverage"
    assert len([r for r in caplog.records if "no stored trajectory" in r.getMessage()]) == 1


def test_bad_order_parameter_and_flag(world: Env, tmp_path: Path) -> None:
    client = _client(world, tmp_path / "models")
    r = client.get(f"/api/rounds/{world.rounds[0]}/pairs?rater=ann&order=random")
    assert r.status_code == 400 and r.is_json and "'order'" in r.json["error"] and "active" in r.json["error"]
    assert client.get("/api/rounds/999/pairs?rater=ann&order=active").status_code == 404
    cfg = parse_args(["--samples_dir", str(world.samples_dir), "--pair_order", "active", "--models_dir", str(tmp_path)])
    assert (cfg.pair_order, cfg.models_dir) == ("active", tmp_path)
    assert parse_args(["--samples_dir", str(world.samples_dir)]).pair_order == "coverage"
    with pytest.raises(SystemExit) as exc:  # argparse: invalid choice, exit status 2
        main(["--samples_dir", str(world.samples_dir), "--pair_order", "random"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="^pair_order: "):
        create_app({"samples_dir": world.samples_dir, "pair_order": "random"})
