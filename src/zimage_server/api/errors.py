"""One error type, one envelope: every failure leaves as `{"error": {message, type, param, code}}`.

Litestar's own exceptions (validation, 404, 405, 413, ...) are mapped to the same envelope, and
anything unexpected becomes a 500 with a generic message; the traceback goes to the log only,
under the request id that every 5xx message names.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from .observability import request_id_of
from .schemas import ErrorBody, ErrorDetail

log = logging.getLogger("zimage_server.api")

# The AUTOMATIC1111 routes (api/sdapi.py): its own API and its ControlNet extension's.
A1111_PREFIXES = ("/sdapi/", "/controlnet/")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """An error meant for the client: status, a message that says what to do, and the field at fault."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def detail(self) -> ErrorDetail:
        """The envelope's inside: what a stream's error event, a job's record and MCP's 401 carry."""
        return error_detail(self.status_code, self.message, param=self.param, code=self.code)


def not_found(kind: str, value: str, param: str) -> ApiError:
    """404 for an id the caller cannot see; echoed only when short and printable (not a 10 kB or NUL-laden one)."""
    shown = value if len(value) <= 64 and value.isprintable() else value[:32].encode("unicode_escape").decode() + "..."
    return ApiError(404, f"No {kind} with id '{shown}'.", param=param, code=f"{kind}_not_found")


def lora_error(exc: Exception) -> ApiError:
    """A LoRA the request named that this server cannot apply; the message names it."""
    return ApiError(400, str(exc), param="loras", code="invalid_lora")


class ClientGoneError(Exception):
    """The client disconnected while its request waited; nobody is left to answer."""


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
) -> Response[ErrorBody]:
    request_id = request_id_of(request.scope) if request is not None else None
    if status_code >= 500 and request_id:
        # What the operator greps the log for; nothing else about the failure leaves the server.
        message = f"{message} (request id: {request_id})"
    body = ErrorBody(
        error=error_detail(status_code, message, param=param, code=code),
        detail=message if request is not None and request.scope["path"].startswith(A1111_PREFIXES) else None,
    )
    return Response(body, status_code=status_code, headers=headers, media_type=MediaType.JSON)


def error_detail(status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> ErrorDetail:
    """The inside of the envelope; also sent as the `error` event of a stream that fails midway."""
    return ErrorDetail(
        message=message, type=ERROR_TYPES.get(status_code, "invalid_request_error"), param=param, code=code
    )


def handle_api_error(request: Request, exc: ApiError) -> Response[ErrorBody]:
    return error_response(
        exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers, request=request
    )


MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def _validation_param(extra: Any) -> tuple[str | None, str | None]:
    """The field name and message Litestar reports for the first invalid value."""
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        key, message = first.get("key"), first.get("message")
        # A missing field is reported against the whole body ("data"); name the field instead.
        if message and (missing := MISSING_FIELD.search(message)):
            return missing.group(1), f"'{missing.group(1)}' is required"
        return (str(key).removeprefix("$.") if key else None), message
    return None, None


def handle_http_exception(request: Request, exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        param, detail = _validation_param(exc.extra)
        message = f"Invalid value for '{param}': {detail}" if param and detail else (detail or exc.detail)
        if detail and detail.endswith("is required"):
            message = detail
        return error_response(400, message, param=param, code="invalid_value", request=request)
    if status >= 500:
        log.error("request %s: internal error: %s", request_id_of(request.scope), exc.detail)
        return error_response(status, "The server had an error while processing your request.", request=request)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}
    return error_response(status, exc.detail, code=code.get(status), headers=exc.headers, request=request)


def handle_client_gone(request: Request, _: ClientGoneError) -> Response[ErrorBody]:
    # nginx's convention for "client closed request"; nobody reads it, but logs and metrics do.
    return error_response(
        499, "The client closed the connection before the images were ready.", code="client_gone", request=request
    )


def handle_bad_encoding(request: Request, _: UnicodeDecodeError) -> Response[ErrorBody]:
    # msgspec's JSON decoder raises this for bodies that are not UTF-8, before any handler runs.
    return error_response(400, "The request body is not valid UTF-8.", code="invalid_encoding", request=request)


def handle_too_deep(request: Request, exc: RecursionError) -> Response[ErrorBody]:
    # msgspec's JSON decoder raises this for deeply nested bodies ([[[[...), before any handler
    # runs; found by the attack tests. Logged in case one ever comes from our own code.
    log.warning("request %s: RecursionError (%s), answered 400", request_id_of(request.scope), exc)
    return error_response(400, "The request body is nested too deeply.", code="invalid_json", request=request)


def handle_unexpected(request: Request, exc: Exception) -> Response[ErrorBody]:
    log.error(
        "request %s: unhandled error on %s %s",
        request_id_of(request.scope),
        request.method,
        request.url.path,
        exc_info=exc,
    )
    request.app.state.server.metrics.record_unhandled(exc)
    return error_response(500, "The server had an error while processing your request.", request=request)


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    ClientGoneError: handle_client_gone,
    UnicodeDecodeError: handle_bad_encoding,
    RecursionError: handle_too_deep,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
