"""Test your application against a real chatkeep: a pytest plugin.

Enable it in your ``conftest.py``::

    pytest_plugins = ["chatkeep.testing"]

and ask for the ``chatkeep`` fixture: a connected :class:`~chatkeep.facade.ChatKeep` on a
fresh, fully migrated PostgreSQL database and a flushed Redis logical database, both its own
for the test, connected as ``chatapp_app`` (the role production uses, so row security binds
every flow as it will in production)::

    async def test_hello(chatkeep: ChatKeep) -> None:
        user = await chatkeep.register(CreateUserDto(...))

Where the servers are:

* ``CHATKEEP_TEST_DATABASE_URL`` / ``CHATKEEP_TEST_REDIS_URL`` name real servers. The
  database URL's user must be able to create roles and databases (a superuser on a test
  server); its database is only used to reach the server, each test gets a database of its
  own. ``chatapp_app`` is reached without a password, as a test server on loopback allows.
  The Redis URL's logical database (13 when it names none) is flushed before and after
  each test: give it one nothing else uses.
* Without them, the embedded PostgreSQL 18 and Valkey start (the ``embedded`` extra), with
  their data in ``.chatkeep/`` under the directory pytest runs in.

Once per session the migrations are applied to a template database; each test's database
is a copy of it (``CREATE DATABASE ... TEMPLATE``, tens of milliseconds), dropped after.
The smaller fixtures (``chatkeep_database_url``, ``chatkeep_redis_url``,
``chatkeep_settings``...) serve tests that build their own objects; override
``chatkeep_server_settings`` to choose the servers some other way.

This module needs pytest and pytest-asyncio (the ``testing`` extra); nothing else in
chatkeep imports it. Its helpers may be imported before pytest loads it as a plugin, so it
opts out of assertion rewriting (it asserts nothing): PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.embedded import Endpoints, resolve_endpoints
from chatkeep.facade import ChatKeep
from chatkeep.storage.bootstrap import APP_ROLE, ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.users import MIN_BCRYPT_ROUNDS

__all__ = [
    "TEST_REDIS_DB",
    "ChatkeepTestSettings",
    "chatkeep",
    "chatkeep_admin_url",
    "chatkeep_database_url",
    "chatkeep_redis_url",
    "chatkeep_roles",
    "chatkeep_server_settings",
    "chatkeep_servers",
    "chatkeep_settings",
    "chatkeep_template_database",
    "create_database",
    "drop_database",
    "ensure_test_roles",
    "flush_redis",
    "make_template_database",
    "redis_test_url",
    "scratch_database",
    "url_as",
    "url_for",
]

#: The logical Redis database tests flush when the Redis URL names none (away from db 0).
TEST_REDIS_DB: Final = 13

_T = TypeVar("_T")
_counter = itertools.count()


class ChatkeepTestSettings(BaseSettings):
    """Where the test servers are: ``CHATKEEP_TEST_DATABASE_URL`` and ``..._REDIS_URL``.

    Unset, the embedded servers start with their data in ``data_dir``
    (``CHATKEEP_TEST_DATA_DIR``, default ``.chatkeep``).
    """

    model_config = SettingsConfigDict(env_prefix="CHATKEEP_TEST_", extra="ignore")

    database_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    data_dir: Path = Path(".chatkeep")

    def server_settings(self) -> Settings:
        """The :class:`~chatkeep.config.Settings` that find (or start) these servers."""
        values: dict[str, Any] = {"data_dir": self.data_dir}
        if self.database_url is not None:
            values["database_url"] = self.database_url
        if self.redis_url is not None:
            values["redis_url"] = self.redis_url
        return Settings(**values)


def _run(work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` on a loop of its own, leaving the test's event loop alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(work)
    finally:
        loop.close()


def url_for(base: str, database: str) -> str:
    """``base`` pointed at another database on the same server."""
    return maintenance_url(base, database)


def url_as(url: str, role: str) -> str:
    """``url`` with its user replaced by ``role`` (and no password)."""
    return urls.with_user(url, role)


def redis_test_url(base: str, *, explicit: bool) -> str:
    """``base`` on the tests' logical database.

    Args:
        base: the Redis server's URL.
        explicit: True when the URL was given (its own database is used, when it names
            one); False for the embedded server (database 13).
    """
    chosen = urls.redis_db(base) if explicit else None
    return urls.with_redis_db(base, TEST_REDIS_DB if chosen is None else chosen)


def _database_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:4]}"


async def create_database(admin_url: str, prefix: str, *, template: str | None = None) -> str:
    """Create a database named ``prefix_...`` (a copy of ``template``, if given)."""
    name = _database_name(prefix)
    clause = f' TEMPLATE "{template}"' if template else ""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await admin.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    """Drop ``name`` if it exists, ending the sessions still on it."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_database(
    admin_url: str, prefix: str, *, template: str | None = None
) -> AsyncIterator[str]:
    """Create a database (optionally a copy of ``template``), yield its name, drop it."""
    name = await create_database(admin_url, prefix, template=template)
    try:
        yield name
    finally:
        await drop_database(admin_url, name)


