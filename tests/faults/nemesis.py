"""The faults: what each scenario does to the stores while the workload runs, and how long.

Each scenario repeats one fault on a schedule until the workload's time is up, and always
heals before it returns (even when cancelled), so the checks read a store that is back:

=========================  ==============================================================
``pg restart -m fast``     ``pg_ctl stop -m fast`` (sessions ended, a checkpoint), start
``pg restart -m immediate`` ``pg_ctl stop -m immediate`` (a crash; WAL replay), start
``pg terminate backends``  ``pg_terminate_backend`` of every ``chatapp_app`` session
``redis restart``          ``SIGKILL``, start again on the same port (empty: no save)
``redis freeze``           ``SIGSTOP`` ... ``SIGCONT``: accepts, answers nothing
``pg blackhole``           the proxy swallows PostgreSQL traffic: no RST, no FIN, silence
``redis blackhole``        the same for Redis
=========================  ==============================================================

The size (:data:`SIZES`, chosen by ``CHATKEEP_FAULTS=small|full``) sets how many senders
run, for how long, and the fault schedule. Freezes and black holes last longer than the
send bound, so a call that relies on the store answering shows up over the bound.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from chatkeep.storage.bootstrap import APP_ROLE
from tests.faults.proxy import FaultProxy
from tests.servers import PostgresServer, RedisServer

__all__ = ["SCENARIOS", "SIZES", "Cluster", "Size", "chosen_size"]

# The application's sessions on the scenario's database; never anyone else's.
TERMINATE_APP_SESSIONS: Final = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
  FROM pg_stat_activity
 WHERE datname = $1 AND usename = $2 AND pid <> pg_backend_pid()
"""


@dataclass(frozen=True, slots=True)
class Size:
    """How big a run is.

    Attributes:
        name: ``small`` (CI) or ``full``.
        senders: senders, each in a room of its own (with one subscriber per room).
        duration: seconds the senders start new messages while faults are injected.
        interval: pause between two messages of a sender.
        message_deadline: seconds a message is retried before its sender gives up.
        first: seconds before the first fault.
        every: seconds from one fault's start to the next.
        down: seconds a restarted server stays down.
        long_extra: seconds a freeze or black hole lasts beyond the send bound.
        terminate_every: seconds between two rounds of ``pg_terminate_backend``.
    """

    name: str
    senders: int
    duration: float
    interval: float
    message_deadline: float
    first: float
    every: float
    down: float
    long_extra: float
    terminate_every: float


SIZES: Final = {
    "small": Size(
        name="small",
        senders=4,
        duration=5.5,
        interval=0.05,
        message_deadline=30.0,
        first=0.5,
        every=2.5,
        down=1.0,
        long_extra=0.5,
        terminate_every=1.0,
    ),
    "full": Size(
        name="full",
        senders=20,
        duration=180.0,
        interval=0.05,
        message_deadline=60.0,
        first=2.0,
        every=15.0,
        down=3.0,
        long_extra=5.0,
        terminate_every=3.0,
    ),
}


def chosen_size() -> Size:
    """The size ``CHATKEEP_FAULTS`` names (``small`` when unset)."""
    name = os.environ.get("CHATKEEP_FAULTS", "small")
    if name not in SIZES:
        raise ValueError(f"CHATKEEP_FAULTS must be one of {sorted(SIZES)}, not {name!r}")
    return SIZES[name]


@dataclass(frozen=True, slots=True)
class Cluster:
    """The stores a scenario faults, and the proxies the application reaches them through."""

    postgres: PostgresServer
    redis: RedisServer
    postgres_proxy: FaultProxy
    redis_proxy: FaultProxy
    database: str
    size: Size
    bound: float

    @property
    def long(self) -> float:
        """Seconds a freeze or black hole lasts."""
        return self.bound + self.size.long_extra


Action = Callable[[], Awaitable[object]]


async def _nothing() -> None:
    return None


