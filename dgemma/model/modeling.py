"""The DiffusionGemma text model, top to bottom.

One stack of Gemma 4 layers serves two passes that share every weight:

- `encode(tokens, cache)`: causal pass over new tokens (a prompt chunk or a committed canvas). It appends their
  keys/values to the `KVCache` and returns hidden states, which the LM head turns into next-token logits, so the
  encoder doubles as an ordinary causal LM (the AR baseline and the encoder loss use that).
- `denoise(canvas, cache, self_cond)`: bidirectional pass over a canvas that reads the cache without writing it.
  The canvas embeddings are self-conditioned on the previous step's logits. Returns canvas logits.

Parameter names follow the HF checkpoint (`layers.3.self_attn.q_proj.weight` is
`model.decoder.layers.3.self_attn.q_proj.weight` there); `checkpoint.py` holds the one mapping table.
The model knows nothing of requests, text or sampling.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.config import ModelConfig, TextConfig

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
    kernel there (within an ulp or so). Training and reference mode call the activation itself."""
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

    exact = False  # reference mode: torch's rms_norm, bit for bit with transformers

    def __init__(self, dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            if self._lean(x):
                unit = rms_unit(x, self.eps)
                return unit if self.weight is None else unit.mul_(self.weight)
            # One call instead of three (weight applied after normalising: the same arithmetic, bit for bit)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.scale_unit(self.unit(x), x.dtype)

    def _lean(self, x: torch.Tensor) -> bool:
        """`rms_unit` on the CPU outside training and reference mode (CUDA has a fused rms_norm kernel)."""
        return x.device.type == "cpu" and not self.exact and not (torch.is_grad_enabled() and x.requires_grad)

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) in float32, before the weight: norms of one input with different weights can share it.
        Bit-identical to the reference's float32 pow(-0.5) formula (tested against transformers)."""
        if self._lean(x):
            return rms_unit(x.float(), self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)

    def scale_unit(self, unit: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The norm's output from `unit(x)`: the weight (default its own; one broadcasting to `unit`) applied last,
        as the reference does, then cast."""
        weight = self.weight if weight is None else weight
        return (unit if weight is None else unit * weight.float()).to(dtype)


def rope_inv_freq(text: TextConfig, sliding: bool) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for a layer kind: default RoPE, or proportional partial RoPE."""
    params = text.rope_parameters["sliding_attention" if sliding else "full_attention"]
    head_dim = text.head_dim if sliding else text.global_head_dim
    base, partial = float(params["rope_theta"]), float(params.get("partial_rotary_factor", 1.0))
    if params.get("rope_type", "default") == "proportional":
        # Only the first partial*head_dim/2 frequencies rotate (exponents over the full head_dim); the rest are 0.
        n_rot = int(partial * head_dim // 2)
        inv = 1.0 / (base ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - n_rot)])
        return inv / float(params.get("factor", 1.0))
    dim = int(head_dim * partial)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos and the signed sine (B, T, 1, D) from `rope_table`. Rotate-half convention:
    cat(-x2, x1) * sin == roll(x, D/2) * cat(-sin1, sin2) exactly (a sign flip is exact), in two fewer kernels."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def rope_table(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """positions (...,) -> cos and signed sin (..., D) in `dtype` (angles in float32, as the reference computes)."""
    f = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((f, f), dim=-1)
    half = f.shape[-1]
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(emb.device)
    return emb.cos().to(dtype), (emb.sin() * sign).to(dtype)


def cached(owner: nn.Module, name: str, parts: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor]):
    """`build()` (a tensor derived from the tensors `parts`), made once and kept on `owner` while no part changes:
    in-place updates bump a tensor's `_version`, casts and moves give it new storage. The kept detached parts pin
    the old storages, so a new tensor can never reuse an old address. Built afresh in training (differentiable) and
    under `torch.compile` (which cannot trace the check; it folds or fuses the build instead)."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
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


