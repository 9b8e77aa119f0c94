"""Per-request sampling parameters, and the one table of sampling knobs (`KNOBS`).

Each scalar knob is declared once (name, type, range, default, help); `SamplingParams.validate`, the CLI's flags
(`entrypoints.cli.add_sampling_arguments`) and the server's request schema (`entrypoints.protocol`) are all derived
from it.
The fields that are lists or text (stop strings, token ids, templates, structured-output constraints) have
bespoke checks in `validate`. Every error is a `SamplingParamError` naming the field in `.param`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Sequence

from dgemma.engine.logprobs import MAX_TOP_LOGPROBS
from dgemma.engine.sampler import ACCEPTANCE, SCHEDULES, STOPPING

Mode = Literal["diffusion", "ar"]
MODES = ("diffusion", "ar")
MAX_N = 128  # samples per prompt (the engine also needs that many free rows)


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `.param` is the SamplingParams field's name."""

    def __init__(self, param: str, value: Any, why: str) -> None:
        super().__init__(f"invalid {param}={value!r}: {why}")
        self.param = param


@dataclass(frozen=True)
class Knob:
    """One scalar sampling knob. `default` is SamplingParams' default (None: the checkpoint's generation_config,
    then `DEFAULTS`); `mode` is the only mode that uses it (None: both); `api` is its name in server requests
    (None: not offered there); `strict_flag`: the CLI refuses an out-of-range value as a usage error."""

    name: str
    kind: type  # int, float, bool, or str (one of `choices()`)
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: Callable[[], Sequence[str]] | None = None
    mode: Mode | None = None
    api: str | None = ""  # "": the same name
    metavar: str | None = None
    strict_flag: bool = False

    @property
    def api_name(self) -> str | None:
        return self.name if self.api == "" else self.api

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """'in (0, 100]', '> 0', '>= 0' or ''."""
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        if lo is not None and self.le is not None:
            return f"in {lo}, {self.le}]"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {lo[1:]}"
        return f"<= {self.le}" if self.le is not None else ""

    def requirement(self) -> str:
        if self.kind is str:
            return f"must be one of {sorted(self.choices())}"
        what = {int: "an integer", float: "a number", bool: "true or false"}[self.kind]
        return f"must be {what} {self.range_text()}".rstrip()

    def accepts(self, v: Any) -> bool:
        if v is None:
            return self.default is None
        if self.kind is str:
            return isinstance(v, str) and v in self.choices()
        if self.kind is bool or isinstance(v, bool):
            return self.kind is bool and isinstance(v, bool)
        if not isinstance(v, int if self.kind is int else (int, float)) or not math.isfinite(v):
            return False
        return (
            (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt) and (self.le is None or v <= self.le)
        )

    def check(self, value: Any) -> None:
        if not self.accepts(value):
            raise SamplingParamError(self.name, value, self.requirement())


def _names(registry: dict[str, Any]) -> Callable[[], list[str]]:
    return lambda: sorted(registry)


