"""Attention: the projections (q/k/v, their RMS norms and rotation), scaled dot-product attention over the keys a
pass sees, and where those keys come from (`layer_context`: the cache's and the new tokens', written or not).

Reference mode (`dgemma.engine.reference`) replaces the kernel choices `Attention.qkv` and `Attention.folds` from
outside with transformers' own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.model.blocks import RMSNorm, cached, fused_linear
from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.config import TextConfig
from dgemma.model.rope import apply_rope

# (new keys, new values) of one layer -> the keys/values it attends to
Context = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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

        One RMS over every head (q, k and, on sliding layers, v: the rows are independent, so this is the per-head
        norms' arithmetic) and one rotation over the q and k heads."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        heads = (H + 2 * Hkv) if self.v_proj is not None else H + Hkv  # full layers: values are the raw keys
        unit = self.q_norm.unit(self.qkv(x).view(B, T, heads, self.head_dim))
        v = unit[:, :, H + Hkv :] if self.v_proj is not None else unit[:, :, H:]  # v_norm has no weight
        qk = self.q_norm.scale_unit(unit[:, :, : H + Hkv], x.dtype, weight=self._qk_norm_weight())
        qk = apply_rope(qk, cos, sin)
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.to(x.dtype).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> the projections side by side (B, T, heads * D): one matmul over their concatenated
        weights where `fused_linear` applies, else one per projection."""
        qkv = fused_linear(self, x, self.projections)
        return torch.cat([m(x) for m in self.projections], dim=-1) if qkv is None else qkv

    def _qk_norm_weight(self) -> torch.Tensor:
        """The q and k norms' weights side by side, per head: (H + Hkv, D)."""
        wq, wk = self.q_norm.weight, self.k_norm.weight
        return cached(
            self, "_qk_norm", (wq, wk), lambda: torch.cat([wq.expand(self.n_heads, -1), wk.expand(self.n_kv, -1)])
        )

    @property
    def projections(self) -> tuple[nn.Module, ...]:
        return (self.q_proj, self.k_proj) + ((self.v_proj,) if self.v_proj is not None else ())

    def folds(self, mask: torch.Tensor | str | None) -> bool:
        """Whether the query heads of a KV group fold into the query length: with no causal order and a key-only
        mask they see the same keys, so one fused kernel runs without copying K/V per head, at any head_dim."""
        return self.n_heads > self.n_kv and (mask is None or (not isinstance(mask, str) and mask.shape[2] == 1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None
    ) -> torch.Tensor:
        """Scaled dot-product attention with scaling 1.0 (q/k are RMS-normed); returns (B, T, hidden).

        `mask`: a boolean (B, 1, T|1, K) mask, "causal", or None (all visible).
        """
        B, H, T, D = q.shape
        if self.folds(mask):  # (the same products and sums per query, fewer kernels)
            o = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, D), k, v, attn_mask=mask, scale=1.0)
        else:
            o = attend_per_head(q, k, v, mask)
        return self.o_proj(o.view(B, H, T, D).transpose(1, 2).reshape(B, T, -1))


def attend_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | str | None) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, K, D) -> (B, H, T, D), each query head over its KV group: grouped by the
    kernel under no mask or a causal one, K/V repeated per query head (the reference's layout) under a tensor mask."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    if mask is None or isinstance(mask, str):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=mask == "causal" and T > 1, scale=1.0, enable_gqa=rep > 1
        )
    if rep > 1:
        k = k[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, H, k.shape[2], D)
        v = v[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, H, v.shape[2], D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def layer_context(
    cache: KVCache,
    view: CanvasView,
    rows: torch.Tensor | None,
    plan: dict[bool, torch.Tensor] | None,
    layer: int,
) -> Context:
    """Where one layer's keys/values come from in a pass that reads the cache as `view` describes. In place
    (`view.slots`): the new keys/values go into their future slots and attention reads the buffer's first
    `view.span` entries as they stand. Otherwise they follow the cached ones (a copy), and with a write `plan`
    (`KVCache.write_plan`) they are also stored."""

    def read(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if view.slots is not None:
            cache.write_layer(layer, view.slots, k, v, rows)
            return cache.kv(layer, rows, span=view.span[cache.layers[layer].sliding])
        ck, cv = cache.kv(layer, rows)  # views: concatenate before the write, which may reuse ring entries
        keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        if plan is not None:
            cache.write_layer(layer, plan, k, v, rows)
        return keys, values

    return read
