"""The engine: token ids in, a stream of events out.

A step machine over a fixed pool of cache rows. `add_request` queues work; each `step()` admits waiting requests
into free rows, prefills one prompt chunk per prefilling row, runs ONE batched denoising step for every row that is
denoising a canvas (rows may be at different steps: a request joins at the next step, a finished one leaves without
stalling the others), and one batched token step for rows in autoregressive mode. A canvas that has converged is
committed: its argmax tokens are emitted and encoded into the cache, and a new canvas starts from noise.

A denoising step is five named parts: gather the rows' inputs (`_gather`) and run the decoder pass (`_decode`),
the per-row temperatures (`_temperatures`), sampling tile by tile (`_sample`), the commit (`_after_step`,
`_commit`), and the next self-conditioning input of the rows whose canvas goes on (`_self_condition`).
Structured output is `constraints.ConstraintState`'s work: the engine asks it for each canvas's fixed positions
and hands it each row's logits. A lazily triggered constraint (tool calls under `auto`) starts when its
trigger token is output: the canvas holding it is committed up to the trigger, and the next canvas is constrained.
`add_samples` queues n samples of one prompt: they are admitted together, the first prefills, the others get
copies of its cache row. Token events carry log-probabilities when asked for (dgemma/logprobs.py defines them).
The transformers-exact path is in reference.py.

Everything non-streaming (`generate`) is built on `stream`, which is built on `step`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch

from dgemma.model.cache import CanvasView, KVCache
from dgemma.model.config import token_ids
from dgemma.structured.constraints import Constraint, ConstraintError, ConstraintState
from dgemma.engine.graphs import StepGraphs, bucket
from dgemma.engine.logprobs import TokenLogprob, from_logits
from dgemma.model.modeling import DiffusionGemma, expert_kernel
from dgemma.model.quant import FP8
from dgemma.engine.params import SamplingParams, resolve
from dgemma.engine.sampler import (
    ACCEPTANCE,
    SCHEDULES,
    STOPPING,
    StepOut,
    draw_uniforms,
    entropy_bound_accept,
    sample_step,
)

FinishReason = Literal["stop", "length", "abort"]
SAMPLER_MEMORY = 1 << 30  # default byte budget of the sampler's (rows, canvas, vocab) buffers


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
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the context "
            f"length ({limit} tokens{whole})"
        )


def denoise_step(
    model: DiffusionGemma,
    cache: KVCache,
    canvas: torch.Tensor,
    soft: torch.Tensor | None,
    uniforms: torch.Tensor,
    temperature: torch.Tensor,
    bound: torch.Tensor,
    masks: CanvasView,
    rows: torch.Tensor | None = None,
    accept: Callable = entropy_bound_accept,
) -> tuple[StepOut, torch.Tensor]:
    """One whole denoising step of unconstrained rows, with no host synchronisation and no data-dependent shape, so
    a CUDA graph or `torch.compile(fullgraph=True)` can capture it: decoder pass, LM head, sampling at every position
    from the drawn `uniforms` (R, 2C), and the next self-conditioning input (R, C, hidden). `masks` from
    `cache.decoder_masks(C, rows, in_place=True)` (built once per canvas: the canvas's keys/values go into their
    future cache slots, so no per-layer copy of the cache). The engine's `_denoise` does this work tile by tile, with
    constraints, on the accepted-only sampling path (the same tokens)."""
    hidden = model.denoise(canvas, cache, soft=soft, rows=rows, masks=masks, hidden_only=True)
    out = sample_step(
        model.logits(hidden), canvas, temperature, bound, accept, uniforms, model.config.vocab_size, all_positions=True
    )
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
    logprobs: list[TokenLogprob] | None = None  # per token of a 'tokens' event, when the request asked for them


@dataclass
class _Diffusion:
    """A diffusion request's canvas state (`_Req.diffusion`)."""

    template: torch.Tensor | None = None  # (C,) the request's fixed ids per canvas position, -1 free (inpainting)
    suffix: torch.Tensor | None = None  # infilling: ids placed right after the middle's room
    want_drafts: bool = False
    canvas: torch.Tensor | None = None  # (C,) the canvas being denoised
    fixed: torch.Tensor | None = None  # (C,) this canvas's fixed ids (template, suffix, constraint frontier), -1 free
    has_sc: bool = False  # the row's self-conditioning buffer holds the previous step's probabilities
    steps_left: int = 0
    stopping: str = "stable_confident"
    passes: int = 0
    canvases: int = 0


@dataclass
class _AR:
    """An autoregressive request's state (`_Req.ar`)."""

    next_token: int | None = None  # the last token picked, encoded at the next step
    steps: int = 0


