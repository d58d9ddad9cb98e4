"""A generation round: plan groups, sample with trajectories, store files, then register rows.

Order of work guarantees that the database never points at a missing or half-written file: files
are written atomically first, rows are inserted after. A re-run of an interrupted round finds the
slots that have no row yet and regenerates exactly those (same seeds), overwriting any file an
interrupted run left behind; files that no row references are removed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm.auto import tqdm

from poseloop.data import db
from poseloop.config.generation import GenerateConfig
from poseloop.config.lib import ConfigError, check_finite, to_dict
from poseloop.data.inputs import GroupSpec, build_groups, check_source_images
from poseloop.data.locks import folder_lock
from poseloop.models.loading import Components, load_components, resolve_policy
from poseloop.data.openpose import render_pose
from poseloop.sampling.sampler import sample
from poseloop.data.store import SampleStore, Trajectory, atomic_write, save_png, save_trajectory, storage_errors


GENERATE_LOCK = ".generate.lock"  # in the samples folder, held while a generate.py runs


@dataclass
class GenerateResult:
    """What a generate run did."""

    round_name: str
    samples_total: int
    samples_new: int
    samples_repaired: int
    seconds: float
    sampling_seconds: float  # denoising + decoding + writing, without model loading
    round_dir: Path
    db_url: str

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        made = self.samples_new + self.samples_repaired
        per = self.sampling_seconds / made if made else 0.0
        resumed = self.samples_total - made
        repaired = f", {self.samples_repaired} missing files regenerated" if self.samples_repaired else ""
        return (f"{self.round_name}: {self.samples_new} new images ({resumed} already stored{repaired}, "
                f"{self.samples_total} in the round) in {self.seconds:.1f} s, {per:.2f} s/image "
                f"excluding model loading -> "
                f"{self.round_dir} (db {db.shown_db_url(self.db_url)})")


def sample_seed(base_seed: int, namespace: str, group_index: int, sample_index: int) -> int:
    """Deterministic per-image seed: resumes reproduce it; a new namespace (by default the round name) gets fresh ones."""
    digest = hashlib.sha256(f"{base_seed}/{namespace}/{group_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_hash(cfg: GenerateConfig, specs: list[GroupSpec], width: int, height: int) -> str:
    """Hash of everything that determines a round's content (not where it is stored)."""
    plan = {"model": to_dict(cfg.model), "sample": to_dict(cfg.sample), "size": [width, height],
            "groups": [s.fingerprint() for s in specs]}
    plan["sample"].pop("batch_size")  # batching does not change what is generated
    # Fields added later leave older plans' hashes as they were at their defaults: unfinished rounds resume.
    if plan["sample"].get("sampler") == "ddim":
        plan["sample"].pop("sampler")
    if not plan["model"].get("lcm_lora"):
        plan["model"].pop("lcm_lora", None)
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def resolve_size(cfg: GenerateConfig, comp: Components) -> tuple[int, int]:
    """The image size, checked against what the model can take."""
    width = cfg.sample.width or comp.native_size
    height = cfg.sample.height or comp.native_size
    m = comp.resolution_multiple
    for name, value in (("width", width), ("height", height)):
        if value % m:
            raise ConfigError(f"sample.{name}: {value} is not a multiple of {m}, which this model needs "
                              f"(VAE x{comp.vae_scale_factor}, UNet downsampling); try {max(m, round(value / m) * m)}")
    return width, height