def fusable(owner: nn.Module, mods: tuple[nn.Module, ...]) -> bool:
    """Whether `owner` may run the linear layers `mods` from fused copies of their weights: not in reference mode,
    not in training (differentiable), and only plain `nn.Linear`s without hooks (FP8 layers have their own class;
    LoRA adds its adapters through forward hooks, which a fused matmul would skip)."""
    return not (
        getattr(owner, "exact", False)
        or any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in mods)
        or (torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods))
    )


def fused_linear(owner: nn.Module, x: torch.Tensor, mods: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """x (..., in) through linear layers `mods` of the same input as one matmul over their concatenated weights (kept
    on `owner`): the outputs side by side (..., sum of outs). None where that does not apply, and the caller runs the
    layers one by one: training, reference mode (transformers' separate matmuls, bit for bit), wrapped layers (LoRA,
    FP8) and large weights."""
    ws = tuple(m.weight for m in mods)
    if not fusable(owner, mods) or sum(w.numel() * w.element_size() for w in ws) > FUSE_MAX_BYTES:
        return None
    w = cached(owner, "_fused_weight", ws, lambda: torch.cat(ws))
    bs = tuple(m.bias for m in mods if m.bias is not None)
    b = cached(owner, "_fused_bias", bs, lambda: torch.cat(bs)) if bs else None
    return F.linear(x, w, b)


class Attention(nn.Module):
    def __init__(self, text: TextConfig, layer: int):
        super().__init__()
        self.sliding = text.is_sliding(layer)
        self.head_dim = text.layer_head_dim(layer)
        self.n_heads, self.n_kv = text.num_attention_heads, text.layer_kv_heads(layer)
        h, b = text.hidden_size, text.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        # Full layers have no v_proj: values are the (unrotated, v-normed) keys ("k_eq_v").
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b) if self.sliding else None
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)
        self.q_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, text.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, text.rms_norm_eps, scale=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, hidden) -> q (B, H, T, D), k and v (B, Hkv, T, D).

        One matmul for all projections, one RMS over every head (q, k and, on sliding layers, v: the rows are
        independent, so this is the per-head norms' arithmetic) and one rotation over the q and k heads."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        heads = (H + 2 * Hkv) if self.v_proj is not None else H + Hkv  # full layers: values are the raw keys
        qkv = fused_linear(self, x, self.projections)
        if qkv is None:
            qkv = torch.cat([m(x) for m in self.projections], dim=-1)
        unit = self.q_norm.unit(qkv.view(B, T, heads, self.head_dim))
        v = unit[:, :, H + Hkv :] if self.v_proj is not None else unit[:, :, H:]  # v_norm has no weight
        qk = self.q_norm.scale_unit(unit[:, :, : H + Hkv], x.dtype, weight=self._qk_norm_weight())
        qk = apply_rope(qk, cos, sin)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.to(x.dtype).transpose(1, 2)

    def _qk_norm_weight(self) -> torch.Tensor:
        """The q and k norms' weights side by side, per head: (H + Hkv, D)."""
        wq, wk = self.q_norm.weight, self.k_norm.weight
        return cached(
            self, "_qk_norm", (wq, wk), lambda: torch.cat([wq.expand(self.n_heads, -1), wk.expand(self.n_kv, -1)])
        )

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        return (self.q_proj, self.k_proj) + ((self.v_proj,) if self.v_proj is not None else ())

    # Reference mode (`DiffusionGemma.reference_kernels`) keeps transformers' kernel choices, bit for bit.
    exact = False

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None
    ) -> torch.Tensor:
        """Scaled dot-product attention with scaling 1.0 (q/k are RMS-normed); returns (B, T, hidden).

        `mask`: a boolean (B, 1, T|1, K) mask, "causal", or None (all visible).
        """
        B, H, T, D = q.shape
        rep = H // self.n_kv
        if rep > 1 and not self.exact and (mask is None or (not isinstance(mask, str) and mask.shape[2] == 1)):
            # No causal order and a key-only mask: the heads of a KV group see the same keys, so they fold into the
            # query length (exact) and a fused kernel runs without copying K/V per head, at any head_dim.
            o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, rep * T, D), k, v, attn_mask=mask, scale=1.0)
        elif mask is None or isinstance(mask, str):
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask == "causal" and T > 1, scale=1.0, enable_gqa=rep > 1
            )
        else:
            if rep > 1:  # the reference's layout: K/V repeated per query head
                k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, H, k.shape[2], D)
                v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, H, v.shape[2], D)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o_proj(o.view(B, H, T, D).transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_name, self.act = act, ACT[act]

    exact = False  # reference mode: separate gate and up matmuls, as transformers runs them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_linear(self, x, (self.gate_proj, self.up_proj))
        # (separate outputs are contiguous: the activation's vectorised and scalar loops round differently)
        gate, up = gate_up.chunk(2, dim=-1) if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act(gate) * up if self.exact else gated_activation(self.act_name, gate, up))


