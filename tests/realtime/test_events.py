from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from redis.backoff import ConstantBackoff

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import (
    WIRE_VERSION,
    Event,
    EventBus,
    EventSubscription,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    MessagesRead,
    PresenceChanged,
    ReactionAdded,
    ReactionRemoved,
    RedisClient,
    RoomGap,
    RoomUpdated,
    TypingChanged,
    decode_event,
    encode_event,
)
from chatkeep.realtime.events import PUBLISHED_MARK_TTL_MS
from tests.realtime.conftest import ClientFactory, wait_until
from tests.servers import RedisServer

ROOM = uuid4()
USER = uuid4()


def every_kind() -> list[Event]:
    message = uuid4()
    return [
        MessageCreated(
            room_id=ROOM,
            message_id=message,
            seq=1,
            sender_id=USER,
            client_msg_id="c1",
            body="hi",
        ),
        MessageEdited(room_id=ROOM, message_id=message, seq=1, editor_id=USER, body="hello"),
        MessageDeleted(room_id=ROOM, message_id=message, seq=1, deleted_by=USER),
        MessagesRead(room_id=ROOM, user_id=USER, last_read_seq=1),
        TypingChanged(room_id=ROOM, user_id=USER, typing=True),
        PresenceChanged(room_id=ROOM, user_id=USER, status="offline", last_seen=datetime.now(UTC)),
        MemberJoined(room_id=ROOM, user_id=USER, role="member", position=3),
        MemberLeft(room_id=ROOM, user_id=USER),
        MemberRoleChanged(room_id=ROOM, user_id=USER, role="admin", position=4),
        ReactionAdded(
            room_id=ROOM, message_id=message, seq=1, user_id=USER, emoji="👍", count=1, position=5
        ),
        ReactionRemoved(
            room_id=ROOM, message_id=message, seq=1, user_id=USER, emoji="👍", count=0, position=6
        ),
        RoomUpdated(room_id=ROOM, name="general", description=None, is_active=False, position=7),
    ]


@pytest.mark.parametrize("event", every_kind(), ids=lambda e: e.type)
def test_every_event_round_trips_with_a_version(event: Event) -> None:
    wire = encode_event(event)
    raw = json.loads(wire)
    assert raw["v"] == WIRE_VERSION == 1
    assert raw["type"] == event.type
    assert decode_event(wire) == event


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = json.loads(encode_event(every_kind()[0]))
    raw["added_in_a_later_minor_release"] = [1, 2]
    decoded = decode_event(json.dumps(raw))
    assert isinstance(decoded, MessageCreated)


def test_message_created_says_client_msg_id_on_the_wire() -> None:
    event = MessageCreated(
        room_id=ROOM, message_id=uuid4(), seq=3, sender_id=USER, client_msg_id="c-9"
    )
    raw = json.loads(encode_event(event))
    # The same name as Message.client_msg_id and send_message(client_msg_id=...).
    assert raw["client_msg_id"] == "c-9"
    assert "client_message_id" not in raw
    decoded = decode_event(json.dumps(raw))
    assert isinstance(decoded, MessageCreated)
    assert decoded.client_msg_id == "c-9"


def test_message_created_from_an_older_node_is_read_with_its_client_message_id() -> None:
    # A node not yet upgraded in a rolling deploy still writes the old key.
    sent = every_kind()[0]
    raw = json.loads(encode_event(sent))
    raw["client_message_id"] = raw.pop("client_msg_id")
    decoded = decode_event(json.dumps(raw))
    assert isinstance(decoded, MessageCreated)
    assert decoded.client_msg_id == "c1"
    assert decoded == sent
    # Passed on, it goes out under the new key only.
    again = json.loads(encode_event(decoded))
    assert again["client_msg_id"] == "c1"
    assert "client_message_id" not in again


def test_the_new_key_wins_when_a_payload_has_both() -> None:
    raw = json.loads(encode_event(every_kind()[0]))
    raw["client_message_id"] = "old"
    decoded = decode_event(json.dumps(raw))
    assert isinstance(decoded, MessageCreated)
    assert decoded.client_msg_id == "c1"


def test_the_old_key_is_validated_like_the_new_one(caplog: pytest.LogCaptureFixture) -> None:
    raw = json.loads(encode_event(every_kind()[0]))
    del raw["client_msg_id"]
    raw["client_message_id"] = "x" * 101
    with caplog.at_level(logging.WARNING, logger="chatkeep.realtime.events"):
        assert decode_event(json.dumps(raw)) is None
    assert "unreadable" in caplog.text


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"v": 2, "type": "message.created"}).encode(),
        json.dumps({"v": "1", "type": "read"}).encode(),
        json.dumps({"v": 1, "type": "room.exploded", "room_id": str(ROOM)}).encode(),
        json.dumps({"v": 1, "type": "read", "room_id": str(ROOM)}).encode(),
    ],
)
def test_unreadable_events_are_skipped_with_a_warning(
    payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="chatkeep.realtime.events"):
        assert decode_event(payload) is None
    assert "skipped" in caplog.text


