"""The send path: one round trip per send, and group commit, against real PostgreSQL and Redis.

Every facade here connects as ``chatapp_app``, so row security judges each batched row.
Batches are made deterministic by holding a room's row lock from another connection: the
batch in flight waits on it, and the sends that arrive meanwhile gather into the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    Message,
    NotFound,
    PermissionDenied,
    RateLimited,
    Settings,
    Unavailable,
)
from chatkeep.groupcommit import PendingSend, SendBatcher
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto
from chatkeep.realtime import MessageCreated, RateLimit, RedisClient
from chatkeep.storage import Database
from tests.security.conftest import HASH

GENEROUS = RateLimit(limit=100_000, period=1.0)
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Place:
    """Users and rooms made by the superuser: ``rooms[i]`` are public, every user a member."""

    users: list[uuid.UUID]
    rooms: list[uuid.UUID]
    private: uuid.UUID  # users[0]'s alone
    archived: uuid.UUID  # every user a member
    outsider: uuid.UUID  # in no room


async def make_place(conn: asyncpg.Connection, users: int, rooms: int) -> Place:
    ids = [uuid7() for _ in range(users + 1)]
    await conn.executemany(
        "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)",
        [(u, f"user{i}@example.org", f"user{i}", HASH) for i, u in enumerate(ids)],
    )
    members, outsider = ids[:-1], ids[-1]
    room_ids = [uuid7() for _ in range(rooms + 2)]
    kinds = ["public"] * rooms + ["private", "public"]
    await conn.executemany(
        "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, $2, $3, $4)",
        [(r, f"r{i}", kinds[i], members[0]) for i, r in enumerate(room_ids)],
    )
    private, archived = room_ids[rooms], room_ids[rooms + 1]
    pairs = [(r, u) for r in [*room_ids[:rooms], archived] for u in members]
    pairs.append((private, members[0]))
    await conn.executemany(
        "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'member')", pairs
    )
    await conn.execute("UPDATE rooms SET is_active = false WHERE id = $1", archived)
    return Place(members, room_ids[:rooms], private, archived, outsider)


@contextlib.asynccontextmanager
async def open_chat(
    settings: Settings, *, init: Any = None, send_limit: RateLimit = GENEROUS
) -> AsyncIterator[ChatKeep]:
    """A facade as chatapp_app on its own pool (``init`` runs on each new connection)."""
    async with (
        Database(settings, init=init) as db,
        RedisClient.from_settings(settings) as redis,
    ):
        chat = ChatKeep(db, redis, node_id="gc", send_limit=send_limit, bcrypt_rounds=10)
        try:
            yield chat
        finally:
            await chat.close()


@pytest.fixture
def app_settings(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return make_settings(database_url=app_url, **overrides)

    return factory


@contextlib.asynccontextmanager
async def room_locked(conn: asyncpg.Connection, room: uuid.UUID) -> AsyncIterator[None]:
    """Hold ``room``'s row lock (the one every send to it takes) until the block ends."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM rooms WHERE id = $1 FOR NO KEY UPDATE", room)
        yield


async def waiting_sends(conn: asyncpg.Connection, count: int) -> list[int]:
    """Wait until ``count`` send statements wait on a lock; their server pids."""
    for _ in range(500):
        # The lock holder's transaction would otherwise read one cached snapshot of it.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        pids = [
            r["pid"]
            for r in await conn.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE query LIKE '%chatkeep_send_messages%' AND wait_event_type = 'Lock'"
                "   AND pid <> pg_backend_pid()"
            )
        ]
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.01)
    raise AssertionError("the send statements never waited on the room lock")


