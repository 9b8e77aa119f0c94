"""The sampler (`dgemma/engine/sampler.py`): the all-position draw against an accepted-only oracle, the two-level
inverse CDF against a float64 cumulative sum, the blocked argmax, the LM head into buffers and soft-embedding
self-conditioning against logits."""

from __future__ import annotations


import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.model.config import tiny_config
from dgemma.engine.sampler import draw_uniforms, max_argmax, rule_ids, sample_step

from dgemma.engine.sampler import CDF_BLOCK, inverse_cdf

from frozen import accepted_only as _accepted_only, tiny_model as _model


# -- sampler --------------------------------------------------------------------------------------------------------
def _peaked_logits(R: int, C: int, V: int, seed: int = 0) -> torch.Tensor:
    """Logits where even positions are nearly certain and odd ones flat: the acceptance rule splits every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, V, generator=g) * 0.1
    top = torch.randint(0, V, (R, C), generator=g)
    x.scatter_(-1, top[..., None], 40.0 * (torch.arange(C) % 2 == 0).float()[None, :, None].expand(R, C, 1))
    return x


@pytest.mark.parametrize("V", [50, 1024])  # one cumulative sum over V; two levels of CDF_BLOCK (256)
@pytest.mark.parametrize("with_template", [False, True])
def test_all_position_sampling_matches_accepted_only(with_template, V):
    R, C = 3, 16
    logits = _peaked_logits(R, C, V)
    canvas = torch.randint(0, V, (R, C))
    u = draw_uniforms([torch.Generator().manual_seed(7 + r) for r in range(R)], C, "cpu")
    temp, bound = torch.full((R,), 0.7), torch.full((R,), 0.1)
    template = None
    if with_template:
        template = torch.full((R, C), -1)
        template[:, 1] = 3  # a flat position, fixed
    a = _accepted_only(logits.clone(), canvas, temp, bound, u, V, template)
    b = sample_step(logits.clone(), canvas, temp, bound, rule_ids(["entropy_bound"] * R), u, V, template)
    assert ((a.accepted > 0) & (a.accepted < C)).all()  # both kinds of positions occur
    assert torch.equal(a.canvas, b.canvas)
    assert torch.equal(a.argmax, b.argmax) and torch.equal(a.accepted, b.accepted)
    other = draw_uniforms([torch.Generator().manual_seed(99 + r) for r in range(R)], C, "cpu")
    c = sample_step(logits.clone(), canvas, temp, bound, rule_ids(["entropy_bound"] * R), other, V, template)
    assert not torch.equal(c.canvas, b.canvas)  # the tokens do come from the uniforms


@pytest.mark.parametrize("shape", [(2, 5, 1024), (3, 384), (2, 300), (1, 128)])
def test_blocked_argmax_is_torch_max(shape):
    """The two-step max/argmax equals `max(dim=-1)`, including ties (the first index wins), a max in the last
    block and vocabularies that are not a multiple of the block."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[..., -1] = x.amax(-1)  # a tie between the last entry and an earlier one
    ties = torch.randint(0, 3, shape).float()  # many ties in every block
    for t in (x, ties, -x.abs()):
        top, idx = max_argmax(t)
        ref_top, ref_idx = t.max(dim=-1, keepdim=True)
        assert torch.equal(top, ref_top) and torch.equal(idx, ref_idx.squeeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_into_buffers_matches_the_plain_head(dtype):
    """The engine's LM head (reused float32 buffers; a float32 model's 1/cap folded into the hidden states) gives
    the plain head's soft-capped logits: to rounding in float32, bit for bit in bf16 (its input is not rescaled)."""
    torch.manual_seed(0)
    m = DiffusionGemma(tiny_config(vocab_size=300, canvas_length=8)).to(dtype)
    h = torch.randn(2, 8, m.text.hidden_size, dtype=dtype) * 1000  # soft-capping far from linear
    out, scratch = torch.empty(2, 8, 300), torch.empty(2, 8, 300, dtype=dtype)
    with torch.no_grad():
        got = m.logits(h, out=out, scratch=None if dtype == torch.float32 else scratch)
        want = torch.tanh(torch.matmul(h, m.embed_tokens.weight.t()).float() / 30.0) * 30.0
    assert m.text.final_logit_softcapping == 30.0 and got.data_ptr() == out.data_ptr()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # ~3e-6 of the cap
    else:
        assert torch.equal(got, want)
    assert (want.abs() > 20).any(), "some logits should sit in the soft-cap's flat part"


def test_soft_embedding_is_logit_self_conditioning():
    """The engine's (B, C, hidden) self-conditioning input is exactly what full-vocabulary logits give."""
    m = _model()
    cache = m.new_cache(2, 32)
    with torch.no_grad():
        m.encode(torch.randint(0, 128, (2, 5)), cache)
        canvas = torch.randint(0, 128, (2, 16))
        sc = 3.0 * torch.randn(2, 16, 128)
        via_logits = m.denoise(canvas, cache, self_cond=sc)
        via_soft = m.denoise(canvas, cache, soft=m.soft_embedding(sc.softmax(-1, dtype=torch.float32)))
        plain = m.denoise(canvas, cache)
    assert torch.equal(via_logits, via_soft)
    assert (via_soft - plain).abs().max() > 1e-2  # the signal matters


@pytest.mark.parametrize("V", [4 * CDF_BLOCK, 16 * CDF_BLOCK, 300])
def test_inverse_cdf_matches_a_float64_cumulative_sum(V):
    g = torch.Generator().manual_seed(V)
    R, C = 3, 64
    probs = torch.softmax(torch.randn(R, C, V, generator=g) * 4, -1)
    probs[0, 0] = 0
    probs[0, 0, V - 1] = 1  # all the mass on the last id
    probs[0, 1] = 0
    probs[0, 1, CDF_BLOCK] = 1  # on a block's first id
    u = torch.rand(R, C, generator=g)
    u[0, :2] = torch.tensor([0.0, 0.999999])
    got = inverse_cdf(probs, u)
    cdf = probs.double().cumsum(-1)  # the oracle, in float64
    target = u.double()[..., None] * cdf[..., -1:]
    want = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=V - 1)
    # float32 partial sums may move a boundary by ~1e-7: a target that close to one may go either way
    near = (cdf - target).abs().min(-1).values < 1e-6
    assert int(near.sum()) < R * C // 20
    assert torch.equal(got[~near], want[~near])
    assert int(got[0, 0]) == V - 1 and int(got[0, 1]) == CDF_BLOCK
    assert bool((probs.gather(-1, got[..., None]) > 0).all())  # never an id without mass
