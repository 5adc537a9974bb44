from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import RedisClient, SocketRegistry
from chatkeep.realtime.sockets import SocketTouch
from tests.realtime.conftest import ClientFactory


async def test_register_get_and_unregister(client: RedisClient) -> None:
    registry = SocketRegistry(client, node_id="node-a")
    user, room = uuid4(), uuid4()
    info = await registry.register("sock-1", user, rooms=[room])
    assert (info.socket_id, info.user_id, info.node_id) == ("sock-1", user, "node-a")
    assert info.rooms == {room}
    found = await registry.get("sock-1")
    assert found == info
    assert await registry.sockets_of_user(user) == ["sock-1"]
    assert await registry.sockets_of_node() == ["sock-1"]
    gone = await registry.unregister("sock-1")
    assert gone == info
    assert await registry.get("sock-1") is None
    assert await registry.sockets_of_user(user) == []
    assert await registry.sockets_of_node("node-a") == []
    assert await registry.unregister("sock-1") is None


async def test_a_users_sockets_span_nodes(client: RedisClient) -> None:
    node_a = SocketRegistry(client, node_id="node-a")
    node_b = SocketRegistry(client, node_id="node-b")
    user = uuid4()
    await node_a.register("a1", user)
    await node_b.register("b1", user)
    await node_b.register("b2", uuid4())
    assert sorted(await node_a.sockets_of_user(user)) == ["a1", "b1"]
    assert sorted(await node_a.sockets_of_node("node-b")) == ["b1", "b2"]
    assert node_b.node_id == "node-b"


async def test_every_mapping_has_a_ttl_and_expires(client: RedisClient) -> None:
    registry = SocketRegistry(client, node_id="n", ttl=0.2)
    user = uuid4()
    await registry.register("s", user)
    keys = [client.keys.socket("s"), client.keys.user_sockets(user), client.keys.node_sockets("n")]
    for key in keys:
        assert 0 < await client.redis.pttl(key) <= 200
    await asyncio.sleep(0.3)
    assert await registry.get("s") is None
    assert await registry.sockets_of_user(user) == []
    for key in keys:
        assert not await client.redis.exists(key)


async def test_dead_sockets_do_not_hide_behind_a_live_ones_ttl(client: RedisClient) -> None:
    now = [1_000_000.0]
    registry = SocketRegistry(client, node_id="n", ttl=10, clock=lambda: now[0])
    user = uuid4()
    await registry.register("old", user)
    now[0] += 8
    await registry.register("new", user)
    now[0] += 3  # "old" is past its deadline, "new" is not; the set's TTL keeps both
    assert await registry.sockets_of_user(user) == ["new"]
    assert await client.redis.zcard(client.keys.user_sockets(user)) == 1  # pruned


async def test_purge_node_forgets_its_sockets_only(client: RedisClient) -> None:
    node_a = SocketRegistry(client, node_id="node-a")
    node_b = SocketRegistry(client, node_id="node-b")
    user = uuid4()
    await node_a.register("a1", user)
    await node_a.register("a2", uuid4())
    await node_b.register("b1", user)
    purged = await node_b.purge_node("node-a")
    assert sorted(info.socket_id for info in purged) == ["a1", "a2"]
    assert await node_a.sockets_of_node() == []
    assert await node_a.get("a1") is None
    assert await node_b.sockets_of_user(user) == ["b1"]
    b1 = await node_b.get("b1")
    assert await node_b.purge_node() == [b1]
    assert await node_b.sockets_of_node() == []


async def test_a_record_rebuilt_by_a_late_touch_has_no_connection_time(
    client: RedisClient,
) -> None:
    registry = SocketRegistry(client, node_id="n")
    user = uuid4()
    pipe = client.pipeline()
    registry.stage_touch(pipe, [SocketTouch("late", user, registry.now_ms() + 1000)], ttl_ms=1000)
    await pipe.execute()
    info = await registry.get("late")
    assert info is not None
    assert info.connected_at is None
    assert info.user_id == user


@pytest.mark.parametrize("socket_id", ["", "has space", "x{y}"])
async def test_bad_socket_ids_are_refused(client: RedisClient, socket_id: str) -> None:
    registry = SocketRegistry(client, node_id="n")
    with pytest.raises(InvalidInput) as caught:
        await registry.register(socket_id, uuid4())
    assert caught.value.field == "socket_id"


async def test_bad_rooms_and_node_ids_are_refused(client: RedisClient) -> None:
    registry = SocketRegistry(client, node_id="n")
    with pytest.raises(InvalidInput) as caught:
        await registry.register("s", uuid4(), rooms=["not-a-uuid"])  # type: ignore[list-item]
    assert caught.value.field == "rooms"
    with pytest.raises(InvalidInput) as caught:
        await registry.register("s", uuid4(), rooms=[uuid4() for _ in range(1001)])
    assert caught.value.field == "rooms"
    with pytest.raises(InvalidInput) as caught:
        SocketRegistry(client, node_id="bad node")
    assert caught.value.field == "node_id"


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    registry = SocketRegistry(await make_client(dead_url), node_id="n")
    with pytest.raises(Unavailable):
        await registry.register("s", uuid4())
    with pytest.raises(Unavailable):
        await registry.get("s")
    with pytest.raises(Unavailable):
        await registry.sockets_of_user(uuid4())
