"""The denoising step replayed from static buffers, so that on CUDA it runs as one captured CUDA graph.

A step of R rows is padded to a batch bucket (1, 2, 4, 8, 16, 32) and its key span to a multiple of
`SPAN_BUCKET`, so the shapes repeat from step to step and canvas to canvas. Each bucket gets static input and output
buffers for the latest spans: one step = copy the inputs in, replay, read the outputs. The step is
`step.denoise_step` (decoder pass, LM head, sampler), the function the runner calls on exact shapes; every choice a
row makes (acceptance rule, fixed positions, temperature) is one of its inputs. On CUDA it is captured once per
bucket and spans after a warm-up, and replayed; a step with constrained rows runs it from the same buffers
uncaptured (their frontier grows on the host between the LM head and the sampler). Elsewhere the buffers run it
eagerly, which is what the CPU tests check.

Padded rows are copies of the first row (its cache row, canvas, random numbers): a copy writes the same canvas
keys/values into the same cache entries as the row it copies, so padding cannot disturb a real row, and no spare
cache row is needed. Their outputs are dropped.

Causal passes are replayed the same way per bucket and length: the commit encode of finished canvases (`commit`)
and the autoregressive baseline's step (`decode`: one token per row, next-token logits), their keys/values written
into their slots in place (`model.encode` with a static `cache.causal_view`); the kept slots are committed after
the replay, and AR tokens are sampled on the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.modeling import DiffusionGemma
from dgemma.engine.sampler import StepOut
from dgemma.engine.step import Frontier, StepInputs

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32)
COMPILE_BACKEND = "inductor"  # torch.compile's backend for `compiled` (the tests use a lighter one)
SPAN_BUCKET = 256  # key spans round up to this: a graph serves 256 more cached tokens before the next capture


def bucket(rows: int) -> int | None:
    """The smallest batch bucket holding `rows` rows (None above the largest)."""
    return next((b for b in BUCKETS if b >= rows), None)


@dataclass
class _Graph:
    """Static buffers of one key, and the captured graph (None: run eagerly from the buffers)."""

    inputs: dict[str, torch.Tensor]
    view: CanvasView  # masks and slots are static buffers too; spans fixed
    outputs: object | None = None  # what the captured step returns (static buffers)
    graph: object | None = None  # torch.cuda.CUDAGraph


class StepGraphs:
    """Static-shape denoising steps over one model and cache: one per batch bucket, for the spans of the latest
    step (spans only grow while rows fill, so an older span's graph is dropped with its memory)."""

    INPUTS = ("canvas", "soft", "uniforms", "temperature", "bound", "rule", "fixed")  # per row; "rows" apart

    def __init__(
        self,
        model: DiffusionGemma,
        cache: KVCache,
        step: Callable,
        capture: bool,
        compile: bool = False,
        sampler: Callable | None = None,
    ):
        """`step`: `step.denoise_step`; `capture`: record CUDA graphs (CUDA only), else run from the buffers;
        `compile`: run the denoising step through `torch.compile` (before capture), falling back to eager;
        `sampler`: the step's sampler where it is not `sample_step` (a vocabulary split over ranks)."""
        self.model, self.cache, self.capture, self.sampler = model, cache, capture, sampler
        self.step, self.compiled = (compiled(step), True) if compile else (step, False)
        self.C = model.config.canvas_length
        self._graphs: dict[tuple, _Graph] = {}
        self._view: tuple[tuple, CanvasView] | None = None  # (rows, cache version) -> padded view
        self._pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for every graph

    def describe(self) -> str:
        how = "captured as CUDA graphs" if self.capture else "from static buffers (eager)"
        how += ", the denoising step compiled (torch.compile)" if self.compiled else ""
        buckets = "/".join(map(str, BUCKETS))
        steps = "denoising steps, commit encodes and AR steps"
        return f"{steps} {how} per batch bucket {buckets}, key spans rounded to {SPAN_BUCKET}"

    def fits(self, rows: int, tokens: int | None = None) -> bool:
        """Whether a step of `rows` rows can run here: a bucket holds them and their `tokens` each (default: a
        canvas) fit their cache slots."""
        return bucket(rows) is not None and self.cache.fits_in_place(self.C if tokens is None else tokens)

    def run(self, rows: list[int], x: StepInputs, frontier: Frontier | None = None) -> StepOut:
        """One step of R rows at cache `rows` from `x` (its `rows` field is ignored: the static buffer is used;
        `soft` None means no signal yet). Returns the R rows' StepOut: canvas, argmax, counts and entropies are
        copies, `probs` a view of a static buffer, valid until the next step. With `frontier` (constrained rows),
        the step runs from the buffers uncaptured and the hook sees the R real rows' logits."""
        R, B = len(rows), bucket(len(rows))
        padded = rows + [rows[0]] * (B - R)
        view = self._padded_view(padded)
        g = self._graph(("denoise", B), view, lambda: self._new(B, view))
        self._load(g, padded, view, {name: getattr(x, name) for name in self.INPUTS})
        if frontier is None:
            out = self._replay(g, lambda: self._eager(g))
        else:  # the host extends the real rows' frontiers; padded rows copy the first row's positions
            out = self._eager(g, lambda logits: _pad(frontier(logits[:R]), B))
        return StepOut(
            out.canvas[:R].clone(),
            out.argmax[:R].clone(),
            out.probs[:R],
            out.accepted[:R].clone(),
            out.mean_entropy[:R].clone(),
        )

    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One autoregressive step of R rows at cache `rows`: tokens (R, 1) -> next-token logits (R, V), a view of a
        static buffer valid until the next step. The tokens' slots are committed (host lengths advance by one)."""
        return self._causal(rows, tokens, [1] * len(rows), head=True)

    def commit(self, rows: list[int], tokens: torch.Tensor, n_new: list[int]) -> None:
        """Encode committed canvases: tokens (R, C), the first `n_new[i]` of row i kept (the rest are written into
        slots that stay unrecorded, so nothing ever sees them)."""
        self._causal(rows, tokens, n_new, head=False)

    def _causal(self, rows: list[int], tokens: torch.Tensor, n_new: list[int], head: bool) -> torch.Tensor | None:
        """A causal pass (`model.encode` over a static view) from static buffers per (bucket, length); with `head`,
        the last position's logits. Then the real rows' first `n_new` slots are committed, from what the host knows."""
        (R, T), B, dev, model = tokens.shape, bucket(len(rows)), self.cache.device, self.model
        padded = rows + [rows[0]] * (B - R)
        idx = torch.tensor(padded, device=dev)
        view = self.cache.causal_view(T, idx, round_span=SPAN_BUCKET)
        zeros = torch.zeros(B, T, dtype=torch.long, device=dev)
        g = self._graph(("causal", B, T, head), view, lambda: _Graph({"tokens": zeros}, _copy(view)))
        self._load(g, padded, view, {"tokens": tokens})

        def step() -> torch.Tensor:
            x = model.encode(g.inputs["tokens"], self.cache, rows=g.inputs["rows"], view=g.view)
            return model.logits(x[:, -1]) if head else x

        out = self._replay(g, step)
        real = idx[:R]
        positions = self.cache.lengths[real][:, None] + torch.arange(T, device=dev)[None, :]
        n = torch.tensor(n_new, device=dev)
        keep = torch.arange(T, device=dev)[None, :] < n[:, None]
        slots = {s: torch.where(keep, t[:R], self.cache.pos[s].shape[1] - 1) for s, t in view.slots.items()}
        self.cache.commit(slots, positions, keep, n, real, host=dict(zip(rows, n_new)))
        return out[:R] if head else None

    def _graph(self, key: tuple, view: CanvasView, new: Callable[[], _Graph]) -> _Graph:
        """The graph of `key` for this view's spans; a new one (`new()`, given its cache-row buffer here) replaces it
        when the cache grew past a span bucket, so memory stays bounded."""
        g = self._graphs.get(key)
        if g is None or g.view.span != view.span:
            g = self._graphs[key] = new()
            B = view.slots[True].shape[0]
            g.inputs["rows"] = torch.zeros(B, dtype=torch.long, device=self.cache.device)
        return g

    @staticmethod
    def _load(g: _Graph, padded: list[int], view: CanvasView, inputs: dict[str, torch.Tensor | None]) -> None:
        """Copy a step's inputs into the static buffers: the R real rows, then copies of the first up to the bucket."""
        g.inputs["rows"].copy_(torch.tensor(padded))
        for name, t in inputs.items():
            dst = g.inputs[name]
            if t is None:
                dst.zero_()  # a zero soft embedding is no signal
                continue
            R = t.shape[0]
            dst[:R].copy_(t)
            dst[R:].copy_(t[:1].expand(len(padded) - R, *t.shape[1:]))
        for s in view.span:
            g.view.slots[s].copy_(view.slots[s])
            g.view.masks[s].copy_(view.masks[s])

    def _padded_view(self, rows: list[int]) -> CanvasView:
        """The in-place canvas view of the padded rows (masks always tensors, spans rounded), built once per canvas."""
        key = (tuple(rows), self.cache.version)
        if self._view is None or self._view[0] != key:
            idx = torch.tensor(rows, device=self.cache.device)
            self._view = (key, self.cache.decoder_masks(self.C, idx, in_place=True, round_span=SPAN_BUCKET))
        return self._view[1]

    def _new(self, B: int, view: CanvasView) -> _Graph:
        """Zeroed static buffers for a bucket of B rows and this view's spans (`_graph` adds the cache rows' buffer)."""
        m, dev, C = self.model, self.cache.device, self.C
        inputs = {
            "canvas": torch.zeros(B, C, dtype=torch.long, device=dev),
            "soft": torch.zeros(B, C, m.text.hidden_size, dtype=m.dtype, device=dev),
            "uniforms": torch.zeros(B, 2 * C, dtype=torch.float64, device=dev),
            "temperature": torch.ones(B, dtype=torch.float32, device=dev),
            "bound": torch.zeros(B, dtype=torch.float32, device=dev),
            "rule": torch.zeros(B, dtype=torch.long, device=dev),
            "fixed": torch.full((B, C), -1, dtype=torch.long, device=dev),
        }
        return _Graph(inputs, _copy(view))

    def _replay(self, g: _Graph, step: Callable[[], object]):
        """Run `step` (the step from `g`'s static buffers): replayed once captured; captured on first use on CUDA."""
        if g.graph is not None:
            g.graph.replay()
            return g.outputs
        if not self.capture:
            return step()
        try:
            return self._capture(g, step)
        except Exception as e:  # an op that cannot be captured: keep serving, from the static buffers eagerly
            logger.warning("dgemma: CUDA graph capture failed (%s: %s); steps run eagerly", type(e).__name__, e)
            self.capture, g.graph, g.outputs = False, None, None
            return step()

    def _capture(self, g: _Graph, step: Callable[[], object]):
        # Warm up on a side stream (allocator, lazily built tables), then capture; warm-up steps only write keys and
        # values into future cache slots, the same values the captured step writes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self._pool):
            g.outputs = step()
        g.graph.replay()
        return g.outputs

    def _eager(self, g: _Graph, frontier: Frontier | None = None) -> StepOut:
        i = g.inputs
        x = StepInputs(*(i[name] for name in self.INPUTS), rows=i["rows"])
        return self.step(self.model, self.cache, x, g.view, None, frontier, self.sampler)


def _pad(t: torch.Tensor, B: int) -> torch.Tensor:
    """Rows of `t` up to B, the first row repeated (padded rows copy the first real row)."""
    return torch.cat([t, t[:1].expand(B - t.shape[0], *t.shape[1:])]) if B > t.shape[0] else t


def _copy(view: CanvasView) -> CanvasView:
    """Static copies of a view's masks and slots (the same spans)."""
    return CanvasView(
        {s: t.clone() for s, t in view.masks.items()}, {s: t.clone() for s, t in view.slots.items()}, view.span
    )


def compiled(fn: Callable) -> Callable:
    """`fn` through `torch.compile(fullgraph=True)` (the step has no host synchronisation to break the graph; one
    compilation per bucket and span). If compiling fails, a warning, and `fn` itself from then on."""
    state = {"fn": torch.compile(fn, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as e:
            if state["fn"] is fn:
                raise
            logger.warning("dgemma: torch.compile of the step failed (%s: %s); it runs eagerly", type(e).__name__, e)
            state["fn"] = fn
            return fn(*args)

    return run
