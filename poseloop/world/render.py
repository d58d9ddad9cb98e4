"""The embedded pose world: people rendered procedurally from OpenPose-18 keypoints and a prompt.

The embedded model (poseloop.models.embedded) is trained on this world, its pose detector
(poseloop.world.detector) is trained on it, and its measurements (attribute accuracy, body masks)
come from it. A prompt names a shirt colour, a trousers colour and a background from a small
vocabulary; everything else varies per image (shades, a warm/cool light tint, limb thickness,
background texture) so that images of one (prompt, pose) group differ in ways a person can prefer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from poseloop.data.inputs import InputError
from poseloop.data.openpose import render_pose
from poseloop.data.poses import BUILTIN_POSES, Pose, _figure, _place

# Clothing colours and backgrounds use disjoint words ("light blue" sky vs "blue" shirt confused a
# text encoder in a feasibility run).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "yellow": (230, 200, 30),
    "blue": (35, 70, 210),
    "green": (35, 160, 55),
    "purple": (130, 45, 170),
    "white": (238, 238, 238),
}
BACKGROUNDS: dict[str, str] = {"beach": "on a beach", "forest": "in a forest", "night": "at night",
                               "studio": "in a studio"}
SKIN = ((224, 172, 130), (198, 140, 100), (150, 100, 70), (240, 200, 170))
HAIR = ((40, 28, 20), (90, 60, 30), (20, 20, 20), (170, 130, 70))
LIGHT_LEVELS = (0.65, 1.2)  # the background's dim and bright light (Look.background_shade modes)
TINT_STRENGTH = 0.25  # a full warm tint multiplies red by 1.25 and blue by 0.75
_SS = 4  # supersampling factor of the renderer (antialiased edges after the BOX shrink)


class WorldError(InputError):
    """A bad input to the embedded world (prompt words, image size, keypoints)."""


@dataclass(frozen=True)
class Attributes:
    """What a prompt asks for: shirt colour, trousers colour, background."""

    shirt: str
    trousers: str
    background: str

    def prompt(self) -> str:
        """The canonical prompt for these attributes."""
        return f"a person in a {self.shirt} shirt and {self.trousers} trousers, {BACKGROUNDS[self.background]}"


def all_attributes() -> list[Attributes]:
    """Every combination of the vocabulary (6 x 6 x 4 = 144)."""
    return [Attributes(s, t, b) for s in COLOURS for t in COLOURS for b in BACKGROUNDS]


_SHIRT = re.compile(r"([a-z]+)\s+shirt\b")
_TROUSERS = re.compile(r"([a-z]+)\s+(?:trousers|pants)\b")


def parse_prompt(prompt: str) -> Attributes:
    """Read shirt, trousers and background words from a prompt; WorldError names an unknown word."""
    text = prompt.lower()
    found = {}
    for part, pattern in (("shirt", _SHIRT), ("trousers", _TROUSERS)):
        m = pattern.search(text)
        if m is None:
            raise WorldError(f"prompt {prompt!r}: no '<colour> {part}' phrase; the embedded world understands "
                             f"e.g. {Attributes('red', 'blue', 'beach').prompt()!r}")
        if m.group(1) not in COLOURS:
            raise WorldError(f"prompt {prompt!r}: unknown colour word {m.group(1)!r} for the {part}; "
                             f"known colours: {', '.join(COLOURS)}")
        found[part] = m.group(1)
    backgrounds = [b for b in BACKGROUNDS if re.search(rf"\b{b}\b", text)]
    if len(backgrounds) != 1:
        raise WorldError(f"prompt {prompt!r}: name exactly one background of {', '.join(BACKGROUNDS)} "
                         f"(found {len(backgrounds)})")
    return Attributes(found["shirt"], found["trousers"], backgrounds[0])


def check_size(size: int) -> None:
    """The world is rendered square; the embedded VAE downsamples by 4."""
    if size < 32 or size % 4:
        raise WorldError(f"image size {size}: must be a multiple of 4 and >= 32 (the embedded VAE "
                         "downsamples by 4); the embedded model is trained at 64")


# ---- poses ---------------------------------------------------------------------------------------

_ARMS = ((2, 3, 4), (5, 6, 7))
_LEGS = ((8, 9, 10), (11, 12, 13))


def _rotate(points: np.ndarray, pivot: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=np.float32)
    return (points - pivot) @ rot.T + pivot


def jitter_pose(pose: Pose, rng: np.random.Generator) -> Pose:
    """A variation of a pose: limbs turned (arms +-35, legs +-15 degrees), mirrored, scaled and moved."""
    xy = pose.body[:, :2].copy()
    for chain, spread in ((_ARMS, 35.0), (_LEGS, 15.0)):
        for root, mid, end in chain:
            xy[[mid, end]] = _rotate(xy[[mid, end]], xy[root], rng.uniform(-spread, spread))
            xy[[end]] = _rotate(xy[[end]], xy[mid], rng.uniform(-spread, spread))
    body = np.concatenate([xy, pose.body[:, 2:]], axis=1)
    out = Pose(body=body, name=pose.name)
    if rng.random() < 0.5:
        out = out.flipped()
    return place_randomly(out, rng)


def random_pose(rng: np.random.Generator) -> Pose:
    """A random camera-facing figure built with the pose library's forward kinematics."""
    def arm(sign: float) -> tuple[float, float]:
        upper = sign * rng.uniform(-20.0, 170.0)
        return upper, upper + sign * rng.uniform(-30.0, 120.0)

    def leg(sign: float) -> tuple[float, float]:
        thigh = sign * rng.uniform(-10.0, 45.0)
        return thigh, thigh - sign * rng.uniform(-10.0, 40.0)

    body = _figure(torso=rng.uniform(-8.0, 8.0), head_turn=rng.uniform(-0.015, 0.015),
                   head_tilt=rng.uniform(-10.0, 10.0), r_arm=arm(-1.0), l_arm=arm(1.0),
                   r_leg=leg(-1.0), l_leg=leg(1.0))
    return place_randomly(Pose(body=_place(body), name="random"), rng)


