"""The image index: one row per stored image, in SQLite (one machine) or PostgreSQL (replicas).

SQLAlchemy 2's Core over its async drivers (aiosqlite, asyncpg) speaks both dialects from one set
of queries. Core, not the ORM or Litestar's SQLAlchemy plugin: the index is a handful of queries
called by the gallery service, which stays free of HTTP, so a per-request session would buy
nothing. The schema carries its version in `zimage_schema`; `open_index` creates it, upgrades an
older one in place, and refuses a newer one (a newer zimage-server wrote it) in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .store import first_line

metadata = MetaData()

schema_table = Table("zimage_schema", metadata, Column("version", Integer, nullable=False))

meta_table = Table(
    "zimage_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False)
)

images_table = Table(
    "zimage_images",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("created_at", Float, nullable=False),  # Unix time
    Column("request_id", String(64), nullable=False),  # the images of one request share it: one generation
    Column("route", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("negative_prompt", Text),
    Column("parameters", JSON, nullable=False),  # size, steps, guidance, seed, LoRAs, ControlNet, strength, ...
    Column("model", String(128), nullable=False),
    Column("checkpoint_sha256", String(64)),
    Column("format", String(8), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("object_key", String(256), nullable=False),
    # Newest first, for everyone (admin) and per owner; the id breaks ties in the same instant.
    Index("zimage_images_newest", "created_at", "id"),
    Index("zimage_images_owner_newest", "owner", "created_at", "id"),
    Index("zimage_images_request", "request_id"),
)

jobs_table = Table(
    "zimage_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("status", String(16), nullable=False),  # queued, running, succeeded, failed, cancelled
    Column("kind", String(32), nullable=False),  # which route's request: generations, edits, txt2img, img2img
    Column("request", JSON, nullable=False),  # the request as received (seeds fixed), to run it again after a crash
    Column("request_id", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("n", Integer, nullable=False),
    Column("webhook_url", Text),
    Column("lease_owner", String(64)),  # the replica running it
    Column("lease_until", Float),  # past this, another replica may take it over
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("step", Integer),
    Column("total", Integer),
    Column("result", JSON),  # succeeded: the stored images' ids and seeds
    Column("error", JSON),  # failed: the error envelope's fields
    Column("webhook_done", Boolean, nullable=False, default=False),
    Index("zimage_jobs_claim", "status", "created_at"),
    Index("zimage_jobs_owner_newest", "owner", "created_at", "id"),
)


async def add_jobs_table(conn: AsyncConnection) -> None:
    """Version 2: asynchronous jobs (job_queue.py), and images found by their request (a job's rerun)."""

    def upgrade(sync: Any) -> None:
        jobs_table.create(sync, checkfirst=True)
        next(i for i in images_table.indexes if i.name == "zimage_images_request").create(sync, checkfirst=True)

    await conn.run_sync(upgrade)


# Upgrades from version N to N + 1, in order: MIGRATIONS[N - 1] runs on a version-N index. A new
# index is created at the newest version directly, from `metadata`.
Migration = Callable[[AsyncConnection], Awaitable[None]]
MIGRATIONS: tuple[Migration, ...] = (add_jobs_table,)
URL_SECRET_KEY = "url_secret"
# Taken while a server creates or upgrades the schema, so replicas starting together take turns.
SCHEMA_LOCK_ID = 0x5A494D47  # "ZIMG"


# What a failed index operation raises: SQLAlchemy's wrapped driver errors, and OSError where a
# driver's connection attempt fails before SQLAlchemy can wrap it (asyncpg's refused connection).
INDEX_FAILURES = (SQLAlchemyError, OSError)


class IndexUnavailable(Exception):
    """The index cannot be opened or used; the message is one line."""


class UnknownCursor(ValueError):
    """A page's `after` names no image the caller can see."""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    owner: str
    created_at: float
    request_id: str
    route: str
    prompt: str
    negative_prompt: str | None
    parameters: dict[str, Any]
    model: str
    checkpoint_sha256: str | None
    format: str
    bytes: int
    object_key: str = field(repr=False)

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COLUMNS}


COLUMNS = tuple(column.name for column in images_table.columns)


