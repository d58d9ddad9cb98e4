"""Helpers shared by tests in several folders (import them; fixtures live in conftest): tiny model configs, a
synthetic reward, policy configs, and checks of a stored generation round."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from sqlalchemy import func, select

from poseloop.config import policy as policy_presets
from poseloop.config.generation import GenerateConfig, ModelConfig, SampleConfig, tiny
from poseloop.config.policy import PolicyConfig
from poseloop.data import db
from poseloop.data.store import SampleStore, load_trajectory
from poseloop.policy.trainer import PolicyTrainer
from poseloop.sampling import sampler as sampling
from poseloop.models.loading import Components
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose


def model_cfg(models_dir: Path, **overrides: object) -> ModelConfig:
    """The tiny SD1.5 model config pointing at the session's embedded model, with field overrides."""
    cfg = tiny().model
    cfg.base = str(models_dir / "tiny-sd15")
    cfg.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def eps_of(comp: Components) -> torch.Tensor:
    """Noise prediction (CFG + ControlNet) for fixed inputs: what a saved and reloaded model must reproduce."""
    pose = render_pose(get_builtin_pose("walking"), 64, 64)
    cfg = SampleConfig(guidance_scale=3.0)
    cond = sampling.make_conditioning(comp, ["a walking robot", "a cat"], [pose, pose], cfg, 64, 64)
    side = 64 // comp.vae_scale_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sampling.predict_noise(comp, x, torch.tensor(501), cond, cfg.guidance_scale, 1.0)


# ---- tiny random CLIPs in the published file formats (test_published_rewards, test_clip_reward) ----------------

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP statistics


def save_tiny_clipmodel(model_dir: Path, processor_dir: Path, seed: int = 0, image_size: int = 32) -> None:
    """A transformers CLIPModel folder (config.json + model.safetensors) and a CLIPProcessor folder, random weights."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])  # character-level BPE: no merges needed for a tiny test vocabulary
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(processor_dir)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(model_dir)


def save_tiny_open_clip(config_dir: Path, arch: str, weights: Path, seed: int = 1) -> Path:
    """A tiny open_clip config registered as `arch` and its random weights saved as HPSv2 does: {'state_dict': ...}."""
    import json

    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (config_dir / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir / f"{arch}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, weights)
    return weights


# SD1.5's linear latent -> RGB preview factors: the brightness of the preview image. The tiny model's
# random VAE maps every latent to nearly the same grey (mean 0.509..0.513), so decoded brightness
# carries almost no signal; the preview keeps the meaning "make the image brighter".
PREVIEW_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                            [-0.184, -0.271, -0.473]])


class Brightness:
    """Synthetic reward: mean brightness of the final latents' RGB preview."""

    name = "test_brightness"
    needs_images = False

    def __call__(self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str],
                 metadata: list[dict]) -> torch.Tensor:
        assert latents is not None and len(prompts) == len(metadata) == latents.shape[0]
        return torch.einsum("bchw,cr->brhw", latents.float(), PREVIEW_RGB).mean(dim=(1, 2, 3))


# |r - 1| of a re-scored step with unchanged weights. The samples are re-scored in other batches than
# they were drawn in (train.batch_size, shuffled, vs sample.batch_size), and BLAS may pick another
# kernel or reduction order per batch shape: fp32 noise of ~1e-7 relative in eps moves the averaged
# log-prob by ~1e-7..1e-6 (3.6e-7 seen on another x86 machine). 1e-5 is 10x below DDPO's clip range
# 1e-4, so no step of the first epoch can be clipped; a real mismatch (e.g. bf16 vs fp32) is > 1e-3.
RATIO_TOL = 1e-5


def policy_cfg(models_dir: Path, tmp: Path, **overrides: object) -> PolicyConfig:
    """The tiny policy preset on the session's embedded model, 2 groups x 2 images, 4 steps; `a__b=v` overrides cfg.a.b."""
    cfg = policy_presets.tiny()
    cfg.model.base = str(models_dir / "tiny-sd15")
    cfg.model.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    cfg.sample.width = cfg.sample.height = 64
    cfg.sample.steps = 4
    cfg.sample.images_per_group = 2
    cfg.data.prompts = ["a dancer"]
    cfg.data.poses = ["standing", "sitting"]
    cfg.train.groups_per_epoch = 2
    cfg.train.batch_size = 2
    cfg.train.epochs = 1
    cfg.output.root = str(tmp / "policies")
    cfg.output.runs_dir = str(tmp / "runs")
    cfg.output.grid_every = cfg.output.export_every = 0
    cfg.d3po.samples_dir = str(tmp / "samples")
    for key, value in overrides.items():
        obj = cfg
        *parents, last = key.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg


def fixed_seed_rewards(trainer: PolicyTrainer, n: int = 16) -> torch.Tensor:
    """Rewards [n] of fixed seeds on the groups in turn, under the trainer's current policy (paired before/after)."""
    groups = [i % len(trainer.specs) for i in range(n)]
    _, rewards, _ = trainer.sample_groups(groups, [1000 + i for i in range(n)], Brightness())
    assert rewards is not None
    return rewards.float()


def session_for(cfg: GenerateConfig):  # -> sessionmaker
    """A session factory on the round's database."""
    return db.open_db(cfg.store.db_url or db.default_db_url(cfg.store.samples_dir))


def snapshot(cfg: GenerateConfig) -> tuple[dict[str, int], list[str]]:
    """Row counts and the list of files: what 'nothing stored is touched' compares."""
    factory = session_for(cfg)
    with db.session_scope(factory) as s:
        counts = {t.__tablename__: s.scalar(select(func.count()).select_from(t))
                  for t in (db.Round, db.Group, db.Sample)}
    root = Path(cfg.store.samples_dir)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "feedback" not in p.name)
    return counts, files


def assert_round_is_consistent(cfg: GenerateConfig, round_name: str, expected_samples: int) -> None:
    """Every row points at a complete file and every file belongs to a row."""
    store = SampleStore(cfg.store.samples_dir)
    with db.session_scope(session_for(cfg)) as s:
        rnd = s.scalar(select(db.Round).where(db.Round.name == round_name))
        assert rnd is not None and rnd.status == "complete"
        samples = s.scalars(select(db.Sample).where(db.Sample.round_id == rnd.id)).all()
        groups = s.scalars(select(db.Group).where(db.Group.round_id == rnd.id)).all()
        assert len(samples) == expected_samples
        assert len({(x.group_id, x.index) for x in samples}) == expected_samples
        referenced = {store.abs(g.condition_path) for g in groups}
        referenced |= {store.abs(g.source_image_path) for g in groups if g.source_image_path}
        for x in samples:
            image = store.abs(x.image_path)
            with Image.open(image) as im:
                assert im.size == (x.width, x.height)
            traj = load_trajectory(store.abs(x.trajectory_path))  # type: ignore[arg-type]
            assert traj.latents.shape[0] == x.num_steps + 1
            assert traj.metadata["seed"] == str(x.seed)
            referenced |= {image, store.abs(x.trajectory_path)}  # type: ignore[arg-type]
    on_disk = {p.resolve() for p in (store.root / round_name).rglob("*") if p.is_file()}
    assert on_disk == referenced
