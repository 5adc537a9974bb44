"""RedisClient on a Redis Cluster: the URL, sharded links per node, slot moves, CROSSSLOT."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio
import redis
from redis.asyncio.cluster import NodesManager

from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput
from chatkeep.realtime import RedisClient
from chatkeep.realtime.pubsub import PubSubMessage, SubscriptionGap
from chatkeep.realtime.shards import _ShardedPubSubHub
from tests.realtime.conftest import FAST, ClientFactory, counting_connection, wait_until
from tests.servers import RedisClusterServers


@pytest_asyncio.fixture(loop_scope="session")
async def make_client(cluster_url: str) -> AsyncIterator[ClientFactory]:
    """Clients on the session's cluster only (this module is about the cluster alone)."""
    made: list[RedisClient] = []

    async def factory(url: str | None = None, **options: Any) -> RedisClient:
        client = RedisClient(url or cluster_url, **{**FAST, **options})
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent.parent


def hub_of(client: RedisClient) -> _ShardedPubSubHub:
    hub = client._hub
    assert isinstance(hub, _ShardedPubSubHub)
    return hub


async def test_a_cluster_url_makes_a_cluster_client_with_hash_tags(cluster_url: str) -> None:
    async with RedisClient(cluster_url, **FAST) as client:
        assert client.cluster
        assert client.keys.cluster_mode  # forced on: multi-key operations need one slot
        assert client.publish_command == "SPUBLISH"
        assert "cluster=True" in repr(client)
        assert isinstance(client.redis, redis.asyncio.RedisCluster)
        assert (await client.health()).ok
    async with RedisClient("redis://127.0.0.1:1/0", **FAST) as single:
        assert not single.cluster
        assert single.publish_command == "PUBLISH"


