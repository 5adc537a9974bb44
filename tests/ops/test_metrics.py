"""Prometheus metrics against a real pool and a real Redis; the `chatkeep metrics` command."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

import chatkeep
from chatkeep.config import Settings
from chatkeep.errors import InvalidInput, RateLimited, Unavailable
from chatkeep.ops.metrics import FAMILIES, REPLICA_FAMILIES, ChatkeepMetrics
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from tests.ops.cli import invoke
from tests.servers import PostgresServer, RedisServer, free_port, temporary_folder

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Failure:
    host: str
    role: str
    reason: str
    count: int


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def samples(metrics: ChatkeepMetrics) -> Samples:
    """Every sample of a scrape of ``metrics``, keyed by name and sorted labels."""
    return parse(metrics.exposition().decode())


def dead_redis_url() -> str:
    """A Redis URL on a port nothing listens on: connections are refused."""
    return f"redis://127.0.0.1:{free_port()}/0"


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
    with pytest.raises(InvalidInput), metrics.time_operation("send_message"):
        raise InvalidInput("text", "must not be empty")
    with metrics.time_operation("history"):
        await asyncio.sleep(0.002)
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
        # One series per replica: none here (tests/storage/test_replicas.py has them).
        if family not in REPLICA_FAMILIES:
            assert any(name.startswith(family) for name in names), family
    assert not {name for name in names if name.startswith(REPLICA_FAMILIES)}

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert value("chatkeep_build_info", version=chatkeep.__version__) == 1
    assert value("chatkeep_db_up") == 1
    assert value("chatkeep_redis_up") == 1
    assert 0 < value("chatkeep_db_ping_seconds") < 2
    assert 0 < value("chatkeep_redis_ping_seconds") < 2
    assert 0 <= value("chatkeep_probe_age_seconds") < 1
    # The hooks attach installed: every named operation lands in the histogram.
    assert value("chatkeep_db_statement_seconds_count", operation="metrics.probe") == 3
    assert value("chatkeep_db_statement_seconds_sum", operation="metrics.probe") > 0
    assert value("chatkeep_db_statement_seconds_bucket", operation="metrics.probe", le="+Inf") == 3
    assert value("chatkeep_db_statement_seconds_count", operation="database.health") == 1
    assert value("chatkeep_db_statement_errors_total", operation="metrics.broken") == 1
    assert value("chatkeep_db_statement_errors_total", operation="metrics.probe") == 0
    assert value("chatkeep_db_slow_statements_total", operation="metrics.probe") == 0
    assert value("chatkeep_operation_seconds_count", operation="send_message") == 1
    assert value("chatkeep_operation_seconds_sum", operation="history") >= 0.002
    assert value("chatkeep_operation_seconds_bucket", operation="history", le="0.001") == 0
    # Capacity apart from use: idle + busy are the open connections, within min..max.
    idle = value("chatkeep_db_pool_connections", state="idle")
    busy = value("chatkeep_db_pool_connections", state="busy")
    assert idle + busy == db.pool.get_size() >= 1
    assert busy == 0
    assert value("chatkeep_db_pool_max") == db.pool.get_max_size()
    assert value("chatkeep_db_pool_min") == db.pool.get_min_size()
    assert value("chatkeep_db_pool_waiting") == 0
    assert value("chatkeep_db_pool_long_waits_total") == 0  # no wait reached the threshold
    assert value("chatkeep_db_pool_acquire_seconds_count") == 5  # 3 probes, 1 broken, 1 health
    assert (
        value(
            "chatkeep_db_connection_failures_total",
            host="db.internal",
            role="chatapp_app",
            reason="password rejected",
        )
        == 3
    )
    assert value("chatkeep_redis_command_seconds_count", command="ping") == 2  # ours, the probe's
    assert value("chatkeep_redis_pubsub_reconnects_total") == redis.pubsub_reconnects
    assert value("chatkeep_pubsub_published_total") == 2
    assert value("chatkeep_pubsub_deliveries_total") == 2
    assert value("chatkeep_pubsub_received_total") == 3
    assert value("chatkeep_pubsub_gaps_total", reason="reconnected") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="send") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="login") == 1
    assert value("chatkeep_rate_limit_rejections_total", action="other") == 1
    assert value("chatkeep_errors_total", type="RateLimited") == 3
    # The 1/0 counts as a failed statement; errors_total counts what callers of chatkeep saw.
    assert value("chatkeep_errors_total", type="InvalidInput") == 1
    # Gone, because they were wrong: a max that only grows, a size/min/max mixed into use.
    assert "chatkeep_db_operation_max_seconds" not in names
    assert ("chatkeep_db_pool_connections", (("state", "size"),)) not in found


async def test_a_down_redis_and_a_closed_pool(make_settings: Callable[..., Settings]) -> None:
    async with RedisClient(dead_redis_url(), retries=0, connect_timeout=0.5) as redis:
        db = Database(make_settings(), dsn="postgresql://nobody@127.0.0.1:1/none")
        metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
        await metrics.sample()
        found = samples(metrics)
    assert found[("chatkeep_redis_up", ())] == 0
    assert found[("chatkeep_db_up", ())] == 0
    # No round trip to report for a store that did not answer, and no pool to describe.
    assert ("chatkeep_redis_ping_seconds", ()) not in found
    assert ("chatkeep_db_ping_seconds", ()) not in found
    assert ("chatkeep_db_pool_max", ()) not in found
    # Probes are not the application's errors.
    assert not any(name == "chatkeep_errors_total" for name, _ in found)


async def test_a_frozen_redis_is_down_after_the_probe_timeout(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        async with RedisClient(server.url, retries=0) as redis:
            metrics = ChatkeepMetrics(redis=redis, probe_timeout=0.3, connection_failures=list)
            await metrics.sample()
            assert samples(metrics)[("chatkeep_redis_up", ())] == 1
            server.freeze()
            try:
                started = time.monotonic()
                await metrics.sample()
                took = time.monotonic() - started
            finally:
                server.thaw()
    assert samples(metrics)[("chatkeep_redis_up", ())] == 0
    assert took < 2  # the probe timeout bounds it, not the client's socket timeout


async def test_a_scrape_from_another_thread_probes_on_the_loop_and_shares_the_answer(
    stores: tuple[Database, RedisClient],
) -> None:
    db, redis = stores
    metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
    # Nothing sampled yet: the scrape itself runs the probe on this (the stores') loop.
    scrapes = await asyncio.gather(*(asyncio.to_thread(metrics.exposition) for _ in range(5)))
    for text in scrapes:
        found = parse(text.decode())
        assert found[("chatkeep_db_up", ())] == 1
        assert found[("chatkeep_redis_up", ())] == 1
    # Five concurrent scrapes within cache_seconds: one probe of the database.
    assert db.stats["database.health"].calls == 1


async def test_a_scrape_on_the_loop_neither_blocks_it_nor_probes_behind_its_back(
    stores: tuple[Database, RedisClient],
) -> None:
    db, redis = stores
    metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
    first = samples(metrics)  # on the loop: it cannot wait, so it claims nothing
    assert ("chatkeep_db_up", ()) not in first
    assert ("chatkeep_probe_age_seconds", ()) not in first
    await asyncio.sleep(0.1)
    assert "database.health" not in db.stats  # and no task was left probing
    await metrics.sample()
    found = samples(metrics)
    assert found[("chatkeep_db_up", ())] == 1
    assert found[("chatkeep_redis_up", ())] == 1


async def test_a_stuck_loop_leaves_the_old_answer_and_its_age_shows(
    stores: tuple[Database, RedisClient],
) -> None:
    db, redis = stores
    metrics = ChatkeepMetrics(
        database=db, redis=redis, probe_timeout=0.2, cache_seconds=0.05, connection_failures=list
    )
    await metrics.sample()
    await asyncio.sleep(0.1)  # the answer is no longer fresh: the next scrape wants a probe
    scraped: list[bytes] = []
    scraper = threading.Thread(target=lambda: scraped.append(metrics.exposition()))
    scraper.start()
    time.sleep(1.6)  # noqa: ASYNC251 - on purpose: the loop is stuck longer than 0.2 s + 1 s
    scraper.join(timeout=10)
    found = parse(scraped[0].decode())
    assert found[("chatkeep_db_up", ())] == 1  # the old answer
    assert found[("chatkeep_probe_age_seconds", ())] >= 1.2


async def test_the_asgi_app_probes_before_it_renders(
    stores: tuple[Database, RedisClient],
) -> None:
    db, redis = stores
    metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
    app = metrics.asgi_app()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    await asyncio.gather(*(app(scope, receive, send) for _ in range(3)))  # share one probe
    await app(scope, receive, send)  # within cache_seconds: the same answer
    starts = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert starts == [200] * 4
    found = parse(sent[-1]["body"].decode())  # the last call's body comes last
    assert found[("chatkeep_db_up", ())] == 1
    assert found[("chatkeep_redis_up", ())] == 1
    assert db.stats["database.health"].calls == 1


async def test_only_the_stores_given_are_probed(stores: tuple[Database, RedisClient]) -> None:
    db, _redis = stores
    metrics = ChatkeepMetrics(database=db, connection_failures=list)
    await metrics.sample()
    found = samples(metrics)
    assert found[("chatkeep_db_up", ())] == 1
    assert ("chatkeep_redis_up", ()) not in found
    assert ("chatkeep_redis_ping_seconds", ()) not in found


def test_hooks_count_errors_and_options_are_checked() -> None:
    metrics = ChatkeepMetrics(connection_failures=list)
    with pytest.raises(Unavailable), metrics.count_errors():
        raise Unavailable("redis down")
    with pytest.raises(Unavailable), metrics.time_redis("GET"):
        raise Unavailable("redis down")
    found = samples(metrics)
    assert found[("chatkeep_errors_total", (("type", "Unavailable"),))] == 2
    assert found[("chatkeep_redis_command_seconds_count", (("command", "GET"),))] == 1
    assert found[("chatkeep_redis_pubsub_reconnects_total", ())] == 0
    assert ("chatkeep_redis_up", ()) not in found  # nothing to probe, nothing claimed
    metrics.attach()  # nothing to attach: still no sources
    assert metrics.database is None
    assert metrics.redis is None
    with pytest.raises(InvalidInput, match="probe_timeout"):
        ChatkeepMetrics(probe_timeout=0)
    with pytest.raises(InvalidInput, match="probe_timeout"):
        ChatkeepMetrics(probe_timeout=True)
    with pytest.raises(InvalidInput, match="cache_seconds"):
        ChatkeepMetrics(cache_seconds=-1.0)


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
        body = _scrape(port)
        assert "chatkeep_pubsub_received_total 1.0" in body
        with pytest.raises(Unavailable, match="cannot serve metrics"):
            metrics.serve(port)  # already taken
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(InvalidInput, match="port"):
        metrics.serve(70000)


async def test_cli_metrics_once(
    database_url: str, redis_url: str, cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = cli_env(REDIS_URL=redis_url, CHATKEEP_DATA_DIR=str(tmp_path))
    code, output, _ = await invoke(["metrics", "--once", "--database-url", database_url], env)
    assert code == 0, output
    assert "chatkeep_redis_up 1.0" in output
    assert "chatkeep_db_up 1.0" in output
    assert "chatkeep_db_pool_max" in output


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


async def scrape_when_up(port: int) -> Samples:
    """The first scrape of a server that is starting (bounded: about 30 s)."""
    for _ in range(300):
        try:
            return parse(await asyncio.to_thread(_scrape, port))
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing answered on port {port}")


async def test_a_live_chatkeep_metrics_follows_the_stores_within_one_scrape(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """The CLI server over real HTTP, on servers of the test's own: Redis stopped and
    started again, then PostgreSQL stopped; each change shows in the next scrape."""
    postgres = PostgresServer(temporary_folder("chatkeep-metrics-pg-"))
    try:
        await asyncio.to_thread(postgres.start)
        with RedisServer(tmp_path / "redis") as redis:
            env = cli_env(REDIS_URL=redis.url, CHATKEEP_DATA_DIR=str(tmp_path))
            port = free_port()
            args = ["metrics", "--port", str(port), "--for", "15"]
            serving = asyncio.create_task(invoke([*args, "--database-url", postgres.url()], env))
            up = await scrape_when_up(port)
            assert up[("chatkeep_redis_up", ())] == 1
            assert up[("chatkeep_db_up", ())] == 1

            redis.stop()
            await asyncio.sleep(1.1)  # past the 1 s a probe's answer is shared by scrapes
            found = parse(await asyncio.to_thread(_scrape, port))
            assert found[("chatkeep_redis_up", ())] == 0
            assert found[("chatkeep_db_up", ())] == 1

            redis.start()
            await asyncio.sleep(1.1)
            found = parse(await asyncio.to_thread(_scrape, port))
            assert found[("chatkeep_redis_up", ())] == 1

            await asyncio.to_thread(postgres.stop)
            await asyncio.sleep(1.1)
            found = parse(await asyncio.to_thread(_scrape, port))
            assert found[("chatkeep_db_up", ())] == 0
            assert found[("chatkeep_redis_up", ())] == 1
            code, output, _ = await asyncio.wait_for(serving, timeout=60)
    finally:
        postgres.close()
    assert code == 0, output
    assert f"serving http://127.0.0.1:{port}/metrics" in output


def test_the_default_port_is_outside_prometheus_allocations_and_documented() -> None:
    from chatkeep.ops.deploy import DEFAULT_PORT

    # 9090-9093: Prometheus's own; 9100 and up: exporters (the list's range is full).
    assert not 9090 <= DEFAULT_PORT <= 9093
    assert not 9100 <= DEFAULT_PORT <= 10100
    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/operations.md", "docs/cli.md"):
        text = (root / doc).read_text(encoding="utf-8")
        assert str(DEFAULT_PORT) in text, doc
        for old in ("9187", "9108"):
            assert f"--port {old}" not in text, (doc, old)
            assert f"default: {old}" not in text, (doc, old)
