"""Mention notices and replies on the change feed: live events, the log, the relay alike.

A message's ``message.created`` event carries its ``reply_to`` and its mentions
(``mentions``: members only, ``mentions_room``), and every other way to the same change
(``ChatKeep.changes``, the change stream, the outbox relay's read of every room) gives the
same event through :func:`chatkeep.realtime.event_of_change`. Runs as ``chatapp_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import Any

import asyncpg
import pytest

from chatkeep import ChatKeep, CreateRoomDto, InvalidInput, PermissionDenied, Unavailable
from chatkeep.integrations.streams import room_stream
from chatkeep.models import Change
from chatkeep.realtime import (
    Event,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    RoomGap,
    encode_event,
    event_of_change,
)
from chatkeep.storage.changes import ChangeRepository
from chatkeep.storage.threads import COLLAPSED_AFTER, COLLAPSED_AROUND, COLLAPSED_BEFORE
from tests.test_facade import ROUNDS, expect
from tests.test_facade_stream import register, system

__all__ = ["system"]  # a fixture, imported for pytest


def shape(event: Event | None) -> dict[str, Any]:
    """What a receiver reads of an event: everything but its id, time and publisher."""
    assert event is not None
    return event.model_dump(mode="json", exclude={"event_id", "occurred_at", "origin"})


async def room_of(chat: ChatKeep, owner: uuid.UUID, *members: uuid.UUID) -> uuid.UUID:
    room = (await chat.create_room(CreateRoomDto(name="feed", created_by=owner))).id
    for member in members:
        await chat.join(room, member)
    return room


async def log_events(chat: ChatKeep, room: uuid.UUID, user: uuid.UUID, after: int) -> list[Event]:
    page = await chat.changes(room, user, after=after)
    return [e for e in map(event_of_change, page.items) if e is not None]


async def relay_events(chat: ChatKeep, room: uuid.UUID, after: int) -> list[Event]:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    changes = await ChangeRepository(chat.db).relay_changes(since, limit=1000)
    return [
        e
        for c in changes
        if c.room_id == room and c.position > after and (e := event_of_change(c)) is not None
    ]


async def test_live_events_the_log_and_the_relay_read_carry_the_same_message_events(
    system: tuple[ChatKeep, str],
) -> None:
    chat, _ = system
    alice, bob, carol, dave = [
        await register(chat, name) for name in ("alice", "bob", "carol", "dave")
    ]
    room = await room_of(chat, alice, bob, dave)  # carol is no member
    start = await chat.room_position(room, bob)
    sub = await chat.subscribe(room)
    root = await chat.send_message(room, bob, "a question")
    # The owner mentions bob, carol (no member), a name nobody has, and the room.
    await chat.send_message(room, alice, "@bob, @carol and @ghost: see @room.", reply_to=root.id)
    await chat.send_message(room, bob, "@room is only an owner's or an admin's @dave")
    await chat.send_message(room, dave, "nobody named here, mail me at dave@example.org")
    live = [await expect(sub, MessageCreated) for _ in range(4)]
    await sub.aclose()

    assert [(e.mentions, e.mentions_room) for e in live] == [
        ((), False),
        ((bob,), True),
        ((dave,), False),
        ((), False),
    ]
    assert live[1].reply_to == root.id
    assert str(carol) not in encode_event(live[1]).decode()  # a non-member is never named

    from_log = await log_events(chat, room, bob, start)
    from_relay = await relay_events(chat, room, start)
    assert [shape(e) for e in from_log] == [shape(e) for e in live]
    assert [shape(e) for e in from_relay] == [shape(e) for e in live]
    # The log's own data says it too, for clients of changes() and the /changes socket.
    page = await chat.changes(room, dave, after=start)
    assert [c.data["mentions"] for c in page.items] == [(), (bob,), (dave,), ()]
    assert [c.data["mentions_room"] for c in page.items] == [False, True, False, False]
    # The repository's own statement (in a transaction acting as the user) reads the same.
    async with chat.acting_as(dave):
        in_transaction = await ChangeRepository(chat.db).changes(room, after=start)
    assert in_transaction.items == page.items


async def test_an_edit_resolves_the_mentions_again_in_every_change_of_the_message(
    system: tuple[ChatKeep, str],
) -> None:
    chat, _ = system
    alice, bob, dave = [await register(chat, name) for name in ("alice", "bob", "dave")]
    room = await room_of(chat, alice, bob, dave)
    start = await chat.room_position(room, alice)
    sent = await chat.send_message(room, alice, "hi @bob")
    await chat.edit_message(sent.id, alice, "hi @dave, not bob")
    page = await chat.changes(room, bob, after=start)
    # Changes carry the message as it is now: the created change shows the edit too.
    assert [(c.kind, c.data["mentions"]) for c in page.items] == [
        ("message.created", (dave,)),
        ("message.edited", (dave,)),
    ]
    events = [event_of_change(c) for c in page.items]
    assert isinstance(events[0], MessageCreated)
    assert events[0].mentions == (dave,)
    assert isinstance(events[1], MessageEdited)
    assert events[1].editor_id == alice
    await chat.delete_message(sent.id, alice)
    tombstone = (await chat.changes(room, bob, after=start + 2)).items
    assert [type(event_of_change(c)) for c in tombstone] == [MessageDeleted]


async def test_a_change_the_relay_announces_reads_as_the_event_its_writer_would_publish(
    system: tuple[ChatKeep, str],
) -> None:
    """A writer whose publish is lost: the relay's nudge, then the stream's read of the log."""
    chat, relay_url = system
    alice, bob = [await register(chat, name) for name in ("alice", "bob")]
    room = await room_of(chat, alice, bob)
    root = await chat.send_message(room, bob, "root")
    silent = ChatKeep(chat.db, chat.redis, node_id="silent", bcrypt_rounds=ROUNDS)
    unpublished: list[Event] = []

    async def lost(*events: Event) -> None:
        unpublished.extend(events)  # what it would have published, never sent

    silent._publish = lost  # type: ignore[method-assign]
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    try:
        async with chat.stream([room], bob) as stream:
            await silent.send_message(room, alice, "@bob look", reply_to=root.id)
            async with asyncio.timeout(10):
                item = await anext(stream)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert isinstance(item, Change)
    (direct,) = unpublished
    assert isinstance(direct, MessageCreated)
    assert (direct.reply_to, direct.mentions) == (root.id, (bob,))
    assert shape(event_of_change(item)) == shape(direct)


async def test_the_room_stream_reads_a_message_the_relay_announces(
    system: tuple[ChatKeep, str],
) -> None:
    """A message-only client (room_stream) gets a message whose writer's publish was lost."""
    chat, relay_url = system
    alice, bob = [await register(chat, name) for name in ("alice", "bob")]
    room = await room_of(chat, alice, bob)
    await chat.send_message(room, alice, "first")  # the stream's baseline position
    silent = ChatKeep(chat.db, chat.redis, node_id="silent", bcrypt_rounds=ROUNDS)

    async def lost(*events: Event) -> None:
        return None

    silent._publish = lost  # type: ignore[method-assign]
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    try:
        async with contextlib.aclosing(room_stream(chat, room, bob)) as stream:
            async with asyncio.timeout(10):
                first = await anext(stream)
                assert first["message"]["content"] == "first"
                await chat.send_message(room, alice, "second")  # published: the baseline
                assert (await anext(stream))["message"]["content"] == "second"
                sent = await silent.send_message(room, alice, "@bob quiet")
                item = await anext(stream)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert item["kind"] == "message"
    assert item["message"]["id"] == str(sent.id)


