"""The engine: token ids in, a stream of events out.

A step machine over a fixed pool of cache rows. `add_request` queues work; each `step()` admits waiting requests
into free rows, prefills one prompt chunk per prefilling row, runs ONE batched denoising step for every row that is
denoising a canvas (rows may be at different steps: a request joins at the next step, a finished one leaves without
stalling the others), and one batched token step for rows in autoregressive mode. A canvas that has converged is
committed: its argmax tokens are emitted and encoded into the cache, and a new canvas starts from noise.

Everything non-streaming (`generate`) is built on `stream`, which is built on `step`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

from .cache import KVCache
from .model import DiffusionGemma, expert_kernel
from .quant import FP8
from .params import SamplingParams, resolve
from .sampler import (ACCEPTANCE, SCHEDULES, STOPPING, StepOut, draw_uniforms, entropy_bound_accept, reference_denoise,
                      sample_step)

FinishReason = Literal["stop", "length", "abort"]
SAMPLER_MEMORY = 1 << 30  # default byte budget of the sampler's (rows, canvas, vocab) buffers
CLOSING_SLACK = 8  # spare tokens kept when a closing path is forced: one token can lengthen it by several


def check_context(prompt_len: int, params: SamplingParams, limit: int, canvas: int) -> None:
    """Raise ValueError unless the whole budget fits the context: every token but the last is encoded (AR), every
    canvas but the last is committed (diffusion: the budget counts in whole canvases)."""
    if prompt_len >= limit:
        raise ValueError(f"prompt has {prompt_len} tokens; the context length is {limit} tokens")
    if params.mode == "ar":
        need = prompt_len + params.max_new_tokens - 1
    else:
        need = prompt_len + (-(-params.max_new_tokens // canvas) - 1) * canvas
    if need > limit:
        whole = "" if params.mode == "ar" else f"; diffusion generates whole canvases of {canvas}"
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the context "
                         f"length ({limit} tokens{whole})")


def denoise_step(model: DiffusionGemma, cache: KVCache, canvas: torch.Tensor, soft: torch.Tensor | None,
                 uniforms: torch.Tensor, temperature: torch.Tensor, bound: torch.Tensor,
                 masks: dict[bool, torch.Tensor | None], rows: torch.Tensor | None = None,
                 accept: Callable = entropy_bound_accept) -> tuple[StepOut, torch.Tensor]:
    """One whole denoising step of unconstrained rows, with no host synchronisation and no data-dependent shape, so
    a CUDA graph or `torch.compile(fullgraph=True)` can capture it: decoder pass, LM head, sampling at every position
    from the drawn `uniforms` (R, 2C), and the next self-conditioning input (R, C, hidden). `masks` from
    `cache.decoder_masks` (built once per canvas). The engine's `_denoise` does this work tile by tile, with
    constraints, on the accepted-only sampling path (the same tokens)."""
    hidden = model.denoise(canvas, cache, soft=soft, rows=rows, masks=masks, hidden_only=True)
    out = sample_step(model.logits(hidden), canvas, temperature, bound, accept, uniforms, model.config.vocab_size,
                      all_positions=True)
    return out, model.soft_embedding(out.probs)


@dataclass
class Event:
    """One thing that happened to a request. `kind`: 'draft' (current argmax canvas, not final), 'tokens' (newly
    committed tokens), 'finished' (last event of the request, with its finish_reason and metrics)."""

    request_id: str
    kind: Literal["draft", "tokens", "finished"]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Req:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    template: torch.Tensor | None = None  # (n_template,) fixed ids per canvas position, -1 free
    row: int = -1
    state: Literal["waiting", "prefill", "denoise", "ar", "done"] = "waiting"
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    canvas: torch.Tensor | None = None
    has_sc: bool = False  # the row's self-conditioning buffer holds the previous step's probabilities
    steps_left: int = 0
    passes: int = 0
    canvases: int = 0
    ar_steps: int = 0
    next_token: int | None = None
    t_arrival: float = 0.0
    t_first: float | None = None
    want_drafts: bool = False
    stopping: str = "stable_confident"
    guide: Any = None  # constraints.Guide: the matcher at the committed frontier (structured output)
    frontier: int = 0  # canvas positions [0, frontier) are validated and frozen
    out_of_budget: bool = False  # a constrained row used its whole max_new_tokens
    error: str | None = None  # the constraint failed mid-way (a resource limit): the request is aborted
    closing_len: int | None = None  # length of the last closing path found (structured output)
    suffix: torch.Tensor | None = None  # infilling: ids placed right after the middle's room


class Engine:
    """Continuous-batching generation over one `DiffusionGemma` model and one preallocated `KVCache`."""

    def __init__(self, model: DiffusionGemma, generation_config: dict[str, Any] | None = None, max_batch: int = 8,
                 max_model_len: int | None = None, prefill_chunk: int = 1024, guides: Any = None,
                 sampler_memory: int = SAMPLER_MEMORY):
        """`guides`: a `constraints.GuideFactory` for this model's tokenizer (structured output needs one).
        `sampler_memory`: bytes for the sampler's (rows, canvas, vocab) buffers; rows are sampled in tiles that fit,
        so memory does not grow with the batch (one row at least)."""
        self.model = model
        self.guides = guides
        self.config = model.config
        self.gen_config = dict(generation_config or {})
        self.canvas_length = self.config.canvas_length
        self.vocab_size = self.config.text.vocab_size
        self.max_model_len = max_model_len or min(self.config.text.max_position_embeddings, 8192)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        lowp = 0 if model.dtype == torch.float32 else model.dtype.itemsize  # + a low-precision LM-head output
        # float32 logits and probabilities per row
        self.sampler_row_bytes = self.canvas_length * self.vocab_size * (8 + lowp)
        self.tile = max(1, min(max_batch, sampler_memory // self.sampler_row_bytes))
        # One canvas of headroom past the context limit: the last canvas is encoded only if generation goes on.
        self.cache = model.new_cache(max_batch, self.max_model_len, slack=self.canvas_length)
        self.eos = set(self.config.text.eos_token_ids)
        pad = self.config.text.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos)
        g_eos = self.gen_config.get("eos_token_id")
        if g_eos is not None:
            self.eos |= set(g_eos if isinstance(g_eos, list) else [g_eos])
        self.waiting: deque[_Req] = deque()
        self.rows: list[_Req | None] = [None] * max_batch
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens held in each cache row
        self._ids = itertools.count()
        self.stats = {"decoder_passes": 0, "encoder_passes": 0, "steps": 0}
        self._mask_key: tuple | None = None
        self._workspace: dict[str, torch.Tensor] = {}
        self._stoppers: dict[str, Any] = {}
        self._masks: dict | None = None

    def describe(self) -> str:
        """Which kernels run the steps (the start-up report)."""
        w = self.model.layers[0].experts.gate_up_proj
        if w.dtype == FP8:
            kernel = "fp8 grouped" if w.device.type == "cuda" else "fp8 per-expert"
        else:
            with torch.no_grad():
                kernel = expert_kernel(w)
        gib = self.tile * self.sampler_row_bytes / 2 ** 30
        return (f"kernels: experts {kernel}; attention SDPA, canvas GQA folded into queries; sampler {self.tile} "
                f"row(s) per tile ({gib:.2f} GiB of (rows, canvas, vocab) buffers); steps eager")

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None,
                    stream_drafts: bool = False) -> str:
        """Queue a request; raises ValueError for a bad prompt or parameters (the engine state is unchanged)."""
        params = resolve((params or SamplingParams()).validate(self.vocab_size), self.gen_config)
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        check_context(len(prompt_ids), params, self.max_model_len, self.canvas_length)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        g = torch.Generator(device=self.model.device)
        g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)).item()))
        tmpl = None
        if params.template is not None:  # ids were checked by validate(); only the canvas length is ours to check
            if len(params.template) > self.canvas_length:
                raise ValueError(f"invalid template: {len(params.template)} positions, the canvas has "
                                 f"{self.canvas_length}")
            tmpl = torch.full((self.canvas_length,), -1, dtype=torch.long, device=self.model.device)
            tmpl[:len(params.template)] = torch.tensor(params.template, dtype=torch.long)
        req = _Req(rid, list(prompt_ids), params, g, template=tmpl, t_arrival=time.perf_counter(),
                   want_drafts=stream_drafts)
        constraint = params.constraint()
        if constraint is not None:
            if self.guides is None:
                raise ValueError("structured output needs the model's tokenizer (tokenizer.json)")
            req.guide = self.guides.guide(constraint)  # compiled and checked now: errors reach the caller
        if params.suffix_token_ids is not None:  # may be longer than a canvas: the part that fits is visible
            req.suffix = torch.tensor(params.suffix_token_ids, dtype=torch.long, device=self.model.device)
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its row is freed at once. Returns False if it is unknown."""
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.rows:
            if r is not None and r.id == request_id:
                self._release(r)
                return True
        return False

    def finish_request(self, request_id: str, reason: FinishReason = "stop",
                       completion_tokens: int | None = None) -> Event | None:
        """End a running request now (e.g. a stop string matched); returns its 'finished' event with metrics."""
        for r in self.rows:
            if r is not None and r.id == request_id:
                if completion_tokens is not None:
                    del r.output[completion_tokens:]
                events: list[Event] = []
                self._finish(r, reason, events)
                return events[0]
        self.abort(request_id)
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.rows)

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Advance every running request by one unit of work; returns the events produced."""
        events: list[Event] = []
        self._admit()
        with torch.inference_mode():
            self._prefill(events)
            self._denoise(events)
            self._ar(events)
        self.stats["steps"] += 1
        return events

    def stream(self) -> Iterator[Event]:
        """Run until every queued request has finished, yielding events as they happen."""
        while self.has_unfinished():
            yield from self.step()

    # -- admission & prefix reuse -------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and None in self.rows:
            req = self.waiting.popleft()
            free = [i for i, r in enumerate(self.rows) if r is None]
            # Prefer the free row whose cached tokens are the longest prefix of this prompt (multi-turn chat).
            best, best_len = free[0], 0
            for i in free:
                toks = self.row_tokens[i]
                n = len(toks)
                if 0 < n < len(req.prompt) and n > best_len and req.prompt[:n] == toks:
                    best, best_len = i, n
            req.row = best
            if best_len == 0:
                self.cache.reset_rows([best])
                self.row_tokens[best] = []
            req.prefilled = best_len
            req.state = "prefill"
            self.rows[best] = req

    def _release(self, req: _Req) -> None:
        req.state = "done"
        self.rows[req.row] = None

    # -- prefill --------------------------------------------------------------------------------------------------
    def _prefill(self, events: list[Event]) -> None:
        reqs = [r for r in self.rows if r is not None and r.state == "prefill"]
        if not reqs:
            return
        chunks = [r.prompt[r.prefilled:r.prefilled + self.prefill_chunk] for r in reqs]
        T = max(len(c) for c in chunks)
        dev = self.model.device
        tokens = torch.zeros(len(reqs), T, dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        n_new = torch.tensor([len(c) for c in chunks], dtype=torch.long, device=dev)
        rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev)
        need_logits = any(r.params.mode == "ar" and r.prefilled + len(c) == len(r.prompt) for r, c in zip(reqs, chunks))
        hidden = self.model.encode(tokens, self.cache, n_new=n_new, rows=rows, last_only=True)
        self.stats["encoder_passes"] += 1
        logits = self.model.logits(hidden)[:, 0] if need_logits else None
        for i, (r, c) in enumerate(zip(reqs, chunks)):
            r.prefilled += len(c)
            self.row_tokens[r.row].extend(c)
            if r.prefilled < len(r.prompt):
                continue
            if r.params.mode == "ar":
                r.state = "ar"
                self._ar_emit(r, logits[i:i + 1], events)
            else:
                self._new_canvas(r)

    def _new_canvas(self, r: _Req) -> None:
        r.state = "denoise"
        r.canvas = torch.randint(0, self.vocab_size, (self.canvas_length,), generator=r.generator,
                                 device=self.model.device)
        if r.guide is not None:  # structured output: a frontier of validated, frozen positions grows from 0
            r.template = torch.full((self.canvas_length,), -1, dtype=torch.long, device=self.model.device)
            r.frontier = 0
        elif r.suffix is not None:
            # Infilling: the suffix sits right after the middle's room (max_new_tokens), padding after it, all fixed
            # and visible to every step of the canvas that holds them.
            C, m, S = self.canvas_length, r.params.max_new_tokens, len(r.suffix)
            pos = r.canvases * C + torch.arange(C, device=self.model.device)  # output offsets of this canvas
            tmpl = torch.full((C,), -1, dtype=torch.long, device=self.model.device)
            inside = (pos >= m) & (pos < m + S)
            tmpl[inside] = r.suffix[(pos[inside] - m)]
            tmpl[pos >= m + S] = self.pad_id
            r.template = tmpl if bool((tmpl >= 0).any()) else None
        if r.template is not None:
            r.canvas = torch.where(r.template >= 0, r.template, r.canvas)
        r.has_sc = False
        r.steps_left = r.params.max_denoising_steps
        r.stopping = "none" if r.params.fixed_steps else r.params.stopping
        self._stopper(r.stopping).reset(torch.tensor([r.row], device=self.model.device),
                                        r.params.stability_threshold, float(r.params.confidence_threshold))

    def _stopper(self, name: str):
        """One stop-rule object per rule, over all cache rows."""
        if name not in self._stoppers:
            n = self.max_batch
            self._stoppers[name] = STOPPING[name](n, self.canvas_length, torch.ones(n, dtype=torch.long),
                                                  torch.zeros(n), self.model.device)
        return self._stoppers[name]

    # -- diffusion ------------------------------------------------------------------------------------------------
    def _denoise(self, events: list[Event]) -> None:
        """One denoising step for every row with a canvas: one decoder pass, then the LM head, the sampler and the
        next self-conditioning input, tile by tile (rows sharing an acceptance rule, `self.tile` at a time)."""
        reqs = [r for r in self.rows if r is not None and r.state == "denoise"]
        if not reqs:
            return
        dev = self.model.device
        rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev)
        all_rows = len(reqs) == self.max_batch and all(r.row == i for i, r in enumerate(reqs))
        rows_arg = None if all_rows else rows
        key = (tuple(r.row for r in reqs), self.cache.version)
        if key != self._mask_key:  # masks change only when rows join/leave or the cache grows
            self._mask_key, self._masks = key, self.cache.decoder_masks(self.canvas_length, rows_arg)
        canvas = torch.stack([r.canvas for r in reqs])
        hidden = self.model.denoise(canvas, self.cache, soft=self._soft_input(reqs, rows_arg), rows=rows_arg,
                                    masks=self._masks, hidden_only=True)  # (R, C, hidden)
        self.stats["decoder_passes"] += 1
        temp, bound = self._temperatures(reqs)
        commits: list[tuple[_Req, torch.Tensor]] = []
        for rule, idx in self._tiles(reqs):
            tile = [reqs[i] for i in idx]
            sel = torch.tensor(idx, device=dev)
            pick = (lambda t: t) if len(idx) == len(reqs) else (lambda t: t[sel])  # noqa: E731 (no copy when whole)
            logits = self._head(pick(hidden))
            template = self._templates(tile, logits, pick(temp), pick(bound))
            u = draw_uniforms([r.generator for r in tile], self.canvas_length, dev)
            out = sample_step(logits, pick(canvas), pick(temp), pick(bound), ACCEPTANCE[rule], u, self.vocab_size,
                              template, probs_out=self._tile_buffer("probs", len(idx), torch.float32))
            soft = self._buffer("soft", (self.max_batch, *hidden.shape[1:]), self.model.dtype, zero=True)
            soft[pick(rows)] = self.model.soft_embedding(out.probs)
            self._after_step(tile, out, events, commits)
        if commits:
            # Encode all committed canvases in one encoder pass, so the next canvases see them as context.
            rows = torch.tensor([r.row for r, _ in commits], dtype=torch.long, device=dev)
            self.model.encode(torch.stack([a for _, a in commits]), self.cache, rows=rows, last_only=True)
            self.stats["encoder_passes"] += 1
            for r, a in commits:
                self.row_tokens[r.row].extend(a.tolist())
                self._new_canvas(r)

    def _soft_input(self, reqs: list[_Req], rows: torch.Tensor | None) -> torch.Tensor | None:
        """The self-conditioning input (R, C, hidden) of this step: the previous step's soft embeddings, zero for
        rows on the first step of a canvas; None when no row has a previous step."""
        if not any(r.has_sc for r in reqs):
            return None
        soft = self._buffer("soft", (self.max_batch, self.canvas_length, self.config.text.hidden_size),
                            self.model.dtype, zero=True)
        for r in reqs:
            if not r.has_sc:  # a zero soft embedding is a zero signal
                soft[r.row].zero_()
        return soft if rows is None else soft[rows]

    def _temperatures(self, reqs: list[_Req]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row temperature from each row's schedule and step, and entropy bound: (R,), (R,) on the device."""
        p0 = [r.params for r in reqs]
        N = torch.tensor([p.max_denoising_steps for p in p0], dtype=torch.float32)
        n = torch.tensor([r.steps_left for r in reqs], dtype=torch.float32)
        t_min = torch.tensor([p.t_min for p in p0], dtype=torch.float32)
        t_max = torch.tensor([p.t_max for p in p0], dtype=torch.float32)
        temp = torch.empty(len(reqs))
        for name in {p.schedule for p in p0}:  # one call per schedule (usually one)
            sel = torch.tensor([i for i, p in enumerate(p0) if p.schedule == name])
            temp[sel] = SCHEDULES[name](n[sel], N[sel], t_min[sel], t_max[sel])
        dev = self.model.device
        return temp.to(dev), torch.tensor([p.entropy_bound for p in p0], device=dev)

    def _tiles(self, reqs: list[_Req]) -> Iterator[tuple[str, list[int]]]:
        """(acceptance rule, row indices) groups: rows sharing a rule, at most `self.tile` at a time."""
        for rule in sorted({r.params.acceptance for r in reqs}):
            idx = [i for i, r in enumerate(reqs) if r.params.acceptance == rule]
            for start in range(0, len(idx), self.tile):
                yield rule, idx[start:start + self.tile]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over a tile's hidden states (T, C, hidden) -> float32 logits (T, C, V) in a reused buffer."""
        T, lowp = hidden.shape[0], self.model.dtype != torch.float32
        return self.model.logits(hidden, out=self._tile_buffer("logits", T, torch.float32),
                                 scratch=self._tile_buffer("logits_lowp", T, self.model.dtype) if lowp else None)

    def _templates(self, tile: list[_Req], logits: torch.Tensor, temp: torch.Tensor,
                   bound: torch.Tensor) -> torch.Tensor | None:
        """Fixed positions (T, C) of a tile (-1 free), after extending each constrained row's validated frontier
        from its logits (before the sampler consumes them); None when no row has any."""
        for i, r in enumerate(tile):
            if r.guide is not None:
                try:
                    self._advance(r, logits[i], float(temp[i]), float(bound[i]))
                except ValueError as e:  # ConstraintError: a limit tripped; this request ends, the batch goes on
                    r.error, r.out_of_budget = str(e), True
        if all(r.template is None for r in tile):
            return None
        free = torch.full((self.canvas_length,), -1, dtype=torch.long, device=self.model.device)
        return torch.stack([r.template if r.template is not None else free for r in tile])

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        """A persistent workspace tensor (allocated on first use)."""
        b = self._workspace.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=self.model.device)
            self._workspace[name] = b
        return b

    def _tile_buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `rows` rows of a persistent (tile, C, V) workspace tensor."""
        return self._buffer(name, (self.tile, self.canvas_length, self.vocab_size), dtype)[:rows]

    def _after_step(self, reqs: list[_Req], out, events: list[Event], commits: list) -> None:
        """Advance each row's state after a sampler step; converged canvases are emitted and queued to commit."""
        done = torch.zeros(len(reqs), dtype=torch.bool)
        for name in {r.stopping for r in reqs}:  # one call per stop rule (usually one)
            idx = [i for i, r in enumerate(reqs) if r.stopping == name]
            sel = torch.tensor(idx, device=out.argmax.device)
            rows = torch.tensor([reqs[i].row for i in idx], device=out.argmax.device)
            done[idx] = self._stopper(name)(rows, out.argmax[sel], out.mean_entropy[sel]).cpu()
        for i, r in enumerate(reqs):
            r.passes += 1
            r.steps_left -= 1
            if r.guide is not None:  # a constrained canvas is done when its frontier is (never by the stop rule)
                done[i] = r.frontier >= self.canvas_length or r.out_of_budget
                r.steps_left = max(r.steps_left, 1)
            r.canvas = out.canvas[i]
            r.has_sc = True
            if r.want_drafts:
                events.append(Event(r.id, "draft", out.argmax[i].tolist()))
            if r.error is not None:
                self._finish(r, "abort", events)
                continue
            if done[i] or r.steps_left == 0:
                if self._emit_canvas(r, out.argmax[i], events):
                    commits.append((r, out.argmax[i]))

    def _emit_canvas(self, r: _Req, argmax: torch.Tensor, events: list[Event]) -> bool:
        """A canvas has converged: emit its tokens; True if generation goes on (the canvas must be committed)."""
        r.canvases += 1
        toks = argmax.tolist()
        stop_ids = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos)
        budget = r.params.max_new_tokens - len(r.output)
        reason: FinishReason | None = None
        if r.suffix is not None:  # a middle ends at EOS or padding (or where the suffix begins: the budget)
            stop_ids = stop_ids | {self.pad_id}
        if r.guide is not None:  # a constrained canvas holds EOS only as the fill after the grammar completed
            stop_ids = stop_ids | self.eos
        cut = next((j for j, t in enumerate(toks) if t in stop_ids), None)
        if cut is not None and cut < budget:
            toks, reason = toks[:cut], "stop"
        elif r.guide is not None and r.guide.finished and len(toks) <= budget:
            reason = "stop"  # the grammar completed exactly at the canvas end
        elif len(toks) >= budget:
            toks, reason = toks[:budget], "length"
        elif len(r.prompt) + len(r.output) + 2 * self.canvas_length > self.max_model_len + self.canvas_length:
            reason = "length"  # no room to encode this canvas and denoise another
        self._emit(r, toks, events)
        if reason is not None:
            self._finish(r, reason, events)
            return False
        return True

    def _emit(self, r: _Req, toks: list[int], events: list[Event]) -> None:
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.output.extend(toks)
        if toks:
            events.append(Event(r.id, "tokens", toks))

    def _finish(self, r: _Req, reason: FinishReason, events: list[Event]) -> None:
        now = time.perf_counter()
        forwards = r.passes if r.params.mode == "diffusion" else r.ar_steps
        events.append(Event(r.id, "finished", [], reason, {
            "prompt_tokens": len(r.prompt),
            "completion_tokens": len(r.output),
            "decoder_passes": r.passes,
            "canvases": r.canvases,
            "denoising_steps": r.passes,
            "steps_per_canvas": r.passes / r.canvases if r.canvases else 0.0,
            "forwards": forwards,
            "tokens_per_forward": len(r.output) / forwards if forwards else 0.0,
            "ttft_s": (r.t_first or now) - r.t_arrival,
            "latency_s": now - r.t_arrival,
            "mode": r.params.mode,
            **({"error": r.error} if r.error else {}),
        }))
        self._release(r)

    # -- structured output ----------------------------------------------------------------------------------------
    def _closing_margin(self, r: _Req) -> int:
        """Tokens left below which a constrained row watches for the point where it must close."""
        return max(8, min(64, r.params.max_new_tokens // 4))

    def _constrained_token(self, r: _Req, logits: torch.Tensor, temperature: float) -> tuple[int, float]:
        """Sample the next token at the frontier from `logits` (V,) masked to what the grammar allows; returns the
        token and the masked distribution's entropy (the acceptance rule's input)."""
        allowed = r.guide.allowed()
        x = logits.float() / max(temperature, 1e-6)
        x = x.masked_fill(~allowed.to(x.device), float("-inf"))
        logp = torch.log_softmax(x, dim=-1)
        p = logp.exp()
        entropy = float(-(p * logp.masked_fill(p == 0, 0)).sum())
        if temperature <= 0:
            return int(x.argmax()), entropy
        return int(torch.multinomial(p, 1, generator=r.generator)), entropy

    def _next_forced(self, r: _Req, left: int) -> list[int]:
        """Tokens to place without sampling: a pending closing path, or what the grammar forces.

        Within the closing margin, a short completion is searched now and then (whenever the tokens left come
        within twice the last path's length, and every 8 tokens); once it only just fits, it is forced."""
        g = r.guide
        if not g.pending and left <= self._closing_margin(r) and (
                r.closing_len is None or left <= 2 * r.closing_len + 8 or left % 8 == 0):
            path = g.closing_path(left)
            if path is not None and len(path) + CLOSING_SLACK >= left:
                g.pending = path
            r.closing_len = len(path) if path is not None else left
        if g.pending:
            return [g.pending.pop(0)]
        return g.forced()

    def _advance(self, r: _Req, logits: torch.Tensor, temperature: float, bound: float) -> None:
        """Extend a constrained row's frontier by one entropy-bounded run of grammar-valid tokens (at least one)."""
        C, g, tmpl = self.canvas_length, r.guide, r.template
        eos = min(self.eos)
        taken, h_sum, h_max = 0, 0.0, 0.0
        while r.frontier < C and not r.out_of_budget:
            left = r.params.max_new_tokens - len(r.output) - r.frontier
            if left <= 0:
                r.out_of_budget = True
                break
            if g.finished:  # complete: the rest of the canvas is EOS, which ends the request
                tmpl[r.frontier:] = eos
                r.frontier = C
                break
            forced = self._next_forced(r, left)
            if forced:
                for t in forced[: C - r.frontier]:
                    g.consume(t)
                    if g.finished and t in self.eos:
                        break
                    tmpl[r.frontier] = t
                    r.frontier += 1
                continue
            tok, h = self._constrained_token(r, logits[r.frontier], temperature)
            if taken and h_sum + h - max(h_max, h) > bound:
                break  # the entropy-bound rule, over the contiguous run from the frontier
            g.consume(tok)
            taken, h_sum, h_max = taken + 1, h_sum + h, max(h_max, h)
            if g.finished and tok in self.eos:
                continue
            tmpl[r.frontier] = tok
            r.frontier += 1

    def _ar_guided(self, r: _Req, logits: torch.Tensor) -> int:
        """The AR baseline under a constraint: mask the next-token logits (greedy or sampled), close when short."""
        g = r.guide
        left = r.params.max_new_tokens - len(r.output)
        forced = self._next_forced(r, left)
        if forced:
            tok = forced[0]  # the rest of a forced run is forced again at the next step
        else:
            tok, _ = self._constrained_token(r, logits, r.params.temperature)
        g.consume(tok)
        return tok

    # -- autoregressive baseline -----------------------------------------------------------------------------------
    def _ar(self, events: list[Event]) -> None:
        reqs = [r for r in self.rows if r is not None and r.state == "ar" and r.next_token is not None]
        if not reqs:
            return
        dev = self.model.device
        rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev)
        tokens = torch.tensor([[r.next_token] for r in reqs], dtype=torch.long, device=dev)
        logits = self.model.logits(self.model.encode(tokens, self.cache, rows=rows))[:, -1]
        self.stats["encoder_passes"] += 1
        for i, r in enumerate(reqs):
            self.row_tokens[r.row].append(r.next_token)
            self._ar_emit(r, logits[i:i + 1], events)

    def _ar_emit(self, r: _Req, logits: torch.Tensor, events: list[Event]) -> None:
        """Pick the next token from next-token logits (1, V); emit it or finish."""
        r.ar_steps += 1
        p = r.params
        if p.temperature == 0:
            tok = int(logits.argmax(-1))
        else:
            lg = logits[0] / p.temperature
            if p.top_k:
                kth = torch.topk(lg, min(p.top_k, lg.numel())).values[-1]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            if p.top_p < 1.0:
                sp, si = torch.sort(lg.softmax(-1), descending=True)
                drop = (sp.cumsum(-1) - sp) > p.top_p
                lg[si[drop]] = float("-inf")
            tok = int(torch.multinomial(lg.softmax(-1), 1, generator=r.generator))
        if r.guide is not None:
            try:
                tok = self._ar_guided(r, logits[0])
            except ValueError as e:  # ConstraintError: a limit tripped; this request ends
                r.error = str(e)
                self._finish(r, "abort", events)
                return
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
        if tok in stop_ids:
            self._finish(r, "stop", events)
            return
        self._emit(r, [tok], events)
        if r.guide is not None and r.guide.finished:  # the token completed the grammar
            self._finish(r, "stop", events)
            return
        if len(r.output) >= p.max_new_tokens or len(r.prompt) + len(r.output) > self.max_model_len:
            self._finish(r, "length", events)
            return
        r.next_token = tok


def reference_generate(model: DiffusionGemma, prompts: list[list[int]], params: SamplingParams, pad_id: int,
                       eos_ids: Iterable[int], generator: torch.Generator | None = None
                       ) -> list[tuple[list[int], FinishReason, int]]:
    """Generate exactly as transformers' `DiffusionGemmaForBlockDiffusion.generate` does: one left-padded batch,
    every row denoised at every step, the same random-number order. With the same seed on CPU in float32 the tokens
    are identical. Returns per prompt (token ids without EOS/padding, finish reason, decoder passes).
    """
    dev, C, V = model.device, model.config.canvas_length, model.config.vocab_size
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long, device=dev)
    visible = torch.zeros(B, T, dtype=torch.bool, device=dev)
    for i, p in enumerate(prompts):  # left padding, as the reference expects; pads still take a position
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        visible[i, T - len(p):] = True
    n_canvases = -(-params.max_new_tokens // C)
    cache = model.new_cache(B, T + n_canvases * C)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=dev)
    outputs: list[list[int]] = [[] for _ in range(B)]
    reasons: list[FinishReason] = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.long, device=dev)
    with torch.inference_mode(), model.reference_kernels():
        model.encode(ids, cache, visible=visible)
        for _ in range(n_canvases):
            masks = cache.decoder_masks(C)
            argmax, p = reference_denoise(lambda c, sc: model.denoise(c, cache, self_cond=sc, masks=masks),
                                          B, C, V, params, dev, model.dtype, generator, skip=done)
            passes += p
            committed = argmax.clone()
            for i in range(B):
                if done[i]:  # finished rows keep running (same random numbers) but commit padding
                    committed[i] = pad_id
                    continue
                toks = argmax[i].tolist()
                hit = torch.isin(argmax[i], eos).nonzero() if eos.numel() else []
                if len(hit):
                    toks = toks[:int(hit[0])]
                    committed[i, int(hit[0]) + 1:] = pad_id  # the reference pads after EOS before encoding
                    done[i] = True
                    reasons[i] = "stop"
                outputs[i].extend(toks)
            if bool(done.all()):
                break
            model.encode(committed, cache)
    result = []
    for i in range(B):
        toks = outputs[i]
        if len(toks) >= params.max_new_tokens:
            toks, reasons[i] = toks[:params.max_new_tokens], "length"
        result.append((toks, reasons[i], int(passes[i])))
    return result
