from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis import exceptions as rex
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput, Unavailable
from chatkeep.realtime import (
    PubSubMessage,
    RedisClient,
    SubscriptionGap,
    translate_error,
)
from tests.realtime.conftest import ClientFactory

MARKER = b"chk-marker"


def flaky_connection(faults: list[Exception]) -> tuple[type[Connection], list[int]]:
    """A connection that raises ``faults`` (in order) when sending the marker key."""
    attempts = [0]

    class FlakyConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            data = command if isinstance(command, bytes) else b"".join(command)
            if MARKER in data:
                attempts[0] += 1
                if faults:
                    raise faults.pop(0)
            await super().send_packed_command(command, check_health)

    return FlakyConnection, attempts


async def test_health_reports_latency(client: RedisClient) -> None:
    health = await client.health()
    assert health.ok
    assert health.latency_ms is not None
    assert 0 <= health.latency_ms < 1000
    assert health.error is None


async def test_health_of_a_dead_server_reports_instead_of_raising(
    make_client: ClientFactory, dead_url: str
) -> None:
    dead = await make_client(dead_url)
    health = await dead.health()
    assert not health.ok
    assert health.latency_ms is None
    assert health.error is not None
    assert "unavailable" in health.error


async def test_redis_down_raises_unavailable_with_the_cause(
    make_client: ClientFactory, dead_url: str
) -> None:
    dead = await make_client(dead_url)
    with pytest.raises(Unavailable) as caught:
        await dead.ping()
    assert isinstance(caught.value.__cause__, rex.ConnectionError)
    with pytest.raises(Unavailable):
        await dead.publish("x", b"y")


def test_retry_policy_is_redis_pys_own_with_jittered_backoff(client: RedisClient) -> None:
    retry = client.retry
    assert isinstance(retry, Retry)
    assert isinstance(retry._backoff, ExponentialWithJitterBackoff)
    assert set(retry._supported_errors) == {rex.ConnectionError, rex.TimeoutError}
    assert retry.get_retries() == 1


async def test_connection_and_timeout_errors_are_retried(make_client: ClientFactory) -> None:
    connection_class, attempts = flaky_connection(
        [rex.ConnectionError("reset"), rex.TimeoutError("slow")]
    )
    flaky = await make_client(retries=3, connection_class=connection_class)
    with flaky.guard("test.set"):
        await flaky.redis.set(MARKER, b"1")
    assert attempts[0] == 3
    assert await flaky.redis.get(MARKER) == b"1"


async def test_retries_stop_after_the_configured_count(make_client: ClientFactory) -> None:
    connection_class, attempts = flaky_connection([rex.ConnectionError("x")] * 5)
    flaky = await make_client(retries=2, connection_class=connection_class)
    with pytest.raises(Unavailable), flaky.guard("test.set"):
        await flaky.redis.set(MARKER, b"1")
    assert attempts[0] == 3


async def test_other_errors_are_not_retried(make_client: ClientFactory) -> None:
    connection_class, attempts = flaky_connection([rex.ResponseError("ERR boom")])
    flaky = await make_client(retries=3, connection_class=connection_class)
    with pytest.raises(ChatkeepError) as caught, flaky.guard("test.set"):
        await flaky.redis.set(MARKER, b"1")
    assert type(caught.value) is ChatkeepError
    assert attempts[0] == 1


async def test_a_command_error_is_not_reported_as_an_outage(client: RedisClient) -> None:
    await client.redis.set("k", "v")
    with pytest.raises(ChatkeepError) as caught, client.guard("test.lpush"):
        await client.redis.lpush("k", "x")
    assert not isinstance(caught.value, Unavailable)
    assert isinstance(caught.value.__cause__, rex.ResponseError)
    assert "test.lpush" in str(caught.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (rex.ConnectionError("refused"), Unavailable),
        (rex.TimeoutError("slow"), Unavailable),
        (rex.BusyLoadingError("loading"), Unavailable),
        (rex.ReadOnlyError("replica"), Unavailable),
        (rex.OutOfMemoryError("oom"), Unavailable),
        (OSError("network unreachable"), Unavailable),
        (rex.AuthenticationError("wrong password"), ConfigurationError),
        (rex.NoPermissionError("acl"), ConfigurationError),
        (rex.ResponseError("WRONGTYPE"), ChatkeepError),
        (rex.DataError("bad"), ChatkeepError),
    ],
)
def test_errors_are_translated(error: Exception, expected: type[ChatkeepError]) -> None:
    translated = translate_error(error, "op.name")
    assert type(translated) is expected
    assert "op.name" in str(translated)


def test_credentials_error_names_the_field() -> None:
    translated = translate_error(rex.AuthenticationError("x"), "ping")
    assert isinstance(translated, ConfigurationError)
    assert translated.field == "redis_url"


def test_from_settings_takes_prefix_cluster_mode_and_url(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, redis_key_prefix="tenant", redis_cluster_mode=True)
    made = RedisClient.from_settings(settings)
    assert made.keys.prefix == "tenant:"
    assert made.keys.cluster_mode
    other = RedisClient.from_settings(settings, url="redis://127.0.0.1:1/0")
    assert "127.0.0.1:1" in repr(other)


