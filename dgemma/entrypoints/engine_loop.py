"""The engine thread and the asyncio side's link to it.

ONE background thread owns the `Engine` and calls `step()` while there is work, so requests are batched
continuously (a new request joins at the next step, a finished one leaves). The asyncio side sends typed commands
(`_Add`, `_Abort`, `_Finish`, `_Stop`, `_Score`) through a thread-safe queue; the engine thread answers with replies
(`_Accepted`, `Rejected`, `Aborted`, `_Scored`) and the engine's `Event`s, one `loop.call_soon_threadsafe` per step,
which routes them into per-request `asyncio.Queue`s. Only the engine thread ever touches the engine.
"""

import asyncio
import concurrent.futures
import logging
import queue
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

from dgemma.entrypoints.errors import APIError
from dgemma.entrypoints.metrics import Metrics

if TYPE_CHECKING:
    from dgemma.engine.core import Event
    from dgemma.engine.request import EngineRequest
    from dgemma.entrypoints.llm import LLM

logger = logging.getLogger(__name__)


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
    request: "EngineRequest"
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
class Rejected:
    """The engine refused the request (or failed): answered with `status`."""

    status: int
    message: str
    param: str | None = None


@dataclass
class Aborted:
    """A `_Finish` found the request no longer running (its 'finished' event, if any, is on the way)."""


_Command = Union[_Add, _Abort, _Finish, _Stop, _Score]
_Reply = Union[_Accepted, Rejected, Aborted, _Scored, "Event"]


class EngineLoop:
    """Runs the engine on the torch thread (`_EngineWorker`) and routes its replies and events to per-request
    asyncio queues."""

    def __init__(self, llm: "LLM", max_queue: int, metrics: Metrics, torch_thread: TorchThread):
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

    def check_available(self) -> None:
        if self.error is not None or (self._job is not None and not self.running and not self.draining):
            raise APIError(500, f"the engine has failed and cannot serve requests: {self.error}")
        if self.draining or self._job is None:
            raise APIError(503, "the server is shutting down")

    async def submit(self, rid: str, request: "EngineRequest", drafts: bool) -> list[tuple[str, asyncio.Queue]]:
        """Queue a validated request's `params.n` samples; returns each one's id and event queue once the engine
        accepted them (APIError if it did not)."""
        self.check_available()
        n = request.params.n
        ids = [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]
        if len(self._queues) + len(ids) > self.max_queue:
            raise APIError(
                429,
                f"the server is at capacity ({self.max_queue} requests in flight); retry later",
                headers={"Retry-After": "1"},
            )
        queues = [(sid, asyncio.Queue()) for sid in ids]
        self._queues.update(queues)
        reply = await self._ask(_Add(ids[0], request, drafts, ids), queues[0][1], ids)
        if isinstance(reply, Rejected):
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
        if isinstance(reply, Rejected):
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
        `Aborted` if the request was no longer running."""
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
        metrics: Metrics,
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
            out.append((None, Rejected(503, "the server is shutting down")))
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("the engine thread failed; the server now answers 500/503")
            out.append((None, Rejected(500, f"the engine failed: {self.error}")))
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
            out.append((cmd.rid, ev if ev is not None else Aborted()))
        elif isinstance(cmd, _Score):  # (through the engine's runner: every tensor-parallel rank takes part)
            out.append((cmd.rid, _Scored(self.engine.prompt_logprobs(cmd.prompt_ids, cmd.top_k))))

    def _add(self, cmd: _Add) -> _Reply:
        try:
            self.engine.submit(cmd.request, request_ids=cmd.sample_ids, stream_drafts=cmd.drafts)
        except ValueError as e:
            return Rejected(400, str(e), getattr(e, "param", None))
        except Exception as e:  # a bug, not the client's fault; the engine state is unchanged
            logger.exception("add_request failed")
            return Rejected(500, f"failed to queue the request: {type(e).__name__}: {e}")
        self.metrics.prompt_tokens.labels(**self.metrics.labels).inc(len(cmd.request.prompt_ids))  # once for n
        return _Accepted()

    def _gauges(self) -> None:
        m = self.metrics
        m.running.labels(**m.labels).set(self.engine.num_running)
        m.waiting.labels(**m.labels).set(self.engine.num_waiting)
