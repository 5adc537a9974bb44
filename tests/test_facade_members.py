"""Member checks through the facade that do not grow with the room (issue 12, item 3).

A room of 5,000 members, seeded with COPY, read as ``chatapp_app``: a cold herd of history
calls loads the member list from PostgreSQL once, and later checks are answered by the
cached set without a load. The benchmark's tiny mode runs here too, so it keeps working.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, ConfigurationError, NotFound, Settings
from chatkeep.ids import uuid7

ROOT = Path(__file__).resolve().parent.parent
BIG = 5_000


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as ``chatapp_app``, so row security binds every flow.

    The fill lease is raised from its 5 s default: on a machine shared with other test
    runs the 5,000-member load has taken longer than 5 s, and a load that outlives its
    lease (rightly) does not store its set, which is what the herd test checks it does.
    """
    settings = make_settings(database_url=app_url, member_cache_lease_ttl=120.0)
    async with ChatKeep.connect(settings, node_id="node-a", bcrypt_rounds=10) as facade:
        yield facade


async def big_room(conn: asyncpg.Connection, members: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A private room of ``members`` users (the first is its owner) with three messages."""
    users = [uuid7() for _ in range(members + 1)]  # the last one is not a member
    hashed = "$2b$04$" + "x" * 53  # never checked: no one logs in here
    await conn.copy_records_to_table(
        "users",
        records=[(u, f"user{i}@example.org", f"user{i}", hashed) for i, u in enumerate(users)],
        columns=["id", "email", "username", "password_hash"],
    )
    room = uuid7()
    await conn.copy_records_to_table(
        "rooms",
        records=[(room, "big", "private", users[0])],
        columns=["id", "name", "type", "created_by"],
    )
    await conn.copy_records_to_table(
        "room_users",
        records=[(room, u, "owner" if i == 0 else "member") for i, u in enumerate(users[:-1])],
        columns=["room_id", "user_id", "role"],
    )
    await conn.execute(
        """
        INSERT INTO messages (room_id, user_id, seq, content)
        SELECT $1, $2, g, 'message ' || g FROM generate_series(1, 3) AS g
        """,
        room,
        users[0],
    )
    await conn.execute("UPDATE rooms SET last_seq = 3 WHERE id = $1", room)
    return room, users


def member_loads(chat: ChatKeep) -> int:
    stats = chat.db.stats.get("rooms.members")
    return 0 if stats is None else stats.calls


async def test_a_cold_herd_on_a_big_room_loads_its_members_once(
    chat: ChatKeep, conn: asyncpg.Connection
) -> None:
    room, users = await big_room(conn, BIG)
    members, outsider = users[:-1], users[-1]
    assert await chat.members.invalidate(room)
    before = member_loads(chat)
    # Pages with rows prove membership themselves (migration 017): no load, no cache fill.
    pages = await asyncio.gather(*(chat.history(room, user, limit=50) for user in members[:50]))
    assert [len(page.items) for page in pages] == [3] * 50
    assert member_loads(chat) == before
    assert not await chat.redis.redis.exists(chat.members.key(room))
    # Empty pages ask the cache: the cold herd loads the list once.
    empty = await asyncio.gather(*(chat.catch_up(room, user, after_seq=3) for user in members[:50]))
    assert [page.items for page in empty] == [()] * 50
    assert member_loads(chat) - before == 1
    key = chat.members.key(room)
    assert await chat.redis.redis.type(key) == b"set"
    assert await chat.redis.redis.scard(key) == BIG
    # Warm: other members are answered by the set, with no load at all.
    await asyncio.gather(*(chat.catch_up(room, user, after_seq=0) for user in members[-50:]))
    await chat.set_typing(room, members[2500])
    assert member_loads(chat) - before == 1
    # An outsider is still read as themselves: a private room they cannot see is not found.
    with pytest.raises(NotFound, match="room not found"):
        await chat.history(room, outsider)


async def test_an_outsider_in_a_cold_herd_is_not_told_the_list(
    chat: ChatKeep, conn: asyncpg.Connection
) -> None:
    room, users = await big_room(conn, 200)
    members, outsider = users[:-1], users[-1]
    assert await chat.members.invalidate(room)
    # Empty catch-ups: the reads that ask the member cache (a page with rows does not).
    calls = [chat.catch_up(room, user, after_seq=3) for user in members[:20]]
    calls.insert(10, chat.catch_up(room, outsider, after_seq=3))
    results = await asyncio.gather(*calls, return_exceptions=True)
    hidden = results.pop(10)
    assert isinstance(hidden, NotFound)
    assert str(hidden) == "room not found"
    assert all(not isinstance(result, BaseException) for result in results)


def test_the_benchmark_runs_in_its_tiny_mode(admin_url: str, redis_url: str) -> None:
    name = f"chatkeep_bench_members_t{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_members.py"),
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
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio big/small" in done.stdout
    assert "10 concurrent first calls -> 1 member-list load(s)" in done.stdout


async def test_the_fill_lease_is_the_settings_one(chat: ChatKeep, conn: asyncpg.Connection) -> None:
    # The lease a miss takes is the one Settings.member_cache_lease_ttl names (120 s here):
    # hold a load open and read the lease's TTL in Redis.
    room, users = await big_room(conn, 3)
    assert await chat.members.invalidate(room)
    release = asyncio.Event()
    loading = asyncio.Event()
    load = chat.members._loader

    async def slow(room_id: uuid.UUID, asking: uuid.UUID | None) -> Any:
        loading.set()
        await release.wait()
        return await load(room_id, asking)

    chat.members._loader = slow
    try:
        # A page with rows proves membership without the cache (migration 017); an empty
        # catch-up (nothing after seq 3) is the read that still asks it.
        call = asyncio.create_task(chat.catch_up(room, users[0], after_seq=3))
        await asyncio.wait_for(loading.wait(), 30)  # fails, not hangs, if nothing loads
        ttl = await chat.redis.redis.pttl(chat.members.key(room))
        assert 110_000 < ttl <= 120_000
        release.set()
        assert len((await call).items) == 0
    finally:
        chat.members._loader = load
    assert await chat.redis.redis.type(chat.members.key(room)) == b"set"


def test_the_fill_lease_setting_is_bounded() -> None:
    assert Settings(member_cache_lease_ttl=30).member_cache_lease_ttl == 30.0
    for bad in (0, -1, 601):
        with pytest.raises(ConfigurationError, match="member_cache_lease_ttl"):
            Settings(member_cache_lease_ttl=bad)
