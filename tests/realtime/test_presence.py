from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID, uuid4

import pytest

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import (
    Heartbeat,
    OfflineUser,
    Presence,
    RedisClient,
    SocketRegistry,
)
from tests.realtime.conftest import ClientFactory, counting_connection


def make_presence(client: RedisClient, **options: object) -> Presence:
    registry = SocketRegistry(client, node_id="node-a")
    return Presence(client, registry, **options)  # type: ignore[arg-type]


async def test_online_while_any_socket_is_connected(client: RedisClient) -> None:
    presence = make_presence(client)
    user = uuid4()
    assert not await presence.is_online(user)
    assert await presence.connect(user, "s1") is True
    assert await presence.connect(user, "s2") is False  # already online
    assert await presence.is_online(user)
    assert await presence.disconnect("s1") is None  # s2 still there
    assert await presence.is_online(user)
    gone = await presence.disconnect("s2")
    assert gone is not None
    assert gone.user_id == user
    assert not await presence.is_online(user)
    assert await presence.disconnect("s2") is None  # unknown now


async def test_offline_after_the_timeout_without_logout(client: RedisClient) -> None:
    seen: list[OfflineUser] = []

    async def on_offline(users: Sequence[OfflineUser]) -> None:
        seen.extend(users)

    presence = make_presence(client, timeout=0.2, on_offline=on_offline)
    crashed, alive = uuid4(), uuid4()
    await presence.connect(crashed, "c1")
    await presence.connect(alive, "a1")
    for _ in range(3):
        await asyncio.sleep(0.1)
        await presence.heartbeat(alive, "a1")
    assert not await presence.is_online(crashed)  # its key expired by itself
    assert await presence.is_online(alive)
    gone = await presence.sweep()
    assert [u.user_id for u in gone] == [crashed]
    assert [u.user_id for u in seen] == [crashed]
    assert await presence.sweep() == []  # reported once
    # last_seen is the last heartbeat, not the sweep time.
    assert (gone[0].last_seen.timestamp() * 1000) < (await _now_ms(presence)) - 150


async def _now_ms(presence: Presence) -> int:
    return presence._now_ms()


async def test_concurrent_sweepers_report_each_user_once(client: RedisClient) -> None:
    node_a = make_presence(client, timeout=0.1)
    node_b = Presence(client, SocketRegistry(client, node_id="node-b"), timeout=0.1)
    users = [uuid4() for _ in range(50)]
    await node_a.heartbeat_many(Heartbeat(u, f"s-{u}") for u in users)
    await asyncio.sleep(0.15)
    results = await asyncio.gather(*(p.sweep(limit=7) for p in [node_a, node_b] * 10))
    reported = [u.user_id for batch in results for u in batch]
    assert sorted(reported) == sorted(users)


async def test_a_heartbeat_after_going_offline_brings_the_user_back(client: RedisClient) -> None:
    presence = make_presence(client, timeout=0.1)
    user = uuid4()
    assert await presence.connect(user, "s")
    assert not await presence.heartbeat(user, "s")
    await asyncio.sleep(0.15)
    assert [u.user_id for u in await presence.sweep()] == [user]
    assert await presence.heartbeat(user, "s") is True
    assert await presence.is_online(user)


async def test_room_presence(client: RedisClient) -> None:
    presence = make_presence(client)
    room, other_room = uuid4(), uuid4()
    alice, bob = uuid4(), uuid4()
    await presence.connect(alice, "a1", rooms=[room])
    await presence.connect(bob, "b1", rooms=[room, other_room])
    assert set(await presence.in_room(room)) == {alice, bob}
    assert await presence.in_room(other_room) == [bob]
    assert await presence.leave_room(room, bob)
    assert not await presence.leave_room(room, bob)
    assert await presence.in_room(room) == [alice]
    assert 0 < await client.redis.pttl(client.keys.room_presence(room)) <= presence.timeout_ms


async def test_disconnect_leaves_rooms_no_other_socket_is_in(client: RedisClient) -> None:
    presence = make_presence(client)
    shared, only_first = uuid4(), uuid4()
    user = uuid4()
    await presence.connect(user, "first", rooms=[shared, only_first])
    await presence.connect(user, "second", rooms=[shared])
    assert await presence.disconnect("first") is None
    assert await presence.in_room(shared) == [user]
    assert await presence.in_room(only_first) == []
    assert await presence.disconnect("second") is not None
    assert await presence.in_room(shared) == []