def test_only_event_models_can_be_encoded() -> None:
    with pytest.raises(InvalidInput) as caught:
        encode_event({"type": "read"})  # type: ignore[arg-type]
    assert caught.value.field == "event"


def test_models_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="seq"):
        MessageCreated(room_id=ROOM, message_id=uuid4(), seq=0, sender_id=USER)


async def next_item(sub: EventSubscription, within: float = 5.0) -> Event | RoomGap | None:
    async with asyncio.timeout(within):
        return await sub.get()


async def test_subscribers_on_other_nodes_receive_published_events(
    make_client: ClientFactory,
) -> None:
    node_a = EventBus(await make_client(), node_id="node-a")
    node_b = EventBus(await make_client(), node_id="node-b")
    room, other = uuid4(), uuid4()
    async with await node_b.subscribe(room) as sub:
        assert sub.room_ids == {room}
        event = MessageCreated(room_id=room, message_id=uuid4(), seq=7, sender_id=USER)
        assert await node_a.publish(event) == 1
        assert await node_a.publish(MemberLeft(room_id=other, user_id=USER)) == 0
        received = await next_item(sub)
        assert isinstance(received, MessageCreated)
        assert received.message_id == event.message_id
        assert received.origin == "node-a"
        assert received.event_id == event.event_id


async def test_publish_many_keeps_order_and_rooms(make_client: ClientFactory) -> None:
    client = await make_client()
    bus = EventBus(client)
    listener = EventBus(await make_client())
    first, second = uuid4(), uuid4()
    async with await listener.subscribe(first, second) as sub:
        events: list[Event] = [
            MessagesRead(room_id=first, user_id=USER, last_read_seq=n) for n in range(3)
        ]
        events.append(TypingChanged(room_id=second, user_id=USER, typing=False))
        assert await bus.publish_many(events) == [1, 1, 1, 1]
        received = [await next_item(sub) for _ in events]
    if client.cluster:
        assert all(isinstance(e, TypingChanged | MessagesRead) for e in received)
        got = cast("list[Event]", received)
        # Two rooms are two shards (or may be): order holds within each room.
        for room in (first, second):
            assert [e for e in got if e.room_id == room] == [e for e in events if e.room_id == room]
        by_id = sorted(got, key=lambda e: e.event_id)
        assert by_id == sorted(events, key=lambda e: e.event_id)
    else:
        assert received == events
    assert await bus.publish_many([]) == []


