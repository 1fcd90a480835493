"""The API key guard: with Z_IMAGE_API_KEY set, every /v1/* route needs `Authorization: Bearer <key>`.

Probes, metrics, the OpenAPI schema and the page at / stay open, so orchestrators and browsers
work without the key.
"""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from .errors import ApiError
from .state import server_state

PROTECTED_PREFIX = "/v1/"


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """An app-wide guard: it runs before the body is read, so an unauthorised upload costs nothing.

    Async, as every guard here: Litestar would run a sync one in a worker thread on each request."""
    key: str | None = server_state(connection).settings.api_key
    if key is None or not connection.scope["path"].startswith(PROTECTED_PREFIX):
        return
    token = bearer_token(connection.headers.get("authorization", ""))
    # Constant-time, so response timing does not reveal how much of a guessed key matched. Header
    # values arrive decoded as latin-1; encoding back gives the bytes the client sent.
    if token is None or not hmac.compare_digest(token.encode("latin-1"), key.encode()):
        raise ApiError(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>' with the key this server was given "
            "(Z_IMAGE_API_KEY).",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