async def until(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


def batcher(chat: ChatKeep) -> SendBatcher:
    assert chat.send_batcher is not None
    return chat.send_batcher


async def seqs(conn: asyncpg.Connection, room: uuid.UUID) -> list[int]:
    found: list[int] = await conn.fetchval(
        "SELECT coalesce(array_agg(seq ORDER BY seq), '{}') FROM messages WHERE room_id = $1",
        room,
    )
    return found


# -- one round trip ---------------------------------------------------------------------------


async def test_a_send_is_one_statement_and_no_transaction(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 2, 1)
    sent: list[str] = []

    async def init(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda record: sent.append(record.query))

    for group_commit in (True, False):
        settings = app_settings(send_group_commit=group_commit)
        async with open_chat(settings, init=init) as chat:
            room, user = place.rooms[0], place.users[0]
            await chat.send_message(room, user, "warm-up")  # prepares the statement
            sent.clear()
            message = await chat.send_message(room, user, "hello", client_msg_id="rt-1")
            # Exactly one query reached PostgreSQL: no BEGIN, no set_config, no COMMIT.
            assert len(sent) == 1, sent
            assert "chatkeep_send_messages" in sent[0]
            sent.clear()
            again = await chat.send_message(room, user, "hello", client_msg_id="rt-1")
            assert again == message
            assert len(sent) == 1, sent
            # Refusals are answered by that same statement too.
            sent.clear()
            with pytest.raises(PermissionDenied):
                await chat.send_message(room, place.outsider, "let me in")
            assert len(sent) == 1, sent
    # Two warm-ups and one "hello" (its retry in the second facade returns the first).
    assert await seqs(conn, place.rooms[0]) == [1, 2, 3]


# -- group commit ------------------------------------------------------------------------------


async def test_200_concurrent_sends_over_10_rooms_keep_every_seq_gapless(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 20, 10)
    async with open_chat(app_settings()) as chat:
        sub = await chat.subscribe(*place.rooms)

        async def sender(i: int) -> list[Message]:
            user = place.users[i]
            # Each sender writes to every room in turn, waiting for each answer.
            return [
                await chat.send_message(place.rooms[(i + k) % 10], user, f"{i}-{k}")
                for k in range(10)
            ]

        events: list[object] = []

        async def receive() -> None:
            # Read while the sends run, so the subscription's queue never overflows.
            while len(events) < 200:
                item = await sub.get()
                events.append(item)
                if not isinstance(item, MessageCreated):
                    return  # a gap: what follows is not checked here

        receiver = asyncio.create_task(receive())
        answers = await asyncio.gather(*(sender(i) for i in range(20)))
        gathered = batcher(chat)
        assert gathered.sends == 200
        assert gathered.batches < 200  # sends were gathered
        async with asyncio.timeout(60):
            await receiver
        await sub.aclose()
    acknowledged = [m for sent in answers for m in sent]
    stored = {
        r["id"]: (r["room_id"], r["seq"], r["content"])
        for r in await conn.fetch("SELECT id, room_id, seq, content FROM messages")
    }
    # Every acknowledged message is committed, exactly as answered.
    assert {m.id: (m.room_id, m.seq, m.content) for m in acknowledged} == stored
    for room in place.rooms:
        assert await seqs(conn, room) == list(range(1, 21))
        assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room) == 20
    # Each sender's messages follow their send order in time (each waited for the last).
    for sent in answers:
        created = [m.created_at for m in sent]
        assert created == sorted(created)
    # Every message was published once, with its seq and change-log position (up to a
    # gap, which tells subscribers to catch up instead).
    published = [e for e in events if isinstance(e, MessageCreated)]
    assert all(e.position for e in published)
    ids = [e.message_id for e in published]
    assert len(ids) == len(set(ids))
    assert set(ids) <= {m.id for m in acknowledged}
    if len(published) == len(events):
        assert sorted(ids) == sorted(m.id for m in acknowledged)


async def test_a_batch_keeps_its_order_and_answers_each_caller_with_its_own_error(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 3, 2)
    room, alice, bob = place.rooms[0], place.users[0], place.users[1]
    async with open_chat(app_settings(send_batches_in_flight=1, send_batch_window=5.0)) as chat:
        gathered = batcher(chat)
        async with room_locked(conn, room):
            first = asyncio.create_task(chat.send_message(room, alice, "first"))
            await waiting_sends(conn, 1)
            # Everything below arrives while the first batch waits: one batch.
            tasks = [
                chat.send_message(room, alice, "a", client_msg_id="same"),
                chat.send_message(room, place.outsider, "not a member"),
                chat.send_message(place.archived, bob, "archived"),
                chat.send_message(uuid.uuid4(), bob, "no such room"),
                chat.send_message(place.private, bob, "someone else's private room"),
                chat.send_message(room, bob, "b"),
                chat.send_message(place.rooms[1], bob, "elsewhere"),
                chat.send_message(room, alice, "a again", client_msg_id="same"),
                *(chat.send_message(room, alice, f"in order {k}") for k in range(20)),
            ]
            pending = [asyncio.create_task(t) for t in tasks]
            await until(lambda: len(gathered._queue) == len(pending))
        done = await asyncio.gather(first, *pending, return_exceptions=True)
        assert gathered.batches == 2
    head, a, outsider, archived, nowhere, hidden, b, elsewhere, retry, *ordered = done
    assert isinstance(head, Message)
    assert head.seq == 1
    assert isinstance(a, Message)
    assert isinstance(b, Message)
    assert isinstance(elsewhere, Message)
    assert isinstance(outsider, PermissionDenied)
    assert "members" in str(outsider)
    assert isinstance(archived, PermissionDenied)
    assert "archived" in str(archived)
    # An unknown room and a private room the sender is not in answer alike.
    assert isinstance(nowhere, NotFound)
    assert isinstance(hidden, NotFound)
    assert str(nowhere) == str(hidden) == "room not found"
    assert retry == a  # the retry inside the batch returns the first message
    assert [m.seq for m in ordered if isinstance(m, Message)] == list(range(4, 24))
    assert (a.seq, b.seq, elsewhere.seq) == (2, 3, 1)
    assert await seqs(conn, room) == list(range(1, 24))
    assert await seqs(conn, place.archived) == []
    # A retry in a later batch also returns the first message.
    async with open_chat(app_settings()) as chat:
        assert await chat.send_message(room, alice, "a", client_msg_id="same") == a


