"""The fast path's substitutions, each against the path it replaces (tiny configs, CPU): grouped expert matmuls vs
the per-expert loop, folded GQA vs K/V repeated per head, all-position sampling vs accepted-only sampling,
soft-embedding self-conditioning vs logits, tiled sampling vs one tile; and a graph-safety check of the whole step
under `torch.compile(fullgraph=True)`, which fails on any host sync or data-dependent shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dgemma.engine.step as E
from dgemma import DiffusionGemma
from dgemma.model.config import tiny_config
from dgemma.engine.core import Engine
from dgemma.engine.step import StepInputs, denoise_step
from dgemma.engine.reference import transformers_kernels
from dgemma.model.attention import Attention
from dgemma.model.experts import EXPERT_KERNELS, Experts, expert_kernel, grouped_kernel
from dgemma.engine.params import SamplingParams
from dgemma.engine.sampler import draw_uniforms, entropy_bound_accept, max_argmax, rule_ids, sample_step


def _model(dtype=torch.float32, seed: int = 0, **over) -> DiffusionGemma:
    torch.manual_seed(seed)
    m = DiffusionGemma(tiny_config(**over))
    m.reset_parameters(0.2)
    return m.to(dtype).eval()


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


# -- sampler --------------------------------------------------------------------------------------------------------
def _peaked_logits(R: int, C: int, V: int, seed: int = 0) -> torch.Tensor:
    """Logits where even positions are nearly certain and odd ones flat: the acceptance rule splits every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, V, generator=g) * 0.1
    top = torch.randint(0, V, (R, C), generator=g)
    x.scatter_(-1, top[..., None], 40.0 * (torch.arange(C) % 2 == 0).float()[None, :, None].expand(R, C, 1))
    return x


def _accepted_only(logits, canvas, temp, bound, u, V, fixed=None):
    """The sampler drawing only at accepted positions (one CDF per accepted position, found with `nonzero`): a
    second, data-dependent way to the same tokens, the oracle of the all-position sampler."""
    R, C, _ = logits.shape
    # the entropies by the sampler's own arithmetic: flat positions are near-ties that another formula may reorder
    top = logits.amax(-1, keepdim=True)
    inv = temp.reciprocal()[:, None, None]
    x = torch.addcmul(-top * inv, logits, inv)
    probs = x.exp()
    z = probs.sum(-1)
    entropy = z.log() - torch.einsum("rcv,rcv->rc", probs, x) / z
    probs = probs / z[..., None]
    mask = entropy_bound_accept(entropy, bound)
    if fixed is not None:
        mask = mask | (fixed >= 0)
    nxt = (u[:, :C] * V).long().clamp(max=V - 1)
    r, c = mask.nonzero(as_tuple=True)
    cdf = probs[r, c].cumsum(-1)
    target = u[r, C + c].float()[:, None] * cdf[:, -1:]
    nxt[r, c] = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=V - 1)
    argmax = probs.argmax(-1)
    if fixed is not None:
        nxt, argmax = torch.where(fixed >= 0, fixed, nxt), torch.where(fixed >= 0, fixed, argmax)
    return SimpleNamespace(canvas=nxt, argmax=argmax, accepted=mask.sum(-1))


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


def _frozen_runs(monkeypatch, engines: list[Engine], requests: list, steps: int) -> list[list[dict]]:
    """Run each engine `steps` steps on the same `requests` ((prompt, params) pairs) with canvases frozen after the
    sampler, so every run feeds the same canvases; per run, per sampler call, the logits by canvas."""
    real, seen = E.sample_step, []

    def frozen(logits, canvas, *a, **k):
        seen[-1].append({bytes(c.numpy()): lg.clone() for c, lg in zip(canvas, logits)})
        out = real(logits, canvas, *a, **k)
        out.canvas = canvas.clone()
        return out

    monkeypatch.setattr(E, "sample_step", frozen)
    for eng in engines:
        seen.append([])
        for prompt, params in requests:
            eng.add_request(prompt, params)
        for _ in range(steps):
            eng.step()
    return seen


def _same_steps(a: list[dict], b: list[dict]) -> None:
    """Two runs' logits agree to rounding step by step, and self-conditioning changed the second step."""
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-4, msg=f"step {step}")
    first = next(iter(a[0]))
    assert (a[1][first] - a[0][first]).abs().max() > 1e-2


def _fixed(seed: int, new: int) -> SamplingParams:
    return SamplingParams(seed=seed, max_new_tokens=new, max_denoising_steps=3, fixed_steps=True, ignore_eos=True)