async def ensure_test_roles(admin_url: str) -> None:
    """The ``chatapp_*`` roles, without passwords, as ``chatkeep setup`` makes them.

    They are cluster-wide and the migrations grant to them, so they must exist before any
    database is migrated.
    """
    admin = await asyncpg.connect(admin_url)
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()


async def make_template_database(admin_url: str, prefix: str = "chatkeep_tpl") -> str:
    """A new database prepared and migrated as a real one is; returns its name.

    Prepared as ``chatkeep setup`` prepares a database (schema public owned by
    ``chatapp_owner``) and migrated as ``chatapp_owner``, so every object has its
    production owner and grants. Drop it with :func:`drop_database`.
    """
    name = await create_database(admin_url, prefix)
    try:
        conn = await asyncpg.connect(url_for(admin_url, name))
        try:
            await prepare_database(conn)
            await Migrator(conn).up()
        finally:
            await conn.close()
    except BaseException:
        await drop_database(admin_url, name)
        raise
    return name


async def flush_redis(url: str) -> None:
    """Empty the logical database ``url`` names."""
    client = aioredis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@contextlib.contextmanager
def _dropped_after(admin_url: str, name: str) -> Iterator[str]:
    """Yield ``name``; drop that database when the block ends, however it ends."""
    try:
        yield name
    finally:
        _run(drop_database(admin_url, name))


@pytest.fixture(scope="session")
def chatkeep_server_settings() -> Settings:
    """Settings that find the test servers; override it to choose them another way."""
    return ChatkeepTestSettings().server_settings()


@pytest.fixture(scope="session")
def chatkeep_servers(chatkeep_server_settings: Settings) -> Iterator[Endpoints]:
    """Both stores for the whole session: the given URLs, or the embedded servers."""
    with resolve_endpoints(chatkeep_server_settings) as found:
        yield found


@pytest.fixture(scope="session")
def chatkeep_admin_url(chatkeep_servers: Endpoints) -> str:
    """A URL to the server's maintenance database, for creating and dropping databases."""
    return maintenance_url(chatkeep_servers.admin_database_url)


@pytest.fixture(scope="session")
def chatkeep_roles(chatkeep_admin_url: str) -> None:
    """The ``chatapp_*`` roles exist (made once per session if missing)."""
    _run(ensure_test_roles(chatkeep_admin_url))


@pytest.fixture(scope="session")
def chatkeep_template_database(chatkeep_admin_url: str, chatkeep_roles: None) -> Iterator[str]:
    """The name of a migrated database that every test database is copied from."""
    made = _run(make_template_database(chatkeep_admin_url))
    with _dropped_after(chatkeep_admin_url, made) as name:
        yield name


@pytest.fixture
def chatkeep_database_url(
    chatkeep_admin_url: str, chatkeep_template_database: str
) -> Iterator[str]:
    """URL (as the admin user) of a fresh, fully migrated database, dropped after the test."""
    made = create_database(chatkeep_admin_url, "chatkeep_t", template=chatkeep_template_database)
    with _dropped_after(chatkeep_admin_url, _run(made)) as name:
        yield url_for(chatkeep_admin_url, name)


@pytest.fixture
def chatkeep_redis_url(
    chatkeep_servers: Endpoints, chatkeep_server_settings: Settings
) -> Iterator[str]:
    """URL of a Redis logical database, flushed before and after the test."""
    url = redis_test_url(
        chatkeep_servers.redis_url, explicit=chatkeep_server_settings.redis_url is not None
    )
    _run(flush_redis(url))
    try:
        yield url
    finally:
        _run(flush_redis(url))


@pytest.fixture
def chatkeep_settings(
    chatkeep_database_url: str, chatkeep_redis_url: str, tmp_path: Path
) -> Settings:
    """Settings for this test's database (as ``chatapp_app``) and Redis database."""
    return Settings(
        database_url=url_as(chatkeep_database_url, APP_ROLE),
        redis_url=chatkeep_redis_url,
        data_dir=tmp_path / "chatkeep",
    )


@pytest_asyncio.fixture
async def chatkeep(chatkeep_settings: Settings) -> AsyncIterator[ChatKeep]:
    """A connected facade on this test's own database and Redis, closed after the test.

    Passwords are hashed at bcrypt's cheapest allowed cost, so registering is fast.
    """
    async with ChatKeep.connect(
        chatkeep_settings, node_id="test", bcrypt_rounds=MIN_BCRYPT_ROUNDS
    ) as chat:
        yield chat
