"""ComfyUI workflows in every policy export: checked against ComfyUI's own node signatures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors import safe_open

from poseloop.comfy_workflow import (API_WORKFLOW_NAME, WORKFLOW_NAME, api_prompt, build_nodes, settings_from_config,
                                     ui_workflow, weight_file_name)
from poseloop.config import GenerateConfig, sdxl, tiny
from poseloop.configlib import to_dict

# ComfyUI's node signatures, copied by hand from comfyanonymous/ComfyUI nodes.py at commit
# e60e19b175f93f2c8fac037063de9f13259be9d4 (INPUT_TYPES()["required"] in order, RETURN_TYPES), kept
# independent of poseloop.comfy_workflow so that a slip in its table shows up here.
# "COMBO" is a list-of-choices input (a file name or an option): a widget, never a link.
COMFY_NODES: dict[str, tuple[list[tuple[str, str]], list[str]]] = {
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO")], ["MODEL", "CLIP", "VAE"]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP"), ("lora_name", "COMBO"), ("strength_model", "FLOAT"),
                    ("strength_clip", "FLOAT")], ["MODEL", "CLIP"]),
    "ControlNetLoader": ([("control_net_name", "COMBO")], ["CONTROL_NET"]),
    "LoadImage": ([("image", "COMBO")], ["IMAGE", "MASK"]),
    "CLIPTextEncode": ([("text", "STRING"), ("clip", "CLIP")], ["CONDITIONING"]),
    "ControlNetApplyAdvanced": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                 ("control_net", "CONTROL_NET"), ("image", "IMAGE"), ("strength", "FLOAT"),
                                 ("start_percent", "FLOAT"), ("end_percent", "FLOAT")],
                                ["CONDITIONING", "CONDITIONING"]),
    "EmptyLatentImage": ([("width", "INT"), ("height", "INT"), ("batch_size", "INT")], ["LATENT"]),
    "KSampler": ([("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
                  ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT"), ("denoise", "FLOAT")], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "STRING")], []),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"}
# The frontend adds a widget after these inputs, saved in widgets_values but not in the API format:
# control_after_generate after an INT named seed, an upload button after an image_upload combo.
FRONTEND_EXTRA = {("KSampler", "seed"): "control_after_generate", ("LoadImage", "image"): "upload"}
# comfy/sampler_names.py at commit 179c2d35c84beb3d9761fcd146ffcba77273413e: the samplers and schedulers
# that are not k-diffusion ones, plus the schedule names (all of SCHEDULER_NAMES).
COMFY_SAMPLERS_SUBSET = {"ddim", "uni_pc", "uni_pc_bh2", "euler", "ddpm"}
COMFY_SCHEDULERS = {"normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                    "linear_quadratic", "kl_optimal"}


def widget_names(node_type: str) -> list[str]:
    """The widgets_values layout of a node type according to the table above."""
    out = []
    for name, type_ in COMFY_NODES[node_type][0]:
        if type_ in WIDGET_TYPES:
            out.append(name)
            if (node_type, name) in FRONTEND_EXTRA:
                out.append(FRONTEND_EXTRA[node_type, name])
    return out


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
        assert out["type"] == inp["type"] == type_ == COMFY_NODES[nodes[src]["type"]][1][src_slot]
        assert dict(COMFY_NODES[nodes[dst]["type"]][0])[inp["name"]] == type_
        assert link_id in out["links"] and inp["link"] == link_id
    widgets_by_title = {}
    for node in ui["nodes"]:
        required, outputs = COMFY_NODES[node["type"]]
        assert [o["type"] for o in node["outputs"]] == outputs
        assert all(link in links for o in node["outputs"] for link in o["links"])
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        names = widget_names(node["type"])
        # Every required input is linked or a widget, never both, never neither.
        for name, type_ in required:
            assert (name in linked) != (type_ in WIDGET_TYPES), (node["type"], name)
        assert len(node["widgets_values"]) == len(names), node["type"]
        values = dict(zip(names, node["widgets_values"]))
        for name, type_ in required:
            if type_ == "INT":
                assert isinstance(values[name], int) and not isinstance(values[name], bool), (node["type"], name)
            elif type_ == "FLOAT":
                assert isinstance(values[name], (int, float)), (node["type"], name)
            elif type_ in ("STRING", "COMBO"):
                assert isinstance(values[name], str), (node["type"], name)
        widgets_by_title[node.get("title", node["type"])] = values

        # The API format: the same node, widget values without the frontend's extras, links as [id, slot].
        entry = api[str(node["id"])]
        assert entry["class_type"] == node["type"]
        expected = {name: value for name, value in values.items() if name not in FRONTEND_EXTRA.values()}
        for i in node["inputs"]:
            _, src, src_slot, *_ = links[i["link"]]
            expected[i["name"]] = [str(src), src_slot]
        assert entry["inputs"] == expected
        assert set(expected) == {name for name, _ in required}
    assert set(api) == {str(i) for i in nodes}
    return widgets_by_title


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

    assert w["Load Checkpoint"]["ckpt_name"] == "stable-diffusion-v1-5.safetensors" and s.checkpoint_is_placeholder
    assert w["Positive prompt"]["text"] == "a dancer on a stage" and w["Negative prompt"]["text"] == "blurry"
    assert w["Apply ControlNet"] == {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}
    assert w["Empty Latent Image"] == {"width": 512, "height": 768, "batch_size": 1}
    ks = w["KSampler"]
    assert (ks["seed"], ks["control_after_generate"], ks["steps"], ks["cfg"]) == (7, "fixed", 25, 6.5)
    assert ks["denoise"] == 1.0
    assert ks["sampler_name"] in COMFY_SAMPLERS_SUBSET and ks["scheduler"] in COMFY_SCHEDULERS
    assert (ks["sampler_name"], ks["scheduler"]) == ("ddim", "ddim_uniform")
    assert w["Pose image"] == {"image": "poseloop-run-e0003-pose.png", "upload": "image"}
    types = [n["type"] for n in ui["nodes"]]
    if target == "unet_lora":
        lora = next(v for n, v in w.items() if n.startswith("poseloop policy"))
        # The export writes alpha = trained scaling * rank, so the trained strength is 1.0 in ComfyUI.
        assert lora == {"lora_name": "lora_kohya.safetensors", "strength_model": 1.0, "strength_clip": 1.0}
        assert w["Load ControlNet Model"]["control_net_name"] == "sd-controlnet-openpose.safetensors"
        # The KSampler's model and both prompts' CLIP come through the LoRA, not around it.
        lora_id = types.index("LoraLoader") + 1
        assert api[str(types.index("KSampler") + 1)]["inputs"]["model"] == [str(lora_id), 0]
        encoders = [e for e in api.values() if e["class_type"] == "CLIPTextEncode"]
        assert len(encoders) == 2 and all(e["inputs"]["clip"] == [str(lora_id), 1] for e in encoders)
    else:
        assert "LoraLoader" not in types
        assert w["Load ControlNet Model"]["control_net_name"] == "poseloop-run-e0003-controlnet.safetensors"


def test_checkpoint_names_and_defaults() -> None:
    assert weight_file_name("/ckpts/sd_xl_base_1.0.safetensors", "x") == ("sd_xl_base_1.0.safetensors", False)
    assert weight_file_name("models/tiny-sd15/", "x") == ("tiny-sd15.safetensors", True)
    assert weight_file_name("models/tiny-sd15/controlnet", "x") == ("tiny-sd15-controlnet.safetensors", True)
    assert weight_file_name("", "base_model.safetensors") == ("base_model.safetensors", True)
    # An SDXL config uses the same node types (CheckpointLoaderSimple loads SDXL); 0 = the model's native size.
    cfg = sdxl()
    cfg.sample.width = cfg.sample.height = 0
    s = settings_from_config({"model": to_dict(cfg.model), "sample": to_dict(cfg.sample)}, "xl", "unet_lora", 1024)
    assert (s.width, s.height, s.checkpoint) == (1024, 1024, "stable-diffusion-xl-base-1.0.safetensors")
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


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("target", ["unet_lora", "controlnet"])
def test_export_writes_the_workflows_and_pose_beside_the_weights(models_dir: Path, tmp_path: Path, target: str) -> None:
    from poseloop.export import KOHYA_NAME, export_policy, lora_layers
    from poseloop.models import load_components
    from poseloop.policy import Policy
    from tiny_helpers import model_cfg

    comp = load_components(model_cfg(models_dir))
    policy = Policy(comp, target, rank=4, alpha=8.0)  # alpha != rank: a trained strength of 2 in kohya terms
    config = policy_config(width=64, height=64, steps=10)
    config["model"].update(base=str(models_dir / "tiny-sd15"), controlnet=str(models_dir / "tiny-sd15" / "controlnet"))
    config["data"]["poses"] = ["t_pose"]
    folder = export_policy(policy, tmp_path / "policies", "run-e0001", config)

    ui = json.loads((folder / WORKFLOW_NAME).read_text())
    api = json.loads((folder / API_WORKFLOW_NAME).read_text())
    w = check_workflow(ui, api)
    pose = w["Pose image"]["image"]
    with Image.open(folder / pose) as im:
        assert im.size == (64, 64) and im.mode == "RGB" and im.getbbox() is not None  # a skeleton, not black
    readme = (folder / "README.md").read_text()
    assert "## ComfyUI workflow" in readme and f"`{WORKFLOW_NAME}`" in readme and f"`{pose}`" in readme
    assert w["Load Checkpoint"]["ckpt_name"] == "tiny-sd15.safetensors" and "pick your" in readme
    if target == "unet_lora":
        lora = w["poseloop policy run-e0001"]
        assert lora["lora_name"] == KOHYA_NAME and (folder / KOHYA_NAME).is_file()
        # ComfyUI applies alpha / rank * strength; at strength 1.0 that must be peft's trained scaling.
        with safe_open(str(folder / KOHYA_NAME), framework="pt") as f:
            key = next(k for k in f.keys() if k.endswith(".alpha"))
            alpha = f.get_tensor(key).item()
            rank = f.get_tensor(key.replace(".alpha", ".lora_down.weight")).shape[0]
        layer = next(iter(lora_layers(comp.unet).values()))
        assert lora["strength_model"] * alpha / rank == pytest.approx(float(layer.scaling["default"]))
        assert "Copy `lora_kohya.safetensors` into `ComfyUI/models/loras/`" in readme
    else:
        assert "LoraLoader" not in {n["type"] for n in ui["nodes"]}
        assert f"as `{w['Load ControlNet Model']['control_net_name']}`" in readme