async def _repeat(
    cluster: Cluster, until: float, every: float, length: float, fault: Action, heal: Action
) -> int:
    """Inject ``fault``, wait ``length``, ``heal``; again every ``every`` s until ``until``."""
    at = time.monotonic() + cluster.size.first
    done = 0
    while at + length < until:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await fault()
        try:
            await asyncio.sleep(length)
        finally:
            await heal()
        done += 1
        at += max(every, length + 0.5)
    return done


async def pg_restart_fast(cluster: Cluster, until: float) -> int:
    """Stop PostgreSQL with ``-m fast``, start it again."""
    pg = cluster.postgres
    return await _repeat(
        cluster,
        until,
        cluster.size.every,
        cluster.size.down,
        lambda: asyncio.to_thread(pg.stop, "fast"),
        lambda: asyncio.to_thread(pg.start),
    )


async def pg_restart_immediate(cluster: Cluster, until: float) -> int:
    """Stop PostgreSQL with ``-m immediate`` (no checkpoint: a crash), start it again."""
    pg = cluster.postgres
    return await _repeat(
        cluster,
        until,
        cluster.size.every,
        cluster.size.down,
        lambda: asyncio.to_thread(pg.stop, "immediate"),
        lambda: asyncio.to_thread(pg.start),
    )


async def pg_terminate_backends(cluster: Cluster, until: float) -> int:
    """``pg_terminate_backend`` of the application's sessions, every few seconds."""

    async def terminate() -> None:
        admin = await asyncpg.connect(cluster.postgres.url())
        try:
            await admin.fetchval(TERMINATE_APP_SESSIONS, cluster.database, APP_ROLE)
        finally:
            await admin.close()

    return await _repeat(cluster, until, cluster.size.terminate_every, 0.0, terminate, _nothing)


async def redis_restart(cluster: Cluster, until: float) -> int:
    """Kill Redis (``SIGKILL``), start it again on the same port, empty."""
    server = cluster.redis
    return await _repeat(
        cluster,
        until,
        cluster.size.every,
        cluster.size.down,
        lambda: asyncio.to_thread(server.stop, kill=True),
        lambda: asyncio.to_thread(server.start),
    )


async def redis_freeze(cluster: Cluster, until: float) -> int:
    """``SIGSTOP`` Redis for longer than the send bound, then ``SIGCONT``."""
    server = cluster.redis
    return await _repeat(
        cluster,
        until,
        cluster.size.every,
        cluster.long,
        lambda: asyncio.to_thread(server.freeze),
        lambda: asyncio.to_thread(server.thaw),
    )


def _blackhole(proxy: FaultProxy) -> tuple[Action, Action]:
    async def start() -> None:
        proxy.blackhole()

    async def heal() -> None:
        proxy.heal()

    return start, heal


async def pg_blackhole(cluster: Cluster, until: float) -> int:
    """Swallow PostgreSQL's traffic for longer than the send bound."""
    start, heal = _blackhole(cluster.postgres_proxy)
    return await _repeat(cluster, until, cluster.size.every, cluster.long, start, heal)


async def redis_blackhole(cluster: Cluster, until: float) -> int:
    """Swallow Redis's traffic for longer than the send bound."""
    start, heal = _blackhole(cluster.redis_proxy)
    return await _repeat(cluster, until, cluster.size.every, cluster.long, start, heal)


Nemesis = Callable[[Cluster, float], Coroutine[Any, Any, int]]

SCENARIOS: Final[dict[str, Nemesis]] = {
    "pg restart -m fast": pg_restart_fast,
    "pg restart -m immediate": pg_restart_immediate,
    "pg terminate backends": pg_terminate_backends,
    "redis restart": redis_restart,
    "redis freeze": redis_freeze,
    "pg blackhole": pg_blackhole,
    "redis blackhole": redis_blackhole,
}
"""Every scenario by the name its table row carries; each returns how many faults it made."""