def place_randomly(pose: Pose, rng: np.random.Generator) -> Pose:
    """Scale (0.7-1.05) about the feet and shift the figure, keeping every point on the canvas."""
    xy = pose.body[:, :2].astype(np.float64)
    foot = np.array([xy[:, 0].mean(), xy[:, 1].max()])
    xy = foot + (xy - foot) * rng.uniform(0.7, 1.05)
    xy += np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.05, 0.05)])
    # Pull back inside a margin: the head circle reaches ~0.05 above the nose.
    lo = np.array([0.06, 0.1]) - xy.min(axis=0)
    hi = np.array([0.94, 0.96]) - xy.max(axis=0)
    xy += np.clip(0.0, lo, hi) if (lo <= hi).all() else (lo + hi) / 2
    body = pose.body.copy()
    body[:, :2] = xy.astype(np.float32)
    return Pose(body=body, name=pose.name)


def sample_pose(rng: np.random.Generator) -> Pose:
    """Half jittered built-in poses, half random figures."""
    if rng.random() < 0.5:
        names = sorted(BUILTIN_POSES)
        return jitter_pose(BUILTIN_POSES[names[int(rng.integers(len(names)))]], rng)
    return random_pose(rng)


# ---- rendering -----------------------------------------------------------------------------------


@dataclass
class Look:
    """Per-image variation: what differs between images of one (prompt, pose) group."""

    tint: float = 0.0  # -1 cool .. +1 warm light
    shirt_shade: float = 1.0
    trousers_shade: float = 1.0
    background_shade: float = 1.0
    thickness: float = 1.0
    skin: int = 0
    hair: int = 0
    texture_seed: int = 0

    @classmethod
    def random(cls, rng: np.random.Generator) -> Look:
        """Draw a look: a dim or bright light, a warm or cool tint, and continuous shades."""
        # The light level and the tint come in two modes each: the generator drew a narrow continuous
        # range as one average look (a group's spread 0.08 of the renders' 0.3), two modes it keeps.
        light = LIGHT_LEVELS[int(rng.integers(2))] * rng.uniform(0.95, 1.05)
        return cls(tint=float(rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0)),
                   shirt_shade=rng.uniform(0.8, 1.12), trousers_shade=rng.uniform(0.8, 1.12),
                   background_shade=light, thickness=rng.uniform(0.85, 1.15), skin=int(rng.integers(len(SKIN))),
                   hair=int(rng.integers(len(HAIR))), texture_seed=int(rng.integers(2**31)))


