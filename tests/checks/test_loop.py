"""The whole loop on the embedded tiny model: generate -> rate -> train reward -> train policy ->
generate with the new weights -> evaluate. Slow by design (one test); every step is the real script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

import evaluate as evaluate_script
import generate as generate_script
import train_policy as train_policy_script
import train_reward as train_reward_script
from poseloop.data import db
from poseloop.models.policy_files import kohya_lora_name
from poseloop.data.store import SampleStore, load_trajectory


def test_the_whole_loop(models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from webapp import create_app

    torch.set_num_threads(1)  # two threads are slower than one on a loaded 2-core machine
    samples, models = tmp_path / "samples", tmp_path / "models"
    model = ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet",
             str(models_dir / "tiny-sd15" / "controlnet"), "--model.models_dir", str(models)]
    sampler = ["--set", "sample.steps=3", "--set", "sample.width=64", "--set", "sample.height=64",
               "--set", "sample.images_per_group=4"]
    data = ["--data.poses", "standing", "sitting", "t_pose", "waving", "jumping", "walking",
            "--data.prompts", "a dancer", "a robot"]

    # 1. A round of 12 groups x 4 images.
    assert generate_script.main([*model, *sampler, *data, "--store.samples_dir", str(samples)]) == 0
    assert "round-0001: 48 new images" in capsys.readouterr().out

    # 2. Two people label it through the rating app's JSON API; their taste is a hidden rule on the
    #    final latents (channel 0 mean), which the reward model has to discover.
    app = create_app({"samples_dir": samples})
    client = app.test_client()
    store = SampleStore(samples)
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:
        rows = [(x.id, x.group_id, load_trajectory(store.abs(x.trajectory_path)).latents[-1, 0].float().mean().item())
                for x in s.scalars(select(db.Sample))]
    ranked = sorted(rows, key=lambda r: r[2])
    for rank, (sample_id, _, _) in enumerate(ranked):
        score = round(-5 + 10 * rank / (len(ranked) - 1))
        r = client.post("/api/scores", json={"rater": "ann", "sample_id": sample_id, "score": score})
        assert r.status_code == 201, r.get_json()
    by_group: dict[int, list[tuple[int, float]]] = {}
    for sample_id, group_id, value in rows:
        by_group.setdefault(group_id, []).append((sample_id, value))
    for members in by_group.values():
        for i, (a, va) in enumerate(members):
            for b, vb in members[i + 1 :]:
                choice = "left" if va > vb else "right"
                r = client.post("/api/preferences", json={"rater": "bob", "left_id": a, "right_id": b, "choice": choice})
                assert r.status_code == 201, r.get_json()

    # 3. The reward model learns the rule.
    assert train_reward_script.main(["--preset", "quick", "--data.samples_dir", str(samples),
                                     "--output.models_dir", str(models), "--output.version", "rm-1"]) == 0
    capsys.readouterr()
    metrics = json.loads((models / "reward" / "rm-1" / "metrics.json").read_text())
    # Every label given through the app reached the reward model (its accuracy is tested elsewhere).
    assert (metrics["n_scores"], metrics["n_preferences"], metrics["n_groups"]) == (48, 72, 12)
    # Its lineage: no parent, these labels (per round, with the policy that made the round, and their digest).
    assert metrics["parent"] is None
    assert metrics["labels"]["rounds"] == {"round-0001": {"scores": 48, "preferences": 72, "policy": None}}
    assert len(metrics["labels"]["digest"]) == 16
    assert (models / "reward" / "latest").exists()

    # 4. D3PO from the human preferences, then DDPO against the learned reward.
    policy = [*model, *sampler, "--set", "sample.images_per_group=2", "--data.poses", "standing", "sitting",
              "--data.prompts", "a dancer",
              "--set", "train.epochs=1", "--set", "train.groups_per_epoch=2", "--set", "train.batch_size=2"]
    assert train_policy_script.main([*policy, "--algo", "d3po", "--d3po.samples_dir", str(samples)]) == 0
    assert train_policy_script.main([*policy, "--algo", "ddpo", "--reward", "latest"]) == 0
    capsys.readouterr()
    latest = json.loads((models / "policies" / "latest").read_text())["version"]
    assert latest.startswith("ddpo")
    # DDPO continued the D3PO policy (the previous one of this model and target); the lineage says so.
    lineage = json.loads((models / "policies" / latest / "lineage.json").read_text())
    assert lineage["parent"].startswith("d3po") and lineage["inputs"]["reward"] == "latent:version=rm-1"
    assert train_policy_script.main(["--lineage", "latest", "--model.models_dir", str(models)]) == 0
    chain = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip(" <-") for line in chain] == [latest, lineage["parent"], "base"]
    assert (models / "policies" / latest / kohya_lora_name(latest)).is_file()  # under model.models_dir
    assert (models / "policy_runs").is_dir()

    # 5. The next round generates with the new weights and records them.
    assert generate_script.main([*model, *sampler, *data, "--store.samples_dir", str(samples),
                                 "--model.policy", "latest"]) == 0
    assert "round-0002: 48 new images" in capsys.readouterr().out
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:
        rnd = s.scalar(select(db.Round).where(db.Round.name == "round-0002"))
        assert rnd is not None and rnd.policy_version == latest

    # 6. Did it help? Baseline vs candidate on the same seeds, scored with the learned reward.
    assert evaluate_script.main([*model, *sampler, "--data.poses", "standing", "--data.prompts", "a dancer",
                                 "--store.samples_dir", str(samples), "--policy", "latest",
                                 "--eval.metrics", "latent:latest", "--set", "eval.bootstrap=200"]) == 0
    assert f"{latest} vs base on 4 pairs" in capsys.readouterr().out
    report = models / "policies" / latest / "eval" / f"eval-{latest}-vs-base" / "report.md"
    assert "| latent |" in report.read_text()
    assert f"Lineage: {latest} <- {lineage['parent']} <- base" in report.read_text()
