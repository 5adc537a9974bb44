"""The pub/sub hub: shared connection, subscriptions, overflow gaps, pings, closing.

Reconnection after a real outage is exercised through the event bus, in
``tests/realtime/test_events.py`` (``test_a_real_restart_...``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import chatkeep.realtime.client
import chatkeep.realtime.pubsub
from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import (
    ChannelSubscription,
    PubSubMessage,
    RedisClient,
    SubscriptionGap,
)
from tests.realtime.conftest import ClientFactory, wait_until


def test_the_hub_names_are_importable_from_their_old_home() -> None:
    # Code written before the hub had a module of its own imports these from the client.
    for name in ("ChannelSubscription", "PubSubMessage", "SubscriptionGap"):
        assert name in chatkeep.realtime.client.__all__
        assert getattr(chatkeep.realtime.client, name) is getattr(chatkeep.realtime.pubsub, name)
    assert chatkeep.realtime.pubsub.ChannelSubscription is ChannelSubscription


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


async def test_get_nowait_never_waits_and_keeps_the_end_marker(client: RedisClient) -> None:
    sub = await client.subscribe("chan:nowait")
    assert sub.get_nowait() is None
    await client.publish("chan:nowait", b"x")
    got: list[object] = []

    def arrived() -> bool:
        got.append(sub.get_nowait())
        return got[-1] is not None

    await wait_until(arrived)
    item = got[-1]
    assert isinstance(item, PubSubMessage)
    assert item.data == b"x"
    await sub.aclose()
    assert sub.get_nowait() is None
    assert await sub.get() is None
