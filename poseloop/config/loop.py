"""What one loop job runs: train_reward.py, train_policy.py and generate.py arguments, by preset.

A plan holds only what is the same on every machine; the worker adds its own samples folder, database
URL and models folder, the reward model version it trained (for the policy), the policy version (for
the round) and the round's name. Imports no torch, so the rating app can check a plan.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poseloop.config.lib import ConfigError
from poseloop.config.lib import field as cfield

STEPS = ("reward", "policy", "generate", "compare")
DEFAULT_STALE_S = 120.0  # a running job without a heartbeat for this long has lost its worker
# A blind A/B of each new policy against the one it continued: 12 groups x 2 images = 24 pairs on shared seeds.
DEFAULT_COMPARE = ["--set", "data.max_groups=12", "--set", "sample.images_per_group=2"]


@dataclass
class LoopPlan:
    """The arguments of the three steps (as on their command lines), before the worker's paths are added."""

    preset: str = field(default="default", metadata={"help": "the loop preset these arguments came from"})
    reward: list[str] = field(default_factory=list, metadata={"help": "train_reward.py arguments"})
    policy: list[str] = field(default_factory=list, metadata={"help": "train_policy.py arguments"})
    generate: list[str] = field(default_factory=list, metadata={"help": "generate.py arguments, on top of the "
                                                                         "last loop round's prompts and poses"})
    compare: list[str] = field(default_factory=lambda: list(DEFAULT_COMPARE),
                               metadata={"help": "evaluate.py arguments (after the generate ones) of the blind A/B "
                                                 "between the new policy and its parent"})
    blind_ab: bool = field(default=True, metadata={"help": "make the blind A/B after each round"})

    def to_dict(self) -> dict[str, Any]:
        """The plan as stored in a job row."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopPlan:
        """A plan from a job row; a ConfigError naming the key for anything else."""
        if not isinstance(data, dict):
            raise ConfigError("job plan: expected an object with reward, policy and generate argument lists")
        for key in STEPS:
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise ConfigError(f"job plan: {key!r} must be a list of argument strings, got {value!r:.80}")
        return cls(preset=str(data.get("preset", "")), reward=list(data.get("reward", [])),
                   policy=list(data.get("policy", [])), generate=list(data.get("generate", [])),
                   compare=list(data.get("compare", DEFAULT_COMPARE)), blind_ab=bool(data.get("blind_ab", True)))


def default() -> LoopPlan:
    """README's loop with every default: the reward model (3-member ensemble), DDPO on it (tiny preset), a round."""
    return LoopPlan("default", [], ["--algo", "ddpo", "--reward", "latest"], [])


def no_ab() -> LoopPlan:
    """The default loop without the blind A/B rounds (the fastest way to the next round)."""
    plan = default()
    plan.preset, plan.blind_ab = "no-ab", False
    return plan


def tiny_lcm() -> LoopPlan:
    """The embedded world's 4-step LCM: RLCM on the learned reward, rounds drawn with the LCM-LoRA."""
    return LoopPlan("tiny-lcm", [], ["--preset", "tiny-rlcm", "--reward", "latest"], ["--preset", "tiny-lcm"])


def quick() -> LoopPlan:
    """A smoke run of the loop in about a minute on a CPU: a 2-member reward model, 2 short DDPO epochs, 4-step
    round. It shows the loop's mechanics, not a policy that learned."""
    return LoopPlan("quick", ["--preset", "quick", "--set", "train.epochs=4"],
                    ["--algo", "ddpo", "--reward", "latest", "--set", "train.epochs=2",
                     "--set", "train.groups_per_epoch=2", "--set", "sample.steps=4"],
                    ["--set", "sample.steps=4"], ["--set", "data.max_groups=2", "--set", "sample.images_per_group=2",
                                                  "--set", "eval.bootstrap=200"])


LOOP_PRESETS: dict[str, Callable[[], LoopPlan]] = {"default": default, "no-ab": no_ab, "tiny-lcm": tiny_lcm,
                                                   "quick": quick}


def split_args(text: str | Sequence[str], flag: str) -> list[str]:
    """Shell-style words of an extra-arguments flag; a ConfigError naming the flag for unbalanced quotes."""
    if not isinstance(text, str):
        return [str(a) for a in text]
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e} in {text!r}; quote each value once, e.g. "
                          "\"--data.prompts 'a dancer'\"") from None


