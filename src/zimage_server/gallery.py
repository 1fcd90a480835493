"""The service that keeps images: store writes, index rows, ownership, retention and crash repair.

Every route of every dialect hands its encoded images to `Gallery.keep`; listing, reading and
deleting go through it too, so the rules (who sees what, which order things are written in) live
in one place, with no HTTP and no torch here.

Order of writes: bytes first (atomic, durable), then the row. Deletes: bytes, then the row. A
crash between the two leaves a file without a row (removed by `reconcile` after a grace period)
or a row without a file (dropped by `reconcile`), never a listed image that does not download.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .index import INDEX_FAILURES, ImageIndex, ImageRecord, UnknownCursor
from .keys import Principal
from .store import ImageStore, StoreError, first_line

log = logging.getLogger("zimage_server.gallery")
T = TypeVar("T")

ID_PATTERN = re.compile(r"^img_[0-9a-f]{32}$")  # 128 random bits
# The names the gallery gives images; reconcile touches nothing else in the store (a SQLite index
# beside the images, async jobs' uploads under jobs/).
IMAGE_KEY_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}/img_[0-9a-f]{32}\.(png|jpg|webp)$")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A file without a row is only an orphan once no write can still be on its way to committing it
# (another replica's included).
ORPHAN_GRACE_S = 15 * 60
# A staging file (a put's bytes before their rename) lives for milliseconds; one older than this
# belongs to a write that died with its process.
PARTIAL_GRACE_S = 5.0
SWEEP_BATCH = 200
PENDING_WAIT_S = 5.0  # the longest a list waits for writes this process has in flight
SWEEP_INTERVAL_S = 600.0  # retention runs this often (and at start)
RECONCILE_INTERVAL_S = 24 * 3600.0
ERROR_BURST_S = 60.0  # store errors closer together than this are one burst: logged once


class GalleryUnavailable(Exception):
    """The store or the index failed; the message names the cause (no secrets)."""


def new_image_id() -> str:
    return "img_" + secrets.token_hex(16)


def is_image_id(text: str) -> bool:
    return bool(ID_PATTERN.match(text))


@dataclass(frozen=True)
class NewImages:
    """One request's encoded images and what made them, as the gallery records them."""

    owner: str
    route: str
    request_id: str
    prompt: str
    negative_prompt: str | None
    parameters: Sequence[dict[str, Any]]  # one per image: its seed and every generation parameter
    model: str
    checkpoint_sha256: str | None
    format: str  # png, jpeg, webp
    blobs: Sequence[bytes]


class ErrorBurst:
    """Logs the first store error of a burst, counts them all, and sums up the rest when the next burst starts."""

    def __init__(self, on_error: Callable[[], None]):
        self._on_error = on_error
        self._last = -float("inf")
        self._quiet = 0

    def report(self, message: str) -> None:
        self._on_error()
        now = time.monotonic()
        if now - self._last > ERROR_BURST_S:
            more = f" ({self._quiet} more store errors since the last one logged)" if self._quiet else ""
            log.error("%s%s", message, more)
            self._quiet = 0
        else:
            self._quiet += 1
        self._last = now


