"""Rotary position embeddings: the inverse frequencies of each layer kind, their cos/sin tables, the rotation."""

from __future__ import annotations

import torch

from dgemma.model.config import TextConfig


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
