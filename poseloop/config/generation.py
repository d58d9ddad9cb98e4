"""Configuration of generation runs: typed dataclasses, presets as functions, early validation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from poseloop.config.lib import ConfigError, check_name, field

EMBEDDED_NAMES = ("tiny-sd15", "tiny-sdxl")  # the embedded models, built into <models_dir>/<name> on first use
LCM_LORA_FILE = "lcm_lora.safetensors"  # the world's LCM-LoRA, shipped beside its weights (train_world's last stage)

# Suffixes of single-file weights (ComfyUI / A1111 checkpoints, LoRAs); the config tells a file from a folder by them.
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def looks_like_file(source: str) -> bool:
    """Whether a model source names a weights file: an existing file, or a path with a weights suffix."""
    path = Path(source).expanduser()
    return path.is_file() or (path.suffix.lower() in WEIGHT_SUFFIXES and not path.is_dir())


def is_embedded(path: str | os.PathLike[str]) -> bool:
    """Whether a model path names one of the embedded tiny models (or its controlnet subfolder)."""
    parts = Path(path).parts
    return any(name in parts for name in EMBEDDED_NAMES)


EMBEDDED_SD15 = "models/tiny-sd15"
EMBEDDED_SDXL = "models/tiny-sdxl"
EMBEDDED_LCM_LORA = f"{EMBEDDED_SD15}/{LCM_LORA_FILE}"
EMBEDDED_PREVIEW_VAE = f"{EMBEDDED_SD15}/preview_vae"  # the world's preview decoder (poseloop.models.embedded.PREVIEW_DIR)
# The embedded world understands a shirt colour, a trousers colour and a background (poseloop.world.render).
DEFAULT_PROMPTS = (
    "a person in a red shirt and blue trousers, on a beach",
    "a person in a yellow shirt and purple trousers, in a forest",
)


@dataclass
class ModelConfig:
    """Which weights to load and how."""

    arch: str = field("sd15", help="model family", choices=("sd15", "sdxl"))
    base: str = field(EMBEDDED_SD15, help="base pipeline: a hub id, a local diffusers folder or a single-file "
                      "SD1.5/SDXL checkpoint (.safetensors, as in ComfyUI's models/checkpoints); "
                      f"{EMBEDDED_SD15} and {EMBEDDED_SDXL} are the embedded tiny models, built on first use")
    controlnet: str = field(f"{EMBEDDED_SD15}/controlnet",
                            help="OpenPose ControlNet: a hub id, a local folder (e.g. one trained by train_policy.py) "
                            "or a single file (e.g. control_v11p_sd15_openpose.safetensors)")
    vae: str = field("", help="optional VAE override: a hub id (e.g. madebyollin/sdxl-vae-fp16-fix), a folder or "
                     "a single file (e.g. sdxl_vae.safetensors)")
    lora: str = field("", help="optional LoRA to load: a .safetensors file in kohya or diffusers format")
    lora_scale: float = field(1.0, help="strength of the loaded LoRA")
    lcm_lora: str = field("", help="optional LCM-LoRA fused into the UNet at load (before model.lora / model.policy): "
                          "a .safetensors file (kohya or diffusers format), a folder or a hub id, e.g. "
                          "latent-consistency/lcm-lora-sdv1-5 or latent-consistency/lcm-lora-sdxl; use with "
                          "--sample.sampler lcm")
    policy: str = field("", help="a policy trained by train_policy.py: a version under <models_dir>/policies or "
                        "'latest'; loads its LoRA (and its ControlNet when that was trained)")
    models_dir: str = field("models", help="folder of trained reward models and policies")
    dtype: str = field("auto", help="weights dtype; auto = float16 on CUDA, float32 on CPU",
                       choices=("auto", "float32", "float16", "bfloat16"))
    device: str = field("auto", help="torch device; auto = cuda if available, else cpu")
    threads: int = field(0, help="torch CPU threads; 0 = half the cores (at least 1): torch's default of every "
                         "core made a busy 2-core machine 4-18x slower than one thread")
    variant: str = field("", help="weights variant to load from the hub, e.g. fp16")
    local_files_only: bool = field(False, help="never contact the model hub; only local folders and the cache")


@dataclass
class SampleConfig:
    """The DDIM sampler: the same settings drive generation and policy training."""

    width: int = field(0, help="image width in pixels; 0 = the model's native size")
    height: int = field(0, help="image height in pixels; 0 = the model's native size")
    sampler: str = field("ddim", help="ddim = DDIM with eta noise; lcm = latent consistency model steps (diffusers' "
                         "LCMScheduler, 2-8 steps, for an LCM checkpoint or --model.lcm_lora; eta is not used)",
                         choices=("ddim", "lcm"))
    steps: int = field(20, help="sampling steps (trajectory length T)")
    eta: float = field(1.0, help="DDIM stochasticity (<= 1); must be > 0 so that every step has a log-probability")
    guidance_scale: float = field(5.0, help="classifier-free guidance scale; 1 disables CFG")
    controlnet_scale: float = field(1.0, help="ControlNet conditioning scale")
    negative_prompt: str = field("", help="negative prompt used for CFG")
    images_per_group: int = field(4, help="images per (prompt, pose) group, so that raters can compare them")
    batch_size: int = field(8, help="images denoised together")
    seed: int = field(0, help="base seed; each image's seed is derived from it, its group and its index")
    seed_namespace: str = field("", help="mixed into every image's seed; empty = the round name, so each round gets "
                                "fresh seeds; rounds that share a namespace share seeds (baseline vs candidate)")


@dataclass
class DataConfig:
    """Where prompts and poses come from; groups are prompts x poses unless a jsonl pairs them."""

    dataset: str = field("", help='jsonl file, one {"image", "condition_image", "text"} object a line; '
                         "its condition images are used as given")
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS), help="prompts (repeat the flag value)")
    prompts_file: str = field("", help="text file with one prompt a line (replaces --data.prompts)")
    poses: list[str] = field(default_factory=lambda: ["all"],
                             help="names from the built-in pose library, or 'all'; empty with other pose sources")
    keypoints: list[str] = field(default_factory=list,
                                 help="keypoint JSON files (OpenPose-18 body, optional hands/face; pixels or 0..1)")
    photos: list[str] = field(default_factory=list,
                              help="photos to extract poses from with OpenPose (needs data.detector_weights)")
    detector_weights: str = field("", help="folder with body_pose_model.pth, hand_pose_model.pth, facenet.pth")
    draw_hands: bool = field(True, help="draw hand keypoints in pose images when known")
    draw_face: bool = field(True, help="draw face keypoints in pose images when known")
    max_groups: int = field(0, help="use at most this many groups; 0 = all")


@dataclass
class StoreConfig:
    """Where samples and the database live."""

    samples_dir: str = field("samples", help="folder for images, pose images and trajectories")
    db_url: str = field("", help="SQLAlchemy URL; empty = sqlite file <samples_dir>/feedback.sqlite")
    round: str = field("", help="round name; empty = resume the unfinished round with the same plan, else a new one")
    source_dirs: list[str] = field(default_factory=list,
                                   help="folders a dataset's \"image\" files may come from besides the dataset "
                                   "file's own folder and the samples folder (they are copied into the round)")


@dataclass
class GenerateConfig:
    """Everything generate.py needs."""

    model: ModelConfig = field(default_factory=ModelConfig, help="model weights")
    sample: SampleConfig = field(default_factory=SampleConfig, help="sampler")
    data: DataConfig = field(default_factory=DataConfig, help="prompts and poses")
    store: StoreConfig = field(default_factory=StoreConfig, help="output")

    def validate(self) -> None:
        """Check every field before any model loads; raise ConfigError naming the field."""
        validate_model(self.model)
        validate_sample(self.sample)
        validate_data(self.data)
        if not self.store.samples_dir:
            raise ConfigError("store.samples_dir: must not be empty")
        if self.store.round:  # <samples_dir>/<round>/...: '../x' would write outside the samples folder
            check_name(self.store.round, "store.round")


def apply_threads(threads: int) -> int:
    """Set torch's CPU thread count (0 = half the cores, at least 1) and return it."""
    import os

    import torch

    n = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    return n


