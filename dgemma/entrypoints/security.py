"""API keys and CORS for the server.

`ApiKeyMiddleware` is plain ASGI (streamed bodies pass through untouched): when keys are configured, a request to
`/v1/*`, `/tokenize` or `/detokenize` needs `Authorization: Bearer <key>` matching one of them, compared in constant
time; otherwise it is answered 401 with an OpenAI error body. `/health`, `/metrics` and `/version` stay open, and
so do CORS preflights (OPTIONS), which browsers send without credentials. Keys are never logged.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
UNAUTHORIZED = {
    "error": {
        "message": "invalid or missing API key: send the header `Authorization: Bearer <key>`",
        "type": "AuthenticationError",
        "param": None,
        "code": 401,
    }
}


def key_matches(token: str, keys: list[bytes]) -> bool:
    """Whether `token` is one of `keys`; every key is compared (constant time in the token's content)."""
    given = token.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def _bearer(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _route_path(scope: dict[str, Any]) -> str:
    """The request's path below the app's root path (a proxy's prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """ASGI middleware: 401 for a protected path without one of `keys` as its Bearer token."""

    def __init__(self, app: Any, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys]

    def protects(self, scope: dict[str, Any]) -> bool:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return False
        path = _route_path(scope)
        return path == "/v1" or path.startswith(PROTECTED_PREFIXES)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.protects(scope) or key_matches(_bearer(scope), self.keys):
            await self.app(scope, receive, send)
            return
        body = json.dumps(UNAUTHORIZED).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def secure(app: Any, api_keys: list[str], allowed_origins: list[str]) -> None:
    """Add the API-key check and, when origins are given, CORS (outermost, so preflights are answered first)."""
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=list(api_keys))
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=False,
        )


__all__ = ["ApiKeyMiddleware", "key_matches", "secure"]