class PlanMismatchError(ConfigError):
    """A named round exists with another plan; `differences` lists (field, the round's value, this run's value)."""

    def __init__(self, message: str, round_name: str, differences: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.round_name = round_name
        self.differences = differences


def set_flag(name: str, value: Any) -> str:
    """The --set flag that gives a field this value (lists as JSON), quoted for a POSIX shell."""
    import shlex

    text = json.dumps(value) if isinstance(value, (list, tuple)) else ("none" if value is None else str(value))
    if isinstance(value, bool):
        text = text.lower()
    return f"--set {shlex.quote(f'{name}={text}')}"


def plan_differences(stored: dict[str, Any], cfg: GenerateConfig) -> list[tuple[str, Any, Any]]:
    """(field, the round's value, this run's value) for every plan field that differs from a round's config.

    Fields derived from a policy (its LoRA file, its ControlNet folder) are left out: naming the policy
    is what sets them. The sampler's batch size does not change what is generated and is ignored.
    """
    now = to_dict(cfg)
    out = []
    for section in ("model", "sample", "data"):
        old, new = stored.get(section, {}), now[section]
        for key in new:
            if (section, key) == ("sample", "batch_size") or old.get(key, new[key]) == new[key]:
                continue
            if section == "model" and key in ("lora", "controlnet") and (old.get("policy") or new.get("policy")):
                continue
            out.append((f"{section}.{key}", old.get(key), new[key]))
    return out


def open_round(session: Session, cfg: GenerateConfig, phash: str, planned: int) -> db.Round:
    """The round to fill: the named one, the unfinished one with this plan, or a new one."""
    if cfg.store.round:
        rnd = session.scalar(select(db.Round).where(db.Round.name == cfg.store.round))
        if rnd is not None:
            if rnd.plan_hash != phash:
                diffs = plan_differences(rnd.config, cfg)
                if diffs:
                    what = "; ".join(f"{k} is {old!r} in the round but {new!r} now" for k, old, new in diffs)
                    fix = (f"to resume it pass the round's values ({' '.join(set_flag(k, old) for k, old, _ in diffs)})"
                           f" or pick a new --store.round name")
                else:
                    what = ("the settings agree but the inputs differ: a prompts, dataset, keypoint or condition image "
                            "file changed content since the round was made, or the model's native size changed")
                    fix = "restore those files to resume it, or pick a new --store.round name"
                raise PlanMismatchError(f"store.round: round {rnd.name!r} exists with a different plan: {what}; {fix}",
                                        rnd.name, diffs)
            return rnd
        name = cfg.store.round
    else:
        rnd = session.scalar(select(db.Round).where(db.Round.status == "running", db.Round.plan_hash == phash)
                             .order_by(db.Round.id.desc()))
        if rnd is not None:
            return rnd
        name = db.loop_round_name(db.next_loop_round(session.scalars(select(db.Round.name))))
    rnd = db.Round(name=name, arch=cfg.model.arch, base_model=cfg.model.base, controlnet_model=cfg.model.controlnet,
                   lora_path=cfg.model.lora or None, lora_scale=cfg.model.lora_scale if cfg.model.lora else None,
                   policy_version=cfg.model.policy or None, plan_hash=phash, config_json=json.dumps(to_dict(cfg)), planned_samples=planned)
    session.add(rnd)
    session.flush()
    return rnd


def condition_image(spec: GroupSpec, width: int, height: int, draw_hands: bool, draw_face: bool) -> Image.Image:
    """The pose image of a group: the given one resized, or the keypoints rendered as OpenPose."""
    if spec.condition_image is not None:
        with Image.open(spec.condition_image) as im:
            return im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    assert spec.poses is not None
    return render_pose(spec.poses, width, height, draw_hands=draw_hands, draw_face=draw_face)


def source_image_rel(store: SampleStore, round_name: str, photo: Path | None) -> str | None:
    """A group's source photo as a path relative to the samples folder (like every path in the database).

    A photo outside the samples folder is copied into <round>/sources/ (once per distinct photo), so the
    folder can be moved and the rating app, which serves only files inside it, can show the photo.
    """
    if photo is None:
        return None
    photo = photo.resolve()
    if photo.is_relative_to(store.root):
        return store.rel(photo)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()[:12]
    target = store.source_path(round_name, f"{photo.stem}-{digest}{photo.suffix.lower()}")
    if not target.is_file():
        atomic_write(target, lambda tmp: shutil.copyfile(photo, tmp))
    return store.rel(target)


def write_groups(factory: sessionmaker[Session], store: SampleStore, round_id: int, round_name: str,
                 specs: list[GroupSpec], cfg: GenerateConfig, width: int, height: int) -> dict[int, tuple[int, Image.Image]]:
    """Pose images then group rows (missing ones only); returns {group index: (group id, pose image)}."""
    out: dict[int, tuple[int, Image.Image]] = {}
    with db.session_scope(factory) as session:
        existing = {g.index: g for g in session.scalars(select(db.Group).where(db.Group.round_id == round_id))}
        for index, spec in enumerate(specs):
            image = condition_image(spec, width, height, cfg.data.draw_hands, cfg.data.draw_face)
            group = existing.get(index)
            if group is None:
                path = store.pose_path(round_name, index)
                save_png(image, path)
                group = db.Group(
                    round_id=round_id, index=index, prompt=spec.prompt, pose_name=spec.pose_name,
                    keypoints_json=None if spec.poses is None else json.dumps([p.to_dict() for p in spec.poses]),
                    condition_path=store.rel(path),
                    source_image_path=source_image_rel(store, round_name, spec.source_image),
                )
                session.add(group)
                session.flush()
            out[index] = (group.id, image)
    return out


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Run (or resume) one generation round and return what it did."""
    start = time.perf_counter()
    check_finite(cfg)  # NaN passes every range check in validate() and would only fail at the first row
    cfg.validate()
    # The caller's config is left as given: 'latest' is resolved on a copy.
    cfg = dataclasses.replace(cfg, model=resolve_policy(cfg.model))
    # Inputs are parsed before the model loads so that bad files fail in a second, not a minute.
    specs = build_groups(cfg.data)
    if cfg.data.dataset:  # their "image" files are copied into the round: only images, from allowed folders
        check_source_images(specs, cfg.data.dataset, [cfg.store.samples_dir, *cfg.store.source_dirs])
    store = SampleStore(cfg.store.samples_dir)
    with contextlib.ExitStack() as held:
        # One generate.py per samples folder at a time (two would race for round names and rows); a second
        # stops here, before loading the model, naming the first one's pid.
        with storage_errors(store.root):
            held.enter_context(folder_lock(
                store.root / GENERATE_LOCK, f"samples folder {store.root}",
                "wait for that generate.py to finish (running the same command again then resumes or adds to "
                "its round), or use another --store.samples_dir"))
        comp = load_components(cfg.model)
        width, height = resolve_size(cfg, comp)
        phash = plan_hash(cfg, specs, width, height)

        db_url = cfg.store.db_url or db.default_db_url(store.root)
        # A read-only folder or a full disk ends in a one-line StorageError; rows follow files, so what is
        # stored stays consistent and the same command resumes once the disk has room.
        with storage_errors(store.root):
            return _generate_into(cfg, specs, comp, width, height, phash, store, db_url, start)
    raise AssertionError("unreachable")  # for type checkers: an ExitStack may swallow exceptions, this one does not


def _generate_into(cfg: GenerateConfig, specs: list[GroupSpec], comp: Components, width: int, height: int,
                   phash: str, store: SampleStore, db_url: str, start: float) -> GenerateResult:
    """The part of generate() that writes: round row, pose images, samples, rows, orphan clean-up."""
    k = cfg.sample.images_per_group
    factory = db.open_db(db_url, "store.db_url")
    with db.session_scope(factory) as session:
        rnd = open_round(session, cfg, phash, planned=len(specs) * k)
        round_id, round_name = rnd.id, rnd.name
    groups = write_groups(factory, store, round_id, round_name, specs, cfg, width, height)
    with db.session_scope(factory) as session:
        stored = session.execute(select(db.Group.index, db.Sample.index, db.Sample.image_path,
                                        db.Sample.trajectory_path).join(db.Sample.group)
                                 .where(db.Sample.round_id == round_id)).tuples().all()
    done = {(g, s) for g, s, _, _ in stored}
    # Rows whose files went missing (a deleted or partly copied folder) are regenerated in place from
    # their seeds; the rows, and the labels that point at them, stay.
    repair = {(g, s) for g, s, image, traj in stored
              if not store.abs(image).is_file() or (traj is not None and not store.abs(traj).is_file())}
    todo = [(g, s) for g in range(len(specs)) for s in range(k) if (g, s) not in done or (g, s) in repair]

    sampling_start = time.perf_counter()
    bar = tqdm(total=len(specs) * k, initial=len(done) - len(repair), desc=f"generate {round_name}", unit="img")
    try:  # closed on errors too, so an error message starts on its own line
        for i in range(0, len(todo), cfg.sample.batch_size):
            batch = todo[i : i + cfg.sample.batch_size]
            namespace = cfg.sample.seed_namespace or round_name
            seeds = [sample_seed(cfg.sample.seed, namespace, g, s) for g, s in batch]
            out = sample(comp, [specs[g].prompt for g, _ in batch], [groups[g][1] for g, _ in batch], seeds,
                         cfg.sample, width, height)
            rows = []
            for j, (g, s) in enumerate(batch):
                image_path = store.image_path(round_name, g, s)
                traj_path = store.trajectory_path(round_name, g, s)
                save_png(out.images[j], image_path)
                meta = {"seed": seeds[j], "prompt": specs[g].prompt, "negative_prompt": cfg.sample.negative_prompt,
                        "guidance_scale": cfg.sample.guidance_scale, "controlnet_scale": cfg.sample.controlnet_scale,
                        "eta": cfg.sample.eta, "steps": cfg.sample.steps, "sampler": cfg.sample.sampler,
                        "width": width, "height": height,
                        "round": round_name, "base_model": cfg.model.base, "controlnet": cfg.model.controlnet,
                        "lora": cfg.model.lora, "lora_scale": cfg.model.lora_scale, "policy": cfg.model.policy,
                        "lcm_lora": cfg.model.lcm_lora,
                        "dtype": str(comp.dtype)}
                save_trajectory(Trajectory(out.latents[j], out.log_probs[j], out.timesteps,
                                           {key: str(v) for key, v in meta.items()}), traj_path)
                if (g, s) in repair:
                    continue
                rows.append(db.Sample(
                    round_id=round_id, group_id=groups[g][0], index=s, seed=seeds[j],
                    image_path=store.rel(image_path), trajectory_path=store.rel(traj_path), width=width, height=height,
                    num_steps=cfg.sample.steps, guidance_scale=cfg.sample.guidance_scale,
                    controlnet_scale=cfg.sample.controlnet_scale, eta=cfg.sample.eta,
                ))
            with db.session_scope(factory) as session:
                session.add_all(rows)
            bar.update(len(batch))
    finally:
        bar.close()
    sampling_seconds = time.perf_counter() - sampling_start

    with db.session_scope(factory) as session:
        referenced = [p for row in session.execute(
            select(db.Sample.image_path, db.Sample.trajectory_path).where(db.Sample.round_id == round_id)
        ).tuples() for p in row if p]
        referenced += session.scalars(select(db.Group.condition_path).where(db.Group.round_id == round_id)).all()
        referenced += [p for p in session.scalars(select(db.Group.source_image_path)
                                                  .where(db.Group.round_id == round_id)) if p]
        store.remove_orphans(round_name, referenced)
        session.get(db.Round, round_id).status = "complete"  # type: ignore[union-attr]
    return GenerateResult(round_name=round_name, samples_total=len(specs) * k, samples_new=len(todo) - len(repair),
                          samples_repaired=len(repair),
                          seconds=time.perf_counter() - start, sampling_seconds=sampling_seconds, round_dir=store.root / round_name, db_url=db_url)