@pytest.mark.parametrize(
    ("url", "options", "error", "field"),
    [
        ("redis+cluster://127.0.0.1:7100/2", {}, ConfigurationError, "redis_url"),
        ("redis+cluster://127.0.0.1:notaport", {}, ConfigurationError, "redis_url"),
        (
            "redis+cluster://127.0.0.1:7100",
            {"connection_class": counting_connection()[0]},
            InvalidInput,
            "connection_class",
        ),
        ("cluster://127.0.0.1:7100", {}, ConfigurationError, "redis_url"),
    ],
)
def test_bad_cluster_urls_and_options_are_refused(
    url: str, options: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as caught:
        RedisClient(url, **options)
    assert getattr(caught.value, "field", None) == field


def test_settings_take_a_cluster_url_and_production_wants_tls() -> None:
    settings = Settings(redis_url="valkey+cluster://127.0.0.1:7100")
    made = RedisClient.from_settings(settings)
    assert made.cluster
    assert made.keys.cluster_mode
    with pytest.raises(ConfigurationError, match=r"redis\+cluster://"):
        Settings(redis_url="cluster://127.0.0.1:7100")
    production: dict[str, Any] = {
        "env": "production",
        "database_url": "postgresql://h/db?sslmode=verify-full",
    }
    with pytest.raises(ConfigurationError, match="rediss://"):
        Settings(redis_url="redis+cluster://127.0.0.1:7100", **production)
    tls = Settings(redis_url="rediss+cluster://127.0.0.1:7100", **production)
    assert tls.redis_url is not None


async def test_one_link_per_shard_node_carries_that_nodes_rooms(
    make_client: ClientFactory, redis_cluster: RedisClusterServers
) -> None:
    client = await make_client()
    channels = [client.keys.room_events(uuid4()) for _ in range(30)]
    async with await client.subscribe(*channels) as sub:
        links = hub_of(client).links
        assert len(links) == 3  # 30 random rooms: every master owns some (1 in 10^5 fails)
        for node, carried in links.items():
            for channel in carried:
                assert node.endswith(f":{redis_cluster.master_of(channel)}")
        assert sorted(c for carried in links.values() for c in carried) == sorted(channels)
        publisher = await make_client()
        for channel in channels:
            assert await publisher.publish(channel, b"x") == 1
        got = {(await asyncio.wait_for(sub.get(), 5)) for _ in channels}
        assert got == {PubSubMessage(channel, b"x") for channel in channels}
        await sub.remove(*channels[:10])
        assert sum(len(c) for c in hub_of(client).links.values()) == 20
        assert await publisher.publish(channels[0], b"gone") == 0  # SUNSUBSCRIBE reached it
    assert client.pubsub_connected  # links stay open for later rooms
    assert client.pubsub_reconnects == 0


def _node_id(port: int) -> str:
    with redis.Redis(port=port) as node:
        return str(node.execute_command("CLUSTER", "MYID"), "ascii")


def _move_slot(redis_cluster: RedisClusterServers, slot: int, source: int, target: int) -> None:
    """Hand an empty slot from one master to another, as a resharding does."""
    target_id, source_id = _node_id(target), _node_id(source)
    with redis.Redis(port=target) as t, redis.Redis(port=source) as s:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        t.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    redis_cluster.wait_ok()


async def test_a_moved_slot_is_subscribed_again_on_its_new_owner_then_a_gap(
    make_client: ClientFactory, redis_cluster: RedisClusterServers
) -> None:
    client = await make_client()
    publisher = await make_client()
    moving, staying = client.keys.room_events(uuid4()), client.keys.room_events(uuid4())
    source = redis_cluster.master_of(moving)
    masters = {redis_cluster.master_of(f"{{{n}}}") for n in range(50)}
    target = next(port for port in sorted(masters) if port != source)
    slot = redis.asyncio.RedisCluster.keyslot(client.redis, moving)  # type: ignore[arg-type]
    async with await client.subscribe(moving, staying) as sub:
        await asyncio.to_thread(_move_slot, redis_cluster, slot, source, target)
        gap = await asyncio.wait_for(sub.get(), 15)  # the server's sunsubscribe, then healed
        assert isinstance(gap, SubscriptionGap)
        assert gap.reason == "reconnected"
        assert gap.channels == {moving}
        assert moving in hub_of(client).links[f"127.0.0.1:{target}"]
        await wait_until(lambda: client.pubsub_connected)
        assert await publisher.publish(moving, b"after the move") == 1
        assert await asyncio.wait_for(sub.get(), 5) == PubSubMessage(moving, b"after the move")
    assert client.pubsub_reconnects == 1


async def test_the_cluster_refuses_keys_of_two_slots_in_one_script(
    make_client: ClientFactory,
) -> None:
    # What the hash tags prevent, and why the suite's cluster run proves something: the
    # same two keys without tags land in different slots, and Redis refuses them.
    client = await make_client()
    user = uuid4()
    tagged = [client.keys.session(user), client.keys.user_sockets(user)]
    assert await client.redis.eval("return #KEYS", 2, *tagged) == 2
    untagged = [k.replace("{", "").replace("}", "") for k in tagged]
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        await client.redis.eval("return #KEYS", 2, *untagged)
    # Through the guard every service uses, that is a ChatkeepError naming the operation.
    with pytest.raises(ChatkeepError, match=r"test\.crossslot"), client.guard("test.crossslot"):
        await client.redis.eval("return #KEYS", 2, *untagged)


def test_the_benchmark_runs_in_its_tiny_mode(
    redis_cluster: RedisClusterServers, chatkeep_redis_url: str
) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_cluster_pubsub.py"),
            "--tiny",
            "--standalone-url",
            chatkeep_redis_url,
            "--cluster-url",
            redis_cluster.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for mode in ("standalone", "cluster-classic", "cluster-sharded"):
        assert mode in done.stdout
    assert "ratio msg/s sharded/classic:" in done.stdout


async def _concurrent_sets(client: RedisClient, key: str, count: int) -> list[BaseException | None]:
    async def one(index: int) -> BaseException | None:
        try:
            with client.guard("test.set"):
                await client.redis.set(f"{key}:{index}", b"x")
        except ChatkeepError as exc:
            return exc
        return None

    return await asyncio.gather(*(one(i) for i in range(count)))


async def test_a_new_clients_first_commands_go_to_their_slots_owner(
    make_client: ClientFactory,
    redis_cluster: RedisClusterServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # redis-py's cluster client, before it knows the cluster, sends a keyed command to a
    # random master: 60 concurrent first commands drew dozens of MOVED replies, and every
    # fifth MOVED closed every connection of the client, the ones other commands were
    # reading from included ("Connection closed by server"); and more commands than a
    # node's max_connections (50) failed at once. Discovered first, none moves; the
    # commands past 50 wait for a permit.
    client = await make_client()
    cluster = client.redis
    assert isinstance(cluster, redis.asyncio.RedisCluster)
    key = f"{{{uuid4()}}}"
    slot = cluster.keyslot(key)
    moved = _count_moved(client, monkeypatch)
    assert await _concurrent_sets(client, key, 60) == [None] * 60
    assert moved == []
    owner = cluster.get_node_from_key(key)
    assert owner is not None
    assert owner.port == redis_cluster.master_of(key)
    assert cluster.keyslot(f"{key}:1") == slot


async def test_a_moved_storm_does_not_close_the_connections_of_other_commands(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a failover or a slot migration does to a busy client: its slot table is out of
    # date, so every command in flight on the moved slot gets MOVED at once. Each patches
    # its slot and goes on; none closes a connection another command is reading from.
    client = await make_client()
    key = f"{{{uuid4()}}}"
    await client.ping()  # discovered
    cluster = client.redis
    assert isinstance(cluster, redis.asyncio.RedisCluster)
    nodes = cluster.nodes_manager
    slot = cluster.keyslot(key)
    owner = nodes.slots_cache[slot][0]
    wrong = next(n for n in cluster.get_primaries() if n.name != owner.name)
    nodes.slots_cache[slot] = [wrong]
    moved = _count_moved(client, monkeypatch)
    results = await _concurrent_sets(client, key, 60)
    assert results == [None] * 60
    assert len(moved) >= 1
    assert nodes.slots_cache[slot][0].name == owner.name


def _count_moved(client: RedisClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every MOVED reply this client's commands get (each patches its slot)."""
    seen: list[str] = []
    cluster = client.redis
    assert isinstance(cluster, redis.asyncio.RedisCluster)
    mine = cluster.nodes_manager
    real = NodesManager.move_slot

    async def move_slot(self: NodesManager, exc: Any) -> None:
        if self is mine:
            seen.append(str(exc))
        await real(self, exc)

    monkeypatch.setattr(NodesManager, "move_slot", move_slot)
    return seen
