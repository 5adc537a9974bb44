"""Socket mappings: which user and node hold a socket, and which sockets a user or node has.

Three keys per socket, each with a TTL that every heartbeat pushes forward, so the
sockets of a crashed node vanish by themselves within one timeout:

* ``socket:{socketId}``: a hash of user id, node id, connection time and the rooms the
  socket is in;
* ``user:{userId}:sockets`` and ``node:{nodeId}:sockets``: sorted sets of socket ids
  scored by their deadline (Unix ms). Readers skip (and prune) members whose deadline
  passed, so one dead socket never hides behind a live one's TTL.

:class:`SocketRegistry` is the low layer; :class:`~chatkeep.realtime.presence.Presence`
drives it from connects, heartbeats and disconnects, staging its commands into the same
pipeline so a heartbeat stays one round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.typing import EncodableT, FieldT

from chatkeep.errors import InvalidInput
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import Clock, from_ms, seconds, wall_clock
from chatkeep.realtime.keys import validate_collection, validate_id

__all__ = ["SocketInfo", "SocketRegistry", "SocketTouch"]


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """Where a socket lives and whose it is.

    Attributes:
        socket_id: the socket.
        user_id: whose socket it is.
        node_id: the node (process) holding it.
        connected_at: when it registered (``None`` if its record was rebuilt by a late
            heartbeat after expiring).
        rooms: the rooms it was last reported in.
    """

    socket_id: str
    user_id: UUID
    node_id: str
    connected_at: datetime | None
    rooms: frozenset[UUID]


class SocketTouch(NamedTuple):
    """One socket's refresh, as staged by :meth:`SocketRegistry.stage_touch`."""

    socket_id: str
    user_id: UUID
    deadline_ms: int
    rooms: frozenset[UUID] | None = None
    connected_at_ms: int | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rooms_field(rooms: Iterable[UUID]) -> str:
    return ",".join(sorted(str(room) for room in rooms))


def _parse_rooms(value: Any) -> frozenset[UUID]:
    text = _text(value) if value is not None else ""
    return frozenset(UUID(part) for part in text.split(",") if part)


def check_rooms(rooms: Iterable[UUID]) -> frozenset[UUID]:
    """``rooms`` as a frozenset, each checked to be a UUID (at most 1000).

    Raises:
        InvalidInput: ``rooms`` is not a collection, an element is not a UUID, or there
            are too many.
    """
    items = validate_collection(rooms, "rooms")
    # Each element is checked before hashing: a list among them made frozenset() raise
    # TypeError (unhashable).
    for room in items:
        if not isinstance(room, UUID):
            raise InvalidInput("rooms", "must hold room UUIDs")
    found = frozenset(items)
    if len(found) > 1000:
        raise InvalidInput("rooms", "a socket may be in at most 1000 rooms")
    return found


