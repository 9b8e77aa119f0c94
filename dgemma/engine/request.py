"""A request inside the engine: its validation, its state in either mode, its finish rules and its metrics.

`validate` is the one place a prompt and its sampling parameters are checked against the engine's limits (the
`LLM`, the CLI, the server and reference mode reach it once, through `entrypoints.inputs` and `Engine.validate`;
`Engine.add_samples` calls it for raw callers): the context budget is written once here (`check_context`), and so
are the finish rules of a committed canvas (`cut_canvas`) and the metrics of a finished request (`metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dgemma.engine.logprobs import TokenLogprob
from dgemma.engine.params import SamplingParams, resolve
from dgemma.structured.constraints import Constraint
from dgemma.structured.frontier import ConstraintState

FinishReason = Literal["stop", "length", "abort"]
State = Literal["waiting", "prefill", "follow", "denoise", "ar", "done"]


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


@dataclass(frozen=True)
class Limits:
    """What a request must fit: the engine's shapes and special tokens."""

    vocab_size: int
    canvas_length: int
    max_model_len: int
    max_batch: int
    eos: frozenset[int]
    pad_id: int


class InvalidRequest(ValueError):
    """A prompt or parameters the engine cannot take; `.param` names the field: "prompt", a SamplingParams field,
    or "constraint" (structured output without a tokenizer)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineRequest:
    """A request `validate` has accepted: its prompt, its resolved parameters and its compiled constraint. The
    entry points validate once (`entrypoints.inputs`) and hand this to `Engine.submit`."""

    prompt_ids: list[int]
    params: SamplingParams
    constraint: Constraint | None = None


def check_context(prompt_len: int, params: SamplingParams, limit: int, canvas: int) -> None:
    """Raise InvalidRequest unless the whole budget fits the context: every token but the last is encoded (AR),
    every canvas but the last is committed (diffusion: the budget counts in whole canvases)."""
    if prompt_len >= limit:
        raise InvalidRequest(f"prompt has {prompt_len} tokens; the context length is {limit} tokens", "prompt")
    if params.mode == "ar":
        need = prompt_len + params.max_new_tokens - 1
    else:
        need = prompt_len + (-(-params.max_new_tokens // canvas) - 1) * canvas
    if need > limit:
        whole = "" if params.mode == "ar" else f"; diffusion generates whole canvases of {canvas}"
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the context "
            f"length ({limit} tokens{whole})",
            "max_new_tokens",
        )


def validate(
    prompt_ids: Any, params: SamplingParams | None, limits: Limits, gen_config: dict[str, Any], guides: Any
) -> tuple[SamplingParams, Constraint | None]:
    """The request's parameters, validated and resolved against the checkpoint's defaults, and its constraint,
    compiled now so that every error reaches the caller before any state changes: a SamplingParamError or
    InvalidRequest naming the field, or the constraint's ConstraintError."""
    params = resolve((params or SamplingParams()).validate(limits.vocab_size), gen_config)
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise InvalidRequest("prompt must be a non-empty list of token ids", "prompt")
    if not all(isinstance(t, int) and 0 <= t < limits.vocab_size for t in prompt_ids):
        raise InvalidRequest(f"prompt token ids must be integers in [0, {limits.vocab_size})", "prompt")
    check_context(len(prompt_ids), params, limits.max_model_len, limits.canvas_length)
    if params.n > limits.max_batch:
        raise InvalidRequest(f"invalid n={params.n}: at most max_batch ({limits.max_batch}) samples per prompt", "n")
    if params.mode != "ar" and params.template is not None and len(params.template) > limits.canvas_length:
        raise InvalidRequest(
            f"invalid template: {len(params.template)} positions, the canvas has {limits.canvas_length}", "template"
        )
    constraint = params.constraint()
    if constraint is not None:
        if guides is None:
            raise InvalidRequest("structured output needs the model's tokenizer (tokenizer.json)", "constraint")
        guides.compile(constraint)
    return params, constraint


@dataclass
class Diffusion:
    """A diffusion request's canvas state (`Request.diffusion`)."""

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
class AR:
    """An autoregressive request's state (`Request.ar`)."""

    next_token: int | None = None  # the last token picked, encoded at the next step
    steps: int = 0