def _built_on_first_use(path: str) -> bool:
    """Whether a missing path is the LCM-LoRA that loading writes into the embedded tiny-sd15 folder (a fresh
    checkout has none yet); a misspelt name there still fails validation."""
    p = Path(path).expanduser()
    return p.name == LCM_LORA_FILE and p.parent.name == "tiny-sd15"


def _source_can_exist(source: str) -> bool:
    """Whether a model source is an existing path, a syntactically valid hub id, or an embedded model built on first
    use: a misspelt local path ('/data/sd15', './models/x') fails validation instead of a hub lookup."""
    if Path(source).expanduser().exists():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
        return True
    except HFValidationError:
        return is_embedded(source)


def validate_model(m: ModelConfig) -> None:
    """Model fields that can be checked without loading anything."""
    if m.threads < 0:
        raise ConfigError(f"model.threads: must be >= 0 (got {m.threads}); 0 = half the cores")
    if not m.base:
        raise ConfigError("model.base: give a hub id or a local folder, e.g. --model.base stable-diffusion-v1-5/stable-diffusion-v1-5")
    if not m.controlnet:
        raise ConfigError("model.controlnet: give an OpenPose ControlNet, e.g. lllyasviel/sd-controlnet-openpose")
    model_file = "an existing .safetensors file, a diffusers folder or a hub id"
    for name, instead in (("base", model_file), ("controlnet", model_file), ("vae", model_file),
                          ("lcm_lora", "an LCM-LoRA .safetensors file, a folder holding one or a hub id "
                                       "(latent-consistency/lcm-lora-sdv1-5)")):
        value = getattr(m, name)
        if not value:
            continue
        if looks_like_file(value) and not Path(value).expanduser().is_file() and not _built_on_first_use(value):
            raise ConfigError(f"model.{name}: file {value!r} does not exist; pass {instead}")
        if not _source_can_exist(value):
            raise ConfigError(f"model.{name}: {value!r} is neither an existing file or folder nor a hub id (org/name); "
                              "check the path, or pass a hub id")
    if m.policy and m.lora:
        raise ConfigError("model.policy: give either model.policy or model.lora, not both")
    if m.lora and not Path(m.lora).is_file():
        raise ConfigError(f"model.lora: file {m.lora!r} does not exist; pass a .safetensors LoRA file")
    if m.lora and Path(m.lora).suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(f"model.lora: {m.lora!r} is not a weights file (.safetensors, or a weights-only "
                          ".ckpt/.pt/.pth/.bin); pass a LoRA file")
    if m.lora_scale < 0:
        raise ConfigError(f"model.lora_scale: must be >= 0 (got {m.lora_scale})")


