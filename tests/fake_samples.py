"""A labelled samples folder written without any model: random trajectories, PNGs, rows, scores and pairs.

For tests of what happens around the files (unreadable trajectories, label loading) that do not need
a real generation run; the latents follow a rule (channel 0's mean) so a reward model can learn it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from poseloop.data import db
from poseloop.data.store import SampleStore, Trajectory, save_png, save_trajectory


def make_samples(root: Path, groups: int = 6, per_group: int = 3, steps: int = 2, seed: int = 0,
                 db_url: str | None = None) -> dict[int, Path]:
    """Write round-0001 with `groups` x `per_group` samples, scores by one rater and all pairs by another.

    Rows go to `db_url` (default: the folder's SQLite file).

    Returns {sample id: trajectory path}. Scores and preferences follow the mean of latent channel 0.
    """
    store = SampleStore(root)
    gen = torch.Generator().manual_seed(seed)
    factory = db.open_db(db_url or db.default_db_url(root))
    paths: dict[int, Path] = {}
    with db.session_scope(factory) as s:
        rnd = db.Round(name="round-0001", arch="sd15", base_model="fake", controlnet_model="fake", plan_hash="x",
                       config_json=json.dumps({"model": {}, "sample": {}, "data": {}}), status="complete",
                       planned_samples=groups * per_group)
        s.add(rnd)
        s.flush()
        scorer, chooser = db.get_or_create_rater(s, "scorer"), db.get_or_create_rater(s, "chooser")
        for g in range(groups):
            pose = store.pose_path(rnd.name, g)
            save_png(Image.new("RGB", (32, 32), (g * 30, 0, 0)), pose)
            group = db.Group(round_id=rnd.id, index=g, prompt=f"prompt {g % 2}", pose_name=f"pose{g}",
                             condition_path=store.rel(pose))
            s.add(group)
            s.flush()
            members: list[tuple[int, float]] = []
            for k in range(per_group):
                latents = torch.randn(steps + 1, 4, 4, 4, generator=gen).half()
                traj_path, image_path = store.trajectory_path(rnd.name, g, k), store.image_path(rnd.name, g, k)
                save_trajectory(Trajectory(latents, torch.randn(steps, generator=gen),
                                           torch.arange(steps, 0, -1) * 400 + 1,
                                           {"steps": str(steps), "width": "32", "height": "32"}), traj_path)
                save_png(Image.new("RGB", (32, 32)), image_path)
                row = db.Sample(round_id=rnd.id, group_id=group.id, index=k, seed=g * 10 + k,
                                image_path=store.rel(image_path), trajectory_path=store.rel(traj_path), width=32,
                                height=32, num_steps=steps, guidance_scale=5.0, controlnet_scale=1.0, eta=1.0)
                s.add(row)
                s.flush()
                rule = float(latents[-1, 0].float().mean())
                s.add(db.Rating(rater_id=scorer.id, sample_id=row.id, score=round(3 + 2 * rule, 2)))
                members.append((row.id, rule))
                paths[row.id] = traj_path
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    (a, ra), (b, rb) = members[i], members[j]
                    s.add(db.Preference(rater_id=chooser.id, sample_a_id=a, sample_b_id=b, choice="a" if ra > rb else "b"))
    factory.kw["bind"].dispose()  # a PostgreSQL server would otherwise keep the pooled connections open
    return paths


def corrupt(path: Path) -> None:
    """Cut a file in half, as an interrupted copy or a failing disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
