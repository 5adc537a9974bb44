"""Facade calls return within their documented bound whatever Redis does.

Redis is a server of the test's own (:class:`RedisServer`), frozen with SIGSTOP (a hung
server: the kernel still accepts connections, nothing answers), stopped (refused
connections), or black-holed behind a :class:`FaultProxy`. The bounds are the documented
defaults (docs/troubleshooting.md, "How long a call can wait"): writes give the send
limit and the Redis work after their commit ``redis_best_effort_timeout`` (0.5 s) each and
then go on without it; flows that need Redis raise Unavailable after ``redis_timeout``
(1 s). The facade connects through ``ChatKeep.connect``, as an application does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings, Unavailable, User
from chatkeep.realtime import MessageCreated, RedisClient
from tests.faults.proxy import FaultProxy
from tests.servers import RedisServer

pytestmark = pytest.mark.slow

T = TypeVar("T")

PASSWORD = "correct horse"
BEST_EFFORT = 0.5  # Settings.redis_best_effort_timeout's default
REDIS_TIMEOUT = 1.0  # Settings.redis_timeout's default
# Scheduling noise on a loaded 2-core machine (and the PostgreSQL work of the call).
MARGIN = 1.5
# A write waits at most for the send limit and for the work after its commit.
WRITE_BOUND = 2 * BEST_EFFORT + MARGIN
REQUIRED_BOUND = REDIS_TIMEOUT + MARGIN
# Caps every call so that a regression fails the test instead of hanging it.
CAP = 30.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own (never the machine's shared one)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def timed(call: Coroutine[Any, Any, T]) -> tuple[T, float]:
    """``await call`` (capped) and how long it took."""
    started = time.monotonic()
    result = await asyncio.wait_for(call, CAP)
    return result, time.monotonic() - started


async def timed_unavailable(call: Callable[[], Coroutine[Any, Any, object]]) -> float:
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(call(), CAP)
    return time.monotonic() - started


async def stored_contents(database_url: str, room_id: uuid.UUID) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT content FROM messages WHERE room_id = $1 ORDER BY seq", room_id
        )
    finally:
        await conn.close()
    return [row["content"] for row in rows]


@pytest_asyncio.fixture(loop_scope="session")
async def connect_chat(
    make_settings: Callable[..., Settings], app_url: str
) -> AsyncIterator[Callable[[str], Coroutine[Any, Any, ChatKeep]]]:
    """Facades (as chatapp_app) on the test database and a given Redis URL."""
    stack: list[Any] = []

    async def factory(redis_url: str) -> ChatKeep:
        context = ChatKeep.connect(
            make_settings(database_url=app_url, redis_url=redis_url), bcrypt_rounds=10
        )
        stack.append(context)
        return await context.__aenter__()

    yield factory
    for context in reversed(stack):
        await asyncio.wait_for(context.__aexit__(None, None, None), CAP)


async def register(chat: ChatKeep, name: str) -> User:
    return await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
    )


async def exercise_writes(
    chat: ChatKeep, database_url: str, alice: User, bob: User, room: uuid.UUID, label: str
) -> None:
    """Every facade write whose Redis work is best-effort returns within WRITE_BOUND."""
    sends = [
        timed(chat.send_message(room, alice.id, f"{label} {n}", client_msg_id=f"{label}-{n}"))
        for n in range(5)
    ]
    results = await asyncio.gather(*sends)
    for _, took in results:
        assert took < WRITE_BOUND, f"send took {took:.2f} s"
    first = results[0][0]
    edited, took = await timed(chat.edit_message(first.id, alice.id, f"{label} 0!"))
    assert edited.is_edited
    assert took < WRITE_BOUND
    _, took = await timed(chat.mark_read(room, alice.id))
    assert took < WRITE_BOUND
    _, took = await timed(chat.join(room, bob.id))
    assert took < WRITE_BOUND
    _, took = await timed(chat.leave(room, bob.id))
    assert took < WRITE_BOUND
    deleted, took = await timed(chat.delete_message(results[-1][0].id, alice.id))
    assert deleted
    assert took < WRITE_BOUND
    # Committed in PostgreSQL, all of it: four sends left (one deleted), one edited.
    contents = await stored_contents(database_url, room)
    mine = sorted(c for c in contents if c.startswith(label))
    assert mine == [f"{label} 0!", f"{label} 1", f"{label} 2", f"{label} 3"]


async def test_writes_return_within_the_bound_while_redis_is_frozen(
    connect_chat: Callable[[str], Coroutine[Any, Any, ChatKeep]],
    database_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    chat = await connect_chat(redis_server.url)
    alice, bob = await register(chat, "alice"), await register(chat, "bob")
    room = (await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))).id
    sub = await chat.subscribe(room)
    before = await chat.login("alice@example.org", PASSWORD)
    assert before is not None

    redis_server.freeze()
    try:
        await exercise_writes(chat, database_url, alice, bob, room, "frozen")
        # The skipped work is logged, not raised.
        assert any("skipped: redis did not finish" in r.getMessage() for r in caplog.records)
        # Flows that need Redis say so, within their own bound.
        took = await timed_unavailable(lambda: chat.sessions.validate(before.session.token))
        assert took < REQUIRED_BOUND
        assert (
            await timed_unavailable(lambda: chat.login("alice@example.org", PASSWORD))
            < REQUIRED_BOUND
        )
        assert await timed_unavailable(lambda: chat.set_typing(room, alice.id)) < REQUIRED_BOUND
    finally:
        redis_server.thaw()

    # Thawed: everything works again, events included.
    login = await chat.login("alice@example.org", PASSWORD)
    assert login is not None
    assert await chat.sessions.validate(login.session.token) is not None
    sent = await chat.send_message(room, alice.id, "thawed")
    async with asyncio.timeout(15):
        while True:
            item = await sub.get()
            if isinstance(item, MessageCreated) and item.message_id == sent.id:
                break
    await sub.aclose()


async def test_writes_return_within_the_bound_while_redis_refuses(
    connect_chat: Callable[[str], Coroutine[Any, Any, ChatKeep]],
    database_url: str,
    redis_server: RedisServer,
) -> None:
    chat = await connect_chat(redis_server.url)
    alice, bob = await register(chat, "alice"), await register(chat, "bob")
    room = (await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))).id
    before = await chat.login("alice@example.org", PASSWORD)
    assert before is not None

    await asyncio.to_thread(redis_server.stop)
    await exercise_writes(chat, database_url, alice, bob, room, "refused")
    took = await timed_unavailable(lambda: chat.sessions.validate(before.session.token))
    assert took < REQUIRED_BOUND

    await asyncio.to_thread(redis_server.start)
    login = await chat.login("alice@example.org", PASSWORD)
    assert login is not None


async def test_writes_return_within_the_bound_while_redis_is_blackholed(
    connect_chat: Callable[[str], Coroutine[Any, Any, ChatKeep]],
    database_url: str,
    redis_server: RedisServer,
) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        chat = await connect_chat(f"redis://127.0.0.1:{proxy.port}/0")
        alice, bob = await register(chat, "alice"), await register(chat, "bob")
        room = (await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))).id
        before = await chat.login("alice@example.org", PASSWORD)
        assert before is not None

        proxy.blackhole()
        try:
            await exercise_writes(chat, database_url, alice, bob, room, "holed")
            took = await timed_unavailable(lambda: chat.sessions.validate(before.session.token))
            assert took < REQUIRED_BOUND
        finally:
            proxy.heal()
        login = await chat.login("alice@example.org", PASSWORD)
        assert login is not None


# -- the client's deadline itself ----------------------------------------------------------


async def test_the_operation_deadline_raises_unavailable_and_leaves_no_cancel_behind(
    redis_server: RedisServer,
) -> None:
    client = RedisClient(redis_server.url, operation_timeout=0.3)
    try:
        await client.ping()
        redis_server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"did not answer ping within 0\.3 s"):
                await client.ping()
            assert time.monotonic() - started < 0.3 + MARGIN
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 0  # the deadline's cancel request was withdrawn
            await asyncio.sleep(0.01)  # and no stray CancelledError is pending
        finally:
            redis_server.thaw()
        assert await client.ping() >= 0
    finally:
        await asyncio.wait_for(client.aclose(), CAP)


async def test_a_callers_own_cancel_or_timeout_is_not_turned_into_unavailable(
    redis_server: RedisServer,
) -> None:
    client = RedisClient(redis_server.url, operation_timeout=5)
    try:
        await client.ping()
        redis_server.freeze()
        try:
            # The caller's timeout, shorter than the client's deadline, stays a TimeoutError.
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await client.ping()
            assert time.monotonic() - started < 0.2 + MARGIN
            # A cancelled task stays cancelled.
            task = asyncio.create_task(client.ping())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            redis_server.thaw()
        assert await client.ping() >= 0
    finally:
        await asyncio.wait_for(client.aclose(), CAP)
