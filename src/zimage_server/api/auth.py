"""The API key guard: with keys configured (Z_IMAGE_API_KEY, Z_IMAGE_API_KEYS_FILE), every /v1/* and
/sdapi/* route needs one, and the request acts for its key's principal (keys.py).

/v1 routes take `Authorization: Bearer <key>`, as OpenAI clients send it. /sdapi routes also take
HTTP Basic with the key as the password and any user name: AUTOMATIC1111 clients authenticate
with `--api-auth user:pass` and can send nothing else. Without a key, Authorization is ignored
(SillyTavern always sends a Basic header, empty when unconfigured). Probes, metrics, the OpenAPI
schema and the page at / stay open, so orchestrators and browsers work without the key. A signed
image link (signed_urls.py) needs no key either: its signature is checked by the route instead.
"""

from __future__ import annotations

import base64
import binascii
import re

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from ..keys import ANONYMOUS, NOBODY, Principal
from .errors import A1111_PREFIXES, ApiError
from .state import server_state

OPENAI_PREFIX = "/v1/"
KEPT_PREFIX = "/v1/images/"
CONTENT_PATH = re.compile(r"^/v1/images/[^/]+/content$")


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def basic_password(authorization: str) -> str | None:
    """The password of `Basic base64(user:password)`; the user name is not checked."""
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return None
    _, colon, password = decoded.partition(":")
    return password if colon and password else None


async def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """An app-wide guard: it runs before the body is read, so an unauthorised upload costs nothing.

    Async, as every guard here: Litestar would run a sync one in a worker thread on each request."""
    path = connection.scope["path"]
    if not path.startswith((OPENAI_PREFIX, *A1111_PREFIXES)):
        return
    if "signature" in connection.query_params and CONTENT_PATH.match(path):
        if server_state(connection).api_keys.required:
            return  # a signed link: the route checks the signature, and it is all the link grants
    sdapi = path.startswith(A1111_PREFIXES)
    # A1111 clients can send only Basic: also where they follow their async jobs and images.
    authenticate(connection, basic_ok=sdapi or path.startswith(KEPT_PREFIX), sdapi=sdapi)


def authenticate(connection: ASGIConnection, *, basic_ok: bool = False, sdapi: bool = False) -> Principal:
    """The request's principal, recorded on it: its key's, or anonymous where no key is configured.
    ApiError 401 for a missing or unknown key. (The MCP mount calls this itself: Litestar's guards
    do not run on mounted ASGI apps.)"""
    keys = server_state(connection).api_keys
    if not keys.required:
        principal = ANONYMOUS
    else:
        authorization = connection.headers.get("authorization", "")
        token = bearer_token(authorization) or (basic_password(authorization) if basic_ok else None)
        # Header values arrive decoded as latin-1; encoding back gives the bytes the client sent.
        principal = keys.resolve(token.encode("latin-1").decode("utf-8", "replace")) if token is not None else None
        if principal is None:
            raise unauthorised(sdapi)
    connection.state.principal = principal
    return principal


def principal_of(connection: ASGIConnection) -> Principal:
    """Who the request acts for, as the guard found; where it checked no key, nobody (sees nothing)."""
    return connection.state.get("principal", NOBODY)


def unauthorised(sdapi: bool) -> ApiError:
    if sdapi:
        how = "HTTP Basic with the key as the password (A1111's --api-auth <any user>:<key>)"
        challenge = 'Basic realm="zimage-server"'
    else:
        how, challenge = "'Authorization: Bearer <key>'", "Bearer"
    return ApiError(
        401,
        f"Missing or invalid API key: send {how} with a key this server was given (Z_IMAGE_API_KEY or Z_IMAGE_API_KEYS_FILE).",
        code="invalid_api_key",
        headers={"WWW-Authenticate": challenge},
    )