class SelfConditioning(MLP):
    """Gated MLP over the previous step's soft embeddings, with a scaled pre-norm and an unscaled post-norm."""

    def __init__(self, text: TextConfig):
        super().__init__(text.hidden_size, text.intermediate_size, text.hidden_activation)
        self.pre_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.post_norm = RMSNorm(text.hidden_size, text.rms_norm_eps, scale=False)


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

    exact = False  # reference mode: the grouped kernel transformers uses, whatever the device and dtype

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, hidden); weights/idx (N, K) -> (N, hidden).

        Assignments are sorted by expert and run as one grouped matmul per projection (`expert_kernel` picks the
        kernel); the K contributions of a token are summed in slot order, the reference's arithmetic.
        """
        kernel = expert_kernel(self.gate_up_proj, self.exact, tokens=x.shape[0], top_k=idx.shape[1])
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
    route = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_(1, idx, weights)  # (N, E)
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


def expert_kernel(w: torch.Tensor, exact: bool = False, tokens: int = 1, top_k: int = 1) -> str:
    """Which expert kernel runs for `tokens` rows routed to `top_k` of the experts in `w` (E, 2I, hidden):
    grouped where torch has it and it is the fast (or the reference's) choice: bf16 on CUDA, anything on CPU in
    reference mode or bf16; the loop for training (differentiable) and for float32 on CUDA (grouped_mm would loop
    on the host); for float32 on CPU, dense (`dense_mixture`) while the extra arithmetic is small (small models:
    overhead-bound), else the loop (as fast as grouped there, and no worse numerically)."""
    if torch.is_grad_enabled() and w.requires_grad:
        return "looped"
    if w.device.type == "cpu" and w.dtype == torch.float32 and not exact:
        E, two_i, h = w.shape
        return "dense" if (E - top_k) * tokens * 3 * (two_i // 2) * h * 2 <= DENSE_EXTRA_FLOPS else "looped"
    if not hasattr(F, "grouped_mm"):
        return "looped"
    return "grouped" if w.device.type == "cpu" or w.dtype == torch.bfloat16 else "looped"


# (new keys, new values) of one layer -> the keys/values it attends to
Context = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _in_place(cache: KVCache, view: CanvasView, rows: torch.Tensor | None, i: int) -> Context:
    """Layer i's context for a pass whose keys/values go into their future slots (`view.slots`), attended in place
    over the buffer's first `view.span` entries."""

    def read(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache.write_layer(i, view.slots, k, v, rows)
        return cache.kv(i, rows, span=view.span[cache.layers[i].sliding])

    return read


class Layer(nn.Module):
    """A Gemma 4 layer: attention, then a dense GeGLU MLP and an MoE branch in parallel, a per-layer scalar."""

    def __init__(self, text: TextConfig, layer: int):
        super().__init__()
        h, eps = text.hidden_size, text.rms_norm_eps
        self.self_attn = Attention(text, layer)
        self.mlp = MLP(h, text.intermediate_size, text.hidden_activation)
        self.router = Router(text)
        self.experts = Experts(text)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        # The checkpoint stores the scalar separately for the decoder and the encoder (buffers are not tied).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: Context,
        mask: torch.Tensor | str | None,
        encoder: bool,
    ) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, hidden). `context(k, v)` returns the keys/values to attend to (the cache's
        and the new ones); the encoder and the decoder differ only in it, the mask and the layer scalar."""
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), *rope)
        k, v = context(k, v)
        x = x + self.post_attention_layernorm(attn.attend(q, k, v, mask))
        return self.feed_forward(x) * (self.encoder_layer_scalar if encoder else self.layer_scalar)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x is the post-attention residual (B, T, hidden); returns the residual after the FFN block."""
        # Three norms read the residual (the dense MLP's, the router's, the experts'): one RMS serves them all.
        unit = self.pre_feedforward_layernorm.unit(x)
        flat = unit.reshape(-1, x.shape[-1])
        both = self._fused_branches(flat)
        if both is None:
            pre = self.pre_feedforward_layernorm
            dense = self.post_feedforward_layernorm_1(self.mlp(pre.scale_unit(unit, x.dtype)))
            w, idx = self.router(self.router.norm.scale_unit(flat, x.dtype))
            moe = self.experts(self.pre_feedforward_layernorm_2.scale_unit(flat, x.dtype), w, idx).reshape(x.shape)
            both = dense + self.post_feedforward_layernorm_2(moe)
        return x + self.post_feedforward_layernorm(both.view(x.shape))

    def _fused_branches(self, flat: torch.Tensor) -> torch.Tensor | None:
        """Both FFN branches from the shared RMS `flat` (N, hidden), each post-normed, summed: (N, hidden). For small
        float32 models on the CPU (where `dense_mixture` runs): the pre-norm weights and the router's scale are folded
        into one matmul over the dense MLP's, every expert's and the router's input weights, the routing weights
        scale the expert activations, and two matmuls project down, one per branch: 3 matmuls and one post-norm over
        both branches instead of 7 matmuls, 4 norms and the dense mixture's gathers. None where that does not apply.
        """
        mlp, ex, r = self.mlp, self.experts, self.router
        E, two_i, h = ex.gate_up_proj.shape
        kernel = expert_kernel(ex.gate_up_proj, ex.exact, tokens=flat.shape[0], top_k=r.top_k)
        if (
            kernel != "dense"
            or torch.is_autocast_enabled(flat.device.type)  # (matmuls would not return float32)
            or type(ex) is not Experts
            or not fusable(mlp, (mlp.gate_proj, mlp.up_proj, mlp.down_proj, r.proj))
            or 2 * ex.gate_up_proj.numel() * ex.gate_up_proj.element_size() > FUSE_MAX_BYTES
        ):
            return None
        inter, n_dense = two_i // 2, mlp.gate_proj.out_features
        G = n_dense + E * inter  # gate (and up) width: the dense MLP's, then expert after expert
        w_in = cached(self, "_ffn_in", self._ffn_in_parts(), self._ffn_in_weight)  # (2G + E, hidden)
        w_down = cached(self, "_ffn_down", (ex.down_proj,), lambda: ex.down_proj.transpose(1, 2).reshape(E * inter, h))
        a = F.linear(flat, w_in)  # (N, 2G + E): gates, ups, router scores
        w, idx = r.select(a[:, 2 * G :])
        route = torch.zeros(flat.shape[0], E, dtype=w.dtype, device=w.device).scatter_(1, idx, w)  # (N, E)
        mid = gated_activation(mlp.act_name, a[:, :G], a[:, G : 2 * G])  # (N, G)
        mid[:, n_dense:].view(-1, E, inter).mul_(route[:, :, None])
        out = flat.new_empty(2, flat.shape[0], h)  # (branch, N, hidden)
        torch.mm(mid[:, :n_dense], mlp.down_proj.weight.t(), out=out[0])
        torch.mm(mid[:, n_dense:], w_down, out=out[1])
        post = (self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight)
        scale = cached(self, "_ffn_post", post, lambda: torch.stack(post)[:, None])  # (2, 1, hidden)
        normed = self.post_feedforward_layernorm_1.unit(out) * scale
        return normed[0] + normed[1]

    def _ffn_in_parts(self) -> tuple[torch.Tensor, ...]:
        mlp, r = self.mlp, self.router
        pre = (self.pre_feedforward_layernorm.weight, self.pre_feedforward_layernorm_2.weight)
        return (mlp.gate_proj.weight, mlp.up_proj.weight, self.experts.gate_up_proj, r.proj.weight, r.scale, *pre)

    def _ffn_in_weight(self) -> torch.Tensor:
        """(2G + E, hidden): [dense gate; expert gates; dense up; expert ups; router], each scaled by its pre-norm."""
        gate, up, gate_up, router, r_scale, w_dense, w_moe = self._ffn_in_parts()
        E, two_i, h = gate_up.shape
        g_ex, u_ex = gate_up[:, : two_i // 2].reshape(-1, h), gate_up[:, two_i // 2 :].reshape(-1, h)
        rows = (gate * w_dense, g_ex * w_moe, up * w_dense, u_ex * w_moe, router * (r_scale * self.router.root))
        return torch.cat(rows)


class DiffusionGemma(nn.Module):
    """The DiffusionGemma text model (HF `DiffusionGemmaForBlockDiffusion`, text only)."""

    exact = False  # reference mode (see `reference_kernels`)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        text = self.text = config.text
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(Layer(text, i) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        # Self-conditioning: gated MLP over soft embeddings, pre-norm with scale, post-norm without.
        self.self_conditioning = SelfConditioning(text)
        self.register_buffer("inv_freq_sliding", rope_inv_freq(text, True), persistent=False)
        self.register_buffer("inv_freq_full", rope_inv_freq(text, False), persistent=False)
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] | None = None  # cos/sin tables, by layer kind
        self._set_constants()
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay float32 whatever dtype the weights are cast to (as the loader builds them).
        super()._apply(fn, recurse)
        if self.device.type != "meta":
            self._set_constants()
        return self

    def _set_constants(self) -> None:
        self.inv_freq_sliding = rope_inv_freq(self.text, True).to(self.device)
        self.inv_freq_full = rope_inv_freq(self.text, False).to(self.device)
        self._rope = None  # rebuilt on the next pass, in the new dtype and on the new device
        # sqrt(hidden) rounded to the weight dtype, as the reference scales embeddings; made once, not per pass
        # (a host-to-device copy inside a step would break CUDA-graph capture)
        self._embed_scale = torch.tensor(self.text.hidden_size**0.5, dtype=self.dtype).to(self.device)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the non-weight buffers (after building on the meta device and `to_empty`)."""
        self._set_constants()
        for layer in self.layers:
            layer.layer_scalar.fill_(1.0)
            layer.encoder_layer_scalar.fill_(1.0)

    # -- weights ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Random init as transformers does it: normal(0, initializer_range) linears/embeddings, ones for every norm
        (`post_feedforward_layernorm_1` too: a zero there would silence its branch, and the expert branch, between
        two zero norms, could never learn), the router's scales and the layer scalars; zeros for biases."""
        std = self.text.initializer_range if std is None else std
        ones = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm) and m.weight is not None}
        for name, p in self.named_parameters():
            if id(p) in ones or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @contextlib.contextmanager
    def reference_kernels(self) -> Iterator[None]:
        """Run with the kernels transformers uses (grouped expert matmuls, K/V repeated per head), bit for bit."""
        mods = [m for m in self.modules() if hasattr(m, "exact")]
        old = [m.exact for m in mods]
        for m in mods:
            m.exact = True
        try:
            yield
        finally:
            for m, o in zip(mods, old):
                m.exact = o

    def new_cache(self, batch_size: int, max_len: int, slack: int = 0) -> KVCache:
        """A preallocated cache for `batch_size` rows of up to `max_len` tokens each, in the model's dtype."""
        return KVCache(self.text, batch_size, max_len, dtype=self.dtype, device=self.device, slack=slack)

    # -- pieces -----------------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # Scale by sqrt(hidden) rounded to the weight dtype, as the reference does.
        return self.embed_tokens(tokens) * self._embed_scale

    def rope(self, positions: torch.Tensor, limit: int) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """positions (B, T), all below `limit` -> per layer kind, cos and signed sin (B, T, 1, D) in the model dtype,
        looked up in tables (the same values as computing them per call; no host synchronisation)."""
        need = limit
        if self._rope is None or self._rope[True][0].shape[0] < need:
            n = max(need, 2 * self._rope[True][0].shape[0] if self._rope else 256)
            at = torch.arange(n, device=self.device)
            self._rope = {
                s: rope_table(self.inv_freq_sliding if s else self.inv_freq_full, at, self.dtype) for s in (True, False)
            }
        return {s: (cos[positions][:, :, None], sin[positions][:, :, None]) for s, (cos, sin) in self._rope.items()}

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input: probabilities (..., V) -> their expected embedding (..., hidden) * sqrt(hidden),
        in the model dtype. 170x smaller than the probabilities at the real vocabulary, so the engine keeps this."""
        return (probs.to(self.dtype) @ self.embed_tokens.weight) * self._embed_scale

    def logits(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tied LM head and soft-capping; float32 logits (..., V).

        `out` (float32) and, for a low-precision model, `scratch` (model dtype) are reusable buffers of the logits'
        shape: (B, C, V) tensors are large, and allocating them afresh every step costs page faults. With them (the
        engine's path), a float32 model's soft-cap 1/cap scales the (B, C, hidden) input instead of the (B, C, V)
        output (one pass over the logits fewer; within an ulp or so). A low-precision model's input is not scaled:
        that would round it once more.
        """
        cap = self.text.final_logit_softcapping
        if out is None:
            x = F.linear(hidden, self.embed_tokens.weight).float()
            return torch.tanh(x / cap) * cap if cap is not None else x
        fold = cap is not None and self.dtype == torch.float32
        if fold:
            hidden = hidden * scalar(1.0 / cap, hidden)
        if self.dtype == torch.float32:
            torch.matmul(hidden, self.embed_tokens.weight.t(), out=out)
        else:
            out.copy_(torch.matmul(hidden, self.embed_tokens.weight.t(), out=scratch))
        if cap is None:
            return out
        return (out if fold else out.div_(cap)).tanh_().mul_(cap)

    # -- passes -----------------------------------------------------------------------------------------------
    def encode(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        n_new: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal pass over `tokens` (B, T) appended to each row of `cache`; returns hidden states (B, T, hidden).

        `n_new` (B,): how many of the T tokens each row really appends (right padding beyond; default all T).
        `visible` (B, T): tokens that occupy a slot but are never attended to (left padding), default all.
        With `last_only`, only the last position's hidden state is normed and returned (B, 1, hidden).
        `rows` (B,): which cache rows the B token rows extend (default: all rows, in order).
        """
        B, T = tokens.shape
        expected = cache.batch_size if rows is None else rows.shape[0]
        if B != expected:
            raise ValueError(f"tokens have batch {B} but {expected} cache rows were given")
        dev = tokens.device
        if n_new is None:
            n_new = torch.full((B,), T, dtype=torch.long, device=dev)
        lengths = cache.rows_of(cache.lengths, rows)
        if int((lengths + n_new).max()) > cache.max_len:
            raise ValueError(f"cache overflow: {int((lengths + n_new).max())} tokens > max_len {cache.max_len}")
        if visible is None:
            visible = torch.ones(B, T, dtype=torch.bool, device=dev)
        visible = visible & (torch.arange(T, device=dev)[None, :] < n_new[:, None])
        positions = lengths[:, None] + torch.arange(T, device=dev)[None, :]  # (B, T)
        masks = cache.encoder_masks(positions, visible, rows)
        if self.exact:  # transformers' masks: a padding query sees nothing (SDPA gives it 0); the fast path lets it
            # see itself, which keeps it finite on every kernel (a fully masked row is NaN on some)
            masks = {s: m if isinstance(m, str) else m & visible[:, None, :, None] for s, m in masks.items()}
        plan = cache.write_plan(positions, n_new, rows)

        def context(i: int) -> Context:
            def append(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                ck, cv = cache.kv(i, rows)  # views: concatenate before the write, which may reuse ring entries
                keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
                cache.write_layer(i, plan, k, v, rows)
                return keys, values

            return append

        x = self._layers(self.embed(tokens), positions, cache, context, masks, encoder=True)
        cache.commit(plan, positions, visible, n_new, rows)
        if last_only:
            x = x.gather(1, (n_new - 1).clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1]))
        return self.norm(x)

    def denoise(
        self,
        canvas: torch.Tensor,
        cache: KVCache,
        self_cond: torch.Tensor | None = None,
        self_cond_mask: torch.Tensor | None = None,
        masks: CanvasView | None = None,
        rows: torch.Tensor | None = None,
        soft: torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Bidirectional pass over `canvas` (B, C) after each row's cached context; returns logits (B, C, V), or with
        `hidden_only` the normed hidden states (B, C, hidden) for the caller's own (tiled) LM head.

        Self-conditioning: `self_cond`, the previous step's (processed) logits (B, C, V), or `soft`, their
        `soft_embedding` (B, C, hidden); neither on the first step (zero signal). `self_cond_mask` (B,): rows whose
        signal is zeroed (training). `masks`: from `cache.decoder_masks`, to build them once per canvas instead of
        once per step (default: in place, except in reference mode). `rows`: which cache rows the canvases extend.
        The cache's contents are only read; an in-place view writes the canvas's keys/values into the entries of
        its future slots, which stay invisible to every other pass until a commit overwrites them.
        """
        C = canvas.shape[1]
        positions = cache.rows_of(cache.lengths, rows)[:, None] + torch.arange(C, device=canvas.device)[None, :]
        if masks is None:
            masks = cache.decoder_masks(C, rows, in_place=not self.exact)
        x = self.embed(canvas)
        sc = self.self_conditioning
        if self_cond is not None:
            soft = self.soft_embedding(self_cond.softmax(dim=-1, dtype=torch.float32))
        if soft is not None:
            if self_cond_mask is not None:
                soft = soft * self_cond_mask.to(soft.dtype)[:, None, None]
            x = x + sc(sc.pre_norm(soft))
        # With no signal the MLP sees zeros and outputs zeros, so only the post-norm remains.
        x = sc.post_norm(x)

        def context(i: int) -> Context:
            if masks.slots is not None:  # in place: into the future slots, then the buffer as it stands
                return _in_place(cache, masks, rows, i)

            def read(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                ck, cv = cache.kv(i, rows)
                return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)

            return read

        x = self.norm(self._layers(x, positions, cache, context, masks.masks, encoder=False))
        return x if hidden_only else self.logits(x)

    def encode_in_place(
        self, tokens: torch.Tensor, cache: KVCache, view: CanvasView, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`encode` with static shapes (graphs.py): a causal pass over tokens (B, T) at each row's next T positions
        -> normed hidden states (B, T, hidden). `view` = `cache.causal_view(T, rows, ...)`: the tokens' keys/values
        go into their slots and attention reads the buffer in place. Like `denoise`, it leaves the cache's
        bookkeeping alone: the caller commits the slots (`KVCache.commit`) to keep what was written."""
        T = tokens.shape[1]
        positions = cache.rows_of(cache.lengths, rows)[:, None] + torch.arange(T, device=tokens.device)[None, :]
        context = functools.partial(_in_place, cache, view, rows)
        return self.norm(self._layers(self.embed(tokens), positions, cache, context, view.masks, encoder=True))

    def _layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        context: Callable[[int], Context],
        masks: dict[bool, torch.Tensor | str | None],
        encoder: bool,
    ) -> torch.Tensor:
        """The one layer loop: x (B, T, hidden) at `positions` (B, T) through every layer."""
        rope = self.rope(positions, cache.max_len + positions.shape[1])  # cached lengths never exceed max_len
        for i, layer in enumerate(self.layers):
            sliding = cache.layers[i].sliding
            x = layer(x, rope[sliding], context(i), masks[sliding], encoder)
        return x
