"""Request handling for /v1/completions and /v1/chat/completions: parse, translate to `SamplingParams`, tokenize
and validate through the input processor `LLM` uses too (`inputs`), submit to the engine loop, then answer (whole
or streamed)."""

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dgemma.entrypoints.engine_loop import EngineLoop, TorchThread
from dgemma.entrypoints.errors import APIError, ClientGone, empty_response, json_response
from dgemma.entrypoints.generation import Generation, Result, Update, collect, total_usage
from dgemma.entrypoints.metrics import Metrics
from dgemma.entrypoints.request_io import parse_request, read_json, until_disconnect
from dgemma.entrypoints.streaming import SSEResponse, stream_events

if TYPE_CHECKING:
    from dgemma.engine.params import SamplingParams
    from dgemma.engine.request import EngineRequest
    from dgemma.entrypoints.llm import LLM
    from dgemma.text.chat import ChatPrompt


class ServerState:
    """The serving state of one app: the model, its engine loop, metrics and limits."""

    def __init__(
        self,
        llm: "LLM",
        model_name: str,
        max_queue: int,
        request_timeout: float,
        max_body_bytes: int,
        torch_thread: TorchThread,
    ):
        self.llm, self.model_name = llm, model_name
        self.request_timeout, self.max_body_bytes = request_timeout, max_body_bytes
        self.metrics = Metrics(model_name)
        self.engine_loop = EngineLoop(llm, max_queue, self.metrics, torch_thread)
        self.created = int(time.time())
        self.endpoints = _endpoints()

    def _check_text_length(self, text: str) -> None:
        """Refuse an enormous prompt before tokenizing all of it: tokenize a prefix and see it is over the limit."""
        eng = self.llm.engine
        limit = eng.max_model_len
        probe = 32 * (limit + eng.canvas_length) + 1024
        if len(text) > probe:
            n = len(self.llm.tokenizer.encode(text[:probe]))
            if n > limit + eng.canvas_length + 16:
                raise APIError(
                    400,
                    f"the prompt is too long: over {n - 16} tokens ({len(text)} characters); the "
                    f"context length is {limit} tokens",
                    param="prompt",
                )

    def encode_completion_prompt(self, prompt: Any, add_special_tokens: bool = True) -> list[int]:
        """A completion prompt's token ids (entrypoints.inputs): text with BOS first (not with `add_special_tokens`
        false), token ids as sent."""
        if isinstance(prompt, str):
            if self.llm.tokenizer is None:
                raise APIError(
                    400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt"
                )
            self._check_text_length(prompt)
        try:
            return self.llm.inputs.tokenize(
                prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}, add_special_tokens
            ).ids
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    def render_chat(self, req: Any) -> "ChatPrompt":
        """The chat request's prompt, rendered by the checkpoint's template with its tools and template kwargs."""
        from dgemma.text.chat import ChatRequestError

        if self.llm.tokenizer is None:
            raise APIError(
                400,
                "this model has no tokenizer, so chat is unavailable: use /v1/completions with token ids",
                param="messages",
            )
        try:
            prompt = self.llm.inputs.render_chat(
                req.messages,
                req.tools,
                req.tool_choice,
                req.parallel_tool_calls,
                req.chat_template_kwargs,
                req.add_generation_prompt,
            )
        except ChatRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        self._check_text_length(prompt.text)
        return prompt

    def encode_chat(self, prompt: "ChatPrompt", add_special_tokens: bool = False) -> list[int]:
        """A rendered chat prompt's ids (the template wrote BOS; `add_special_tokens` also runs the tokenizer's
        post-processor)."""
        try:
            return self.llm.inputs.chat_ids(prompt, add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def request(self, req: Any, prompt_ids: list[int], chat: "ChatPrompt | None" = None) -> "EngineRequest":
        """The request validated once (entrypoints.inputs): `protocol`'s translation to SamplingParams, then the
        input processor's (suffix tokens, the tools' constraint) and the engine's checks (vocabulary, context,
        the constraint compiled). APIError naming the request field."""
        from dgemma.entrypoints.inputs import CONSTRAINT, error_field
        from dgemma.entrypoints.protocol import RequestError, api_param

        try:
            params = req.sampling_params(self.llm.engine.max_model_len - len(prompt_ids))
            return self.llm.inputs.request(prompt_ids, params, chat)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except ValueError as e:
            field = error_field(e)
            if field == CONSTRAINT:  # the tools' constraint, or the response format's
                field = "tools" if chat is not None and chat.parses_tools else req.constraint_param()
            raise APIError(400, str(e), param=api_param(field)) from None


@dataclass
class Job:
    """A parsed request ready for the engine: its prompt, params and what its answer is read with."""

    req: Any
    request: "EngineRequest"  # validated: the prompt's ids, the resolved params, the compiled constraint
    chat: "ChatPrompt | None" = None  # chat requests
    echo_text: str = ""  # completions with `echo`: the prompt's text, returned before the completion
    echo_logprobs: list[Any] | None = None  # ... and its tokens' log-probabilities, when asked for
    hidden: int = 0  # leading prompt tokens the server added (a token-id prompt's BOS): never echoed

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> "SamplingParams":
        return self.request.params

    @property
    def echo_ids(self) -> list[int]:
        """The prompt's tokens as the client sent them (what `echo` returns)."""
        return self.prompt_ids[self.hidden :]

    def token_text(self, srv: "ServerState") -> Callable[[int], str]:
        """How a token is named in logprobs: its text, or "token_id:N" (vLLM's `return_tokens_as_token_ids`)."""
        if self.req.return_tokens_as_token_ids or srv.llm.tokenizer is None:
            return lambda t: f"token_id:{t}"
        return lambda t: srv.llm.tokenizer.decode([t], skip_special_tokens=False)


def _prepare_completion(srv: "ServerState", req: Any) -> Job:
    ids = srv.encode_completion_prompt(req.prompt, req.add_special_tokens)
    bos = srv.llm.inputs.bos_for_ids(ids) if req.add_special_tokens and not isinstance(req.prompt, str) else []
    job = Job(req, srv.request(req, bos + ids), hidden=len(bos))
    if req.echo:
        job.echo_text = req.prompt if isinstance(req.prompt, str) else srv.llm.decode(ids)
    return job


def _prepare_chat(srv: "ServerState", req: Any) -> Job:
    prompt = srv.render_chat(req)
    ids = srv.encode_chat(prompt)
    return Job(req, srv.request(req, ids, prompt), chat=prompt)


def _completion_choice(srv: "ServerState", job: Job, i: int, res: Result) -> dict[str, Any]:
    from dgemma.engine.logprobs import completion_logprobs
    from dgemma.entrypoints.protocol import completion_choice

    lp = None
    if job.req.logprobs is not None:
        echo = job.echo_logprobs or []
        ids = (job.echo_ids if echo else []) + res.token_ids
        lp = completion_logprobs(echo + res.logprobs, ids, job.token_text(srv))
    return completion_choice(i, job.echo_text + res.text, res.finish_reason, lp)


def _chat_choice(srv: "ServerState", job: Job, i: int, res: Result) -> dict[str, Any]:
    from dgemma.engine.logprobs import chat_logprobs
    from dgemma.entrypoints.protocol import chat_choice

    msg = res.message.to_openai() if res.message is not None else {"role": "assistant", "content": res.text}
    lp = chat_logprobs(res.logprobs, job.token_text(srv)) if job.req.logprobs else None
    return chat_choice(i, msg, res.finish_reason, lp)


def _completion_chunk(
    srv: "ServerState", job: Job, rid: str, created: int, i: int, upd: Update, **extra: Any
) -> dict[str, Any]:
    from dgemma.engine.logprobs import completion_logprobs
    from dgemma.entrypoints.protocol import completion_chunk

    lp = None
    if job.req.logprobs is not None and upd.token_ids:
        lp = completion_logprobs(upd.logprobs or [], upd.token_ids, job.token_text(srv))
    return completion_chunk(rid, created, srv.model_name, upd.text, upd.finish_reason, i, lp, **extra)


def _chat_chunk(
    srv: "ServerState", job: Job, rid: str, created: int, i: int, upd: Update, **extra: Any
) -> dict[str, Any]:
    from dgemma.engine.logprobs import chat_logprobs
    from dgemma.entrypoints.protocol import chat_chunk

    delta = upd.chat.to_openai() if upd.chat is not None else ({"content": upd.text} if upd.text else {})
    lp = chat_logprobs(upd.logprobs, job.token_text(srv)) if job.req.logprobs and upd.token_ids else None
    return chat_chunk(rid, created, srv.model_name, delta, upd.finish_reason, i, lp, **extra)


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions; `generate` does the rest."""

    schema: str  # the protocol class of the request
    id_prefix: str
    obj: str  # `object` of a whole response
    chunk_object: str  # `object` of the usage-only last chunk
    prepare: Callable[["ServerState", Any], Job]  # request -> prompt and params (APIError when it cannot)
    choice: Callable[..., dict[str, Any]]  # (srv, job, index, Result) -> a response choice
    chunk: Callable[..., dict[str, Any]]  # (srv, job, rid, created, index, Update, **extra) -> a stream chunk
    role_chunk: bool  # chat streams open with a chunk giving the assistant role


def _endpoints() -> dict[str, Endpoint]:
    return {
        "completions": Endpoint(
            "CompletionRequest",
            "cmpl",
            "text_completion",
            "text_completion",
            _prepare_completion,
            _completion_choice,
            _completion_chunk,
            False,
        ),
        "chat": Endpoint(
            "ChatCompletionRequest",
            "chatcmpl",
            "chat.completion",
            "chat.completion.chunk",
            _prepare_chat,
            _chat_choice,
            _chat_chunk,
            True,
        ),
    }


async def generate(request: Any, ep: Endpoint) -> Any:
    """Parse, tokenize, translate, submit; then stream the result or wait for it."""
    from dgemma.entrypoints import protocol as P

    srv: ServerState = request.app.state.dgemma
    t0 = time.perf_counter()
    req = parse_request(getattr(P, ep.schema), await read_json(request, srv.max_body_bytes), srv.model_name)
    srv.engine_loop.check_available()
    job = await asyncio.to_thread(ep.prepare, srv, req)
    rid, created = P.new_id(ep.id_prefix), P.now()
    if getattr(req, "echo", False) and req.logprobs is not None:  # the prompt's log-probabilities, scored first
        scored = await srv.engine_loop.score(rid + "-prompt", job.prompt_ids, req.logprobs)
        job.echo_logprobs = scored[job.hidden :]
    if getattr(req, "max_tokens", None) == 0:  # nothing to generate (echo scoring)
        results = [Result("", [], [], "length", P.usage(len(job.prompt_ids), 0))] * job.params.n
        return json_response(_response(srv, ep, job, rid, created, results))
    queues = await srv.engine_loop.submit(rid, job.request, bool(req.stream_drafts and req.stream))
    gens = [
        Generation(srv, sid, q, len(job.prompt_ids), job.params, t0, request if req.stream else None, job.chat)
        for sid, q in queues
    ]
    if req.stream:
        return SSEResponse(gens, stream_events(srv, gens, ep, job, rid, created))
    try:
        results = await until_disconnect(request, asyncio.gather(*(collect(g) for g in gens)))
    except ClientGone:
        return empty_response(499)
    finally:
        for g in gens:
            g.close()
    return json_response(_response(srv, ep, job, rid, created, results))


def _response(
    srv: "ServerState", ep: Endpoint, job: Job, rid: str, created: int, results: list[Result]
) -> dict[str, Any]:
    from dgemma.entrypoints.protocol import response

    constraint = job.request.constraint
    warnings = srv.llm.engine.guides.warnings(constraint) if constraint is not None else None
    choices = [ep.choice(srv, job, i, res) for i, res in enumerate(results)]
    return response(rid, created, srv.model_name, ep.obj, choices, total_usage([r.usage for r in results]), warnings)
