"""Presence: online while any socket heartbeats, offline after a timeout or the last logout.

The model, key by key (all written by one pipelined heartbeat):

* ``presence:{userId}``: a string (the last heartbeat, Unix ms) with a TTL of one timeout.
  It exists exactly while the user is online; checking presence is one ``EXISTS``. The
  heartbeat writes it with ``SET ... GET``, so the previous value tells, for free, whether
  this heartbeat brought the user online.
* ``presence:deadlines``: a sorted set user -> deadline (Unix ms). A user leaves it in
  exactly one of two ways, each an atomic ``ZREM`` that only one caller can win: the
  last socket disconnects (:meth:`Presence.disconnect`), or :meth:`Presence.sweep`
  finds the deadline passed (a crashed node, a dropped network: no logout needed). The
  winner reports the user offline once, with ``last_seen``, which is what the facade
  writes to PostgreSQL: once per going-offline, never per heartbeat.
* ``room:{roomId}:presence``: a sorted set user -> deadline of the users in a room now;
  readers skip and prune members whose deadline passed.
* the socket mappings of :mod:`chatkeep.realtime.sockets`, refreshed in the same pipeline.

A heartbeat of 10,000 users is one pipeline, that is one round trip per batch
(``batch_size``, 10,000 by default): five commands per socket (the presence ``SET``, the
socket hash and the user's socket set, each with its TTL) plus one variadic ``ZADD`` per
batch for the deadlines, the node's sockets and each room. The commands are plain ones
rather than one script so the pipeline still works when, in cluster mode, the keys live in
different slots.
Deadlines use the writer's clock (see :mod:`chatkeep.realtime.clock`); ``ZADD GT`` keeps
the latest deadline when nodes' clocks disagree slightly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from chatkeep._tasks import stop_if_asked
from chatkeep.errors import InvalidInput
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import Clock, from_ms, seconds
from chatkeep.realtime.keys import validate_collection, validate_id
from chatkeep.realtime.sockets import SocketRegistry, SocketTouch, check_rooms

__all__ = ["Heartbeat", "OfflineHandler", "OfflineUser", "Presence"]

logger = logging.getLogger("chatkeep.realtime.presence")

_SWEEP_LIMIT: Final = 1000
# Heartbeats per operation_timeout a batch gets (see Presence._send).
_BEATS_PER_DEADLINE: Final = 1000

# KEYS[1] presence:deadlines. ARGV: now ms, limit. Claims (removes) every due user and
# returns them with their deadlines; a user claimed here is reported offline exactly once.
_SWEEP: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
return due
"""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One socket's heartbeat: it is alive, and in these rooms now."""

    user_id: UUID
    socket_id: str
    rooms: frozenset[UUID] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class OfflineUser:
    """A user who just went offline, and when they were last seen."""

    user_id: UUID
    last_seen: datetime


