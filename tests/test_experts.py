"""Expert kernels (`dgemma/model/experts.py`): the grouped matmuls against the per-expert loop, and the kernel
choice."""

from __future__ import annotations


import pytest
import torch

from dgemma.model.config import tiny_config
from dgemma.model.experts import EXPERT_KERNELS, Experts, expert_kernel, grouped_kernel


# -- experts --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_grouped_experts_match_the_loop(dtype, tol):
    text = tiny_config(num_experts=6, top_k_experts=2).text
    torch.manual_seed(0)
    ex = Experts(text)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    ex = ex.to(dtype)
    x = torch.randn(40, text.hidden_size).to(dtype)
    idx = torch.randint(0, 4, (40, 2))  # experts 4 and 5 get no rows: empty groups must work
    idx[:, 1] = (idx[:, 0] + 1) % 4
    w = torch.rand(40, 2)
    out = {}
    with torch.no_grad():
        for name in [*EXPERT_KERNELS, "dense"]:
            mp = pytest.MonkeyPatch()
            mp.setattr("dgemma.model.experts.expert_kernel", lambda w_, tokens=1, top_k=1, n=name: n)
            try:
                out[name] = ex(x, w, idx).float()
            finally:
                mp.undo()
    assert out["grouped"].abs().max() > 0.1
    torch.testing.assert_close(out["grouped"], out["looped"], rtol=tol, atol=tol)
    # (the dense kernel's float32 GELU is the sigmoid form on the CPU: an ulp or two apart from torch's)
    torch.testing.assert_close(out["dense"], out["looped"], rtol=max(tol, 1e-5), atol=max(tol, 1e-5))


def test_expert_kernel_choice():
    w32, w16 = torch.zeros(2, 2, 2), torch.zeros(2, 2, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        assert expert_kernel(w16) == "grouped"  # no host sync: graph-capturable
        assert expert_kernel(w32) == "dense"  # float32 on CPU, little wasted arithmetic: overhead-bound
        assert grouped_kernel(w32) == "grouped"  # the reference's kernel
        big = torch.zeros(8, 512, 512)  # 8 experts, I 256: 6 of 8 experts' arithmetic wasted on 256 tokens
        assert expert_kernel(big, tokens=256, top_k=2) == "looped"
        assert expert_kernel(big, tokens=8, top_k=2) == "dense"
    p = torch.nn.Parameter(w16)
    assert expert_kernel(p) == "looped"  # training: differentiable
