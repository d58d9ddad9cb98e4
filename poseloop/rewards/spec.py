"""Reward specs such as ``pose_accuracy:weights=models/annotators*0.5 + 0.5*latent:models/reward/latest``: the
language that names, configures and weights rewards, and the registry that builds the rewards of poseloop.rewards.builtin.

Spec grammar (see docs/REWARDS.md)::

    spec    := term ( "+" term )*
    term    := [ number "*" ] reward | reward "*" number
    reward  := name [ ":" option ( "," option )* ]
    option  := key "=" value | value          (a bare value is the reward's positional option)
    value   := text without "," | "..." | '...'

A "+" with whitespace on both sides always separates terms; a bare "+" only when a known reward
name (optionally "weight*") follows it, so file names such as ``sac+logos+ava1-l14-linearMSE.pth``
survive unquoted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from poseloop.rewards.builtin import (
    AestheticReward,
    BrightnessReward,
    JpegCompressibilityReward,
    LatentReward,
    OpenClipEmbedder,
    PoseAccuracyReward,
    PromptAttributesReward,
    Reward,
    TextAlignmentReward,
    WarmthReward,
    WeightedReward,
    default_clip_weights,
    load_aesthetic_head,
)

__all__ = [
    "RewardTerm",
    "available_rewards",
    "parse_reward_spec",
    "build_reward",
    "pin_reward_versions",
]


# ----------------------------------------------------------------------------------------------
# Registry and spec parsing


@dataclass(frozen=True)
class _Option:
    kind: type
    default: Any  # None: required or derived from models_dir by the factory
    help: str


@dataclass(frozen=True)
class _Entry:
    help: str
    factory: Callable[[dict[str, Any], str, str], Reward]  # (options, device, models_dir)
    options: dict[str, _Option] = field(default_factory=dict)
    positional: str | None = None  # the option a bare value sets (latent:latest)


def _build_pose(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    weights = Path(o["weights"] or Path(models_dir) / "annotators")
    if o["weights"]:
        from poseloop.models.embedded import ensure_embedded
        from poseloop.config.generation import is_embedded

        if is_embedded(weights):
            ensure_embedded(weights)  # the embedded world's detector comes with its folder, built on first use
    embedded = Path(models_dir) / "tiny-sd15" / "pose_detector"
    if not o["weights"] and not weights.is_dir() and embedded.is_dir():
        raise FileNotFoundError(f"pose_accuracy: no OpenPose weights in {weights}; for the embedded model use its "
                                f"own detector: pose_accuracy:weights={embedded}")
    return PoseAccuracyReward(weights, device=device)


def _build_text(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    clip = OpenClipEmbedder(o["arch"], o["weights"] or default_clip_weights(o["arch"], models_dir), device=device)
    return TextAlignmentReward(clip, scale=o["scale"])


def _build_aesthetic(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    head = load_aesthetic_head(o["weights"] or Path(models_dir) / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    arch = o["clip_arch"]
    clip = OpenClipEmbedder(arch, o["clip_weights"] or default_clip_weights(arch, models_dir), device=device)
    return AestheticReward(clip, head)


def _build_learned(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    """A saved reward model of either kind: the folder's config.json says which (poseloop.rewards.model)."""
    from poseloop.rewards.versions import reward_model_kind

    if reward_model_kind(o["version"], models_dir) == "clip":
        from poseloop.rewards.clip_head import ClipHeadReward

        return ClipHeadReward(o["version"], models_dir=models_dir, device=device)
    return LatentReward(o["version"], models_dir=models_dir, device=device)