async def test_the_rate_limits_of_a_batch_are_each_senders_own(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 2, 1)
    room, alice, bob = place.rooms[0], place.users[0], place.users[1]
    limit = RateLimit(limit=2, period=60.0)
    settings = app_settings(send_batches_in_flight=1, send_batch_window=5.0)
    async with open_chat(settings, send_limit=limit) as chat:
        async with room_locked(conn, room):
            first = asyncio.create_task(chat.send_message(room, bob, "first"))
            await waiting_sends(conn, 1)
            pending = [
                asyncio.create_task(chat.send_message(room, alice, f"a{k}")) for k in range(3)
            ]
            pending.append(asyncio.create_task(chat.send_message(room, bob, "second")))
            await until(lambda: len(batcher(chat)._queue) == 4)
        done = await asyncio.gather(first, *pending, return_exceptions=True)
    assert [type(d).__name__ for d in done] == [
        "Message",
        "Message",
        "Message",
        "RateLimited",
        "Message",
    ]
    limited = done[3]
    assert isinstance(limited, RateLimited)
    assert limited.retry_after > 0
    assert len(await seqs(conn, room)) == 4  # refused before PostgreSQL


async def test_a_lone_send_waits_for_no_timer(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 1, 1)
    async with open_chat(app_settings(send_batch_window=5.0)) as chat:
        gathered = batcher(chat)
        task = asyncio.create_task(chat.send_message(place.rooms[0], place.users[0], "alone"))
        await until(lambda: bool(gathered._running))
        # Its batch left at once: nothing waits and no window timer is armed.
        assert not gathered._queue
        assert gathered._timer is None
        message = await task
    assert message.seq == 1


async def test_the_window_sends_a_batch_while_every_writer_is_busy(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 1, 2)
    locked, free, user = place.rooms[0], place.rooms[1], place.users[0]
    settings = app_settings(send_batches_in_flight=1, send_batch_window=0.05)
    async with open_chat(settings) as chat:
        async with room_locked(conn, locked):
            stuck = asyncio.create_task(chat.send_message(locked, user, "stuck"))
            await waiting_sends(conn, 1)
            # The only writer is busy, yet this send leaves once it waited the window.
            message = await chat.send_message(free, user, "not stuck")
            assert message.seq == 1
            assert not stuck.done()
        assert (await stuck).seq == 1


async def test_cancelled_callers_lose_or_duplicate_no_one_elses_message(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 1, 1)
    room, user = place.rooms[0], place.users[0]
    async with open_chat(app_settings(send_batches_in_flight=1, send_batch_window=5.0)) as chat:
        gathered = batcher(chat)
        async with room_locked(conn, room):
            in_flight = asyncio.create_task(chat.send_message(room, user, "in flight"))
            await waiting_sends(conn, 1)
            waiting = [
                asyncio.create_task(chat.send_message(room, user, f"waiting {k}")) for k in range(3)
            ]
            await until(lambda: len(gathered._queue) == 3)
            in_flight.cancel()  # its batch is already written: it goes on
            waiting[1].cancel()  # still waiting: it never leaves
            await asyncio.gather(in_flight, waiting[1], return_exceptions=True)
        first, third = await waiting[0], await waiting[2]
        assert in_flight.cancelled()
        assert waiting[1].cancelled()
        assert gathered.sends == 3
    stored = await conn.fetch("SELECT content, seq FROM messages ORDER BY seq")
    assert [(r["content"], r["seq"]) for r in stored] == [
        ("in flight", 1),
        ("waiting 0", 2),
        ("waiting 2", 3),
    ]
    assert (first.seq, third.seq) == (2, 3)


async def test_a_connection_killed_mid_batch_fails_every_caller_and_loses_nothing_acknowledged(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 2, 1)
    room, alice, bob = place.rooms[0], place.users[0], place.users[1]
    async with open_chat(app_settings(send_batches_in_flight=1, send_batch_window=5.0)) as chat:
        gathered = batcher(chat)
        before = await chat.send_message(room, alice, "acknowledged before")
        async with room_locked(conn, room):
            head = asyncio.create_task(chat.send_message(room, alice, "head"))
            (pid,) = await waiting_sends(conn, 1)
            batch = [
                asyncio.create_task(chat.send_message(room, who, f"batched {k}"))
                for k, who in enumerate([alice, bob, alice, bob])
            ]
            await until(lambda: len(gathered._queue) == 4)
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(Unavailable):
                await head
            # The gathered batch leaves next and waits on the lock in its turn: kill it too.
            await until(lambda: gathered.batches == 3)
            (pid,) = await waiting_sends(conn, 1)
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
            failed = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(f, Unavailable) for f in failed), failed
        after = await chat.send_message(room, bob, "acknowledged after")
    stored = await conn.fetch("SELECT id, content FROM messages ORDER BY seq")
    assert [(r["id"], r["content"]) for r in stored] == [
        (before.id, "acknowledged before"),
        (after.id, "acknowledged after"),
    ]
    assert await seqs(conn, room) == [1, 2]  # the killed statements took no seq


