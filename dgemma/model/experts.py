"""The mixture of experts: the router (top-k experts per token) and the packed experts, with the kernels that run
them (one grouped matmul per projection, a loop over experts, or every expert on every token) and the choice
between them (`expert_kernel`).

Reference mode (`dgemma.engine.reference`) replaces `Experts.kernel` from outside with transformers' choice
(`grouped_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.blocks import ACT, RMSNorm, gated_activation
from dgemma.model.config import TextConfig


class Router(nn.Module):
    def __init__(self, text: TextConfig):
        super().__init__()
        self.top_k = text.top_k_experts
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps, scale=False)
        self.proj = nn.Linear(text.hidden_size, text.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(text.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(text.num_experts))
        self.root = text.hidden_size**-0.5

    def forward(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normed = self.norm(x) (N, hidden) -> top-k weights (N, K) float32 (renormalised, per-expert scaled),
        indices (N, K)."""
        return self.select(self.proj(normed * self.scale * self.root))

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores (N, E) -> the top-k weights and indices of `forward`."""
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Packed expert weights: gate_up_proj (E, 2I, hidden), down_proj (E, hidden, I)."""

    def __init__(self, text: TextConfig):
        super().__init__()
        e, h, i = text.num_experts, text.hidden_size, text.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act_name, self.act = text.hidden_activation, ACT[text.hidden_activation]

    def kernel(self, tokens: int, top_k: int) -> str:
        """The kernel that runs `tokens` rows routed to `top_k` experts each (`expert_kernel`)."""
        return expert_kernel(self.gate_up_proj, tokens=tokens, top_k=top_k)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden); weights/idx (N, K) -> (N, hidden).

        Assignments are sorted by expert and run as one grouped matmul per projection (`kernel` picks the kernel);
        the K contributions of a token are summed in slot order, the reference's arithmetic.
        """
        kernel = self.kernel(x.shape[0], idx.shape[1])
        if kernel == "dense":
            return dense_mixture(x, weights, idx, self.gate_up_proj, self.down_proj, self.act_name)
        mm = EXPERT_KERNELS[kernel]
        return mixture(
            x,
            weights,
            idx,
            self.gate_up_proj.shape[0],
            self.act,
            lambda h, offs: mm(h, self.gate_up_proj.transpose(-2, -1), offs),
            lambda h, offs: mm(h, self.down_proj.transpose(-2, -1), offs),
        )


GroupedMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows grouped by expert, offs) -> rows


def mixture(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    n_experts: int,
    act: Callable,
    gate_up: GroupedMatmul,
    down: GroupedMatmul,
) -> torch.Tensor:
    """The expert branch given its two grouped matmuls: x (N, hidden), weights/idx (N, K) -> (N, hidden)."""
    K = idx.shape[1]
    order, offs, inv = expert_plan(idx, n_experts)
    gate, up = gate_up(x[order // K], offs).chunk(2, dim=-1)  # (N*K, I) each
    y = down(act(gate) * up, offs) * weights.reshape(-1)[order][:, None]  # (N*K, hidden)
    return y[inv].view(idx.shape[0], K, -1).sum(dim=1).to(x.dtype)


def dense_mixture(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act: str
) -> torch.Tensor:
    """The expert branch with every expert run on every token and weighted by the routing (zero where a token is
    not routed): E/K times the arithmetic of `mixture` but three large matmuls instead of a sort, gathers and 2E
    small ones. x (N, hidden), weights/idx (N, K), gate_up (E, 2I, hidden), down (E, hidden, I) -> (N, hidden)."""
    (N, h), (E, two_i, _) = x.shape, gate_up.shape
    a = (x @ gate_up.reshape(E * two_i, h).t()).view(N, E, 2, two_i // 2)  # (N, E, 2, I)
    mid = gated_activation(act, a[:, :, 0], a[:, :, 1])  # (N, E, I)
    y = torch.bmm(mid.transpose(0, 1), down.transpose(1, 2))  # (E, N, hidden)
    # (N, E); added, not written: an expert shard (dgemma/parallel) may list one expert twice, once with weight zero
    route = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_add_(1, idx, weights)
    return torch.einsum("ne,enh->nh", route.to(y.dtype), y).to(x.dtype)


def expert_plan(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k assignments idx (N, K) -> `order` (N*K,) sorting them by expert, group ends `offs` (E,) int32, and the
    inverse permutation `inv`. Counts come from a scatter, not `bincount`: no shape depends on the data."""
    experts, order = torch.sort(idx.reshape(-1))
    counts = torch.zeros(n_experts, dtype=torch.int32, device=idx.device).scatter_add_(
        0, experts, torch.ones_like(experts, dtype=torch.int32)
    )
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return order, torch.cumsum(counts, 0, dtype=torch.int32), inv


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x (S, in) grouped by `offs` (E,) cumulative counts, group e times w[e] (in, out) -> (S, out), with
    torch's grouped matmul: one launch, no host synchronisation (CUTLASS on Hopper/Blackwell in bf16)."""
    return F.grouped_mm(x.to(w.dtype), w, offs=offs)


def _looped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """As `_grouped`, one matmul per expert that has rows (reads the offsets on the host; differentiable)."""
    bounds = [0] + offs.tolist()
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):  # training: no out= (not differentiable)
        parts = [x[s:e] @ w[i] for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if e > s]
        return torch.cat(parts) if parts else x.new_zeros(0, w.shape[2])
    out = x.new_empty(x.shape[0], w.shape[2])
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
    return out


# The grouped expert matmul kernels, by name (`expert_kernel` picks one of these, or "dense").
EXPERT_KERNELS = {"grouped": _grouped, "looped": _looped}


# Above this much wasted arithmetic (flops of the experts a token is not routed to), `dense` stops paying for the
# host overhead it saves (about 0.2 ms of launches per layer on a 2-core laptop CPU).
DENSE_EXTRA_FLOPS = 64e6


def grouped_kernel(w: torch.Tensor) -> str:
    """The grouped matmul where torch has it and it is the fast choice (bf16 on CUDA, anything on the CPU; it is
    transformers' choice too), else the loop: for training (differentiable) and for float32 on CUDA (grouped_mm
    would loop on the host)."""
    if (torch.is_grad_enabled() and w.requires_grad) or not hasattr(F, "grouped_mm"):
        return "looped"
    return "grouped" if w.device.type == "cpu" or w.dtype == torch.bfloat16 else "looped"


def expert_kernel(w: torch.Tensor, tokens: int = 1, top_k: int = 1) -> str:
    """Which expert kernel runs for `tokens` rows routed to `top_k` of the experts in `w` (E, 2I, hidden): for
    float32 on the CPU outside training, dense (`dense_mixture`) while the extra arithmetic is small (small models:
    overhead-bound), else the loop (as fast as grouped there, and no worse numerically); elsewhere `grouped_kernel`."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and not (torch.is_grad_enabled() and w.requires_grad):
        E, two_i, h = w.shape
        return "dense" if (E - top_k) * tokens * 3 * (two_i // 2) * h * 2 <= DENSE_EXTRA_FLOPS else "looped"
    return grouped_kernel(w)
