"""An OpenAI-compatible HTTP server over one `LLM` (vLLM's conventions, kept thin).

    python -m dgemma.entrypoints.server --model PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 64]

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /version,
GET /metrics (Prometheus). Request/response shapes and the accepted sampling fields are documented in
`dgemma.entrypoints.protocol`; in diffusion mode (the default) `temperature`/`top_p`/`top_k` are ignored (the denoising
temperature follows the t_max -> t_min schedule); they apply in `mode="ar"`.

Concurrency model: ONE background thread owns the `Engine` and calls `step()` while there is work, so requests
are batched continuously (a new request joins at the next step, a finished one leaves). The asyncio side sends
typed commands (`_Add`, `_Abort`, `_Finish`, `_Stop`) through a thread-safe queue; the engine thread answers with
replies (`_Accepted`, `_Rejected`, `_Aborted`) and the engine's `Event`s, one `loop.call_soon_threadsafe` per step,
which routes them into per-request `asyncio.Queue`s. Only the engine thread ever touches the engine. Text is made
by `output.OutputProcessor`, as in `LLM`; requests become `SamplingParams` in `protocol`.

Admission control: at most `max_queue` requests are in flight (waiting + running); more get 429 with Retry-After.
A request that exceeds `request_timeout` is aborted (504). A client that disconnects (streaming or not) has its
request aborted, which frees its cache row at once. If the engine thread dies, /health answers 503 and requests get
500 error bodies; the process keeps serving those answers. On SIGTERM/SIGINT the server stops admitting (503),
lets in-flight requests finish (up to --shutdown-timeout seconds, then aborts them), stops the engine thread and
exits with status 0.

Heavy imports (fastapi, uvicorn, prometheus_client, pydantic) happen inside `create_app`/`run_serve`, so that
`add_serve_arguments` can be used by a CLI without the `serve` extras installed.
"""

import argparse
import asyncio
import concurrent.futures
import json
import logging
import queue
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Union

from dgemma import __version__

if TYPE_CHECKING:  # imported lazily: `dgemma --help` (which imports this module to register `serve`) stays fast
    from dgemma.text.chat import ChatPrompt
    from dgemma.text.chat_output import ChatDelta, ChatMessage
    from dgemma.engine.core import Event
    from dgemma.entrypoints.llm import LLM
    from dgemma.engine.params import SamplingParams

logger = logging.getLogger("dgemma.entrypoints.server")

DEFAULT_MAX_BODY_BYTES = 16 << 20
_STATUS_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or _STATUS_TYPES.get(status, "APIError")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class _ClientGone(Exception):
    pass


# -- metrics --------------------------------------------------------------------------------------------------------
class _Metrics:
    """Prometheus metrics in their own registry (several apps may live in one process, e.g. in tests)."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        L = ["model_name"]
        self.labels = {"model_name": model_name}
        self.running = Gauge("dgemma:num_requests_running", "Requests holding a cache row.", L, registry=r)
        self.waiting = Gauge("dgemma:num_requests_waiting", "Requests queued in the engine for a row.", L, registry=r)
        self.prompt_tokens = Counter("dgemma:prompt_tokens", "Prompt tokens of admitted requests.", L, registry=r)
        self.generation_tokens = Counter("dgemma:generation_tokens", "Generated (committed) tokens.", L, registry=r)
        self.finished = Counter("dgemma:request_success", "Finished requests.", L + ["finished_reason"], registry=r)
        self.rejected = Counter(
            "dgemma:request_rejected", "Requests refused or failed, by HTTP status.", L + ["status"], registry=r
        )
        self.aborted = Counter("dgemma:request_aborted", "Requests aborted (disconnect or timeout).", L, registry=r)
        self.tokens_per_forward = Histogram(
            "dgemma:tokens_per_forward",
            "Completion tokens per decoder pass (per token step in AR mode).",
            L,
            buckets=(0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.steps_per_canvas = Histogram(
            "dgemma:denoising_steps_per_canvas",
            "Denoising steps per committed canvas (request average, one observation per canvas).",
            L,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256),
            registry=r,
        )
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
        self.ttft = Histogram(
            "dgemma:time_to_first_token_seconds",
            "Request arrival to first committed tokens.",
            L,
            buckets=lat,
            registry=r,
        )
        self.e2e = Histogram(
            "dgemma:e2e_request_latency_seconds", "Request arrival to completion.", L, buckets=lat, registry=r
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- the engine thread -------------------------------------------------------------------------------------------------
class TorchThread:
    """One long-lived thread for all torch work: loading the model and running the engine.

    OpenMP thread pools belong to the thread that calls into torch; a model loaded in one thread and run in
    another left two pools fighting over the cores (measured: engine steps 2-3x slower on 2 cores).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="dgemma-engine", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    fut.set_exception(e)

    def submit(self, fn: Any) -> "concurrent.futures.Future":
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn: Any) -> Any:
        """Run `fn` on the torch thread and return its result (or raise its exception)."""
        return self.submit(fn).result()


# -- messages between the asyncio side and the engine thread ----------------------------------------------------------
@dataclass
class _Add:
    """Queue the request's samples (ids `sample_ids`, the first being `rid`; more when params.n > 1)."""

    rid: str
    prompt_ids: list[int]
    params: "SamplingParams"
    drafts: bool
    sample_ids: list[str]


