"""evaluate.py's configuration: a generation config (model, sampler, prompts and poses, store) plus the comparison."""

from __future__ import annotations

import re
from dataclasses import dataclass

from poseloop.config.generation import PRESETS as GENERATE_PRESETS
from poseloop.config.generation import DataConfig, GenerateConfig, ModelConfig, SampleConfig, StoreConfig
from poseloop.config.lib import ConfigError, check_finite, check_name, field

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class EvalSettings:
    """What to compare and how to measure it."""

    policy: str = field("latest", help="candidate: a policy version under <models_dir>/policies, or 'latest'")
    baseline: str = field("base", help="baseline: 'base' (the model without a policy) or a policy version")
    metrics: list[str] = field(default_factory=lambda: ["auto"],
                               help="reward specs to report (see docs/REWARDS.md); 'auto' = every metric whose "
                               "weights are present: pose accuracy, text alignment, the learned reward, LPIPS")
    detector_weights: str = field("", help="OpenPose weights folder for pose accuracy (auto metrics); empty = "
                                  "data.detector_weights or <models_dir>/annotators")
    clip: str = field("", help="text alignment option string for auto metrics, e.g. "
                      "'arch=ViT-L-14,weights=models/clip/open_clip_model.safetensors'")
    lpips_weights: str = field("", help="LPIPS backbone weights; empty = random backbone (distances not meaningful)")
    name: str = field("", help="evaluation name; empty = eval-<candidate>-vs-<baseline>")
    seeds: str = field("", help="seed set: evaluations that name the same one draw the same seeds and share one "
                       "baseline round (generated once, e.g. when several candidates are compared with the base "
                       "model); empty = the evaluation's own seeds and baseline round")
    bootstrap: int = field(2000, help="bootstrap resamples for confidence intervals")
    confidence: float = field(0.95, help="confidence level of the intervals")
    grid_rows: int = field(8, help="rows (condition / baseline / candidate / prompt) in the side-by-side grid")


@dataclass
class EvaluateConfig:
    """Everything evaluate.py needs: a generation config plus the evaluation settings."""

    model: ModelConfig = field(default_factory=ModelConfig, help="base model (the policy is applied on top)")
    sample: SampleConfig = field(default_factory=SampleConfig, help="sampler (seeds shared by both sides)")
    data: DataConfig = field(default_factory=DataConfig, help="prompts and poses to evaluate on")
    store: StoreConfig = field(default_factory=StoreConfig, help="where the two rounds are stored")
    eval: EvalSettings = field(default_factory=EvalSettings, help="comparison and metrics")

    def validate(self) -> None:
        """Check fields before anything loads."""
        check_finite(self)
        GenerateConfig(self.model, self.sample, self.data, self.store).validate()
        if self.model.policy or self.model.lora:
            raise ConfigError("model.policy / model.lora: set the candidate with --eval.policy and the baseline "
                              "with --eval.baseline; the model section is the base model")
        if not self.eval.policy:
            raise ConfigError("eval.policy: name the candidate policy version, or 'latest'")
        if self.eval.name:  # the rounds are named <name>-baseline / <name>-candidate, folders of the samples dir
            check_name(self.eval.name, "eval.name", fix="pose-eval-1")
        if self.eval.bootstrap < 100:
            raise ConfigError(f"eval.bootstrap: use at least 100 resamples (got {self.eval.bootstrap})")
        if not 0.5 < self.eval.confidence < 1:
            raise ConfigError(f"eval.confidence: must be between 0.5 and 1 (got {self.eval.confidence})")
        if not self.eval.metrics:
            raise ConfigError("eval.metrics: give at least one metric, or 'auto'")
        if self.eval.seeds and not _PLAIN_NAME.fullmatch(self.eval.seeds):
            raise ConfigError(f"eval.seeds: {self.eval.seeds!r} must be a plain name (letters, digits, '.', '_', '-')")


def _preset(name: str) -> EvaluateConfig:
    g = GENERATE_PRESETS[name]()
    # Two images per (prompt, pose) keep an evaluation quick while still pairing every seed.
    g.sample.images_per_group = 2
    return EvaluateConfig(model=g.model, sample=g.sample, data=g.data, store=g.store)


PRESETS = {name: (lambda n=name: _preset(n)) for name in GENERATE_PRESETS}