async def test_a_message_whose_mentions_cannot_be_read_is_left_to_the_log(
    system: tuple[ChatKeep, str],
) -> None:
    """No live event that says "no mention" wrongly: subscribers see the gap and read the log."""
    chat, _ = system
    alice, bob = [await register(chat, name) for name in ("alice", "bob")]
    room = await room_of(chat, alice, bob)
    sub = await chat.subscribe(room)
    await chat.send_message(room, alice, "hello")
    baseline = await expect(sub, MessageCreated)

    async def unreadable(sent: object) -> None:
        raise Unavailable("the database went away")

    chat.change_log.sent_mentions = unreadable  # type: ignore[method-assign,assignment]
    try:
        quiet = await chat.send_message(room, alice, "@bob are you there?")  # stored, unpublished
        await chat.send_message(room, alice, "plain")  # no '@': published as ever
    finally:
        del chat.change_log.sent_mentions
    gap = await expect(sub, RoomGap)
    await expect(sub, MessageCreated)
    await sub.aclose()
    assert gap.reason == "position"
    assert baseline.position is not None
    assert gap.positions == {room: baseline.position}
    (change, _) = (await chat.changes(room, bob, after=baseline.position)).items
    assert change.message_id == quiet.id
    assert change.data["mentions"] == (bob,)


