"""MessageRoomCache: the rooms of message ids, a hint that never raises (issue 17)."""

from __future__ import annotations

import uuid

import pytest

from chatkeep.errors import InvalidInput
from chatkeep.realtime import MessageRoomCache, RedisClient
from tests.realtime.conftest import ClientFactory

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_remembered_rooms_are_found_and_age_out(client: RedisClient) -> None:
    cache = MessageRoomCache(client, ttl=0.5)
    room, other = uuid.uuid4(), uuid.uuid4()
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert await cache.room_of(a) is None
    await cache.remember(room, a, b)
    await cache.remember_many([(c, other)])
    assert [await cache.room_of(m) for m in (a, b, c)] == [room, room, other]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.fills) == (3, 1, 3)
    ttl = await client.redis.pttl(cache.key(a))
    assert 0 < ttl <= 500
    assert cache.key(a) == client.keys.cache("message_room", str(a))
    await cache.remember(room)  # nothing to remember: no round trip, no error


async def test_an_unreadable_entry_is_a_miss(client: RedisClient) -> None:
    cache = MessageRoomCache(client)
    message = uuid.uuid4()
    await client.redis.set(cache.key(message), b"\xffnot a uuid")
    assert await cache.room_of(message) is None
    await client.redis.set(cache.key(message), "not-a-uuid")
    assert await cache.room_of(message) is None
    room = uuid.uuid4()
    await cache.remember(room, message)  # the next fill replaces it
    assert await cache.room_of(message) == room


async def test_bad_ids_and_settings_are_refused(client: RedisClient) -> None:
    cache = MessageRoomCache(client)
    with pytest.raises(InvalidInput) as caught:
        await cache.room_of("not a uuid")  # type: ignore[arg-type]
    assert caught.value.field == "message_id"
    with pytest.raises(InvalidInput) as caught:
        await cache.remember("room", uuid.uuid4())  # type: ignore[arg-type]
    assert caught.value.field == "room_id"
    with pytest.raises(InvalidInput) as caught:
        await cache.remember(uuid.uuid4(), "m")  # type: ignore[arg-type]
    assert caught.value.field == "message_id"
    for options, field in (({"ttl": 0}, "ttl"), ({"timeout": -1.0}, "timeout")):
        with pytest.raises(InvalidInput) as caught:
            MessageRoomCache(client, **options)
        assert caught.value.field == field


async def test_redis_down_answers_none_and_forgets(
    make_client: ClientFactory, dead_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = MessageRoomCache(await make_client(dead_url))
    message = uuid.uuid4()
    with caplog.at_level("WARNING", logger="chatkeep.realtime.cache"):
        assert await cache.room_of(message) is None
        await cache.remember(uuid.uuid4(), message)
        assert await cache.room_of(message) is None
    assert cache.stats.errors == 3
    assert cache.stats.fills == 0
    degraded = [r for r in caplog.records if "degraded" in r.getMessage()]
    assert len(degraded) == 1  # once per outage, not per call
