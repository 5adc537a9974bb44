"""Read replicas: a pool per streaming replica, their measured lag, and the routing rule.

:class:`ReplicaSet` belongs to a :class:`~chatkeep.storage.database.Database` whose
settings name replicas (``CHATKEEP_REPLICA_URLS``); :meth:`Database.read_as
<chatkeep.storage.database.Database.read_as>` asks it where a read may go.

How fresh a replica is, without a clock shared between servers: every
``replica_check_interval`` the set reads the primary's WAL position
(``pg_current_wal_lsn()``), noting when it *sent* the question, then each replica's replay
position (``pg_last_wal_replay_lsn()``). A replica whose replay position has reached a
primary sample taken at time ``t`` holds every transaction that committed before ``t``
(a commit is flushed before COMMIT returns, and the sample is taken after). That ``t`` is
the replica's :attr:`ReplicaState.fresh_as_of`; its lag is ``now - fresh_as_of`` (on this
process's monotonic clock; an idle primary does not make a replica look stale).

The routing rule (:meth:`ReplicaSet.choose`): a read may go to a replica that is up, whose
lag is at most ``replica_max_lag``, and which is fresh as of the reader's own last write
(``fresh_since``, a monotonic time taken after that write's COMMIT returned); otherwise it
goes to the primary, and the reason is counted (:data:`FALLBACK_REASONS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from chatkeep.config import Settings, redact_url
from chatkeep.errors import ChatkeepError

if TYPE_CHECKING:
    from chatkeep.storage.database import Database

__all__ = ["FALLBACK_REASONS", "READ_TARGETS", "ReplicaSet", "ReplicaState"]

logger = logging.getLogger("chatkeep.storage.replicas")

READ_TARGETS: Final = ("primary", "replica")
"""Where a routed read went (the ``target`` label of ``chatkeep_db_reads_total``)."""

FALLBACK_REASONS: Final = (
    "unchecked",  # no replica measured yet (just opened)
    "down",  # no replica answered its last check (or it is not a standby)
    "lag",  # every replica that is up is further behind than replica_max_lag
    "own_write",  # the reader wrote after the freshest replica's position
    "fence_unknown",  # the shared record of the reader's writes (Redis) did not answer
    "error",  # the read failed on the replica (it went away): done again on the primary
    "refused",  # the replica answered NotFound/PermissionDenied: asked the primary
    "transaction",  # the read joined the caller's open transaction (on the primary)
)
"""Why a routed read went to the primary (``chatkeep_db_replica_fallbacks_total``)."""

_PRIMARY_LSN: Final = "SELECT pg_current_wal_lsn()"
# NULL on a server that is not in recovery (a primary, or a promoted replica): not usable.
_REPLAY_LSN: Final = "SELECT pg_last_wal_replay_lsn()"


@dataclass(slots=True)
class ReplicaState:
    """One replica: its pool and what its last check found."""

    name: str
    """The replica's URL without its password (for logs and metric labels)."""
    db: Database
    up: bool = False
    """Whether it answered its last check as a standby."""
    replay_lsn: int | None = None
    fresh_as_of: float | None = None
    """Monotonic time of the newest primary sample it has replayed past, or ``None``."""
    last_error: str | None = None

    def lag(self, now: float | None = None) -> float | None:
        """Seconds since :attr:`fresh_as_of` (``None`` before it was ever measured)."""
        if self.fresh_as_of is None:
            return None
        return max(0.0, (time.monotonic() if now is None else now) - self.fresh_as_of)


@dataclass(slots=True)
class _Counters:
    reads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(READ_TARGETS, 0))
    fallbacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FALLBACK_REASONS, 0))