async def test_publishing_positions_raises_the_rooms_published_mark(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    bus = EventBus(client)
    first, second = uuid4(), uuid4()
    assert await bus.published(first) == 0
    events: list[Event] = [
        MemberLeft(room_id=first, user_id=USER, position=5),
        MemberLeft(room_id=first, user_id=USER, position=3),
        MemberLeft(room_id=second, user_id=USER, position=2),
        TypingChanged(room_id=second, user_id=USER, typing=True),  # not in the log
    ]
    await bus.publish_many(events)
    assert (await bus.published(first), await bus.published(second)) == (5, 2)
    # A late publisher of an older position (a relay, a slow node) never lowers it.
    await bus.publish(MemberLeft(room_id=first, user_id=USER, position=4))
    await bus.publish(MemberLeft(room_id=second, user_id=USER, position=9))
    assert (await bus.published(first), await bus.published(second)) == (5, 9)
    ttl = await client.redis.pttl(client.keys.room_published(first))
    assert 0 < ttl <= PUBLISHED_MARK_TTL_MS


async def test_add_and_remove_rooms(make_client: ClientFactory) -> None:
    bus = EventBus(await make_client())
    listener = EventBus(await make_client())
    first, second = uuid4(), uuid4()
    sub = await listener.subscribe(first)
    await sub.add_rooms(second)
    assert sub.room_ids == {first, second}
    await sub.remove_rooms(first)
    assert sub.room_ids == {second}
    assert await bus.publish(MemberLeft(room_id=first, user_id=USER)) == 0
    assert await bus.publish(MemberJoined(room_id=second, user_id=USER)) == 1
    assert isinstance(await next_item(sub), MemberJoined)
    await sub.aclose()
    assert await sub.get() is None


async def test_garbage_on_a_room_channel_is_skipped(make_client: ClientFactory) -> None:
    client = await make_client()
    bus = EventBus(client)
    room = uuid4()
    async with await bus.subscribe(room) as sub:
        await client.publish(client.keys.room_events(room), b"{broken")
        await bus.publish(MemberLeft(room_id=room, user_id=USER))
        assert isinstance(await next_item(sub), MemberLeft)
        collected: list[Any] = []

        async def drain() -> None:
            async for item in sub:
                collected.append(item)
                break

        await client.publish(client.keys.room_events(room), b"[]")
        await bus.publish(MemberJoined(room_id=room, user_id=USER))
        async with asyncio.timeout(5):
            await drain()
        assert [type(item) for item in collected] == [MemberJoined]


async def test_an_overflowing_subscriber_is_told_to_catch_up(make_client: ClientFactory) -> None:
    client = await make_client(subscription_queue_size=2)
    bus = EventBus(client)
    room = uuid4()
    async with await bus.subscribe(room) as sub:
        for n in range(5):
            await bus.publish(MessagesRead(room_id=room, user_id=USER, last_read_seq=n))
        marker = MemberJoined(room_id=room, user_id=USER)
        await bus.publish(marker)
        items: list[Any] = []
        async with asyncio.timeout(5):
            while marker not in items:
                items.append(await sub.get())
    assert isinstance(items[0], RoomGap)
    assert items[0].room_ids == {room}
    assert items[0].reason == "overflow"


async def test_publishing_with_redis_down_is_unavailable(
    make_client: ClientFactory, dead_url: str
) -> None:
    bus = EventBus(await make_client(dead_url))
    with pytest.raises(Unavailable):
        await bus.publish(MemberLeft(room_id=ROOM, user_id=USER))
    with pytest.raises(Unavailable):
        await bus.publish_many([MemberLeft(room_id=ROOM, user_id=USER)])
    with pytest.raises(Unavailable):
        await bus.subscribe(ROOM)


async def test_bad_node_id_and_rooms_are_refused(client: RedisClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        EventBus(client, node_id="a b")
    assert caught.value.field == "node_id"
    with pytest.raises(InvalidInput) as caught:
        await EventBus(client).subscribe("room-1")  # type: ignore[arg-type]
    assert caught.value.field == "room_id"


async def test_a_real_restart_resubscribes_signals_a_gap_and_delivers_again(
    make_client: ClientFactory, throwaway_redis: RedisServer
) -> None:
    listener_client = await make_client(throwaway_redis.url, pubsub_ping_interval=0.5)
    publisher = EventBus(await make_client(throwaway_redis.url))
    listener = EventBus(listener_client, node_id="sub")
    rooms = [uuid4(), uuid4()]
    sub = await listener.subscribe(*rooms)
    before = MessagesRead(room_id=rooms[0], user_id=USER, last_read_seq=1)
    assert await publisher.publish(before) == 1
    assert await next_item(sub) == before

    await asyncio.to_thread(throwaway_redis.stop)
    await wait_until(lambda: not listener_client.pubsub_connected)
    with pytest.raises(Unavailable):  # publishing during the outage fails loudly
        await publisher.publish(before)
    await asyncio.to_thread(throwaway_redis.start)

    gap = await next_item(sub, within=15)
    assert isinstance(gap, RoomGap)
    assert gap.reason == "reconnected"
    assert gap.room_ids == set(rooms)
    assert gap.since <= datetime.now(UTC).timestamp()
    assert listener_client.pubsub_reconnects >= 1
    # The gap is announced only once every channel is subscribed again: whatever is
    # published from now on arrives (so a catch-up started on the notice misses nothing).
    after = [MessagesRead(room_id=room, user_id=USER, last_read_seq=2) for room in rooms]
    assert await publisher.publish_many(after) == [1, 1]
    assert [await next_item(sub) for _ in after] == after
    await sub.aclose()


async def test_rooms_added_during_an_outage_are_refused_then_work_after(
    make_client: ClientFactory, throwaway_redis: RedisServer
) -> None:
    client = await make_client(throwaway_redis.url)
    bus = EventBus(client)
    first, second = uuid4(), uuid4()
    sub = await bus.subscribe(first)
    await asyncio.to_thread(throwaway_redis.stop)
    await wait_until(lambda: not client.pubsub_connected)
    with pytest.raises(Unavailable):
        await sub.add_rooms(second)
    assert sub.room_ids == {first}
    await asyncio.to_thread(throwaway_redis.start)
    assert isinstance(await next_item(sub, within=15), RoomGap)
    await sub.add_rooms(second)
    assert await bus.publish(MemberJoined(room_id=second, user_id=USER)) == 1
    received = await next_item(sub)
    assert isinstance(received, MemberJoined)
    assert received.room_id == second
    await sub.aclose()


def test_room_ids_of_foreign_channels_are_ignored(client: RedisClient) -> None:
    bus = EventBus(client)
    assert bus.room_of_channel("elsewhere") is None
    room: UUID = uuid4()
    assert bus.room_of_channel(bus.channels([room])[0]) == room


async def test_subscribing_is_not_held_up_by_a_reader_backing_off(
    make_client: ClientFactory, throwaway_redis: RedisServer
) -> None:
    client = await make_client(throwaway_redis.url)
    client._hub._backoff = ConstantBackoff(30.0)  # the reader will sleep long after a loss
    bus = EventBus(client)
    first, second = uuid4(), uuid4()
    sub = await bus.subscribe(first)
    await asyncio.to_thread(throwaway_redis.stop)
    await wait_until(lambda: not client.pubsub_connected)
    await asyncio.to_thread(throwaway_redis.start)
    async with asyncio.timeout(5):  # far less than the reader's 30 s pause
        await sub.add_rooms(second)
        gap = await sub.get()
    assert isinstance(gap, RoomGap)
    assert gap.room_ids == {first, second}
    assert await bus.publish(MemberJoined(room_id=first, user_id=USER)) == 1
    assert isinstance(await next_item(sub), MemberJoined)
    await sub.aclose()


def positioned(room: UUID, position: int) -> MemberJoined:
    return MemberJoined(room_id=room, user_id=USER, position=position)


async def test_a_position_jump_is_a_gap_for_that_room_before_the_event(
    make_client: ClientFactory,
) -> None:
    bus = EventBus(await make_client())
    listener = EventBus(await make_client())
    room, other = uuid4(), uuid4()
    async with await listener.subscribe(room, other) as sub:
        # The other room first, on its own: on a cluster two rooms may be two shards,
        # whose deliveries interleave in any order.
        elsewhere = positioned(other, 9)
        await bus.publish_many([elsewhere])
        assert await next_item(sub) == elsewhere
        sent = [positioned(room, 3), positioned(room, 4)]
        sent.append(positioned(room, 7))  # 5 and 6 never arrived
        await bus.publish_many(sent)
        received = [await next_item(sub) for _ in range(4)]
    assert received[:2] == sent[:2]
    gap = received[2]
    assert isinstance(gap, RoomGap)
    assert gap.room_ids == {room}
    assert gap.reason == "position"
    assert gap.positions == {room: 4}
    assert received[3] == sent[2]
    assert sub.positions == {room: 7, other: 9}


async def test_duplicates_by_position_are_dropped_and_unpositioned_events_pass(
    make_client: ClientFactory,
) -> None:
    bus = EventBus(await make_client())
    listener = EventBus(await make_client())
    room = uuid4()
    async with await listener.subscribe(room) as sub:
        typing = TypingChanged(room_id=room, user_id=USER, typing=True)
        sent: list[Event] = [positioned(room, 1), positioned(room, 2), positioned(room, 1)]
        sent += [positioned(room, 2), typing, typing, positioned(room, 3)]
        await bus.publish_many(sent)
        received = [await next_item(sub) for _ in range(5)]
        assert received == [sent[0], sent[1], typing, typing, sent[6]]
        assert sub.poll() is None


async def test_advance_sets_the_baseline_a_catch_up_reached(make_client: ClientFactory) -> None:
    bus = EventBus(await make_client())
    listener = EventBus(await make_client())
    room = uuid4()
    async with await listener.subscribe(room) as sub:
        sub.advance(room, 10)
        sub.advance(room, 4)  # never backwards
        assert sub.positions == {room: 10}
        late = positioned(room, 12)
        await bus.publish_many([positioned(room, 9), positioned(room, 10), late])
        gap = await next_item(sub)
        assert isinstance(gap, RoomGap)
        assert gap.positions == {room: 10}
        assert sub.poll() == late  # the event that revealed the gap waits behind it
        assert sub.poll() is None
        for bad in (-1, "3", True):
            with pytest.raises(InvalidInput) as caught:
                sub.advance(room, bad)  # type: ignore[arg-type]
            assert caught.value.field == "position"
        await sub.remove_rooms(room)
        assert sub.positions == {}


async def test_an_overflow_gap_names_the_last_positions_seen(make_client: ClientFactory) -> None:
    client = await make_client(subscription_queue_size=2)
    bus = EventBus(client)
    room = uuid4()
    async with await bus.subscribe(room) as sub:
        await bus.publish(positioned(room, 5))
        first = await next_item(sub)
        assert isinstance(first, MemberJoined)
        assert first.position == 5
        for n in range(6, 12):
            await bus.publish(positioned(room, n))
        gap = await next_item(sub)
    assert isinstance(gap, RoomGap)
    assert (gap.reason, gap.positions) == ("overflow", {room: 5})
