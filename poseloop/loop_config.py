"""What one loop job runs: train_reward.py, train_policy.py and generate.py arguments, by preset.

A plan holds only what is the same on every machine; the worker adds its own samples folder, database
URL and models folder, the reward model version it trained (for the policy), the policy version (for
the round) and the round's name. Imports no torch, so the rating app can check a plan.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from poseloop.configlib import ConfigError

STEPS = ("reward", "policy", "generate", "compare")
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
              flag_prefix: str = "--loop-") -> LoopPlan:
    """A preset's plan with extra arguments appended to each step (later flags win)."""
    if preset not in LOOP_PRESETS:
        raise ConfigError(f"{flag_prefix}preset: {preset!r} is not one of {', '.join(LOOP_PRESETS)}")
    plan = LOOP_PRESETS[preset]()
    plan.reward += split_args(reward, f"{flag_prefix}reward-args")
    plan.policy += split_args(policy, f"{flag_prefix}policy-args")
    plan.generate += split_args(generate, f"{flag_prefix}generate-args")
    plan.compare += split_args(compare, f"{flag_prefix}compare-args")
    return plan


def check_plan(plan: LoopPlan, flag_prefix: str = "--loop-") -> None:
    """Parse every step's arguments with its script's parser (no model is loaded); a ConfigError naming the flag.

    Paths the worker fills in (samples folder, models folder, versions) are given placeholder values here.
    """
    import contextlib
    import io

    from poseloop.config import PRESETS as GENERATE_PRESETS
    from poseloop.config import GenerateConfig
    from poseloop.configlib import parse_config
    from poseloop.evaluation_config import PRESETS as EVALUATE_PRESETS
    from poseloop.evaluation_config import EvaluateConfig
    from poseloop.policy_config import PRESETS as POLICY_PRESETS
    from poseloop.policy_config import PolicyConfig
    from poseloop.reward_config import PRESETS as REWARD_PRESETS
    from poseloop.reward_config import TrainRewardConfig

    parsers: dict[str, tuple[type, dict[str, Any], str]] = {
        "reward": (TrainRewardConfig, REWARD_PRESETS, "default"),
        "policy": (PolicyConfig, POLICY_PRESETS, "tiny"),
        "generate": (GenerateConfig, GENERATE_PRESETS, "tiny"),
        "compare": (EvaluateConfig, EVALUATE_PRESETS, "tiny"),
    }
    for step, (cls, presets, default_preset) in parsers.items():
        args = list(getattr(plan, step)) if step != "compare" else [*plan.generate, *plan.compare]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parse_config(cls, presets, default_preset, args, description="", prog=step)
        except SystemExit:
            last = (err.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
            raise ConfigError(f"{flag_prefix}{step}-args: {last.split('error: ', 1)[-1]}") from None