@dataclass
class _Score:
    """The prompt tokens' log-probabilities (`echo` with `logprobs`): one encoder pass on the engine thread."""

    rid: str
    prompt_ids: list[int]
    top_k: int


@dataclass
class _Scored:
    logprobs: list[Any]


@dataclass
class _Abort:
    rid: str


@dataclass
class _Finish:
    """End a running request early (a stop string matched), keeping its first `completion_tokens` tokens."""

    rid: str
    completion_tokens: int


@dataclass
class _Stop:
    """Shut the engine thread down."""


@dataclass
class _Accepted:
    pass


@dataclass
class _Rejected:
    """The engine refused the request (or failed): answered with `status`."""

    status: int
    message: str
    param: str | None = None


@dataclass
class _Aborted:
    """A `_Finish` found the request no longer running (its 'finished' event, if any, is on the way)."""


_Command = Union[_Add, _Abort, _Finish, _Stop, _Score]
_Reply = Union[_Accepted, _Rejected, _Aborted, _Scored, "Event"]


class EngineLoop:
    """Runs the engine on the torch thread (`_EngineWorker`) and routes its replies and events to per-request
    asyncio queues."""

    def __init__(self, llm: "LLM", max_queue: int, metrics: _Metrics, torch_thread: TorchThread):
        self.llm, self.engine, self.max_queue = llm, llm.engine, max_queue
        self.torch_thread = torch_thread
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job: concurrent.futures.Future | None = None
        self._worker = _EngineWorker(llm.engine, metrics, self._cmds, self._post)
        self.draining = False  # set on shutdown: no new requests

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._job = self.torch_thread.submit(self._worker.run)  # run where the model was loaded

    @property
    def error(self) -> str | None:
        """Why the engine thread died (None while it is well)."""
        return self._worker.error

    @property
    def running(self) -> bool:
        return self._job is not None and not self._job.done()

    @property
    def healthy(self) -> bool:
        return self.error is None and not self.draining and self.running

    @property
    def num_inflight(self) -> int:
        return len(self._queues)

    def check_available(self) -> None:
        if self.error is not None or (self._job is not None and not self.running and not self.draining):
            raise APIError(500, f"the engine has failed and cannot serve requests: {self.error}")
        if self.draining or self._job is None:
            raise APIError(503, "the server is shutting down")

    async def submit(
        self, rid: str, prompt_ids: list[int], params: "SamplingParams", drafts: bool
    ) -> list[tuple[str, asyncio.Queue]]:
        """Queue a request's `params.n` samples; returns each one's id and event queue once the engine accepted
        them (APIError if it did not)."""
        self.check_available()
        ids = [rid] if params.n == 1 else [f"{rid}-{i}" for i in range(params.n)]
        if len(self._queues) + len(ids) > self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self.max_queue} requests in flight); retry later",
                headers={"Retry-After": "1"},
            )
        queues = [(sid, asyncio.Queue()) for sid in ids]
        self._queues.update(queues)
        reply = await self._ask(_Add(ids[0], prompt_ids, params, drafts, ids), queues[0][1], ids)
        if isinstance(reply, _Rejected):
            for sid in ids:
                self.release(sid)
            raise APIError(reply.status, reply.message, param=reply.param)
        return queues

    async def score(self, rid: str, prompt_ids: list[int], top_k: int) -> list[Any]:
        """The prompt's log-probabilities (logprobs.prompt_logprobs), computed on the engine thread."""
        self.check_available()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        try:
            reply = await self._ask(_Score(rid, prompt_ids, top_k), q, [rid])
        finally:
            self.release(rid)
        if isinstance(reply, _Rejected):
            raise APIError(reply.status, reply.message)
        return reply.logprobs

    async def _ask(self, cmd: _Command, q: asyncio.Queue, ids: list[str]) -> _Reply:
        self._cmds.put(cmd)
        try:
            return await q.get()
        except BaseException:
            for sid in ids:
                self.abort(sid)
                self.release(sid)
            raise

    def abort(self, rid: str) -> None:
        self._cmds.put(_Abort(rid))

    def finish(self, rid: str, completion_tokens: int) -> None:
        """End a request early keeping `completion_tokens`; its handler then receives the 'finished' event, or
        `_Aborted` if the request was no longer running."""
        self._cmds.put(_Finish(rid, completion_tokens))

    def release(self, rid: str) -> None:
        self._queues.pop(rid, None)

    async def shutdown(self, timeout: float = 10.0) -> None:
        self.draining = True
        if self.running:
            self._cmds.put(_Stop())
            with suppress(Exception):  # a timeout, or the engine's own failure (already reported)
                await asyncio.wait_for(asyncio.wrap_future(self._job), timeout)

    def _post(self, items: list[tuple[str | None, _Reply]]) -> None:
        """Called on the engine thread: hand `items` to the event loop (one wake-up per step)."""
        if items and self._loop is not None:
            with suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[str | None, _Reply]]) -> None:
        for rid, item in items:
            if rid is None:  # broadcast (the engine died or stopped)
                for q in self._queues.values():
                    q.put_nowait(item)
            elif rid in self._queues:
                self._queues[rid].put_nowait(item)


