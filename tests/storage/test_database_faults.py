"""``Database`` when its server connection dies: real faults, not mocks.

Each test ends a backend with ``pg_terminate_backend`` (the test's own database only) at
one phase of a call, and checks that the caller sees a ``chatkeep.errors`` type
(``Unavailable``, the driver's error on ``__cause__``), that the dead connection is not
handed out again, and that the pool still works afterwards. Kept apart from
``test_database.py`` because these tests kill connections and take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto
from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, Unavailable
from chatkeep.realtime import RateLimit
from chatkeep.storage import Database

Kill = Callable[[int], Awaitable[None]]

_SLEEPING: str = (
    "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'"
)


@pytest_asyncio.fixture(loop_scope="session")
async def kill(conn: asyncpg.Connection) -> Kill:
    """End one backend of the test's database and wait until it is gone (5 s at most)."""

    async def terminate(pid: int) -> None:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)

    return terminate


@pytest_asyncio.fixture(loop_scope="session")
async def one(database_url: str) -> AsyncIterator[Database]:
    """A pool of one connection: a holder lost by a fault shows as an exhausted pool."""
    settings = Settings(database_url=database_url, connect_timeout=2)
    async with Database(settings, min_size=1, max_size=1) as db:
        yield db


async def kill_while_sleeping(conn: asyncpg.Connection, pid: int) -> None:
    """Wait until ``pid`` runs ``pg_sleep``, then end it: a fault in mid-statement."""
    async with asyncio.timeout(5):
        while not await conn.fetchval(_SLEEPING, pid):  # noqa: ASYNC110 - polls the server
            await asyncio.sleep(0.01)
    await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)


async def still_works(db: Database, dead: int) -> None:
    """The pool hands out a live, new connection and holds no other."""
    pid = await db.fetchval("t.after", "SELECT pg_backend_pid()")
    assert pid != dead
    async with db.transaction("t.after_tx"):
        assert await db.fetchval("t.after_in_tx", "SELECT pg_backend_pid()") == pid
    health = await db.health()
    assert health.busy == 0


async def failure(work: Awaitable[object]) -> Exception:
    """The exception ``work`` raises; the test fails if it raises none."""
    try:
        await work
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


def assert_unavailable(error: BaseException) -> None:
    assert isinstance(error, Unavailable), repr(error)
    assert error.__cause__ is not None
    assert not isinstance(error.__cause__, ChatkeepError)


# -- transactions ---------------------------------------------------------------------------


