"""Attention and projections (`dgemma/model/attention.py`, `blocks.py`): fused projections against separate ones,
the lean CPU kernels, folded GQA against K/V repeated per head, and canvas keys/values written into their cache
slots against concatenation."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from dgemma import DiffusionGemma
from dgemma.model.config import tiny_config
from dgemma.engine.reference import transformers_kernels
from dgemma.model.attention import Attention


from frozen import tiny_model as _model


# -- attention ------------------------------------------------------------------------------------------------------
# -- fused projections -----------------------------------------------------------------------------------------------
def _unfused(monkeypatch):
    monkeypatch.setattr("dgemma.model.blocks.FUSE_MAX_BYTES", -1)  # every fused_linear declines: one matmul per layer


@pytest.mark.parametrize("over", [{}, {"attention_bias": True}])
def test_fused_projections_match_separate_ones(monkeypatch, over):
    """One matmul over q/k/v (and gate/up; and over both FFN branches' and the router's input weights, the norm
    weights folded in) with one RMS over every head gives the separate layers' outputs (up to float32 rounding: the
    fused matmul may block its sums differently) and touches the cache the same way."""
    m = _model(**over)
    tokens, canvas = torch.randint(3, 60, (2, 7)), torch.randint(3, 60, (2, 4))
    outs = []
    for fuse in (True, False):
        with monkeypatch.context() as mp, torch.no_grad():
            if not fuse:
                _unfused(mp)
            cache = m.new_cache(2, 32)
            enc = m.encode(tokens, cache)
            outs.append((enc, m.denoise(canvas, cache), cache.kv(0)[0].clone()))
    # q/k/v through one matmul; both FFN branches and the router through one input matmul (`Layer._fused_branches`)
    assert hasattr(m.layers[0].self_attn, "_fused_weight") and hasattr(m.layers[0], "_ffn_in")
    for fused, separate in zip(*outs):
        assert separate.abs().max() > 0.1
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)


def test_fused_weights_follow_weight_updates():
    """The concatenated weights are rebuilt after an in-place update (an optimizer step, `load_state_dict`) and
    after a cast; training (grad) and reference mode use the separate layers."""
    m = _model()
    attn = m.layers[0].self_attn
    x = torch.randn(1, 3, m.text.hidden_size)
    canvas = torch.randint(3, 60, (1, 4))

    def denoise():
        return m.denoise(canvas, m.new_cache(1, 16))

    with torch.no_grad():
        first = denoise()
        attn.q_proj.weight.mul_(2.0)  # in place, like an optimizer step
        second = denoise()
        assert torch.equal(attn._fused_weight[1], torch.cat([p.weight for p in attn.projections]))
        assert not torch.equal(second, first)
        m.load_state_dict(_model(seed=1).state_dict())
        denoise()
        assert torch.equal(attn._fused_weight[1], torch.cat([p.weight for p in attn.projections]))
        m.to(torch.bfloat16)  # a cast: new storage
        denoise()
        assert attn._fused_weight[1].dtype == torch.bfloat16
    m.float().train()
    out = attn.project(x, *[t[:, :3] for t in m.rope(torch.arange(3)[None], 3)[attn.sliding]])
    sum((o * torch.randn_like(o)).sum() for o in out).backward()  # separate layers: gradients reach every weight
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.q_norm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_lean_cpu_kernels_match_torch():
    """The CPU's tanh-GELU as a sigmoid and the RMS norm from a vector norm: torch's functions within float32
    rounding, over magnitudes from 1e-30 to 1e30 (no overflow to NaN in the cubic term)."""
    from dgemma.model.blocks import gated_activation, rms_unit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-30, 30, 96)
    up = torch.randn(64, 96, generator=g)
    fast, ref = gated_activation("gelu_pytorch_tanh", x, up), F.gelu(x, approximate="tanh") * up
    assert not fast.isnan().any()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    y = torch.randn(5, 64, 256, generator=g) * torch.logspace(-3, 3, 5)[:, None, None]
    torch.testing.assert_close(rms_unit(y, 1e-6), F.rms_norm(y, (256,), None, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim,n_kv", [(8, 2), (512, 1)])
def test_folded_gqa_matches_repeated_kv(head_dim, n_kv):
    """Query heads of a KV group folded into the query length (non-causal, key-only mask) give what K/V repeated
    per head give, including head_dim 512 (the full layers of the real model)."""
    text = tiny_config(head_dim=head_dim, num_key_value_heads=n_kv, hidden_size=64).text
    torch.manual_seed(1)
    attn = Attention(text, 0)
    B, T, K, H = 2, 5, 9, text.num_attention_heads
    q = torch.randn(B, H, T, head_dim)
    k, v = torch.randn(B, n_kv, K, head_dim), torch.randn(B, n_kv, K, head_dim)
    key_mask = torch.rand(B, 1, 1, K) > 0.3
    key_mask[..., 0] = True
    for mask in (None, key_mask):
        with torch.no_grad():
            fast = attn.attend(q, k, v, mask)
            with transformers_kernels(attn):
                ref = attn.attend(q, k, v, mask)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn.attend(q, k, v, key_mask), attn.attend(q, k, v, None))  # the mask matters


# -- canvas keys/values in their cache slots ---------------------------------------------------------------------------
def _ragged_cache(m: DiffusionGemma, lengths: list[int], slack: int):
    """A cache whose rows hold `lengths` tokens (right-padded encode), long enough to wrap the sliding ring."""
    cache = m.new_cache(len(lengths), 96, slack=slack)
    T = max(lengths)
    with torch.no_grad():
        m.encode(torch.randint(0, 128, (len(lengths), T)), cache, n_new=torch.tensor(lengths))
    return cache


@pytest.mark.parametrize("rows,extra", [(None, 0), ([1], 0), (None, 5)])
def test_in_place_canvas_matches_concatenation(rows, extra):
    """Canvas keys/values written into their future slots (no per-layer copy of the cache) give the decoder what
    concatenating them after the cache gives: ragged rows, a sliding ring that has wrapped (window 8, 21 cached
    tokens), a subset of rows, a ring with stale entries (`extra` slack); the cache's visible state is untouched,
    and the next commit and canvas see the same context either way."""
    m = _model(sliding_window=8)
    C = m.config.canvas_length
    torch.manual_seed(3)
    cache = _ragged_cache(m, [21, 13], slack=C + extra)
    plain = _ragged_cache(m, [21, 13], slack=C + extra)
    for a, b in zip(cache.layers, plain.layers):  # the same contents in both
        b.k.copy_(a.k), b.v.copy_(a.v)
    idx = None if rows is None else torch.tensor(rows)
    R = 2 if rows is None else len(rows)
    canvas = torch.randint(0, 128, (R, C))
    soft = m.soft_embedding(torch.softmax(torch.randn(R, C, 128), -1))
    with torch.no_grad():
        assert cache.fits_in_place(C)
        view = cache.decoder_masks(C, idx, in_place=True)
        assert view.slots is not None and int(view.slots[True].min()) == 0  # row 0's canvas wraps the ring
        assert (view.masks[True] is not None) == (extra > 0)  # stale ring entries, masked
        got = m.denoise(canvas, cache, soft=soft, rows=idx, masks=view, hidden_only=True)
        want = m.denoise(canvas, plain, soft=soft, rows=idx, masks=plain.decoder_masks(C, idx), hidden_only=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # ~3e-6 of the cap
        assert got.abs().max() > 0.1
        assert torch.equal(cache.lengths, plain.lengths) and cache.host_lengths == plain.host_lengths
        assert all(torch.equal(cache.pos[s], plain.pos[s]) for s in (True, False))
        for c in (cache, plain):  # commit the canvas, then denoise the next one
            m.encode(canvas, c, rows=idx)
        nxt = [m.denoise(canvas, c, rows=idx, hidden_only=True) for c in (cache, plain)]
        torch.testing.assert_close(*nxt, rtol=1e-5, atol=1e-5)