def _background(name: str, size: int, shade: float, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] float RGB 0..255 background texture."""
    y = np.linspace(0.0, 1.0, size)[:, None, None]
    x = np.linspace(0.0, 1.0, size)[None, :, None]
    if name == "beach":
        horizon = rng.uniform(0.4, 0.6)
        sky = np.array([130, 185, 235]) + 40 * (y / horizon)
        sand = np.array([222, 198, 150]) - 25 * (y - horizon)
        img = np.where(y < horizon, sky, sand) * np.ones_like(x)
    elif name == "forest":
        img = np.array([34, 82, 38]) * np.ones((size, size, 1))
        for _ in range(int(rng.integers(3, 7))):
            cx, w = rng.uniform(0, 1), rng.uniform(0.03, 0.08)
            trunk = (np.abs(x - cx) < w) & (y > rng.uniform(0.0, 0.3))
            img = np.where(trunk, np.array([80, 55, 35]), img)
    elif name == "night":
        img = np.array([14, 18, 52]) + 20 * (1 - y) * np.ones_like(x)
        stars = rng.random((size, size)) < 0.004
        img[stars] = 220
    elif name == "studio":
        r2 = (x - 0.5) ** 2 + (y - 0.45) ** 2
        img = (165 - 120 * r2) * np.ones(3)
    else:
        raise WorldError(f"unknown background {name!r}; known: {', '.join(BACKGROUNDS)}")
    return np.clip(img * shade, 0, 255)


def _shade(rgb: Sequence[int], k: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * k, 0, 255)) for c in rgb)  # type: ignore[return-value]


def _segments(body: np.ndarray, size: int, thickness: float) -> dict[str, list]:
    """Drawing primitives (in supersampled pixels) of each body part; missing points are skipped."""
    p = body[:, :2] * size * _SS
    ok = body[:, 2] > 0
    torso_len = np.linalg.norm((p[2] + p[5]) / 2 - (p[8] + p[11]) / 2) if ok[[2, 5, 8, 11]].all() else 0.24 * size * _SS
    arm_w, leg_w = 0.22 * torso_len * thickness, 0.28 * torso_len * thickness

    def seg(a: int, b: int, w: float) -> list:
        return [(tuple(p[a]), tuple(p[b]), w)] if ok[a] and ok[b] else []

    parts: dict[str, list] = {"trousers": [], "shirt": [], "skin": [], "shoes": []}
    for hip, knee, ankle in _LEGS:
        parts["trousers"] += seg(hip, knee, leg_w) + seg(knee, ankle, leg_w * 0.9)
        if ok[ankle]:
            parts["shoes"].append((tuple(p[ankle]), tuple(p[ankle]), leg_w * 0.75))
    if ok[[8, 11]].all():  # pelvis
        parts["trousers"] += seg(8, 11, leg_w)
    for sh, el, wr in _ARMS:
        parts["shirt"] += seg(sh, el, arm_w)
        parts["skin"] += seg(el, wr, arm_w * 0.8)
        if ok[wr]:
            parts["skin"].append((tuple(p[wr]), tuple(p[wr]), arm_w * 1.1))
    parts["torso"] = [tuple(p[i]) for i in (2, 5, 11, 8)] if ok[[2, 5, 11, 8]].all() else []
    head_pts = [i for i in (0, 14, 15, 16, 17) if ok[i]]
    if head_pts:
        centre = p[head_pts].mean(axis=0)
        ears = np.linalg.norm(p[16] - p[17]) if ok[[16, 17]].all() else 0.084 * size * _SS
        parts["head"] = [(tuple(centre), max(ears * 0.6, 0.15 * torso_len))]
        if ok[1]:
            parts["skin"] += [(tuple(p[1]), tuple(centre), arm_w)]
    else:
        parts["head"] = []
    parts["eyes"] = [tuple(p[i]) for i in (14, 15) if ok[i]]
    return parts


def _line(draw: ImageDraw.ImageDraw, a: tuple, b: tuple, w: float, fill: object) -> None:
    draw.line([a, b], fill=fill, width=max(1, int(round(w))))
    r = w / 2
    for c in (a, b):  # round joints
        draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fill)


def _draw(parts: dict[str, list], canvas: Image.Image, colours: dict[str, object]) -> None:
    d = ImageDraw.Draw(canvas)
    for a, b, w in parts["trousers"]:
        _line(d, a, b, w, colours["trousers"])
    for a, b, w in parts["shoes"]:
        _line(d, a, b, w, colours["shoes"])
    if parts["torso"]:
        d.polygon(parts["torso"], fill=colours["shirt"])
        for i, j in ((0, 1), (1, 2), (2, 3), (3, 0)):  # rounded, slightly wider torso outline
            w = abs(parts["torso"][0][0] - parts["torso"][1][0]) * 0.2 + 2
            _line(d, parts["torso"][i], parts["torso"][j], w, colours["shirt"])
    for a, b, w in parts["shirt"]:
        _line(d, a, b, w, colours["shirt"])
    for a, b, w in parts["skin"]:
        _line(d, a, b, w, colours["skin"])
    for (cx, cy), r in parts["head"]:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colours["skin"])
        d.chord([cx - r, cy - r * 1.05, cx + r, cy + r], 180, 360, fill=colours["hair"])
    if parts["head"]:
        r = parts["head"][0][1] * 0.18
        for cx, cy in parts["eyes"]:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colours["eyes"])


@dataclass
class Render:
    """One rendered image with the masks of its parts (fractions 0..1 after antialiasing)."""

    image: np.ndarray  # [H, W, 3] uint8
    person: np.ndarray  # [H, W] float32
    shirt: np.ndarray  # [H, W] float32
    trousers: np.ndarray  # [H, W] float32


def _shrink(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def render_person(pose: Pose, attrs: Attributes, look: Look, size: int = 64) -> Render:
    """Render a person in the pose with the prompt's clothes and background, varied by ``look``."""
    check_size(size)
    rng = np.random.default_rng(look.texture_seed)
    big = size * _SS
    parts = _segments(pose.body, size, look.thickness)
    colours = {"shirt": _shade(COLOURS[attrs.shirt], look.shirt_shade),
               "trousers": _shade(COLOURS[attrs.trousers], look.trousers_shade),
               "skin": SKIN[look.skin], "hair": HAIR[look.hair], "shoes": (30, 30, 30), "eyes": (20, 20, 20)}
    person = Image.new("RGB", (big, big), (0, 0, 0))
    _draw(parts, person, colours)
    # Masks from the same primitives drawn in flat labels: 1 shirt, 2 trousers, 3 any other part.
    labels = Image.new("L", (big, big), 0)
    _draw(parts, labels, {"shirt": 1, "trousers": 2, "skin": 3, "hair": 3, "shoes": 3, "eyes": 3})
    lab = np.asarray(labels)
    masks = {k: _shrink(Image.fromarray(((lab == v) * 255).astype(np.uint8)), size) / 255.0
             for k, v in (("shirt", 1), ("trousers", 2))}
    alpha = _shrink(Image.fromarray(((lab > 0) * 255).astype(np.uint8)), size)[..., None] / 255.0
    fg = _shrink(person, size)
    # Fill the antialiased edge from the unpremultiplied colour: the black canvas would darken it.
    fg = np.where(alpha > 0, fg / np.maximum(alpha, 1e-3), 0)
    bg = _background(attrs.background, size, look.background_shade, rng)
    # Soft light from one side across the whole scene, and the warm/cool tint raters can judge.
    side = 1.0 + 0.08 * rng.uniform(-1, 1) * (np.linspace(-1, 1, size)[None, :, None])
    img = (alpha * fg + (1 - alpha) * bg) * side
    img = img * np.array([1 + TINT_STRENGTH * look.tint, 1.0, 1 - TINT_STRENGTH * look.tint])
    img = img + rng.normal(0.0, 3.0, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Render(image=image, person=alpha[..., 0].astype(np.float32), shirt=masks["shirt"].astype(np.float32),
                  trousers=masks["trousers"].astype(np.float32))


def part_masks(pose: Pose, size: int = 64) -> Render:
    """The masks a pose's person covers at nominal thickness (what a faithful image should fill)."""
    r = render_person(pose, Attributes("red", "blue", "studio"), Look(), size)
    return r


# ---- measuring images ----------------------------------------------------------------------------


def warmth(images: np.ndarray) -> np.ndarray:
    """Mean red minus blue per image, in 0..1 units: [B, H, W, 3] uint8 -> [B]."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    return (x[..., 0] - x[..., 2]).mean(axis=(1, 2))


def _classify_colour(rgb: np.ndarray) -> str:
    """Nearest vocabulary colour, allowing for shade (a best-fit brightness factor per colour)."""
    best, best_d = "", math.inf
    for name, ref in COLOURS.items():
        p = np.asarray(ref, dtype=np.float64)
        k = float(np.clip(rgb @ p / (p @ p), 0.6, 1.3))
        d = float(np.linalg.norm(rgb - k * p))
        if d < best_d:
            best, best_d = name, d
    return best


_BACKGROUND_TEMPLATES: dict[int, dict[str, np.ndarray]] = {}


def _background_features(img: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Mean RGB of the free pixels in the top third and the bottom third: [6]."""
    size = img.shape[0]
    rows = np.arange(size)[:, None] * np.ones((1, size))
    top, bottom = free & (rows < size // 3), free & (rows >= size - size // 3)
    top, bottom = (top if top.any() else free), (bottom if bottom.any() else free)
    return np.concatenate([img[top].mean(axis=0), img[bottom].mean(axis=0)])


def _background_templates(size: int) -> dict[str, np.ndarray]:
    if size not in _BACKGROUND_TEMPLATES:
        rng = np.random.default_rng(0)
        free = np.ones((size, size), bool)
        _BACKGROUND_TEMPLATES[size] = {
            name: np.mean([_background_features(_background(name, size, 1.0, rng), free) for _ in range(16)], axis=0)
            for name in BACKGROUNDS}
    return _BACKGROUND_TEMPLATES[size]


def measure_attributes(image: np.ndarray, pose: Pose) -> Attributes:
    """Which shirt colour, trousers colour and background an image shows, read in the pose's regions."""
    img = np.asarray(image, dtype=np.float64)
    size = img.shape[0]
    m = part_masks(pose, size)
    out = {}
    for part, mask in (("shirt", m.shirt), ("trousers", m.trousers)):
        core = mask > 0.99
        if core.sum() < 3:
            core = mask > 0.5
        out[part] = _classify_colour(img[core].mean(axis=0)) if core.any() else ""
    # Background: pixels well away from the person (its mask grown by a few pixels), top and bottom
    # third apart (a tinted beach's mean colour is a tinted studio's; its sky and sand are not), each
    # template fitted with its best light level and warm/cool tint (both scale the whole scene).
    free = np.asarray(Image.fromarray((m.person * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5))) == 0
    f = _background_features(img, free)

    def distance(ref: np.ndarray) -> float:
        # f ~ light * (1 + tint, 1, 1 - tint) * ref per channel: linear in (light, light * tint).
        design = np.stack([ref, ref * np.tile([1.0, 0.0, -1.0], 2)], axis=1)  # [6, 2]
        light, lt = np.linalg.lstsq(design, f, rcond=None)[0]
        light = float(np.clip(light, 0.5, 1.4))
        tint = float(np.clip(lt / light, -1.5 * TINT_STRENGTH, 1.5 * TINT_STRENGTH))
        return float(np.linalg.norm(f - light * (design[:, 0] + tint * design[:, 1])))

    out["background"] = min(_background_templates(size).items(), key=lambda kv: distance(kv[1]))[0]
    return Attributes(out["shirt"], out["trousers"], out["background"])


def mask_iou(image_mask: np.ndarray, pose: Pose) -> float:
    """IoU of a (binary) person mask with the mask the pose's person should cover."""
    m = part_masks(pose, image_mask.shape[0]).person > 0.5
    a = image_mask > 0.5
    union = (a | m).sum()
    return float((a & m).sum() / union) if union else 0.0


# ---- data sets -----------------------------------------------------------------------------------


@dataclass
class WorldBatch:
    """Rendered examples: images, condition (OpenPose skeleton) images, prompts and keypoints."""

    images: np.ndarray  # [N, H, W, 3] uint8
    conditions: np.ndarray  # [N, H, W, 3] uint8, the skeleton image generate.py would give the ControlNet
    prompts: list[str]
    keypoints: np.ndarray  # [N, 18, 3] float32, normalised 0..1


def make_examples(n: int, size: int = 64, seed: int = 0, *, progress: bool = False) -> WorldBatch:
    """Render ``n`` random examples (random pose, random attributes, random look), deterministically."""
    check_size(size)
    rng = np.random.default_rng(seed)
    attrs = all_attributes()
    images = np.zeros((n, size, size, 3), np.uint8)
    conds = np.zeros((n, size, size, 3), np.uint8)
    kps = np.zeros((n, 18, 3), np.float32)
    prompts = []
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="rendering the world", unit="img", mininterval=2.0)
    for i in it:
        pose = sample_pose(rng)
        a = attrs[int(rng.integers(len(attrs)))]
        images[i] = render_person(pose, a, Look.random(rng), size).image
        conds[i] = np.asarray(render_pose(pose, size, size, draw_hands=False, draw_face=False))
        kps[i] = pose.body
        prompts.append(a.prompt())
    return WorldBatch(images, conds, prompts, kps)