def engine_url(url: str) -> str:
    """The async driver's URL for a plain one: sqlite:///F -> sqlite+aiosqlite:///F, postgresql -> asyncpg."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+asyncpg://" + url[len(scheme) :]
    return url


def make_engine(url: str) -> AsyncEngine:
    async_url = engine_url(url)
    if async_url.startswith("sqlite"):
        Path(async_url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(async_url)

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_connection: Any, _: Any) -> None:
            # WAL: readers never wait for the writer; synchronous=FULL: a commit (an accepted job, a
            # kept image) survives a power cut, not only a crash; the busy timeout lets a second
            # process (or a sweep) wait its turn instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        return engine
    return create_async_engine(async_url, pool_pre_ping=True, pool_size=5, max_overflow=5)


class ImageIndex:
    """The stored images' rows. Every method is one short transaction."""

    def __init__(self, engine: AsyncEngine, description: str):
        self._engine = engine
        self.description = description  # the URL without its password, for logs

    @property
    def engine(self) -> AsyncEngine:
        """The connection pool, shared with the job queue (the same database)."""
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    async def add(self, records: Sequence[ImageRecord]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(insert(images_table), [record.row() for record in records])

    async def get(self, image_id: str) -> ImageRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(images_table).where(images_table.c.id == image_id))).first()
        return ImageRecord(**row._mapping) if row is not None else None

    async def page(
        self, owner: str | None, limit: int, after: str | None = None, query: str | None = None
    ) -> tuple[list[ImageRecord], bool]:
        """Up to `limit` images, newest first, after the image `after`; and whether more follow.

        owner None: everyone's (an admin). `query`: a case-insensitive substring of the prompt."""
        images = images_table.c
        conditions = []
        if owner is not None:
            conditions.append(images.owner == owner)
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            conditions.append(images.prompt.ilike(pattern, escape="\\"))
        async with self._engine.connect() as conn:
            if after is not None:
                cursor_conditions = [images.id == after, *([images.owner == owner] if owner is not None else [])]
                cursor = (await conn.execute(select(images.created_at).where(*cursor_conditions))).first()
                if cursor is None:
                    raise UnknownCursor(after)
                conditions.append(
                    or_(images.created_at < cursor.created_at, and_(images.created_at == cursor.created_at, images.id < after))
                )
            statement = (
                select(images_table)
                .where(*conditions)
                .order_by(images.created_at.desc(), images.id.desc())
                .limit(limit + 1)
            )
            rows = (await conn.execute(statement)).all()
        records = [ImageRecord(**row._mapping) for row in rows[:limit]]
        return records, len(rows) > limit

    async def of_request(self, request_id: str) -> list[ImageRecord]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(images_table).where(images_table.c.request_id == request_id))).all()
        return [ImageRecord(**row._mapping) for row in rows]

    async def delete(self, image_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(delete(images_table).where(images_table.c.id == image_id))

    async def delete_many(self, image_ids: Sequence[str]) -> None:
        if image_ids:
            async with self._engine.begin() as conn:
                await conn.execute(delete(images_table).where(images_table.c.id.in_(image_ids)))

    async def total_bytes(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.coalesce(func.sum(images_table.c.bytes), 0)))).scalar_one())

    async def oldest(self, limit: int, before: float | None = None) -> list[ImageRecord]:
        """The oldest images (created before `before`, when given): what retention deletes first."""
        images = images_table.c
        statement = select(images_table).order_by(images.created_at, images.id).limit(limit)
        if before is not None:
            statement = statement.where(images.created_at < before)
        async with self._engine.connect() as conn:
            return [ImageRecord(**row._mapping) for row in (await conn.execute(statement)).all()]

    async def object_keys(self, after_id: str = "", limit: int = 1000) -> list[tuple[str, str, float]]:
        """(id, object key, created_at) of rows in id order, a page at a time: for reconciling rows with the store."""
        images = images_table.c
        statement = (
            select(images.id, images.object_key, images.created_at)
            .where(images.id > after_id)
            .order_by(images.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [(row.id, row.object_key, row.created_at) for row in (await conn.execute(statement)).all()]

    async def has_object_key(self, key: str) -> bool:
        async with self._engine.connect() as conn:
            statement = select(images_table.c.id).where(images_table.c.object_key == key).limit(1)
            return (await conn.execute(statement)).first() is not None

    async def url_secret(self) -> str:
        """The secret that signs image URLs: the one in the index, or a new one put there first.

        Replicas starting together race to insert it; the loser reads the winner's, so all sign alike."""
        existing = await self._meta(URL_SECRET_KEY)
        if existing is not None:
            return existing
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert(meta_table).values(key=URL_SECRET_KEY, value=secrets.token_urlsafe(32)))
        except IntegrityError:
            pass
        secret = await self._meta(URL_SECRET_KEY)
        assert secret is not None
        return secret

    async def _meta(self, key: str) -> str | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(select(meta_table.c.value).where(meta_table.c.key == key))).scalar_one_or_none()


async def open_index(url: str, migrations: Sequence[Migration] = MIGRATIONS) -> ImageIndex:
    """Connect, then create the schema, upgrade an older one, or refuse a newer one (IndexUnavailable)."""
    engine = make_engine(url)
    description = engine.url.render_as_string(hide_password=True)
    try:
        async with sqlite_schema_lock(engine), engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
            await prepare_schema(conn, description, migrations)
    except INDEX_FAILURES as exc:
        await engine.dispose()
        raise IndexUnavailable(f"cannot open the image index {description}: {first_line(exc)}") from None
    except BaseException:
        await engine.dispose()
        raise
    return ImageIndex(engine, description)


@contextlib.asynccontextmanager
async def sqlite_schema_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Servers starting together on one SQLite file take turns creating or upgrading its schema,
    through a lock file beside it (PostgreSQL's turn-taking is an advisory lock instead): otherwise
    two could each find no schema and create it twice."""
    if engine.dialect.name != "sqlite":
        yield
        return
    lock_path = Path(str(engine.url.database) + ".lock")
    with open(lock_path, "a+b") as lock:
        await asyncio.to_thread(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


async def prepare_schema(conn: AsyncConnection, description: str, migrations: Sequence[Migration]) -> None:
    newest = len(migrations) + 1
    await conn.run_sync(lambda sync: schema_table.create(sync, checkfirst=True))
    version = (await conn.execute(select(func.max(schema_table.c.version)))).scalar_one_or_none()
    if version is None:
        await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))
        await conn.execute(insert(schema_table).values(version=newest))
        return
    if version > newest:
        raise IndexUnavailable(
            f"the image index {description} has schema version {version}, newer than this server's "
            f"{newest}: a newer zimage-server wrote it; upgrade this one"
        )
    for step in range(version, newest):
        await migrations[step - 1](conn)
    if version < newest:
        await conn.execute(update(schema_table).values(version=newest))
