"""Route guards shared by every API route: is the server taking work, is the body the right type.

Guards are async on purpose: Litestar runs a sync guard in a worker thread, two thread round
trips per request before it is even queued (the A/B is in docs/benchmarks.md, benchmark 1).
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from .errors import ApiError
from .state import server_state

RETRY_AFTER_S = "2"


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "The server is shutting down and takes no new work; retry shortly (or on another replica).",
        code="shutting_down",
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def require_ready(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    server = server_state(connection)
    if server.draining or server.worker_died:
        raise shutting_down()
    if not server.ready:
        raise ApiError(
            503, "The model is still loading; retry shortly.", code="not_ready", headers={"Retry-After": RETRY_AFTER_S}
        )


def require_media_type(expected: str, hint: str = "") -> Guard:
    """A guard that answers 415 unless the body is `expected`; Litestar itself parses whatever it gets."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        media_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != expected:
            raise ApiError(
                415,
                f"Content-Type must be {expected}, not '{media_type or 'none'}'{hint}.",
                code="unsupported_media_type",
            )

    return guard


require_json = require_media_type("application/json")
require_multipart = require_media_type("multipart/form-data", ": send the image as a file part")
