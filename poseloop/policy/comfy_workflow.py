"""ComfyUI workflows written beside every policy export: the trained model, a pose and the training sampler.

Two files describe one graph: the UI format (``comfyui_workflow.json``, dragged onto ComfyUI's canvas)
and the API format (``comfyui_workflow_api.json``, POSTed to ``/prompt`` as its "prompt"). Node types,
input names and output slots are ComfyUI's own; tests/test_comfy_workflow.py checks them against the
/object_info of a real ComfyUI (tests/fixtures/comfyui_object_info.json names its version).
Models are named by the files ComfyUI users have (KNOWN_FILES); the UI file also carries their download
links the way ComfyUI's own templates do, so the frontend offers to fetch a missing one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poseloop.models.policy_files import controlnet_file_name, kohya_lora_name
from poseloop.config.generation import WEIGHT_SUFFIXES
from poseloop.data.store import atomic_write

WORKFLOW_NAME = "comfyui_workflow.json"
API_WORKFLOW_NAME = "comfyui_workflow_api.json"
# kohya_state_dict writes alpha = peft scaling * rank, and ComfyUI applies alpha / rank * strength,
# so strength 1.0 is exactly the strength the policy was trained at.
TRAINED_LORA_STRENGTH = 1.0
# poseloop samples with diffusers' DDIM, which SD1.5 / SDXL scheduler configs set to "leading" spacing with
# steps_offset 1 (timesteps 1, 1 + 1000 // T, ...): ComfyUI's ddim_uniform schedule gives those timesteps,
# and its "ddim" sampler is DDIM with eta = 0.
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"
# Widgets the ComfyUI frontend adds after a node's own widget: saved in the UI format's widgets_values,
# never sent in the API format.
FRONTEND_WIDGETS = {"control_after_generate": "fixed", "upload": "image"}

# type -> (linked inputs (name, type), widget names in widgets_values order, outputs (name, type)).
NODE_TYPES: dict[str, tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["lora_name", "strength_model", "strength_clip"],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "ControlNetLoader": ([], ["control_net_name"], [("CONTROL_NET", "CONTROL_NET")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE")],
                                ["strength", "start_percent", "end_percent"],
                                [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
}



@dataclass(frozen=True)
class KnownFile:
    """The single file ComfyUI users keep for a hub model, where ComfyUI's templates or ComfyUI-Manager get it."""

    name: str
    url: str
    same_weights: bool  # False: a successor with the same architecture and input (see `note`)
    note: str = ""


# Hub id (lower case) -> the file ComfyUI users have. Names and links from ComfyUI's workflow templates
# (comfyui-workflow-templates 0.1.45: SD1.5 checkpoint, SD1.5 OpenPose ControlNet, SDXL base) and
# ComfyUI-Manager's model-list.json (OpenPoseXL2); docs/POLICY.md has the table.
_SD15 = KnownFile("v1-5-pruned-emaonly-fp16.safetensors",
                  "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                  "v1-5-pruned-emaonly-fp16.safetensors", True)
_OPENPOSE_V11 = "https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/" \
                "control_v11p_sd15_openpose_fp16.safetensors"
KNOWN_FILES: dict[str, KnownFile] = {
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "comfy-org/stable-diffusion-v1-5-archive": _SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": KnownFile(
        "sd_xl_base_1.0.safetensors",
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
        True),
    "lllyasviel/control_v11p_sd15_openpose": KnownFile("control_v11p_sd15_openpose_fp16.safetensors", _OPENPOSE_V11,
                                                       True),
    # ControlNet 1.0's OpenPose model: ComfyUI users keep its v1.1 successor (same architecture and input).
    "lllyasviel/sd-controlnet-openpose": KnownFile(
        "control_v11p_sd15_openpose_fp16.safetensors", _OPENPOSE_V11, False,
        "ControlNet 1.1's OpenPose model, the successor of the 1.0 model poseloop used (same architecture and "
        "pose input, other weights)"),
    "thibaud/controlnet-openpose-sdxl-1.0": KnownFile(
        "OpenPoseXL2.safetensors",
        "https://huggingface.co/thibaud/controlnet-openpose-sdxl-1.0/resolve/main/OpenPoseXL2.safetensors", True),
}
# What a workflow's weight name is: a file given by path, a known hub model, a diffusers folder to convert
# with scripts/to_single_file.py, or an unknown hub id the user picks a file for.
NameKind = str  # "file" | "known" | "folder" | "hub"


