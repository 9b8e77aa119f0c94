"""Errors answered with OpenAI error bodies, and the app's exception handlers."""

import logging
from typing import Any

logger = logging.getLogger(__name__)

STATUS_TYPES = {
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
        self.type = type_ or STATUS_TYPES.get(status, "APIError")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class ClientGone(Exception):
    pass


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def empty_response(status: int) -> Any:
    from starlette.responses import Response

    return Response(status_code=status)


async def _api_error(request: Any, e: APIError) -> Any:
    if e.status >= 400:
        srv = request.app.state.dgemma
        srv.metrics.rejected.labels(**srv.metrics.labels, status=str(e.status)).inc()
    return json_response(e.body(), e.status, e.headers)


async def _http_error(request: Any, e: Any) -> Any:
    from dgemma.entrypoints.protocol import error_body

    status = e.status_code
    return json_response(
        error_body(str(e.detail), STATUS_TYPES.get(status, "APIError"), None, status), status, e.headers
    )


async def _client_gone(request: Any, e: Exception) -> Any:
    return empty_response(499)  # nobody is listening; just do not log a traceback


async def _internal_error(request: Any, e: Exception) -> Any:
    from dgemma.entrypoints.protocol import error_body

    logger.exception("unhandled error")
    return json_response(error_body(f"internal error: {type(e).__name__}", "InternalServerError", None, 500), 500)


def exception_handlers() -> list[tuple[Any, Any]]:
    """(exception class, handler) pairs for the app: OpenAI bodies for every error, no traceback for a client gone."""
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    return [
        (APIError, _api_error),
        (HTTPException, _http_error),
        (ClientDisconnect, _client_gone),
        (Exception, _internal_error),
    ]
