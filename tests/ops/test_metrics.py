"""Prometheus metrics against a real pool and a real Redis; the `chatkeep metrics` command."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from chatkeep.config import Settings
from chatkeep.errors import InvalidInput, RateLimited, Unavailable
from chatkeep.ops.metrics import FAMILIES, ChatkeepMetrics
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from tests.ops.cli import invoke


@dataclass(frozen=True)
class Failure:
    host: str
    role: str
    reason: str
    count: int


def samples(metrics: ChatkeepMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_asyncio.fixture(loop_scope="session")
async def stores(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> AsyncIterator[tuple[Database, RedisClient]]:
    async with (
        Database(make_settings(), dsn=database_url) as db,
        RedisClient(redis_url, retries=0) as redis,
    ):
        yield db, redis


async def test_every_family_is_exposed_with_real_values(
    stores: tuple[Database, RedisClient],
) -> None:
    db, redis = stores
    failures = [Failure("db.internal", "chatapp_app", "password rejected", 3)]
    metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=lambda: failures)
    for _ in range(3):
        assert await db.fetchval("metrics.probe", "SELECT 1") == 1
    with pytest.raises(InvalidInput):  # division by zero: a data error
        await db.fetchval("metrics.broken", "SELECT 1/0")
    with metrics.time_acquire():
        await asyncio.sleep(0.002)
    with metrics.time_redis("PING"):
        await redis.ping()
    metrics.published(receivers=2)
    metrics.published(receivers=0)
    metrics.received(3)
    metrics.gap("reconnected")
    metrics.record_error(RateLimited("too fast", retry_after=1, action="send"))
    metrics.record_error(RateLimited("account is locked", retry_after=9, action="login"))
    metrics.record_error(RateLimited("no action said", retry_after=1))
    metrics.record_error(ValueError("not ours"))  # ignored
    await metrics.sample()

    found = samples(metrics)
    names = {name for name, _labels in found}
    for family in FAMILIES:
        assert any(name.startswith(family) for name in names), family

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert value("chatkeep_db_operations_total", operation="metrics.probe") == 3
    assert value("chatkeep_db_operation_seconds_count", operation="metrics.probe") == 3
    assert value("chatkeep_db_operation_seconds_sum", operation="metrics.probe") > 0
    assert value("chatkeep_db_operation_errors_total", operation="metrics.broken") == 1
    assert value("chatkeep_db_operation_max_seconds", operation="metrics.probe") > 0
    size = value("chatkeep_db_pool_connections", state="size")
    assert size == value("chatkeep_db_pool_connections", state="idle") + value(
        "chatkeep_db_pool_connections", state="busy"
    )
    assert size >= 1
    assert value("chatkeep_db_pool_connections", state="max") == db.pool.get_max_size()
    assert value("chatkeep_db_pool_waiting") == 0
    assert value("chatkeep_db_pool_acquire_seconds_count") == 1
    assert value("chatkeep_db_pool_acquire_seconds_sum") >= 0.002
    assert (
        value(
            "chatkeep_db_connection_failures_total",
            host="db.internal",
            role="chatapp_app",
            reason="password rejected",
        )
        == 3
    )
    assert value("chatkeep_redis_command_seconds_count", command="PING") == 1
    assert value("chatkeep_redis_up") == 1
    assert value("chatkeep_redis_latency_seconds") > 0
    assert value("chatkeep_db_latency_seconds") > 0
    assert value("chatkeep_redis_pubsub_reconnects_total") == redis.pubsub_reconnects
    assert value("chatkeep_pubsub_published_total") == 2
    assert value("chatkeep_pubsub_deliveries_total") == 2
    assert value("chatkeep_pubsub_received_total") == 3
    assert value("chatkeep_pubsub_gaps_total", reason="reconnected") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="send") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="login") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="other") == 1
    assert value("chatkeep_errors_total", type="RateLimited") == 3


async def test_a_down_redis_and_a_closed_pool(make_settings: Callable[..., Settings]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    async with RedisClient(dead, retries=0, connect_timeout=0.5, socket_timeout=0.5) as redis:
        db = Database(make_settings(), dsn="postgresql://nobody@127.0.0.1:1/none")
        metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
        await metrics.sample()
        found = samples(metrics)
    assert found[("chatkeep_redis_up", ())] == 0
    assert ("chatkeep_db_pool_connections", (("state", "size"),)) not in found
    assert found[("chatkeep_errors_total", (("type", "Unavailable"),))] == 1


def test_hooks_count_errors_and_attach_sources() -> None:
    metrics = ChatkeepMetrics(connection_failures=list)
    with pytest.raises(Unavailable), metrics.count_errors():
        raise Unavailable("redis down")
    with pytest.raises(Unavailable), metrics.time_redis("GET"):
        raise Unavailable("redis down")
    found = samples(metrics)
    assert found[("chatkeep_errors_total", (("type", "Unavailable"),))] == 2
    assert found[("chatkeep_redis_command_seconds_count", (("command", "GET"),))] == 1
    assert found[("chatkeep_redis_pubsub_reconnects_total", ())] == 0
    metrics.attach()  # nothing to attach: still no sources
    assert metrics.database is None
    assert metrics.redis is None


def test_two_registries_never_clash() -> None:
    first, second = ChatkeepMetrics(connection_failures=list), ChatkeepMetrics()
    first.rate_limited("send")
    assert b'action="send"' in first.exposition()
    assert b'action="send"' not in second.exposition()


def test_serve_answers_scrapes_and_reports_bad_ports() -> None:
    metrics = ChatkeepMetrics(connection_failures=list)
    metrics.received()
    server = metrics.serve(0)
    try:
        port = server.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
        assert "chatkeep_pubsub_received_total 1.0" in body
        with pytest.raises(Unavailable, match="cannot serve metrics"):
            metrics.serve(port)  # already taken
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(InvalidInput, match="port"):
        metrics.serve(70000)


async def test_cli_metrics_once_and_serving_for_a_while(
    database_url: str, redis_url: str, cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = cli_env(REDIS_URL=redis_url, CHATKEEP_DATA_DIR=str(tmp_path))
    code, output, _ = await invoke(["metrics", "--once", "--database-url", database_url], env)
    assert code == 0, output
    assert "chatkeep_redis_up 1.0" in output
    assert "chatkeep_db_pool_connections" in output

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serving = asyncio.create_task(
        invoke(
            [
                "metrics",
                "--port",
                str(port),
                "--for",
                "4",
                "--interval",
                "0.5",
                "--database-url",
                database_url,
            ],
            env,
        )
    )
    body = ""
    for _ in range(60):  # bounded: the command stops by itself after 4 s
        await asyncio.sleep(0.1)
        try:
            body = await asyncio.to_thread(_scrape, port)
            break
        except OSError:
            continue
    code, output, _ = await asyncio.wait_for(serving, timeout=30)
    assert code == 0, output
    assert f"serving http://127.0.0.1:{port}/metrics" in output
    assert "chatkeep_redis_up 1.0" in body
    assert "chatkeep_db_latency_seconds" in body


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        return str(answer.read().decode())