# Upper bounds that no real run reaches and that keep a typo (65536, 10**9) from ending in a MemoryError
# minutes later: a 4096 px SDXL image is 16x the native pixel count; a group is 2-16 images.
MAX_SIDE = 4096
MAX_IMAGES_PER_GROUP = 256
MAX_BATCH_SIZE = 1024


def validate_sample(s: SampleConfig) -> None:
    """Sampler fields."""
    for name in ("width", "height"):
        value = getattr(s, name)
        if value < 0 or value % 8:
            raise ConfigError(f"sample.{name}: {value} is not a multiple of 8 (the VAE downsamples by 8); "
                              f"use e.g. 512, or 0 for the model's native size")
        if value > MAX_SIDE:
            raise ConfigError(f"sample.{name}: {value} px is above the limit of {MAX_SIDE} (its latents and "
                              "activations would not fit in memory); use the model's native size, e.g. 512 or 1024")
    if s.steps < 1 or s.steps > 1000:
        raise ConfigError(f"sample.steps: must be between 1 and 1000 (got {s.steps})")
    if not s.eta > 0:
        raise ConfigError(f"sample.eta: must be > 0 (got {s.eta}); with eta = 0 DDIM is deterministic and a "
                          "step has no log-probability, which the trajectories and DDPO/D3PO need")
    if s.eta > 1:
        raise ConfigError(f"sample.eta: must be <= 1 (got {s.eta}); above 1 the DDIM noise exceeds the step's "
                          "variance budget (1 - alpha_bar_prev - sigma^2 < 0); use 1 (DDPO's setting) or less")
    if s.guidance_scale < 1:
        raise ConfigError(f"sample.guidance_scale: must be >= 1 (got {s.guidance_scale}); 1 disables CFG")
    if s.controlnet_scale < 0:
        raise ConfigError(f"sample.controlnet_scale: must be >= 0 (got {s.controlnet_scale})")
    if not 1 <= s.images_per_group <= MAX_IMAGES_PER_GROUP:
        raise ConfigError(f"sample.images_per_group: must be between 1 and {MAX_IMAGES_PER_GROUP} (got "
                          f"{s.images_per_group}); use 2 or more so raters can compare images of a group")
    if not 1 <= s.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"sample.batch_size: must be between 1 and {MAX_BATCH_SIZE} (got {s.batch_size})")
    if s.seed < 0:
        raise ConfigError(f"sample.seed: must be >= 0 (got {s.seed})")