def test_from_settings_without_a_url_is_a_configuration_error(
    cli_env: Callable[..., dict[str, str]], tmp_path: Any
) -> None:
    cli_env()
    with pytest.raises(ConfigurationError) as caught:
        RedisClient.from_settings(Settings(data_dir=tmp_path))
    assert caught.value.field == "redis_url"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("socket_timeout", 0),
        ("connect_timeout", -1),
        ("retries", 21),
        ("max_connections", 0),
        ("health_check_interval", -1),
        ("subscription_queue_size", 0),
        ("backoff_cap", "x"),
    ],
)
def test_bad_options_are_refused(option: str, value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        RedisClient("redis://127.0.0.1:6379/0", **{option: value})
    assert caught.value.field == option


def test_non_redis_url_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RedisClient("postgresql://x@y/z")
    assert caught.value.field == "redis_url"


def test_valkey_scheme_is_accepted() -> None:
    assert "redis://" in repr(RedisClient("valkey://127.0.0.1:6379/0"))


def test_repr_hides_the_password() -> None:
    made = RedisClient("redis://:s3cret-pw@127.0.0.1:6379/0")
    assert "s3cret-pw" not in repr(made)
    assert "***" in repr(made)


async def test_pubsub_across_two_clients(make_client: ClientFactory) -> None:
    listener = await make_client()
    sender = await make_client()
    async with await listener.subscribe("chan:a", "chan:b") as sub:
        assert sub.channels == {"chan:a", "chan:b"}
        assert listener.pubsub_connected
        assert await sender.publish("chan:b", b"hello") == 1
        async with asyncio.timeout(5):
            item = await sub.get()
        assert item == PubSubMessage("chan:b", b"hello")


async def test_subscriptions_share_the_connection_and_release_channels(
    make_client: ClientFactory,
) -> None:
    listener = await make_client()
    sender = await make_client()
    first = await listener.subscribe("shared")
    second = await listener.subscribe("shared", "own")
    # One connection: Redis counts one subscriber however many subscriptions share it.
    assert await sender.publish("shared", b"1") == 1
    async with asyncio.timeout(5):
        assert await first.get() == PubSubMessage("shared", b"1")
        assert await second.get() == PubSubMessage("shared", b"1")
    await first.aclose()
    assert first.closed
    assert await sender.publish("shared", b"2") == 1
    async with asyncio.timeout(5):
        assert await second.get() == PubSubMessage("shared", b"2")
    await second.remove("shared", "own")
    assert second.channels == frozenset()
    assert await sender.publish("shared", b"3") == 0
    await second.add("own")
    assert await sender.publish("own", b"4") == 1
    await second.aclose()


async def test_iteration_ends_when_the_subscription_closes(client: RedisClient) -> None:
    sub = await client.subscribe("c")
    await client.publish("c", b"x")
    received: list[Any] = []

    async def consume() -> None:
        async for item in sub:
            received.append(item)
            await sub.aclose()

    async with asyncio.timeout(5):
        await consume()
    assert received == [PubSubMessage("c", b"x")]
    assert await sub.get() is None
    with pytest.raises(InvalidInput):
        await sub.add("d")


async def test_subscribing_with_redis_down_raises_unavailable(
    make_client: ClientFactory, dead_url: str
) -> None:
    dead = await make_client(dead_url)
    with pytest.raises(Unavailable):
        await dead.subscribe("c")
    assert not dead.pubsub_connected


async def test_subscribe_needs_a_channel(client: RedisClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        await client.subscribe()
    assert caught.value.field == "channels"
    with pytest.raises(InvalidInput):
        await client.subscribe("")


async def test_a_subscriber_that_falls_behind_gets_a_gap(make_client: ClientFactory) -> None:
    listener = await make_client(subscription_queue_size=3)
    sub = await listener.subscribe("busy")
    for n in range(10):
        await listener.publish("busy", str(n).encode())
    await listener.publish("busy", b"last")
    items: list[Any] = []
    async with asyncio.timeout(5):
        while PubSubMessage("busy", b"last") not in items:
            items.append(await sub.get())
    assert len(items) < 11
    assert isinstance(items[0], SubscriptionGap)
    assert items[0].reason == "overflow"
    assert items[0].channels == {"busy"}
    await sub.aclose()


async def test_idle_pubsub_connection_is_kept_alive_by_pings(make_client: ClientFactory) -> None:
    listener = await make_client(pubsub_ping_interval=0.1)
    sub = await listener.subscribe("quiet")
    await asyncio.sleep(0.6)
    assert listener.pubsub_connected
    assert listener.pubsub_reconnects == 0
    await listener.publish("quiet", b"still here")
    async with asyncio.timeout(5):
        assert await sub.get() == PubSubMessage("quiet", b"still here")


async def test_closed_client_refuses_new_subscriptions(make_client: ClientFactory) -> None:
    made = await make_client()
    sub = await made.subscribe("c")
    await made.aclose()
    await made.aclose()  # idempotent
    assert sub.closed
    with pytest.raises(Unavailable):
        await made.subscribe("c")


async def test_client_is_an_async_context_manager(redis_url: str) -> None:
    async with RedisClient(redis_url) as made:
        assert await made.ping() >= 0
    with pytest.raises(Unavailable):
        await made.subscribe("x")
