"""``chatkeep setup``'s first step: the database, created once, safely under races."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.storage.bootstrap import database_name, ensure_database, maintenance_url
from tests.conftest import database_exists


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgresql://u@h/chat", "chat"),
        ("postgresql://u@h:5432/chat?sslmode=require", "chat"),
        ("postgresql://u@h", "chatapp_db"),
        ("postgresql://u@h/", "chatapp_db"),
        ("postgresql:///chat?host=/run/pg", "chat"),
        # The database given in the query, as asyncpg and libpq read it.
        ("postgresql://u@h?dbname=stats", "stats"),
        ("postgresql:///?host=/run/pg&dbname=stats", "stats"),
    ],
)
def test_database_name(url: str, name: str) -> None:
    assert database_name(url) == name


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://u:p@h:5/chat?sslmode=require",
            "postgresql://u:p@h:5/postgres?sslmode=require",
        ),
        ("postgresql:///chat?host=/run/pg", "postgresql:///postgres?host=/run/pg"),
        ("postgresql://u@/chat?host=/run/pg", "postgresql://u@/postgres?host=/run/pg"),
    ],
)
def test_maintenance_url_keeps_server_credentials_and_options(url: str, expected: str) -> None:
    assert maintenance_url(url) == expected
    assert maintenance_url(url, "other").replace("/other", "/postgres", 1) == expected


async def test_creates_the_database_once(
    fresh_url: str, admin_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    name = database_name(fresh_url)
    assert not await database_exists(admin_url, name)
    assert await ensure_database(fresh_url, settings) is True
    assert await database_exists(admin_url, name)
    # The second run finds it and changes nothing.
    assert await ensure_database(fresh_url, settings) is False
    conn = await asyncpg.connect(fresh_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == name
    finally:
        await conn.close()


async def test_concurrent_runs_all_succeed_and_one_creates(
    fresh_url: str, admin_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    results = await asyncio.gather(*(ensure_database(fresh_url, settings) for _ in range(4)))
    assert sorted(results) == [False, False, False, True]
    assert await database_exists(admin_url, database_name(fresh_url))


@pytest.mark.parametrize("name", ["chat-app", 'x"; DROP DATABASE postgres; --', "a" * 64])
async def test_unsafe_database_names_are_refused(
    admin_url: str, make_settings: Callable[..., Settings], name: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await ensure_database(maintenance_url(admin_url, name), make_settings())
    assert info.value.field == "database_url"
    assert not await database_exists(admin_url, name[:63])


async def test_unreachable_server_is_unavailable(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(Unavailable):
        await ensure_database("postgresql://u@127.0.0.1:1/chat", make_settings())