class ReplicaSet:
    """The replicas of one primary, checked in the background, and the routing rule.

    Args:
        primary: the primary's database (its WAL position is sampled through it).
        urls: the replicas' URLs.
        settings: ``replica_max_lag``, ``replica_check_interval`` and the pool options.
        application_name: ``application_name`` of the replica pools' sessions.
    """

    def __init__(
        self,
        primary: Database,
        urls: Sequence[str],
        settings: Settings,
        *,
        application_name: str | None = None,
    ) -> None:
        # Imported here: database.py imports this module.
        from chatkeep.storage.database import Database

        self._primary = primary
        self.max_lag = settings.replica_max_lag
        self.check_interval = settings.replica_check_interval
        # The replicas' own pools have no replicas of their own.
        own = settings.model_copy(update={"replica_urls": ()})
        self.replicas: tuple[ReplicaState, ...] = tuple(
            ReplicaState(
                name=redact_url(url),
                db=Database(own, dsn=url, application_name=application_name),
            )
            for url in urls
        )
        # (monotonic time the question was sent, the primary's WAL position): newest last.
        self._samples: deque[tuple[float, int]] = deque()
        self._counters = _Counters()
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        # A check that hangs (a frozen server) must not stall the next ones for long.
        self._check_timeout = max(1.0, self.max_lag)

    def __repr__(self) -> str:
        return f"<ReplicaSet {[r.name for r in self.replicas]} max_lag={self.max_lag:g}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every replica once (a replica that is down is only noted), then keep checking.

        Never raises for a replica: reads go to the primary until it answers.
        """
        await self.check()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._keep_checking(), name="chatkeep-replica-check"
            )

    async def close(self) -> None:
        """Stop checking and close the replica pools."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for replica in self.replicas:
            with contextlib.suppress(ChatkeepError):
                await replica.db.close()
            replica.up = False

    async def _keep_checking(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.check()
            except Exception:  # pragma: no cover - check() handles what it expects
                logger.exception("replica check failed")

    # -- measuring ---------------------------------------------------------------------------

    async def check(self) -> None:
        """Sample the primary's WAL position, then each replica's replay position."""
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self._check_timeout):
                lsn = await self._primary.fetchval("replicas.primary_lsn", _PRIMARY_LSN)
        except (ChatkeepError, TimeoutError) as exc:
            # Without a new sample the replicas' freshness stops advancing: their lag grows
            # until reads fall back to the primary, which is the safe direction.
            logger.warning("replica check: the primary's WAL position is unknown: %s", exc)
        else:
            self._samples.append((sent, int(lsn)))
        self._forget_old_samples(sent)
        for replica in self.replicas:
            await self._check_one(replica)

    def _forget_old_samples(self, now: float) -> None:
        # Samples older than max_lag cannot make a replica usable; one is kept anyway, so
        # a replica that has passed it is still known to be (too far) behind.
        horizon = now - self.max_lag - 2 * self.check_interval
        while len(self._samples) > 1 and self._samples[0][0] < horizon:
            self._samples.popleft()

    async def _check_one(self, replica: ReplicaState) -> None:
        try:
            async with asyncio.timeout(self._check_timeout):
                if not replica.db.is_open:
                    await replica.db.open()
                replay = await replica.db.fetchval("replicas.replay_lsn", _REPLAY_LSN)
        except (ChatkeepError, TimeoutError) as exc:
            self._went_down(replica, str(exc) or exc.__class__.__name__)
            return
        if replay is None:
            self._went_down(replica, "not a standby (pg_last_wal_replay_lsn() is NULL)")
            return
        if not replica.up:
            logger.info("replica %s is up", replica.name)
        replica.up = True
        replica.last_error = None
        replica.replay_lsn = int(replay)
        for sent, lsn in reversed(self._samples):
            if lsn <= replica.replay_lsn:
                if replica.fresh_as_of is None or sent > replica.fresh_as_of:
                    replica.fresh_as_of = sent
                break

    def _went_down(self, replica: ReplicaState, why: str) -> None:
        if replica.up or replica.last_error is None:
            logger.warning("replica %s is not used: %s", replica.name, why)
        replica.up = False
        replica.last_error = why

    def failed(self, replica: ReplicaState, exc: BaseException) -> None:
        """A read on ``replica`` failed as unavailable: stop using it until its next check."""
        self._went_down(replica, str(exc) or exc.__class__.__name__)

    # -- routing -----------------------------------------------------------------------------

    def choose(self, fresh_since: float | None = None) -> tuple[ReplicaState | None, str]:
        """The replica a read may use, or ``None`` and the reason it may not.

        Args:
            fresh_since: the monotonic time after the reader's own last write committed
                (``None``: no write to wait for). A replica must be fresh as of it.

        Returns:
            ``(replica, "")``, or ``(None, reason)`` with a reason of
            :data:`FALLBACK_REASONS`. Replicas that qualify take turns.
        """
        now = time.monotonic()
        up = [r for r in self.replicas if r.up]
        if not up:
            unchecked = all(r.last_error is None for r in self.replicas)
            return None, "unchecked" if unchecked else "down"
        close = [r for r in up if r.fresh_as_of is not None and now - r.fresh_as_of <= self.max_lag]
        if not close:
            return None, "lag"
        if fresh_since is not None:
            close = [r for r in close if r.fresh_as_of is not None and r.fresh_as_of >= fresh_since]
            if not close:
                return None, "own_write"
        self._next = (self._next + 1) % len(close)
        return close[self._next], ""

    def count_read(self, target: str, reason: str = "") -> None:
        """Count one routed read (``target`` of :data:`READ_TARGETS`) and its fallback reason."""
        self._counters.reads[target] += 1
        if reason:
            self._counters.fallbacks[reason] += 1

    @property
    def reads(self) -> dict[str, int]:
        """Routed reads so far, by target (a copy)."""
        return dict(self._counters.reads)

    @property
    def fallbacks(self) -> dict[str, int]:
        """Routed reads that went to the primary, by reason (a copy)."""
        return dict(self._counters.fallbacks)