async def test_close_answers_every_accepted_send_then_refuses(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 1, 1)
    room, user = place.rooms[0], place.users[0]
    async with open_chat(app_settings(send_batches_in_flight=1, send_batch_window=5.0)) as chat:
        async with room_locked(conn, room):
            head = asyncio.create_task(chat.send_message(room, user, "head"))
            await waiting_sends(conn, 1)
            queued = [asyncio.create_task(chat.send_message(room, user, f"q{k}")) for k in range(2)]
            await until(lambda: len(batcher(chat)._queue) == 2)
            closing = asyncio.create_task(chat.close())
            await asyncio.sleep(0.05)
            assert not closing.done()  # it waits for the batches
        await closing
        assert all(t.done() for t in (head, *queued))
        assert [(await t).seq for t in (head, *queued)] == [1, 2, 3]
        with pytest.raises(Unavailable, match="closing"):
            await chat.send_message(room, user, "too late")
        await chat.close()  # twice is fine
    assert await seqs(conn, room) == [1, 2, 3]


async def test_group_commit_off_sends_each_alone(
    app_settings: Callable[..., Settings], conn: asyncpg.Connection
) -> None:
    place = await make_place(conn, 4, 2)
    async with open_chat(app_settings(send_group_commit=False)) as chat:
        assert chat.send_batcher is None
        sent = await asyncio.gather(
            *(chat.send_message(place.rooms[i % 2], u, "x") for i, u in enumerate(place.users))
        )
        with pytest.raises(NotFound, match="room not found"):
            await chat.send_message(place.private, place.users[1], "hidden")
    assert sorted(m.seq for m in sent) == [1, 1, 2, 2]


def test_batcher_options_are_checked() -> None:
    async def write(batch: object) -> None:
        del batch

    for bad in ({"size": 0}, {"size": True}, {"window": -1}, {"window": "1"}, {"in_flight": 0}):
        with pytest.raises(ChatkeepError):
            SendBatcher(write, **bad)
    with pytest.raises(ChatkeepError):
        Settings(send_batch_size=0)


def test_the_benchmark_runs_in_its_tiny_mode(admin_url: str, redis_url: str) -> None:
    name = f"chatkeep_bench_send_t{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_send.py"),
            "--tiny",
            "--drop",
            "--database-url",
            admin_url,
            "--redis-url",
            redis_url,
            "--database-name",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in ("raw ", "3 round trips", "facade, group commit off", "facade, group commit on"):
        assert sum(1 for line in lines if line.startswith(name)) == 2, done.stdout
    assert "sends in" in done.stdout
    for line in ("ceiling: batched INSERT", "ceiling: send function"):
        assert sum(1 for found in lines if found.startswith(line)) == 2, done.stdout
    assert "facade ÷ raw latency" in done.stdout
    assert sum(1 for line in lines if line.startswith("batch of ")) == 4, done.stdout


# -- the batcher alone (no stores) -------------------------------------------------------------


def _dto() -> CreateMessageDto:
    return CreateMessageDto(room_id=uuid.uuid4(), user_id=uuid.uuid4(), content="x")


async def test_a_write_that_fails_or_answers_nothing_fails_each_caller_with_an_error() -> None:
    async def broken(batch: Sequence[PendingSend]) -> None:
        raise Unavailable("the store went away")

    failing = SendBatcher(broken)
    results = await asyncio.gather(
        *(failing.submit(_dto()) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) and "went away" in str(r) for r in results)

    async def silent(batch: Sequence[PendingSend]) -> None:
        del batch

    with pytest.raises(Unavailable, match="no answer"):
        await SendBatcher(silent).submit(_dto())

    release = asyncio.Event()

    async def stuck(batch: Sequence[PendingSend]) -> None:
        await release.wait()

    hanging = SendBatcher(stuck, in_flight=1)
    caller = asyncio.create_task(hanging.submit(_dto()))
    await until(lambda: bool(hanging._running))
    for task in list(hanging._running):
        task.cancel()  # the loop shutting down under a batch
    with pytest.raises(Unavailable, match="cancelled"):
        await caller
    await hanging.close()
    assert not hanging._running
