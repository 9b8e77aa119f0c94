"""Request/response schemas of the OpenAI-compatible server (`dgemma.entrypoints.server`), following vLLM's conventions.

Requests are validated strictly (no "5" -> 5 coercion, no bool for int, no NaN/inf): a wrong type is a client
mistake and is answered with HTTP 400 and an OpenAI error body, never 422 or 500. Unknown fields are ignored (as
in vLLM), but OpenAI features this server does not implement (best_of > 1, penalties, logit_bias) are rejected with
400 rather than silently ignored.

Chat with tools and reasoning (docs/chat.md): `tools`, `tool_choice`, `parallel_tool_calls`, `chat_template_kwargs`
(checked and rendered by `dgemma.text.chat`). Log-probabilities: `logprobs`/`top_logprobs` (chat), `logprobs`
(completions), `echo` (completions: the prompt first, with its log-probabilities when `logprobs` is set;
`max_tokens: 0` generates nothing), `return_tokens_as_token_ids`; `n` samples per request.

Sampling fields:

* `max_tokens` (chat: also `max_completion_tokens`): tokens to generate; unset means "up to the context length".
* `seed`: per-request seed; the same seed gives the same tokens whether the request runs alone or batched.
* `stop` (str or list), `stop_token_ids`, `ignore_eos`.
* `temperature`, `top_p`, `top_k`: used in `mode="ar"` only (unset temperature = greedy). **In diffusion mode
  (the default) they are ignored**: the denoising temperature follows a schedule from `t_max` down to `t_min`.
* diffusion knobs (top-level JSON fields; the `openai` client's `extra_body` puts them there): `mode`
  ("diffusion" | "ar"), `max_denoising_steps`, `t_min`, `t_max`, `entropy_bound`, `stability_threshold`,
  `confidence_threshold`, `fixed_steps`; unset ones come from the checkpoint's generation_config.json.
* `stream_drafts` (streaming only): extra chunks whose top-level `draft` field holds the decoded argmax of the
  canvas being denoised (not final text), off by default.

Structured output (both endpoints; see docs/structured.md): `response_format` {"type": "json_object"} or
{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, or vLLM's `structured_outputs` object with
one of `json` (a schema), `regex`, `choice` (a list of strings), `grammar` (Lark or GBNF) or `json_object: true`.
Constraints are compiled when the request arrives: an invalid or too expensive one is a 400 with the reason.
Infilling: `suffix` on /v1/completions (diffusion mode): the text returned is the middle between prompt and suffix.

Usage carries `tokens_per_forward` (completion tokens per decoder pass; per encoder step in AR mode) and
`denoising_steps` (decoder passes) next to the OpenAI token counts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from dgemma.engine.logprobs import MAX_TOP_LOGPROBS
from dgemma.engine.params import KNOBS, MAX_N, Knob, SamplingParamError, SamplingParams

# Prompts are either text or token ids; a list holding exactly one of those is accepted too (OpenAI's batch form).
PromptInput = Union[str, list[int]]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted for vLLM compatibility; usage is only sent at the end


def _knob_field(knob: Knob) -> tuple[Any, Any]:
    """A request field for one `params.KNOBS` entry: its type and range; unset (None) means the default."""
    if knob.kind is bool:
        return bool, Field(default=False, description=knob.help)
    if knob.kind is str:
        return Literal[tuple(knob.choices())], Field(default=knob.default, description=knob.help)
    return Optional[knob.kind], Field(default=None, ge=knob.ge, gt=knob.gt, le=knob.le, description=knob.help)


# The sampling knobs of both endpoints, derived from the one table in dgemma.engine.params.
_Knobs = create_model("_Knobs", __base__=_Strict, **{k.api_name: _knob_field(k) for k in KNOBS if k.api_name})
_API_NAME = {k.name: k.api_name for k in KNOBS if k.api_name} | {"suffix_token_ids": "suffix"}


class RequestError(ValueError):
    """A request the server answers with 400; `.param` names the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def api_param(name: str | None) -> str | None:
    """The request field for a SamplingParams field (`max_new_tokens` is `max_tokens`)."""
    return _API_NAME.get(name, name) if name is not None else None