class _EngineWorker:
    """The engine thread's loop: run the queued commands, step the engine while it has work, post what happened
    (`(request id or None for everyone, reply or Event)` pairs) through `post`."""

    def __init__(
        self,
        engine: Any,
        metrics: _Metrics,
        cmds: queue.SimpleQueue,
        post: Callable[[list[tuple[str | None, _Reply]]], None],
    ) -> None:
        self.engine, self.metrics, self.cmds, self.post = engine, metrics, cmds, post
        self.error: str | None = None  # set when the loop died

    def run(self) -> None:
        eng = self.engine
        out: list = []
        try:
            while self._commands(out):
                if eng.has_unfinished():
                    out.extend((ev.request_id, ev) for ev in eng.step())
                self._gauges()
                self.post(out)
                out = []
            for r in list(eng.waiting) + [r for r in eng.rows if r is not None]:  # shutdown: abort what is left
                eng.abort(r.id)
            self._gauges()
            out.append((None, _Rejected(503, "the server is shutting down")))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("the engine thread failed; the server now answers 500/503")
            out.append((None, _Rejected(500, f"the engine failed: {self.error}")))
        self.post(out)

    def _commands(self, out: list) -> bool:
        """Handle the queued commands (waiting a little for one when the engine is idle); False on `_Stop`."""
        block = not self.engine.has_unfinished()
        while True:
            try:
                cmd = self.cmds.get(timeout=0.5) if block else self.cmds.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, _Stop):
                return False
            self._handle(cmd, out)
            block = False

    def _handle(self, cmd: _Command, out: list) -> None:
        if isinstance(cmd, _Add):
            out.append((cmd.rid, self._add(cmd)))
        elif isinstance(cmd, _Abort):
            self.engine.abort(cmd.rid)
        elif isinstance(cmd, _Finish):
            ev = self.engine.finish_request(cmd.rid, "stop", completion_tokens=cmd.completion_tokens)
            # None: it was not running (still waiting, or already finished with its event on the way)
            out.append((cmd.rid, ev if ev is not None else _Aborted()))
        elif isinstance(cmd, _Score):
            from dgemma.engine.logprobs import prompt_logprobs

            out.append((cmd.rid, _Scored(prompt_logprobs(self.engine.model, cmd.prompt_ids, cmd.top_k))))

    def _add(self, cmd: _Add) -> _Reply:
        try:
            self.engine.add_samples(cmd.prompt_ids, cmd.params, request_ids=cmd.sample_ids, stream_drafts=cmd.drafts)
        except ValueError as e:
            return _Rejected(400, str(e), getattr(e, "param", None))
        except Exception as e:  # a bug, not the client's fault; the engine state is unchanged
            logger.exception("add_request failed")
            return _Rejected(500, f"failed to queue the request: {type(e).__name__}: {e}")
        self.metrics.prompt_tokens.labels(**self.metrics.labels).inc(len(cmd.prompt_ids))  # once for n samples
        return _Accepted()

    def _gauges(self) -> None:
        m = self.metrics
        m.running.labels(**m.labels).set(self.engine.num_running)
        m.waiting.labels(**m.labels).set(self.engine.num_waiting)


# -- one request's output --------------------------------------------------------------------------------------------
@dataclass
class _Update:
    text: str = ""
    draft: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None  # one TokenLogprob per token (when asked for)
    chat: "ChatDelta | None" = None  # the text split into content, reasoning and tool calls (chat in a known format)


@dataclass
class _Result:
    """A whole sample (non-streaming)."""

    text: str
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str
    usage: dict[str, Any]
    message: "ChatMessage | None" = None