_REGISTRY: dict[str, _Entry] = {
    "brightness": _Entry(
        "SYNTHETIC: mean image brightness 0..1, for tests and demos only (trivially hackable)",
        lambda o, d, m: BrightnessReward(),
    ),
    "warmth": _Entry(
        "SYNTHETIC: mean red minus mean blue -1..1 (a warm light scores high), for tests and demos only",
        lambda o, d, m: WarmthReward(),
    ),
    "prompt_attributes": _Entry(
        "SYNTHETIC, embedded world only: share 0..1 of the prompt's shirt, trousers and background colours the "
        "world's reader finds in the image (its stand-in for text_alignment)",
        lambda o, d, m: PromptAttributesReward(),
    ),
    "jpeg_compressibility": _Entry(
        "DDPO task: -(JPEG size in kB at quality 95); not differentiable",
        lambda o, d, m: JpegCompressibilityReward(False, o["quality"]),
        {"quality": _Option(int, 95, "JPEG quality 1..100")},
    ),
    "jpeg_incompressibility": _Entry(
        "DDPO task: +(JPEG size in kB at quality 95); not differentiable",
        lambda o, d, m: JpegCompressibilityReward(True, o["quality"]),
        {"quality": _Option(int, 95, "JPEG quality 1..100")},
    ),
    "pose_accuracy": _Entry(
        "COCO OKS 0..1 of the OpenPose body detected in the image vs metadata['keypoints']; not differentiable",
        _build_pose,
        {"weights": _Option(str, None, "folder with body_pose_model.pth, hand_pose_model.pth, facenet.pth "
                                        "(lllyasviel/Annotators), or the embedded world's detector "
                                        "models/tiny-sd15/pose_detector; default <models_dir>/annotators")},
    ),
    "text_alignment": _Entry(
        "CLIP score: cosine(image, prompt) x scale with open_clip; differentiable in the images",
        _build_text,
        {
            "arch": _Option(str, "ViT-L-14", "open_clip architecture name"),
            "weights": _Option(str, None, "open_clip weights file; default <models_dir>/open_clip/<arch>/open_clip_pytorch_model.bin"),
            "scale": _Option(float, 1.0, "multiplier of the cosine (100 for the usual CLIPScore)"),
        },
    ),
    "aesthetic": _Entry(
        "LAION aesthetic predictor (MLP on L2-normalised CLIP ViT-L-14 image embeddings); differentiable",
        _build_aesthetic,
        {
            "weights": _Option(str, None, "head .pth; default <models_dir>/aesthetic/sac+logos+ava1-l14-linearMSE.pth"),
            # OpenAI's CLIP (the head's training features) uses QuickGELU; open_clip's plain "ViT-L-14" built with
            # pretrained=None uses GELU, so loading the OpenAI weights into it gives different embeddings.
            "clip_arch": _Option(str, "ViT-L-14-quickgelu", "open_clip architecture of the embeddings (OpenAI ViT-L/14 "
                                 "weights: timm/vit_large_patch14_clip_224.openai)"),
            "clip_weights": _Option(str, None, "open_clip weights; default <models_dir>/open_clip/<arch>/open_clip_pytorch_model.bin"),
        },
    ),
    "latent": _Entry(
        "learned reward model from train_reward.py; latent:latest, latent:<version> or latent:<folder>; the latent "
        "kind scores final latents (needs no decoded images), the clip kind decoded images + prompts",
        _build_learned,
        {"version": _Option(str, "latest", "'latest' or a saved reward model's path/version")},
        positional="version",
    ),
}

# PickScore and HPSv2 live in their own module (heavy imports stay inside their factories).
from poseloop.rewards import published as _published  # noqa: E402

_published.register(_REGISTRY, _Entry, _Option)


def available_rewards() -> dict[str, str]:
    """Reward name -> one-line help, for CLIs and error messages."""
    return {name: e.help for name, e in _REGISTRY.items()}


@dataclass(frozen=True)
class RewardTerm:
    """One parsed term of a spec: reward name, raw string options and its weight (None when not given)."""

    name: str
    options: dict[str, str]
    weight: float | None = None


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_LEADING_WEIGHT = re.compile(rf"^\s*({_NUMBER})\s*\*\s*(.*)$", re.S)
_TRAILING_WEIGHT = re.compile(rf"^(.*?)\s*\*\s*({_NUMBER})\s*$", re.S)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unknown_name(name: str) -> ValueError:
    listing = "; ".join(f"{n}: {h}" for n, h in available_rewards().items())
    return ValueError(f"unknown reward {name!r}; available rewards: {', '.join(_REGISTRY)} ({listing})")


def _split_outside_quotes(
    text: str, sep: str, accept: Callable[[str, str], bool] = lambda before, rest: True
) -> list[str]:
    """Split ``text`` at ``sep`` outside quotes, where ``accept(text before sep, text after sep)`` holds."""
    parts, start, quote = [], 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == sep and accept(text[:i], text[i + 1 :]):
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise ValueError(f"unbalanced {quote} quote in reward spec {text!r}")
    parts.append(text[start:])
    return parts


