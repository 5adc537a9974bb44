"""Sharded pub/sub on a Redis Cluster: one connection per shard, gaps after a move.

On a cluster, classic ``PUBLISH`` is broadcast over the cluster bus to every node, so every
message costs every node; ``SPUBLISH`` (Redis 7, Valkey 7.2+) delivers a message only on the
shard that owns its channel's slot, and chatkeep's room channels are hash-tagged
(``room:{<id>}:events``), so a room's events stay on its room's shard. This module's hub
(``_ShardedPubSubHub``) is what :class:`~chatkeep.realtime.client.RedisClient` uses
instead of the classic one when its URL names a cluster:

* **One connection per shard node**, not per room: the channels owned by a node share one
  ``SSUBSCRIBE`` connection to it (a *link*), read by one task per link.
* **Placement** by the cluster's slot map (from a topology client of the hub's own, so a
  refresh here never races the command client's), and one retry after refreshing it when
  a node refuses (``MOVED``) or cannot be reached.
* **Healing**: a link that fails (its node crashed, a timeout, an error reply such as
  ``MOVED``), or a channel the server unsubscribes by itself (Redis sends ``sunsubscribe``
  when its slot migrates away, or its master becomes a replica), *orphans* its channels.
  A healer task refreshes the slot map and places them again, with jittered backoff, until
  every orphan is confirmed by its new owner (after a failover: the promoted replica), and
  only then puts a :class:`~chatkeep.realtime.pubsub.SubscriptionGap` (``"reconnected"``)
  into each subscription that holds one of them, naming those channels. As with the classic
  hub, the notice follows the resubscription, so a catch-up started on it misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.backoff import AbstractBackoff

from chatkeep.errors import Unavailable
from chatkeep.realtime.errors import DRIVER_ERRORS, translate_error
from chatkeep.realtime.pubsub import (
    ChannelSubscription,
    PubSubMessage,
    SubscriptionGap,
    _forget_channels,
    _stopped_answering,
)

__all__: list[str] = []

logger = logging.getLogger("chatkeep.realtime")

NodeClientFactory = Callable[[str, int], aioredis.Redis]
"""Makes the (retry-less) client of one shard link, given the node's host and port."""


class _Link:
    """One ``SSUBSCRIBE`` connection to one cluster node, and the channels it carries."""

    __slots__ = ("channels", "client", "name", "pubsub", "reader", "waiters")

    def __init__(self, name: str, client: aioredis.Redis, pubsub: PubSub) -> None:
        self.name = name
        self.client = client
        self.pubsub = pubsub
        self.channels: set[str] = set()
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.reader: asyncio.Task[None] | None = None

    def fail_waiters(self) -> None:
        for futures in self.waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(rex.ConnectionError(f"shard link {self.name} lost"))
        self.waiters.clear()

    async def close(self) -> None:
        with contextlib.suppress(rex.RedisError, OSError):
            await asyncio.shield(self.pubsub.aclose())  # type: ignore[no-untyped-call]
        with contextlib.suppress(rex.RedisError, OSError):
            # The pool is the link's own: it goes with the link.
            await asyncio.shield(self.client.aclose(close_connection_pool=True))


