"""The runner (`dgemma/engine/runner.py`): rows sampled a tile at a time see the logits rows sampled together see."""

from __future__ import annotations


from dgemma.engine.core import Engine


from frozen import fixed_steps as _fixed, frozen_runs as _frozen_runs, same_steps as _same_steps, tiny_model as _model


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