@dataclass
class _Req:
    """A request: its core, and the state of its mode (`diffusion` or `ar`) and of its constraint, if any."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    t_arrival: float
    row: int = -1
    state: Literal["waiting", "prefill", "follow", "denoise", "ar", "done"] = "waiting"
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    t_first: float | None = None
    error: str | None = None  # the constraint failed mid-way (a resource limit): the request is aborted
    diffusion: _Diffusion | None = None
    ar: _AR | None = None
    constraint: ConstraintState | None = None  # structured output (constraints.py owns it)
    lazy: Constraint | None = None  # a constraint that starts when its trigger token is output (tool calls)
    leader: _Req | None = None  # n > 1: the sibling whose prefill this request shares
    followers: list[_Req] = field(default_factory=list)  # n > 1: the siblings waiting for this request's prefill


@dataclass
class _Batch:
    """One denoising step's inputs for R rows, gathered once and sampled tile by tile."""

    reqs: list[_Req]
    rows: torch.Tensor  # (R,) cache rows
    rows_arg: torch.Tensor | None  # the rows the model reads; None when they are all cache rows in order
    canvas: torch.Tensor  # (R, C)
    temp: torch.Tensor  # (R,) temperatures
    bound: torch.Tensor  # (R,) entropy bounds
    hidden: torch.Tensor | None = None  # (R, C, hidden) from the decoder pass


class _StopRules:
    """The stop rules in use: one object per rule over all cache rows (built on first use)."""

    def __init__(self, rows: int, canvas: int, device: torch.device):
        self.rows, self.canvas, self.device = rows, canvas, device
        self._rules: dict[str, Any] = {}

    def rule(self, name: str) -> Any:
        if name not in self._rules:
            n = self.rows
            self._rules[name] = STOPPING[name](
                n, self.canvas, torch.ones(n, dtype=torch.long), torch.zeros(n), self.device
            )
        return self._rules[name]

    def reset(self, r: _Req) -> None:
        """A new canvas on the request's row, under its rule and thresholds."""
        self.rule(r.diffusion.stopping).reset(
            torch.tensor([r.row], device=self.device),
            r.params.stability_threshold,
            float(r.params.confidence_threshold),
        )

    def converged(self, reqs: list[_Req], out: StepOut) -> torch.Tensor:
        """Which rows' canvases their rules call converged after a step (R,) on the host: one call per rule."""
        done = torch.zeros(len(reqs), dtype=torch.bool)
        for name in {r.diffusion.stopping for r in reqs}:
            idx = [i for i, r in enumerate(reqs) if r.diffusion.stopping == name]
            sel = torch.tensor(idx, device=out.argmax.device)
            rows = torch.tensor([reqs[i].row for i in idx], device=out.argmax.device)
            done[idx] = self.rule(name)(rows, out.argmax[sel], out.mean_entropy[sel]).cpu()
        return done