async def test_room_presence_expires_without_heartbeats(client: RedisClient) -> None:
    now = [2_000_000.0]
    presence = make_presence(client, timeout=5, clock=lambda: now[0])
    room = uuid4()
    await presence.connect(uuid4(), "s", rooms=[room])
    now[0] += 6
    assert await presence.in_room(room) == []


async def test_online_among(client: RedisClient) -> None:
    presence = make_presence(client)
    on, off = uuid4(), uuid4()
    await presence.connect(on, "s")
    assert await presence.online_among([on, off, on]) == {on}
    assert await presence.online_among([]) == set()


async def test_heartbeat_many_reports_who_came_online(client: RedisClient) -> None:
    presence = make_presence(client, batch_size=100)
    users = [uuid4() for _ in range(250)]
    beats = [Heartbeat(u, f"s-{n}") for n, u in enumerate(users)]
    assert await presence.heartbeat_many(beats) == users
    assert await presence.heartbeat_many(beats) == []
    assert await presence.online_among(users) == set(users)


@pytest.mark.standalone_only("counts round trips of one connection (a cluster sends one per node)")
async def test_ten_thousand_heartbeats_are_one_round_trip_per_batch(
    make_client: ClientFactory,
) -> None:
    connection_class, sent = counting_connection()
    counted = await make_client(connection_class=connection_class)
    await counted.ping()  # connect (and handshake) before counting
    presence = make_presence(counted, batch_size=10_000)
    room = uuid4()
    beats = [Heartbeat(uuid4(), f"sock-{n}", frozenset({room})) for n in range(10_000)]
    before = sent[0]
    came_online = await presence.heartbeat_many(beats)
    assert sent[0] - before == 1
    assert len(came_online) == 10_000
    assert len(await presence.in_room(room)) == 10_000
    smaller = make_presence(counted, batch_size=250)
    before = sent[0]
    await smaller.heartbeat_many(beats[:1000])
    assert sent[0] - before == 4


async def test_run_sweeper_reports_and_survives_failures(client: RedisClient) -> None:
    calls: list[list[UUID]] = []
    reported = [asyncio.Event(), asyncio.Event()]

    async def on_offline(users: Sequence[OfflineUser]) -> None:
        calls.append([u.user_id for u in users])
        reported[min(len(calls), 2) - 1].set()
        if len(calls) == 1:
            raise RuntimeError("postgres briefly down")

    presence = make_presence(client, timeout=0.05, on_offline=on_offline)
    first, second = uuid4(), uuid4()
    await presence.connect(first, "f")
    task = asyncio.create_task(presence.run_sweeper(interval=0.02))
    try:
        async with asyncio.timeout(5):
            await reported[0].wait()
            await presence.connect(second, "s")
            await reported[1].wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls == [[first], [second]]


async def test_bad_input_is_refused(client: RedisClient) -> None:
    presence = make_presence(client)
    with pytest.raises(InvalidInput) as caught:
        await presence.heartbeat("nope", "s")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"
    with pytest.raises(InvalidInput) as caught:
        await presence.heartbeat_many(["x"])  # type: ignore[list-item]
    assert caught.value.field == "beats"
    with pytest.raises(InvalidInput) as caught:
        await presence.sweep(limit=0)
    assert caught.value.field == "limit"
    with pytest.raises(InvalidInput) as caught:
        await presence.leave_room(uuid4(), "x")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"
    with pytest.raises(InvalidInput) as caught:
        make_presence(client, batch_size=0)
    assert caught.value.field == "batch_size"


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    presence = make_presence(await make_client(dead_url))
    with pytest.raises(Unavailable):
        await presence.connect(uuid4(), "s")
    with pytest.raises(Unavailable):
        await presence.is_online(uuid4())
    with pytest.raises(Unavailable):
        await presence.sweep()


@pytest.mark.parametrize("swallowed_as", ["error", "nothing"])
async def test_run_sweeper_stops_when_a_store_call_swallows_the_cancel(
    client: RedisClient, swallowed_as: str
) -> None:
    # A stop request that lands inside a store call may come back as that call's own error
    # (a timeout, Unavailable), or be swallowed outright; the sweeper must still stop, or
    # whoever cancelled it (a web app's shutdown) waits forever.
    presence = make_presence(client)
    entered = asyncio.Event()

    async def sweep(limit: int = 0) -> list[OfflineUser]:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if swallowed_as == "error":
                raise Unavailable("redis did not answer (the call was cut short)") from None
        return []

    presence.sweep = sweep  # type: ignore[method-assign]
    task = asyncio.create_task(presence.run_sweeper(interval=0.01))
    await entered.wait()
    task.cancel()
    async with asyncio.timeout(2):
        with pytest.raises(asyncio.CancelledError):
            await task