class SocketRegistry:
    """Maps sockets to users and nodes, and back.

    Args:
        client: the shared Redis connection.
        node_id: this process's node id (a host name, pod name...).
        ttl: a socket that is not refreshed for this long is gone (default 60 s; the
            presence timeout, when driven by :class:`~chatkeep.realtime.presence.Presence`).
        clock: current Unix time in seconds (tests move it).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        node_id: str,
        ttl: float = 60.0,
        clock: Clock = wall_clock,
    ) -> None:
        self._client = client
        self._node = validate_id(node_id, "node_id")
        self._ttl_ms = max(1, int(seconds(ttl, "ttl", maximum=86_400.0) * 1000))
        self._clock = clock

    @property
    def node_id(self) -> str:
        """This process's node id."""
        return self._node

    @property
    def ttl_ms(self) -> int:
        """How long a socket lives without a refresh, in milliseconds."""
        return self._ttl_ms

    def now_ms(self) -> int:
        """The registry's clock, in Unix milliseconds."""
        return int(self._clock() * 1000)

    def stage_touch(
        self, pipe: Pipeline | ClusterPipeline, touches: Sequence[SocketTouch], *, ttl_ms: int
    ) -> None:
        """Queue the commands that (re)write the mappings of ``touches`` into ``pipe``.

        Used by :meth:`register` and by presence heartbeats, so that a heartbeat of
        thousands of sockets is a single round trip: four commands per socket, and one
        variadic ``ZADD`` (plus its ``PEXPIRE``) for this node's set however many sockets
        there are. Arguments are not validated here: the public callers do that.
        """
        keys = self._client.keys
        for touch in touches:
            socket_key = keys.socket(touch.socket_id)
            fields: dict[FieldT, EncodableT] = {"u": str(touch.user_id), "n": self._node}
            if touch.rooms is not None:
                fields["r"] = _rooms_field(touch.rooms)
            if touch.connected_at_ms is not None:
                fields["c"] = touch.connected_at_ms
            pipe.hset(socket_key, mapping=fields)
            pipe.pexpire(socket_key, ttl_ms)
            user_key = keys.user_sockets(touch.user_id)
            pipe.zadd(user_key, {touch.socket_id: touch.deadline_ms})
            pipe.pexpire(user_key, ttl_ms)
        if touches:
            node_key = keys.node_sockets(self._node)
            pipe.zadd(node_key, {t.socket_id: t.deadline_ms for t in touches})
            pipe.pexpire(node_key, ttl_ms)

    async def register(
        self, socket_id: str, user_id: UUID, *, rooms: Iterable[UUID] = ()
    ) -> SocketInfo:
        """Record that ``socket_id`` of ``user_id`` is connected to this node.

        Raises:
            InvalidInput: bad ``socket_id``, ``user_id`` or ``rooms``.
            Unavailable: Redis could not be reached.
        """
        validate_id(socket_id, "socket_id")
        self._client.keys.user_sockets(user_id)  # validates user_id
        room_set = check_rooms(rooms)
        now = self.now_ms()
        pipe = self._client.pipeline(transaction=not self._client.keys.cluster_mode)
        touch = SocketTouch(socket_id, user_id, now + self._ttl_ms, room_set, now)
        self.stage_touch(pipe, [touch], ttl_ms=self._ttl_ms)
        with self._client.guard("sockets.register"):
            await pipe.execute()
        return SocketInfo(socket_id, user_id, self._node, from_ms(now), room_set)

    async def get(self, socket_id: str) -> SocketInfo | None:
        """The socket's user and node, or ``None`` if it is not connected (or expired).

        Raises:
            InvalidInput: bad ``socket_id``.
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.socket(socket_id)
        with self._client.guard("sockets.get"):
            raw = await self._client.redis.hgetall(key)
        return _info(socket_id, raw)

    async def unregister(self, socket_id: str) -> SocketInfo | None:
        """Forget a disconnected socket; returns what it was, or ``None`` if unknown.

        Raises:
            InvalidInput: bad ``socket_id``.
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        socket_key = keys.socket(socket_id)
        with self._client.guard("sockets.unregister"):
            info = _info(socket_id, await self._client.redis.hgetall(socket_key))
            if info is None:
                return None
            pipe = self._client.pipeline(transaction=not keys.cluster_mode)
            pipe.delete(socket_key)
            pipe.zrem(keys.user_sockets(info.user_id), socket_id)
            pipe.zrem(keys.node_sockets(info.node_id), socket_id)
            await pipe.execute()
        return info

    async def sockets_of_user(self, user_id: UUID) -> list[str]:
        """Ids of the user's live sockets (on any node), oldest deadline first.

        Raises:
            Unavailable: Redis could not be reached.
        """
        return await self._live(self._client.keys.user_sockets(user_id), "sockets.of_user")

    async def sockets_of_node(self, node_id: str | None = None) -> list[str]:
        """Ids of the live sockets held by ``node_id`` (this node by default).

        Raises:
            InvalidInput: bad ``node_id``.
            Unavailable: Redis could not be reached.
        """
        # ``is None``, not ``or``: a falsy wrong value (0, "", []) named this node.
        key = self._client.keys.node_sockets(self._node if node_id is None else node_id)
        return await self._live(key, "sockets.of_node")

    async def _live(self, key: str, operation: str) -> list[str]:
        now = self.now_ms()
        pipe = self._client.pipeline()
        pipe.zremrangebyscore(key, "-inf", f"({now}")
        pipe.zrangebyscore(key, now, "+inf")
        with self._client.guard(operation):
            _, members = await pipe.execute()
        return [_text(member) for member in members]

    async def purge_node(self, node_id: str | None = None) -> list[SocketInfo]:
        """Forget every socket of ``node_id`` (this node by default), live or not.

        For a node shutting down, or for cleaning up after a node known to be dead
        without waiting for the TTLs.

        Raises:
            InvalidInput: bad ``node_id``.
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        # ``is None``, not ``or``: a falsy wrong value (0, "", []) purged this node.
        node = validate_id(self._node if node_id is None else node_id, "node_id")
        node_key = keys.node_sockets(node)
        with self._client.guard("sockets.purge_node"):
            members = [_text(m) for m in await self._client.redis.zrange(node_key, 0, -1)]
            read = self._client.pipeline()
            for socket_id in members:
                read.hgetall(keys.socket(socket_id))
            infos = [
                _info(sid, raw) for sid, raw in zip(members, await read.execute(), strict=True)
            ]
            write = self._client.pipeline()
            for info in infos:
                if info is not None and info.node_id == node:
                    write.delete(keys.socket(info.socket_id))
                    write.zrem(keys.user_sockets(info.user_id), info.socket_id)
            write.delete(node_key)
            await write.execute()
        return [info for info in infos if info is not None and info.node_id == node]


def _info(socket_id: str, raw: dict[Any, Any]) -> SocketInfo | None:
    if not raw:
        return None
    fields = {_text(k): v for k, v in raw.items()}
    if "u" not in fields:
        return None
    connected = fields.get("c")
    return SocketInfo(
        socket_id=socket_id,
        user_id=UUID(_text(fields["u"])),
        node_id=_text(fields.get("n", b"")),
        # A socket re-created by a late heartbeat (after its hash expired) has no time.
        connected_at=from_ms(_text(connected)) if connected is not None else None,
        rooms=_parse_rooms(fields.get("r")),
    )
