"""The change stream's logic, over real Redis pub/sub and an in-memory room log.

The log here stands in for ``ChatKeep.changes()`` so each rule (catch-up overlap, gaps,
bursts, resets, leaving, outages) is driven exactly; the facade's own stream over
PostgreSQL is tested in tests/test_facade_stream.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_asyncio

from chatkeep.errors import InvalidInput, NotFound, ResyncRequired, Unavailable
from chatkeep.models import Change, ChangePage
from chatkeep.realtime import EventBus, EventSubscription, MemberJoined, RedisClient
from chatkeep.stream import ChangeStream, RoomClosed, RoomReset, StreamItem

USER = uuid4()


class Log:
    """Rooms' change logs in memory, with the contract's errors, publishing nudges."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.logs: dict[UUID, list[Change]] = {}
        self.members: dict[UUID, set[UUID]] = {}
        self.oldest: dict[UUID, int] = {}
        self.reads = 0
        self.failures = 0
        self.delay = 0.0

    def room(self) -> UUID:
        room = uuid4()
        self.logs[room] = []
        self.members[room] = {USER}
        self.oldest[room] = 1
        return room

    def position(self, room: UUID) -> int:
        return len(self.logs[room])

    def record(self, room: UUID, kind: Any = "message.created", **data: Any) -> Change:
        change = Change(
            room_id=room,
            position=self.position(room) + 1,
            kind=kind,
            occurred_at=datetime.now(UTC),
            actor_id=USER,
            message_id=None,
            seq=None,
            data=data,
        )
        self.logs[room].append(change)
        return change

    async def change(self, room: UUID, kind: Any = "message.created", **data: Any) -> Change:
        """Record a change and publish its nudge, as a writer does."""
        change = self.record(room, kind, **data)
        await self.bus.publish(MemberJoined(room_id=room, user_id=USER, position=change.position))
        return change

    async def changes(
        self, room_id: UUID, user_id: UUID, *, after: int, limit: int = 100
    ) -> ChangePage:
        self.reads += 1
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise Unavailable("database is down")
        if user_id not in self.members[room_id]:
            raise NotFound("room not found", entity="room")
        position = self.position(room_id)
        if after < self.oldest[room_id] - 1:
            raise ResyncRequired(
                "reload", room_id=room_id, oldest_position=self.oldest[room_id], position=position
            )
        items = self.logs[room_id][after : after + limit]
        last = items[-1].position if items else after
        return ChangePage(
            room_id=room_id,
            items=items,
            position=position,
            next_after=last if last < position else None,
        )

    async def room_position(self, room_id: UUID, user_id: UUID) -> int:
        if user_id not in self.members[room_id]:
            raise NotFound("room not found", entity="room")
        return self.position(room_id)

    async def subscribe(self, *room_ids: UUID) -> EventSubscription:
        return await self.bus.subscribe(*room_ids)


@pytest_asyncio.fixture(loop_scope="session")
async def log(redis_url: str) -> AsyncIterator[Log]:
    async with RedisClient(redis_url) as client:
        yield Log(EventBus(client))


async def take(stream: ChangeStream, count: int, within: float = 5.0) -> list[StreamItem]:
    got: list[StreamItem] = []
    async with asyncio.timeout(within):
        async for item in stream:
            got.append(item)
            if len(got) == count:
                break
    return got


def positions(items: list[StreamItem]) -> list[int]:
    return [item.position for item in items]


async def test_catch_up_then_live_without_duplicates(log: Log) -> None:
    room = log.room()
    for _ in range(3):
        await log.change(room)
    async with ChangeStream(log, [room], USER, since={room: 1}) as stream:
        await log.bus.publish(MemberJoined(room_id=room, user_id=USER, position=3))  # overlap
        await log.change(room)
        got = await take(stream, 3)
        assert positions(got) == [2, 3, 4]
        assert all(isinstance(item, Change) for item in got)
        assert stream.positions == {room: 4}


async def test_a_room_absent_from_since_starts_at_its_position(log: Log) -> None:
    old, new = log.room(), log.room()
    for _ in range(5):
        await log.change(new)
    async with ChangeStream(log, [old, new], USER, since={old: 0}) as stream:
        await log.change(old)
        await log.change(new)
        got = await take(stream, 2)
    assert sorted((item.room_id == new, item.position) for item in got) == [(False, 1), (True, 6)]