def test_sampler_tiles_match_one_tile(monkeypatch):
    """Rows sampled one tile at a time (a tiny sampler budget) see the same logits, step after step, as rows sampled
    together: row order, generators and the self-conditioning rows map correctly. Canvases are frozen after the
    sampler so both runs feed the same canvases; logits then agree to rounding (the LM head's batch differs)."""
    m = _model()
    engines = [Engine(m, max_batch=3, max_model_len=64, sampler_memory=b) for b in (1 << 30, 1)]
    requests = [([5, 6, 7 + s], _fixed(s, 16)) for s in range(3)]
    together, apart = _frozen_runs(monkeypatch, engines, requests, 4)  # prefill + 3 steps (the first canvas)
    assert [e.tile for e in engines] == [3, 1]
    assert [len(s) for s in together] == [3, 3, 3] and len(apart) == 9  # one sampler call per row per step
    _same_steps(together, [{**apart[3 * i], **apart[3 * i + 1], **apart[3 * i + 2]} for i in range(3)])


# -- graph safety ---------------------------------------------------------------------------------------------------
def _step_inputs(m: DiffusionGemma, B: int = 2):
    C = m.config.canvas_length
    cache = m.new_cache(B, 64)
    with torch.no_grad():
        m.encode(torch.randint(0, 128, (B, 6)), cache)
    canvas = torch.randint(0, 128, (B, C))
    soft = m.soft_embedding(torch.softmax(torch.randn(B, C, 128), -1))
    u = draw_uniforms([torch.Generator().manual_seed(s) for s in range(B)], C, "cpu")
    return cache, canvas, soft, u, torch.full((B,), 0.6), torch.full((B,), 0.1), cache.decoder_masks(C, in_place=True)


def _x(canvas, soft, u, temp, bound, rows=None) -> StepInputs:
    """Step inputs of unconstrained entropy-bound rows (no fixed positions)."""
    R = canvas.shape[0]
    free = torch.full_like(canvas, -1)
    return StepInputs(canvas, soft, u, temp, bound, rule_ids(["entropy_bound"] * R), free, rows)


