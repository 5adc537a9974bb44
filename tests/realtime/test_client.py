"""The Redis client: retries, error translation at ``guard``, health, options, lifecycle.

The pub/sub hub it owns is tested in ``test_pubsub.py``, the error mapping in
``test_errors.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis import exceptions as rex
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput, Unavailable
from chatkeep.realtime import RedisClient
from chatkeep.realtime.client import _driver_faults_as_connection_errors
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


@pytest.mark.standalone_only(
    "counts the attempts of one connection class; a cluster client takes none"
)
async def test_connection_and_timeout_errors_are_retried(make_client: ClientFactory) -> None:
    connection_class, attempts = flaky_connection(
        [rex.ConnectionError("reset"), rex.TimeoutError("slow")]
    )
    flaky = await make_client(retries=3, connection_class=connection_class)
    with flaky.guard("test.set"):
        await flaky.redis.set(MARKER, b"1")
    assert attempts[0] == 3
    assert await flaky.redis.get(MARKER) == b"1"


@pytest.mark.standalone_only(
    "counts the attempts of one connection class; a cluster client takes none"
)
async def test_retries_stop_after_the_configured_count(make_client: ClientFactory) -> None:
    connection_class, attempts = flaky_connection([rex.ConnectionError("x")] * 5)
    flaky = await make_client(retries=2, connection_class=connection_class)
    with pytest.raises(Unavailable), flaky.guard("test.set"):
        await flaky.redis.set(MARKER, b"1")
    assert attempts[0] == 3


@pytest.mark.standalone_only(
    "counts the attempts of one connection class; a cluster client takes none"
)
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


async def test_client_is_an_async_context_manager(redis_url: str) -> None:
    async with RedisClient(redis_url) as made:
        assert await made.ping() >= 0
    with pytest.raises(Unavailable):
        await made.subscribe("x")


async def test_a_fault_inside_redis_py_is_a_lost_connection() -> None:
    # The cluster client's state when a master is killed under a pipeline: a connection
    # whose socket is gone ('NoneType' object has no attribute 'writelines'). Its commands
    # did not complete, as with a dropped socket: a ConnectionError, which the guard turns
    # into Unavailable, never a raw AttributeError for the caller.
    closed = Connection()
    with pytest.raises(rex.ConnectionError, match="writelines") as caught:
        await _driver_faults_as_connection_errors(
            lambda: closed._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])
        )
    assert isinstance(caught.value.__cause__, AttributeError)

    async def ours() -> None:
        raise AttributeError("a bug of chatkeep's own stays a bug")

    with pytest.raises(AttributeError, match="own stays"):
        await _driver_faults_as_connection_errors(ours)
