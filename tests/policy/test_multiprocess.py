"""Several processes: `accelerate launch --num_processes 2 --cpu` (gloo) trains the same LoRA as one process.

The same global batch in one process (train.batch_size B) and in two (train.batch_size B / 2, the same
train.groups_per_epoch; docs/POLICY.md, "Several processes") must give the same weights: the two
processes sample their halves of the epoch's (group, seed) items, share rewards and keys for the
advantages (DDPO) or pick pairs within their own groups (D3PO, d3po.source=reward), draw the same global
minibatches and steps, and average their gradients before every optimizer step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(models_dir: Path, out: Path, processes: int, batch_size: int, algo_args: list[str]) -> dict:
    """Run train_policy.py in `processes` processes; the checkpoint's LoRA weights."""
    from safetensors.torch import load_file

    model = models_dir / "tiny-sd15"
    args = ["--model.base", str(model), "--model.controlnet", str(model / "controlnet"),
            "--sample.width", "64", "--sample.height", "64", "--sample.steps", "4", "--sample.images_per_group", "2",
            "--sample.batch_size", "4", "--data.prompts", "a dancer", "--data.poses", "standing", "sitting",
            "--reward", "brightness", "--train.epochs", "2", "--train.groups_per_epoch", "4",
            "--train.batch_size", str(batch_size), "--train.stat_min_count", "2",
            # Adam divides by sqrt(v) + eps: with the default eps 1e-8 a gradient entry of 1e-12 whose sign
            # differs by rounding moves its weight by a full learning rate either way, in both runs alike
            # correct. A large eps makes each update proportional to the gradient (plain SGD with
            # lr / eps), so the weights differ only as much as the gradients do.
            "--optim.adam_eps", "1", "--optim.lr", "1",
            "--output.grid_every", "0", "--output.runs_dir", str(out / "runs"), "--output.root", str(out / "policies"),
            "--output.run_name", "run", *algo_args]
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if processes == 1:
        cmd = [sys.executable, str(ROOT / "train_policy.py"), *args]
    else:
        # Not `--cpu`: accelerate 1.15 runs ONE process for `--cpu --num_processes 2` (its simple launcher,
        # which expects mpirun for more). --multi_gpu starts torchrun's N processes; ACCELERATE_USE_CPU and
        # no visible GPU make them CPU processes on the gloo backend.
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "train_policy.py"), *args]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Every process prints the one-line summary: this many processes ran (the main one exported).
    assert proc.stdout.count(" epochs (2 this run)") == processes, proc.stdout
    return load_file(str(out / "runs" / "run" / "checkpoint" / "weights.safetensors"))


@pytest.mark.parametrize("algo_args", [["--algo", "ddpo"], ["--algo", "d3po", "--d3po.source", "reward"]],
                         ids=["ddpo", "d3po"])
def test_two_processes_train_what_one_does(models_dir: Path, tmp_path: Path, algo_args: list[str]) -> None:
    t0 = time.perf_counter()
    one = train(models_dir, tmp_path / "one", 1, 2, algo_args)
    two = train(models_dir, tmp_path / "two", 2, 1, algo_args)
    assert one.keys() == two.keys()
    # LoRA B starts at zero: its values are how far training moved it.
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"{algo_args[1]}: moved {moved:.4g}, max |one - two| {diff:.3g}, {time.perf_counter() - t0:.1f} s")
    assert moved > 1e-3
    # Not bit-equal: one process sums a minibatch's per-item gradients inside its backward pass, two sum
    # their parts' gradients by gloo's all-reduce (another order of float32 additions, relative ~1e-7 per
    # step), and the loss is rescaled by a process's share of an uneven minibatch. The difference grows
    # through 8 optimizer steps (and epoch 2 samples with slightly different weights): measured 3.1e-5
    # for DDPO against 0.069 moved (4.5e-4 of it), 0 for D3PO. A wrong split (other minibatches, lost
    # pairs, an unaveraged gradient) differs by the order of the movement itself (0.30 against 0.23
    # before D3PO's shuffle was shared): 0.5% of the movement separates the two.
    assert diff < 5e-3 * moved