OfflineHandler = Callable[[Sequence[OfflineUser]], Awaitable[None]]
"""Awaited with the users who went offline (for example to write ``last_seen``)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Presence:
    """Tracks who is online, and who is in which room.

    Args:
        client: the shared Redis connection.
        sockets: the socket registry of this node (heartbeats refresh its mappings).
        timeout: a user whose sockets have not heartbeated for this long is offline
            (default 60 s; heartbeat every ``timeout / 3`` or so).
        on_offline: awaited with the users :meth:`disconnect` or :meth:`sweep` found
            offline; its errors propagate to that call.
        batch_size: heartbeats per pipeline in :meth:`heartbeat_many`.
        clock: current Unix time in seconds (defaults to the registry's).
    """

    def __init__(
        self,
        client: RedisClient,
        sockets: SocketRegistry,
        *,
        timeout: float = 60.0,
        on_offline: OfflineHandler | None = None,
        batch_size: int = 10_000,
        clock: Clock | None = None,
    ) -> None:
        self._client = client
        self._sockets = sockets
        self._timeout_ms = max(1, int(seconds(timeout, "timeout", maximum=86_400.0) * 1000))
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise InvalidInput("batch_size", "must be an integer from 1 to 100000")
        self._batch = batch_size
        self._on_offline = on_offline
        self._clock = clock
        self._sweep = client.script(_SWEEP)

    @property
    def timeout_ms(self) -> int:
        """How long a user stays online without a heartbeat, in milliseconds."""
        return self._timeout_ms

    def _now_ms(self) -> int:
        if self._clock is not None:
            return int(self._clock() * 1000)
        return self._sockets.now_ms()

    @staticmethod
    def _check(beat: Heartbeat) -> Heartbeat:
        if not isinstance(beat, Heartbeat):
            raise InvalidInput("beats", "must hold Heartbeat objects")
        if not isinstance(beat.user_id, UUID):
            raise InvalidInput("user_id", "must be a UUID")
        validate_id(beat.socket_id, "socket_id")
        check_rooms(beat.rooms)
        return beat

    async def connect(self, user_id: UUID, socket_id: str, *, rooms: Iterable[UUID] = ()) -> bool:
        """Register a new socket and mark its user online.

        Returns:
            ``True`` if this brought the user online (publish a presence event then).

        Raises:
            InvalidInput: bad ``user_id``, ``socket_id`` or ``rooms``.
            Unavailable: Redis could not be reached.
        """
        beat = self._check(Heartbeat(user_id, socket_id, check_rooms(rooms)))
        return bool(await self._send([beat], "presence.connect", connecting=True))

    async def heartbeat(self, user_id: UUID, socket_id: str, *, rooms: Iterable[UUID] = ()) -> bool:
        """Keep a socket (and its user, and the user's place in ``rooms``) alive.

        Returns:
            ``True`` if the user had been considered offline and is online again.

        Raises:
            InvalidInput: bad ``user_id``, ``socket_id`` or ``rooms``.
            Unavailable: Redis could not be reached.
        """
        beat = self._check(Heartbeat(user_id, socket_id, check_rooms(rooms)))
        return bool(await self._send([beat], "presence.heartbeat", connecting=False))

    async def heartbeat_many(self, beats: Iterable[Heartbeat]) -> list[UUID]:
        """Heartbeat many sockets, one pipelined round trip per ``batch_size`` of them.

        Returns:
            The users these heartbeats brought online, in order.

        Raises:
            InvalidInput: a heartbeat is malformed (nothing is sent then).
            Unavailable: Redis could not be reached.
        """
        checked = [self._check(beat) for beat in validate_collection(beats, "beats")]
        came_online: list[UUID] = []
        for start in range(0, len(checked), self._batch):
            came_online.extend(
                await self._send(
                    checked[start : start + self._batch],
                    "presence.heartbeat_many",
                    connecting=False,
                )
            )
        return came_online

    async def _send(
        self, beats: list[Heartbeat], operation: str, *, connecting: bool
    ) -> list[UUID]:
        keys = self._client.keys
        now = self._now_ms()
        deadline = now + self._timeout_ms
        pipe = self._client.pipeline()
        # The deadlines go in first: a sweep running while this pipeline executes sees the
        # new deadlines and leaves these users alone. One variadic ZADD for the batch.
        pipe.zadd(keys.presence_deadlines(), {str(b.user_id): deadline for b in beats}, gt=True)
        for beat in beats:
            # SET ... GET: the previous value says whether this beat brought the user online.
            pipe.set(keys.presence(beat.user_id), now, px=self._timeout_ms, get=True)
        self._sockets.stage_touch(
            pipe,
            [
                SocketTouch(b.socket_id, b.user_id, deadline, b.rooms, now if connecting else None)
                for b in beats
            ],
            ttl_ms=self._timeout_ms,
        )
        rooms: dict[UUID, dict[str, int]] = {}
        for beat in beats:
            for room in beat.rooms:
                rooms.setdefault(room, {})[str(beat.user_id)] = deadline
        for room, members in rooms.items():
            room_key = keys.room_presence(room)
            pipe.zadd(room_key, members, gt=True)
            pipe.pexpire(room_key, self._timeout_ms)
        # A batch of thousands of beats is one round trip, but packing and parsing tens of
        # thousands of commands takes time of its own: its deadline grows with its size.
        seconds = self._client.operation_timeout * max(1.0, len(beats) / _BEATS_PER_DEADLINE)
        with self._client.guard(operation, timeout=seconds):
            results = await pipe.execute()
        previous = results[1 : 1 + len(beats)]
        return [beat.user_id for beat, old in zip(beats, previous, strict=True) if old is None]

    async def disconnect(self, socket_id: str) -> OfflineUser | None:
        """Forget a socket; if it was its user's last one, the user goes offline.

        The user also leaves the rooms this socket was in, unless another of their live
        sockets is in them too.

        Returns:
            The user, with ``last_seen`` = now, if this disconnect took them offline;
            ``None`` if they are still online elsewhere (or the socket was unknown).

        Raises:
            InvalidInput: bad ``socket_id``.
            Unavailable: Redis could not be reached.
        """
        info = await self._sockets.unregister(socket_id)
        if info is None:
            return None
        keys = self._client.keys
        now = self._now_ms()
        remaining = await self._sockets.sockets_of_user(info.user_id)
        still_in: set[UUID] = set()
        if remaining and info.rooms:
            with self._client.guard("presence.disconnect"):
                read = self._client.pipeline()
                for other in remaining:
                    read.hget(keys.socket(other), "r")
                for value in await read.execute():
                    if value:
                        still_in.update(UUID(part) for part in _text(value).split(",") if part)
        member = str(info.user_id)
        write = self._client.pipeline()
        for room in info.rooms - still_in:
            write.zrem(keys.room_presence(room), member)
        if not remaining:
            write.delete(keys.presence(info.user_id))
            write.zrem(keys.presence_deadlines(), member)
        with self._client.guard("presence.disconnect"):
            results = await write.execute() if len(write) else []
        if remaining or not results or not results[-1]:
            return None
        gone = OfflineUser(info.user_id, from_ms(now))
        if self._on_offline is not None:
            await self._on_offline([gone])
        return gone

    async def sweep(self, *, limit: int = _SWEEP_LIMIT) -> list[OfflineUser]:
        """Find users whose deadline passed with no heartbeat, and report them offline.

        Call it every few seconds from any node (or all: each user is reported once).

        Args:
            limit: most users claimed in one call.

        Returns:
            The users who went offline, with ``last_seen`` = their last heartbeat.

        Raises:
            Unavailable: Redis could not be reached.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise InvalidInput("limit", "must be an integer from 1 to 100000")
        keys = self._client.keys
        now = self._now_ms()
        with self._client.guard("presence.sweep"):
            due = await self._sweep(keys=[keys.presence_deadlines()], args=[now, limit])
            gone = [
                OfflineUser(UUID(_text(due[i])), from_ms(float(due[i + 1]) - self._timeout_ms))
                for i in range(0, len(due), 2)
            ]
            if gone:
                # A presence key outliving its deadline (clock skew) would hide the next
                # "came online"; drop it so the two views agree.
                pipe = self._client.pipeline()
                for user in gone:
                    pipe.delete(keys.presence(user.user_id))
                await pipe.execute()
        if gone and self._on_offline is not None:
            await self._on_offline(gone)
        return gone

    async def is_online(self, user_id: UUID) -> bool:
        """Whether any socket of ``user_id`` heartbeated within the timeout.

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.presence(user_id)
        with self._client.guard("presence.is_online"):
            return bool(await self._client.redis.exists(key))

    async def online_among(self, user_ids: Iterable[UUID]) -> set[UUID]:
        """The subset of ``user_ids`` online now (one round trip).

        Raises:
            InvalidInput: an id is not a UUID.
            Unavailable: Redis could not be reached.
        """
        # Keys first: they check each id, before hashing one (a list raised TypeError).
        named = {
            self._client.keys.presence(u): u for u in validate_collection(user_ids, "user_ids")
        }
        ids = list(dict.fromkeys(named.values()))
        if not ids:
            return set()
        pipe = self._client.pipeline()
        for user_id in ids:
            pipe.exists(self._client.keys.presence(user_id))
        with self._client.guard("presence.online_among"):
            found = await pipe.execute()
        return {user_id for user_id, exists in zip(ids, found, strict=True) if exists}

    async def in_room(self, room_id: UUID) -> list[UUID]:
        """The users present in ``room_id`` now, latest deadline last.

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.room_presence(room_id)
        now = self._now_ms()
        pipe = self._client.pipeline()
        pipe.zremrangebyscore(key, "-inf", f"({now}")
        pipe.zrangebyscore(key, now, "+inf")
        with self._client.guard("presence.in_room"):
            _, members = await pipe.execute()
        return [UUID(_text(member)) for member in members]

    async def leave_room(self, room_id: UUID, user_id: UUID) -> bool:
        """Remove ``user_id`` from the room's presence now; ``True`` if they were there.

        (Their next heartbeat listing the room would bring them back.)

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.room_presence(room_id)
        if not isinstance(user_id, UUID):
            raise InvalidInput("user_id", "must be a UUID")
        with self._client.guard("presence.leave_room"):
            return bool(await self._client.redis.zrem(key, str(user_id)))

    async def run_sweeper(self, interval: float = 5.0) -> None:
        """Sweep forever every ``interval`` seconds (run it as a task; cancel to stop).

        A failed sweep (Redis down, or ``on_offline`` failing) is logged and retried on
        the next tick, never ending the loop.
        """
        pause = seconds(interval, "interval", minimum=0.01, maximum=3600.0)
        while True:
            try:
                while len(await self.sweep(limit=_SWEEP_LIMIT)) == _SWEEP_LIMIT:
                    pass  # more were due: keep claiming before sleeping
            except Exception:
                stop_if_asked()  # the stop request came back as the store call's own error
                logger.exception(
                    "presence sweep failed; retrying in %.1f s",
                    pause,
                    extra={"operation": "presence.sweep", "retry_in_ms": round(pause * 1000)},
                )
            stop_if_asked()
            await asyncio.sleep(pause)