async def test_the_system_reads_are_refused_to_a_user_and_check_their_input(
    system: tuple[ChatKeep, str],
) -> None:
    chat, _ = system
    alice, bob = [await register(chat, name) for name in ("alice", "bob")]
    room = await room_of(chat, alice, bob)
    sent = await chat.send_message(room, bob, "@alice hi")
    log = ChangeRepository(chat.db)
    assert await log.sent_mentions([(sent.id, bob)]) == {sent.id: ((alice,), False)}
    # Only as its author: anyone else (who knows the id) reads nothing of it.
    assert await log.sent_mentions([(sent.id, alice)]) == {}
    with pytest.raises(PermissionDenied):
        async with chat.acting_as(alice):
            await log.sent_mentions([(sent.id, bob)])
    with pytest.raises(PermissionDenied):
        async with chat.acting_as(alice):
            await log.relay_changes(dt.datetime.now(dt.UTC))
    # An author who left reads nothing of their messages' mentions any more.
    await chat.leave(room, bob)
    assert await log.sent_mentions([(sent.id, bob)]) == {}
    with pytest.raises(InvalidInput) as caught:
        await log.relay_changes(dt.datetime(2026, 1, 1))
    assert caught.value.field == "since"
    with pytest.raises(InvalidInput) as caught:
        await log.relay_changes(dt.datetime.now(dt.UTC), limit=0)
    assert caught.value.field == "limit"
    with pytest.raises(InvalidInput) as caught:
        await log.sent_mentions([("nope", bob)])  # type: ignore[list-item]
    assert caught.value.field == "message_id"
    with pytest.raises(InvalidInput):
        event_of_change("message.created")  # type: ignore[arg-type]


@pytest.mark.parametrize("statement", [COLLAPSED_BEFORE, COLLAPSED_AFTER, COLLAPSED_AROUND])
async def test_the_collapsed_view_can_read_the_roots_index(
    conn: asyncpg.Connection, statement: str
) -> None:
    """Migration 021's partial index matches the collapsed page's condition.

    On a test's small table the planner may take another path, so the other way in, the
    (room_id, seq) key, is dropped for the plan (in a transaction rolled back): what this
    checks is that the roots index serves the query, with no filter left to apply.
    """
    args: list[Any] = [uuid.uuid4(), 10, 20]
    if statement is COLLAPSED_AROUND:
        args.append(20)
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        await conn.execute("ALTER TABLE messages DROP CONSTRAINT messages_room_seq_key")
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {statement}", *args))
    finally:
        await tx.rollback()
    assert "Index Scan" in plan, plan
    assert "using messages_room_roots_idx on messages" in plan, plan
    assert "reply_to IS NULL" not in plan, plan  # the predicate is the index's, not a filter
