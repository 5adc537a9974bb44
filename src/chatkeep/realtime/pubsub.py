"""Self-healing pub/sub: one shared connection, many subscriptions, gap notices.

Every :class:`~chatkeep.realtime.client.RedisClient` owns one hub (``_PubSubHub``): a
separate pub/sub connection shared by every :class:`ChannelSubscription` of that client,
read by one background task. When that connection drops, the task reconnects with
jittered exponential backoff, subscribes every channel again, and then puts a
:class:`SubscriptionGap` into each subscription: messages published while it was away are
lost (pub/sub does not queue), so the subscriber must catch up from the source of truth.
The gap is announced only *after* the channels are subscribed again, so a catch-up that
starts on the notice cannot miss a message published in between.

A subscriber that falls ``subscription_queue_size`` messages behind has its backlog
replaced by an ``"overflow"`` gap, and an idle connection is pinged so that a silently
dead link is noticed. Subscriptions are made by
:meth:`~chatkeep.realtime.client.RedisClient.subscribe`; redis-py errors reach callers
translated by :func:`~chatkeep.realtime.errors.translate_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NoReturn, Protocol, Self

from redis import exceptions as rex
from redis.asyncio.client import PubSub
from redis.backoff import AbstractBackoff

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime.errors import translate_error

__all__ = ["ChannelSubscription", "PubSubMessage", "SubscriptionGap"]

# The client's logger name, as before the hub had a module of its own, so existing log
# filters keep matching.
logger = logging.getLogger("chatkeep.realtime")


@dataclass(frozen=True, slots=True)
class PubSubMessage:
    """One message received on a subscribed channel."""

    channel: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SubscriptionGap:
    """Messages on ``channels`` may have been missed: catch up from the source of truth.

    Attributes:
        channels: the subscription's channels that the gap concerns.
        reason: ``"reconnected"`` after the pub/sub connection was lost and restored;
            ``"overflow"`` when the subscriber fell so far behind that its queue was
            dropped.
        since: wall-clock time (seconds since the epoch) when the gap began.
    """

    channels: frozenset[str]
    reason: Literal["reconnected", "overflow"]
    since: float


class _Hub(Protocol):
    """What a subscription needs of its hub.

    The classic one here, or the sharded one (``chatkeep.realtime.shards``) on a cluster.
    """

    async def attach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None: ...

    async def detach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None: ...


class ChannelSubscription:
    """A live subscription to some channels; iterate it for messages and gap notices.

    Made by :meth:`~chatkeep.realtime.client.RedisClient.subscribe`. Use it as an async
    context manager (or call :meth:`aclose`) so its channels are released::

        async with await client.subscribe("room:1:events") as sub:
            async for item in sub:
                if isinstance(item, SubscriptionGap):
                    ...  # catch up from PostgreSQL
                else:
                    handle(item.data)
    """

    def __init__(self, hub: _Hub, maxsize: int) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[PubSubMessage | SubscriptionGap | None] = asyncio.Queue(maxsize)
        self._channels: set[str] = set()
        self._closed = False

    @property
    def channels(self) -> frozenset[str]:
        """The channels this subscription listens to."""
        return frozenset(self._channels)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has run."""
        return self._closed

    async def add(self, *channels: str) -> None:
        """Listen to more channels; returns once Redis confirmed the subscription.

        Raises:
            Unavailable: Redis could not be reached (nothing was added).
        """
        self._check_open()
        await self._hub.attach(self, _channel_names(channels))

    async def remove(self, *channels: str) -> None:
        """Stop listening to ``channels`` (unknown ones are ignored)."""
        await self._hub.detach(self, _channel_names(channels))

    async def get(self) -> PubSubMessage | SubscriptionGap | None:
        """The next message or gap notice (waiting for it); ``None`` once closed.

        Bound the wait with ``asyncio.timeout`` if needed.
        """
        if self._closed and self._queue.empty():
            return None
        return await self._queue.get()

    def get_nowait(self) -> PubSubMessage | SubscriptionGap | None:
        """The next message or gap notice if one is queued, else ``None``; never waits."""
        if self._queue.empty():
            return None
        item = self._queue.get_nowait()
        if item is None and self._closed:
            self._queue.put_nowait(None)  # keep the end marker for get()
        return item

    def __aiter__(self) -> AsyncIterator[PubSubMessage | SubscriptionGap]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[PubSubMessage | SubscriptionGap]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item

    async def aclose(self) -> None:
        """Unsubscribe every channel and end iteration."""
        if self._closed:
            return
        self._closed = True
        await self._hub.detach(self, frozenset(self._channels))
        self._put(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput("subscription", "is closed")

    def _put(self, item: PubSubMessage | SubscriptionGap | None) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # A subscriber this far behind has lost messages either way: drop the backlog
            # and tell it to catch up, instead of growing without bound.
            while not self._queue.empty():
                self._queue.get_nowait()
            gap = SubscriptionGap(self.channels, "overflow", time.time())
            logger.warning("pub/sub subscriber fell behind; dropped its backlog")
            self._queue.put_nowait(gap)
            if item is None:
                self._queue.put_nowait(item)


def _channel_names(channels: Iterable[str]) -> frozenset[str]:
    names = frozenset(channels)
    if not names:
        raise InvalidInput("channels", "must name at least one channel")
    for name in names:
        if not isinstance(name, str) or not name or len(name) > 512:
            raise InvalidInput("channels", "each channel must be a string of 1 to 512 chars")
    return names


def _forget_channels(
    subs: dict[str, set[ChannelSubscription]],
    sub: ChannelSubscription,
    channels: Iterable[str],
) -> list[str]:
    """Drop ``sub`` from ``channels`` in a hub's registry; the channels nobody holds now.

    Both hubs (classic and sharded) keep ``subs`` (channel -> subscriptions) and
    unsubscribe from Redis the channels this returns.
    """
    gone: list[str] = []
    for name in channels:
        sub._channels.discard(name)
        holders = subs.get(name)
        if holders is None:
            continue
        holders.discard(sub)
        if not holders:
            del subs[name]
            gone.append(name)
    return gone


class _PubSubHub:
    """The one pub/sub connection of a client, shared by every subscription.

    Made and closed by :class:`~chatkeep.realtime.client.RedisClient`, which owns the
    connection pool behind it.

    Args:
        make_pubsub: returns a fresh, unconnected redis-py ``PubSub`` on the client's
            pub/sub pool (one without retries, so a failure reaches the reader at once).
        backoff: the delay between reconnect attempts.
        confirm_timeout: seconds Redis has to confirm a ``SUBSCRIBE``, and to answer a
            ping on an idle connection.
        ping_interval: idle seconds after which the connection is pinged.
    """

    def __init__(
        self,
        make_pubsub: Any,
        *,
        backoff: AbstractBackoff,
        confirm_timeout: float,
        ping_interval: float,
    ) -> None:
        self._make_pubsub = make_pubsub
        self._backoff = backoff
        self._confirm_timeout = confirm_timeout
        self._ping_interval = ping_interval
        self._subs: dict[str, set[ChannelSubscription]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._resubscribing: set[str] = set()
        self._gap_since: float | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing = False
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def attach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None:
        async with self._lock:
            new = [name for name in channels if name not in self._subs]
            for name in channels:
                self._subs.setdefault(name, set()).add(sub)
            sub._channels.update(channels)
            try:
                if new:
                    await self._subscribe_confirmed(new)
            except BaseException:
                self._forget(sub, channels)
                raise

    async def detach(self, sub: ChannelSubscription, channels: frozenset[str]) -> None:
        async with self._lock:
            gone = self._forget(sub, channels)
            if gone and self._pubsub is not None and self.connected:
                try:
                    await self._pubsub.unsubscribe(*gone)
                except (rex.RedisError, OSError):
                    # The reconnect path subscribes only registered channels, so a lost
                    # UNSUBSCRIBE costs nothing but stray messages that nobody receives.
                    logger.debug("pub/sub unsubscribe failed; ignored", exc_info=True)

    def _forget(self, sub: ChannelSubscription, channels: Iterable[str]) -> list[str]:
        return _forget_channels(self._subs, sub, channels)

    async def _subscribe_confirmed(self, channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        futures = []
        for name in channels:
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(name, []).append(future)
            futures.append(future)
        try:
            if self._pubsub is None:
                # Fresh, or the reader is between reconnect attempts: open now and subscribe
                # every registered channel (the new ones are registered already), so the
                # gap notice, if one is owed, still goes out once all are confirmed.
                self._pubsub = await self._open()
            else:
                await self._pubsub.subscribe(*channels)
            self._ensure_reader()
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.gather(*futures)
        except (rex.RedisError, OSError) as exc:
            raise translate_error(exc, "pubsub.subscribe") from exc
        except TimeoutError as exc:
            raise Unavailable("redis did not confirm the subscription in time") from exc
        finally:
            for name, future in zip(channels, futures, strict=True):
                if not future.done():
                    future.cancel()
                pending = self._waiters.get(name, [])
                if future in pending:
                    pending.remove(future)
                if not pending:
                    self._waiters.pop(name, None)

    async def _open(self) -> PubSub:
        pubsub: PubSub = self._make_pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
            if self._subs:
                self._resubscribing = set(self._subs)
                await pubsub.subscribe(*self._subs)
        except BaseException:
            self._resubscribing.clear()
            await _close_quietly(pubsub)
            raise
        if self._gap_since is not None:
            self.reconnects += 1
        self._connected.set()
        self._wake.set()  # a reader backing off must read the confirmations now
        return pubsub

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._run(), name="chatkeep-pubsub-reader")

    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        ping_sent = False
        while not self._closing:
            try:
                if self._pubsub is None:
                    async with self._lock:
                        if self._pubsub is None:
                            self._pubsub = await self._open()
                    last_heard, ping_sent = loop.time(), False
                    if not self._resubscribing:
                        self._announce_gap()
                pubsub = self._pubsub
                response = await pubsub.get_message(timeout=min(1.0, self._ping_interval))
                now = loop.time()
                if response is not None:
                    last_heard, ping_sent, failures = now, False, 0
                    self._handle(response)
                elif now - last_heard > self._ping_interval + self._confirm_timeout:
                    _stopped_answering()
                elif now - last_heard > self._ping_interval and not ping_sent:
                    await pubsub.ping()
                    ping_sent = True
            except asyncio.CancelledError:
                raise
            except (rex.RedisError, OSError) as exc:
                failures += 1
                await self._lost(exc)
                await self._pause(self._backoff.compute(failures))
            except Exception:  # a bug must not silently end every subscription
                logger.exception("pub/sub reader failed; reconnecting")
                failures += 1
                await self._lost(None)
                await self._pause(self._backoff.compute(failures))

    async def _pause(self, delay: float) -> None:
        """Back off for ``delay`` seconds, unless a subscriber reconnects first."""
        if self._pubsub is not None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    async def _lost(self, exc: BaseException | None) -> None:
        self._wake.clear()
        if self._gap_since is None:
            self._gap_since = time.time()
            logger.warning(
                "pub/sub connection lost (%s); reconnecting",
                type(exc).__name__ if exc else "error",
            )
        self._connected.clear()
        self._resubscribing.clear()
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _close_quietly(pubsub)

    def _handle(self, response: dict[str, Any]) -> None:
        kind = response.get("type")
        channel = _text(response.get("channel"))
        if kind == "message":
            data = response.get("data")
            message = PubSubMessage(channel, data if isinstance(data, bytes) else b"")
            for sub in tuple(self._subs.get(channel, ())):
                sub._put(message)
        elif kind == "subscribe":
            for future in self._waiters.pop(channel, []):
                if not future.done():
                    future.set_result(None)
            if self._resubscribing:
                self._resubscribing.discard(channel)
                if not self._resubscribing:
                    self._announce_gap()

    def _announce_gap(self) -> None:
        since, self._gap_since = self._gap_since, None
        if since is None:
            return
        logger.info("pub/sub reconnected; subscribers told to catch up")
        notified: set[int] = set()
        for holders in self._subs.values():
            for sub in holders:
                if id(sub) in notified:
                    continue
                notified.add(id(sub))
                sub._put(SubscriptionGap(sub.channels, "reconnected", since))

    async def aclose(self) -> None:
        self._closing = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _close_quietly(pubsub)
        for holders in list(self._subs.values()):
            for sub in list(holders):
                sub._closed = True
                sub._put(None)
        self._subs.clear()


def _stopped_answering() -> NoReturn:
    raise rex.TimeoutError("pub/sub connection stopped answering pings")


async def _close_quietly(pubsub: PubSub) -> None:
    with contextlib.suppress(rex.RedisError, OSError):
        await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""