class Gallery:
    def __init__(
        self, store: ImageStore, index: ImageIndex, *, on_store_error: Callable[[], None] = lambda: None
    ):
        self.store = store
        self.index = index
        self._errors = ErrorBurst(on_store_error)
        self._pending: set[asyncio.Task] = set()
        self._writing: dict[str, asyncio.Task] = {}  # image id -> the write that will commit it

    # -- keeping -------------------------------------------------------------------------------

    def keep(self, images: NewImages) -> tuple[list[ImageRecord], asyncio.Task]:
        """Records for the images now, and the task that writes them (bytes, then rows).

        Await the task to know they are kept (a URL must work when the client gets it); leave it
        and the write finishes in the background (`drain` waits for it). A failed write raises
        GalleryUnavailable from the task, after it is logged and counted."""
        now = time.time()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        records = []
        for position, (blob, parameters) in enumerate(zip(images.blobs, images.parameters, strict=True)):
            image_id = new_image_id()
            records.append(
                ImageRecord(
                    id=image_id,
                    owner=images.owner,
                    # A microsecond apart, image 0 newest: a newest-first list shows a request's
                    # images in their order.
                    created_at=now - position * 1e-6,
                    request_id=images.request_id,
                    route=images.route,
                    prompt=images.prompt,
                    negative_prompt=images.negative_prompt,
                    parameters=dict(parameters),
                    model=images.model,
                    checkpoint_sha256=images.checkpoint_sha256,
                    format=images.format,
                    bytes=len(blob),
                    object_key=f"{day}/{image_id}.{EXTENSIONS[images.format]}",
                )
            )
        task = asyncio.create_task(self._write(records, images.blobs), name="store-images")
        self._pending.add(task)
        for record in records:
            self._writing[record.id] = task
        task.add_done_callback(lambda done: self._finished(done, records))
        return records, task

    async def _write(self, records: list[ImageRecord], blobs: Sequence[bytes]) -> None:
        try:
            await asyncio.gather(*(self.store.put(r.object_key, blob) for r, blob in zip(records, blobs)))
        except StoreError as exc:
            await self._forget_objects(records)
            self._errors.report(f"storing {len(records)} image(s) failed: {exc}")
            raise GalleryUnavailable(f"the image store failed ({exc})") from None
        try:
            await self.index.add(records)
        except INDEX_FAILURES as exc:
            await self._forget_objects(records)
            reason = first_line(exc)
            self._errors.report(f"indexing {len(records)} image(s) failed: {reason}")
            raise GalleryUnavailable(f"the image index failed ({reason})") from None

    async def _forget_objects(self, records: list[ImageRecord]) -> None:
        """Remove what a failed write did put; what cannot be removed now, reconcile removes later."""
        for record in records:
            try:
                await self.store.delete(record.object_key)
            except StoreError:
                pass

    def _finished(self, task: asyncio.Task, records: list[ImageRecord]) -> None:
        self._pending.discard(task)
        for record in records:
            self._writing.pop(record.id, None)
        if not task.cancelled():
            task.exception()  # already logged and counted; retrieved so asyncio does not log it again

    async def drain(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) for the writes still in flight: part of a graceful shutdown."""
        if self._pending:
            log.info("waiting for %d store write(s) to finish", len(self._pending))
            await asyncio.wait(set(self._pending), timeout=timeout_s)

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    # -- reading and deleting --------------------------------------------------------------------

    async def page(
        self, principal: Principal, limit: int, after: str | None, query: str | None
    ) -> tuple[list[ImageRecord], bool]:
        """The principal's images (an admin: everyone's), newest first. UnknownCursor for a bad `after`."""
        if after is not None and not is_image_id(after):
            raise UnknownCursor(after)
        if self._pending:  # a list right after a generation shows it: its write commits first (milliseconds)
            await asyncio.wait(set(self._pending), timeout=PENDING_WAIT_S)
        return await self._index_call(self.index.page(principal.sees, limit, after, query))

    async def get(self, principal: Principal | None, image_id: str) -> ImageRecord | None:
        """The image, if it exists and `principal` may see it (None: a signed link, checked already)."""
        if not is_image_id(image_id):
            return None
        await self._written(image_id)
        record = await self._index_call(self.index.get(image_id))
        if record is None or (principal is not None and principal.sees not in (None, record.owner)):
            return None
        return record

    async def read(self, record: ImageRecord) -> bytes | None:
        """The image's bytes; None if they are gone (its row is dropped then, as reconcile would)."""
        try:
            return await self.store.get(record.object_key)
        except FileNotFoundError:
            log.warning("image %s has a row but no file (%s); dropping the row", record.id, record.object_key)
            await self._index_call(self.index.delete(record.id))
            return None
        except StoreError as exc:
            self._errors.report(str(exc))
            raise GalleryUnavailable(f"the image store failed ({exc})") from None

    async def delete(self, principal: Principal, image_id: str) -> bool:
        """Delete the image's bytes, then its row. False if there is no such image the principal
        may see: a missing id and another key's answer alike, so ids cannot be probed (a second
        delete finds nothing; the effect is the same, as HTTP's idempotent DELETE has it)."""
        record = await self.get(principal, image_id)
        if record is None:
            return False
        await self._remove([record])
        return True

    async def forget_request(self, request_id: str) -> int:
        """Delete every image of one request (a job run again after a crash replaces its first
        run's images); how many."""
        records = await self._index_call(self.index.of_request(request_id))
        if records:
            await self._remove(records)
        return len(records)

    async def _written(self, image_id: str) -> None:
        """Wait for the image's write if it is still in flight here: a client may use the id it was
        just given before the background write has committed it."""
        task = self._writing.get(image_id)
        if task is not None:
            await asyncio.wait([task])

    async def _remove(self, records: Sequence[ImageRecord]) -> None:
        try:
            await asyncio.gather(*(self.store.delete(r.object_key) for r in records))
        except StoreError as exc:
            self._errors.report(str(exc))
            raise GalleryUnavailable(f"the image store failed ({exc})") from None
        await self._index_call(self.index.delete_many([r.id for r in records]))

    async def _index_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except INDEX_FAILURES as exc:
            raise GalleryUnavailable(f"the image index failed ({first_line(exc)})") from None

    # -- retention and repair ------------------------------------------------------------------

    async def sweep(self, max_age_s: float, max_bytes: int, now: float | None = None) -> int:
        """Delete images older than `max_age_s` (0: no limit), then the oldest while the store holds
        more than `max_bytes` (0: no limit), in small batches so no request waits on it. How many."""
        removed = 0
        if max_age_s > 0:
            cutoff = (now if now is not None else time.time()) - max_age_s
            while batch := await self.index.oldest(SWEEP_BATCH, before=cutoff):
                await self._remove(batch)
                removed += len(batch)
        if max_bytes > 0:
            excess = await self.index.total_bytes() - max_bytes
            while excess > 0 and (batch := await self.index.oldest(SWEEP_BATCH)):
                chosen = []
                for record in batch:
                    if excess <= 0:
                        break
                    chosen.append(record)
                    excess -= record.bytes
                await self._remove(chosen)
                removed += len(chosen)
        if removed:
            log.info("retention removed %d image(s)", removed)
        return removed

    async def reconcile(self, grace_s: float = ORPHAN_GRACE_S) -> tuple[int, int]:
        """Repair what a crash left: (files removed, rows dropped).

        Files without a row older than `grace_s` are removed, and the staging files of writes a
        crash cut short; rows whose file is gone are dropped."""
        removed = await asyncio.to_thread(self.store.remove_partials, min(grace_s, PARTIAL_GRACE_S))
        started = time.time()
        settled = started - grace_s  # older than this, no write can still be on its way
        objects: dict[str, float] = {}
        async for stored in self.store.objects():
            if IMAGE_KEY_PATTERN.match(stored.key):
                objects[stored.key] = stored.modified
        rows: set[str] = set()
        dropped = 0
        after = ""
        while page := await self.index.object_keys(after):
            after = page[-1][0]
            rows.update(key for _, key, _ in page)
            # A row is written after its file, so a settled row without a file lost it: the row goes.
            # Newer rows may belong to files written after the listing above.
            gone = [image_id for image_id, key, created in page if key not in objects and created < settled]
            if gone:
                await self.index.delete_many(gone)
                dropped += len(gone)
        for key, modified in objects.items():
            if key not in rows and modified < settled and not await self.index.has_object_key(key):
                await self.store.delete(key)
                removed += 1
        if removed or dropped:
            log.warning("reconciled the store with the index: removed %d orphan file(s), dropped %d row(s)", removed, dropped)
        return removed, dropped



async def keep_tidy(
    gallery: Gallery,
    max_age_s: float,
    max_bytes: int,
    interval_s: float = SWEEP_INTERVAL_S,
    also: Callable[[float], Awaitable[int]] | None = None,
) -> None:
    """Repair what a crash left (at start, then daily: a failed write's clean-up may leave a file
    behind), and apply retention now and every `interval_s`, until cancelled. `also` is retention
    of other records kept beside the images (the jobs' rows), given the same age limit.

    Runs beside the requests, never in front of them; a failure is logged and retried next round."""
    last_reconcile = -float("inf")
    while True:
        if time.monotonic() - last_reconcile >= RECONCILE_INTERVAL_S:
            try:
                await gallery.reconcile()
                last_reconcile = time.monotonic()
            except (StoreError, *INDEX_FAILURES) as exc:
                log.error("reconciling the store with the index failed: %s", first_line(exc))
        try:
            await gallery.sweep(max_age_s, max_bytes)
            if also is not None and max_age_s > 0:
                await also(max_age_s)
        except (StoreError, GalleryUnavailable, *INDEX_FAILURES) as exc:
            log.error("the retention sweep failed: %s", first_line(exc))
        await asyncio.sleep(interval_s)
