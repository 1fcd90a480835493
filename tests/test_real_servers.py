"""The throw-away servers of tests/real_servers.py start and serve real clients: an object
round-trips through obstore (a presigned URL included), and SQLAlchemy + asyncpg run a query."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import timedelta

import obstore
import pytest
from obstore.exceptions import PermissionDeniedError
from obstore.store import S3Store
from real_servers import PostgresServer, S3Server, create_database
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine


def test_an_object_round_trips_through_s3_configured_from_the_environment(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    store = S3Store(s3.bucket)

    obstore.put(store, "images/a.png", b"\x89PNG data")
    assert bytes(obstore.get(store, "images/a.png").bytes()) == b"\x89PNG data"
    assert [meta["path"] for meta in obstore.list(store, prefix="images").collect()] == ["images/a.png"]
    url = obstore.sign(store, "GET", "images/a.png", timedelta(minutes=1))
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"\x89PNG data"

    obstore.delete(store, "images/a.png")
    assert obstore.list(store, prefix="images").collect() == []
    with pytest.raises(FileNotFoundError):
        obstore.get(store, "images/a.png")


def test_s3_refuses_a_wrong_secret(s3: S3Server) -> None:
    store = S3Store(s3.bucket, endpoint=s3.endpoint, region="us-east-1", access_key_id=s3.access_key,
                    secret_access_key="wrong", client_options={"allow_http": True})
    with pytest.raises(PermissionDeniedError):
        obstore.put(store, "x", b"x")


def test_a_query_runs_in_the_cluster_and_in_a_fresh_database(postgres: PostgresServer) -> None:
    assert asyncio.run(_scalar(postgres.url, "select 1")) == 1
    url = create_database(postgres, "fresh")
    assert asyncio.run(_scalar(url, "select current_database()")) == "fresh"


async def _scalar(url: str, query: str) -> object:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text(query))).scalar_one()
    finally:
        await engine.dispose()
