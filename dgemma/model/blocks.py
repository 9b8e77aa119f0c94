"""The small pieces every layer is built from: activations, the RMS norm, linear layers fused into one matmul, and
the gated MLP, each with the lean CPU kernels the fast path uses.

Reference mode (`dgemma.engine.reference`) replaces the kernel choices of these modules from outside
(`RMSNorm.lean`, `MLP.forward`) with transformers' own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACT = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


# sqrt(2/pi) and its product with the cubic coefficient of the tanh-GELU, each doubled (see `gated_activation`)
_GELU_K = (2 * (2 / math.pi) ** 0.5, 2 * 0.044715 * (2 / math.pi) ** 0.5)


def gated_activation(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up. In float32 on the CPU the tanh-GELU is written gate * sigmoid(2z) (the same function: tanh(z) =
    2 sigmoid(2z) - 1, with z its inner polynomial) in five vectorised kernels, 2x faster than torch's tanh-GELU
    kernel there (within an ulp or so). Training calls the activation itself."""
    training = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if act != "gelu_pytorch_tanh" or gate.device.type != "cpu" or gate.dtype != torch.float32 or training:
        return ACT[act](gate) * up
    z2 = torch.addcmul(scalar(_GELU_K[0], gate), gate, gate, value=_GELU_K[1]).mul_(gate)  # 2z
    return z2.sigmoid_().mul_(gate).mul_(up)


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor constant, made once: a Python number as an operand is copied into a fresh tensor on every call
    (a few microseconds each on the CPU, two per torch RMS norm)."""
    return _scalar(value, like.dtype, like.device)


def rms_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) float32 -> x / sqrt(mean(x^2) + eps) in four kernels (the sum of squares as a vector norm), where
    torch's CPU rms_norm runs seven and two scalar copies (within an ulp or so of it)."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
    return x * torch.addcmul(scalar(eps, n), n, n, value=1.0 / x.shape[-1]).rsqrt_()


class RMSNorm(nn.Module):
    """Gemma RMSNorm computed in float32: x * (mean(x^2) + eps)^-1/2 * weight (no weight when `scale=False`)."""

    def __init__(self, dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            if self.lean(x):
                unit = rms_unit(x, self.eps)
                return unit if self.weight is None else unit.mul_(self.weight)
            # One call instead of three (weight applied after normalising: the same arithmetic, bit for bit)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.scale_unit(self.unit(x), x.dtype)

    def lean(self, x: torch.Tensor) -> bool:
        """Whether `rms_unit` computes the norm of x: on the CPU outside training (CUDA has a fused rms_norm kernel),
        else torch's rms_norm."""
        return x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in float32, before the weight: norms of one input with different weights can share it.
        Bit-identical to the reference's float32 pow(-0.5) formula (tested against transformers)."""
        if self.lean(x):
            return rms_unit(x.float(), self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)

    def scale_unit(self, unit: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The norm's output from `unit(x)`: the weight (default its own; one broadcasting to `unit`) applied last,
        as the reference does, then cast."""
        weight = self.weight if weight is None else weight
        return (unit if weight is None else unit * weight.float()).to(dtype)


def cached(owner: nn.Module, name: str, parts: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor]):
    """`build()` (a tensor derived from the tensors `parts`), made once and kept on `owner` while no part changes:
    in-place updates bump a tensor's `_version`, casts and moves give it new storage. The kept detached parts pin
    the old storages, so a new tensor can never reuse an old address. Built afresh in training, with or without
    gradients (trainable weights of a module in training mode: FSDP gathers them into the same tensors every time
    without bumping their version, so the check could take changed weights for the old ones), and under
    `torch.compile` (which cannot trace the check; it folds or fuses the build instead)."""
    trainable = any(p.requires_grad for p in parts)
    if torch.compiler.is_compiling() or (trainable and (torch.is_grad_enabled() or owner.training)):
        return build()
    key = tuple((p.data_ptr(), p._version) for p in parts)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = owner.__dict__[name] = (key, build(), tuple(p.detach() for p in parts))
    return hit[1]


# Fuse linear layers that read the same input into one matmul while their weights are this small: there the
# per-call overhead dominates (the laptop-sized `--preset small`, 0.5-1 MiB: 39 matmuls per decoder pass instead of
# 57; the wall-time gain was within the test VM's noise, docs/benchmarks.md). Above it the matmuls dominate and one
# larger matmul is no faster (the 75M preset's 3-7 MB: 2-5 % slower with AVX2 kernels), and the concatenated copy
# would cost memory.
FUSE_MAX_BYTES = 2 << 20


def fusable(mods: tuple[nn.Module, ...]) -> bool:
    """Whether the linear layers `mods` may run from fused copies of their weights: not in training
    (differentiable), and only plain `nn.Linear`s without hooks (FP8 layers have their own class; LoRA adds its
    adapters through forward hooks, which a fused matmul would skip)."""
    return not (
        any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in mods)
        or (torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods))
    )


def fused_linear(owner: nn.Module, x: torch.Tensor, mods: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """x (..., in) through linear layers `mods` of the same input as one matmul over their concatenated weights (kept
    on `owner`): the outputs side by side (..., sum of outs). None where that does not apply, and the caller runs the
    layers one by one: training, wrapped layers (LoRA, FP8) and large weights."""
    ws = tuple(m.weight for m in mods)
    if not fusable(mods) or sum(w.numel() * w.element_size() for w in ws) > FUSE_MAX_BYTES:
        return None
    w = cached(owner, "_fused_weight", ws, lambda: torch.cat(ws))
    bs = tuple(m.bias for m in mods if m.bias is not None)
    b = cached(owner, "_fused_bias", bs, lambda: torch.cat(bs)) if bs else None
    return F.linear(x, w, b)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_name, self.act = act, ACT[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_linear(self, x, (self.gate_proj, self.up_proj))
        # (separate outputs are contiguous: the activation's vectorised and scalar loops round differently)
        gate, up = gate_up.chunk(2, dim=-1) if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(gated_activation(self.act_name, gate, up))
