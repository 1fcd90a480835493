"""The kept images: list, read, fetch and delete, each key seeing its own (an admin key everyone's).

GET /v1/images lists newest first in OpenAI's list style with cursor pagination (`limit`, `after`)
and a case-insensitive prompt search (`q`). Another key's image answers exactly as a missing one
does (404), so ids cannot be probed. `/content` serves the bytes to the key, or to anyone holding
a signed link (signed_urls.py); the auth guard lets signed requests through to be checked here.
"""

from __future__ import annotations

import time

from litestar import Request, Response, delete, get
from litestar.datastructures import State

from ..gallery import MEDIA_TYPES, Gallery, GalleryUnavailable
from ..index import ImageRecord, UnknownCursor
from ..signed_urls import BadSignature
from .auth import principal_of
from .errors import ApiError, not_found
from .links import image_link
from .schemas import DeletedImage, StoredImage, StoredImageList
from .state import ServerState, server_state

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
MAX_QUERY_CHARS = 1000


def gallery_of(server: ServerState) -> Gallery:
    if server.gallery is None:
        raise ApiError(
            503, f"Image history is unavailable: {server.gallery_error or 'the store is not open yet'}.",
            code="store_unavailable",
        )  # fmt: skip
    return server.gallery


def image_not_found(image_id: str) -> ApiError:
    return not_found("image", image_id, "image_id")


def unavailable(exc: GalleryUnavailable) -> ApiError:
    return ApiError(503, f"Image history is unavailable: {exc}.", code="store_unavailable")


def parse_limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not (raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= MAX_LIMIT):
        raise ApiError(400, f"Invalid limit '{raw[:20]}': use a whole number from 1 to {MAX_LIMIT}.", param="limit")
    return int(raw)


def stored_image(request: Request, server: ServerState, record: ImageRecord) -> StoredImage:
    url, expires_at = image_link(request, server, record)
    return StoredImage(
        id=record.id,
        created_at=int(record.created_at),
        owner=record.owner,
        route=record.route,
        request_id=record.request_id,
        prompt=record.prompt,
        negative_prompt=record.negative_prompt,
        parameters=record.parameters,
        model=record.model,
        checkpoint_sha256=record.checkpoint_sha256,
        output_format=record.format,
        bytes=record.bytes,
        url=url,
        expires_at=expires_at,
    )


@get("/v1/images", summary="The caller's kept images, newest first (an admin key: everyone's).")
async def list_images(
    request: Request, state: State, limit: str | None = None, after: str | None = None, q: str | None = None
) -> StoredImageList:
    server = server_state(state)
    gallery = gallery_of(server)
    count = parse_limit(limit)
    if q is not None and (len(q) > MAX_QUERY_CHARS or "\x00" in q):
        raise ApiError(400, f"Invalid q: at most {MAX_QUERY_CHARS} characters, no NUL.", param="q")
    try:
        records, has_more = await gallery.page(principal_of(request), count, after or None, q or None)
    except UnknownCursor:
        raise ApiError(400, "Invalid after: it must be the id of an image in this list.", param="after") from None
    except GalleryUnavailable as exc:
        raise unavailable(exc) from None
    return StoredImageList(
        data=[stored_image(request, server, record) for record in records],
        has_more=has_more,
        first_id=records[0].id if records else None,
        last_id=records[-1].id if records else None,
    )


@get("/v1/images/{image_id:str}", summary="One kept image's record, with a fresh signed link.")
async def get_image(request: Request, state: State, image_id: str) -> StoredImage:
    server = server_state(state)
    try:
        record = await gallery_of(server).get(principal_of(request), image_id)
    except GalleryUnavailable as exc:
        raise unavailable(exc) from None
    if record is None:
        raise image_not_found(image_id)
    return stored_image(request, server, record)


@get(
    "/v1/images/{image_id:str}/content",
    summary="A kept image's bytes: with the key, or with a signed link's expires and signature.",
)
async def get_image_content(
    request: Request, state: State, image_id: str, expires: str | None = None, signature: str | None = None
) -> Response[bytes]:
    server = server_state(state)
    gallery = gallery_of(server)
    signed = signature is not None
    max_age = 3600
    if signed:
        try:
            server.signer.verify(image_id, expires or "", signature)
        except BadSignature as exc:
            raise ApiError(403, f"This image link is not valid: {exc}.", code="invalid_signature") from None
        max_age = max(0, int(expires) - int(time.time()))  # not cached past the link's own life
    try:
        record = await gallery.get(None if signed else principal_of(request), image_id)
        blob = await gallery.read(record) if record is not None else None
    except GalleryUnavailable as exc:
        raise unavailable(exc) from None
    if record is None or blob is None:
        raise image_not_found(image_id)
    return Response(
        blob,
        media_type=MEDIA_TYPES[record.format],
        headers={
            # A link is a credential: private caches only, and not past what the link itself allows.
            "Cache-Control": f"private, max-age={max_age}",
            "Content-Disposition": f'inline; filename="{record.id}.{record.object_key.rsplit(".", 1)[-1]}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@delete("/v1/images/{image_id:str}", status_code=200, summary="Delete a kept image: its file and its record.")
async def delete_image(request: Request, state: State, image_id: str) -> DeletedImage:
    server = server_state(state)
    try:
        deleted = await gallery_of(server).delete(principal_of(request), image_id)
    except GalleryUnavailable as exc:
        raise unavailable(exc) from None
    if not deleted:
        raise image_not_found(image_id)
    return DeletedImage(id=image_id)


HISTORY_ROUTES = [list_images, get_image, get_image_content, delete_image]
