"""Fixtures of the realtime tests: clients on the test Redis, dead ports, throwaway servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio.connection import Connection

from chatkeep.realtime import RedisClient
from tests.servers import free_port

# Short timeouts and backoffs keep failure tests fast.
FAST: dict[str, Any] = {
    "socket_timeout": 2.0,
    "connect_timeout": 1.0,
    "retries": 1,
    "backoff_base": 0.005,
    "backoff_cap": 0.05,
    "pool_timeout": 1.0,
}

ClientFactory = Callable[..., Awaitable[RedisClient]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests marked ``standalone_only`` on the single server alone.

    Each such mark says why: counting a single connection's round trips, say, has no
    meaning on a cluster client that holds one pool per node.
    """
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_cluster = callspec is not None and callspec.params.get("redis_url") == "cluster"
        if on_cluster and item.get_closest_marker("standalone_only") is not None:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(params=["standalone", pytest.param("cluster", marks=pytest.mark.cluster)])
def redis_url(request: pytest.FixtureRequest, chatkeep_redis_url: str) -> str:
    """The realtime suite runs twice: on the test Redis, and on the session's cluster.

    The cluster run proves every operation chatkeep has keeps its keys in one slot
    (a script or a pipeline touching two slots fails there with ``CROSSSLOT``) and works
    through ``RedisCluster`` and sharded pub/sub.
    """
    if request.param == "standalone":
        return chatkeep_redis_url
    url: str = request.getfixturevalue("cluster_url")
    return url


@pytest_asyncio.fixture(loop_scope="session")
async def make_client(redis_url: str) -> AsyncIterator[ClientFactory]:
    """Build RedisClients on the test database (or another URL); all closed after the test."""
    made: list[RedisClient] = []

    async def factory(url: str | None = None, **options: Any) -> RedisClient:
        merged = {**FAST, **options}
        client = RedisClient(url or redis_url, **merged)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def client(make_client: ClientFactory) -> RedisClient:
    """A RedisClient on the flushed test database."""
    return await make_client()


@pytest.fixture
def dead_url() -> str:
    """A Redis URL where nothing listens: every command fails to connect."""
    return f"redis://127.0.0.1:{free_port()}/0"


def counting_connection() -> tuple[type[Connection], list[int]]:
    """A connection class that counts the writes it sends (one per round trip)."""
    sent = [0]

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent[0] += 1
            await super().send_packed_command(command, check_health)

    return CountingConnection, sent


async def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")
