"""Read-through caches (user profiles, room membership) that degrade, never fail.

:class:`ReadThroughCache` answers from Redis when it can and from its *loader* (an async
callable reading PostgreSQL) when it cannot: a miss, or Redis being down. A cache outage
therefore costs latency, never an error; it is logged once per outage, not per call.

Fills are guarded by a *lease* so an invalidation is never undone by a slow reader: on a
miss the reader puts a lease marker in the key (``SET NX``), loads, and writes the value
only if its own lease is still there (compare-and-set in Lua). A write path that
invalidates meanwhile deletes the lease, so the stale value it loaded is not stored.
Readers that find someone else's lease simply load without filling. Invalidation itself
never raises either: when Redis is down it returns ``False`` (and whatever was cached
ages out with its TTL).

The cache knows nothing about storage models: a loader is
``Callable[[UUID], Awaitable[T | None]]`` and a :class:`Serializer` turns ``T`` into
bytes and back (:class:`JsonSerializer` does it for any pydantic-compatible type). A loader
that reads through row security sees only what its caller may see; when that view is not
everyone's, it returns the value wrapped in :class:`Unshared`: the caller gets it, the
cache does not keep it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar
from uuid import UUID

from pydantic import TypeAdapter, ValidationError
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from chatkeep.errors import ChatkeepError, InvalidInput
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import seconds
from chatkeep.realtime.keys import validate_collection

__all__ = [
    "CacheStats",
    "JsonSerializer",
    "Loader",
    "MessageRoomCache",
    "ReadThroughCache",
    "RoomMembersCache",
    "Serializer",
    "UserProfileCache",
]

logger = logging.getLogger("chatkeep.realtime.cache")

T = TypeVar("T")

_LEASE: Final = b"\x00lease:"
_ABSENT: Final = b"\x00absent"

# KEYS[1] entry. ARGV: lease value, lease ms. Returns the value, or nil after taking the
# lease, or the lease marker of someone else (then: load without filling).
_GET_OR_LEASE: Final = """
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# KEYS[1] entry. ARGV: our lease, value, ttl ms. Stores only if our lease survived.
_FILL: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] entry. ARGV: our lease. Gives the lease up after a failed load.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Serializer(Protocol[T]):
    """Turns cached values into bytes and back."""

    def dumps(self, value: T) -> bytes:
        """The bytes stored for ``value``."""
        ...

    def loads(self, data: bytes) -> T:
        """The value stored as ``data`` (raise ``ValueError`` if unreadable)."""
        ...


class JsonSerializer(Generic[T]):
    """JSON via pydantic, for models, dataclasses and containers (``frozenset[UUID]``).

    Args:
        type_: the type of the cached values.
    """

    def __init__(self, type_: type[T] | Any) -> None:
        self._adapter: TypeAdapter[T] = TypeAdapter(type_)

    def dumps(self, value: T) -> bytes:
        """The JSON bytes of ``value``."""
        return self._adapter.dump_json(value)

    def loads(self, data: bytes) -> T:
        """Parse and validate JSON bytes.

        Raises:
            ValueError: the bytes are not a valid value (for example an old format).
        """
        try:
            return self._adapter.validate_json(data)
        except ValidationError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Unshared(Generic[T]):
    """A loaded value that is right for this caller only: returned, never cached.

    For loaders that read through row security: a member list read as someone who is not
    a member is not the room's member list.
    """

    value: T | None


Loader = Callable[[UUID], Awaitable["T | Unshared[T] | None"]]
"""Loads the current value from the source of truth; ``None`` if there is none."""


class _Cached:
    """A member set was filled after the caller found none: ask Redis again."""


_CACHED: Final = _Cached()


def _value(loaded: T | Unshared[T] | None) -> T | None:
    return loaded.value if isinstance(loaded, Unshared) else loaded


