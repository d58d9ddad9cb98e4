"""ComfyUI workflows in every policy export: checked against ComfyUI's own node signatures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from poseloop.policy.comfy_workflow import (API_WORKFLOW_NAME, TRAINED_LORA_STRENGTH, WORKFLOW_NAME, WeightName, api_prompt,
                                     build_nodes, comfyui_model_problem, readme_section, settings_from_config,
                                     ui_workflow, weight_file_name, write_comfy_workflow)
from poseloop.config.generation import GenerateConfig, sdxl, tiny
from poseloop.config.lib import to_dict
from poseloop.models.single_file import CONFIGS

# The node definitions of a real ComfyUI: GET /object_info/<class> of a running server, saved by
# scripts/comfyui_object_info.py with the version it came from (kept independent of
# poseloop.policy.comfy_workflow's own table, so that a slip there shows up here).
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui_object_info.json"
OBJECT_INFO: dict[str, Any] = json.loads(FIXTURE.read_text())
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"}
# folder_paths.supported_pt_extensions: what ComfyUI lists in its model folders.
MODEL_SUFFIXES = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


def required_inputs(node_type: str) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(name, type, choices or None, options) of a node's required inputs, in ComfyUI's order."""
    info = OBJECT_INFO["nodes"][node_type]
    out = []
    for name in info["input_order"]["required"]:
        spec = info["input"]["required"][name]
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(spec[0], list):  # a list of choices: a combo widget
            out.append((name, "COMBO", spec[0], options))
        elif spec[0] == "COMBO":  # newer servers: the choices in the options
            out.append((name, "COMBO", options.get("options", []), options))
        else:
            out.append((name, spec[0], None, options))
    return out


def widget_names(node_type: str) -> list[str]:
    """The widgets_values layout the frontend gives a node: its widget inputs plus the frontend's own widgets.

    The frontend adds control_after_generate after an INT that asks for it, and an upload button after
    an image_upload combo; both are saved in widgets_values, never sent in the API format.
    """
    out = []
    for name, type_, _, options in required_inputs(node_type):
        if type_ in WIDGET_TYPES:
            out.append(name)
            if options.get("control_after_generate"):
                out.append("control_after_generate")
            if options.get("image_upload"):
                out.append("upload")
    return out


FRONTEND_EXTRA = {"control_after_generate", "upload"}


def check_value(node_type: str, name: str, type_: str, choices: Any, options: dict[str, Any], value: Any) -> None:
    """A widget value ComfyUI's prompt validation accepts (type, range, choice)."""
    where = (node_type, name, value)
    if type_ == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif type_ == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif type_ in ("STRING", "COMBO"):
        assert isinstance(value, str), where
    if type_ in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), where
    if type_ == "COMBO":
        if choices:
            assert value in choices, where
        elif options.get("image_upload"):  # the input folder's files: empty where the fixture was made
            assert value.endswith(".png") and "/" not in value, where
        else:  # a model folder's files, empty where the fixture was made: a name ComfyUI would list
            assert value.endswith(MODEL_SUFFIXES) and "/" not in value and "\\" not in value, where


