"""A call against a silent PostgreSQL raises Unavailable within its client timeout, once.

The network is black-holed by a :class:`FaultProxy` between chatkeep and the test's own
database: bytes are swallowed, sockets stay open, so only chatkeep's timeouts end the wait.
The client timeout is ``statement_timeout + statement_timeout_grace`` (1 s + 5 s here); a
call must raise within it plus a margin for a loaded machine, never after twice it (the
old behaviour: after the timeout, the release waited a second full timeout for a cancel
request or ROLLBACK the silent server would never answer).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings, Unavailable, urls
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.slow

STATEMENT_TIMEOUT = 1.0
GRACE = 5.0  # Settings.statement_timeout_grace's default
CLIENT_TIMEOUT = STATEMENT_TIMEOUT + GRACE
# Scheduling noise on a loaded 2-core machine; far below another CLIENT_TIMEOUT.
MARGIN = 2.0


def through(url: str, proxy: FaultProxy) -> str:
    """``url`` with its hosts (authority and ``?host=``/``?port=``) replaced by the proxy."""
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    query = "&".join(
        piece for piece in parts.query.split("&") if piece.partition("=")[0] not in HOST_PARAMS
    )
    return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{proxy.port}", query=query))


HOST_PARAMS = ("host", "port")


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(database_url: str) -> AsyncIterator[FaultProxy]:
    """A proxy in front of the test database's server (its TCP port or its socket)."""
    host, port = (urls.hosts(database_url) or [("/var/run/postgresql", None)])[0]
    if host.startswith("/"):  # a socket folder, as the embedded server's URL names
        host = f"{host}/.s.PGSQL.{port or 5432}"
    async with FaultProxy(host, port or 5432) as found:
        yield found


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str, proxy: FaultProxy) -> AsyncIterator[Database]:
    """A pool (as the superuser) through the proxy, with a 1 s statement timeout."""
    settings = Settings(database_url=through(database_url, proxy), statement_timeout=1)
    database = Database(settings, min_size=1, max_size=2)
    await database.open()
    try:
        yield database
    finally:
        proxy.heal()  # a graceful close needs the server's answers
        await asyncio.wait_for(database.close(), 30)


async def timed_unavailable(call: Callable[[], Coroutine[Any, Any, object]]) -> float:
    """Run ``call``, which must raise Unavailable; return how long it took (capped)."""
    started = time.monotonic()
    with pytest.raises(Unavailable):
        # The cap only keeps a regression from hanging the suite.
        await asyncio.wait_for(call(), 4 * CLIENT_TIMEOUT)
    return time.monotonic() - started


async def test_a_statement_on_a_silent_network_fails_within_the_client_timeout(
    db: Database, proxy: FaultProxy
) -> None:
    assert await db.fetchval("t.before", "SELECT 1") == 1
    proxy.blackhole()
    took = await timed_unavailable(lambda: db.fetchval("t.lost", "SELECT 1"))
    assert CLIENT_TIMEOUT - 0.5 < took < CLIENT_TIMEOUT + MARGIN
    # The dead connection was dropped, not handed back: after the heal, work resumes on
    # a new one, at once.
    proxy.heal()
    started = time.monotonic()
    assert await db.fetchval("t.after", "SELECT 2") == 2
    assert time.monotonic() - started < MARGIN


async def test_a_transaction_on_a_silent_network_fails_within_the_client_timeout(
    db: Database, proxy: FaultProxy
) -> None:
    async def in_transaction() -> None:
        async with db.transaction("t.tx"):
            await db.execute("t.first", "SELECT 1")
            proxy.blackhole()
            await db.execute("t.lost", "SELECT 2")

    took = await timed_unavailable(in_transaction)
    assert took < CLIENT_TIMEOUT + MARGIN
    proxy.heal()
    assert await db.fetchval("t.after", "SELECT 3") == 3


async def test_a_commit_on_a_silent_network_fails_within_the_client_timeout(
    db: Database, proxy: FaultProxy
) -> None:
    async def commit_lost() -> None:
        async with db.transaction("t.commit"):
            await db.execute("t.write", "SELECT 1")
            proxy.blackhole()  # the COMMIT goes into the hole

    took = await timed_unavailable(commit_lost)
    assert took < CLIENT_TIMEOUT + MARGIN


async def test_a_savepoint_failure_on_a_silent_network_fails_within_the_client_timeout(
    db: Database, proxy: FaultProxy
) -> None:
    async def nested() -> None:
        async with db.transaction("t.outer"), db.transaction("t.inner"):
            proxy.blackhole()
            await db.execute("t.lost", "SELECT 1")

    took = await timed_unavailable(nested)
    assert took < CLIENT_TIMEOUT + MARGIN


async def test_a_callers_own_timeout_on_a_silent_network_ends_the_call_at_once(
    db: Database, proxy: FaultProxy
) -> None:
    """Cancelled mid-statement, the call does not wait a client timeout for the cancel."""
    assert await db.fetchval("t.before", "SELECT 1") == 1
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await db.fetchval("t.lost", "SELECT 1")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5), db.transaction("t.tx"):
            await db.execute("t.lost", "SELECT 1")
    assert time.monotonic() - started < 1.0 + MARGIN
    proxy.heal()
    assert await db.fetchval("t.after", "SELECT 2") == 2


async def test_a_server_side_statement_timeout_keeps_the_connection(
    database_url: str,
) -> None:
    """The normal path is unchanged: the server cancels cleanly, the connection is reused."""
    settings = Settings(database_url=database_url, statement_timeout=0.3)
    async with Database(settings, min_size=1, max_size=1) as db:
        pid = await db.fetchval("t.pid", "SELECT pg_backend_pid()")
        started = time.monotonic()
        with pytest.raises(Unavailable, match="57014"):
            await db.execute("t.slow", "SELECT pg_sleep(5)")
        with pytest.raises(Unavailable, match="57014"):
            async with db.transaction("t.slow_tx"):
                await db.execute("t.slow", "SELECT pg_sleep(5)")
        assert time.monotonic() - started < 0.6 + MARGIN
        assert await db.fetchval("t.pid", "SELECT pg_backend_pid()") == pid


async def test_send_message_on_a_silent_network_fails_within_the_client_timeout(
    app_url: str, redis_url: str, proxy: FaultProxy
) -> None:
    """The facade, as chatapp_app: the send raises Unavailable once, not after twice."""
    settings = Settings(database_url=through(app_url, proxy), statement_timeout=1)
    # Every connection open before the fault: a new one would wait connect_timeout.
    db = Database(settings, min_size=4, max_size=4)
    redis = RedisClient(redis_url)
    await db.open()
    try:
        chat = ChatKeep(db, redis, node_id="node-pg", bcrypt_rounds=10)
        suffix = uuid.uuid4().hex[:8]
        alice = await chat.register(
            CreateUserDto(
                email=f"alice{suffix}@example.org",
                username=f"alice{suffix}",
                password="correct horse",
            )
        )
        room = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
        await chat.send_message(room.id, alice.id, "before")
        proxy.blackhole()

        def send(n: int) -> Callable[[], Coroutine[Any, Any, object]]:
            return lambda: chat.send_message(room.id, alice.id, f"lost {n}")

        sends = [timed_unavailable(send(n)) for n in range(3)]
        for took in await asyncio.gather(*sends):
            assert took < CLIENT_TIMEOUT + MARGIN
        proxy.heal()
        after = await chat.send_message(room.id, alice.id, "after")
        assert after.content == "after"
    finally:
        proxy.heal()
        await asyncio.wait_for(db.close(), 30)
        await redis.aclose()
