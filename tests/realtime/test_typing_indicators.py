from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import RedisClient, TypingIndicators
from tests.realtime.conftest import ClientFactory


async def test_start_list_and_stop(client: RedisClient) -> None:
    typing = TypingIndicators(client)
    room, alice, bob = uuid4(), uuid4(), uuid4()
    await typing.start(room, alice)
    await typing.start(room, bob)
    assert set(await typing.typers(room)) == {alice, bob}
    assert await typing.stop(room, alice)
    assert not await typing.stop(room, alice)
    assert await typing.typers(room) == [bob]
    assert await typing.typers(uuid4()) == []


async def test_typing_expires_by_itself(client: RedisClient) -> None:
    typing = TypingIndicators(client, ttl=0.15)
    room, user = uuid4(), uuid4()
    await typing.start(room, user)
    key = client.keys.typing(room)
    assert 0 < await client.redis.pttl(key) <= 150
    await asyncio.sleep(0.08)
    await typing.start(room, user)  # renewing pushes it forward
    await asyncio.sleep(0.1)
    assert await typing.typers(room) == [user]
    await asyncio.sleep(0.1)
    assert await typing.typers(room) == []
    assert not await client.redis.exists(key)


async def test_a_short_typer_does_not_cut_a_long_ones_key(client: RedisClient) -> None:
    now = [3_000_000.0]
    typing = TypingIndicators(client, clock=lambda: now[0])
    room, slow, quick = uuid4(), uuid4(), uuid4()
    await typing.start(room, slow, ttl=10)
    await typing.start(room, quick, ttl=0.5)
    assert await client.redis.pttl(client.keys.typing(room)) > 5000
    now[0] += 1
    assert await typing.typers(room) == [slow]


async def test_typers_are_ordered_by_expiry(client: RedisClient) -> None:
    typing = TypingIndicators(client)
    room = uuid4()
    users = [uuid4() for _ in range(3)]
    for n, user in enumerate(users):
        await typing.start(room, user, ttl=3 - n)
    assert await typing.typers(room) == list(reversed(users))


async def test_bad_input_is_refused(client: RedisClient) -> None:
    typing = TypingIndicators(client)
    with pytest.raises(InvalidInput) as caught:
        await typing.start(uuid4(), uuid4(), ttl=61)
    assert caught.value.field == "ttl"
    with pytest.raises(InvalidInput) as caught:
        await typing.start(uuid4(), "x")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"
    with pytest.raises(InvalidInput) as caught:
        await typing.stop(uuid4(), "x")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"
    with pytest.raises(InvalidInput) as caught:
        await typing.typers("room")  # type: ignore[arg-type]
    assert caught.value.field == "room_id"
    with pytest.raises(InvalidInput) as caught:
        TypingIndicators(client, ttl=0)
    assert caught.value.field == "ttl"


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    typing = TypingIndicators(await make_client(dead_url))
    with pytest.raises(Unavailable):
        await typing.start(uuid4(), uuid4())
    with pytest.raises(Unavailable):
        await typing.typers(uuid4())
