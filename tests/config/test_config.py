"""Config: presets, overrides from the command line, early validation naming the field."""

from __future__ import annotations

import json

import pytest

from poseloop.config.generation import PRESETS, GenerateConfig
from poseloop.config.lib import ConfigError, from_dict, parse_config, set_field, to_dict


def parse(argv: list[str]) -> GenerateConfig:
    cfg, _ = parse_config(GenerateConfig, PRESETS, "tiny", argv, description="test")
    return cfg


def test_default_preset_is_embedded_tiny() -> None:
    cfg = parse([])
    assert cfg.model.base == "models/tiny-sd15"
    assert cfg.model.arch == "sd15"
    assert (cfg.sample.width, cfg.sample.height) == (64, 64)  # the embedded world's native size


def test_presets_sd15_and_sdxl_point_at_real_hub_ids() -> None:
    sd15 = parse(["--preset", "sd15"])
    assert sd15.model.controlnet == "lllyasviel/sd-controlnet-openpose"
    sdxl = parse(["--preset", "sdxl"])
    assert sdxl.model.arch == "sdxl"
    assert sdxl.model.controlnet == "thibaud/controlnet-openpose-sdxl-1.0"
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert sdxl.sample.width == 1024


def test_set_and_plain_flags_override_any_field() -> None:
    cfg = parse(["--set", "sample.steps=30", "--sample.guidance_scale", "7.5", "--data.prompts", "a, b", "c",
                 "--set", "model.local_files_only=true"])
    assert cfg.sample.steps == 30
    assert cfg.sample.guidance_scale == 7.5
    assert cfg.data.prompts == ["a, b", "c"]
    assert cfg.model.local_files_only is True


