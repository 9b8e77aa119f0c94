"""The sampler's inverse CDF (`dgemma/engine/sampler.py`): the two-level draw picks the id a float64 cumulative
sum over the whole vocabulary picks."""

from __future__ import annotations

import pytest
import torch

from dgemma.engine.sampler import CDF_BLOCK, inverse_cdf


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