@dataclass(frozen=True)
class WeightName:
    """A file name ComfyUI will look up, and where it comes from."""

    name: str
    kind: NameKind
    source: str = ""
    known: KnownFile | None = None


@dataclass(frozen=True)
class WorkflowSettings:
    """What the workflow reproduces: file names ComfyUI will look up and the training sampler."""

    version: str
    checkpoint: str
    controlnet: str
    lora: str | None  # None: a ControlNet policy, no Load LoRA node
    pose_image: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    eta: float
    seed: int
    controlnet_strength: float
    lora_strength: float = TRAINED_LORA_STRENGTH
    checkpoint_source: WeightName | None = None
    controlnet_source: WeightName | None = None  # None: the policy's own ControlNet file
    vae: str = ""  # model.vae: a VAE poseloop used instead of the checkpoint's own


@dataclass
class Node:
    """One node of the graph: its linked inputs and its widget values by ComfyUI input name."""

    id: int
    type: str
    title: str
    col: int
    row: int
    links: dict[str, tuple[int, int]]  # input name -> (source node id, source output slot)
    widgets: dict[str, Any]
    models: list[dict[str, str]] = field(default_factory=list)  # download links for the frontend


def weight_file_name(source: str, default: str) -> WeightName:
    """The file name ComfyUI lists for a model source: a single file, a known hub id, a folder or another hub id."""
    source = source.strip()
    path = Path(source.rstrip("/\\")) if source else None
    if path is None or not path.name:
        return WeightName(default, "hub")
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        return WeightName(path.name, "file", source)
    known = KNOWN_FILES.get(source.rstrip("/").lower())
    if known is not None and not Path(source).expanduser().is_dir():
        return WeightName(known.name, "known", source, known)
    name = path.name
    # models/tiny-sd15/controlnet -> "tiny-sd15-controlnet": a bare "controlnet" says nothing in a list.
    if name.lower() == "controlnet" and path.parent.name:
        name = f"{path.parent.name}-controlnet"
    return WeightName(f"{name}.safetensors", "folder" if Path(source).expanduser().is_dir() else "hub", source)


# The UNet shapes ComfyUI's model detection keys on; the embedded tiny models match no model type it knows.
_COMFY_UNET_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def comfyui_model_problem(unet_config: dict[str, Any]) -> str | None:
    """Why ComfyUI cannot load this base model (one line), or None when its UNet has SD1.5's or SDXL's shapes."""
    from poseloop.models.single_file import CONFIGS

    def shape(cfg: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (cfg.get(k) for k in _COMFY_UNET_FIELDS))

    for arch in ("sd15", "sdxl"):
        if shape(unet_config) == shape(json.loads((CONFIGS / arch / "unet" / "config.json").read_text())):
            return None
    return (f"ComfyUI: no workflow written: this base model's UNet (channels {shape(unet_config)[1]}, cross-attention "
            f"{unet_config.get('cross_attention_dim')}) has neither SD1.5's nor SDXL's shapes, so ComfyUI cannot load "
            "it (\"Could not detect model type\"); train on an SD1.5 or SDXL checkpoint for a ComfyUI workflow.")


def pose_image_name(version: str) -> str:
    """The pose image's file name, in the export folder and in ComfyUI/input/ alike."""
    return f"poseloop-{version}-pose.png"


def training_prompt(data: dict[str, Any]) -> str:
    """The first prompt the policy was trained on (dataset line, prompts file or data.prompts); reads files."""
    try:
        if data.get("dataset"):
            with open(data["dataset"], encoding="utf-8") as f:
                first = next((ln for ln in f if ln.strip()), "")
            return str(json.loads(first)["text"]).strip()
        if data.get("prompts_file"):
            from poseloop.data.inputs import read_prompts_file

            return read_prompts_file(data["prompts_file"])[0]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # moved or unreadable since training: an example prompt still gives a working workflow
    prompts = [p for p in data.get("prompts") or [] if str(p).strip()]
    return str(prompts[0]).strip() if prompts else "a person, full body"


