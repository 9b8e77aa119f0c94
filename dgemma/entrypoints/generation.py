"""One sample's output on the asyncio side: engine events -> text updates, metrics, the finish."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from dgemma.entrypoints.engine_loop import Aborted, Rejected
from dgemma.entrypoints.errors import APIError, ClientGone

if TYPE_CHECKING:
    from dgemma.engine.params import SamplingParams
    from dgemma.entrypoints.serving import ServerState
    from dgemma.text.chat import ChatPrompt
    from dgemma.text.chat_output import ChatDelta, ChatMessage


@dataclass
class Update:
    text: str = ""
    draft: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] | None = None  # one TokenLogprob per token (when asked for)
    chat: "ChatDelta | None" = None  # the text split into content, reasoning and tool calls (chat in a known format)


@dataclass
class Result:
    """A whole sample (non-streaming)."""

    text: str
    token_ids: list[int]
    logprobs: list[Any]
    finish_reason: str
    usage: dict[str, Any]
    message: "ChatMessage | None" = None


class Generation:
    """Consumes one sample's events and turns them into updates (used by streaming and non-streaming). Chat in a
    tool/thinking format decodes with the format's markers kept and splits the text with `parser`."""

    def __init__(
        self,
        server: "ServerState",
        rid: str,
        q: asyncio.Queue,
        prompt_len: int,
        params: "SamplingParams",
        t_arrival: float,
        request: Any = None,
        chat: "ChatPrompt | None" = None,
    ):
        from dgemma.entrypoints.output import OutputProcessor, chat_decoder, chat_parser

        self.server, self.rid, self.q, self.prompt_len, self.params = server, rid, q, prompt_len, params
        self.loop = asyncio.get_running_loop()
        self.t_arrival = t_arrival
        self.deadline = self.loop.time() + server.request_timeout
        self.request = request  # for disconnect polling while streaming
        self.parser = chat_parser(chat)  # chat: the text split into content, reasoning and tool calls
        decoder = chat_decoder(server.llm.tokenizer, chat)
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
                    raise ClientGone() from None

    async def next(self) -> Update | None:
        while not self.done:
            item = await self._get()
            if isinstance(item, Rejected):
                self.done = True
                raise APIError(item.status, item.message)
            if isinstance(item, Aborted):
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
                return Update(delta.text, draft, None, None, delta.token_ids, delta.logprobs, chat)
        return None

    def _count_tokens(self, n: int) -> None:
        m = self.server.metrics
        m.generation_tokens.labels(**m.labels).inc(n)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            m.ttft.labels(**m.labels).observe(self.t_first - self.t_arrival)

    def _finish(self, delta: Any) -> Update:
        from dgemma.engine.request import tokens_per_forward
        from dgemma.entrypoints.output import chat_finish_reason
        from dgemma.entrypoints.protocol import usage

        self.done = True
        text, reason, em = delta.text, delta.finish_reason, delta.metrics
        if em.get("error"):  # the request's constraint tripped a resource limit mid-way (the engine went on)
            raise APIError(400, str(em["error"]), param="response_format" if self.params.constraint() else None)
        chat = None
        if self.parser is not None:
            chat = self.parser.push(text).extend(self.parser.finish())
            reason = chat_finish_reason(reason, self.parser)
        n = len(self.out.tokens)
        tpf = tokens_per_forward(n, em.get("forwards", 0))
        self._observe(reason, em, tpf)
        use = usage(self.prompt_len, n, tpf, int(em.get("denoising_steps", 0)))
        return Update(text, None, reason, use, delta.token_ids, delta.logprobs, chat)

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


async def collect(gen: Generation) -> Result:
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
            return Result("".join(text), tokens, logprobs, upd.finish_reason, upd.usage, message)


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Update]]:
    """(sample index, update) pairs of several samples, as they come, until every one has finished."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
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


def total_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """One usage for n samples: the prompt once, the completions summed, tokens per forward averaged."""
    from dgemma.entrypoints.protocol import usage

    n = sum(u["completion_tokens"] for u in usages)
    tpf = sum(u["tokens_per_forward"] for u in usages) / len(usages)
    return usage(usages[0]["prompt_tokens"], n, tpf, sum(u["denoising_steps"] for u in usages))