def _split_terms(spec: str) -> list[str]:
    """Split a spec at its term-separating '+' signs (see the module doc for which ones separate)."""

    def accept(before: str, rest: str) -> bool:
        # " + " (spaces both sides) always separates, so a misspelt name still reaches the unknown-name error;
        # a bare "+" separates only before [weight*] a known reward name (file names may contain "+").
        if before[-1:].isspace() and rest[:1].isspace():
            return True
        m = re.match(rf"\s*(?:{_NUMBER}\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*(?=$|[:*+])", rest)
        return bool(m) and m.group(1) in _REGISTRY

    return _split_outside_quotes(spec, "+", accept)


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    return v


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """Parse a spec string into its terms (names checked against the registry; options not yet typed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec; available rewards: {', '.join(_REGISTRY)}")
    terms = []
    for raw in _split_terms(spec):
        text = raw.strip()
        if not text:
            raise ValueError(f"empty term in reward spec {spec!r} (a stray '+'?)")
        weight: float | None = None
        m = _LEADING_WEIGHT.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2).strip()
        m = _TRAILING_WEIGHT.match(text)
        if m:
            if weight is not None:
                raise ValueError(f"term {raw.strip()!r} has two weights; write 'w*name' or 'name*w'")
            text, weight = m.group(1).strip(), float(m.group(2))
        name, _, opt_text = text.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise ValueError(
                f"cannot parse term {raw.strip()!r} of reward spec {spec!r}: expected [weight*]name[:key=value,...][*weight] "
                f"joined by ' + '; available rewards: {', '.join(_REGISTRY)}"
            )
        if name not in _REGISTRY:
            raise _unknown_name(name)
        entry = _REGISTRY[name]
        options: dict[str, str] = {}
        if opt_text.strip():
            for item in _split_outside_quotes(opt_text, ","):
                key, eq, value = item.partition("=")
                if eq and _NAME.match(key.strip()):
                    key = key.strip()
                elif entry.positional is not None:
                    key, value = entry.positional, item  # a bare value (may itself contain '=')
                else:
                    allowed = ", ".join(entry.options) or "none"
                    raise ValueError(f"reward {name!r}: option {item.strip()!r} is not key=value (options: {allowed})")
                if key not in entry.options:
                    allowed = ", ".join(entry.options) or "none"
                    raise ValueError(f"reward {name!r} has no option {key!r} (options: {allowed})")
                if key in options:
                    raise ValueError(f"reward {name!r}: option {key!r} given twice")
                options[key] = _unquote(value)
        terms.append(RewardTerm(name, options, weight))
    return terms


def _typed_options(term: RewardTerm) -> dict[str, Any]:
    entry = _REGISTRY[term.name]
    out: dict[str, Any] = {}
    for key, opt in entry.options.items():
        if key not in term.options:
            out[key] = opt.default
            continue
        raw = term.options[key]
        try:
            out[key] = opt.kind(raw)
        except ValueError:
            raise ValueError(f"reward {term.name!r}: option {key}={raw!r} is not a valid {opt.kind.__name__}") from None
        if opt.kind is str and not raw:
            raise ValueError(f"reward {term.name!r}: option {key} is empty")
    return out


def build_reward(spec: str, *, device: str = "cpu", models_dir: str = "models") -> Reward:
    """Build a reward from a spec (see module doc); one unweighted term gives that reward, anything else a WeightedReward."""
    terms = parse_reward_spec(spec)
    built = []
    for term in terms:
        options = _typed_options(term)  # type errors before any model is loaded
        built.append((term, options))
    members = [(_REGISTRY[t.name].factory(o, device, str(models_dir)), t.weight) for t, o in built]
    if len(members) == 1 and members[0][1] is None:
        return members[0][0]
    return WeightedReward([(r, 1.0 if w is None else w) for r, w in members])


def _quote_option(value: str) -> str:
    """An option value as the spec grammar reads it back (quoted when it holds a separator)."""
    return f'"{value}"' if any(c in value for c in ',+*"\' ') else value


def pin_reward_versions(spec: str, models_dir: str | Path) -> tuple[str, list[str]]:
    """The spec with every learned-reward term's 'latest' replaced by the concrete version, and those versions.

    'latest' moves when train_reward.py runs again; a report (and a re-run of it) must say, and keep,
    which model produced its numbers.
    """
    from poseloop.rewards.versions import read_latest, resolve_reward_path

    terms = parse_reward_spec(spec)
    if not any(t.name == "latent" for t in terms):
        return spec, []
    versions, changed, parts = [], False, []
    for t in terms:
        options = dict(t.options)
        if t.name == "latent":
            requested = options.get("version", "latest")
            if requested == "latest":
                options["version"] = read_latest(models_dir)
                changed = True
            versions.append(resolve_reward_path(options["version"], models_dir).name)
        text = t.name + (":" + ",".join(f"{k}={_quote_option(v)}" for k, v in options.items()) if options else "")
        parts.append(text if t.weight is None else f"{t.weight:g}*{text}")
    return (" + ".join(parts) if changed else spec), versions