class _ShardedPubSubHub:
    """The sharded pub/sub of a cluster client, shared by every subscription.

    Made and closed by :class:`~chatkeep.realtime.client.RedisClient`.

    Args:
        topology: a cluster client used only to read the slot map (owned by the hub:
            :meth:`aclose` closes it).
        make_node_client: makes the client of a link to one node (no retries: a failure
            must reach the link's reader at once).
        backoff: the delay between healing attempts.
        confirm_timeout: seconds a node has to confirm an ``SSUBSCRIBE``, and to answer a
            ping on an idle link.
        ping_interval: idle seconds after which a link is pinged.
    """

    def __init__(
        self,
        topology: aioredis.RedisCluster,
        make_node_client: NodeClientFactory,
        *,
        backoff: AbstractBackoff,
        confirm_timeout: float,
        ping_interval: float,
    ) -> None:
        self._topology = topology
        self._make_node_client = make_node_client
        self._backoff = backoff
        self._confirm_timeout = confirm_timeout
        self._ping_interval = ping_interval
        self._subs: dict[str, set[ChannelSubscription]] = {}
        self._links: dict[str, _Link] = {}
        self._route: dict[str, str] = {}
        self._orphans: set[str] = set()
        self._gap_channels: set[str] = set()
        self._gap_since: float | None = None
        self._healer: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closing = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether every subscribed channel is carried by a live link right now."""
        return bool(self._links) and not self._orphans

    @property
    def links(self) -> dict[str, frozenset[str]]:
        """Each live link's node name (``host:port``) and the channels it carries."""
        return {name: frozenset(link.channels) for name, link in self._links.items()}

    # -- subscriptions -----------------------------------------------------------------------

    async def attach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None:
        async with self._lock:
            new = [name for name in channels if name not in self._subs]
            for name in channels:
                self._subs.setdefault(name, set()).add(sub)
            sub._channels.update(channels)
            try:
                if new:
                    await self._subscribe(new)
            except BaseException:
                self._forget(sub, channels)
                raise

    async def detach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None:
        async with self._lock:
            by_link: dict[str, list[str]] = {}
            for name in self._forget(sub, channels):
                self._orphans.discard(name)
                node = self._route.pop(name, None)
                link = self._links.get(node) if node is not None else None
                if link is not None:
                    link.channels.discard(name)
                    by_link.setdefault(link.name, []).append(name)
            for node, names in by_link.items():
                try:
                    for same_slot in _by_slot(self._topology, names):
                        await self._links[node].pubsub.sunsubscribe(*same_slot)
                except (rex.RedisError, OSError):
                    # Its channels are forgotten: a lost SUNSUBSCRIBE costs only stray
                    # messages that nobody receives.
                    logger.debug("sharded unsubscribe failed; ignored", exc_info=True)

    def _forget(self, sub: ChannelSubscription, channels: Iterable[str]) -> list[str]:
        return _forget_channels(self._subs, sub, channels)

    async def _subscribe(self, channels: list[str]) -> None:
        """Place ``channels``; once more after a topology refresh if a node refused."""
        try:
            try:
                await self._place(channels)
            except (*DRIVER_ERRORS, TimeoutError):
                logger.debug("sharded subscribe failed; refreshing the slot map", exc_info=True)
                await self._refresh()
                await self._place(channels)
        except DRIVER_ERRORS as exc:
            raise translate_error(exc, "pubsub.subscribe") from exc
        except TimeoutError as exc:
            raise Unavailable("redis did not confirm the subscription in time") from exc

    async def _refresh(self) -> None:
        await self._topology.initialize()
        await self._topology.nodes_manager.initialize()

    async def _place(self, channels: list[str]) -> None:
        """``SSUBSCRIBE`` each channel on the node owning its slot; wait for confirmation."""
        await self._topology.initialize()
        groups: dict[str, tuple[ClusterNode, list[str]]] = {}
        for name in channels:
            node = self._topology.get_node_from_key(name)
            if node is None:  # pragma: no cover - get_node_from_key raises instead
                raise rex.SlotNotCoveredError(f"no node owns the slot of {name}")
            groups.setdefault(node.name, (node, []))[1].append(name)
        for node, names in groups.values():
            link = await self._link(node)
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[None]] = []
            for name in names:
                future: asyncio.Future[None] = loop.create_future()
                link.waiters.setdefault(name, []).append(future)
                futures.append(future)
            try:
                # One SSUBSCRIBE per slot: the server refuses channels of two (CROSSSLOT).
                for same_slot in _by_slot(self._topology, names):
                    await link.pubsub.ssubscribe(*same_slot)
                async with asyncio.timeout(self._confirm_timeout):
                    await asyncio.gather(*futures)
            finally:
                for name, future in zip(names, futures, strict=True):
                    if not future.done():
                        future.cancel()
                    pending = link.waiters.get(name, [])
                    if future in pending:
                        pending.remove(future)
                    if not pending:
                        link.waiters.pop(name, None)
            for name in names:
                self._route[name] = link.name
                link.channels.add(name)
            self._orphans.difference_update(names)

    async def _link(self, node: ClusterNode) -> _Link:
        link = self._links.get(node.name)
        if link is not None:
            return link
        client = self._make_node_client(node.host, int(node.port))
        pubsub = client.pubsub()
        link = _Link(node.name, client, pubsub)
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await link.close()
            raise
        self._links[node.name] = link
        link.reader = asyncio.create_task(self._read(link), name=f"chatkeep-shard-{node.name}")
        return link

    # -- reading and healing ---------------------------------------------------------------

    async def _read(self, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        ping_sent = False
        try:
            while True:
                response = await link.pubsub.get_message(timeout=min(1.0, self._ping_interval))
                now = loop.time()
                if response is not None:
                    last_heard, ping_sent = now, False
                    self._handle(link, response)
                elif now - last_heard > self._ping_interval + self._confirm_timeout:
                    _stopped_answering()
                elif now - last_heard > self._ping_interval and not ping_sent:
                    await link.pubsub.ping()
                    ping_sent = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure ends the link; the healer recovers
            self._lost(link, exc)

    def _handle(self, link: _Link, response: dict[str, Any]) -> None:
        kind = response.get("type")
        channel = _text(response.get("channel"))
        if kind == "smessage":
            data = response.get("data")
            message = PubSubMessage(channel, data if isinstance(data, bytes) else b"")
            for sub in tuple(self._subs.get(channel, ())):
                sub._put(message)
        elif kind == "ssubscribe":
            for future in link.waiters.pop(channel, []):
                if not future.done():
                    future.set_result(None)
        elif kind == "sunsubscribe" and channel in link.channels:
            # Not ours (detach forgets a channel before unsubscribing it): the server
            # dropped it, its slot having moved to another node.
            logger.info("redis moved a shard channel away; subscribing it again")
            link.channels.discard(channel)
            self._route.pop(channel, None)
            self._orphan([channel])

    def _lost(self, link: _Link, exc: BaseException) -> None:
        if self._closing or self._links.get(link.name) is not link:
            return
        logger.warning(
            "sharded pub/sub link to %s lost (%s); subscribing its channels again",
            link.name,
            type(exc).__name__,
        )
        del self._links[link.name]
        link.fail_waiters()
        orphans = list(link.channels)
        link.channels.clear()
        for name in orphans:
            self._route.pop(name, None)
        closer = asyncio.create_task(link.close())
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        self._orphan(orphans)

    def _orphan(self, channels: list[str]) -> None:
        live = [name for name in channels if name in self._subs]
        if not live:
            return
        if self._gap_since is None:
            self._gap_since = time.time()
        self._orphans.update(live)
        self._gap_channels.update(live)
        if self._healer is None or self._healer.done():
            self._healer = asyncio.create_task(self._heal(), name="chatkeep-shard-healer")

    async def _heal(self) -> None:
        failures = 0
        while not self._closing:
            async with self._lock:
                self._orphans.intersection_update(self._subs)
                orphans = sorted(self._orphans)
                if not orphans:
                    self._announce_gap()
                    return
                try:
                    await self._refresh()
                    await self._place(orphans)
                except (*DRIVER_ERRORS, TimeoutError) as exc:
                    failures += 1
                    logger.debug("shard healing attempt %d failed: %r", failures, exc)
                else:
                    continue
            await asyncio.sleep(self._backoff.compute(failures))

    def _announce_gap(self) -> None:
        since, self._gap_since = self._gap_since, None
        channels, self._gap_channels = self._gap_channels, set()
        if since is None:
            return
        self.reconnects += 1
        logger.info("sharded pub/sub healed; subscribers told to catch up")
        notified: set[int] = set()
        for name in channels:
            for sub in tuple(self._subs.get(name, ())):
                if id(sub) in notified:
                    continue
                notified.add(id(sub))
                concerned = sub.channels & channels
                sub._put(SubscriptionGap(frozenset(concerned), "reconnected", since))

    async def aclose(self) -> None:
        self._closing = True
        tasks = [t for t in (self._healer,) if t is not None]
        tasks += [link.reader for link in self._links.values() if link.reader is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()
        for closer in list(self._closers):
            with contextlib.suppress(asyncio.CancelledError):
                await closer
        for holders in list(self._subs.values()):
            for sub in list(holders):
                sub._closed = True
                sub._put(None)
        self._subs.clear()
        with contextlib.suppress(rex.RedisError, OSError):
            await asyncio.shield(self._topology.aclose())


def _by_slot(topology: aioredis.RedisCluster, channels: list[str]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name in channels:
        groups.setdefault(topology.keyslot(name), []).append(name)
    return list(groups.values())


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""
