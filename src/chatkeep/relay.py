"""The outbox relay: announce committed changes whose writer never published them.

A writer commits its change (PostgreSQL: the room's log takes the next position) and then
publishes the event; :meth:`~chatkeep.realtime.EventBus.publish_many` also moves the room's
*published mark* (``room:{id}:published``, forward only) in the same round trip. A writer
that dies between the commit and the publish (or whose Redis refused it) leaves the room's
position ahead of its mark. The relay finds such rooms and publishes one
:class:`~chatkeep.realtime.ChangesAvailable` per room at the room's position, so idle
subscribers learn of the change within a bounded delay; a subscriber reads the changes
themselves from the log (:class:`~chatkeep.stream.ChangeStream` does), and
:class:`~chatkeep.realtime.EventSubscription` drops any duplicate by position.

One relay leads per deployment: the one holding a PostgreSQL session advisory lock on its
own connection (:data:`RELAY_LOCK_KEY`). The others wait and try again every
``standby_interval``; when the leader's process dies, its session ends, the server frees
the lock and a standby takes over. Leader election by LISTEN/NOTIFY was weighed: it needs a
trigger change on every write path and still needs a lock to pick one relay.

Each ``interval`` the leader reads every room's position (``rooms.id, rooms.position``:
one sequential read of a narrow table) and keeps the previous answer in memory; for the
rooms whose position moved it reads their published marks (one Redis round trip). A room
whose mark stays behind its position for ``grace`` seconds (the writer's own publish
normally lands within milliseconds of its commit) gets a nudge. A change is therefore
announced at most about ``2 * interval + grace`` after its commit (0.45 s by default). A
room seen for the first time with no mark at all (Redis lost its data, or the mark expired
after :data:`~chatkeep.realtime.PUBLISHED_TTL` without changes) is adopted as published:
a Redis restart already told every subscriber to catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Final
from uuid import UUID

import asyncpg

from chatkeep._tasks import stop_if_asked
from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.events import ChangesAvailable, EventBus
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors

__all__ = ["RELAY_LOCK_KEY", "OutboxRelay", "RelayStats"]

logger = logging.getLogger("chatkeep.relay")

RELAY_LOCK_KEY: Final = 0x63686B72656C6179
"""The advisory lock (``pg_try_advisory_lock``) the leading relay holds: b"chkrelay"."""

ROOM_POSITIONS: Final = "SELECT id, position FROM rooms WHERE position > 0"
TRY_LOCK: Final = "SELECT pg_try_advisory_lock($1)"
# chatapp_app sees only the acting user's rooms: the relay would find nothing to do.
CONFINED_ROLE: Final = """
SELECT current_user = 'chatapp_app'
    OR (pg_has_role(current_user, 'chatapp_app', 'MEMBER')
        AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user))