def _temperatures(reqs: list[_Req], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature from each row's schedule and step, and entropy bound: (R,), (R,) on the device."""
    p0 = [r.params for r in reqs]
    N = torch.tensor([p.max_denoising_steps for p in p0], dtype=torch.float32)
    n = torch.tensor([r.diffusion.steps_left for r in reqs], dtype=torch.float32)
    t_min = torch.tensor([p.t_min for p in p0], dtype=torch.float32)
    t_max = torch.tensor([p.t_max for p in p0], dtype=torch.float32)
    temp = torch.empty(len(reqs))
    for name in {p.schedule for p in p0}:  # one call per schedule (usually one)
        sel = torch.tensor([i for i, p in enumerate(p0) if p.schedule == name])
        temp[sel] = SCHEDULES[name](n[sel], N[sel], t_min[sel], t_max[sel])
    return temp.to(device), torch.tensor([p.entropy_bound for p in p0], device=device)


def _tiles(reqs: list[_Req], tile: int) -> Iterator[tuple[str, list[int]]]:
    """(acceptance rule, row indices) groups: rows sharing a rule, at most `tile` at a time."""
    for rule in sorted({r.params.acceptance for r in reqs}):
        idx = [i for i, r in enumerate(reqs) if r.params.acceptance == rule]
        for start in range(0, len(idx), tile):
            yield rule, idx[start : start + tile]


class Engine:
    """Continuous-batching generation over one `DiffusionGemma` model and one preallocated `KVCache`."""

    def __init__(
        self,
        model: DiffusionGemma,
        generation_config: dict[str, Any] | None = None,
        max_batch: int = 8,
        max_model_len: int | None = None,
        prefill_chunk: int = 1024,
        guides: Any = None,
        sampler_memory: int | None = None,
        graphs: bool | None = None,
        compile: bool = False,
    ):
        """`guides`: a `constraints.GuideFactory` for this model's tokenizer (structured output needs one).
        `sampler_memory`: bytes for the sampler's (rows, canvas, vocab) buffers; rows are sampled in tiles that fit,
        so memory does not grow with the batch (one row at least). Default: 1 GiB, or on CUDA an eighth of the
        device memory still free once the cache is allocated, if more (a graph bucket must fit it).
        `graphs`: run unconstrained steps from static buffers per batch bucket (graphs.py), captured as CUDA graphs
        on CUDA; None (default): on CUDA only. A bucket must fit `sampler_memory`, so raise it for larger ones.
        `compile`: with graphs, the denoising step goes through `torch.compile` first (off by default: whether it
        pays for its compile time is for the GPU benchmark to say; docs/fast_path.md)."""
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
        # One canvas of headroom past the context limit: the last canvas is encoded only if generation goes on.
        self.cache = model.new_cache(max_batch, self.max_model_len, slack=self.canvas_length)
        if sampler_memory is None:
            sampler_memory = SAMPLER_MEMORY
            if model.device.type == "cuda":
                sampler_memory = max(sampler_memory, torch.cuda.mem_get_info(model.device)[0] // 8)
        self.tile = max(1, min(max_batch, sampler_memory // self.sampler_row_bytes))
        ids = token_ids(self.config.text, self.gen_config)
        self.eos, self.pad_id = ids.eos_set, ids.pad
        self.waiting: deque[_Req] = deque()
        self.rows: list[_Req | None] = [None] * max_batch
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens held in each cache row
        self._ids = itertools.count()
        self.stats = {"decoder_passes": 0, "encoder_passes": 0, "steps": 0, "prefill_tokens": 0}
        self._mask_key: tuple | None = None
        self._workspace: dict[str, torch.Tensor] = {}
        self._stop_rules = _StopRules(max_batch, self.canvas_length, model.device)
        self._masks: dict | None = None
        use = model.device.type == "cuda" if graphs is None else graphs
        capture = model.device.type == "cuda"
        self.graphs = StepGraphs(model, self.cache, denoise_step, capture, compile) if use else None

    def describe(self) -> str:
        """Which kernels run the steps (the start-up report)."""
        w = self.model.layers[0].experts.gate_up_proj
        if w.dtype == FP8:
            kernel = "fp8 grouped" if w.device.type == "cuda" else "fp8 per-expert"
        else:
            k, C = self.config.text.top_k_experts, self.canvas_length
            with torch.no_grad():  # the choice may depend on how many canvas tokens a step carries
                one, full = (expert_kernel(w, tokens=n * C, top_k=k) for n in (1, self.max_batch))
            kernel = one if one == full else f"{one} (1 row), {full} ({self.max_batch} rows)"
        gib = self.tile * self.sampler_row_bytes / 2**30
        return (
            f"kernels: experts {kernel}; attention SDPA, canvas GQA folded into queries, canvas K/V in its cache "
            f"slots; sampler {self.tile} row(s) per tile ({gib:.2f} GiB of (rows, canvas, vocab) buffers); "
            f"{self.graphs.describe() if self.graphs is not None else 'steps eager'}"
        )

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream_drafts: bool = False,
    ) -> str:
        """Queue a request; raises ValueError for a bad prompt or parameters (the engine state is unchanged).
        `params.n` must be 1 here: several samples of one prompt are `add_samples`."""
        if params is not None and params.n != 1:
            raise ValueError("n > 1: use add_samples, which returns one request id per sample")
        return self.add_samples(prompt_ids, params, None if request_id is None else [request_id], stream_drafts)[0]

    def add_samples(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        request_ids: list[str] | None = None,
        stream_drafts: bool = False,
    ) -> list[str]:
        """Queue `params.n` samples of one prompt (ids `request_ids`, default generated); they share the prompt's
        prefill (it runs once; its cache row is copied) and are admitted together. Sample i draws from the seed
        `params.seed + i` when a seed is given. Raises ValueError as `add_request` does."""
        params = resolve((params or SamplingParams()).validate(self.vocab_size), self.gen_config)
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt must be a non-empty list of token ids")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        check_context(len(prompt_ids), params, self.max_model_len, self.canvas_length)
        if params.n > self.max_batch:
            raise ValueError(f"invalid n={params.n}: at most max_batch ({self.max_batch}) samples per prompt")
        ids = request_ids or [f"req-{next(self._ids)}" for _ in range(params.n)]
        if len(ids) != params.n:
            raise ValueError(f"{len(ids)} request ids for n={params.n} samples")
        constraint = self._compiled(params)
        reqs = [self._new_req(list(prompt_ids), params, rid, i, constraint, stream_drafts) for i, rid in enumerate(ids)]
        reqs[0].followers = reqs[1:]
        for f in reqs[1:]:
            f.leader = reqs[0]
        self.waiting.append(reqs[0])
        return ids

    def _compiled(self, params: SamplingParams) -> Constraint | None:
        """The request's constraint, compiled and checked now so that errors reach the caller."""
        constraint = params.constraint()
        if constraint is not None:
            if self.guides is None:
                raise ValueError("structured output needs the model's tokenizer (tokenizer.json)")
            self.guides.compile(constraint)
        return constraint

    def _new_req(
        self,
        prompt: list[int],
        params: SamplingParams,
        rid: str,
        sample: int,
        constraint: Constraint | None,
        stream_drafts: bool,
    ) -> _Req:
        g = torch.Generator(device=self.model.device)
        seed = (params.seed + sample) % 2**63 if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        g.manual_seed(seed)
        req = _Req(rid, prompt, params, g, time.perf_counter())
        if params.mode == "ar":
            req.ar = _AR()
        else:
            req.diffusion = self._diffusion_state(params, stream_drafts)
        if constraint is not None and constraint.trigger is not None:
            req.lazy = constraint  # applies once the model writes the trigger token
        elif constraint is not None:
            req.constraint = ConstraintState(self.guides.guide(constraint), params.max_new_tokens, self.eos, g)
        return req

    def _diffusion_state(self, params: SamplingParams, want_drafts: bool) -> _Diffusion:
        """A diffusion request's template and suffix on the device (ValueError for a template longer than a canvas;
        its ids were checked by `validate`)."""
        dev, tmpl, suffix = self.model.device, None, None
        if params.template is not None:
            if len(params.template) > self.canvas_length:
                raise ValueError(
                    f"invalid template: {len(params.template)} positions, the canvas has {self.canvas_length}"
                )
            tmpl = torch.full((self.canvas_length,), -1, dtype=torch.long, device=dev)
            tmpl[: len(params.template)] = torch.tensor(params.template, dtype=torch.long)
        if params.suffix_token_ids is not None:  # may be longer than a canvas: the part that fits is visible
            suffix = torch.tensor(params.suffix_token_ids, dtype=torch.long, device=dev)
        return _Diffusion(tmpl, suffix, want_drafts)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its row is freed at once. Returns False if it is unknown."""
        for k, r in enumerate(self.waiting):
            if r.id == request_id:  # a waiting leader: its next sibling takes its place
                del self.waiting[k]
                if r.followers:
                    self.waiting.insert(k, self._promote(r))
                return True
            if any(f.id == request_id for f in r.followers):
                r.followers = [f for f in r.followers if f.id != request_id]
                return True
        for r in self.rows:
            if r is not None and r.id == request_id:
                self._release(r)
                return True
        return False

    def finish_request(
        self, request_id: str, reason: FinishReason = "stop", completion_tokens: int | None = None
    ) -> Event | None:
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

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free row."""
        return len(self.waiting)

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
        while self.waiting and self.rows.count(None) > len(self.waiting[0].followers):
            req = self.waiting.popleft()
            free = [i for i, r in enumerate(self.rows) if r is None]
            # Prefer the free row whose cached tokens are the longest prefix of this prompt (multi-turn chat).
            best, best_len = free[0], 0
            for i in free:
                toks = self.row_tokens[i]
                n = len(toks)
                if 0 < n < len(req.prompt) and n > best_len and req.prompt[:n] == toks:
                    best, best_len = i, n
            self._place(req, best, best_len, "prefill")
            for f, row in zip(req.followers, [i for i in free if i != best]):
                self._place(f, row, 0, "follow")  # waits for the leader's prefill, then copies its row

    def _place(self, req: _Req, row: int, reused: int, state: Literal["prefill", "follow"]) -> None:
        req.row = row
        if reused == 0:
            self.cache.reset_rows([row])
            self.row_tokens[row] = []
        req.prefilled = reused
        req.state = state
        self.rows[row] = req

    def _release(self, req: _Req) -> None:
        was = req.state
        req.state = "done"
        self.rows[req.row] = None
        if req.leader is not None and req in req.leader.followers:
            req.leader.followers.remove(req)
        if was == "prefill" and req.followers:  # a leader left before its prefill: the next sibling prefills
            new = self._promote(req)
            self._place(new, new.row, 0, "prefill")

    @staticmethod
    def _promote(leader: _Req) -> _Req:
        """The first follower becomes the leader of the others."""
        new, rest = leader.followers[0], leader.followers[1:]
        new.leader, new.followers, leader.followers = None, rest, []
        for f in rest:
            f.leader = new
        return new

    # -- prefill --------------------------------------------------------------------------------------------------
    def _prefill(self, events: list[Event]) -> None:
        reqs = [r for r in self.rows if r is not None and r.state == "prefill"]
        if not reqs:
            return
        chunks = [r.prompt[r.prefilled : r.prefilled + self.prefill_chunk] for r in reqs]
        T = max(len(c) for c in chunks)
        dev = self.model.device
        tokens = torch.zeros(len(reqs), T, dtype=torch.long, device=dev)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        n_new = torch.tensor([len(c) for c in chunks], dtype=torch.long, device=dev)
        rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev)
        need_logits = any(r.params.mode == "ar" and r.prefilled + len(c) == len(r.prompt) for r, c in zip(reqs, chunks))
        hidden = self.model.encode(tokens, self.cache, n_new=n_new, rows=rows, last_only=True)
        self.stats["encoder_passes"] += 1
        logits = self.model.logits(hidden)[:, 0] if need_logits else None
        self.stats["prefill_tokens"] += sum(len(c) for c in chunks)
        for i, (r, c) in enumerate(zip(reqs, chunks)):
            r.prefilled += len(c)
            self.row_tokens[r.row].extend(c)
            if r.prefilled < len(r.prompt):
                continue
            for x in self._share_prefill(r):
                if x.params.mode == "ar":
                    x.state = "ar"
                    self._ar_emit(x, logits[i : i + 1], events)
                else:
                    self._new_canvas(x)

    def _share_prefill(self, r: _Req) -> list[_Req]:
        """A prompt is prefilled: its waiting siblings get copies of its cache row. Returns them all, `r` first."""
        group, r.followers = [r] + r.followers, []
        if len(group) > 1:
            self.cache.copy_rows(r.row, [f.row for f in group[1:]])
            for f in group[1:]:
                f.prefilled, f.leader = len(f.prompt), None
                self.row_tokens[f.row] = list(self.row_tokens[r.row])
        return group

    def _new_canvas(self, r: _Req) -> None:
        """Start a canvas from noise, with its fixed positions in place, and reset the row's stop rule."""
        d, dev = r.diffusion, self.model.device
        r.state = "denoise"
        d.canvas = torch.randint(0, self.vocab_size, (self.canvas_length,), generator=r.generator, device=dev)
        if r.constraint is not None:  # structured output: a frontier of validated, frozen positions grows from 0
            d.fixed = r.constraint.start_canvas(self.canvas_length, dev)
        elif d.suffix is not None:
            d.fixed = self._infill_positions(r)
        else:
            d.fixed = d.template
        if d.fixed is not None:
            d.canvas = torch.where(d.fixed >= 0, d.fixed, d.canvas)
        d.has_sc = False
        d.steps_left = r.params.max_denoising_steps
        d.stopping = "none" if r.params.fixed_steps else r.params.stopping
        self._stop_rules.reset(r)

    def _infill_positions(self, r: _Req) -> torch.Tensor | None:
        """Infilling: the suffix sits right after the middle's room (max_new_tokens), padding after it, all fixed and
        visible to every step of the canvas that holds them. (C,) ids, -1 free; None if this canvas has none."""
        C, m, S = self.canvas_length, r.params.max_new_tokens, len(r.diffusion.suffix)
        pos = r.diffusion.canvases * C + torch.arange(C, device=self.model.device)  # output offsets of this canvas
        fixed = torch.full((C,), -1, dtype=torch.long, device=self.model.device)
        inside = (pos >= m) & (pos < m + S)
        fixed[inside] = r.diffusion.suffix[(pos[inside] - m)]
        fixed[pos >= m + S] = self.pad_id
        return fixed if bool((fixed >= 0).any()) else None

    # -- diffusion ------------------------------------------------------------------------------------------------
    def _denoise(self, events: list[Event]) -> None:
        """One denoising step for every row with a canvas: one decoder pass, then the LM head, the sampler and the
        next self-conditioning input, tile by tile (rows sharing an acceptance rule, `self.tile` at a time), then
        one encoder pass that commits the converged canvases."""
        reqs = [r for r in self.rows if r is not None and r.state == "denoise"]
        if not reqs:
            return
        batch = self._gather(reqs)
        commits: list[tuple[_Req, torch.Tensor, int]] = []
        if self._graphable(reqs):
            self._after_step(reqs, self._graph_step(batch), events, commits)
        else:
            self._decode(batch)
            for rule, idx in _tiles(reqs, self.tile):
                tile = [reqs[i] for i in idx]
                out = self._sample(batch, rule, idx)
                going = self._after_step(tile, out, events, commits)
                self._self_condition(batch, idx, going, out)
        self._commit(commits)

    def _graphable(self, reqs: list[_Req]) -> bool:
        """Whether this step runs as one static-shape step (graphs.py): no fixed positions or constraints, one
        acceptance rule, a bucket that holds the rows within the sampler's memory, a canvas that fits in place."""
        return (
            self.graphs is not None
            and all(r.constraint is None and r.diffusion.fixed is None for r in reqs)
            and len({r.params.acceptance for r in reqs}) == 1
            and self.graphs.fits(len(reqs))
            and bucket(len(reqs)) <= self.tile
        )

    def _graph_step(self, batch: _Batch) -> StepOut:
        """The whole step of the batch as one static-shape step; the next soft embeddings go to the rows' buffer."""
        reqs, rule = batch.reqs, batch.reqs[0].params.acceptance
        inputs = {
            "canvas": batch.canvas,
            "soft": self._soft_input(reqs, batch.rows_arg),
            "uniforms": draw_uniforms([r.generator for r in reqs], self.canvas_length, self.model.device),
            "temperature": batch.temp,
            "bound": batch.bound,
        }
        out, soft = self.graphs.run([r.row for r in reqs], inputs, rule, ACCEPTANCE[rule])
        self._soft_buffer()[batch.rows] = soft
        self.stats["decoder_passes"] += 1
        return out

    def _gather(self, reqs: list[_Req]) -> _Batch:
        """The step's inputs: cache rows, canvases, temperatures and entropy bounds."""
        rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=self.model.device)
        all_rows = len(reqs) == self.max_batch and all(r.row == i for i, r in enumerate(reqs))
        canvas = torch.stack([r.diffusion.canvas for r in reqs])
        return _Batch(reqs, rows, None if all_rows else rows, canvas, *_temperatures(reqs, self.model.device))

    def _decode(self, batch: _Batch) -> None:
        """The decoder pass over the batch's canvases: `batch.hidden` (R, C, hidden)."""
        key = (tuple(r.row for r in batch.reqs), self.cache.version)
        if key != self._mask_key:  # masks change only when rows join/leave or the cache grows
            self._mask_key, self._masks = (
                key,
                self.cache.decoder_masks(self.canvas_length, batch.rows_arg, in_place=True),
            )
        batch.hidden = self.model.denoise(
            batch.canvas,
            self.cache,
            soft=self._soft_input(batch.reqs, batch.rows_arg),
            rows=batch.rows_arg,
            masks=self._masks,
            hidden_only=True,
        )
        self.stats["decoder_passes"] += 1

    def _sample(self, batch: _Batch, rule: str, idx: list[int]) -> StepOut:
        """Sample one tile (rows `idx` of the batch): LM head, constraint frontiers, the sampler step from the rows'
        own random numbers."""
        dev = self.model.device
        sel = torch.tensor(idx, device=dev)
        pick = (lambda t: t) if len(idx) == len(batch.reqs) else (lambda t: t[sel])  # noqa: E731 (no copy when whole)
        tile, temp, bound = [batch.reqs[i] for i in idx], pick(batch.temp), pick(batch.bound)
        logits = self._head(pick(batch.hidden))
        fixed = self._fixed_positions(tile, logits, temp, bound)
        u = draw_uniforms([r.generator for r in tile], self.canvas_length, dev)
        out = sample_step(
            logits,
            pick(batch.canvas),
            temp,
            bound,
            ACCEPTANCE[rule],
            u,
            self.vocab_size,
            fixed,
            probs_out=self._tile_buffer("probs", len(idx), torch.float32),
        )
        return out

    def _self_condition(self, batch: _Batch, idx: list[int], going: list[int], out: StepOut) -> None:
        """The next step's self-conditioning input of the tile's rows whose canvas goes on (`going`: positions in the
        tile `idx`), written to their buffers. A finished canvas needs none: its next canvas starts from zero."""
        if not going:
            return
        probs = out.probs if len(going) == len(idx) else out.probs[going]  # (G, C, V)
        self._soft_buffer()[batch.rows[[idx[i] for i in going]]] = self.model.soft_embedding(probs)

    def _commit(self, commits: list[tuple[_Req, torch.Tensor, int]]) -> None:
        """Encode all committed canvases (their first n tokens) in one encoder pass, so the next canvases see them
        as context."""
        if not commits:
            return
        dev = self.model.device
        canvases = torch.stack([a for _, a, _ in commits])
        if self.graphs is not None and self.graphs.fits(len(commits)):  # static shapes (graphs.py)
            self.graphs.commit([r.row for r, _, _ in commits], canvases, [n for _, _, n in commits])
        else:
            rows = torch.tensor([r.row for r, _, _ in commits], dtype=torch.long, device=dev)
            n_new = torch.tensor([n for _, _, n in commits], dtype=torch.long, device=dev)
            self.model.encode(canvases, self.cache, n_new=n_new, rows=rows, last_only=True)
        self.stats["encoder_passes"] += 1
        for r, a, n in commits:
            self.row_tokens[r.row].extend(a[:n].tolist())
            self._new_canvas(r)

    def _soft_input(self, reqs: list[_Req], rows: torch.Tensor | None) -> torch.Tensor | None:
        """The self-conditioning input (R, C, hidden) of this step: the previous step's soft embeddings, zero for
        rows on the first step of a canvas; None when no row has a previous step."""
        if not any(r.diffusion.has_sc for r in reqs):
            return None
        soft = self._soft_buffer()
        for r in reqs:
            if not r.diffusion.has_sc:  # a zero soft embedding is a zero signal
                soft[r.row].zero_()
        return soft if rows is None else soft[rows]

    def _soft_buffer(self) -> torch.Tensor:
        """Each cache row's self-conditioning input for its next step (max_batch, C, hidden), zero at first."""
        shape = (self.max_batch, self.canvas_length, self.config.text.hidden_size)
        return self._buffer("soft", shape, self.model.dtype, zero=True)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over a tile's hidden states (T, C, hidden) -> float32 logits (T, C, V) in a reused buffer."""
        T, lowp = hidden.shape[0], self.model.dtype != torch.float32
        return self.model.logits(
            hidden,
            out=self._tile_buffer("logits", T, torch.float32),
            scratch=self._tile_buffer("logits_lowp", T, self.model.dtype) if lowp else None,
        )

    def _fixed_positions(
        self, tile: list[_Req], logits: torch.Tensor, temp: torch.Tensor, bound: torch.Tensor
    ) -> torch.Tensor | None:
        """Fixed positions (T, C) of a tile (-1 free), after extending each constrained row's validated frontier
        from its logits (before the sampler consumes them); None when no row has any."""
        for i, r in enumerate(tile):
            if r.constraint is not None:
                try:
                    r.constraint.advance(logits[i], float(temp[i]), float(bound[i]), len(r.output))
                except ConstraintError as e:  # a limit tripped: this request ends (in _after_step), the batch goes on
                    r.error = str(e)
        if all(r.diffusion.fixed is None for r in tile):
            return None
        free = torch.full((self.canvas_length,), -1, dtype=torch.long, device=self.model.device)
        return torch.stack([r.diffusion.fixed if r.diffusion.fixed is not None else free for r in tile])

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

    def _after_step(self, reqs: list[_Req], out: StepOut, events: list[Event], commits: list) -> list[int]:
        """Advance each row's state after a sampler step; converged canvases are emitted and queued to commit.
        Returns the positions in `reqs` of the rows whose canvas goes on."""
        done, going = self._stop_rules.converged(reqs, out), []
        for i, r in enumerate(reqs):
            d = r.diffusion
            d.passes += 1
            d.steps_left -= 1
            if r.constraint is not None:  # a constrained canvas is done when its frontier is (never by the stop rule)
                done[i] = r.constraint.canvas_complete
                d.steps_left = max(d.steps_left, 1)
            d.canvas = out.canvas[i]
            d.has_sc = True
            if d.want_drafts:
                events.append(Event(r.id, "draft", out.argmax[i].tolist()))
            if r.error is not None:
                self._finish(r, "abort", events)
                continue
            if done[i] or d.steps_left == 0:
                n = self._emit_canvas(r, out.argmax[i], out.probs[i], events)
                if n:
                    commits.append((r, out.argmax[i], n))
            else:
                going.append(i)
        return going

    def _emit_canvas(self, r: _Req, argmax: torch.Tensor, probs: torch.Tensor, events: list[Event]) -> int:
        """A canvas has converged: emit its tokens; returns how many of them to commit (0: the request ended).
        `probs` (C, V): the last step's distribution (logprobs). A lazy constraint's trigger ends the canvas after
        it: the rest is written again, under the constraint, from the next canvas on."""
        r.diffusion.canvases += 1
        toks = argmax.tolist()
        trigger = toks.index(r.lazy.trigger) if r.lazy is not None and r.lazy.trigger in toks else None
        if trigger is not None:
            toks = toks[: trigger + 1]
        stop_ids = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos)
        budget = r.params.max_new_tokens - len(r.output)
        reason: FinishReason | None = None
        if r.diffusion.suffix is not None:  # a middle ends at EOS or padding (or where the suffix begins: the budget)
            stop_ids = stop_ids | {self.pad_id}
        if r.constraint is not None:  # a constrained canvas holds EOS only as the fill after the grammar completed
            stop_ids = stop_ids | self.eos
        cut = next((j for j, t in enumerate(toks) if t in stop_ids), None)
        if cut is not None and cut < budget:
            toks, reason = toks[:cut], "stop"
        elif r.constraint is not None and r.constraint.finished and len(toks) <= budget:
            reason = "stop"  # the grammar completed exactly at the canvas end
        elif len(toks) >= budget:
            toks, reason = toks[:budget], "length"
        elif len(r.prompt) + len(r.output) + 2 * self.canvas_length > self.max_model_len + self.canvas_length:
            reason = "length"  # no room to encode this canvas and denoise another
        k = r.params.logprobs
        self._emit(r, toks, events, None if k is None else from_logits(probs[: len(toks)].log(), toks, k))
        if reason is not None:
            self._finish(r, reason, events)
            return 0
        if trigger is not None:
            self._activate(r)
        return len(toks)

    def _activate(self, r: _Req) -> None:
        """The lazy constraint's trigger was output: from the next token on, the constraint applies."""
        c, r.lazy = r.lazy, None
        r.constraint = ConstraintState(self.guides.guide(c), r.params.max_new_tokens, self.eos, r.generator)

    def _emit(self, r: _Req, toks: list[int], events: list[Event], logprobs: list[TokenLogprob] | None = None) -> None:
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.output.extend(toks)
        if toks:
            events.append(Event(r.id, "tokens", toks, logprobs=logprobs))

    def _finish(self, r: _Req, reason: FinishReason, events: list[Event]) -> None:
        now = time.perf_counter()
        passes, canvases = (r.diffusion.passes, r.diffusion.canvases) if r.diffusion is not None else (0, 0)
        forwards = r.ar.steps if r.ar is not None else passes
        events.append(
            Event(
                r.id,
                "finished",
                [],
                reason,
                {
                    "prompt_tokens": len(r.prompt),
                    "completion_tokens": len(r.output),
                    "decoder_passes": passes,
                    "canvases": canvases,
                    "denoising_steps": passes,
                    "steps_per_canvas": passes / canvases if canvases else 0.0,
                    "forwards": forwards,
                    "tokens_per_forward": len(r.output) / forwards if forwards else 0.0,
                    "ttft_s": (r.t_first or now) - r.t_arrival,
                    "latency_s": now - r.t_arrival,
                    "mode": r.params.mode,
                    **({"error": r.error} if r.error else {}),
                },
            )
        )
        self._release(r)

    # -- autoregressive baseline -----------------------------------------------------------------------------------
    def _ar(self, events: list[Event]) -> None:
        reqs = [r for r in self.rows if r is not None and r.state == "ar" and r.ar.next_token is not None]
        if not reqs:
            return
        dev = self.model.device
        tokens = torch.tensor([[r.ar.next_token] for r in reqs], dtype=torch.long, device=dev)
        if self.graphs is not None and self.graphs.fits(len(reqs), tokens=1):  # static shapes (graphs.py)
            logits = self.graphs.decode([r.row for r in reqs], tokens)
        else:
            rows = torch.tensor([r.row for r in reqs], dtype=torch.long, device=dev)
            logits = self.model.logits(self.model.encode(tokens, self.cache, rows=rows))[:, -1]
        self.stats["encoder_passes"] += 1
        for i, r in enumerate(reqs):
            self.row_tokens[r.row].append(r.ar.next_token)
            self._ar_emit(r, logits[i : i + 1], events)

    def _ar_emit(self, r: _Req, logits: torch.Tensor, events: list[Event]) -> None:
        """Pick the next token from next-token logits (1, V); emit it or finish."""
        r.ar.steps += 1
        p = r.params
        tok = _ar_sample(logits, p, r.generator)
        if r.constraint is not None:  # the constraint picks (after the free draw: the generator moves the same)
            try:
                tok = r.constraint.next_token(logits[0], p.temperature, len(r.output))
            except ConstraintError as e:  # a limit tripped: this request ends
                r.error = str(e)
                self._finish(r, "abort", events)
                return
        if tok in set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos):
            self._finish(r, "stop", events)
            return
        self._emit(r, [tok], events, None if p.logprobs is None else from_logits(logits, [tok], p.logprobs))
        if r.lazy is not None and tok == r.lazy.trigger:
            self._activate(r)
        if r.constraint is not None and r.constraint.finished:  # the token completed the grammar
            self._finish(r, "stop", events)
        elif len(r.output) >= p.max_new_tokens or len(r.prompt) + len(r.output) > self.max_model_len:
            self._finish(r, "length", events)
        else:
            r.ar.next_token = tok


def _ar_sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """The AR baseline's token from next-token logits (1, V): greedy at temperature 0, else sampled after top-k and
    top-p filtering."""
    if p.temperature == 0:
        return int(logits.argmax(-1))
    lg = logits[0] / p.temperature
    if p.top_k:
        kth = torch.topk(lg, min(p.top_k, lg.numel())).values[-1]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if p.top_p < 1.0:
        sp, si = torch.sort(lg.softmax(-1), descending=True)
        drop = (sp.cumsum(-1) - sp) > p.top_p
        lg[si[drop]] = float("-inf")
    return int(torch.multinomial(lg.softmax(-1), 1, generator=generator))
