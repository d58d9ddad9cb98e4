"""Per-sample gradients of a peft LoRA adapter, by hooks on its lora_A / lora_B layers (opacus' rules).

DDPO's fused update (poseloop/policy/algos/ddpo.py, train.fused_route per_sample) backpropagates each trained
step's log-probs while sampling, before the advantages are known, so it cannot sum the gradient
itself: it keeps every sample's own gradient of the adapter weights ([B, *weight shape] per weight) and
weights them by the advantages afterwards. The graph of a step is freed as soon as it is backpropagated.

Rules (as opacus computes grad_sample): for a Linear y = x W^T + b with x [R, ..., in] and the output's
gradient g [R, ..., out], the weight gradient sum_r g[r]^T x[r] keeps its row index: [R, out, in], the
bias gradient g summed over tokens: [R, out]. A Conv2d is that Linear on unfolded patches: F.unfold(x)
[R, in * kh * kw, L] against g [R, out, L]. The rows are then folded to samples: with classifier-free
guidance poseloop.sampling.sampler.predict_noise runs the UNet (and the ControlNet) on [uncond; cond], 2B rows
for B samples, so rows i and B + i are both sample i.

Applies when every trainable weight is a lora_A / lora_B weight (or bias) of a plain nn.Linear or a
zero-padded, ungrouped nn.Conv2d and no LoRA variant (DoRA, ...) is active; `unsupported` says why not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _lora_layers(module: nn.Module) -> tuple[dict[str, nn.Module], str]:
    """{qualified name: lora_A / lora_B layer} of every peft LoRA layer in `module`, and why not ('' = fine)."""
    from peft.tuners.lora import LoraLayer

    layers: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if m.lora_variant:
            return {}, f"{name} has a LoRA variant ({', '.join(type(v).__name__ for v in m.lora_variant.values())})"
        for kind in ("lora_A", "lora_B"):
            for adapter, sub in getattr(m, kind).items():
                key = f"{name}.{kind}.{adapter}"
                # Exact types: a subclass may compute something the rule does not model.
                if type(sub) is nn.Conv2d:
                    if sub.groups != 1 or sub.padding_mode != "zeros" or isinstance(sub.padding, str):
                        return {}, f"{key} is a grouped, non-zero-padded or string-padded Conv2d"
                elif type(sub) is not nn.Linear:
                    return {}, f"{key} is a {type(sub).__name__}, not an nn.Linear or nn.Conv2d"
                layers[key] = sub
    return layers, ""


def unsupported(module: nn.Module, trainable: dict[str, nn.Parameter]) -> str:
    """Why per-sample gradients cannot cover `trainable` (names as module.named_parameters()); '' when they can."""
    layers, why = _lora_layers(module)
    if why:
        return why
    covered = {f"{key}.{p}" for key, sub in layers.items() for p, _ in sub.named_parameters()}
    rest = sorted(set(trainable) - covered)
    if rest:
        return (f"{len(rest)} trainable weight(s) are not LoRA Linear/Conv2d weights (e.g. {rest[0]}); "
                "per-sample gradients cover those only")
    return ""


def fold_rows(per_row: torch.Tensor, b: int) -> torch.Tensor:
    """Per-row values [R, ...] (R = B, or 2B with CFG) -> per-sample [B, ...]: rows i and B + i are sample i."""
    # predict_noise stacks [uncond; cond]: [R, ...] -> [R // B, B, ...], summed over the first axis.
    return per_row.reshape(per_row.shape[0] // b, b, *per_row.shape[1:]).sum(0)


class PerSampleGrads:
    """Sums of per-sample gradients [B, *shape] of the trainable LoRA weights of `module` over backward() calls."""

    def __init__(self, module: nn.Module, trainable: dict[str, nn.Parameter], loss_scale: float = 1.0) -> None:
        """Find the LoRA layers; raise ValueError (with unsupported()'s reason) when they do not cover `trainable`.

        loss_scale: backpropagate log-probs x this and divide it out of the sums (an fp16 GradScaler's scale:
        the same protection against underflow in the fp16 backward that the scaled training loss has).
        """
        why = unsupported(module, trainable)
        if why:
            raise ValueError(f"per-sample gradients do not apply: {why}")
        layers, _ = _lora_layers(module)
        self.params = {n: p for n, p in trainable.items()}
        self.loss_scale = loss_scale
        # Only layers whose weights train (an inactive adapter's layers never run).
        self.layers = {k: m for k, m in layers.items() if any(p.requires_grad for p in m.parameters())}
        self.sums: dict[str, torch.Tensor] = {}  # name -> [B, *shape], the weight's dtype (float32: Policy)
        self.samples = 0  # B of the current backward()
        self.fired: set[str] = set()  # weights a hook gave a gradient in the current backward()

    @contextmanager
    def attached(self) -> Iterator[PerSampleGrads]:
        """Within this block every forward with gradients of the LoRA layers records what their hooks need."""
        handles = [m.register_forward_hook(self._forward_hook(key)) for key, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _forward_hook(self, key: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        """The forward hook of layer `key`: hooks its output's gradient to _add (with the layer's input)."""
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return  # a no-grad sampling step (or reentrant checkpointing's no-grad first pass)
            # Kept until the output's gradient arrives (the layer saves x for its weight gradient anyway), then
            # dropped: the graph's nodes may outlive the backward (a caller holding the output) and so the hook.
            kept = [inputs[0].detach()]
            output.register_hook(lambda g: self._add(key, mod, kept.pop(), g))
        return hook

    def _add(self, key: str, mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one call's per-row gradients, folded to samples, to the sums."""
        rows, b = g.shape[0], self.samples
        if rows not in (b, 2 * b):
            raise RuntimeError(f"{key} ran on {rows} rows for {b} samples: per-sample gradients need the batch "
                               "(B rows, or 2B with CFG) as the first dimension; set train.fused_route graphs")
        # At least float32 (autocast runs the layer in fp16 / bf16), as the weights' own gradient accumulates.
        dtype = torch.promote_types(mod.weight.dtype, torch.float32)
        g, x = g.to(dtype), x.to(dtype)
        if isinstance(mod, nn.Conv2d):
            cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # [R, in*kh*kw, L]
            g2 = g.reshape(rows, g.shape[1], -1)  # [R, out, L]
            weight = torch.bmm(g2, cols.transpose(1, 2))  # [R, out, in*kh*kw]
            bias = g2.sum(2)  # [R, out]
        else:
            g2 = g.reshape(rows, -1, g.shape[-1])  # [R, tokens, out]
            weight = torch.bmm(g2.transpose(1, 2), x.reshape(rows, -1, x.shape[-1]))  # [R, out, in]
            bias = g2.sum(1)  # [R, out]
        for pname, value in (("weight", weight), ("bias", bias)):
            name = f"{key}.{pname}"
            p = getattr(mod, pname)
            if name not in self.params or p is None or not p.requires_grad:
                continue
            self.sums[name] += fold_rows(value.reshape(rows, *p.shape), b) / self.loss_scale
            self.fired.add(name)

    def backward(self, log_prob: torch.Tensor, mask: torch.Tensor) -> None:
        """Add grad log_prob[i] of every sample i with mask[i] (log_prob [B] with its graph; mask [B] bool); frees the graph."""
        b = log_prob.shape[0]
        if not self.sums:
            self.sums = self._zeros(b)
            self.samples = b
        if b != self.samples:
            raise ValueError(f"backward() got {b} samples after {self.samples}; take() the sums between batches")
        # Each sample's log-prob depends on its own rows only, so the masked-out samples' rows get exactly 0.
        with torch.enable_grad():  # called from inside sample()'s no_grad
            loss = (log_prob * mask.to(log_prob.device, log_prob.dtype)).sum() * self.loss_scale
        self.fired.clear()
        names = list(self.params)
        # autograd.grad, not backward(): the parameters' .grad (the update's) stays untouched.
        grads = torch.autograd.grad(loss, [self.params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            # A weight that got a gradient with no hook firing was reached some other way: the sums would miss it.
            if g is not None and n not in self.fired and bool(g.any()):
                raise RuntimeError(f"{n} got a gradient that its per-sample hook did not see; set train.fused_route graphs")

    def backward_step(self, mask: torch.Tensor) -> Callable[[int, torch.Tensor], None]:
        """sample()'s on_graph for a batch whose sample i trains step j where mask[i, j] ([B, T] bool)."""
        return lambda j, log_prob: self.backward(log_prob, mask[:, j])

    def _zeros(self, b: int) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(b, *p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                for n, p in self.params.items()}

    def take(self, b: int) -> dict[str, torch.Tensor]:
        """The sums {name: [b, *shape]} of the current batch of b samples (zeros without backward()), and reset."""
        if self.sums and self.samples != b:
            raise ValueError(f"take({b}) after backward() of {self.samples} samples")
        out = self.sums or self._zeros(b)
        self.sums, self.samples = {}, 0
        return out