def _no_data_dependence(gm: torch.fx.GraphModule, example_inputs):
    """A `torch.compile` backend that rejects any traced value whose shape or value depends on tensor data
    (`.item()`, `nonzero`, boolean-mask indexing: unbacked symbols). Python-level syncs (`.tolist()`, `bool()`)
    already fail `fullgraph=True`. Runs the graph eagerly."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in gm.graph.nodes:
        val = node.meta.get("example_value")
        if val is not None and free_unbacked_symbols(val):
            raise AssertionError(f"data-dependent value in the step: {node.format_node()}")
    return gm.forward


def _compile_strict(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=_no_data_dependence)


def test_denoise_step_is_graph_safe(monkeypatch):
    """The whole fast step traced by `torch.compile(fullgraph=True)` in bf16 on CPU, with a backend that rejects
    data-dependent shapes and values: any `.item()`, `.tolist()`, `nonzero` or boolean indexing in the step fails.
    Compiled and eager results are identical."""
    m = _model(torch.bfloat16)
    cache, canvas, soft, u, temp, bound, masks = _step_inputs(m)

    def step(canvas, soft, u):
        out = denoise_step(m, cache, _x(canvas, soft, u, temp, bound), masks)
        return out.canvas, out.argmax, out.accepted, out.mean_entropy, m.soft_embedding(out.probs)

    with torch.no_grad():
        eager = step(canvas, soft, u)
        compiled = _compile_strict(step)(canvas, soft, u)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)

    # The static-shape step of graphs.py: padded rows (a copy of row 0) by index, spans rounded, masks as tensors.
    rows = torch.tensor([1, 0, 1])
    ring = m.new_cache(2, 64, slack=canvas.shape[1])  # the engine's cache: a canvas of slack in the sliding ring
    with torch.no_grad():
        m.encode(torch.randint(0, 128, (2, 6)), ring, n_new=torch.tensor([6, 4]))
    view = ring.decoder_masks(canvas.shape[1], rows, in_place=True, round_span=256)
    assert all(m_ is not None and m_.shape[-1] == s for m_, s in zip(view.masks.values(), view.span.values()))

    def padded_step(canvas, soft, u):
        out = denoise_step(m, ring, _x(canvas, soft, u, temp[rows], bound[rows], rows), view)
        return out.canvas, out.probs, m.soft_embedding(out.probs)

    with torch.no_grad():
        args = (canvas[rows], soft[rows], u[rows])
        for a, b in zip(padded_step(*args), _compile_strict(padded_step)(*args)):
            assert torch.equal(a, b)

    # The autoregressive step (graphs.py's decode): one token per padded row, written into its slot in place.
    # And the commit encode: a canvas per row, causal.
    for T in (1, canvas.shape[1]):
        causal = ring.causal_view(T, rows, round_span=256)

        def causal_step(tokens):
            return m.encode(tokens, ring, rows=rows, view=causal)

        with torch.no_grad():
            tokens = torch.randint(0, 128, (3, T))
            assert torch.equal(causal_step(tokens), _compile_strict(causal_step)(tokens))

    # float32 on CPU runs the dense experts, also capturable.
    m32 = _model(torch.float32)
    cache32, canvas32, soft32, u32, _, _, masks32 = _step_inputs(m32)

    def float32_step(canvas, soft, u):
        return denoise_step(m32, cache32, _x(canvas, soft, u, temp, bound), masks32).canvas

    with torch.no_grad():
        assert expert_kernel(m32.layers[0].experts.gate_up_proj, tokens=canvas32.numel(), top_k=2) == "dense"
        assert torch.equal(_compile_strict(float32_step)(canvas32, soft32, u32), float32_step(canvas32, soft32, u32))

    # The check has power: the accepted-only sampler (nonzero) and the expert loop (.tolist()) both fail.
    def accepted_only(canvas, soft, u):
        hidden = m.denoise(canvas, cache, soft=soft, masks=masks, hidden_only=True)
        return _accepted_only(m.logits(hidden), canvas, temp, bound, u, 128).canvas

    monkeypatch.setattr("dgemma.model.experts.expert_kernel", lambda *a, **k: "looped")
    for fn, args in ((accepted_only, (canvas, soft, u)), (float32_step, (canvas32, soft32, u32))):
        with torch.no_grad(), pytest.raises(Exception, match="data-dependent|tolist|Unsupported"):
            _compile_strict(fn)(*args)
    torch._dynamo.reset()


# -- static-shape steps (graphs.py) -----------------------------------------------------------------------------------
def test_static_steps_match_the_eager_engine(monkeypatch):
    """The engine's static-shape step (padded to a batch bucket with copies of the first row, key spans rounded up,
    masks always tensors: what a CUDA graph replays) sees the same logits, step after step, as the eager tiled
    step, with rows of different lengths and the commit between canvases static too; the padded copies disturb
    nothing. Canvases are frozen after the sampler
    so both runs feed the same canvases; logits then agree to rounding (batch shapes and spans differ)."""
    m = _model()
    eager, static = (Engine(m, max_batch=4, max_model_len=96, graphs=g) for g in (False, True))
    requests = [([5, 6, 7 + s] * (s + 1), _fixed(s, 32)) for s in range(3)]  # 3 rows: bucket 4, one padded copy
    a, b = _frozen_runs(monkeypatch, [eager, static], requests, 7)  # prefill + two canvases of 3 steps
    steps = [k for k in static.graphs._graphs if k[0] != "causal"]
    assert eager.graphs is None and len(steps) == 1  # one bucket and span for both canvases
    assert ("causal", 4, m.config.canvas_length, False) in static.graphs._graphs  # the commit encode, static too
    assert "static buffers" in static.describe()
    assert len(a) == 6 and all(len(x) == 3 for x in a)
    _same_steps(a, b)


def test_compiled_static_steps_match_and_fall_back(monkeypatch, caplog):
    """`Engine(compile=True)`: the graphed denoising step through `torch.compile(fullgraph=True)` (a light backend
    here; inductor on a GPU) gives the eager step's outputs; a compile that fails warns and runs eagerly."""
    import dgemma.engine.graphs as G

    monkeypatch.setattr(G, "COMPILE_BACKEND", "aot_eager")
    m = _model()
    _, canvas, soft, u, temp, bound, _ = _step_inputs(m)
    inputs = _x(canvas, soft, u, temp, bound)
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def step(compile: bool):
        cache = m.new_cache(2, 64, slack=m.config.canvas_length)
        graphs = G.StepGraphs(m, cache, denoise_step, capture=False, compile=compile)
        with torch.no_grad():
            m.encode(prompt, cache)
            out = graphs.run([0, 1], inputs)
        return graphs, (out.canvas, out.probs.clone(), m.soft_embedding(out.probs))

    _, eager = step(False)
    with caplog.at_level("WARNING", logger="dgemma.engine.graphs"):
        graphs, comp = step(True)
    assert graphs.compiled and "compiled" in graphs.describe() and not caplog.records
    for x, y in zip(eager, comp):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)

    def broken(fn, **kw):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(G.torch, "compile", broken)
    with caplog.at_level("WARNING", logger="dgemma.engine.graphs"):
        _, fallback = step(True)
    assert any("torch.compile of the step failed" in r.message for r in caplog.records)
    for x, y in zip(eager, fallback):
        assert torch.equal(x, y)
    torch._dynamo.reset()