class _Generation:
    """Consumes one sample's events and turns them into updates (used by streaming and non-streaming). Chat in a
    tool/thinking format decodes with the format's markers kept and splits the text with `parser`."""

    def __init__(
        self,
        server: "_Server",
        rid: str,
        q: asyncio.Queue,
        prompt_len: int,
        params: "SamplingParams",
        t_arrival: float,
        request: Any = None,
        chat: "ChatPrompt | None" = None,
    ):
        from dgemma.text.chat import output_decoder
        from dgemma.text.chat_output import ChatOutputParser
        from dgemma.entrypoints.output import OutputProcessor

        self.server, self.rid, self.q, self.prompt_len, self.params = server, rid, q, prompt_len, params
        self.loop = asyncio.get_running_loop()
        self.t_arrival = t_arrival
        self.deadline = self.loop.time() + server.request_timeout
        self.request = request  # for disconnect polling while streaming
        fmt = chat.format if chat is not None else None
        self.parser = None if fmt is None else ChatOutputParser(fmt, chat.parses_tools, chat.in_reasoning)
        decoder = server.llm.decoder() if fmt is None else output_decoder(server.llm.tokenizer, fmt)
        self.out = OutputProcessor(decoder, params.stop, lambda n: server.engine_loop.finish(rid, n))
        self.done = False
        self.t_first: float | None = None

    async def _get(self) -> Any:
        while True:
            remaining = self.deadline - self.loop.time()
            if remaining <= 0:  # close() then aborts the request
                raise APIError(504, f"the request timed out after {self.server.request_timeout:g} s and was aborted")
            try:
                return await asyncio.wait_for(self.q.get(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                if self.request is not None and await self.request.is_disconnected():
                    raise _ClientGone() from None

    async def next(self) -> _Update | None:
        while not self.done:
            item = await self._get()
            if isinstance(item, _Rejected):
                self.done = True
                raise APIError(item.status, item.message)
            if isinstance(item, _Aborted):
                delta = self.out.finish("stop", {}) if self.out.stopping else None
            else:
                if item.kind == "tokens" and not self.out.stopping:
                    self._count_tokens(len(item.token_ids))
                delta = self.out.on_event(item)
            if delta is not None and delta.finished:
                return self._finish(delta)
            if delta is not None and (delta.text or delta.token_ids or delta.draft_token_ids is not None):
                draft = None if delta.draft_token_ids is None else self.server.llm.decode(delta.draft_token_ids)
                chat = self.parser.push(delta.text) if self.parser is not None else None
                return _Update(delta.text, draft, None, None, delta.token_ids, delta.logprobs, chat)
        return None

    def _count_tokens(self, n: int) -> None:
        m = self.server.metrics
        m.generation_tokens.labels(**m.labels).inc(n)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            m.ttft.labels(**m.labels).observe(self.t_first - self.t_arrival)

    def _finish(self, delta: Any) -> _Update:
        from dgemma.entrypoints.protocol import usage

        self.done = True
        text, reason, em = delta.text, delta.finish_reason, delta.metrics
        if em.get("error"):  # the request's constraint tripped a resource limit mid-way (the engine went on)
            raise APIError(400, str(em["error"]), param="response_format" if self.params.constraint() else None)
        chat = None
        if self.parser is not None:
            chat = self.parser.push(text).extend(self.parser.finish())
            reason = "tool_calls" if self.parser.calls and reason == "stop" else reason
        n = len(self.out.tokens)
        forwards = em.get("forwards", 0)
        tpf = n / forwards if forwards else 0.0
        self._observe(reason, em, tpf)
        use = usage(self.prompt_len, n, tpf, int(em.get("denoising_steps", 0)))
        return _Update(text, None, reason, use, delta.token_ids, delta.logprobs, chat)

    def _observe(self, reason: str, em: dict[str, Any], tpf: float) -> None:
        m = self.server.metrics
        now = time.perf_counter()
        if self.t_first is None:
            m.ttft.labels(**m.labels).observe(now - self.t_arrival)
        m.e2e.labels(**m.labels).observe(now - self.t_arrival)
        m.finished.labels(**m.labels, finished_reason=reason).inc()
        if em.get("forwards", 0):
            m.tokens_per_forward.labels(**m.labels).observe(tpf)
        canvases, steps = int(em.get("canvases", 0)), int(em.get("denoising_steps", 0))
        if em.get("mode", self.params.mode) == "diffusion" and canvases:
            for _ in range(min(canvases, 1024)):
                m.steps_per_canvas.labels(**m.labels).observe(steps / canvases)

    def close(self) -> None:
        """Abort the request if it has not finished (disconnect, timeout, error) and forget its queue."""
        if not self.done:
            self.done = True
            self.server.engine_loop.abort(self.rid)
            self.server.metrics.aborted.labels(**self.server.metrics.labels).inc()
        self.server.engine_loop.release(self.rid)


# -- the app ---------------------------------------------------------------------------------------------------------
class _Server:
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
        self.metrics = _Metrics(model_name)
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

    def encode_completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.llm.tokenizer is None:
                raise APIError(
                    400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt"
                )
            self._check_text_length(prompt)
            try:
                return self.llm.encode_prompt(prompt)[1]
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from None
        return list(prompt)

    def render_chat(self, req: Any) -> "ChatPrompt":
        """The chat request's prompt, rendered by the checkpoint's template with its tools and template kwargs."""
        from dgemma.text.chat import ChatRequestError, render_chat

        tok = self.llm.tokenizer
        if tok is None:
            raise APIError(
                400,
                "this model has no tokenizer, so chat is unavailable: use /v1/completions with token ids",
                param="messages",
            )
        try:
            prompt = render_chat(
                tok,
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

    def encode_chat(self, prompt: "ChatPrompt") -> list[int]:
        try:
            return self.llm.tokenizer.encode(prompt.text)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def sampling(self, req: Any, prompt_ids: list[int], chat: "ChatPrompt | None" = None) -> "SamplingParams":
        """The request's SamplingParams (`protocol`'s translation, plus the tool-call constraint a chat request's
        tools ask for), then the checks that need the model: the suffix's tokens, the vocabulary, the constraint's
        compilation, the prompt's tokens and the context."""
        from dgemma.engine.core import check_context
        from dgemma.engine.params import SamplingParamError
        from dgemma.entrypoints.protocol import RequestError, api_param

        eng = self.llm.engine
        tools = chat is not None and chat.parses_tools
        try:
            params = req.sampling_params(eng.max_model_len - len(prompt_ids))
            params = self.llm.chat_params(chat, params) if tools else self.llm.prepare_params(params)
            params = params.validate(eng.vocab_size)
            constraint = params.constraint()
            if constraint is not None:  # compile now (bounded time, cached): a bad one is the client's 400
                if eng.guides is None:
                    raise ValueError("structured output needs the model's tokenizer")
                eng.guides.compile(constraint)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        except SamplingParamError as e:
            raise APIError(400, str(e), param=api_param(e.param)) from None
        except ValueError as e:  # the constraint did not compile (the tools' or the response format's)
            raise APIError(400, str(e), param="tools" if tools else req.constraint_param()) from None
        if not all(0 <= t < eng.vocab_size for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {eng.vocab_size})", param="prompt")
        try:
            check_context(len(prompt_ids), params, eng.max_model_len, eng.canvas_length)
        except ValueError as e:
            raise APIError(
                400, str(e), param="prompt" if len(prompt_ids) >= eng.max_model_len else "max_tokens"
            ) from None
        return params


async def _read_json(request: Any, max_body_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (APIError 400 or 413 when it is not one, or too large)."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mt = ctype.split(";")[0].strip().lower()
        if mt != "application/json" and not mt.endswith("+json"):
            raise APIError(400, f"unsupported content type {mt!r}: send a JSON body as application/json")
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
        raise APIError(413, f"the request body is larger than {max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"the request body is larger than {max_body_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:
        msg = str(e) if len(str(e)) < 200 else str(e)[:200] + "..."
        raise APIError(400, f"the request body is not valid JSON: {msg}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _parse(cls: Any, body: dict[str, Any], model_name: str) -> Any:
    """`body` validated as the protocol class `cls` (APIError naming the field when it is not valid)."""
    from pydantic import ValidationError

    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in err.get("loc", ())) or None
        msg = str(err.get("msg", "invalid value"))
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        raise APIError(400, f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg, param=loc) from None
    except (RecursionError, ValueError) as e:
        raise APIError(400, f"invalid request: {e}") from None
    unknown = [k for k in body if k not in cls.model_fields]
    if unknown:
        logger.warning("ignoring unknown request fields: %s", ", ".join(repr(k[:40]) for k in unknown[:10]))
    bad = req.unsupported()
    if bad is not None:
        raise APIError(400, bad[1], param=bad[0])
    if req.model is not None and req.model != model_name:
        raise APIError(404, f"The model `{req.model}` does not exist.", param="model")
    return req


async def _until_disconnect(request: Any, coro: Any) -> Any:
    """Run a non-streaming handler; if the client disconnects first, cancel it (its cleanup aborts the request)."""
    task = asyncio.ensure_future(coro)

    async def listen() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    listener = asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        listener.cancel()
        raise
    if task in done:
        listener.cancel()
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await task
    raise _ClientGone()


# -- handlers ----------------------------------------------------------------------------------------------------------
# Plain Starlette endpoints `async (request) -> response` (the app is a FastAPI app for its docs and conventions);
# the serving state lives in `request.app.state.dgemma`. Starlette is imported when a handler runs.
def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _empty(status: int) -> Any:
    from starlette.responses import Response

    return Response(status_code=status)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _api_error(request: Any, e: APIError) -> Any:
    if e.status >= 400:
        srv: _Server = request.app.state.dgemma
        srv.metrics.rejected.labels(**srv.metrics.labels, status=str(e.status)).inc()
    return _json(e.body(), e.status, e.headers)


async def _http_error(request: Any, e: Any) -> Any:
    from dgemma.entrypoints.protocol import error_body

    status = e.status_code
    return _json(error_body(str(e.detail), _STATUS_TYPES.get(status, "APIError"), None, status), status, e.headers)


async def _client_gone(request: Any, e: Exception) -> Any:
    return _empty(499)  # nobody is listening; just do not log a traceback


async def _internal_error(request: Any, e: Exception) -> Any:
    from dgemma.entrypoints.protocol import error_body

    logger.exception("unhandled error")
    return _json(error_body(f"internal error: {type(e).__name__}", "InternalServerError", None, 500), 500)


async def health(request: Any) -> Any:
    from dgemma.entrypoints.protocol import error_body

    el = request.app.state.dgemma.engine_loop
    if el.healthy:
        return _empty(200)
    reason = "the server is shutting down" if el.draining else f"the engine has failed: {el.error}"
    return _json(error_body(reason, "ServiceUnavailableError", None, 503), 503)


async def version(request: Any) -> Any:
    return _json({"version": __version__})


async def models(request: Any) -> Any:
    srv: _Server = request.app.state.dgemma
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": srv.model_name,
                    "object": "model",
                    "created": srv.created,
                    "owned_by": "dgemma",
                    "root": str(srv.llm.path),
                    "parent": None,
                    "max_model_len": srv.llm.engine.max_model_len,
                }
            ],
        }
    )


async def metrics(request: Any) -> Any:
    from starlette.responses import Response

    data, ctype = request.app.state.dgemma.metrics.render()
    return Response(content=data, media_type=ctype)


@dataclass
class _Job:
    """A parsed request ready for the engine: its prompt, params and what its answer is read with."""

    req: Any
    prompt_ids: list[int]
    params: "SamplingParams"
    chat: "ChatPrompt | None" = None  # chat requests
    echo_text: str = ""  # completions with `echo`: the prompt's text, returned before the completion
    echo_logprobs: list[Any] | None = None  # ... and its tokens' log-probabilities, when asked for

    def token_text(self, srv: "_Server") -> Callable[[int], str]:
        """How a token is named in logprobs: its text, or "token_id:N" (vLLM's `return_tokens_as_token_ids`)."""
        if self.req.return_tokens_as_token_ids or srv.llm.tokenizer is None:
            return lambda t: f"token_id:{t}"
        return lambda t: srv.llm.tokenizer.decode([t], skip_special_tokens=False)


def _prepare_completion(srv: "_Server", req: Any) -> _Job:
    ids = srv.encode_completion_prompt(req.prompt)
    job = _Job(req, ids, srv.sampling(req, ids))
    if req.echo:
        job.echo_text = req.prompt if isinstance(req.prompt, str) else srv.llm.decode(ids)
    return job


def _prepare_chat(srv: "_Server", req: Any) -> _Job:
    prompt = srv.render_chat(req)
    ids = srv.encode_chat(prompt)
    return _Job(req, ids, srv.sampling(req, ids, prompt), chat=prompt)


def _completion_choice(srv: "_Server", job: _Job, i: int, res: _Result) -> dict[str, Any]:
    from dgemma.engine.logprobs import completion_logprobs
    from dgemma.entrypoints.protocol import completion_choice

    lp = None
    if job.req.logprobs is not None:
        echo = job.echo_logprobs or []
        ids = (job.prompt_ids if echo else []) + res.token_ids
        lp = completion_logprobs(echo + res.logprobs, ids, job.token_text(srv))
    return completion_choice(i, job.echo_text + res.text, res.finish_reason, lp)


def _chat_choice(srv: "_Server", job: _Job, i: int, res: _Result) -> dict[str, Any]:
    from dgemma.engine.logprobs import chat_logprobs
    from dgemma.entrypoints.protocol import chat_choice

    msg = res.message.to_openai() if res.message is not None else {"role": "assistant", "content": res.text}
    lp = chat_logprobs(res.logprobs, job.token_text(srv)) if job.req.logprobs else None
    return chat_choice(i, msg, res.finish_reason, lp)


def _completion_chunk(
    srv: "_Server", job: _Job, rid: str, created: int, i: int, upd: _Update, **extra: Any
) -> dict[str, Any]:
    from dgemma.engine.logprobs import completion_logprobs
    from dgemma.entrypoints.protocol import completion_chunk

    lp = None
    if job.req.logprobs is not None and upd.token_ids:
        lp = completion_logprobs(upd.logprobs or [], upd.token_ids, job.token_text(srv))
    return completion_chunk(rid, created, srv.model_name, upd.text, upd.finish_reason, i, lp, **extra)


def _chat_chunk(
    srv: "_Server", job: _Job, rid: str, created: int, i: int, upd: _Update, **extra: Any
) -> dict[str, Any]:
    from dgemma.engine.logprobs import chat_logprobs
    from dgemma.entrypoints.protocol import chat_chunk

    delta = upd.chat.to_openai() if upd.chat is not None else ({"content": upd.text} if upd.text else {})
    lp = chat_logprobs(upd.logprobs, job.token_text(srv)) if job.req.logprobs and upd.token_ids else None
    return chat_chunk(rid, created, srv.model_name, delta, upd.finish_reason, i, lp, **extra)


@dataclass(frozen=True)
class _Endpoint:
    """What differs between /v1/completions and /v1/chat/completions; `_generate` does the rest."""

    schema: str  # the protocol class of the request
    id_prefix: str
    obj: str  # `object` of a whole response
    chunk_object: str  # `object` of the usage-only last chunk
    prepare: Callable[["_Server", Any], _Job]  # request -> prompt and params (APIError when it cannot)
    choice: Callable[..., dict[str, Any]]  # (srv, job, index, _Result) -> a response choice
    chunk: Callable[..., dict[str, Any]]  # (srv, job, rid, created, index, _Update, **extra) -> a stream chunk
    role_chunk: bool  # chat streams open with a chunk giving the assistant role


def _endpoints() -> dict[str, _Endpoint]:
    return {
        "completions": _Endpoint(
            "CompletionRequest",
            "cmpl",
            "text_completion",
            "text_completion",
            _prepare_completion,
            _completion_choice,
            _completion_chunk,
            False,
        ),
        "chat": _Endpoint(
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


async def completions(request: Any) -> Any:
    return await _generate(request, request.app.state.dgemma.endpoints["completions"])


async def chat_completions(request: Any) -> Any:
    return await _generate(request, request.app.state.dgemma.endpoints["chat"])


async def _generate(request: Any, ep: _Endpoint) -> Any:
    """Parse, tokenize, translate, submit; then stream the result or wait for it."""
    from dgemma.entrypoints import protocol as P

    srv: _Server = request.app.state.dgemma
    t0 = time.perf_counter()
    req = _parse(getattr(P, ep.schema), await _read_json(request, srv.max_body_bytes), srv.model_name)
    srv.engine_loop.check_available()
    job = await asyncio.to_thread(ep.prepare, srv, req)
    rid, created = P.new_id(ep.id_prefix), P.now()
    if getattr(req, "echo", False) and req.logprobs is not None:  # the prompt's log-probabilities, scored first
        job.echo_logprobs = await srv.engine_loop.score(rid + "-prompt", job.prompt_ids, req.logprobs)
    if getattr(req, "max_tokens", None) == 0:  # nothing to generate (echo scoring)
        results = [_Result("", [], [], "length", P.usage(len(job.prompt_ids), 0))] * job.params.n
        return _json(_response(srv, ep, job, rid, created, results))
    queues = await srv.engine_loop.submit(rid, job.prompt_ids, job.params, bool(req.stream_drafts and req.stream))
    gens = [
        _Generation(srv, sid, q, len(job.prompt_ids), job.params, t0, request if req.stream else None, job.chat)
        for sid, q in queues
    ]
    if req.stream:
        return _SSE(gens, _stream_events(srv, gens, ep, job, rid, created))
    try:
        results = await _until_disconnect(request, asyncio.gather(*(_collect(g) for g in gens)))
    except _ClientGone:
        return _empty(499)
    finally:
        for g in gens:
            g.close()
    return _json(_response(srv, ep, job, rid, created, results))


def _response(
    srv: "_Server", ep: _Endpoint, job: _Job, rid: str, created: int, results: list[_Result]
) -> dict[str, Any]:
    from dgemma.entrypoints.protocol import response

    constraint = job.params.constraint()
    warnings = srv.llm.engine.guides.warnings(constraint) if constraint is not None else None
    choices = [ep.choice(srv, job, i, res) for i, res in enumerate(results)]
    return response(rid, created, srv.model_name, ep.obj, choices, _total_usage([r.usage for r in results]), warnings)


def _total_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """One usage for n samples: the prompt once, the completions summed, tokens per forward averaged."""
    from dgemma.entrypoints.protocol import usage

    n = sum(u["completion_tokens"] for u in usages)
    tpf = sum(u["tokens_per_forward"] for u in usages) / len(usages)
    return usage(usages[0]["prompt_tokens"], n, tpf, sum(u["denoising_steps"] for u in usages))


async def _collect(gen: _Generation) -> _Result:
    """A non-streaming sample's whole text, tokens, logprobs and finish."""
    text: list[str] = []
    tokens: list[int] = []
    logprobs: list[Any] = []
    while True:
        upd = await gen.next()
        if upd is None:  # pragma: no cover - next() returns a finish update before None
            raise APIError(500, "the request ended without a result")
        text.append(upd.text)
        tokens += upd.token_ids
        logprobs += upd.logprobs or []
        if upd.finish_reason is not None:
            message = gen.parser.message() if gen.parser is not None else None
            return _Result("".join(text), tokens, logprobs, upd.finish_reason, upd.usage, message)


async def _merged(gens: list[_Generation]) -> AsyncIterator[tuple[int, _Update]]:
    """(sample index, update) pairs of several samples, as they come, until every one has finished."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: _Generation) -> None:
        try:
            while (upd := await gen.next()) is not None:
                await q.put((i, upd, None))
                if upd.finish_reason is not None:
                    break
        except BaseException as e:  # handed to the consumer
            await q.put((i, None, e))
            return
        await q.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, upd, err = await q.get()
            if err is not None:
                raise err
            if upd is None:
                left -= 1
            else:
                yield i, upd
    finally:
        for t in tasks:
            t.cancel()


async def _stream_events(
    srv: "_Server", gens: list[_Generation], ep: _Endpoint, job: _Job, rid: str, created: int
) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, ending with `data: [DONE]` (errors become an error event)."""
    from dgemma.entrypoints.protocol import chat_chunk, error_body, usage_chunk

    req = job.req
    inc = bool(req.stream_options and req.stream_options.include_usage)
    name, usages = srv.model_name, []
    try:
        for i in range(len(gens)):  # openings: the assistant role (chat), the echoed prompt (completions)
            if ep.role_chunk:
                yield _sse(
                    chat_chunk(rid, created, name, {"role": "assistant", "content": ""}, index=i, include_usage=inc)
                )
            elif job.echo_text:
                echo = _Update(
                    job.echo_text, token_ids=job.prompt_ids if job.echo_logprobs else [], logprobs=job.echo_logprobs
                )
                yield _sse(ep.chunk(srv, job, rid, created, i, echo, include_usage=inc))
        async for i, upd in _merged(gens):
            if upd.draft is not None:
                yield _sse(ep.chunk(srv, job, rid, created, i, _Update(), include_usage=inc, draft=upd.draft))
            if upd.finish_reason is not None:
                usages.append(upd.usage)
            if upd.text or upd.token_ids or upd.finish_reason is not None or upd.chat:
                yield _sse(ep.chunk(srv, job, rid, created, i, upd, include_usage=inc))
        if inc:
            yield _sse(usage_chunk(rid, created, name, ep.chunk_object, _total_usage(usages)))
    except _ClientGone:
        return
    except APIError as e:
        srv.metrics.rejected.labels(**srv.metrics.labels, status=str(e.status)).inc()
        yield _sse(e.body())
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("streaming failed")
        yield _sse(error_body(f"internal error: {type(e).__name__}: {e}", "InternalServerError", None, 500))
    finally:
        for g in gens:
            g.close()
    yield "data: [DONE]\n\n"


class _SSE:
    """A streaming response (an ASGI app) that closes the generations however the response ends, even if the body
    never started (a client gone before the first byte), so an abandoned request never keeps its row or its
    queue slot."""

    def __init__(self, gens: list[_Generation], body: AsyncIterator[str]):
        from starlette.responses import StreamingResponse

        self.gens = gens
        self.response = StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            for g in self.gens:
                g.close()


_ROUTES = (
    ("/health", health, "GET"),
    ("/version", version, "GET"),
    ("/v1/models", models, "GET"),
    ("/metrics", metrics, "GET"),
    ("/v1/completions", completions, "POST"),
    ("/v1/chat/completions", chat_completions, "POST"),
)


def create_app(
    llm: "LLM",
    *,
    model_name: str,
    max_queue: int = 64,
    request_timeout: float = 600,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    torch_thread: TorchThread | None = None,
) -> Any:
    """The FastAPI app serving `llm` under `model_name`. The engine runs for the app's lifespan on `torch_thread`
    (pass the one the model was loaded on; by default a new one)."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    if max_queue < 1:
        raise ValueError("max_queue must be >= 1")
    srv = _Server(llm, model_name, max_queue, float(request_timeout), max_body_bytes, torch_thread or TorchThread())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        srv.engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await srv.engine_loop.shutdown()

    app = FastAPI(title="dgemma OpenAI-compatible server", version=__version__, lifespan=lifespan)
    app.state.dgemma = srv
    for exc, handler in (
        (APIError, _api_error),
        (HTTPException, _http_error),
        (ClientDisconnect, _client_gone),
        (Exception, _internal_error),
    ):
        app.add_exception_handler(exc, handler)
    for path, endpoint, method in _ROUTES:
        app.add_route(path, endpoint, methods=[method])
    return app


# -- command line ---------------------------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` options (for `dgemma serve` and `python -m dgemma.entrypoints.server`)."""
    from dgemma.entrypoints.cli import (
        COMPILE_HELP,
        DEVICE_HELP,
        DTYPE_HELP,
        EAGER_HELP,
    )  # the same words as every other command

    parser.add_argument("--model", required=True, help="checkpoint directory (HF format)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--served-model-name", default=None, help="model name clients must use (default: the --model argument)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together (cache rows)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests in flight (running + waiting) before answering 429"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument(
        "--quantization",
        choices=["fp8"],
        default=None,
        help="fp8: FP8 dense and expert weights, bf16 activations (see `dgemma generate --help`)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length the cache is sized for")
    parser.add_argument("--enforce-eager", action="store_true", help=EAGER_HELP)
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (default 600)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        help="seconds to let in-flight requests finish on SIGTERM before aborting them",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest accepted request body (default 16 MiB)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice; 1 is often best for small models)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    return parser


def _arg_error(args: argparse.Namespace) -> str | None:
    """The first out-of-range `serve` option, as a message (None when all are fine)."""
    for name, lo, hi in (("max_batch", 1, 1 << 16), ("max_queue", 1, 1 << 20), ("port", 0, 65535)):
        v = getattr(args, name)
        if not lo <= v <= hi:
            return f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}"
    threads = getattr(args, "torch_threads", None)
    if threads is not None and threads < 1:
        return f"--torch-threads must be >= 1, got {threads}"
    return None


def _load(args: argparse.Namespace, where: Any) -> "LLM":
    """Load the model (on the torch thread that will run it)."""
    from dgemma.entrypoints.llm import LLM

    if getattr(args, "torch_threads", None) is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    llm = LLM(
        args.model,
        device=where.device,
        dtype=where.dtype,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        quantization=getattr(args, "quantization", None),
        enforce_eager=getattr(args, "enforce_eager", False),
        compile=getattr(args, "compile", False),
    )
    print(f"dgemma: {llm.engine.describe()}", file=sys.stderr, flush=True)
    return llm


def run_serve(args: argparse.Namespace) -> int:
    """Load the model and serve it until SIGTERM/SIGINT; returns the process exit status."""
    from dgemma.model.device import resolve

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    error = _arg_error(args)
    try:
        where = resolve(args.device, args.dtype, getattr(args, "quantization", None)) if error is None else None
    except ValueError as e:
        error = str(e)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"dgemma: {where.describe()}", file=sys.stderr, flush=True)
    torch_thread = TorchThread()  # the model is loaded and run on this one thread
    try:
        llm = torch_thread.call(lambda: _load(args, where))
    except (ValueError, OSError) as e:
        print(f"error: cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    app = create_app(
        llm,
        model_name=args.served_model_name or args.model,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
        torch_thread=torch_thread,
    )
    return _run_uvicorn(app, args)


def _run_uvicorn(app: Any, args: argparse.Namespace) -> int:
    """Serve `app` until SIGTERM/SIGINT, draining in-flight requests first; the exit status."""
    import uvicorn

    engine_loop: EngineLoop = app.state.dgemma.engine_loop

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine_loop.draining = True  # /health -> 503 and no new requests while in-flight ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutting down; a graceful stop should exit 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s not in (signal.SIGTERM, signal.SIGINT)]

    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            lifespan="on",
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    )
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits on e.g. a port already in use
        return int(e.code) if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 0
    return 0 if server.started else 1


SERVE_HELP = "serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)"


def _register_cli() -> None:
    """Add `dgemma serve` when the CLI has a subcommand registry (cli imports this module as a plugin)."""
    try:
        from dgemma.entrypoints import cli
    except Exception:  # no CLI (or a broken one): the server itself does not need it
        return
    register, commands = getattr(cli, "register", None), getattr(cli, "SUBCOMMANDS", None)
    if callable(register) and isinstance(commands, dict) and "serve" not in commands:
        with suppress(Exception):
            register(
                "serve",
                SERVE_HELP,
                add_serve_arguments,
                run_serve,
                __doc__.split("\n\n")[0] + "\n\n"
                "    dgemma serve --model PATH [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 64]",
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dgemma.entrypoints.server", description="OpenAI-compatible dgemma server"
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
else:
    _register_cli()