"""
_MAX_NUDGES_PER_ROUND_TRIP: Final = 500


@dataclass(slots=True)
class RelayStats:
    """What the relay did, for tests and metrics.

    Attributes:
        ticks: rounds run as the leader.
        nudges: rooms announced (each one a :class:`ChangesAvailable`).
        leaderships: times this relay became the leader.
    """

    ticks: int = 0
    nudges: int = 0
    leaderships: int = 0


def _seconds(value: object, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidInput(field, f"must be a number of seconds from {low:g} to {high:g}")
    return float(value)


class OutboxRelay:
    """Publishes the changes writers committed but did not announce (see the module).

    Args:
        bus: the event bus to publish on (publishing moves the published marks).
        redis: the Redis client holding the published marks (the bus's).
        settings: connection options (timeouts, TLS).
        database_url: a URL whose role sees every room (``chatapp_readonly``, the owner,
            or a superuser); ``chatapp_app`` is refused, since row security would show it
            nothing.
        interval: seconds between the leader's rounds.
        grace: seconds a room's mark may lag its position before the relay announces it.
        standby_interval: seconds between a standby's attempts to become the leader.

    Raises:
        InvalidInput: a timing option is out of range.
    """

    def __init__(
        self,
        bus: EventBus,
        redis: RedisClient,
        settings: Settings,
        database_url: str,
        *,
        interval: float = 0.1,
        grace: float = 0.25,
        standby_interval: float = 1.0,
    ) -> None:
        self._bus = bus
        self._redis = redis
        self._settings = settings
        self._dsn = database_url
        self.interval = _seconds(interval, "interval", 0.01, 60.0)
        self.grace = _seconds(grace, "grace", 0.0, 60.0)
        self.standby_interval = _seconds(standby_interval, "standby_interval", 0.01, 600.0)
        self.stats = RelayStats()
        self._leader = False
        self._known: dict[UUID, int] = {}
        self._lagging: dict[UUID, float] = {}

    @property
    def is_leader(self) -> bool:
        """True while this relay holds the lock."""
        return self._leader

    async def run(self) -> None:
        """Lead or stand by, forever (run it as a task; cancel it to stop).

        A lost database or Redis is logged and retried; only a misconfiguration ends it.

        Raises:
            ConfigurationError: the URL's role is ``chatapp_app`` (it cannot see every
                room), or its credentials are wrong.
        """
        while True:
            try:
                await self._session()
            except ConfigurationError:
                raise
            except ChatkeepError as exc:
                stop_if_asked()  # the stop request came back as a call's own error
                logger.warning("outbox relay: %s; retrying in %.1f s", exc, self.standby_interval)
            stop_if_asked()
            await asyncio.sleep(self.standby_interval)

    async def _session(self) -> None:
        """One database session: wait for the lock, then lead until the session fails."""
        conn = await connect(
            self._dsn, self._settings, application_name="chatkeep-relay", operation="relay"
        )
        try:
            with translate_errors("relay.check_role"):
                confined = await conn.fetchval(CONFINED_ROLE)
            if confined:
                raise ConfigurationError(
                    "relay_database_url: the relay needs a role that sees every room "
                    "(chatapp_readonly, say), not chatapp_app",
                    field="relay_database_url",
                )
            locked = await self._try_lock(conn)
            while not locked:
                stop_if_asked()
                await asyncio.sleep(self.standby_interval)
                locked = await self._try_lock(conn)
            self._leader = True
            self.stats.leaderships += 1
            self._known.clear()
            self._lagging.clear()
            logger.info("outbox relay: leading")
            while True:
                await self._tick(conn)
                stop_if_asked()
                await asyncio.sleep(self.interval)
        finally:
            self._leader = False
            # Closing the session frees the lock for a standby.
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.close(timeout=1.0))

    async def _try_lock(self, conn: asyncpg.Connection) -> bool:
        with translate_errors("relay.lock"):
            return bool(await conn.fetchval(TRY_LOCK, RELAY_LOCK_KEY))

    async def _marks(self, rooms: list[UUID]) -> dict[UUID, int | None]:
        """Each room's published mark (``None``: no mark kept), in one round trip per node.

        The marks are one-member sorted sets (``ZADD GT`` in the publish pipeline): read
        with ``ZSCORE``, as an ``MGET`` would see none of them (and on a cluster would
        refuse keys of several slots).
        """
        return await self._bus.published_marks(rooms)

    async def _tick(self, conn: asyncpg.Connection) -> int:
        """One round as the leader; returns how many rooms it announced.

        Raises:
            Unavailable: PostgreSQL or Redis could not be reached.
        """
        self.stats.ticks += 1
        with translate_errors("relay.positions"):
            rows = await conn.fetch(ROOM_POSITIONS)
        moved = {
            row["id"]: row["position"]
            for row in rows
            if self._known.get(row["id"]) != row["position"] or row["id"] in self._lagging
        }
        if not moved:
            return 0
        marks = await self._marks(list(moved))
        now = time.monotonic()
        due: list[ChangesAvailable] = []
        for room, position in moved.items():
            mark = marks[room]
            first_sight = room not in self._known
            if mark is None and first_sight:
                mark = position  # nothing to compare with: adopt it (see the module)
            elif mark is None:
                mark = self._known[room]
            if mark >= position:
                self._known[room] = position
                self._lagging.pop(room, None)
                continue
            since = self._lagging.setdefault(room, now)
            if now - since >= self.grace:
                due.append(ChangesAvailable(room_id=room, position=position, after=mark))
            else:
                self._known.setdefault(room, mark)
        for start in range(0, len(due), _MAX_NUDGES_PER_ROUND_TRIP):
            batch = due[start : start + _MAX_NUDGES_PER_ROUND_TRIP]
            await self._bus.publish_many(batch)  # moves the marks too
            for nudge in batch:
                self._known[nudge.room_id] = nudge.position
                self._lagging.pop(nudge.room_id, None)
        if due:
            self.stats.nudges += len(due)
            logger.info("outbox relay: announced %d room(s) their writers did not", len(due))
        return len(due)