def test_set_accepts_json_lists() -> None:
    cfg = parse(["--set", 'data.poses=["standing", "t_pose"]'])
    assert cfg.data.poses == ["standing", "t_pose"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "sample.eta=0"], "sample.eta"),
        (["--set", "sample.steps=0"], "sample.steps"),
        (["--set", "sample.width=100"], "sample.width"),
        (["--set", "sample.steps=many"], "sample.steps"),
        (["--set", "sample.stepz=3"], "sample.stepz"),
        (["--set", "model.dtype=float8"], "model.dtype"),
        (["--set", "data.dataset=/nonexistent.jsonl"], "data.dataset"),
        # A path that does not exist and cannot be a hub id (org/name) is named before any hub lookup.
        (["--model.base", "/nonexistent/sd15"], "model.base: '/nonexistent/sd15' is neither an existing file or folder"),
        (["--model.controlnet", "./models/openpose"], "model.controlnet: './models/openpose' is neither"),
        (["--model.lcm_lora", "~/loras/lcm"], "model.lcm_lora: '~/loras/lcm' is neither"),
        (["--set", "data.photos=/tmp/x.png"], "data.photos"),
        (["--set", "sample.images_per_group=0"], "sample.images_per_group"),
        (["--set", "sample"], "FIELD=VALUE"),
    ],
)
def test_bad_values_fail_before_anything_loads_and_name_the_field(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_eta_above_one_is_refused_and_one_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--set", "sample.eta=1"]).sample.eta == 1.0  # DDPO's setting is the upper bound
    with pytest.raises(SystemExit) as exc:
        parse(["--set", "sample.eta=1.01"])
    assert exc.value.code == 2
    assert "sample.eta: must be <= 1 (got 1.01)" in capsys.readouterr().err


def test_unknown_field_suggests_the_right_one() -> None:
    cfg = PRESETS["tiny"]()
    with pytest.raises(ConfigError, match="sample.steps"):
        set_field(cfg, "steps", "3")


def test_help_lists_every_field_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    for flag in ("--sample.eta", "--model.controlnet", "--data.keypoints", "--store.db_url", "--preset"):
        assert flag in out
    assert "must be > 0" in out  # help text of sample.eta


def test_config_round_trips_through_json() -> None:
    cfg = parse(["--preset", "sdxl", "--set", "sample.steps=7"])
    again = from_dict(GenerateConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def _float_fields(cfg_cls: type) -> list[str]:
    from poseloop.config.lib import _leaf_fields, _scalar_type

    return [name for name, _f, tp in _leaf_fields(cfg_cls) if _scalar_type(tp) is float]


def _every_config() -> list[tuple[type, dict, str, str]]:
    from poseloop.config.evaluation import PRESETS as EVAL_PRESETS
    from poseloop.config.evaluation import EvaluateConfig
    from poseloop.config.reward import PRESETS as REWARD_PRESETS
    from poseloop.config.reward import TrainRewardConfig
    from poseloop.config.policy import PRESETS as POLICY_PRESETS
    from poseloop.config.policy import PolicyConfig

    return [(GenerateConfig, PRESETS, "tiny", "generate.py"), (TrainRewardConfig, REWARD_PRESETS, "default", "train_reward.py"),
            (PolicyConfig, POLICY_PRESETS, "tiny", "train_policy.py"), (EvaluateConfig, EVAL_PRESETS, "tiny", "evaluate.py")]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999", "NaN"])
def test_every_float_field_of_every_config_must_be_finite(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    checked = 0
    for cfg_cls, presets, default, prog in _every_config():
        fields = _float_fields(cfg_cls)
        assert fields, prog
        for name in fields:
            # argparse reads a flag value starting with "-" as another flag: "-inf" is tested through --set only.
            forms = [["--set", f"{name}={bad}"]] + ([] if bad.startswith("-") else [[f"--{name}", bad]])
            for argv in forms:
                with pytest.raises(SystemExit) as exc:
                    parse_config(cfg_cls, presets, default, argv, description="test", prog=prog)
                assert exc.value.code == 2, (prog, name)
                err = capsys.readouterr().err
                assert f"{name}: must be a finite number" in err, (prog, name, err)
                checked += 1
    assert checked >= 35  # sample.*, model.lora_scale, train.*, optim.*, d3po.*, guard.*, eval.confidence, ...


def test_a_non_finite_value_set_in_code_is_refused_too() -> None:
    from poseloop.config.lib import check_finite
    from poseloop.config.policy import PolicyConfig

    cfg = PRESETS["tiny"]()
    cfg.sample.guidance_scale = float("nan")
    with pytest.raises(ConfigError, match=r"sample.guidance_scale: must be a finite number \(got nan\)"):
        check_finite(cfg)
    policy = PolicyConfig()
    policy.d3po.clamp_eps = float("inf")  # an optional float field
    with pytest.raises(ConfigError, match="d3po.clamp_eps"):
        check_finite(policy)
    policy.d3po.clamp_eps = None
    check_finite(policy)


def test_tiny_on_points_the_tiny_preset_at_a_model_and_a_quiet_output_folder() -> None:
    from poseloop.config.policy import tiny, tiny_on

    cfg = tiny_on("/m/tiny-sd15", "/out", threads=2)
    assert (cfg.model.base, cfg.model.controlnet, cfg.model.threads) == ("/m/tiny-sd15", "/m/tiny-sd15/controlnet", 2)
    assert (cfg.output.root, cfg.output.runs_dir) == ("/out/policies", "/out/runs")
    assert cfg.output.grid_every == cfg.output.export_every == 0
    assert cfg.train == tiny().train and cfg.sample == tiny().sample  # the preset itself, untouched


def test_every_preset_validates_on_a_fresh_checkout(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded folders (and the world's LCM-LoRA in one) are built on first use, after validation: a preset
    naming them must validate in a folder that has no models/ yet (CI caught tiny-rlcm refusing to start)."""
    from poseloop.config.evaluation import PRESETS as EVALUATE_PRESETS
    from poseloop.config.policy import PRESETS as POLICY_PRESETS

    monkeypatch.chdir(tmp_path)
    for presets in (PRESETS, POLICY_PRESETS, EVALUATE_PRESETS):
        for preset in presets.values():
            preset().validate()  # raises ConfigError naming the field if a preset points at a missing file
    cfg = PRESETS["tiny-lcm"]()
    cfg.model.lcm_lora = "elsewhere/lcm_lora.safetensors"
    with pytest.raises(ConfigError, match="model.lcm_lora: file 'elsewhere/lcm_lora.safetensors' does not exist"):
        cfg.validate()
    # Inside the embedded folder only the file its build writes is taken on trust: a typo fails here, not at load.
    cfg.model.lcm_lora = "models/tiny-sd15/lcm-lora.safetensors"
    with pytest.raises(ConfigError, match="model.lcm_lora: file 'models/tiny-sd15/lcm-lora.safetensors' does not exist"):
        cfg.validate()


def test_the_config_hash_covers_what_changes_a_run_and_nothing_else() -> None:
    from poseloop.config.policy import config_hash, tiny_faithful

    cfg = tiny_faithful()
    base = config_hash(cfg)
    for key, value in (("train.shared_start", True), ("train.first_steps", 2), ("sample.sampler", "lcm"),
                       ("model.lcm_lora", "x.safetensors"), ("train.seed", 7)):
        other = tiny_faithful()
        set_field(other, key, value)
        assert config_hash(other) != base, key
    for key, value in (("train.epochs", 99), ("train.resume", False), ("output.root", "/elsewhere"),
                       ("guard.patience", 9), ("parent", "base"), ("refl.margin", 3.0), ("draft.k", 2)):
        other = tiny_faithful()
        set_field(other, key, value)
        assert config_hash(other) == base, key
