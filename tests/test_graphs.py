"""Static-shape steps (`dgemma/engine/graphs.py`) and the graph safety of the step: the whole step under
`torch.compile(fullgraph=True)` with a backend that fails on any host sync or data-dependent shape, and the static
steps against the eager engine."""

from __future__ import annotations


import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.engine.core import Engine
from dgemma.engine.step import StepInputs, denoise_step
from dgemma.model.experts import expert_kernel
from dgemma.engine.params import SamplingParams
from dgemma.engine.sampler import draw_uniforms, rule_ids


from frozen import (
    accepted_only as _accepted_only,
    fixed_steps as _fixed,
    frozen_runs as _frozen_runs,
    same_steps as _same_steps,
    tiny_model as _model,
)


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