class _SamplingFields(_Knobs):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    stop_token_ids: Optional[list[int]] = None
    stream_drafts: bool = False
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first requested feature this server does not implement, else None."""
        if self.n is not None and not 1 <= self.n <= MAX_N:
            return "n", f"n must be in [1, {MAX_N}]"
        if self.presence_penalty not in (None, 0, 0.0):
            return "presence_penalty", "presence_penalty is not supported"
        if self.frequency_penalty not in (None, 0, 0.0):
            return "frequency_penalty", "frequency_penalty is not supported"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options can only be set when stream is true"
        return None

    def constraint_fields(self) -> dict[str, Any]:
        """SamplingParams fields for `response_format` / `structured_outputs`; raises ValueError when malformed."""
        out: dict[str, Any] = {}
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                out["json_object"] = True
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                    raise ValueError("response_format.json_schema must be an object with a 'schema' object")
                out["json_schema"] = js.get("schema", {})
            elif kind != "text":
                raise ValueError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")
        so = self.structured_outputs
        if so is not None:
            keys = {
                "json": "json_schema",
                "regex": "regex",
                "choice": "choice",
                "grammar": "grammar",
                "json_object": "json_object",
            }
            given = {k: v for k, v in so.items() if k in keys and v not in (None, False)}
            unknown = sorted(
                set(so)
                - set(keys)
                - {"disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"}
            )
            if unknown:
                raise ValueError(f"structured_outputs has unsupported field {unknown[0]!r}")
            if len(given) != 1 or out:
                raise ValueError(
                    "give exactly one structured output constraint (response_format or one of "
                    "structured_outputs' json, regex, choice, grammar, json_object)"
                )
            ((k, v),) = given.items()
            out[keys[k]] = v
        return out

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_budget(self) -> Optional[int]:
        return self.max_tokens

    def output_logprobs(self) -> Optional[int]:
        """Alternatives per output token's log-probability (None: no logprobs)."""
        return None

    def constraint_param(self) -> str:
        """The request field a structured-output error is about."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The SamplingParams this request asks for, checked as far as possible without the model (RequestError
        naming the request field); `default_max_tokens` applies when no budget is given."""
        kw: dict[str, Any] = {
            k.name: getattr(self, k.api_name) for k in KNOBS if k.api_name and getattr(self, k.api_name) is not None
        }
        kw.update(
            max_new_tokens=self.token_budget() or max(1, default_max_tokens),
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            suffix=getattr(self, "suffix", None),
            n=self.n or 1,
            logprobs=self.output_logprobs(),
        )
        kw.update({k: float(v) for k, v in kw.items() if k in ("temperature", "top_p")})
        try:
            kw.update(self.constraint_fields())
        except ValueError as e:
            raise RequestError(str(e), self.constraint_param()) from None
        try:
            return SamplingParams(**kw).validate()
        except SamplingParamError as e:
            raise RequestError(str(e), api_param(e.param)) from None


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: Optional[int] = Field(default=None, ge=0)  # 0: no new tokens (`echo` scoring, lm-evaluation-harness)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    # BOS first: text prompts get it; token-id prompts too when the checkpoint's tokenizer adds BOS (false: as sent)
    add_special_tokens: bool = True

    def output_logprobs(self) -> Optional[int]:
        return self.logprobs

    def token_budget(self) -> Optional[int]:
        return self.max_tokens or None  # 0 generates nothing: the server answers without the engine

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> PromptInput:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # [text] or [[ids]]
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                return v
            if all(isinstance(t, (str, list)) for t in v):
                raise ValueError("only one prompt per request is supported (got a list of several prompts)")
        raise ValueError("prompt must be a string, a list of token ids, or a list holding one of those")

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo and self.suffix is not None:
            return "echo", "echo cannot be combined with suffix"
        if self.max_tokens == 0 and self.stream:
            return "max_tokens", "max_tokens 0 cannot be streamed"
        if self.best_of is not None and self.best_of != 1:
            return "best_of", "best_of > 1 is not supported"
        return super().unsupported()


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def output_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_budget(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeCompletionRequest(_Strict):
    """POST /tokenize with a text prompt (vLLM's shape). `add_special_tokens`: the ids /v1/completions would give
    the text (BOS first, when the tokenizer has one); false: the text's own tokens only."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        return None


class TokenizeChatRequest(_Strict):
    """POST /tokenize with chat messages (vLLM's shape): the ids of the prompt /v1/chat/completions would render
    (the template writes BOS itself; `add_special_tokens` also runs the tokenizer's post-processor)."""

    model: Optional[str] = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Literal["none"] = "none"  # the tools are written into the prompt; nothing is generated
    parallel_tool_calls: Optional[bool] = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.continue_final_message:
            return "continue_final_message", "continue_final_message is not supported"
        return None


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape): token ids -> `{"prompt": text}`."""

    model: Optional[str] = None
    tokens: list[int]

    def unsupported(self) -> tuple[str, str] | None:
        return None


def tokenize_response(tokens: list[int], max_model_len: int, token_strs: list[str] | None) -> dict[str, Any]:
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": token_strs}


# -- responses (plain dicts built by helpers: the shapes are OpenAI's) -----------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(
    message: str, type_: str = "BadRequestError", param: str | None = None, code: int | str | None = 400
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(
    prompt_tokens: int, completion_tokens: int, tokens_per_forward: float = 0.0, denoising_steps: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "tokens_per_forward": tokens_per_forward,
        "denoising_steps": denoising_steps,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int, message: dict[str, Any], finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def response(
    rid: str,
    created: int,
    model: str,
    obj: str,
    choices: list[dict[str, Any]],
    use: dict[str, Any],
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """A whole (non-streaming) response: `obj` "text_completion" or "chat.completion"; `warnings` (what a
    constraint could not enforce, e.g. an unknown format) only when there are any."""
    out = {**_envelope(rid, created, model, obj, choices), "usage": use}
    return {**out, "warnings": warnings} if warnings else out


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    text: str = "",
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A /v1/completions streaming chunk; `extra` as in `_chunk`."""
    return _chunk(
        rid, created, model, "text_completion", completion_choice(index, text, finish_reason, logprobs), **extra
    )


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A /v1/chat/completions streaming chunk; `extra` as in `_chunk`."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _chunk(rid, created, model, "chat.completion.chunk", choice, **extra)


def _chunk(
    rid: str,
    created: int,
    model: str,
    obj: str,
    choice: dict[str, Any],
    use: dict[str, Any] | None = None,
    include_usage: bool = False,
    draft: str | None = None,
) -> dict[str, Any]:
    """A streaming chunk: one choice, usage when asked for (null until the last chunk), the draft if any."""
    out = _envelope(rid, created, model, obj, [choice])
    if include_usage:
        out["usage"] = use
    if draft is not None:
        out["draft"] = draft
    return out


def usage_chunk(rid: str, created: int, model: str, object_: str, use: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, just usage."""
    return {**_envelope(rid, created, model, object_, []), "usage": use}


def _envelope(rid: str, created: int, model: str, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
