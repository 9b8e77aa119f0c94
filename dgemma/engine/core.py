"""The engine: token ids in, a stream of events out.

A step machine over a fixed pool of cache rows, split as vLLM splits it: the `Scheduler` decides which request
holds which row (admission, prefix reuse, n-sample groups), each `Request` carries its own state, finish rules and
budget (request.py), and the `Runner` runs the passes (tensors in, tensors out). `Engine` is the facade: each
`step()` admits waiting requests, prefills one prompt chunk per prefilling row, runs ONE denoising step for every
row denoising a canvas (rows may be at different steps: a request joins at the next step, a finished one leaves
without stalling the others), and one token step for rows in autoregressive mode. A converged canvas is committed:
its argmax tokens are emitted and encoded into the cache, and a new canvas starts from noise.

Every denoising row goes through the same step function (`step.denoise_step`), constrained or not: a row's
template, infilling suffix or constraint frontier is its `fixed` input, its acceptance rule an id. A constraint's
frontier grows from the step's logits on the host (`frontier.ConstraintState.advance`, through the step's
`frontier` hook). A lazily triggered constraint (tool calls under `auto`) starts when its trigger token is output:
the canvas holding it is committed up to the trigger, and the next canvas is constrained. Token events carry
log-probabilities when asked for (logprobs.py). The transformers-exact path is reference.py.

Everything non-streaming (`generate`) is built on `stream`, which is built on `step`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterator

import torch

from dgemma.engine.logprobs import TokenLogprob, from_logits
from dgemma.engine.params import SamplingParams
from dgemma.engine.request import (
    EngineRequest,
    Event,
    FinishReason,
    Limits,
    Request,
    ar_finish,
    ar_sample,
    cut_canvas,
    metrics,
    new_request,
    validate,
)
from dgemma.engine.runner import Runner
from dgemma.engine.sampler import StepOut, draw_uniforms, rule_ids
from dgemma.engine.scheduler import Scheduler
from dgemma.engine.step import Frontier, StepInputs, StopRules, temperatures
from dgemma.model.config import token_ids
from dgemma.model.modeling import DiffusionGemma
from dgemma.structured.constraints import ConstraintError
from dgemma.structured.frontier import ConstraintState

__all__ = ["Engine", "Event", "FinishReason"]


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
        parallel: Any = None,
    ):
        """`guides`: a `constraints.GuideFactory` for this model's tokenizer (structured output needs one).
        `sampler_memory`: bytes for the sampler's (rows, canvas, vocab) buffers; rows are sampled in tiles that fit,
        so memory does not grow with the batch (one row at least). Default: 1 GiB, or on CUDA an eighth of the
        device memory still free once the cache is allocated, if more (a graph bucket must fit it).
        `graphs`: run steps from static buffers per batch bucket (graphs.py), captured as CUDA graphs on CUDA;
        None (default): on CUDA only. A bucket must fit `sampler_memory`, so raise it for larger ones.
        `compile`: with graphs, the denoising step goes through `torch.compile` first (off by default: whether it
        pays for its compile time is for the GPU benchmark to say; docs/fast_path.md).
        `parallel`: a tensor-parallel group (`dgemma.parallel.launch`) whose rank-0 shard `model` is: its runner
        runs every pass on every rank (docs/parallel.md)."""
        self.model, self.guides, self.config = model, guides, model.config
        self.gen_config = dict(generation_config or {})
        self.canvas_length, self.vocab_size = self.config.canvas_length, self.config.text.vocab_size
        self.max_model_len = max_model_len or min(self.config.text.max_position_embeddings, 8192)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        ids = token_ids(self.config.text, self.gen_config)
        self.eos, self.pad_id = frozenset(ids.eos_set), ids.pad
        C = self.canvas_length
        self.limits = Limits(self.vocab_size, C, self.max_model_len, max_batch, self.eos, self.pad_id)
        # One canvas of headroom past the context limit: the last canvas is encoded only if generation goes on.
        self.cache = model.new_cache(max_batch, self.max_model_len, slack=C)
        make = Runner if parallel is None else parallel.runner
        self.runner = make(model, self.cache, max_batch, sampler_memory, graphs, compile)
        self.scheduler = Scheduler(self.runner.cache, max_batch)  # (a tensor-parallel runner's resets every rank's)
        self.stats = self.runner.stats
        self._stop_rules = StopRules(max_batch, C, model.device)
        self._ids = itertools.count()

    # the runner's and scheduler's state, under the engine's names
    graphs = property(lambda self: self.runner.graphs, lambda self, g: setattr(self.runner, "graphs", g))
    tile = property(lambda self: self.runner.tile)
    rows = property(lambda self: self.scheduler.rows)
    waiting = property(lambda self: self.scheduler.waiting)

    def describe(self) -> str:
        """Which kernels run the steps (the start-up report)."""
        return self.runner.describe()

    # -- requests -------------------------------------------------------------------------------------------------
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
        return self.submit(self.validate(prompt_ids, params), request_ids, stream_drafts)

    def validate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> EngineRequest:
        """The request checked against this engine's limits (ValueError naming the field; request.validate)."""
        params, constraint = validate(prompt_ids, params, self.limits, self.gen_config, self.guides)
        return EngineRequest(list(prompt_ids), params, constraint)

    def submit(
        self, request: EngineRequest, request_ids: list[str] | None = None, stream_drafts: bool = False
    ) -> list[str]:
        """Queue a request `validate` accepted, as `add_samples` does (without checking it again)."""
        params, constraint = request.params, request.constraint
        ids = request_ids or [f"req-{next(self._ids)}" for _ in range(params.n)]
        if len(ids) != params.n:
            raise ValueError(f"{len(ids)} request ids for n={params.n} samples")
        group = []
        for i, rid in enumerate(ids):
            r = new_request(rid, list(request.prompt_ids), params, i, self.limits, self.model.device)
            if r.diffusion is not None:
                r.diffusion.want_drafts = stream_drafts
            r.lazy = constraint  # a trigger's constraint applies once the model writes the trigger token
            if constraint is not None and constraint.trigger is None:
                self._activate(r)
            group.append(r)
        self.scheduler.add(group)
        return ids

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its row is freed at once. Returns False if it is unknown."""
        return self.scheduler.abort(request_id)

    def finish_request(
        self, request_id: str, reason: FinishReason = "stop", completion_tokens: int | None = None
    ) -> Event | None:
        """End a running request now (e.g. a stop string matched); returns its 'finished' event with metrics."""
        r = self.scheduler.find(request_id)
        if r is None:
            self.abort(request_id)
            return None
        if completion_tokens is not None:
            del r.output[completion_tokens:]
        events: list[Event] = []
        self._finish(r, reason, events)
        return events[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def prompt_logprobs(self, prompt_ids: list[int], top_k: int) -> list[TokenLogprob | None]:
        """The prompt tokens' log-probabilities (`logprobs.prompt_logprobs`: one causal pass in a fresh cache)."""
        return self.runner.prompt_logprobs(prompt_ids, top_k)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free row."""
        return len(self.waiting)

    # -- the step -------------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Advance every running request by one unit of work; returns the events produced."""
        events: list[Event] = []
        self.scheduler.admit()
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

    # -- prefill --------------------------------------------------------------------------------------------------
    def _prefill(self, events: list[Event]) -> None:
        reqs = self.scheduler.running("prefill")
        if not reqs:
            return
        chunks = [r.prompt[r.prefilled : r.prefilled + self.prefill_chunk] for r in reqs]
        head = any(r.params.mode == "ar" and r.prefilled + len(c) == len(r.prompt) for r, c in zip(reqs, chunks))
        logits = self.runner.prefill([r.row for r in reqs], chunks, head)
        for i, (r, c) in enumerate(zip(reqs, chunks)):
            r.prefilled += len(c)
            self.scheduler.row_tokens[r.row].extend(c)
            if r.prefilled < len(r.prompt):
                continue
            for x in self.scheduler.share_prefill(r):
                if x.params.mode == "ar":
                    x.state = "ar"
                    self._ar_emit(x, logits[i : i + 1], events)
                else:
                    self._new_canvas(x)

    def _new_canvas(self, r: Request) -> None:
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
        p = r.params
        self._stop_rules.reset(r.row, d.stopping, p.stability_threshold, float(p.confidence_threshold))

    def _infill_positions(self, r: Request) -> torch.Tensor | None:
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
        """One denoising step for every row with a canvas, `tile` rows per step call (the sampler's memory bound),
        then one encoder pass that commits the converged canvases."""
        reqs = self.scheduler.running("denoise")
        commits: list[tuple[Request, torch.Tensor, int]] = []
        for start in range(0, len(reqs), self.tile):
            tile = reqs[start : start + self.tile]
            x = self._inputs(tile)
            out = self.runner.denoise([r.row for r in tile], x, self._frontier(tile, x))
            going = self._after_step(tile, out, events, commits)
            self.runner.condition(
                [tile[i].row for i in going], out.probs[going] if len(going) < len(tile) else out.probs
            )
        if commits:
            self.runner.commit(
                [r.row for r, _, _ in commits], torch.stack([a for _, a, _ in commits]), [n for *_, n in commits]
            )
            for r, a, n in commits:
                self.scheduler.row_tokens[r.row].extend(a[:n].tolist())
                self._new_canvas(r)

    def _inputs(self, reqs: list[Request]) -> StepInputs:
        """The step's per-row inputs: canvases, self-conditioning, uniforms, temperatures, rules, fixed positions."""
        dev, C = self.model.device, self.canvas_length
        free = torch.full((C,), -1, dtype=torch.long, device=dev)
        temp, bound = temperatures([r.diffusion.steps_left for r in reqs], [r.params for r in reqs], dev)
        return StepInputs(
            canvas=torch.stack([r.diffusion.canvas for r in reqs]),
            soft=self.runner.soft_input([r.row for r in reqs], [r.diffusion.has_sc for r in reqs]),
            uniforms=draw_uniforms([r.generator for r in reqs], C, dev),
            temperature=temp,
            bound=bound,
            rule=rule_ids([r.params.acceptance for r in reqs], dev),
            fixed=torch.stack([r.diffusion.fixed if r.diffusion.fixed is not None else free for r in reqs]),
        )

    def _frontier(self, tile: list[Request], x: StepInputs) -> Frontier | None:
        """The step's host hook when constrained rows take part: each extends its validated frontier from its
        logits (before the sampler consumes them); then every row's fixed positions. None when no row is
        constrained (the step then needs no host work and can be captured)."""
        constrained = [i for i, r in enumerate(tile) if r.constraint is not None]
        if not constrained:
            return None

        def frontier(logits: torch.Tensor) -> torch.Tensor:  # (R, C, V) -> (R, C)
            temp, bound = x.temperature.tolist(), x.bound.tolist()
            for i, r in enumerate(tile):
                if r.constraint is not None:
                    try:
                        r.constraint.advance(logits[i], temp[i], bound[i], len(r.output))
                    except ConstraintError as e:  # a limit tripped: this request ends (in _after_step)
                        r.error = str(e)
            free = torch.full((self.canvas_length,), -1, dtype=torch.long, device=logits.device)
            return torch.stack([r.diffusion.fixed if r.diffusion.fixed is not None else free for r in tile])

        frontier.rows = constrained  # the rows whose logits it reads (a tensor-parallel runner gathers only those)
        return frontier

    def _after_step(self, reqs: list[Request], out: StepOut, events: list[Event], commits: list) -> list[int]:
        """Advance each row's state after a sampler step; converged canvases are emitted and queued to commit.
        Returns the positions in `reqs` of the rows whose canvas goes on."""
        done = self._stop_rules.converged([r.row for r in reqs], [r.diffusion.stopping for r in reqs], out)
        going = []
        for i, r in enumerate(reqs):
            d = r.diffusion
            d.passes += 1
            d.steps_left -= 1
            if r.constraint is not None:  # a constrained canvas is done when its frontier is (never by the stop rule)
                done[i] = r.constraint.canvas_complete
                d.steps_left = max(d.steps_left, 1)
            d.canvas, d.has_sc = out.canvas[i], True
            if d.want_drafts:
                events.append(Event(r.id, "draft", out.argmax[i].tolist()))
            if r.error is not None:
                self._finish(r, "abort", events)
            elif done[i] or d.steps_left == 0:
                n = self._emit_canvas(r, out.argmax[i], out.probs[i], events)
                if n:
                    commits.append((r, out.argmax[i], n))
            else:
                going.append(i)
        return going

    def _emit_canvas(self, r: Request, argmax: torch.Tensor, probs: torch.Tensor, events: list[Event]) -> int:
        """A canvas has converged: emit its tokens; returns how many of them to commit (0: the request ended).
        `probs` (C, V): the last step's distribution (logprobs). A lazy constraint's trigger ends the canvas after
        it: the rest is written again, under the constraint, from the next canvas on."""
        r.diffusion.canvases += 1
        toks = argmax.tolist()
        trigger = toks.index(r.lazy.trigger) if r.lazy is not None and r.lazy.trigger in toks else None
        if trigger is not None:
            toks = toks[: trigger + 1]
        toks, reason = cut_canvas(r, toks, self.limits)
        k = r.params.logprobs
        self._emit(r, toks, events, None if k is None else from_logits(probs[: len(toks)].log(), toks, k))
        if reason is not None:
            self._finish(r, reason, events)
            return 0
        if trigger is not None:
            self._activate(r)
        return len(toks)

    def _activate(self, r: Request) -> None:
        """The request's constraint applies from the next token on (at once, or once its trigger was output)."""
        c, r.lazy = r.lazy, None
        r.constraint = ConstraintState(self.guides.guide(c), r.params.max_new_tokens, self.eos, r.generator)

    def _emit(self, r: Request, toks: list[int], events: list[Event], logprobs: list[TokenLogprob] | None = None):
        if r.t_first is None:
            r.t_first = time.perf_counter()
        r.output.extend(toks)
        if toks:
            events.append(Event(r.id, "tokens", toks, logprobs=logprobs))

    def _finish(self, r: Request, reason: FinishReason, events: list[Event]) -> None:
        events.append(Event(r.id, "finished", [], reason, metrics(r, time.perf_counter())))
        self.scheduler.release(r)

    # -- autoregressive baseline ----------------------------------------------------------------------------------
    def _ar(self, events: list[Event]) -> None:
        reqs = [r for r in self.scheduler.running("ar") if r.ar.next_token is not None]
        if not reqs:
            return
        logits = self.runner.ar_step([r.row for r in reqs], [r.ar.next_token for r in reqs])
        for i, r in enumerate(reqs):
            self.scheduler.row_tokens[r.row].append(r.ar.next_token)
            self._ar_emit(r, logits[i : i + 1], events)

    def _ar_emit(self, r: Request, logits: torch.Tensor, events: list[Event]) -> None:
        """Pick the next token from next-token logits (1, V); emit it or finish."""
        r.ar.steps += 1
        p = r.params
        tok = ar_sample(logits, p, r.generator)
        if r.constraint is not None:  # the constraint picks (after the free draw: the generator moves the same)
            try:
                tok = r.constraint.next_token(logits[0], p.temperature, len(r.output))
            except ConstraintError as e:  # a limit tripped: this request ends
                r.error = str(e)
                self._finish(r, "abort", events)
                return
        if ar_finish(r, tok, self.limits) is not None:  # a stop token: not output
            self._finish(r, "stop", events)
            return
        self._emit(r, [tok], events, None if p.logprobs is None else from_logits(logits, [tok], p.logprobs))
        if r.lazy is not None and tok == r.lazy.trigger:
            self._activate(r)
        reason = ar_finish(r, None, self.limits)
        if reason is not None:
            self._finish(r, reason, events)
        else:
            r.ar.next_token = tok
