"""Test harness: real PostgreSQL and real Redis, isolated per test.

* ``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` select real servers (the URL's database is
  only used to reach the server: tests create their own databases). Without them the
  embedded PostgreSQL 18 and Valkey start, with data in ``.chatkeep/``.
* Once per session the migrations are applied to a template database; each test that asks
  for ``database_url`` gets a fresh copy (``CREATE DATABASE ... TEMPLATE``), dropped after.
* Each test that asks for ``redis_url`` gets a flushed logical database of its own server.

The servers, the template and the per-test copies come from ``chatkeep.testing``, the
pytest plugin chatkeep ships for applications' tests: one harness, tested by being used.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from chatkeep.config import Settings
from chatkeep.embedded import Endpoints
from chatkeep.testing import drop_database, redis_test_url, scratch_database, url_as, url_for
from tests.servers import RedisClusterServers, RedisServer, temporary_folder

# The harness is chatkeep.testing, the plugin applications use; this file names its
# fixtures as the suite always has and adds the ones only chatkeep's own tests need.
pytest_plugins = [
    "chatkeep.testing",
    "pytester",
    "tests.migration_files",
    "tests.embedded_processes",
]

__all__ = [
    "chdir",
    "database_exists",
    "drop_database",
    "redis_test_url",
    "scratch_database",
    "url_as",
    "url_for",
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def chatkeep_server_settings() -> Settings:
    """The TEST_* URLs (CI and the README use them), else embedded data in ``.chatkeep/``."""
    overrides: dict[str, Any] = {"data_dir": ROOT / ".chatkeep"}
    if os.environ.get("TEST_DATABASE_URL"):
        overrides["database_url"] = os.environ["TEST_DATABASE_URL"]
    if os.environ.get("TEST_REDIS_URL"):
        overrides["redis_url"] = os.environ["TEST_REDIS_URL"]
    return Settings(**overrides)


@pytest.fixture(scope="session")
def servers(chatkeep_servers: Endpoints) -> Endpoints:
    """Both stores for the whole session: the TEST_* URLs, or the embedded servers."""
    return chatkeep_servers


@pytest.fixture(scope="session")
def admin_url(chatkeep_admin_url: str) -> str:
    """A URL to the server's maintenance database, for creating and dropping databases."""
    return chatkeep_admin_url


async def database_exists(admin_url: str, name: str) -> bool:
    """Whether the server ``admin_url`` reaches has a database called ``name``."""
    admin = await asyncpg.connect(admin_url)
    try:
        return bool(await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def database_roles(chatkeep_roles: None) -> None:
    """The chatapp_* roles (cluster-wide, made as `chatkeep setup` makes them): migrations
    from 008 on grant to them, so they must exist before any database is migrated."""


@pytest.fixture(scope="session")
def template_database(chatkeep_template_database: str) -> str:
    """A migrated database that every test database is cloned from."""
    return chatkeep_template_database


@pytest_asyncio.fixture(loop_scope="session")
async def empty_database_url(admin_url: str, database_roles: None) -> AsyncIterator[str]:
    """URL of a new, empty database (no migrations), dropped after the test."""
    async with scratch_database(admin_url, "chatkeep_t") as name:
        yield url_for(admin_url, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_database_url(admin_url: str, database_roles: None) -> AsyncIterator[str]:
    """One empty database per test module (behind ``emptied_database_url``)."""
    async with scratch_database(admin_url, "chatkeep_m") as name:
        yield url_for(admin_url, name)


@pytest_asyncio.fixture(loop_scope="session")
async def emptied_database_url(module_database_url: str) -> str:
    """Like ``empty_database_url`` but far cheaper: the module's database, emptied.

    Before each test, other sessions on it are ended and schema public is dropped and made
    anew (a CREATE DATABASE copies and syncs a template, ten times slower). Only for tests
    whose objects all live in schema public.
    """
    conn = await asyncpg.connect(module_database_url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid();"
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public"
        )
    finally:
        await conn.close()
    return module_database_url


@pytest_asyncio.fixture(loop_scope="session")
async def econn(emptied_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to an empty database (the module's, emptied)."""
    connection = await asyncpg.connect(emptied_database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_url(admin_url: str) -> AsyncIterator[str]:
    """A URL naming a database that does not exist yet (dropped after the test if made)."""
    name = f"chatkeep_setup_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        yield url_for(admin_url, name)
    finally:
        await drop_database(admin_url, name)


@pytest.fixture
def database_url(chatkeep_database_url: str) -> str:
    """URL of a fresh, fully migrated database, dropped after the test."""
    return chatkeep_database_url


@pytest_asyncio.fixture(loop_scope="session")
async def app_url(database_url: str) -> str:
    """The test's database as ``chatapp_app``: the role production connects as."""
    return url_as(database_url, "chatapp_app")


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the test's migrated database."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def app_conn(app_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database as chatapp_app."""
    connection = await asyncpg.connect(app_url)
    try:
        assert await connection.fetchval("SELECT current_user") == "chatapp_app"
        yield connection
    finally:
        await connection.close()


def _redis_test_url(base: str) -> str:
    """``base`` on the tests' logical database: TEST_REDIS_URL's own, else db 13."""
    return redis_test_url(base, explicit=bool(os.environ.get("TEST_REDIS_URL")))


@pytest.fixture
def redis_url(chatkeep_redis_url: str) -> str:
    """URL of a flushed Redis logical database reserved for tests."""
    return chatkeep_redis_url


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A started Redis of this test's own, to stop and start again on the same port."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Settings]:
    """Build Settings for this test's stores; keyword arguments override fields."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data"}
        for name in ("database_url", "redis_url"):
            if name in request.fixturenames:
                values[name] = request.getfixturevalue(name)
        values.update(overrides)
        return Settings(**values)

    return factory


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, str]]:
    """Environment for in-process CLI runs: only the variables a test passes are set."""

    def factory(**values: str) -> dict[str, str]:
        for key in list(os.environ):
            if key in ("DATABASE_URL", "REDIS_URL") or key.startswith("CHATKEEP_"):
                monkeypatch.delenv(key, raising=False)
        return dict(values)

    return factory


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """Run a block in another working directory."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _cluster_ports() -> tuple[int, ...]:
    # Fixed loopback ports (a cluster announces its nodes' ports, so they must be known
    # before it starts); TEST_REDIS_CLUSTER_PORTS=7110 moves all six.
    first = int(os.environ.get("TEST_REDIS_CLUSTER_PORTS", "7100"))
    return tuple(range(first, first + 6))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of the session's own: 3 masters, 3 replicas, killed at the end.

    Same server software as the standalone tests (``redis-server`` when TEST_REDIS_URL
    is set, else the embedded Valkey).
    """
    with RedisClusterServers(temporary_folder("chatkeep-cluster-"), _cluster_ports()) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The ``redis+cluster://`` URL of the session's cluster, every node flushed and healthy."""
    redis_cluster.restore()
    redis_cluster.flush()
    return redis_cluster.url
