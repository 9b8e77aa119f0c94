"""Test helper: make the events a test needs happen whatever the CPU's float rounding.

A random model's logits are nearly tied, so which token wins a position is decided by the last bits of the
arithmetic, and those differ between instruction sets (AVX-512, AVX2), thread counts and batch shapes. A test that
needs an event (a printable token, a stop string, no EOS, an unsolvable grid) forces it with a margin no rounding can
overturn, instead of hoping the random model produces it:

- `boost_token` edits the weights so that one token wins every position, in every mode and in any process;
- `force_canvas` edits the diffusion sampler's logits in this process: chosen tokens at chosen canvas positions,
  banned tokens nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pytest
import torch

FORCE = 50.0  # logits are soft-capped into (-30, 30): +-50 outweighs anything the model says


@torch.no_grad()
def boost_token(model, token: int, channel: int = 0) -> float:
    """Make `token` the argmax of every position of `model` (a DiffusionGemma), encoder and denoiser alike; returns a
    guaranteed lower bound on its logit margin over any other token (checked to be large).

    The LM head is tied to the embedding, so hidden channel `channel` is turned into a positive carrier: every
    embedding row gets the same positive value there, and nothing else writes the channel (the post-norms that add
    into the residual stream get a zero weight there, the self-conditioning MLP outputs zero). The final hidden state
    then has a positive component on the channel at every position, whatever the input, and a huge value of
    `token`'s row on it makes `token`'s logit dominate. The bound is computed from the weights alone (norms of the
    residual updates, Cauchy-Schwarz for everything else), so it holds for any input and any float rounding.
    """
    text = model.config.text
    emb = model.embed_tokens.weight
    hidden = emb.shape[1]
    keep = [i for i in range(hidden) if i != channel]
    r = float(emb[:, keep].float().norm(dim=1).max())  # largest row norm off the channel
    carrier, boost = 2 * r, 1000.0
    emb[:, channel] = carrier
    emb[token, channel] = carrier + boost
    for layer in model.layers:
        layer.post_attention_layernorm.weight[channel] = 0.0
        layer.post_feedforward_layernorm.weight[channel] = 0.0
        assert float(layer.layer_scalar) == float(layer.encoder_layer_scalar) == 1.0
    model.self_conditioning.down_proj.weight.zero_()

    # Residual stream: the embedding (the denoiser RMS-normalises it first), plus two updates per layer, each an
    # RMSNorm output of norm <= sqrt(H) * max|weight|, none touching the channel.
    w_post = max(
        float(n.weight.abs().max())
        for layer in model.layers
        for n in (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
    )
    updates = 2 * len(model.layers) * w_post
    rows = [(carrier, math.hypot(carrier, r)), (carrier + boost, math.hypot(carrier + boost, r))]
    share_dec = min(c / n for c, n in rows) / (1 + updates)  # lower bounds of channel / norm of the final stream
    share_enc = min(c / (n + updates) for c, n in rows)
    w_final = model.norm.weight.float()
    assert float(w_final[channel]) > 0
    sqrt_h = math.sqrt(hidden)
    h_min = sqrt_h * min(share_dec, share_enc) * float(w_final[channel])
    h_max = sqrt_h * float(w_final[channel])
    off = sqrt_h * float(w_final.abs().max()) * r  # |off-channel part of any logit|
    cap = text.final_logit_softcapping
    soft = (lambda x: cap * math.tanh(x / cap)) if cap else (lambda x: x)
    margin = soft(h_min * (carrier + boost) - off) - soft(h_max * carrier + off)
    assert margin > 15, f"boost_token: only a {margin:.1f} logit margin is guaranteed"
    return margin


def force_canvas(monkeypatch: pytest.MonkeyPatch, at: Mapping[int, int] | None = None, ban: Iterable[int] = ()) -> None:
    """From now on (in this process), every diffusion canvas commits token `at[p]` at canvas position p, and no
    token of `ban` anywhere else (the sampler's logits are overwritten before it samples and takes the argmax)."""
    import dgemma.engine.step as E

    real = E.sample_step
    at = dict(at or {})
    banned = sorted(set(ban))

    def forced(logits, *args, **kwargs):
        if banned:
            logits[..., banned] = -FORCE
        for pos, tok in at.items():
            logits[:, pos, :] = -FORCE
            logits[:, pos, tok] = FORCE
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(E, "sample_step", forced)


def printable_tokens(tokenizer, vocab_size: int) -> list[int]:
    """Ids whose text, alone, is printable ASCII with a non-blank character."""
    out = []
    for i in range(vocab_size):
        s = tokenizer.decode([i])
        if s.isascii() and s.isprintable() and s.strip():
            out.append(i)
    return out
