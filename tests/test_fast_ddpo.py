"""DDPO's fused update (train.fused_update): the same gradient and optimizer step as re-scoring, one forward less.

Both routes (train.fused_route): per_sample (each trained step backpropagated while sampling, per-sample
LoRA gradients weighted by the advantages afterwards) and graphs (the log-prob graphs held until the update).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

from poseloop.policy import per_sample_grads
from poseloop.config.lib import ConfigError
from poseloop.policy.trainer import PolicyTrainer
from test_policy import Brightness, policy_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # torch.set_num_threads(1) around each test (conftest)

# Relative L2 distance of the two gradients. Both compute the same gradient; they differ in rounding.
# graphs computes the same fp32 graph as re-scoring, differing only in batch shapes (the sampler's chunk vs
# the update's shuffled minibatch, which BLAS may reduce in another order: ~1e-7 relative per op) and in
# the order the per-step losses are summed: measured 1.3e-7. per_sample changes the order more: each
# step is backpropagated with weight 1 per sample and the advantage weights come after the backward (not
# before it), each sample's weight gradient is its own bmm over tokens and the two CFG rows (weighted -4 and
# +5 at CFG 5, nearly cancelling) are added after it: measured 2.9e-6 (unet_lora), 3.5e-6 (controlnet_lora).
# That this is rounding and not a systematic error: with the pipeline in float64 (the step's log-prob math
# stays float32 in sampling.py) per_sample is 8.9e-8 from re-scoring (graphs: 3e-16), asserted below 1e-6.
# 1e-4 leaves margin and is still 1000x below the distance to another epoch's gradient and to the
# mistakes of test_per_sample_route_fails_when_a_cfg_half_or_a_step_set_is_wrong (asserted, so it can fail).
GRAD_TOL = 1e-4
GRAD_TOL_FLOAT64 = 1e-6


def snapshot(trainer: PolicyTrainer) -> dict:
    """The weights, optimizer and stat tracker an epoch starts from (run_epoch restores them)."""
    return {"policy": trainer.policy.state_dict(), "optim": trainer.optimizer.state_dict(),
            "tracker": trainer.tracker.state_dict()}


def run_epoch(trainer: PolicyTrainer, epoch: int, fused: bool, state: dict) -> tuple[dict, dict, int]:
    """One DDPO epoch from `state`: (gradients before the clip and step, weights after, re-scoring calls)."""
    trainer.policy.load_state_dict(state["policy"])
    trainer.optimizer.load_state_dict(state["optim"])
    trainer.tracker.load_state_dict(state["tracker"])
    trainer.cfg.train.fused_update = fused
    grads: dict[str, torch.Tensor] = {}
    calls = {"rescore": 0}
    real_step, real_rescore = trainer._optimizer_step, trainer._rescore

    def step() -> None:
        assert not grads, "the fused epoch must be one optimizer step"
        grads.update({n: p.grad.detach().clone() for n, p in trainer.policy.named_trainable().items()
                      if p.requires_grad and p.grad is not None})
        real_step()

    def rescore(*args: object) -> torch.Tensor:
        calls["rescore"] += 1
        return real_rescore(*args)  # type: ignore[arg-type]

    trainer._optimizer_step, trainer._rescore = step, rescore  # type: ignore[method-assign]
    try:
        row = trainer.algorithm.epoch(epoch)
    finally:
        del trainer._optimizer_step, trainer._rescore  # back to the class's methods
    assert row["clipfrac"] == 0.0 and abs(row["ratio"] - 1.0) < 1e-5  # first step: r = 1, clip inactive
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_trainable().items()}
    return grads, weights, calls["rescore"]


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors."""
    assert a.keys() == b.keys() and a
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def count_per_sample_backwards(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count PerSampleGrads.backward calls (the per_sample route ran, not a fallback)."""
    calls = {"n": 0}
    real = per_sample_grads.PerSampleGrads.backward

    def counted(self: per_sample_grads.PerSampleGrads, *args: object) -> None:
        calls["n"] += 1
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(per_sample_grads.PerSampleGrads, "backward", counted)
    return calls


def to_float64(trainer: PolicyTrainer) -> None:
    """Run the whole pipeline in float64 (the sampler's step math stays float32): most rounding out of a comparison."""
    pipe = trainer.comp.pipe
    for module in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder):
        module.double()  # in place: the optimizer keeps the same (now float64) LoRA parameters
    trainer.comp.dtype = torch.float64


def assert_same_adam_step(w_fast: dict, w_std: dict, g_fast: dict, g_std: dict, cfg: object) -> None:
    """The two first AdamW steps differ by no more than their clipped gradients' difference allows.

    A first Adam step moves w by lr * g / (|g| + eps) (the same decay on both sides), whose slope in g is at
    most 1 / eps: near g = 0 a tiny gradient difference moves the step by up to lr, so a fixed tolerance in
    lr would only hold by luck. Bound per element: lr * |g_fast - g_std| / eps (clipped as the trainer clips),
    1% over for the rounding of the clip factor and Adam's arithmetic, plus 4 ulps of w (the two roundings
    of w + step). The bound is tight where |g| << eps (measured up to 0.9994 of it: a step there is lr g / eps).
    """
    o = cfg.optim  # type: ignore[attr-defined]

    def clipped(g: dict) -> dict:
        norm = sum(float(v.double().pow(2).sum()) for v in g.values()) ** 0.5
        factor = min(1.0, o.max_grad_norm / (norm + 1e-6)) if o.max_grad_norm > 0 else 1.0  # clip_grad_norm_
        return {k: v * factor for k, v in g.items()}

    cf, cs = clipped(g_fast), clipped(g_std)
    for k in w_std:
        ulp = torch.finfo(w_std[k].dtype).eps * w_std[k].abs()
        bound = 1.01 * o.lr * (cf[k] - cs[k]).abs() / o.adam_eps + 4 * ulp
        assert bool(((w_fast[k] - w_std[k]).abs() <= bound).all()), k


@pytest.mark.parametrize("route,kind,dtype,checkpointing", [("per_sample", "unet_lora", torch.float32, False),
                                                            ("per_sample", "controlnet_lora", torch.float32, False),
                                                            ("graphs", "unet_lora", torch.float32, False),
                                                            ("per_sample", "unet_lora", torch.float64, False),
                                                            ("per_sample", "unet_lora", torch.float32, True)])
def test_fused_update_gives_the_standard_gradient_and_step(models_dir: Path, tmp_path: Path, route: str, kind: str,
                                                           dtype: torch.dtype, checkpointing: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # One optimizer step per epoch: 4 samples, minibatches of 2, grad_accum 2 (the exact case); half the
    # steps, drawn per minibatch (the shuffle generator is replayed to pick them before sampling, so the
    # two minibatches' samples train different steps); CFG 5 (the tiny preset: 2B UNet rows); the pose
    # ControlNet at full strength (it carries the LoRA with controlnet_lora); the tiny preset's LoRA on
    # every linear and conv layer; gradient clipping on (it sees the same gradient, so it clips the same).
    # Gradient checkpointing (diffusers': non-reentrant) recomputes blocks in the backward, hooks included.
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, train__timestep_fraction=0.5,
                     sample__controlnet_scale=1.0, optim__max_grad_norm=1e-3, train__fused_update=True,
                     train__fused_route=route, target__kind=kind, target__gradient_checkpointing=checkpointing)
    assert cfg.sample.guidance_scale > 1 and any(m.startswith("conv") for m in cfg.target.lora_modules)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    if dtype == torch.float64:
        to_float64(trainer)
    state = snapshot(trainer)
    plan = trainer.algorithm.fused_plan(0, 4)
    assert plan is not None and len({tuple(row.tolist()) for row in plan}) == 2  # the minibatches' step sets differ
    backwards = count_per_sample_backwards(monkeypatch)
    recomputed = {"n": 0}
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def checkpoint(*args: object, **kw: object) -> object:
        recomputed["n"] += 1
        return real_checkpoint(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    g_fast, w_fast, calls_fast = run_epoch(trainer, 0, True, state)
    assert backwards["n"] == (len(plan.any(0).nonzero()) if route == "per_sample" else 0)  # the route asked for ran
    assert (recomputed["n"] > 0) == checkpointing  # the sampler's gradient steps ran checkpointed blocks
    g_std, w_std, calls_std = run_epoch(trainer, 0, False, state)
    assert calls_fast == 0 and calls_std > 0  # the fused path never re-scores
    assert float(sum(g.abs().sum() for g in g_std.values())) > 0
    assert rel(g_fast, g_std) < (GRAD_TOL if dtype == torch.float32 else GRAD_TOL_FLOAT64)
    assert_same_adam_step(w_fast, w_std, g_fast, g_std, cfg)
    # Discrimination: another epoch's samples give a clearly different gradient, far above the tolerance.
    g_other, _, _ = run_epoch(trainer, 1, False, state)
    assert rel(g_other, g_std) > 1000 * GRAD_TOL


def test_per_sample_route_fails_when_a_cfg_half_or_a_step_set_is_wrong(models_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The gradient comparison above is able to see the mistakes this route could make.
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, train__timestep_fraction=0.5,
                     sample__controlnet_scale=1.0, train__fused_update=True)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    state = snapshot(trainer)
    g_std, _, _ = run_epoch(trainer, 0, False, state)
    algo, real_sample = trainer.algorithm, trainer._sample_groups
    # 1. Only the conditional CFG half counted (rows B..2B-1 of [uncond; cond]): sample i's uncond row dropped.
    with monkeypatch.context() as m:
        m.setattr(per_sample_grads, "fold_rows", lambda per_row, b: per_row[-b:])
        g_half, _, _ = run_epoch(trainer, 0, True, state)
    assert rel(g_half, g_std) > 1000 * GRAD_TOL
    # 2. Sampling sums every planned step for every sample (the union), the update trains each minibatch's own
    # steps: record the right plan so that the update's consistency check passes, and the gradient must differ.
    def union_sampling(*args: object, step_mask: torch.Tensor, **kw: object) -> object:
        batch, rewards, images = real_sample(*args, step_mask=step_mask.any(0).expand_as(step_mask), **kw)
        batch.extra["step_mask"] = step_mask
        return batch, rewards, images

    with monkeypatch.context() as m:
        m.setattr(trainer, "_sample_groups", union_sampling)
        g_union, _, _ = run_epoch(trainer, 0, True, state)
    assert rel(g_union, g_std) > 1000 * GRAD_TOL
    # 3. The same mistake in the plan itself is caught by the update, before any optimizer step.
    real_plan = algo.fused_plan
    with monkeypatch.context() as m:
        m.setattr(algo, "fused_plan", lambda e, n: real_plan(e, n).any(0).expand(n, -1).clone())
        with pytest.raises(RuntimeError, match="trained other steps than sampling summed"):
            run_epoch(trainer, 0, True, state)


def test_per_sample_grads_match_one_backward_per_sample() -> None:
    # The hook rules on their own, against the definition (one backward per sample): peft LoRA on a Linear
    # and a 3x3 Conv2d (stride 2, padding 1), rows [uncond; cond] (2B) folded to B samples, a masked sample.
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
            self.proj = torch.nn.Linear(5, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [R, 3, 8, 8] -> [R]
            h = self.conv(x).flatten(2).transpose(1, 2)  # [R, 16 tokens, 5]
            return self.proj(torch.tanh(h)).pow(2).mean(dim=(1, 2))

    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv", "proj"], init_lora_weights=False), Net())
    trainable = {n: p.requires_grad_("lora_" in n) for n, p in net.named_parameters()}
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and per_sample_grads.unsupported(net, trainable) == ""
    b, x = 3, torch.randn(3, 3, 8, 8)
    mask = torch.tensor([True, False, True])

    def log_prob(xs: torch.Tensor) -> torch.Tensor:  # [B]: a CFG-like combination of sample i's two rows
        out = net(torch.cat([xs, xs.flip(1)]))  # [2B]: "uncond" rows first
        return out[b:] * 5 - out[:b] * 4

    collector = per_sample_grads.PerSampleGrads(net, trainable)
    with collector.attached():
        collector.backward(log_prob(x), mask)
    got = collector.take(b)
    for i in range(b):
        want = torch.autograd.grad(log_prob(x)[i] * float(mask[i]), list(trainable.values()), allow_unused=True)
        for (name, _), w in zip(trainable.items(), want):
            expected = torch.zeros_like(got[name][i]) if w is None else w
            torch.testing.assert_close(got[name][i], expected, rtol=1e-5, atol=1e-6)
    assert float(got["proj.lora_B.default.weight"][0].abs().sum()) > 0  # not trivially zero
    # Hooks are removed after the block: a later forward records nothing.
    log_prob(x).sum().backward()
    assert not collector.sums


def test_per_sample_route_falls_back_to_graphs_for_the_full_controlnet(models_dir: Path, tmp_path: Path) -> None:
    # target controlnet trains every ControlNet weight (not LoRA layers): per-sample gradients would be N copies
    # of the ControlNet, so the route warns once and holds the graphs; the epoch is still the exact fused one.
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, sample__controlnet_scale=1.0,
                     train__fused_update=True, target__kind="controlnet")
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    algo = trainer.algorithm
    assert "not LoRA Linear/Conv2d weights" in per_sample_grads.unsupported(trainer.policy.module,
                                                                             trainer.policy.named_trainable())
    with pytest.warns(UserWarning, match="train.fused_route graphs"):
        assert algo.fused_route() == "graphs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per trainer
        assert algo.fused_route() == "graphs"
    seen: dict[str, object] = {}
    real = trainer._sample_groups

    def spy(*args: object, **kw: object) -> object:
        seen.update(kw)
        return real(*args, **kw)  # type: ignore[arg-type]

    trainer._sample_groups = spy  # type: ignore[method-assign]
    state = snapshot(trainer)
    g_fast, _, calls = run_epoch(trainer, 0, True, state)
    assert "step_mask" not in seen and seen["grad_steps"] and calls == 0  # graphs route, no re-scoring
    g_std, _, _ = run_epoch(trainer, 0, False, state)
    assert rel(g_fast, g_std) < GRAD_TOL
    # Asked for explicitly, the graphs route runs without a warning; per_sample stays the default.
    trainer.cfg.train.fused_route = "graphs"
    assert algo.fused_route() == "graphs"
    assert type(cfg.train)().fused_route == "per_sample"
    trainer.cfg.train.fused_route = "per-sample"
    with pytest.raises(ConfigError, match="train.fused_route: 'per-sample' is not one of"):
        trainer.cfg.validate()


def test_fused_update_only_where_exact(models_dir: Path, tmp_path: Path) -> None:
    # Two optimizer steps an epoch (grad_accum 1) or two inner epochs: the later passes run under updated
    # weights, so re-scoring is required; and the flag (off by default: memory) turns the fused path off.
    trainer = PolicyTrainer(policy_cfg(models_dir, tmp_path, train__fused_update=True), reward=Brightness(),
                            progress=False)
    algo = trainer.algorithm
    assert algo.fused_steps(0, 4) is None  # 2 minibatches, grad_accum 1
    trainer.cfg.train.grad_accum = 2
    assert algo.fused_steps(0, 4) is not None
    trainer.cfg.train.inner_epochs = 2
    assert algo.fused_steps(0, 4) is None
    trainer.cfg.train.inner_epochs, trainer.cfg.train.fused_update = 1, False
    assert algo.fused_steps(0, 4) is None
    # The steps whose graphs sampling keeps are the ones the update trains: never a deterministic last step.
    from diffusers import DDIMScheduler

    trainer.cfg.train.fused_update, trainer.cfg.train.timestep_fraction = True, 1.0
    trainer.comp.pipe.scheduler = DDIMScheduler.from_config(trainer.comp.scheduler.config, set_alpha_to_one=True)
    assert algo.fused_steps(0, 4) == [0, 1, 2]  # 4 steps, all drawn (timestep_fraction 1), the last has no density