def check_workflow(ui: dict[str, Any], api: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Assert the UI graph is loadable by ComfyUI and the API prompt is the same graph; {title: widgets}."""
    assert ui["version"] == 0.4 and ui["groups"] == [] and isinstance(ui["config"], dict)
    assert isinstance(ui["extra"], dict)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] == max(nodes)
    links = {link[0]: link for link in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] == max(links)
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        # Same type at both ends, and the type ComfyUI declares for that output and that input.
        assert out["type"] == inp["type"] == type_ == OBJECT_INFO["nodes"][nodes[src]["type"]]["output"][src_slot]
        assert {n: t for n, t, _, _ in required_inputs(nodes[dst]["type"])}[inp["name"]] == type_
        assert link_id in out["links"] and inp["link"] == link_id
    widgets_by_title = {}
    for node in ui["nodes"]:
        info = OBJECT_INFO["nodes"][node["type"]]
        required = required_inputs(node["type"])
        assert [o["type"] for o in node["outputs"]] == info["output"]
        assert [o["name"] for o in node["outputs"]] == info["output_name"]
        assert all(link in links for o in node["outputs"] for link in o["links"])
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        names = widget_names(node["type"])
        # Every required input is linked or a widget, never both, never neither.
        for name, type_, _, _ in required:
            assert (name in linked) != (type_ in WIDGET_TYPES), (node["type"], name)
        assert len(node["widgets_values"]) == len(names), node["type"]
        values = dict(zip(names, node["widgets_values"]))
        for name, type_, choices, options in required:
            if type_ in WIDGET_TYPES:
                check_value(node["type"], name, type_, choices, options, values[name])
        # Download links, as ComfyUI's templates carry them: for a file this node loads, into a model folder.
        for model in node["properties"].get("models", []):
            assert model["name"] in values.values() and model["url"].startswith("https://")
            assert model["directory"] in ("checkpoints", "controlnet", "loras")
        widgets_by_title[node.get("title", node["type"])] = values

        # The API format: the same node, widget values without the frontend's extras, links as [id, slot].
        entry = api[str(node["id"])]
        assert entry["class_type"] == node["type"]
        expected = {name: value for name, value in values.items() if name not in FRONTEND_EXTRA}
        for i in node["inputs"]:
            _, src, src_slot, *_ = links[i["link"]]
            expected[i["name"]] = [str(src), src_slot]
        assert entry["inputs"] == expected
        assert set(expected) == {name for name, _, _, _ in required}
    assert set(api) == {str(i) for i in nodes}
    return widgets_by_title


def test_fixture_comes_from_a_real_comfyui_and_covers_the_workflow() -> None:
    from poseloop.policy.comfy_workflow import NODE_TYPES

    assert re.fullmatch(r"\d+\.\d+\.\d+", OBJECT_INFO["comfyui_version"])
    assert re.fullmatch(r"[0-9a-f]{40}", OBJECT_INFO["comfyui_commit"])
    assert set(OBJECT_INFO["nodes"]) == set(NODE_TYPES)
    # What ComfyUI's own code defines, not a table written here: the samplers are in their hundreds of lines.
    assert "ddim" in required_inputs("KSampler")[4][2] and len(required_inputs("KSampler")[4][2]) > 20


def policy_config(**sample: Any) -> dict[str, Any]:
    """A config dict with the model / sample / data sections train_policy.py exports (to_dict of its config)."""
    cfg = GenerateConfig()
    for k, v in sample.items():
        setattr(cfg.sample, k, v)
    return to_dict(cfg)


@pytest.mark.parametrize("target", ["unet_lora", "controlnet"])
def test_workflow_matches_comfyui_signatures_and_training_settings(target: str) -> None:
    config = policy_config(width=512, height=768, steps=25, guidance_scale=6.5, controlnet_scale=0.8, seed=7,
                           negative_prompt="blurry", eta=1.0)
    config["model"].update(base="stable-diffusion-v1-5/stable-diffusion-v1-5",
                           controlnet="lllyasviel/sd-controlnet-openpose")
    config["data"].update(prompts=["a dancer on a stage", "a cat"], poses=["arms_raised"])
    s = settings_from_config(config, "run-e0003", target, native_size=512)
    nodes = build_nodes(s)
    ui, api = ui_workflow(nodes, "run-e0003"), api_prompt(nodes)
    json.loads(json.dumps(ui)), json.loads(json.dumps(api))  # plain JSON, nothing numpy or Path
    w = check_workflow(ui, api)

    # The hub id's file as ComfyUI users have it, with the link ComfyUI's frontend offers to download it from.
    assert w["Load Checkpoint"]["ckpt_name"] == "v1-5-pruned-emaonly-fp16.safetensors"
    ckpt_node = next(n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert ckpt_node["properties"]["models"] == [{
        "name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
               "v1-5-pruned-emaonly-fp16.safetensors"}]
    assert w["Positive prompt"]["text"] == "a dancer on a stage" and w["Negative prompt"]["text"] == "blurry"
    assert w["Apply ControlNet"] == {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}
    assert w["Empty Latent Image"] == {"width": 512, "height": 768, "batch_size": 1}
    ks = w["KSampler"]
    assert (ks["seed"], ks["control_after_generate"], ks["steps"], ks["cfg"]) == (7, "fixed", 25, 6.5)
    assert ks["denoise"] == 1.0
    assert (ks["sampler_name"], ks["scheduler"]) == ("ddim", "ddim_uniform")
    assert w["Pose image"] == {"image": "poseloop-run-e0003-pose.png", "upload": "image"}
    types = [n["type"] for n in ui["nodes"]]
    readme = readme_section(s)
    assert "ComfyUI offers to download it" in readme
    if target == "unet_lora":
        lora = next(v for n, v in w.items() if n.startswith("poseloop policy"))
        # The export writes alpha = trained scaling * rank, so the trained strength is 1.0 in ComfyUI.
        assert lora == {"lora_name": "poseloop-run-e0003.safetensors", "strength_model": 1.0, "strength_clip": 1.0}
        assert w["Load ControlNet Model"]["control_net_name"] == "control_v11p_sd15_openpose_fp16.safetensors"
        # ControlNet 1.0's OpenPose model is named by its 1.1 successor, and the README says so.
        assert "successor of the 1.0 model" in readme
        # The KSampler's model and both prompts' CLIP come through the LoRA, not around it.
        lora_id = types.index("LoraLoader") + 1
        assert api[str(types.index("KSampler") + 1)]["inputs"]["model"] == [str(lora_id), 0]
        encoders = [e for e in api.values() if e["class_type"] == "CLIPTextEncode"]
        assert len(encoders) == 2 and all(e["inputs"]["clip"] == [str(lora_id), 1] for e in encoders)
    else:
        assert "LoraLoader" not in types
        assert w["Load ControlNet Model"]["control_net_name"] == "poseloop-run-e0003-controlnet.safetensors"
        assert "successor" not in readme  # the policy's own ControlNet, not the base one


def test_checkpoint_names_and_defaults(tmp_path: Path) -> None:
    name = weight_file_name("/ckpts/my_sd15.safetensors", "x")
    assert (name.name, name.kind) == ("my_sd15.safetensors", "file")
    assert weight_file_name("Stable-Diffusion-v1-5/stable-diffusion-v1-5/", "x").name == \
        "v1-5-pruned-emaonly-fp16.safetensors"  # hub ids are case-insensitive
    assert weight_file_name("thibaud/controlnet-openpose-sdxl-1.0", "x").name == "OpenPoseXL2.safetensors"
    (tmp_path / "my-sd15" / "controlnet").mkdir(parents=True)
    folder = weight_file_name(str(tmp_path / "my-sd15"), "x")
    assert (folder.name, folder.kind) == ("my-sd15.safetensors", "folder")
    cn = weight_file_name(str(tmp_path / "my-sd15" / "controlnet"), "x")
    assert (cn.name, cn.kind) == ("my-sd15-controlnet.safetensors", "folder")
    assert weight_file_name("someone/unknown-model", "x") == WeightName("unknown-model.safetensors", "hub",
                                                                       "someone/unknown-model")
    assert weight_file_name("", "base_model.safetensors") == WeightName("base_model.safetensors", "hub")
    # An SDXL config uses the same node types (CheckpointLoaderSimple loads SDXL); 0 = the model's native size.
    cfg = sdxl()
    cfg.sample.width = cfg.sample.height = 0
    s = settings_from_config({"model": to_dict(cfg.model), "sample": to_dict(cfg.sample)}, "xl", "unet_lora", 1024)
    assert (s.width, s.height, s.checkpoint, s.controlnet) == (1024, 1024, "sd_xl_base_1.0.safetensors",
                                                               "OpenPoseXL2.safetensors")
    nodes = build_nodes(s)
    check_workflow(ui_workflow(nodes), api_prompt(nodes))
    # A config without sections (older exports, tests) takes poseloop's sampler defaults.
    s = settings_from_config({"model": {}}, "v", "unet_lora", 64)
    assert (s.steps, s.cfg, s.width, s.prompt) == (20, 5.0, 64, "a person in a red shirt and blue trousers, on a beach")


def test_prompt_comes_from_the_prompts_file(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# comment\n\na knight in armour\n")
    data = to_dict(tiny().data)
    data["prompts_file"] = str(tmp_path / "p.txt")
    assert settings_from_config({"data": data}, "v", "unet_lora", 64).prompt == "a knight in armour"
    data["prompts_file"] = str(tmp_path / "moved.txt")  # gone since training: an example prompt, no failure
    assert settings_from_config({"data": data}, "v", "unet_lora", 64).prompt == data["prompts"][0]


@pytest.mark.parametrize("target", ["unet_lora", "controlnet"])
def test_workflow_for_an_sd15_sized_model_from_folders_and_files(tmp_path: Path, target: str) -> None:
    """An SD1.5-shaped UNet gets a workflow; its README gives the command that writes each file it names."""
    base, controlnet = tmp_path / "my-sd15", tmp_path / "my-sd15" / "controlnet"
    controlnet.mkdir(parents=True)
    config = policy_config(width=512, height=512)
    config["model"].update(base=str(base), controlnet=str(controlnet))
    config["data"]["poses"] = ["t_pose"]
    sd15_unet = json.loads((CONFIGS / "sd15" / "unet" / "config.json").read_text())
    out = tmp_path / "export"
    out.mkdir()
    files, readme = write_comfy_workflow(out, "run-e0004", config, target, 512, sd15_unet)
    assert files == [WORKFLOW_NAME, API_WORKFLOW_NAME, "poseloop-run-e0004-pose.png"]
    w = check_workflow(json.loads((out / WORKFLOW_NAME).read_text()), json.loads((out / API_WORKFLOW_NAME).read_text()))
    assert w["Load Checkpoint"]["ckpt_name"] == "my-sd15.safetensors"
    assert (f"`python scripts/to_single_file.py --source {base} --out ComfyUI/models/checkpoints/my-sd15.safetensors`"
            in readme)
    if target == "unet_lora":
        assert w["Load ControlNet Model"]["control_net_name"] == "my-sd15-controlnet.safetensors"
        assert (f"--source {controlnet} --out ComfyUI/models/controlnet/my-sd15-controlnet.safetensors`" in readme)
    # A single file is named as it is, and the README says to copy it, not to convert anything.
    config["model"]["base"] = str(tmp_path / "Realistic_Vision_V6.safetensors")
    _, readme = write_comfy_workflow(out, "run-e0004", config, target, 512, sd15_unet)
    assert "Copy `" + str(tmp_path / "Realistic_Vision_V6.safetensors") + "` (the file poseloop used)" in readme
    assert json.loads((out / API_WORKFLOW_NAME).read_text())["1"]["inputs"]["ckpt_name"] == \
        "Realistic_Vision_V6.safetensors"


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_no_workflow_for_a_model_comfyui_cannot_load(tmp_path: Path, name: str) -> None:
    # The embedded models: ComfyUI 0.3.48 answers "Could not detect model type" for them (a tiny-sd15
    # single file queued on it); an export says so in one line instead of writing a workflow.
    unet = json.loads((CONFIGS / name / "unet" / "config.json").read_text())
    files, readme = write_comfy_workflow(tmp_path, "v", {"model": {}}, "unet_lora", 64, unet)
    assert files == [] and list(tmp_path.iterdir()) == []
    line = readme.removeprefix("## ComfyUI workflow\n\n").rstrip("\n")
    assert "\n" not in line and "Could not detect model type" in line and "SD1.5 or SDXL" in line
    assert comfyui_model_problem(json.loads((CONFIGS / "sdxl" / "unet" / "config.json").read_text())) is None


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("target", ["unet_lora", "controlnet"])
def test_export_names_files_after_the_policy_and_says_comfyui_cannot_load_tiny(models_dir: Path, tmp_path: Path,
                                                                                target: str) -> None:
    from poseloop.policy.export import export_policy, lora_layers
    from poseloop.models.policy_files import controlnet_file_name, kohya_lora_name
    from poseloop.models.loading import load_components
    from poseloop.policy.targets import Policy
    from tiny_helpers import model_cfg

    comp = load_components(model_cfg(models_dir))
    policy = Policy(comp, target, rank=4, alpha=8.0)  # alpha != rank: a trained strength of 2 in kohya terms
    config = policy_config(width=64, height=64, steps=10)
    config["model"].update(base=str(models_dir / "tiny-sd15"), controlnet=str(models_dir / "tiny-sd15" / "controlnet"))
    folder = export_policy(policy, tmp_path / "policies", "run-e0001", config)
    assert not (folder / WORKFLOW_NAME).exists() and not (folder / API_WORKFLOW_NAME).exists()
    readme = (folder / "README.md").read_text()
    assert "## ComfyUI workflow\n\nComfyUI: no workflow written" in readme
    if target == "unet_lora":
        kohya = kohya_lora_name("run-e0001")
        assert kohya == "poseloop-run-e0001.safetensors" and not (folder / "lora_kohya.safetensors").exists()
        # ComfyUI applies alpha / rank * strength; at strength 1.0 that must be peft's trained scaling.
        with safe_open(str(folder / kohya), framework="pt") as f:
            key = next(k for k in f.keys() if k.endswith(".alpha"))
            alpha = f.get_tensor(key).item()
            rank = f.get_tensor(key.replace(".alpha", ".lora_down.weight")).shape[0]
        layer = next(iter(lora_layers(comp.unet).values()))
        assert TRAINED_LORA_STRENGTH * alpha / rank == pytest.approx(float(layer.scaling["default"]))
        assert f"ComfyUI: copy `{kohya}` into `ComfyUI/models/loras/`" in readme and f"<lora:{kohya[:-12]}:1>" in readme
    else:
        cn = controlnet_file_name("run-e0001")
        with safe_open(str(folder / cn), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
            assert any(k.startswith("control_model.input_hint_block.") for k in f.keys())  # SD1.5: original layout
        assert f"copy `{cn}` (fp16) into `ComfyUI/models/controlnet/`" in readme
