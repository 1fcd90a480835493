"""Where image bytes are kept: a local folder or an S3 bucket, through obstore's one API.

obstore (object_store, the Rust crate behind Arrow and Delta) gives a folder and any S3-compatible
service the same put/get/delete/list, async, without a thread per call. A put is atomic on both:
S3 publishes an object whole, and object_store's folder store writes a staging file
(`NAME#N`) and renames it over NAME, so no reader ever sees half an image. What it does not do on
a folder is fsync, so `put` does that before returning: the index row is written only after the
bytes would survive a power cut. A `kill -9` mid-write leaves a staging file, which
`remove_partials` deletes at start-up (listing never shows them).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

STAGING_MARK = "#"  # object_store's staging files are NAME#N; a valid object name never holds '#'


# What obstore raises for a failed operation (its own errors, and OSError's kinds for local I/O).
STORE_FAILURES = (ObstoreError, OSError, RuntimeError, ValueError)
NOT_FOUND = (FileNotFoundError, NotFoundError)


class StoreError(Exception):
    """The store could not keep or hand back bytes (disk full, bucket unreachable, permissions)."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # Unix time


class ImageStore:
    """Bytes by key, in a folder or a bucket. Keys are `YYYY-MM-DD/img_....ext`, made by the gallery."""

    def __init__(self, store: LocalStore | S3Store, description: str, folder: Path | None = None):
        self._store = store
        self.description = description  # for logs and errors: the folder or s3://bucket/prefix
        self.folder = folder

    @classmethod
    def from_setting(cls, value: str) -> ImageStore | None:
        """The store Z_IMAGE_STORE names; None for `none`."""
        if value.lower() == "none":
            return None
        if value.startswith("s3://"):
            bucket, _, prefix = value[len("s3://") :].partition("/")
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
            # Reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL and the rest of
            # the usual variables; a plain-http endpoint (a service on the same host) must be allowed by name.
            store = S3Store(
                bucket,
                prefix=prefix.strip("/") or None,
                client_options={"allow_http": endpoint.startswith("http://")},
            )
            return cls(store, value)
        folder = Path(value).resolve()
        return cls(LocalStore(folder, mkdir=True), str(folder), folder)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self._store, key, data)
            if self.folder is not None:
                await asyncio.to_thread(fsync_file, self.folder / key)
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot write {key} to {self.description}: {first_line(exc)}") from exc

    async def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if it is gone."""
        try:
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())
        except NOT_FOUND as exc:
            raise FileNotFoundError(key) from exc
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot read {key} from {self.description}: {first_line(exc)}") from exc

    async def delete(self, key: str) -> None:
        """Remove the object; one already gone is fine (deletes are idempotent)."""
        try:
            await obstore.delete_async(self._store, key)
        except NOT_FOUND:
            pass
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot delete {key} from {self.description}: {first_line(exc)}") from exc

    async def objects(self) -> AsyncIterator[StoredObject]:
        """Every object, in pages (a bucket of a million images is never held in memory at once)."""
        try:
            async for batch in obstore.list(self._store, chunk_size=1000):
                for meta in batch:
                    yield StoredObject(meta["path"], meta["size"], meta["last_modified"].timestamp())
        except NOT_FOUND:
            return
        except STORE_FAILURES as exc:
            raise StoreError(f"cannot list {self.description}: {first_line(exc)}") from exc

    def remove_partials(self, grace_s: float) -> int:
        """Delete staging files older than `grace_s` that a crash left in a folder store; how many.

        The grace period spares a write another process (a replica on the same folder) has in flight."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - grace_s
        for root, _, names in os.walk(self.folder):
            for name in names:
                if STAGING_MARK not in name:
                    continue
                path = Path(root) / name
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


def fsync_file(path: Path) -> None:
    """Flush the file, then its folder's entry (the rename) and the folder's own (a new day), to the disk."""
    for target in (path, path.parent, path.parent.parent):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def first_line(exc: BaseException) -> str:
    """An error's first line: obstore's messages carry a debug dump after it, SQLAlchemy's the statement."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