async def test_an_unpublished_change_is_read_when_the_next_event_jumps(log: Log) -> None:
    room = log.room()
    async with ChangeStream(log, [room], USER) as stream:
        log.record(room)  # committed, never published (its writer died)
        log.record(room)
        await log.change(room)
        assert positions(await take(stream, 3)) == [1, 2, 3]


async def test_a_burst_of_events_is_one_read(log: Log) -> None:
    room = log.room()
    async with ChangeStream(log, [room], USER, page_size=5) as stream:
        changes = [log.record(room) for _ in range(12)]
        await log.bus.publish_many(
            [MemberJoined(room_id=room, user_id=USER, position=c.position) for c in changes]
        )
        await asyncio.sleep(0.2)  # all twelve nudges are queued before the stream looks
        got = await take(stream, 12)
        assert positions(got) == list(range(1, 13))
        assert stream.reads == 3  # one read chain: pages of 5, 5 and 2


async def test_a_log_that_forgot_the_position_resets_the_room(log: Log) -> None:
    room = log.room()
    for _ in range(6):
        log.record(room)
    log.oldest[room] = 5  # 1-4 were pruned
    async with ChangeStream(log, [room], USER, since={room: 2}) as stream:
        assert await take(stream, 1) == [RoomReset(room, position=6, oldest_position=5)]
        await log.change(room)
        assert positions(await take(stream, 1)) == [7]


async def test_leaving_yields_the_change_then_closes_the_room(log: Log) -> None:
    stay, leave = log.room(), log.room()
    async with ChangeStream(log, [stay, leave], USER) as stream:
        await log.change(leave, "member.left", user_id=str(USER))
        got = await take(stream, 2)
        assert [type(item) for item in got] == [Change, RoomClosed]
        assert got[1] == RoomClosed(leave, 1, "left")
        assert stream.room_ids == {stay}
        log.members[stay].discard(USER)  # removed; the log no longer shows this user the room
        await log.change(stay, "member.removed", user_id=str(USER))
        got = await take(stream, 1)
        assert got == [RoomClosed(stay, 0, "not visible")]
        async with asyncio.timeout(5):
            assert [item async for item in stream] == []  # no room left: the stream ends


async def test_a_database_outage_is_retried(log: Log) -> None:
    room = log.room()
    async with ChangeStream(log, [room], USER) as stream:
        log.failures = 2
        await log.change(room)
        assert positions(await take(stream, 1)) == [1]
        assert log.failures == 0


async def test_bad_input_and_misuse_are_refused(log: Log) -> None:
    room = log.room()
    for bad_rooms in ([], room, "x", [room, "nope"]):
        with pytest.raises(InvalidInput) as caught:
            ChangeStream(log, bad_rooms, USER)  # type: ignore[arg-type]
        assert caught.value.field == "room_ids"
    for since in ({uuid4(): 1}, {room: -1}, {room: True}, [room]):
        with pytest.raises(InvalidInput) as caught:
            ChangeStream(log, [room], USER, since=since)  # type: ignore[arg-type]
        assert caught.value.field == "since"
    with pytest.raises(InvalidInput):
        ChangeStream(log, [room], USER, page_size=0)
    stream = ChangeStream(log, [room], USER)
    with pytest.raises(InvalidInput) as caught:
        await anext(stream)
    assert caught.value.field == "stream"
    async with stream:
        with pytest.raises(InvalidInput):
            await stream.open()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    log.members[room].clear()
    with pytest.raises(NotFound):
        await ChangeStream(log, [room], USER).open()


async def test_a_caller_cancelled_mid_read_loses_nothing(log: Log) -> None:
    room, other = log.room(), log.room()
    async with ChangeStream(log, [room, other], USER) as stream:
        log.delay = 0.3
        await log.change(room)
        await log.change(other)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await anext(stream)
        assert stream.positions == {room: 0, other: 0}
        log.delay = 0
        got = await take(stream, 2)
        assert sorted((item.room_id == room, item.position) for item in got) == [
            (False, 1),
            (True, 1),
        ]
        assert stream.positions == {room: 1, other: 1}