@dataclass(slots=True)
class CacheStats:
    """Counters of one cache since it was made.

    ``shared`` counts the calls answered by another caller's load in flight instead of a
    load of their own (:class:`RoomMembersCache` only).
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    fills: int = 0
    errors: int = 0
    shared: int = 0


class _RedisCache:
    """What both caches share: their keys, degrading to the loader, and invalidation."""

    def __init__(self, client: RedisClient, namespace: str, *, id_field: str) -> None:
        self._client = client
        self._namespace = namespace
        self._id_field = id_field  # what an InvalidInput names for a bad id
        self._degraded = False
        self.stats = CacheStats()

    @property
    def namespace(self) -> str:
        """The key namespace of this cache."""
        return self._namespace

    def key(self, ident: UUID) -> str:
        """The Redis key of ``ident``'s entry.

        Raises:
            InvalidInput: ``ident`` is not a UUID.
        """
        if not isinstance(ident, UUID):
            raise InvalidInput(self._id_field, "must be a UUID")
        return self._client.keys.cache(self._namespace, str(ident))

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.stats.errors += 1
        if not self._degraded:
            self._degraded = True
            logger.warning(
                "cache %s degraded to its loader: %s failed (%s)",
                self._namespace,
                operation,
                exc,
            )

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            logger.info("cache %s is served by redis again", self._namespace)

    async def _delete(self, keys: list[str]) -> bool:
        """Delete ``keys``: True if Redis took it, False (logged, counted) if it is down."""
        if not keys:
            return True
        try:
            with self._client.guard("cache.invalidate"):
                # One DEL per key: in cluster mode the keys live in different slots.
                pipe = self._client.pipeline()
                for key in keys:
                    pipe.delete(key)
                await pipe.execute()
        except ChatkeepError as exc:
            self._failed("invalidate", exc)
            return False
        self._recovered()
        return True


class ReadThroughCache(_RedisCache, Generic[T]):
    """A cache of ``T`` by UUID in front of ``loader``, with TTLs and invalidation.

    Args:
        client: the shared Redis connection.
        namespace: the key namespace (``"user"`` gives ``cache:user:<id>``).
        loader: reads the current value from PostgreSQL.
        serializer: stores values as bytes.
        ttl: how long a value is kept (bounds staleness if an invalidation is lost).
        negative_ttl: how long "no such row" is remembered (0, the default: not at all).
        lease_ttl: how long a miss holds its fill lease (longer than a slow load).
    """

    def __init__(
        self,
        client: RedisClient,
        namespace: str,
        *,
        loader: Loader[T],
        serializer: Serializer[T],
        ttl: float = 300.0,
        negative_ttl: float = 0.0,
        lease_ttl: float = 5.0,
    ) -> None:
        client.keys.cache(namespace, "x")  # validates the namespace
        if not callable(loader):
            raise InvalidInput("loader", "must be an async callable")
        super().__init__(client, namespace, id_field="id")
        self._loader = loader
        self._serializer = serializer
        self._ttl_ms = max(1, int(seconds(ttl, "ttl", maximum=7 * 86_400.0) * 1000))
        self._negative_ms = (
            0
            if negative_ttl == 0
            else int(seconds(negative_ttl, "negative_ttl", maximum=86_400.0) * 1000)
        )
        self._lease_ms = max(1, int(seconds(lease_ttl, "lease_ttl", maximum=600.0) * 1000))
        self._get_or_lease = client.script(_GET_OR_LEASE)
        self._fill = client.script(_FILL)
        self._release = client.script(_RELEASE)

    async def get(self, ident: UUID, *, loader: Loader[T] | None = None) -> T | None:
        """The value for ``ident``: from Redis, else from the loader (then cached).

        Whatever the loader raises propagates; a cache failure never raises.

        Args:
            ident: the id.
            loader: loads this call's miss instead of the cache's own loader (one that
                reads as the caller, say).

        Raises:
            InvalidInput: ``ident`` is not a UUID, or ``loader`` is not callable.
        """
        # Checked even when the entry is cached: a bad loader must not pass on a hit only.
        if loader is not None and not callable(loader):
            raise InvalidInput("loader", "must be an async callable")
        load = self._loader if loader is None else loader
        key = self.key(ident)
        lease = _LEASE + secrets.token_bytes(12)
        try:
            with self._client.guard("cache.get"):
                found = await self._get_or_lease(keys=[key], args=[lease, self._lease_ms])
        except ChatkeepError as exc:
            self._failed("get", exc)
            return _value(await self._load(ident, load))
        self._recovered()
        if found is not None:
            if found.startswith(_LEASE):
                # Someone else is filling: answer from the loader, leave the fill to them.
                self.stats.misses += 1
                return _value(await self._load(ident, load))
            hit, value = self._decode(found)
            if hit:
                self.stats.hits += 1
                return value
            # An unreadable entry (an older format): replace it under our own lease.
            if not await self._retake_lease(key, lease):
                self.stats.misses += 1
                return _value(await self._load(ident, load))
        self.stats.misses += 1
        try:
            loaded = await self._load(ident, load)
        except BaseException:
            await self._give_back(key, lease)
            raise
        if isinstance(loaded, Unshared):
            await self._give_back(key, lease)
            return loaded.value
        await self._store(key, lease, loaded)
        return loaded

    def _decode(self, data: bytes) -> tuple[bool, T | None]:
        if data == _ABSENT:
            return True, None
        try:
            return True, self._serializer.loads(data)
        except ValueError:
            logger.warning("cache %s: dropped an unreadable entry", self._namespace)
            return False, None

    async def _retake_lease(self, key: str, lease: bytes) -> bool:
        try:
            with self._client.guard("cache.get"):
                await self._client.redis.set(key, lease, px=self._lease_ms)
        except ChatkeepError as exc:
            self._failed("get", exc)
            return False
        return True

    async def _load(self, ident: UUID, loader: Loader[T]) -> T | Unshared[T] | None:
        self.stats.loads += 1
        return await loader(ident)

    async def _store(self, key: str, lease: bytes, value: T | None) -> None:
        if value is None:
            if not self._negative_ms:
                await self._give_back(key, lease)
                return
            data, ttl = _ABSENT, self._negative_ms
        else:
            data, ttl = self._serializer.dumps(value), self._ttl_ms
        try:
            with self._client.guard("cache.fill"):
                if await self._fill(keys=[key], args=[lease, data, ttl]):
                    self.stats.fills += 1
        except ChatkeepError as exc:
            self._failed("fill", exc)

    async def _give_back(self, key: str, lease: bytes) -> None:
        try:
            with self._client.guard("cache.release"):
                await asyncio.shield(self._release(keys=[key], args=[lease]))
        except ChatkeepError as exc:
            self._failed("release", exc)

    async def get_many(self, idents: Iterable[UUID]) -> dict[UUID, T]:
        """Values for many ids (one round trip for the hits); absent ids are left out.

        Whatever the loader raises propagates.

        Raises:
            InvalidInput: ``idents`` is not a collection, or an id is not a UUID.
        """
        # Keys first: they check each id, before hashing one (a list raised TypeError).
        named = {self.key(ident): ident for ident in validate_collection(idents, "idents")}
        keys = list(named)
        ids = list(named.values())
        found: list[bytes | None] = [None] * len(ids)
        if ids:
            try:
                with self._client.guard("cache.get_many"):
                    pipe = self._client.pipeline()
                    for key in keys:
                        pipe.get(key)
                    found = list(await pipe.execute())
                self._recovered()
            except ChatkeepError as exc:
                self._failed("get_many", exc)
        result: dict[UUID, T] = {}
        missing: list[UUID] = []
        for ident, data in zip(ids, found, strict=True):
            if data is None or data.startswith(_LEASE):
                missing.append(ident)
                continue
            hit, value = self._decode(data)
            if not hit:
                missing.append(ident)
                continue
            self.stats.hits += 1
            if value is not None:
                result[ident] = value
        loaded = await asyncio.gather(*(self.get(ident) for ident in missing))
        for ident, value in zip(missing, loaded, strict=True):
            if value is not None:
                result[ident] = value
        return result

    async def invalidate(self, *idents: UUID) -> bool:
        """Drop the entries of ``idents`` (call after every write that changes them).

        Returns:
            ``True`` if Redis took the deletion; ``False`` if it is down (entries then
            expire with their TTL). Never raises for Redis errors.

        Raises:
            InvalidInput: an id is not a UUID.
        """
        return await self._delete([self.key(ident) for ident in idents])


Members = frozenset[UUID]
MembersLoader = Callable[[UUID, "UUID | None"], Awaitable["Members | Unshared[Members] | None"]]
"""Loads a room's member ids as seen by a user (``None``: as no one in particular)."""

