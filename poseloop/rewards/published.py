"""Published reward models loaded from the user's files (nothing is downloaded): PickScore and HPSv2 / v2.1.

Both are CLIP models scoring (image, prompt) pairs; both are differentiable in the images (their
preprocessing is done in torch on 0..1 tensors), so ReFL and DRaFT can use them. The registry entries
(``pickscore``, ``hps``) are added to ``poseloop.rewards.spec``' registry by ``register``; transformers and
open_clip are imported only when a reward is built. ImageReward (``image_reward``) lives in poseloop.rewards.image_reward
and is registered here too: see docs/REWARDS.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from poseloop.rewards.images import check_batch, normalise, resize

__all__ = [
    "PickScoreReward",
    "HPSReward",
    "resize_center_crop",
    "resize_longest_pad",
    "load_pickscore",
    "load_hps_model",
    "register",
]

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO = "xswu/HPSv2"  # Hugging Face repo holding HPS_v2_compressed.pt and HPS_v2.1_compressed.pt


def resize_center_crop(
    images: torch.Tensor, shortest_edge: int, crop: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIPImageProcessor in torch (differentiable): short side to ``shortest_edge``, centre crop, normalise."""
    h, w = images.shape[-2:]
    # transformers' get_resize_output_image_size: the long side is int(), not rounded.
    if h <= w:
        nh, nw = shortest_edge, int(shortest_edge * w / h)
    else:
        nh, nw = int(shortest_edge * h / w), shortest_edge
    x = resize(images.float(), (nh, nw))
    ch, cw = crop
    if nh < ch or nw < cw:  # the processor pads with zeros before cropping in this case
        x = F.pad(x, [max(cw - nw, 0) // 2, (max(cw - nw, 0) + 1) // 2, max(ch - nh, 0) // 2, (max(ch - nh, 0) + 1) // 2])
        nh, nw = x.shape[-2:]
    # transformers' center_crop: top = (h - crop_h) // 2 (floor), unlike torchvision's round.
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return normalise(x[..., top : top + ch, left : left + cw], mean, std)


def resize_longest_pad(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HPSv2's eval transform in torch (differentiable): long side to ``size``, pad with black to a square, normalise."""
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    x = images.float()
    # HPSv2's ResizeMaxSize(fill=0) resizes and pads only when the scale is not 1.
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = resize(x, (nh, nw))
        ph, pw = size - nh, size - nw
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)
    return normalise(x, mean, std)


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from CLIPModel.get_*_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------------------
# PickScore


def _missing_pickscore(option: str, path: Path, what: str, repo: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"pickscore: {option}={path}: {what} not found. Download it elsewhere and copy the folder here, e.g. "
        f"huggingface-cli download {repo} --local-dir {path}"
    )


def load_pickscore(model_dir: str | Path, processor_dir: str | Path | None = None, *, device: str = "cpu") -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from local folders, frozen and in eval mode; nothing is downloaded."""
    model_dir = Path(model_dir).expanduser()
    processor_dir = model_dir if processor_dir is None else Path(processor_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise _missing_pickscore("model", model_dir, "a transformers CLIPModel folder (config.json + weights)", PICKSCORE_REPO)
    # preprocessor_config.json in hub repos; transformers 5's save_pretrained writes processor_config.json.
    if not any((processor_dir / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise _missing_pickscore(
            "processor", processor_dir, "a CLIP processor folder (preprocessor_config.json + tokenizer files)",
            PICKSCORE_PROCESSOR_REPO,
        )
    from transformers import AutoProcessor, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"pickscore: model={model_dir}: could not load a CLIPModel ({type(e).__name__}: {e})") from e
    try:
        processor = AutoProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"pickscore: processor={processor_dir}: could not load a CLIP processor ({type(e).__name__}: {e})") from e
    return model.eval().requires_grad_(False).to(device), processor


def _size_item(size: Any, key: str) -> Any:
    """size[key] of a processor size: a dict (transformers 4) or a SizeDict (5)."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


class PickScoreReward:
    """PickScore: logit_scale.exp() x cosine(CLIP image, CLIP prompt) of a CLIPModel (about 18..24 with PickScore_v1)."""

    name = "pickscore"
    needs_images = True
    differentiable = True

    def __init__(self, model: Any, processor: Any, *, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)  # frozen: gradients reach the images only
        self.processor = processor
        ip = processor.image_processor
        shortest, ch, cw = _size_item(ip.size, "shortest_edge"), _size_item(ip.crop_size, "height"), _size_item(ip.crop_size, "width")
        if shortest is None or ch is None or cw is None:
            raise ValueError(f"pickscore: processor size {ip.size} / crop_size {ip.crop_size} is not a CLIP image "
                             "processor's (resize shortest_edge, centre crop height x width)")
        self.shortest_edge, self.crop = int(shortest), (int(ch), int(cw))
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        self._text_cache: dict[str, torch.Tensor] = {}

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Processor-equivalent pixel values of images [B, 3, H, W] in 0..1 (differentiable)."""
        return resize_center_crop(images.to(self.device), self.shortest_edge, self.crop, self.mean, self.std)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D]."""
        return F.normalize(_features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised prompt embeddings [B, D], cached per prompt (PickScore's tokenisation: pad, truncate at 77)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            tok = self.processor.tokenizer(todo, padding=True, truncation=True, max_length=77, return_tensors="pt")
            with torch.no_grad():
                feats = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()}))
            if len(self._text_cache) + len(todo) > 10000:  # bound memory for open-ended prompt streams
                self._text_cache.clear()
            self._text_cache.update(zip(todo, F.normalize(feats.float(), dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """PickScore per (image, prompt) pair [B]."""
        images = check_batch(self.name, images, prompts, metadata)
        scale = self.model.logit_scale.detach().float().exp()
        score = scale * (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return score.to(images.device)


# ----------------------------------------------------------------------------------------------
# HPSv2 / HPSv2.1


def load_hps_model(weights: str | Path, arch: str = "ViT-H-14", *, device: str = "cpu") -> Any:
    """An open_clip ``arch`` model with an HPS checkpoint's ``state_dict`` loaded, frozen; nothing is downloaded."""
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(
            f"hps: weights={weights} not found. HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) is in the Hugging Face "
            f"repo {HPS_REPO}: huggingface-cli download {HPS_REPO} HPS_v2.1_compressed.pt --local-dir {weights.parent}"
        )
    import open_clip

    try:
        # pretrained=None: build from the config only (HPS replaces every weight anyway).
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    except RuntimeError as e:
        raise ValueError(f"hps: unknown open_clip architecture arch={arch!r} ({e}); HPSv2 is ViT-H-14") from e
    try:
        ckpt = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors
        raise ValueError(f"hps: weights={weights}: not a torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        found = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"hps: weights={weights}: expected an HPS checkpoint {{'state_dict': ...}}; found {found}")
    try:
        model.load_state_dict(ckpt["state_dict"])  # strict, as HPSv2's img_score.py
    except RuntimeError as e:
        raise ValueError(f"hps: weights={weights} do not fit open_clip {arch}: {str(e).splitlines()[0]}") from e
    return model.eval().requires_grad_(False).to(device)


class HPSReward:
    """HPSv2 / v2.1: cosine(image, prompt) of the HPS-tuned open_clip ViT-H-14 x ``scale`` (1; 100 gives the paper's numbers)."""

    name = "hps"
    needs_images = True
    differentiable = True

    def __init__(self, model: Any, arch: str = "ViT-H-14", *, scale: float = 1.0, device: str = "cpu") -> None:
        import open_clip

        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.scale = float(scale)
        size = getattr(model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # HPSv2 calls image_transform(mean=None, std=None): open_clip's OpenAI statistics.
        self.mean = tuple(getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self._text_cache: dict[str, torch.Tensor] = {}

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """HPSv2-equivalent model input of images [B, 3, H, W] in 0..1 (differentiable)."""
        return resize_longest_pad(images.to(self.device), self.size, self.mean, self.std)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised prompt embeddings [B, D], cached per prompt."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            with torch.no_grad():
                feats = self.model.encode_text(self.tokenizer(todo).to(self.device)).float()
            if len(self._text_cache) + len(todo) > 10000:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, F.normalize(feats, dim=-1)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """HPS score per (image, prompt) pair [B]: diag(normalised image @ normalised text.T) x scale."""
        images = check_batch(self.name, images, prompts, metadata)
        img = F.normalize(self.model.encode_image(self.pixel_values(images)).float(), dim=-1)
        return (self.scale * (img * self.text_embeds(prompts)).sum(-1)).to(images.device)


# ----------------------------------------------------------------------------------------------
# Registry entries


def _build_pickscore(o: dict[str, Any], device: str, models_dir: str) -> PickScoreReward:
    model_dir = o["model"] or Path(models_dir) / "pickscore" / "PickScore_v1"
    model, processor = load_pickscore(model_dir, o["processor"], device=device)
    return PickScoreReward(model, processor, device=device)


def _build_hps(o: dict[str, Any], device: str, models_dir: str) -> HPSReward:
    weights = o["weights"] or Path(models_dir) / "hps" / "HPS_v2.1_compressed.pt"
    return HPSReward(load_hps_model(weights, o["arch"], device=device), o["arch"], scale=o["scale"], device=device)


def _build_image_reward(o: dict[str, Any], device: str, models_dir: str) -> Any:
    from poseloop.rewards.image_reward import build  # imported late: poseloop.rewards.image_reward imports this module

    return build(o, device, models_dir)


def register(registry: dict, entry: type, option: type) -> None:
    """Add the ``pickscore``, ``hps`` and ``image_reward`` entries to poseloop.rewards.spec's registry (called by that module)."""
    registry["pickscore"] = entry(
        "PickScore (transformers CLIPModel + processor folders): logit_scale.exp() x cosine(image, prompt); differentiable",
        _build_pickscore,
        {
            "model": option(str, None, f"CLIPModel folder ({PICKSCORE_REPO}); default <models_dir>/pickscore/PickScore_v1"),
            "processor": option(str, None, f"CLIP processor folder ({PICKSCORE_PROCESSOR_REPO}); default: the model folder"),
        },
    )
    registry["hps"] = entry(
        "HPSv2 / v2.1 (open_clip ViT-H-14 + HPS checkpoint): cosine(image, prompt) x scale; differentiable",
        _build_hps,
        {
            "weights": option(str, None, "HPS_v2.1_compressed.pt or HPS_v2_compressed.pt ({'state_dict': ...}); "
                                         "default <models_dir>/hps/HPS_v2.1_compressed.pt"),
            "arch": option(str, "ViT-H-14", "open_clip architecture (another only for small or test models)"),
            "scale": option(float, 1.0, "multiplier of the cosine (100 for HPSv2's reported numbers)"),
        },
    )
    registry["image_reward"] = entry(
        "ImageReward v1.0 (ImageReward.pt + med_config.json + bert-base-uncased tokenizer, on transformers' BLIP "
        "classes): standardised BLIP image-text MLP score; differentiable",
        _build_image_reward,
        {
            "weights": option(str, None, "ImageReward.pt (THUDM/ImageReward); default <models_dir>/ImageReward/ImageReward.pt"),
            "med_config": option(str, None, "BLIP med_config.json (THUDM/ImageReward); "
                                            "default <models_dir>/ImageReward/med_config.json"),
            "tokenizer": option(str, None, "bert-base-uncased tokenizer folder (vocab.txt); "
                                           "default <models_dir>/ImageReward/bert-base-uncased"),
        },
    )