def test_static_decode_matches_encode():
    """The autoregressive step and the commit encode from static buffers (3 rows of different lengths padded to
    bucket 4 with a copy of the first; the tokens written into their cache slots in place, the kept ones committed
    after) give the logits and leave the cache that `encode` of the same tokens does, step after step, past a wrap
    of the sliding ring, with canvases cut short."""
    from dgemma.engine.graphs import StepGraphs

    m = _model()
    caches = [m.new_cache(4, 48, slack=m.config.canvas_length) for _ in range(2)]
    rows, g = [2, 0, 3], torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompt = torch.randint(3, 128, (4, 9), generator=g)
        for c in caches:
            m.encode(prompt, c, n_new=torch.tensor([9, 1, 5, 3]))
        static = StepGraphs(m, caches[1], denoise_step, capture=False)
        for _ in range(12):  # sliding window 8: the ring wraps
            tokens = torch.randint(3, 128, (3, 1), generator=g)
            ref = m.logits(m.encode(tokens, caches[0], rows=torch.tensor(rows)))[:, -1]
            torch.testing.assert_close(static.decode(rows, tokens), ref, rtol=1e-5, atol=1e-5)
            if _ == 5:  # a commit encode of canvases, partly kept (a canvas cut at EOS keeps its first tokens)
                C = m.config.canvas_length
                n_new = [C, 3, 5]
                canvases = torch.randint(3, 128, (3, C), generator=g)
                m.encode(canvases, caches[0], n_new=torch.tensor(n_new), rows=torch.tensor(rows))
                static.commit(rows, canvases, n_new)
    a, b = caches
    assert a.host_lengths == b.host_lengths and torch.equal(a.lengths, b.lengths)
    for s in (True, False):
        assert torch.equal(a.pos[s], b.pos[s])
    for la, lb in zip(a.layers, b.layers):  # every entry a later token can see holds the same keys
        for r in range(4):  # (uncommitted tokens may overwrite entries already outside the window: no one sees them)
            live = a.pos[la.sliding][r] >= (int(a.lengths[r]) - (a.window - 1) if la.sliding else 0)
            torch.testing.assert_close(la.k[r][:, live], lb.k[r][:, live], rtol=1e-5, atol=1e-5)
    assert set(static._graphs) == {("causal", 4, 1, True), ("causal", 4, C, False)}


def test_static_steps_serve_every_row_and_fall_back_only_over_budget():
    """Templated rows and mixed acceptance rules run from the static buffers like any other row (they are data for
    the step); only a bucket over the sampler budget runs on exact shapes."""
    m = _model()
    assert Engine(m, max_batch=2, max_model_len=64).graphs is None  # by default only on CUDA
    eng = Engine(m, max_batch=2, max_model_len=64, graphs=True)
    p = SamplingParams(max_new_tokens=8, max_denoising_steps=2, fixed_steps=True, ignore_eos=True)
    eng.add_request([5, 6], SamplingParams(**{**vars(p), "template": [9, -1, 11]}))
    eng.add_request([5, 7], SamplingParams(**{**vars(p), "acceptance": "confidence"}))
    eng.step()  # prefill
    eng.step()  # one step of both rows
    assert eng.runner.static(2) and [k for k in eng.graphs._graphs if k[0] != "causal"] == [("denoise", 2)]
    small = Engine(m, max_batch=2, max_model_len=64, graphs=True, sampler_memory=1)  # one row per tile
    assert small.runner.static(1) and not small.runner.static(2)
    small.add_request([5, 6], p)
    small.add_request([5, 7], p)
    small.step()
    for eng_ in (eng, small):  # and they finish
        while eng_.has_unfinished():
            eng_.step()
    assert [k for k in small.graphs._graphs if k[0] != "causal"] == [("denoise", 1)]


def test_static_steps_replace_a_graph_when_the_span_grows():
    """A step whose cache span crosses a span bucket gets new static buffers in place of the old ones (per batch
    bucket and rule one graph lives), and the rows still finish."""
    m = _model()
    eng = Engine(m, max_batch=2, max_model_len=600, graphs=True)
    eng.add_request([3 + i % 120 for i in range(200)], _fixed(0, 96))  # a later canvas crosses 256 tokens
    seen = set()
    while eng.has_unfinished():
        eng.step()
        seen |= {tuple(g.view.span.values()) for g in eng.graphs._graphs.values()}
    assert len([k for k in eng.graphs._graphs if k[0] != "causal"]) == 1 and len(seen) >= 2