async def test_killed_before_a_statement_in_a_transaction(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.tx"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            await kill(pids[0])
            await one.fetchval("t.dead", "SELECT 1")

    assert_unavailable(await failure(block()))
    assert one.stats["t.tx"].errors == 1
    await still_works(one, pids[0])


async def test_killed_before_a_statement_acting_as_a_user(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.acting_as(uuid.uuid4(), "t.acting"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            await kill(pids[0])
            await one.fetchval("t.dead", "SELECT 1")

    assert_unavailable(await failure(block()))
    await still_works(one, pids[0])


@pytest.mark.parametrize("exposed", [False, True], ids=["helpers", "own-sql"])
async def test_killed_between_the_last_statement_and_commit(
    one: Database, kill: Kill, exposed: bool
) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.acting_as(uuid.uuid4(), "t.commit") as tx:
            if exposed:  # the connection gets the full reset on release
                pids.append(await tx.connection.fetchval("SELECT pg_backend_pid()"))
            else:
                pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            await kill(pids[0])

    assert_unavailable(await failure(block()))
    await still_works(one, pids[0])


async def test_killed_inside_a_savepoint(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.outer"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            async with one.transaction("t.inner"):
                await kill(pids[0])
                await one.fetchval("t.dead", "SELECT 1")

    assert_unavailable(await failure(block()))
    await still_works(one, pids[0])


async def test_killed_before_a_savepoint_is_released(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.outer"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            async with one.transaction("t.inner"):
                await kill(pids[0])

    assert_unavailable(await failure(block()))
    await still_works(one, pids[0])


async def test_killed_before_a_savepoint_is_opened(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.outer"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            await kill(pids[0])
            async with one.transaction("t.inner"):
                pass  # pragma: no cover - SAVEPOINT fails first

    assert_unavailable(await failure(block()))
    await still_works(one, pids[0])


async def test_killed_during_a_long_statement_in_a_transaction(
    one: Database, conn: asyncpg.Connection
) -> None:
    pids: list[int] = []
    killers: list[asyncio.Task[None]] = []

    async def block() -> None:
        async with one.transaction("t.long"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            killers.append(asyncio.create_task(kill_while_sleeping(conn, pids[0])))
            await one.execute("t.sleep", "SELECT pg_sleep(10)")

    assert_unavailable(await failure(block()))
    await killers[0]
    await still_works(one, pids[0])


async def test_a_block_failing_on_a_dead_connection_keeps_its_own_error(
    one: Database, kill: Kill
) -> None:
    """The ROLLBACK cannot run on a dead connection: the block's error is what is raised."""

    class Mine(Exception):
        pass

    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.mine"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            await kill(pids[0])
            raise Mine

    assert isinstance(await failure(block()), Mine)
    await still_works(one, pids[0])


async def test_a_cancelled_transaction_on_a_dead_connection_gives_it_back(
    one: Database, conn: asyncpg.Connection
) -> None:
    started = asyncio.Event()
    pids: list[int] = []

    async def block() -> None:
        async with one.transaction("t.cancelled"):
            pids.append(await one.fetchval("t.pid", "SELECT pg_backend_pid()"))
            started.set()
            await one.execute("t.sleep", "SELECT pg_sleep(10)")

    task = asyncio.create_task(block())
    await started.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    # The server goes away while the client is cancelling and rolling back.
    await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pids[0])
    with pytest.raises((asyncio.CancelledError, ChatkeepError)):
        await task
    await still_works(one, pids[0])


# -- single statements ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fetch", "fetchrow", "fetchval", "execute", "executemany"])
async def test_killed_during_a_single_statement(
    one: Database, conn: asyncpg.Connection, method: str
) -> None:
    pid = await one.fetchval("t.pid", "SELECT pg_backend_pid()")
    killer = asyncio.create_task(kill_while_sleeping(conn, pid))
    if method == "executemany":
        call = one.executemany("t.sleep", "SELECT pg_sleep($1)", [(10,)])
    else:
        call = getattr(one, method)("t.sleep", "SELECT pg_sleep(10)")
    assert_unavailable(await failure(call))
    await killer
    assert one.stats["t.sleep"].errors == 1
    await still_works(one, pid)


async def test_a_single_statement_on_a_connection_killed_while_idle(
    one: Database, kill: Kill
) -> None:
    pid = await one.fetchval("t.pid", "SELECT pg_backend_pid()")
    await kill(pid)
    await asyncio.sleep(0.05)
    # asyncpg notices the lost connection and opens another; no error reaches the caller.
    try:
        assert await one.fetchval("t.next", "SELECT 1") == 1
    except ChatkeepError as exc:  # the loss was noticed only by this statement
        assert_unavailable(exc)
    await still_works(one, pid)


async def test_killed_during_copy(one: Database, conn: asyncpg.Connection, kill: Kill) -> None:
    await conn.execute("CREATE TABLE copied (x int)")
    pid = await one.fetchval("t.pid", "SELECT pg_backend_pid()")

    async def records() -> AsyncIterator[tuple[int]]:
        yield (1,)
        await kill(pid)
        for x in range(2, 10_000):
            yield (x,)

    assert_unavailable(
        await failure(one.copy_records("t.copy", "copied", records(), columns=("x",)))
    )
    assert await conn.fetchval("SELECT count(*) FROM copied") == 0
    await still_works(one, pid)


async def test_killed_inside_acquire(one: Database, kill: Kill) -> None:
    pids: list[int] = []

    async def block() -> None:
        async with one.acquire() as c:
            pids.append(await c.fetchval("SELECT pg_backend_pid()"))
            await kill(pids[0])
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                # Raw driver use inside the block: its errors are the caller's own.
                await c.fetchval("SELECT 1")
            raise Unavailable("gave up")

    assert isinstance(await failure(block()), Unavailable)
    await still_works(one, pids[0])


# -- the facade under repeated faults -------------------------------------------------------


async def test_concurrent_sends_while_backends_are_terminated(
    make_settings: Callable[..., Settings],
    app_url: str,
    redis_url: str,
    conn: asyncpg.Connection,
) -> None:
    settings = make_settings(database_url=app_url, pool_max_size=10, connect_timeout=3)
    # No rate limit worth the name: the senders go as fast as they can.
    unlimited = RateLimit(limit=1_000_000, period=1.0, burst=1_000_000)
    async with ChatKeep.connect(
        settings, node_id="faults", bcrypt_rounds=10, send_limit=unlimited
    ) as chat:
        owner = await chat.register(
            CreateUserDto(email="o@example.org", username="owner", password="correct horse")
        )
        room = await chat.create_room(
            CreateRoomDto(name="faults", type="private", created_by=owner.id)
        )
        stop = asyncio.Event()
        errors: list[BaseException] = []
        sent = 0

        async def sender(n: int) -> None:
            nonlocal sent
            while not stop.is_set():
                try:
                    await chat.send_message(room.id, owner.id, f"from {n}")
                    sent += 1
                except Exception as exc:  # every kind is checked below
                    errors.append(exc)
                    await asyncio.sleep(0.01)

        async def terminator() -> None:
            while not stop.is_set():
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND usename = 'chatapp_app'"
                )
                await asyncio.sleep(0.15)

        tasks = [asyncio.create_task(sender(n)) for n in range(20)]
        side = asyncio.create_task(terminator())
        await asyncio.sleep(4)
        stop.set()
        await asyncio.gather(*tasks, side)
        raw = [e for e in errors if not isinstance(e, ChatkeepError)]
        assert not raw, f"{len(raw)} raw of {len(errors)}: {sorted({repr(e) for e in raw})}"
        assert errors, "no fault hit a send: the test proves nothing"
        assert sent > 0
        # The pool recovers: every connection can be borrowed and works.
        results = await asyncio.gather(
            *(chat.send_message(room.id, owner.id, f"after {n}") for n in range(10))
        )
        assert len({m.seq for m in results}) == 10
        health = await chat.db.health()
        assert health.busy == 0
