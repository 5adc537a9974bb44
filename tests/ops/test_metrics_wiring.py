"""ChatKeep(metrics=...) feeds the hook-driven families from real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable

import pytest

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    RateLimited,
    Settings,
    Unavailable,
)
from chatkeep.ops.metrics import ChatkeepMetrics
from chatkeep.realtime import MessageCreated, RateLimit, RedisClient, RoomGap
from tests.ops.test_metrics import samples

PASSWORD = "correct horse"


def value(metrics: ChatkeepMetrics, name: str, **labels: str) -> float:
    """One sample of a scrape (0 when the labelled child does not exist yet)."""
    return samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


def redis_command_count(metrics: ChatkeepMetrics) -> float:
    return sum(
        v
        for (name, _labels), v in samples(metrics).items()
        if name == "chatkeep_redis_command_seconds_count"
    )


async def test_facade_flows_feed_every_hook(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    metrics = ChatkeepMetrics()
    settings = make_settings()
    limit = RateLimit(limit=2, period=60.0, burst=2)
    async with ChatKeep.connect(
        settings, node_id="node-m", send_limit=limit, bcrypt_rounds=10, metrics=metrics
    ) as chat:
        assert chat.metrics is metrics
        assert (metrics.database, metrics.redis) == (chat.db, chat.redis)
        alice = await chat.register(
            CreateUserDto(email="alice@example.org", username="alice", password=PASSWORD)
        )
        room = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
        async with await chat.subscribe(room.id) as sub:
            await chat.send_message(room.id, alice.id, "one")
            async with asyncio.timeout(5):
                event = await sub.get()
            assert isinstance(event, MessageCreated)
            await chat.send_message(room.id, alice.id, "two")
            with pytest.raises(RateLimited):
                await chat.send_message(room.id, alice.id, "three")
            with pytest.raises(InvalidInput):
                await chat.send_message(room.id, alice.id, "")

    assert value(metrics, "chatkeep_db_pool_acquire_seconds_count") > 0
    assert value(metrics, "chatkeep_db_pool_waiting") == 0  # every waiter was served
    # The send limit is checked per batch of sends, in one pipeline (one batch per send here).
    assert (
        value(metrics, "chatkeep_redis_command_seconds_count", command="ratelimit.check_many") == 3
    )
    assert value(metrics, "chatkeep_redis_command_seconds_count", command="events.publish_many")
    assert redis_command_count(metrics) >= 5
    # Two sends were published, each to the one subscribed node.
    assert value(metrics, "chatkeep_pubsub_published_total") == 2
    assert value(metrics, "chatkeep_pubsub_deliveries_total") == 2
    assert value(metrics, "chatkeep_pubsub_received_total") == 1
    assert value(metrics, "chatkeep_rate_limit_rejections_total", action="send") == 1
    assert value(metrics, "chatkeep_errors_total", type="RateLimited") == 1
    assert value(metrics, "chatkeep_errors_total", type="InvalidInput") == 1
    # Every facade call is timed, the failed ones too (rate limited, empty text).
    assert value(metrics, "chatkeep_operation_seconds_count", operation="send_message") == 4
    assert value(metrics, "chatkeep_operation_seconds_count", operation="register") == 1
    # ...and the statements under them, apart from the wait for a connection.
    statements = {
        dict(labels)["operation"]
        for (name, labels), _ in samples(metrics).items()
        if name == "chatkeep_db_statement_seconds_count"
    }
    assert {"messages.send", "database.health"} - statements == {"database.health"}, statements


async def test_an_overflowing_subscription_counts_a_gap(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    metrics = ChatkeepMetrics()
    settings = make_settings()
    async with (
        ChatKeep.connect(settings, bcrypt_rounds=10) as owner,
        RedisClient(redis_url, subscription_queue_size=1) as tight,
    ):
        chat = ChatKeep(owner.db, tight, bcrypt_rounds=10, metrics=metrics)
        alice = await chat.register(
            CreateUserDto(email="alice@example.org", username="alice", password=PASSWORD)
        )
        room = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
        async with await chat.subscribe(room.id) as sub:
            for n in range(4):
                await chat.send_message(room.id, alice.id, f"m{n}")
            async with asyncio.timeout(5):
                while not isinstance(item := await sub.get(), RoomGap):
                    assert item is not None
        assert item.reason == "overflow"
    assert value(metrics, "chatkeep_pubsub_gaps_total", reason="overflow") == 1


async def test_without_metrics_nothing_is_hooked(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    settings = make_settings()
    async with ChatKeep.connect(settings, bcrypt_rounds=10) as chat:
        assert chat.metrics is None
        assert chat.db.acquire_timer is None
        assert chat.db.operation_observer is None
        assert chat.redis.command_timer is None
        assert chat.events.on_receive is None
        assert await chat.db.fetchval("wiring.probe", "SELECT 1") == 1


async def test_a_failed_redis_command_is_timed_and_counted_by_class() -> None:
    metrics = ChatkeepMetrics()
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with RedisClient(f"redis://127.0.0.1:{port}/0", retries=0) as down:
        down.command_timer = metrics.time_redis
        with pytest.raises(Unavailable):
            await down.ping()
    assert value(metrics, "chatkeep_redis_command_seconds_count", command="ping") == 1
    assert value(metrics, "chatkeep_errors_total", type="Unavailable") == 1


async def test_every_flow_counts_its_errors(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> None:
    metrics = ChatkeepMetrics()
    async with ChatKeep.connect(
        make_settings(), node_id="node-e", bcrypt_rounds=10, metrics=metrics
    ) as chat:
        alice = await chat.register(
            CreateUserDto(email="alice@example.org", username="alice", password=PASSWORD)
        )
        nowhere = uuid.uuid4()
        failing = [
            chat.mark_read(nowhere, alice.id),
            chat.history(nowhere, alice.id),
            chat.join(nowhere, alice.id),
            chat.edit_message(uuid.uuid4(), alice.id, "x"),
            chat.set_typing(nowhere, alice.id),
        ]
        for call in failing:
            with pytest.raises(NotFound):
                await call
        with pytest.raises(InvalidInput):
            await chat.unread_counts("not-a-uuid")  # type: ignore[arg-type]
    assert value(metrics, "chatkeep_errors_total", type="NotFound") == len(failing)
    assert value(metrics, "chatkeep_errors_total", type="InvalidInput") == 1
