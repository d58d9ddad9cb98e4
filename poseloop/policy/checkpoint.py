"""A policy run's checkpoint and exports: everything a resumed run needs, and the versions it publishes.

<runs_dir>/<run>/checkpoint holds the weights, optimizer, stat tracker, RNG states, counters and history
(written atomically by poseloop.policy.run_files.write_checkpoint) and the identity of the inputs it was made
from; a checkpoint of other inputs is refused. Sampling seeds and shuffles are pure functions of (run
seed, epoch, index), so N epochs straight and N/2 + resume + N/2 give identical weights. An export is a
version <export_root>/<run>-e<epoch>/ with its lineage record (poseloop.policy.export, poseloop.policy.lineage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poseloop.policy import lineage
from poseloop.config.lib import ConfigError, to_dict
from poseloop.policy.run_files import plot_history, set_rng_state, write_checkpoint

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from poseloop.policy.advantages import PerPromptStatTracker
    from poseloop.policy.targets import Policy
    from poseloop.config.policy import PolicyConfig


class RunCheckpoints:
    """PolicyTrainer's checkpoint, resume and export (a mixin: the state below is the trainer's, set in its __init__)."""

    cfg: PolicyConfig
    accelerator: Accelerator
    policy: Policy
    optimizer: torch.optim.Optimizer
    tracker: PerPromptStatTracker
    run_dir: Path
    run_name: str
    identity: str  # lineage.run_identity of the run's resolved inputs and parent
    inputs: dict[str, Any]
    inputs_digest: str
    parent: lineage.Parent | None
    reward_spec: str
    epoch: int
    global_step: int
    history: list[dict[str, float]]
    guard_streak: int
    best_heldout: float | None
    export_dir: Path | None

    def save_checkpoint(self) -> Path:
        """Atomically write everything a resumed run needs to <run_dir>/checkpoint."""
        if not self.accelerator.is_main_process:
            return self.run_dir / "checkpoint"
        state = {"epoch": self.epoch, "global_step": self.global_step, "identity": self.identity,
                 "tracker": self.tracker.state_dict(), "history": self.history,
                 "guard_streak": self.guard_streak, "best_heldout": self.best_heldout,
                 "config": to_dict(self.cfg)}
        return write_checkpoint(self.run_dir, self.policy.state_dict(), self.optimizer.state_dict(), state)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of this run, if any; refuse one made with another config."""
        from safetensors.torch import load_file

        from poseloop.policy.run_files import CheckpointFileError, load_resume_file

        ckpt = self.run_dir / "checkpoint"
        if not (ckpt / "state.json").is_file():
            return False
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("identity") != self.identity:
            raise ConfigError(f"output.run_name: the checkpoint in {ckpt} was made from other inputs (config, reward "
                              "model, labels or parent policy); pick another --output.run_name, or pass "
                              "--train.resume false to start over")
        self.policy.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
        try:  # weights_only: a pickle planted in the run folder must not run (load_resume_file)
            optimizer_state, rng = load_resume_file(ckpt / "optimizer.pt"), load_resume_file(ckpt / "rng.pt")
        except CheckpointFileError as e:
            raise ConfigError(f"train.resume: {e}") from None
        self.optimizer.load_state_dict(optimizer_state)
        set_rng_state(rng)
        self.tracker.load_state_dict(state["tracker"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = list(state["history"])
        self.guard_streak, self.best_heldout = int(state["guard_streak"]), state["best_heldout"]
        return True

    def export(self) -> Path | None:
        """Export the current weights as models/policies/<run>-e<epoch>/ and point 'latest' at it."""
        from poseloop.policy.export import export_policy

        if not self.accelerator.is_main_process:
            return None
        version = f"{self.run_name}-e{self.epoch:04d}"
        meta = {"poseloop_algo": self.cfg.algo, "poseloop_epoch": str(self.epoch),
                "poseloop_reward": self.reward_spec if self.cfg.online else "human preferences",
                "poseloop_parent": self.parent.version if self.parent else lineage.BASE}
        record = lineage.lineage_record(version, self.run_name, self.cfg.algo, self.epoch, self.identity, self.inputs,
                                        self.inputs_digest, self.parent, to_dict(self.cfg.model), self.cfg.target.kind)
        self.export_dir = export_policy(self.policy, self.cfg.export_root, version, to_dict(self.cfg), meta,
                                        {lineage.LINEAGE_FILE: json.dumps(record, indent=2)})
        plot_history(self.history, self.run_dir / "metrics.png", self.cfg.algo)
        return self.export_dir

    def _checkpoint_epoch(self) -> int:
        """The epoch of the checkpoint on disk (0 = none)."""
        p = self.run_dir / "checkpoint" / "state.json"
        return int(json.loads(p.read_text())["epoch"]) if p.is_file() else 0
