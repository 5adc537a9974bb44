"""Thread calls on Citus find the message's room in Redis, not on every shard (issue 17).

The facade remembers each sent message's room (``MessageRoomCache``); a thread call
checks the remembered room with one single-shard statement under row security
(``ROOT_OF_IN_ROOM``) and reads every shard (``ROOT_OF``) only without an entry, or when
the check finds nothing. An entry grants nothing: a stale or forged one gives the
database's answer (the page, or NotFound), never another room's rows.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from chatkeep import ChatKeep, NotFound
from chatkeep.ids import uuid7
from chatkeep.storage.threads import ROOT_OF, ROOT_OF_IN_ROOM
from chatkeep.testing import url_as
from tests.citus.test_citus_threads import World, _plan, chat, world

__all__ = ["chat", "world"]  # the fixtures, shared with test_citus_threads

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
def looked_up(chat: ChatKeep, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the root look-ups the thread calls make, in order."""
    names: list[str] = []
    fetchrow = chat.db.fetchrow

    async def recording(name: str, query: str, *args: Any) -> Any:
        if name.startswith("threads.root"):
            names.append(name)
        return await fetchrow(name, query, *args)

    monkeypatch.setattr(chat.db, "fetchrow", recording)
    # The cache gives Redis redis_best_effort_timeout (0.5 s) and then answers "unknown":
    # on a loaded CI machine that once turned a hint into the every-shard look-up. These
    # tests count look-ups, so they give Redis time; the fallback has its own test.
    monkeypatch.setattr(chat.message_rooms, "_timeout", 10.0)
    return names


async def test_the_facade_hints_threads_on_citus_only(chat: ChatKeep) -> None:
    assert chat.db.settings.citus
    assert chat.threads.hints is chat.message_rooms


async def test_a_sent_message_pages_its_thread_from_one_shard(
    chat: ChatKeep, world: World, looked_up: list[str]
) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "remembered")
    reply = await chat.send_message(w.general.id, w.bob, "also", reply_to=root.id)
    # The send remembered both rooms.
    assert await chat.message_rooms.room_of(root.id) == w.general.id
    assert await chat.message_rooms.room_of(reply.id) == w.general.id
    page = await chat.thread(root.id, w.bob)
    assert [m.id for m in page.items] == [reply.id]
    summary = await chat.thread_summary(reply.id, w.dave)
    assert summary is not None
    assert summary.root_id == root.id
    assert await chat.mark_thread_read(root.id, w.dave) == reply.seq
    await chat.follow_thread(root.id, w.dave)
    await chat.unfollow_thread(root.id, w.dave)
    # Never every shard.
    assert looked_up == ["threads.root_in_room"] * 5, chat.message_rooms.stats


async def test_a_cold_entry_is_filled_by_the_first_look_up(
    chat: ChatKeep, world: World, looked_up: list[str]
) -> None:
    w = world
    root = await chat.send_message(w.other.id, w.alice, "forgotten")
    reply = await chat.send_message(w.other.id, w.bob, "reply", reply_to=root.id)
    await chat.redis.redis.delete(chat.message_rooms.key(root.id), chat.message_rooms.key(reply.id))
    # A reply's id: the look-up remembers the reply and its root.
    summary = await chat.thread_summary(reply.id, w.bob)
    assert summary is not None
    assert summary.reply_count == 1
    assert await chat.message_rooms.room_of(root.id) == w.other.id
    assert await chat.message_rooms.room_of(reply.id) == w.other.id
    assert [m.id for m in (await chat.thread(root.id, w.alice)).items] == [reply.id]
    assert looked_up == ["threads.root_of", "threads.root_in_room"]


async def test_a_stale_or_forged_entry_never_leaks(
    chat: ChatKeep, world: World, looked_up: list[str]
) -> None:
    w = world
    cache = chat.message_rooms
    root = await chat.send_message(w.general.id, w.alice, "public root")
    reply = await chat.send_message(w.general.id, w.dave, "public reply", reply_to=root.id)
    hidden = await chat.send_message(w.secret.id, w.carol, "private root")
    await chat.send_message(w.secret.id, w.carol, "private reply", reply_to=hidden.id)

    # The right room of a message bob cannot see: the check under row security finds
    # nothing, every shard finds nothing: NotFound, as without the cache.
    assert await cache.room_of(hidden.id) == w.secret.id
    for call in (
        chat.thread(hidden.id, w.bob),
        chat.thread_summary(hidden.id, w.bob),
        chat.mark_thread_read(hidden.id, w.bob),
        chat.follow_thread(hidden.id, w.bob),
    ):
        with pytest.raises(NotFound) as caught:
            await call
        assert str(caught.value) == "message not found"
    assert looked_up == ["threads.root_in_room", "threads.root_of"] * 4
    looked_up.clear()

    # The secret message said to be in bob's own room: no such message there, and none
    # he can see anywhere: NotFound (and carol's replies stay hers).
    await cache.remember(w.general.id, hidden.id)
    with pytest.raises(NotFound):
        await chat.thread(hidden.id, w.bob)
    # A public message said to be in the secret room, or in another room of bob's, or
    # in a room that does not exist: the database's answer, the thread's own page.
    for forged in (w.secret.id, w.other.id, uuid.uuid4()):
        await cache.remember(forged, root.id)
        page = await chat.thread(root.id, w.bob)
        assert [m.id for m in page.items] == [reply.id]
        # ... and the look-up put the true room back.
        assert await cache.room_of(root.id) == w.general.id
    # An id that never was, "remembered" in bob's room.
    ghost = uuid7()
    await cache.remember(w.general.id, ghost)
    with pytest.raises(NotFound):
        await chat.thread_summary(ghost, w.bob)
    # An unreadable entry is no entry.
    await chat.redis.redis.set(cache.key(root.id), "garbage")
    assert [m.id for m in (await chat.thread(root.id, w.bob)).items] == [reply.id]
    # A deleted root: its entry stays (a message never changes room), the check does not
    # find it, and neither does every shard.
    assert await chat.delete_message(reply.id, w.dave)
    assert await chat.delete_message(root.id, w.alice)
    assert await cache.room_of(root.id) == w.general.id
    with pytest.raises(NotFound):
        await chat.thread(root.id, w.bob)


async def test_redis_down_pages_threads_from_every_shard(
    chat: ChatKeep, world: World, looked_up: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "outage")
    reply = await chat.send_message(w.general.id, w.bob, "still", reply_to=root.id)
    cache = chat.message_rooms

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(chat.redis.redis, "get", down)
    assert [m.id for m in (await chat.thread(root.id, w.bob)).items] == [reply.id]
    assert looked_up == ["threads.root_of"]
    assert cache.stats.errors >= 1


async def test_the_hinted_look_up_is_a_single_shard_router_query(
    chat: ChatKeep, world: World, citus_database: str
) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "plan me")
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        hinted = await _plan(conn, w.bob, ROOT_OF_IN_ROOM, w.general.id, root.id)
        scan = await _plan(conn, w.bob, ROOT_OF, root.id)
        shards = await conn.fetchval(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'messages'::regclass"
        )
    finally:
        await conn.close()
    counts = [line.strip() for line in hinted.splitlines() if "Task Count" in line]
    assert counts == ["Task Count: 1"], hinted
    # What it replaces: the look-up by id alone reads every shard.
    assert f"Task Count: {shards}" in scan, scan
