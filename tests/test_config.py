"""Config: presets, overrides from the command line, early validation naming the field."""

from __future__ import annotations

import json

import pytest

from poseloop.config import PRESETS, GenerateConfig
from poseloop.configlib import ConfigError, from_dict, parse_config, set_field, to_dict


def parse(argv: list[str]) -> GenerateConfig:
    cfg, _ = parse_config(GenerateConfig, PRESETS, "tiny", argv, description="test")
    return cfg


def test_default_preset_is_embedded_tiny() -> None:
    cfg = parse([])
    assert cfg.model.base == "models/tiny-sd15"
    assert cfg.model.arch == "sd15"
    assert (cfg.sample.width, cfg.sample.height) == (128, 128)


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