# Answers of the member scripts besides a member list.
_IN: Final = 1  # the cached set holds the user
_OUT: Final = 0  # the cached set leaves the user out
_ABSENT_SET: Final = 2  # no set cached (absent, a fill lease, or an older format)

# KEYS[1] entry. ARGV: user id. One SISMEMBER: O(1), nothing decoded, whatever the size.
_IS_MEMBER: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then return 2 end
return redis.call('SISMEMBER', KEYS[1], ARGV[1])
"""

# KEYS[1] entry. ARGV: user id ('' for no one in particular). The whole set, but only for
# a user in it (or for no one in particular).
_MEMBERS: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then return 2 end
if ARGV[1] ~= '' and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('SMEMBERS', KEYS[1])
"""

# KEYS[1] entry. ARGV: our lease, lease ms, lease prefix. The entry is a SET of member ids,
# or a STRING fill lease while someone loads it. Returns 1 after taking the lease, 0 if
# someone holds one, 2 if a set is there (filled since the caller found none). Anything
# else (a JSON list of an older version, say) is replaced by our lease.
_TAKE_MEMBERS_LEASE: Final = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'set' then return 2 end
if t == 'string' then
  local v = redis.call('GET', KEYS[1])
  if string.sub(v, 1, #ARGV[3]) == ARGV[3] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] entry. ARGV: our lease, ttl ms, member ids... Replaces our lease with the whole
# set in one step, so a set that exists is always complete; refused if an invalidation
# deleted our lease meanwhile (the ids were read before it). SADD in chunks: Lua's unpack
# has a stack limit.
_FILL_MEMBERS: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] entry. ARGV: our lease. Gives the lease up (a load that failed or was not shared).
_RELEASE_MEMBERS: Final = """
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RoomMembersCache(_RedisCache):
    """The member ids of each room, cached as a Redis SET (``cache:room_members:{roomId}``).

    Membership checks do not grow with the room: :meth:`is_member` is one ``SISMEMBER``
    (in a script that also tells a miss apart), nothing is decoded. A miss is loaded once
    per room and process: concurrent callers wait for the one load in flight (*single
    flight*) instead of each reading PostgreSQL.

    The loader reads as the user asking: through row security, a member sees the whole
    member list of their room, anyone else does not; it returns :class:`Unshared` for a
    view that is not the whole list, which is then answered but neither cached nor shared
    with the callers waiting on it. A cached (or shared) list answers only its members: a
    non-member is always answered by the loader, as themselves, so what they learn does
    not depend on whether a member filled the cache.

    Fills are guarded like :class:`ReadThroughCache`'s: the caller that leads a miss
    takes a lease (a string in the entry's key, ``SET`` with a TTL) before it loads, and
    replaces its own lease with the whole set in one script, only if the lease is still
    there; a leader that finds another process's lease loads without filling.
    :meth:`invalidate` deletes the key, lease included, so a list read before an
    invalidation is never stored; it also detaches the loads in flight in this process,
    so later callers do not wait for one. A load stays joinable until its set is stored,
    and a caller that would lead a load while a set is there (its "no set" answer came
    just before a fill) asks Redis again instead. A set is written whole and at once, so
    one that exists is complete; an empty list is never cached (a member's view always
    holds the member). When Redis is down every call is answered by the loader
    (single-flighted still).

    Args:
        client: the shared Redis connection.
        loader: ``loader(room_id, asking)`` returns the member ids of a room from
            PostgreSQL as ``asking`` sees them (``None`` if they cannot see the room).
        ttl: how long a member list is kept (default 60 s).
        lease_ttl: how long a miss holds its fill lease (longer than a slow load).

    Attributes:
        stats: hits, misses, loads, fills, errors, and ``shared`` (calls answered by
            another caller's load in flight).
    """

    def __init__(
        self,
        client: RedisClient,
        loader: MembersLoader,
        *,
        ttl: float = 60.0,
        lease_ttl: float = 5.0,
    ) -> None:
        if not callable(loader):
            raise InvalidInput("loader", "must be an async callable")
        super().__init__(client, "room_members", id_field="room_id")
        self._loader = loader
        self._ttl_ms = max(1, int(seconds(ttl, "ttl", maximum=7 * 86_400.0) * 1000))
        self._lease_ms = max(1, int(seconds(lease_ttl, "lease_ttl", maximum=600.0) * 1000))
        self._is_member = client.script(_IS_MEMBER)
        self._members = client.script(_MEMBERS)
        self._take_lease = client.script(_TAKE_MEMBERS_LEASE)
        self._fill = client.script(_FILL_MEMBERS)
        self._release = client.script(_RELEASE_MEMBERS)
        # Room id -> the load in flight: resolves to the room's member list (a member's
        # view), None (the leader's view was not the list, or its load failed), or
        # _CACHED (a set was filled meanwhile: ask Redis).
        self._flights: dict[UUID, asyncio.Future[Members | _Cached | None]] = {}

    @property
    def cache(self) -> RoomMembersCache:
        """This object, for callers of the former ``cache.key`` and ``cache.stats``."""
        return self

    async def is_member(self, room_id: UUID, user_id: UUID) -> bool:
        """Whether ``user_id`` is a member of ``room_id``: O(1) on a hit.

        A hit answers a member; a miss, or a set without the user, is read as that user
        (see :meth:`members`), so a non-member's answer never depends on the cache.

        Raises:
            InvalidInput: an id is not a UUID.
        """
        key = self.key(room_id)
        if not isinstance(user_id, UUID):
            raise InvalidInput("user_id", "must be a UUID")
        for again in (True, False):
            found = None
            if room_id not in self._flights:
                found = await self._probe(self._is_member, key, str(user_id))
                if found == _IN:
                    self.stats.hits += 1
                    return True
                if found == _OUT:
                    self.stats.hits += 1
                    return user_id in await self._own_view(room_id, user_id)
            loaded = await self._miss(room_id, user_id, key, again=again, up=found is not None)
            if not isinstance(loaded, _Cached):
                return user_id in loaded
        return user_id in await self._own_view(room_id, user_id)  # pragma: no cover

    async def members(self, room_id: UUID, *, asking: UUID | None = None) -> frozenset[UUID]:
        """The member ids of ``room_id`` as ``asking`` may see them.

        A cached list answers only a user in it. Anyone else is answered by the loader,
        as themselves, whatever the cache holds: the cached list is the members' view,
        and handing it (or even its existence) to an outsider would tell them what row
        security hides, and tell apart a private room from one that does not exist.
        This decodes the whole list: membership checks should use :meth:`is_member`.

        Whatever the loader raises propagates (the facade's raises ``NotFound`` for a
        room the asker cannot see); a loader returning ``None`` gives the empty set.

        Raises:
            InvalidInput: an id is not a UUID.
        """
        key = self.key(room_id)
        if asking is not None and not isinstance(asking, UUID):
            raise InvalidInput("asking", "must be a UUID")
        for again in (True, False):
            found = None
            if room_id not in self._flights:
                user = "" if asking is None else str(asking)
                found = await self._probe(self._members, key, user)
                if isinstance(found, list):
                    try:
                        listed = frozenset(UUID(m.decode()) for m in found)
                    except ValueError:
                        logger.warning("cache %s: an unreadable member set", self.namespace)
                    else:
                        self.stats.hits += 1
                        return listed
                elif found == _OUT and asking is not None:  # _OUT answers a user only
                    self.stats.hits += 1
                    return await self._own_view(room_id, asking)
            loaded = await self._miss(room_id, asking, key, again=again, up=found is not None)
            if not isinstance(loaded, _Cached):
                return loaded
        return await self._load(room_id, asking)  # pragma: no cover

    async def _probe(self, script: Any, key: str, user: str) -> Any:
        """The script's answer, or ``None`` when Redis failed (then: load, do not fill)."""
        try:
            with self._client.guard("cache.get"):
                found = await script(keys=[key], args=[user])
        except ChatkeepError as exc:
            self._failed("get", exc)
            return None
        self._recovered()
        return found

    async def _load(self, room_id: UUID, asking: UUID | None) -> Members:
        """The room as ``asking`` sees it, read for this call alone."""
        self.stats.loads += 1
        found = _value(await self._loader(room_id, asking))
        return found if found is not None else frozenset()

    async def _own_view(self, room_id: UUID, asking: UUID) -> Members:
        """The room as ``asking`` sees it, read for this call alone (never cached)."""
        return await self._load(room_id, asking)

    async def _miss(
        self, room_id: UUID, asking: UUID | None, key: str, *, again: bool, up: bool
    ) -> Members | _Cached:
        """Load ``room_id`` once for all concurrent callers in this process.

        The first caller leads: it takes the fill lease, loads as itself, shares the list
        if it is a member's view, and fills Redis with it if it got the lease (taken
        before the load, so an invalidation after it deletes the lease and the fill is
        refused). The others wait for that load and use the list only if they are in it;
        otherwise they read as themselves. A caller whose "no set" answer is outdated (the
        set was filled since) is told to ask Redis again.

        Args:
            room_id: the room.
            asking: the caller (``None``: no one in particular).
            key: the room's entry.
            again: whether the caller may ask Redis again (once) instead of loading.
            up: whether Redis answered the caller's probe; if not, a leader loads without
                trying for a lease, so a frozen Redis costs one timeout, not two.

        Returns:
            The members as the caller may see them, or :data:`_CACHED` (ask again).
        """
        self.stats.misses += 1
        flight = self._flights.get(room_id)
        if flight is not None:
            # Shielded: a waiter cancelled must not cancel the load the others wait for.
            shared = await asyncio.shield(flight)
            if isinstance(shared, _Cached):
                return shared if again else await self._load(room_id, asking)
            if shared is not None and (asking is None or asking in shared):
                self.stats.shared += 1
                return shared
            return await self._load(room_id, asking)
        flight = asyncio.get_running_loop().create_future()
        self._flights[room_id] = flight
        lease: bytes | None = None
        try:
            lease, cached = await self._lease(key) if up else (None, False)
            if cached and again:
                flight.set_result(_CACHED)
                return _CACHED
            self.stats.loads += 1
            loaded = await self._loader(room_id, asking)
            shared_list = None if isinstance(loaded, Unshared) else loaded
            # Waiters go on with the list while it is stored; the flight stays registered
            # until then, so a caller whose "no set" answer predates the fill joins it.
            flight.set_result(shared_list)
            if lease is not None and shared_list is not None:
                await self._store(key, lease, shared_list)
                lease = None
        finally:
            if not flight.done():
                flight.set_result(None)  # failed or cancelled: the waiters load themselves
            if self._flights.get(room_id) is flight:
                del self._flights[room_id]
            if lease is not None:
                await self._give_back(key, lease)
        found = _value(loaded)
        return found if found is not None else frozenset()

    async def _lease(self, key: str) -> tuple[bytes | None, bool]:
        """A fill lease on ``key``, and whether a set is cached there now.

        The lease is ``None`` when another process holds one, or Redis failed.
        """
        lease = _LEASE + secrets.token_bytes(12)
        try:
            with self._client.guard("cache.lease"):
                taken = await self._take_lease(keys=[key], args=[lease, self._lease_ms, _LEASE])
        except ChatkeepError as exc:
            self._failed("lease", exc)
            return None, False
        return (lease if taken == 1 else None), taken == 2

    async def _store(self, key: str, lease: bytes, members: Members) -> None:
        if not members:
            await self._give_back(key, lease)
            return
        ids = [str(member) for member in members]
        try:
            with self._client.guard("cache.fill"):
                if await self._fill(keys=[key], args=[lease, self._ttl_ms, *ids]):
                    self.stats.fills += 1
        except ChatkeepError as exc:
            self._failed("fill", exc)

    async def _give_back(self, key: str, lease: bytes) -> None:
        try:
            with self._client.guard("cache.release"):
                await asyncio.shield(self._release(keys=[key], args=[lease]))
        except ChatkeepError as exc:
            self._failed("release", exc)

    async def invalidate(self, *room_ids: UUID) -> bool:
        """Drop the cached member sets (after a join, leave, role change or deletion).

        Also deletes any fill lease, so a load that began before this call stores
        nothing, and detaches this process's loads in flight, so no later caller waits
        for one of them.

        Returns:
            ``True`` if Redis took the deletion; ``False`` if it is down (sets then
            expire with their TTL). Never raises for Redis errors.

        Raises:
            InvalidInput: an id is not a UUID (named ``room_ids``, as called).
        """
        try:
            keys = [self.key(room) for room in room_ids]
        except InvalidInput as exc:
            raise InvalidInput("room_ids", exc.rule) from None
        for room in room_ids:
            self._flights.pop(room, None)
        return await self._delete(keys)

    def queue_invalidate(self, pipe: Pipeline | ClusterPipeline, *room_ids: UUID) -> None:
        """:meth:`invalidate`, its deletions queued on ``pipe`` (sent with its other work).

        Loads in flight are detached now; the caller reports the outcome of
        ``pipe.execute()`` through :meth:`invalidated`.

        Raises:
            InvalidInput: an id is not a UUID (named ``room_ids``, as called).
        """
        try:
            keys = [self.key(room) for room in room_ids]
        except InvalidInput as exc:
            raise InvalidInput("room_ids", exc.rule) from None
        for room in room_ids:
            self._flights.pop(room, None)
        for key in keys:
            pipe.delete(key)

    def invalidated(self, error: BaseException | None) -> None:
        """Record how deletions queued by :meth:`queue_invalidate` went (``None``: taken)."""
        if error is None:
            self._recovered()
        else:
            self._failed("invalidate", error)


class UserProfileCache(ReadThroughCache[T]):
    """User profiles by user id, cached (``cache:user:{userId}``).

    Args:
        client: the shared Redis connection.
        loader: reads a user's profile from PostgreSQL (``None`` if there is none).
        serializer: stores profiles as bytes (``JsonSerializer(User)``).
        ttl: how long a profile is kept (default 5 minutes).
        negative_ttl: how long "no such user" is remembered (default: not at all).
    """

    def __init__(
        self,
        client: RedisClient,
        loader: Loader[T],
        serializer: Serializer[T],
        *,
        ttl: float = 300.0,
        negative_ttl: float = 0.0,
    ) -> None:
        super().__init__(
            client, "user", loader=loader, serializer=serializer, ttl=ttl, negative_ttl=negative_ttl
        )


class MessageRoomCache(_RedisCache):
    """The room of a message id (``cache:message_room:{messageId}``), a hint for Citus.

    On Citus a call that names a message by its id alone (a thread) must first find the
    message's room, and a look-up without the room reads every shard.
    The thread repository (storage, ``RoomHints``) asks this cache first and checks
    what it says by a single-shard statement under row security, so an entry grants
    nothing: a stale or forged one costs a look-up and the answer is the database's. A
    message never changes room, so nothing is invalidated: entries just age out.

    Filled by the send (which knows the room) and by a look-up that had to read every
    shard. Never raises: with Redis down :meth:`room_of` answers ``None`` and
    :meth:`remember` forgets (logged once per outage, counted in :attr:`stats`).

    Args:
        client: the shared Redis connection.
        ttl: how long an entry is kept (default one day).
        timeout: seconds a call may wait for Redis (default: the client's operation
            timeout); the caller is holding a transaction open meanwhile.
    """

    def __init__(
        self, client: RedisClient, *, ttl: float = 86400.0, timeout: float | None = None
    ) -> None:
        super().__init__(client, "message_room", id_field="message_id")
        self._ttl_ms = max(1, round(seconds(ttl, "ttl", maximum=30 * 86400.0) * 1000))
        self._timeout = None if timeout is None else seconds(timeout, "timeout", maximum=60.0)

    async def room_of(self, message_id: UUID) -> UUID | None:
        """The room remembered for ``message_id``, or ``None`` (unknown, or Redis down).

        Raises:
            InvalidInput: ``message_id`` is not a UUID.
        """
        key = self.key(message_id)
        try:
            with self._client.guard("cache.message_room", timeout=self._timeout):
                found = await self._client.redis.get(key)
        except ChatkeepError as exc:
            self._failed("get", exc)
            return None
        self._recovered()
        if found is None:
            self.stats.misses += 1
            return None
        try:
            room = UUID(found.decode() if isinstance(found, bytes) else str(found))
        except (ValueError, UnicodeDecodeError):
            self.stats.misses += 1  # not ours: the next look-up overwrites it
            return None
        self.stats.hits += 1
        return room

    async def remember(self, room_id: UUID, *message_ids: UUID) -> None:
        """Remember that ``message_ids`` are messages of ``room_id`` (one pipeline).

        Raises:
            InvalidInput: an id is not a UUID.
        """
        await self.remember_many((message_id, room_id) for message_id in message_ids)

    async def remember_many(self, pairs: Iterable[tuple[UUID, UUID]]) -> None:
        """Remember each ``(message_id, room_id)`` pair, all in one pipeline.

        Raises:
            InvalidInput: an id is not a UUID.
        """
        entries: list[tuple[str, str]] = []
        for message_id, room_id in pairs:
            if not isinstance(room_id, UUID):
                raise InvalidInput("room_id", "must be a UUID")
            entries.append((self.key(message_id), str(room_id)))
        if not entries:
            return
        try:
            with self._client.guard("cache.message_room", timeout=self._timeout):
                # One SET per key: in cluster mode the keys live in different slots.
                pipe = self._client.pipeline()
                for key, value in entries:
                    pipe.set(key, value, px=self._ttl_ms)
                await pipe.execute()
        except ChatkeepError as exc:
            self._failed("fill", exc)
            return
        self._recovered()
        self.stats.fills += len(entries)