@dataclass
class Request:
    """A request: its core, and the state of its mode (`diffusion` or `ar`) and of its constraint, if any."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    t_arrival: float
    row: int = -1
    state: State = "waiting"
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    t_first: float | None = None
    error: str | None = None  # the constraint failed mid-way (a resource limit): the request is aborted
    diffusion: Diffusion | None = None
    ar: AR | None = None
    constraint: ConstraintState | None = None  # structured output (frontier.py owns it)
    lazy: Constraint | None = None  # a constraint that starts when its trigger token is output (tool calls)
    leader: Request | None = None  # n > 1: the sibling whose prefill this request shares
    followers: list[Request] = field(default_factory=list)  # n > 1: the siblings waiting for this request's prefill

    def stop_ids(self, eos: frozenset[int]) -> set[int]:
        """The token ids that end this request's output."""
        return set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(eos))


def new_request(
    rid: str, prompt: list[int], params: SamplingParams, sample: int, limits: Limits, device: torch.device
) -> Request:
    """Request `rid`, sample `sample` of its group: its own generator (seed + sample when seeded) and mode state."""
    g = torch.Generator(device=device)
    seed = (params.seed + sample) % 2**63 if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
    g.manual_seed(seed)
    req = Request(rid, prompt, params, g, time.perf_counter())
    if params.mode == "ar":
        req.ar = AR()
        return req
    tmpl = suffix = None
    if params.template is not None:
        tmpl = torch.full((limits.canvas_length,), -1, dtype=torch.long, device=device)
        tmpl[: len(params.template)] = torch.tensor(params.template, dtype=torch.long)
    if params.suffix_token_ids is not None:  # may be longer than a canvas: the part that fits is visible
        suffix = torch.tensor(params.suffix_token_ids, dtype=torch.long, device=device)
    req.diffusion = Diffusion(tmpl, suffix)
    return req


def cut_canvas(r: Request, toks: list[int], limits: Limits) -> tuple[list[int], FinishReason | None]:
    """A converged canvas's tokens as emitted, and the finish reason they give the request (None: it goes on)."""
    stop_ids = r.stop_ids(limits.eos)
    if r.diffusion.suffix is not None:  # a middle ends at EOS or padding (or where the suffix begins: the budget)
        stop_ids |= {limits.pad_id}
    if r.constraint is not None:  # a constrained canvas holds EOS only as the fill after the grammar completed
        stop_ids |= limits.eos
    budget = r.params.max_new_tokens - len(r.output)
    cut = next((j for j, t in enumerate(toks) if t in stop_ids), None)
    if cut is not None and cut < budget:
        return toks[:cut], "stop"
    if r.constraint is not None and r.constraint.finished and len(toks) <= budget:
        return toks, "stop"  # the grammar completed exactly at the canvas end
    if len(toks) >= budget:
        return toks[:budget], "length"
    if len(r.prompt) + len(r.output) + limits.canvas_length > limits.max_model_len:
        return toks, "length"  # no room to encode this canvas and denoise another
    return toks, None


def ar_finish(r: Request, tok: int | None, limits: Limits) -> FinishReason | None:
    """The finish reason an AR token gives the request, before it is emitted ("stop": the token is not output) or
    after ("length", or "stop" when it completed the grammar); None: it goes on. `tok` None asks the after-rules."""
    if tok is not None:
        return "stop" if tok in r.stop_ids(limits.eos) else None
    if r.constraint is not None and r.constraint.finished:  # the token completed the grammar
        return "stop"
    if len(r.output) >= r.params.max_new_tokens or len(r.prompt) + len(r.output) > limits.max_model_len:
        return "length"
    return None


def metrics(r: Request, now: float) -> dict[str, Any]:
    """A finished request's metrics (the 'finished' event's)."""
    passes, canvases = (r.diffusion.passes, r.diffusion.canvases) if r.diffusion is not None else (0, 0)
    forwards = r.ar.steps if r.ar is not None else passes
    return {
        "prompt_tokens": len(r.prompt),
        "completion_tokens": len(r.output),
        "decoder_passes": passes,
        "canvases": canvases,
        "denoising_steps": passes,
        "steps_per_canvas": passes / canvases if canvases else 0.0,
        "forwards": forwards,
        "tokens_per_forward": tokens_per_forward(len(r.output), forwards),
        "ttft_s": (r.t_first or now) - r.t_arrival,
        "latency_s": now - r.t_arrival,
        "mode": r.params.mode,
        **({"error": r.error} if r.error else {}),
    }


def tokens_per_forward(tokens: int, forwards: int) -> float:
    """Output tokens per model forward (a denoising step or an AR step): the figure every report uses."""
    return tokens / forwards if forwards else 0.0


def ar_sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
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