def training_pose_name(data: dict[str, Any]) -> str:
    """A built-in pose the policy was trained on; 'standing' when it used keypoint files, photos or a dataset."""
    from poseloop.data.poses import BUILTIN_POSES

    names = list(BUILTIN_POSES) if data.get("poses") == ["all"] else list(data.get("poses") or [])
    return next((n for n in names if n in BUILTIN_POSES), "standing")


def config_section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """config[name] ("sample" or "data") over poseloop's defaults, for configs that lack fields or the section."""
    from dataclasses import asdict

    from poseloop.config.generation import DataConfig, SampleConfig

    defaults = {"sample": SampleConfig, "data": DataConfig}[name]()
    return {**asdict(defaults), **(config.get(name) or {})}


def settings_from_config(config: dict[str, Any], version: str, target: str, native_size: int) -> WorkflowSettings:
    """Workflow settings from an export's config dict (missing sections take poseloop's defaults)."""
    model = config.get("model") or {}
    sample, data = config_section(config, "sample"), config_section(config, "data")
    checkpoint = weight_file_name(str(model.get("base", "")), "base_model.safetensors")
    controlnet_source: WeightName | None = None
    if target == "unet_lora":
        controlnet_source = weight_file_name(str(model.get("controlnet", "")), "openpose_controlnet.safetensors")
        controlnet, lora = controlnet_source.name, kohya_lora_name(version)
    else:
        # ControlNet policies export the whole trained ControlNet; the base ControlNet is not used.
        controlnet, lora = controlnet_file_name(version), None
    return WorkflowSettings(
        version=version, checkpoint=checkpoint.name, controlnet=controlnet, lora=lora,
        pose_image=pose_image_name(version), prompt=training_prompt(data),
        negative_prompt=str(sample["negative_prompt"]),
        width=int(sample["width"]) or native_size, height=int(sample["height"]) or native_size,
        steps=int(sample["steps"]), cfg=float(sample["guidance_scale"]), eta=float(sample["eta"]),
        seed=int(sample["seed"]), controlnet_strength=float(sample["controlnet_scale"]),
        checkpoint_source=checkpoint, controlnet_source=controlnet_source,
        vae=str(model.get("vae", "")),
    )


def build_nodes(s: WorkflowSettings) -> list[Node]:
    """The graph as nodes in execution order: checkpoint (+ LoRA), pose ControlNet, prompts, KSampler, save."""
    nodes: list[Node] = []

    def add(type_: str, title: str, col: int, row: int, links: dict[str, tuple[int, int]],
            widgets: dict[str, Any], source: WeightName | None = None, directory: str = "") -> int:
        known = source.known if source is not None else None
        models = [{"name": known.name, "url": known.url, "directory": directory}] if known else []
        nodes.append(Node(len(nodes) + 1, type_, title, col, row, links, widgets, models))
        return len(nodes)

    ckpt = add("CheckpointLoaderSimple", "Load Checkpoint", 0, 0, {}, {"ckpt_name": s.checkpoint},
               s.checkpoint_source, "checkpoints")
    model, clip = (ckpt, 0), (ckpt, 1)
    if s.lora is not None:
        lora = add("LoraLoader", f"poseloop policy {s.version}", 0, 1, {"model": model, "clip": clip},
                   {"lora_name": s.lora, "strength_model": s.lora_strength, "strength_clip": s.lora_strength})
        model, clip = (lora, 0), (lora, 1)
    cn = add("ControlNetLoader", "Load ControlNet Model", 0, 2, {}, {"control_net_name": s.controlnet},
             s.controlnet_source, "controlnet")
    pose = add("LoadImage", "Pose image", 0, 3, {}, {"image": s.pose_image, "upload": "image"})
    pos = add("CLIPTextEncode", "Positive prompt", 1, 0, {"clip": clip}, {"text": s.prompt})
    neg = add("CLIPTextEncode", "Negative prompt", 1, 1, {"clip": clip}, {"text": s.negative_prompt})
    apply = add("ControlNetApplyAdvanced", "Apply ControlNet", 1, 2,
                {"positive": (pos, 0), "negative": (neg, 0), "control_net": (cn, 0), "image": (pose, 0)},
                {"strength": s.controlnet_strength, "start_percent": 0.0, "end_percent": 1.0})
    latent = add("EmptyLatentImage", "Empty Latent Image", 1, 3, {},
                 {"width": s.width, "height": s.height, "batch_size": 1})
    sampler = add("KSampler", "KSampler", 2, 0,
                  {"model": model, "positive": (apply, 0), "negative": (apply, 1), "latent_image": (latent, 0)},
                  {"seed": s.seed, "control_after_generate": "fixed", "steps": s.steps, "cfg": s.cfg,
                   "sampler_name": SAMPLER, "scheduler": SCHEDULER, "denoise": 1.0})
    decode = add("VAEDecode", "VAE Decode", 2, 1, {"samples": (sampler, 0), "vae": (ckpt, 2)}, {})
    add("SaveImage", "Save Image", 3, 0, {"images": (decode, 0)}, {"filename_prefix": f"poseloop/{s.version}"})
    return nodes


