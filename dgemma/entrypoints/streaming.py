"""Server-sent events of a streaming request."""

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from dgemma.entrypoints.errors import APIError, ClientGone
from dgemma.entrypoints.generation import Generation, Update, merged, total_usage

if TYPE_CHECKING:
    from dgemma.entrypoints.serving import Endpoint, Job, ServerState

logger = logging.getLogger(__name__)


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_events(
    srv: "ServerState", gens: list[Generation], ep: "Endpoint", job: "Job", rid: str, created: int
) -> AsyncIterator[str]:
    """The server-sent events of a streaming request, ending with `data: [DONE]` (errors become an error event)."""
    from dgemma.entrypoints.protocol import chat_chunk, error_body, usage_chunk

    req = job.req
    inc = bool(req.stream_options and req.stream_options.include_usage)
    name, usages = srv.model_name, []
    try:
        for i in range(len(gens)):  # openings: the assistant role (chat), the echoed prompt (completions)
            if ep.role_chunk:
                yield sse(
                    chat_chunk(rid, created, name, {"role": "assistant", "content": ""}, index=i, include_usage=inc)
                )
            elif job.echo_text:
                echo = Update(
                    job.echo_text, token_ids=job.echo_ids if job.echo_logprobs else [], logprobs=job.echo_logprobs
                )
                yield sse(ep.chunk(srv, job, rid, created, i, echo, include_usage=inc))
        async for i, upd in merged(gens):
            if upd.draft is not None:
                yield sse(ep.chunk(srv, job, rid, created, i, Update(), include_usage=inc, draft=upd.draft))
            if upd.finish_reason is not None:
                usages.append(upd.usage)
            if upd.text or upd.token_ids or upd.finish_reason is not None or upd.chat:
                yield sse(ep.chunk(srv, job, rid, created, i, upd, include_usage=inc))
        if inc:
            yield sse(usage_chunk(rid, created, name, ep.chunk_object, total_usage(usages)))
    except ClientGone:
        return
    except APIError as e:
        srv.metrics.rejected.labels(**srv.metrics.labels, status=str(e.status)).inc()
        yield sse(e.body())
    except asyncio.CancelledError:
        raise
    except Exception as e:
        logger.exception("streaming failed")
        yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "InternalServerError", None, 500))
    finally:
        for g in gens:
            g.close()
    yield "data: [DONE]\n\n"


class SSEResponse:
    """A streaming response (an ASGI app) that closes the generations however the response ends, even if the body
    never started (a client gone before the first byte), so an abandoned request never keeps its row or its
    queue slot."""

    def __init__(self, gens: list[Generation], body: AsyncIterator[str]):
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