KNOBS: tuple[Knob, ...] = (
    Knob(
        "max_new_tokens",
        int,
        256,
        "most tokens to generate; diffusion commits whole canvases and trims the last one",
        ge=1,
        api="max_tokens",
        metavar="N",
        strict_flag=True,
    ),
    Knob(
        "seed",
        int,
        None,
        "random seed (unset: a random one); the same seed, prompt and options give the same tokens",
        ge=0,
        le=2**63 - 1,
        metavar="S",
    ),
    Knob(
        "mode",
        str,
        "diffusion",
        "diffusion: denoise a canvas of tokens at a time (the model's native mode); "
        "ar: one token per forward pass, for comparison",
        choices=lambda: MODES,
    ),
    Knob("ignore_eos", bool, False, "keep generating past the checkpoint's EOS tokens, up to the token budget"),
    Knob(
        "max_denoising_steps",
        int,
        None,
        "most denoising steps per canvas",
        ge=1,
        le=10_000,
        mode="diffusion",
        metavar="N",
    ),
    Knob("t_min", float, None, "sampling temperature at the last step", gt=0, le=100, mode="diffusion", metavar="F"),
    Knob(
        "t_max",
        float,
        None,
        "sampling temperature at the first step, >= t_min (the temperature falls from t_max to t_min over the steps)",
        gt=0,
        le=100,
        mode="diffusion",
        metavar="F",
    ),
    Knob(
        "entropy_bound",
        float,
        None,
        "per step, accept the lowest-entropy positions while their summed entropy "
        "stays within this bound; larger accepts more tokens per step: faster, less careful",
        gt=0,
        mode="diffusion",
        metavar="F",
    ),
    Knob(
        "stability_threshold",
        int,
        None,
        "adaptive stop: the canvas's argmax must be unchanged for this many steps",
        ge=0,
        le=1000,
        mode="diffusion",
        metavar="N",
    ),
    Knob(
        "confidence_threshold",
        float,
        None,
        "adaptive stop: and its mean entropy must be below this",
        gt=0,
        mode="diffusion",
        metavar="F",
    ),
    Knob(
        "fixed_steps",
        bool,
        False,
        "no adaptive stop: run exactly max_denoising_steps steps per canvas",
        mode="diffusion",
    ),
    Knob(
        "schedule",
        str,
        "linear",
        "temperature schedule from t_max to t_min",
        choices=_names(SCHEDULES),
        mode="diffusion",
        api=None,
    ),
    Knob(
        "acceptance",
        str,
        "entropy_bound",
        "which positions keep their sampled token each step",
        choices=_names(ACCEPTANCE),
        mode="diffusion",
        api=None,
    ),
    Knob(
        "stopping",
        str,
        "stable_confident",
        "adaptive stop rule; 'none' is the same as fixed_steps",
        choices=_names(STOPPING),
        mode="diffusion",
        api=None,
    ),
    Knob("temperature", float, 0.0, "sampling temperature; 0 is greedy", ge=0, le=100, mode="ar", metavar="F"),
    Knob("top_k", int, 0, "sample among the K most likely tokens; 0 disables", ge=0, mode="ar", metavar="K"),
    Knob(
        "top_p",
        float,
        1.0,
        "nucleus sampling: the smallest set of tokens with probability >= P; 1 disables",
        gt=0,
        le=1,
        mode="ar",
        metavar="P",
    ),
)
KNOB: dict[str, Knob] = {k.name: k for k in KNOBS}

# The published defaults of the knobs left to the checkpoint (transformers' DiffusionGemmaGenerationConfig).
DEFAULTS: dict[str, Any] = dict(
    max_denoising_steps=48, t_min=0.4, t_max=0.8, entropy_bound=0.1, stability_threshold=1, confidence_threshold=0.005
)


def _token_ids_ok(v: Any, lo: int, hi: int | None, non_empty: bool = False) -> bool:
    return (
        isinstance(v, list)
        and (bool(v) or not non_empty)
        and all(isinstance(t, int) and not isinstance(t, bool) and lo <= t < (hi or 2**62) for t in v)
    )