def ui_workflow(nodes: list[Node], version: str = "") -> dict[str, Any]:
    """The UI format (LiteGraph serialisation, version 0.4) that ComfyUI loads when the file is dropped on it."""
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    for order, node in enumerate(nodes):
        sockets, widget_names, outputs = NODE_TYPES[node.type]
        inputs = []
        for name, type_ in sockets:
            src, slot = node.links[name]
            links.append([len(links) + 1, src, slot, node.id, len(inputs), type_])
            out_links.setdefault((src, slot), []).append(len(links))
            inputs.append({"name": name, "type": type_, "link": len(links)})
        ui_nodes.append({
            "id": node.id, "type": node.type, "title": node.title,
            # Columns 420 px apart, rows 260: text boxes stay readable and no node overlaps another.
            "pos": [40 + 420 * node.col, 40 + 260 * node.row],
            "size": [380, 220 if node.type == "CLIPTextEncode" else 130],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": type_, "links": [], "slot_index": i}
                        for i, (name, type_) in enumerate(outputs)],
            # "models": what ComfyUI's own templates carry, so the frontend offers to download a missing file.
            "properties": {"Node name for S&R": node.type, **({"models": node.models} if node.models else {})},
            "widgets_values": [node.widgets[w] for w in widget_names],
        })
    # Sources are always earlier nodes (execution order), so every output's links are known by now.
    for ui_node in ui_nodes:
        for slot, output in enumerate(ui_node["outputs"]):
            output["links"] = out_links.get((ui_node["id"], slot), [])
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"poseloop_version": version}, "version": 0.4}


def api_prompt(nodes: list[Node]) -> dict[str, Any]:
    """The API format: {node id: {"class_type", "inputs"}} with links as [source id, output slot]."""
    out: dict[str, Any] = {}
    for node in nodes:
        sockets, widget_names, _ = NODE_TYPES[node.type]
        inputs: dict[str, Any] = {w: node.widgets[w] for w in widget_names if w not in FRONTEND_WIDGETS}
        inputs.update({name: [str(node.links[name][0]), node.links[name][1]] for name, _ in sockets})
        out[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title}}
    return out


CONVERT_COMMAND = "python scripts/to_single_file.py"


def model_line(w: WeightName, node: str, directory: str) -> str:
    """One README line: where the file a loader node names comes from."""
    target = f"ComfyUI/models/{directory}/{w.name}"
    if w.kind == "file":
        return f"- Copy `{w.source}` (the file poseloop used) into `ComfyUI/models/{directory}/`."
    if w.kind == "folder":
        return (f"- Write the diffusers folder `{w.source}` as the single file *{node}* names: "
                f"`{CONVERT_COMMAND} --source {w.source} --out {target}`.")
    if w.kind == "known" and w.known is not None:
        line = (f"- *{node}* names `{w.name}`, the file ComfyUI users keep for `{w.source}`; ComfyUI offers to "
                f"download it into `ComfyUI/models/{directory}/` when it is missing ({w.known.url}).")
        if not w.known.same_weights:
            line += (f" It is {w.known.note}; for the very weights poseloop used, convert that repo's folder with "
                     f"`{CONVERT_COMMAND} --source FOLDER --out ComfyUI/models/{directory}/NAME.safetensors` "
                     "and pick it in the node.")
        return line
    origin = f"`{w.source}`" if w.source else "nothing (the config names no model)"
    return (f"- *{node}* names `{w.name}`, derived from {origin}, a hub id poseloop knows no ComfyUI file name for: "
            f"pick your single file of that model in the node, or write one from a downloaded copy of the repo with "
            f"`{CONVERT_COMMAND} --source FOLDER --out {target}`.")


