"""Reading a request: the JSON body (size, type and encoding checked), its protocol class, client disconnects."""

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any

from dgemma.entrypoints.errors import APIError, ClientGone

logger = logging.getLogger(__name__)


async def read_json(request: Any, max_body_bytes: int) -> dict[str, Any]:
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


def parse_request(cls: Any, body: dict[str, Any], model_name: str) -> Any:
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


async def until_disconnect(request: Any, coro: Any) -> Any:
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
    raise ClientGone()