def make_plan(preset: str, reward: str | Sequence[str] = "", policy: str | Sequence[str] = "",
              generate: str | Sequence[str] = "", compare: str | Sequence[str] = "",
              flag_prefix: str = "loop_") -> LoopPlan:
    """A preset's plan with extra arguments appended to each step (later flags win)."""
    if preset not in LOOP_PRESETS:
        raise ConfigError(f"{flag_prefix}preset: {preset!r} is not one of {', '.join(LOOP_PRESETS)}")
    plan = LOOP_PRESETS[preset]()
    plan.reward += split_args(reward, f"{flag_prefix}reward_args")
    plan.policy += split_args(policy, f"{flag_prefix}policy_args")
    plan.generate += split_args(generate, f"{flag_prefix}generate_args")
    plan.compare += split_args(compare, f"{flag_prefix}compare_args")
    return plan


def check_plan(plan: LoopPlan, flag_prefix: str = "loop_") -> None:
    """Parse every step's arguments with its script's parser (no model is loaded); a ConfigError naming the flag.

    Paths the worker fills in (samples folder, models folder, versions) are given placeholder values here.
    """
    from poseloop.config.generation import PRESETS as GENERATE_PRESETS
    from poseloop.config.generation import GenerateConfig
    from poseloop.config.lib import parse_step_args
    from poseloop.config.evaluation import PRESETS as EVALUATE_PRESETS
    from poseloop.config.evaluation import EvaluateConfig
    from poseloop.config.policy import PRESETS as POLICY_PRESETS
    from poseloop.config.policy import PolicyConfig
    from poseloop.config.reward import PRESETS as REWARD_PRESETS
    from poseloop.config.reward import TrainRewardConfig

    parsers: dict[str, tuple[type, dict[str, Any], str]] = {
        "reward": (TrainRewardConfig, REWARD_PRESETS, "default"),
        "policy": (PolicyConfig, POLICY_PRESETS, "tiny"),
        "generate": (GenerateConfig, GENERATE_PRESETS, "tiny"),
        "compare": (EvaluateConfig, EVALUATE_PRESETS, "tiny"),
    }
    for step, (cls, presets, default_preset) in parsers.items():
        args = list(getattr(plan, step)) if step != "compare" else [*plan.generate, *plan.compare]
        try:
            parse_step_args(cls, presets, default_preset, args, prog=step)
        except ConfigError as e:
            raise ConfigError(f"{flag_prefix}{step}_args: {e}") from None


@dataclass
class WorkerConfig:
    """Settings of `python -m poseloop.worker`: where the shared samples, database and models are, and its pace."""

    samples_dir: Path = cfield(Path("samples"), help="the shared samples folder (images, trajectories; the rating "
                                                     "app's --samples_dir)")
    db_url: str | None = cfield(None, help="SQLAlchemy URL of the shared database (default: "
                                           "sqlite:///<samples_dir>/feedback.sqlite)")
    models_dir: Path = cfield(Path("models"), help="where reward models and policies are written (models/reward, "
                                                   "models/policies)")
    threads: int = cfield(0, help="torch CPU threads; 0 = torch's default")
    poll: float = cfield(1.0, help="seconds between looks for a queued job")
    heartbeat: float = cfield(2.0, help="seconds between progress / heartbeat writes")
    stale_after: float = cfield(DEFAULT_STALE_S, help="a running job with no heartbeat for this long is taken again "
                                                      "(its worker died)")
    preload: bool = cfield(True, help="import torch and the steps' code at start (false: at the first job)")
    once: bool = cfield(False, help="run one job (waiting for one if none is queued), then exit")
    exit_when_idle: bool = cfield(False, help="exit when no job is queued")
    exit_with_parent: bool = cfield(False, help="exit (between jobs) once the process that started this one is "
                                                "gone: the rating app's own worker does not outlive the app")

    def validate(self) -> WorkerConfig:
        """Check the numbers and the samples folder; a ConfigError naming the field."""
        for name in ("poll", "heartbeat", "stale_after"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.heartbeat * 3 > self.stale_after:
            raise ConfigError(f"stale_after: {self.stale_after} must be at least 3 heartbeats (heartbeat "
                              f"{self.heartbeat}), or a busy worker's job would be taken from it")
        if self.threads < 0:
            raise ConfigError(f"threads: {self.threads} is negative; 0 = torch's default")
        self.samples_dir, self.models_dir = Path(self.samples_dir), Path(self.models_dir)
        if not self.samples_dir.is_dir():
            raise ConfigError(f"samples_dir: {self.samples_dir} is not a directory (the folder generate.py and the "
                              "rating app use)")
        return self


WORKER_PRESETS: dict[str, Callable[[], WorkerConfig]] = {"default": WorkerConfig}