def readme_section(s: WorkflowSettings) -> str:
    """The export README's ComfyUI-workflow section: which file goes where, what to pick by hand."""
    lines = ["## ComfyUI workflow", "",
             f"Drag `{WORKFLOW_NAME}` onto ComfyUI's canvas (`{API_WORKFLOW_NAME}` is the same graph in API "
             "format, for `POST /prompt`). It reproduces the training setup: prompt, pose, "
             f"{s.width}x{s.height}, {s.steps} steps, CFG {s.cfg:g}, ControlNet strength {s.controlnet_strength:g}, "
             f"seed {s.seed}.", "",
             f"- Copy `{s.pose_image}` into `ComfyUI/input/`."]
    if s.lora is not None:
        lines.append(f"- Copy `{s.lora}` into `ComfyUI/models/loras/`; the *Load LoRA* node uses it at strength "
                     f"{s.lora_strength:g}, the trained strength.")
    else:
        lines.append(f"- Copy `{s.controlnet}` (the trained ControlNet, fp16) into `ComfyUI/models/controlnet/`; "
                     "there is no LoRA to load.")
    if s.checkpoint_source is not None:
        lines.append(model_line(s.checkpoint_source, "Load Checkpoint", "checkpoints"))
    if s.controlnet_source is not None:
        lines.append(model_line(s.controlnet_source, "Load ControlNet Model", "controlnet"))
    if s.vae:
        # Kept out of the graph: a VAELoader needs a file name the config cannot give (vae is a hub id or folder).
        lines.append(f"- poseloop decoded with the VAE `{s.vae}`: add a *Load VAE* node with your copy of it and "
                     "link it to *VAE Decode* instead of the checkpoint's VAE.")
    lines += [f"- The sampler is ComfyUI's `{SAMPLER}` with the `{SCHEDULER}` schedule, the timesteps poseloop's "
              f"DDIM uses; ComfyUI's DDIM is deterministic (eta 0), poseloop sampled with eta {s.eta:g}, and "
              "ComfyUI draws its noise differently, so images match the policy's style, not its exact pixels.", ""]
    return "\n".join(lines)


def write_comfy_workflow(folder: str | Path, version: str, config: dict[str, Any], target: str,
                         native_size: int, unet_config: dict[str, Any] | None = None) -> tuple[list[str], str]:
    """Write both workflow files and the pose image into an export folder; (file names, README section).

    With the UNet config of a model ComfyUI cannot load (the embedded tiny ones), nothing is written and
    the README section is the one line that says why.
    """
    from poseloop.data.openpose import render_pose
    from poseloop.data.poses import get_builtin_pose

    problem = comfyui_model_problem(unet_config) if unet_config is not None else None
    if problem is not None:
        return [], f"## ComfyUI workflow\n\n{problem}\n"
    folder = Path(folder)
    s = settings_from_config(config, version, target, native_size)
    nodes = build_nodes(s)
    data = config_section(config, "data")
    pose = render_pose(get_builtin_pose(training_pose_name(data)), s.width, s.height,
                       draw_hands=bool(data["draw_hands"]), draw_face=bool(data["draw_face"]))
    atomic_write(folder / s.pose_image, lambda tmp: pose.save(tmp, format="PNG"))
    for name, doc in ((WORKFLOW_NAME, ui_workflow(nodes, version)), (API_WORKFLOW_NAME, api_prompt(nodes))):
        atomic_write(folder / name, lambda tmp, doc=doc: tmp.write_text(json.dumps(doc, indent=2) + "\n"))
    return [WORKFLOW_NAME, API_WORKFLOW_NAME, s.pose_image], readme_section(s)