def validate_data(d: DataConfig) -> None:
    """Input files must exist before any work starts."""
    for name in ("dataset", "prompts_file"):
        path = getattr(d, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"data.{name}: file {path!r} does not exist")
    for name in ("keypoints", "photos"):
        for path in getattr(d, name):
            if not Path(path).is_file():
                raise ConfigError(f"data.{name}: file {path!r} does not exist")
    if d.photos and not d.detector_weights:
        raise ConfigError("data.photos: extracting poses needs data.detector_weights, a folder with "
                          "body_pose_model.pth, hand_pose_model.pth and facenet.pth (from lllyasviel/Annotators)")
    if d.max_groups < 0:
        raise ConfigError(f"data.max_groups: must be >= 0 (got {d.max_groups})")
    if not d.dataset and not d.prompts and not d.prompts_file:
        raise ConfigError("data.prompts: no prompts; pass --data.prompts, --data.prompts_file or --data.dataset")
    if not d.dataset and not (d.poses or d.keypoints or d.photos):
        raise ConfigError("data.poses: no poses; pass --data.poses all, --data.keypoints or --data.photos")


# ---- presets -------------------------------------------------------------------------------------


def tiny() -> GenerateConfig:
    """The embedded pose world (tiny SD1.5 architecture, trained here): 64 px people in seconds on a CPU."""
    cfg = GenerateConfig()
    cfg.sample.width = cfg.sample.height = 64
    # 10 DDIM steps draw the figures as faithfully as 20 (pose OKS 0.78 vs 0.73 on a mid-training
    # snapshot) in half the time, which every round, DDPO epoch and D3PO pair pays.
    cfg.sample.steps = 10
    return cfg


def tiny_lcm() -> GenerateConfig:
    """The embedded world with its distilled LCM-LoRA and preview decoder: 4-step rounds without a CFG pass,
    decoded by a TAESD-style AutoencoderTiny, for rating while the round is made (docs/WORLD.md)."""
    cfg = tiny()
    cfg.model.lcm_lora = EMBEDDED_LCM_LORA
    # The VAE's decode is a quarter of a 4-step round; the preview decoder takes about a third of that.
    cfg.model.vae = EMBEDDED_PREVIEW_VAE
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale = "lcm", 4, 1.0
    return cfg


def tiny_sdxl() -> GenerateConfig:
    """The embedded tiny SDXL-architecture model (two text encoders, pooled embeds, time ids)."""
    cfg = GenerateConfig()
    cfg.model.arch = "sdxl"
    cfg.model.base = EMBEDDED_SDXL
    cfg.model.controlnet = f"{EMBEDDED_SDXL}/controlnet"
    cfg.sample.width = cfg.sample.height = 128
    return cfg


def sd15() -> GenerateConfig:
    """Stable Diffusion 1.5 with lllyasviel's OpenPose ControlNet, 512 px."""
    cfg = GenerateConfig()
    cfg.model.base = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    cfg.model.controlnet = "lllyasviel/sd-controlnet-openpose"
    cfg.sample.width = cfg.sample.height = 512
    cfg.sample.batch_size = 4
    return cfg


def sdxl() -> GenerateConfig:
    """SDXL base with thibaud's OpenPose ControlNet and the fp16-safe VAE, 1024 px."""
    cfg = GenerateConfig()
    cfg.model.arch = "sdxl"
    cfg.model.base = "stabilityai/stable-diffusion-xl-base-1.0"
    cfg.model.controlnet = "thibaud/controlnet-openpose-sdxl-1.0"
    cfg.model.vae = "madebyollin/sdxl-vae-fp16-fix"
    cfg.sample.width = cfg.sample.height = 1024
    cfg.sample.batch_size = 2
    return cfg


PRESETS = {"tiny": tiny, "tiny-lcm": tiny_lcm, "tiny-sdxl": tiny_sdxl, "sd15": sd15, "sdxl": sdxl}