@dataclass
class SamplingParams:
    """Per-request generation settings (vLLM-style). The scalar knobs are described in `KNOBS`; unset diffusion
    knobs come from generation_config.json."""

    max_new_tokens: int = 256
    seed: int | None = None
    mode: Mode = "diffusion"
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # diffusion knobs (None: checkpoint default, then the published default)
    max_denoising_steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    fixed_steps: bool = False  # run exactly max_denoising_steps per canvas (no adaptive stop)
    schedule: str = "linear"
    acceptance: str = "entropy_bound"
    stopping: str = "stable_confident"
    # canvas template (inpainting): token ids fixed at canvas positions 0..len-1 (-1: free), on every canvas
    template: list[int] | None = None
    # infilling: token ids that must follow the output; they end the last canvas (the middle is what is returned)
    suffix_token_ids: list[int] | None = None
    suffix: str | None = None  # the same as text (LLM tokenizes it)
    # structured output (at most one; see dgemma/structured/constraints.py): a JSON schema (dict or JSON text), any
    # JSON object, a regex, a list of strings, or a Lark (or GBNF) grammar
    json_schema: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # a tool-call constraint built by `tool_grammar` (LLM.chat and the server set it; not a user knob)
    tool_constraint: Any = None
    # log-probabilities (dgemma/engine/logprobs.py): of each output token with this many alternatives (None: none),
    # and of the prompt's tokens (one causal encoder pass)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # samples of the prompt: they share its prefill; sample i draws from seed + i
    n: int = 1
    # autoregressive knobs (mode="ar"): temperature 0 is greedy
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise SamplingParamError naming the first invalid field; returns self."""
        for knob in KNOBS:
            knob.check(getattr(self, knob.name))
        if self.t_min is not None and self.t_max is not None and self.t_max < self.t_min:
            self._bad("t_max", f"must be >= t_min ({self.t_min})")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            self._bad("stop", "must be a list of non-empty strings")
        if not _token_ids_ok(self.stop_token_ids, 0, vocab_size):
            self._bad("stop_token_ids", "must be a list of token ids inside the vocabulary")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_TOP_LOGPROBS):
                self._bad(name, f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            self._bad("n", f"must be an integer in [1, {MAX_N}]")
        self._validate_canvas_fields(vocab_size)
        return self

    def _bad(self, name: str, why: str) -> None:
        raise SamplingParamError(name, getattr(self, name), why)

    def _validate_canvas_fields(self, vocab_size: int | None) -> None:
        """Template, infilling suffix and structured output: each alone, and not mixed."""
        if self.template is not None:
            if not _token_ids_ok(self.template, -1, vocab_size):
                self._bad("template", "must be a list of token ids (-1 for free positions)")
            if self.mode == "ar":
                self._bad("template", "applies to diffusion mode only")
        if self.suffix is not None and (not isinstance(self.suffix, str) or not self.suffix):
            self._bad("suffix", "must be a non-empty string")
        if self.suffix_token_ids is not None:
            if not _token_ids_ok(self.suffix_token_ids, 0, vocab_size, non_empty=True):
                self._bad("suffix_token_ids", "must be a non-empty list of token ids inside the vocabulary")
            if self.mode == "ar":
                self._bad("suffix_token_ids", "infilling needs diffusion mode (the canvas sees the suffix)")
            if self.template is not None:
                self._bad("suffix_token_ids", "cannot be combined with a template")
        if self.constraint() is not None and (
            self.template is not None or self.suffix_token_ids is not None or self.suffix is not None
        ):
            self._bad(
                "template" if self.template is not None else "suffix", "cannot be combined with structured output"
            )

    def constraint(self):
        """The structured-output constraint these params ask for (a `constraints.Constraint`), or None."""
        from dgemma.structured.constraints import Constraint

        given = Constraint.from_fields(self.json_schema, self.regex, self.choice, self.grammar, bool(self.json_object))
        if self.tool_constraint is None:
            return given
        if given is not None:
            self._bad("tool_constraint", "tool calls cannot be combined with another structured-output constraint")
        return self.tool_constraint


def resolve(params: SamplingParams, generation_config: dict[str, Any] | None = None) -> SamplingParams:
    """Fill unset diffusion knobs from generation_config.json (HF layout), then the published defaults."""
    gen = dict(generation_config or {})
    sc = gen.get("sampler_config")
    if isinstance(sc, dict) and "entropy_bound" in sc:
        gen["entropy_bound"] = sc["entropy_bound"]
    out = SamplingParams(**{f.name: getattr(params, f.name) for f in fields(params)})
    for k, v in DEFAULTS.items():
        if getattr(out, k) is None:
            setattr(out, k, gen[k] if gen.get(k) is not None else v)
    return out
