"""Prometheus metrics: store health, the pool, operations, Redis, pub/sub, rate limits, errors.

Install the extra: ``pip install 'chatkeep[metrics]'`` (``prometheus-client``).

Three kinds of metric live in one :class:`ChatkeepMetrics` registry:

* **Probed at scrape time**: whether each store answers and its round trip
  (``chatkeep_db_up``, ``chatkeep_redis_up``, ``chatkeep_*_ping_seconds``). A scrape runs
  one ping per store on the event loop that owns the stores, bounded by
  ``probe_timeout``, and scrapes within ``cache_seconds`` of it share its answer, so a
  storm of scrapes does not hammer the stores. Nothing needs to call anything for these
  to be right; ``chatkeep_probe_age_seconds`` says how old the answer is.
* **Read at scrape time** from the objects you hand it: the pool's capacity and use, the
  per-operation error and slow counters a :class:`~chatkeep.storage.database.Database`
  keeps (``db.stats``), failed connection attempts
  (:func:`chatkeep.storage.security.connection_failures`), and the Redis client's pub/sub
  reconnects.
* **Recorded as things happen**, through hooks that :meth:`ChatkeepMetrics.attach`
  installs on the pool and the Redis client itself: pool waits, named database operations
  and Redis commands (histograms), facade operations (:meth:`ChatkeepMetrics.time_operation`,
  fed by :class:`chatkeep.ChatKeep`), pub/sub deliveries, gaps, rate-limit rejections and
  errors by class.

How a scrape reaches the event loop, and why: ``collect()`` is synchronous. Scraped from
another thread (``start_http_server``, ``chatkeep metrics``), it hands the probe to the
stores' loop with ``asyncio.run_coroutine_threadsafe`` and waits at most
``probe_timeout`` + 1 s; a loop too busy to answer in that time leaves the previous
answer in place (its age grows: alert on it). Scraped on the loop itself (an ASGI app),
it cannot wait without blocking the loop, so :meth:`ChatkeepMetrics.asgi_app` probes
before it renders: use it instead of ``prometheus_client.make_asgi_app``, whose scrapes
report the last probe (none until something calls :meth:`ChatkeepMetrics.sample`).
Applications mount the registry on their own server::

    metrics = ChatkeepMetrics()
    async with ChatKeep.connect(settings, metrics=metrics) as chat:
        app.mount("/metrics", metrics.asgi_app())

``chatkeep metrics`` (port :data:`DEFAULT_PORT`) serves a registry of its own for a quick
look. Every family is listed in ``docs/operations.md``; :data:`FAMILIES` names them.

The sources are described by small protocols (:class:`DatabaseSource`,
:class:`RedisSource`), so anything shaped like chatkeep's ``Database`` and ``RedisClient``
(a test double, a wrapper) can be measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from chatkeep import __version__
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    RateLimited,
    Unavailable,
)
from chatkeep.ops.deploy import DEFAULT_PORT
from chatkeep.storage.replicas import FALLBACK_REASONS, READ_TARGETS, ReplicaSet

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        make_asgi_app,
        start_http_server,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    raise ConfigurationError(
        "metrics need the 'metrics' extra: pip install 'chatkeep[metrics]'", field="metrics"
    ) from exc

__all__ = [
    "DEFAULT_PORT",
    "FAMILIES",
    "REPLICA_FAMILIES",
    "ChatkeepMetrics",
    "ConnectionFailure",
    "DatabaseSource",
    "OperationCounters",
    "PoolSource",
    "RedisSource",
]

FAMILIES: Final = (
    "chatkeep_build_info",
    "chatkeep_db_up",
    "chatkeep_db_ping_seconds",
    "chatkeep_redis_up",
    "chatkeep_redis_ping_seconds",
    "chatkeep_probe_age_seconds",
    "chatkeep_db_pool_min",
    "chatkeep_db_pool_max",
    "chatkeep_db_pool_connections",
    "chatkeep_db_pool_waiting",
    "chatkeep_db_pool_acquire_seconds",
    "chatkeep_db_pool_long_waits_total",
    "chatkeep_operation_seconds",
    "chatkeep_db_statement_seconds",
    "chatkeep_db_statement_errors_total",
    "chatkeep_db_slow_statements_total",
    "chatkeep_db_connection_failures_total",
    "chatkeep_db_reads_total",
    "chatkeep_db_replica_fallbacks_total",
    "chatkeep_db_replica_lag_seconds",
    "chatkeep_db_replica_up",
    "chatkeep_redis_command_seconds",
    "chatkeep_redis_pubsub_reconnects_total",
    "chatkeep_pubsub_published_total",
    "chatkeep_pubsub_deliveries_total",
    "chatkeep_pubsub_received_total",
    "chatkeep_pubsub_gaps_total",
    "chatkeep_rate_limit_rejections_total",
    "chatkeep_errors_total",
)
"""Every metric family a :class:`ChatkeepMetrics` registry exposes (with its suffix)."""

REPLICA_FAMILIES: Final = ("chatkeep_db_replica_lag_seconds", "chatkeep_db_replica_up")
"""The families with one series per read replica: absent when none is configured."""


# A chat backend's calls: a cached read or a PING takes well under a millisecond, a send a
# few milliseconds, a history page tens; an outage pushes any of them to seconds.
LATENCY_BUCKETS: Final = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class OperationCounters(Protocol):
    """One named operation's counters (``chatkeep.storage.database.OperationStats``)."""

    @property
    def errors(self) -> int:
        """Calls that failed."""
        ...

    @property
    def slow(self) -> int:
        """Calls slower than the slow-query threshold."""
        ...


class PoolSource(Protocol):
    """The parts of an ``asyncpg.Pool`` the metrics read."""

    def get_size(self) -> int:
        """Open connections."""
        ...

    def get_idle_size(self) -> int:
        """Open connections not in use."""
        ...

    def get_min_size(self) -> int:
        """The pool's lower bound."""
        ...

    def get_max_size(self) -> int:
        """The pool's upper bound."""
        ...


class _Latency(Protocol):
    @property
    def latency_ms(self) -> float | None: ...


AcquireTimer = Callable[[], contextlib.AbstractContextManager[object]]
OperationObserver = Callable[[str, float, bool], None]
CommandTimer = Callable[[str], contextlib.AbstractContextManager[object]]


class DatabaseSource(Protocol):
    """What the metrics read from a database (``chatkeep.storage.Database``)."""

    acquire_timer: AcquireTimer | None
    """Wrapped around every pool acquire (set by :meth:`ChatkeepMetrics.attach`)."""

    operation_observer: OperationObserver | None
    """Told each named operation's name, duration and failure (set by ``attach``)."""

    @property
    def is_open(self) -> bool:
        """Whether the pool exists (a closed database reports no pool figures)."""
        ...

    @property
    def pool(self) -> PoolSource:
        """The connection pool."""
        ...

    @property
    def stats(self) -> Mapping[str, OperationCounters]:
        """Counters per named operation."""
        ...

    @property
    def pool_wait_stats(self) -> OperationCounters:
        """Counters of the waits for a pooled connection (``slow``: the long ones)."""
        ...

    async def health(self) -> _Latency:
        """One round trip; its latency."""
        ...


class _RedisHealth(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def latency_ms(self) -> float | None: ...


class RedisSource(Protocol):
    """What the metrics read from a Redis client (``chatkeep.realtime.RedisClient``)."""

    command_timer: CommandTimer | None
    """Wrapped around every command (set by :meth:`ChatkeepMetrics.attach`)."""

    @property
    def pubsub_reconnects(self) -> int:
        """How many times the pub/sub connection was re-established."""
        ...

    async def health(self) -> _RedisHealth:
        """Ping the server."""
        ...


class ConnectionFailure(Protocol):
    """A count of failed connection attempts (``storage.security.ConnectionFailureCount``)."""

    @property
    def host(self) -> str:
        """The server."""
        ...

    @property
    def role(self) -> str:
        """The role that tried to connect."""
        ...

    @property
    def reason(self) -> str:
        """Why it failed (no secrets)."""
        ...

    @property
    def count(self) -> int:
        """How often."""
        ...


def _default_failures() -> Sequence[ConnectionFailure]:
    from chatkeep.storage.security import connection_failures

    return connection_failures()


# Set while the stores are probed: a probe's failure says a store is down (``*_up``), it
# is not an error the application met, so chatkeep_errors_total leaves it out.
_PROBING: Final = contextvars.ContextVar("chatkeep_metrics_probing", default=False)


@dataclass(frozen=True, slots=True)
class _Probe:
    """One probe of both stores: ``None`` where that store is not being measured."""

    taken: float  # time.monotonic()
    db_seconds: float | None
    db_up: bool | None
    redis_seconds: float | None
    redis_up: bool | None


class _SourcesCollector(Collector):
    """Probes the stores and reads the pool, counters, connection failures and reconnects."""

    def __init__(self, owner: ChatkeepMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        yield from self._probe()
        yield from self._database()
        yield from self._failures()
        yield from self._redis()

    def _probe(self) -> Iterator[Metric]:
        owner = self._owner
        probe = owner._scrape_probe()
        if probe is None:
            return
        age = GaugeMetricFamily(
            "chatkeep_probe_age_seconds",
            "Seconds since the stores were last probed (grows when the event loop is stuck).",
        )
        age.add_metric([], max(0.0, time.monotonic() - probe.taken))
        yield age
        for store, up, seconds in (
            ("db", probe.db_up, probe.db_seconds),
            ("redis", probe.redis_up, probe.redis_seconds),
        ):
            if up is None:
                continue
            what = "PostgreSQL" if store == "db" else "Redis"
            yield GaugeMetricFamily(
                f"chatkeep_{store}_up",
                f"1 when {what} answered the last probe within the probe timeout, else 0.",
                value=1 if up else 0,
            )
            if seconds is not None:
                yield GaugeMetricFamily(
                    f"chatkeep_{store}_ping_seconds",
                    f"Round trip of the last {what} probe (absent while it is down).",
                    value=seconds,
                )

    def _database(self) -> Iterator[Metric]:
        database = self._owner.database
        if database is None:
            return
        if database.is_open:
            source = database.pool
            size, idle = source.get_size(), source.get_idle_size()
            yield GaugeMetricFamily(
                "chatkeep_db_pool_min",
                "Connections the pool keeps open at least (capacity).",
                value=source.get_min_size(),
            )
            yield GaugeMetricFamily(
                "chatkeep_db_pool_max",
                "Connections the pool may open at most (capacity).",
                value=source.get_max_size(),
            )
            use = GaugeMetricFamily(
                "chatkeep_db_pool_connections",
                "Open connections of the pool, idle or lent to a task (use; they sum to "
                "the open connections).",
                labels=["state"],
            )
            use.add_metric(["idle"], idle)
            use.add_metric(["busy"], size - idle)
            yield use
        errors = CounterMetricFamily(
            "chatkeep_db_statement_errors",
            "Named database operations that failed.",
            labels=["operation"],
        )
        slow = CounterMetricFamily(
            "chatkeep_db_slow_statements",
            "Named database operations slower than the slow-query threshold.",
            labels=["operation"],
        )
        for name, counters in sorted(dict(database.stats).items()):
            errors.add_metric([name], counters.errors)
            slow.add_metric([name], counters.slow)
        long_waits = CounterMetricFamily(
            "chatkeep_db_pool_long_waits",
            "Waits for a pooled connection of the slow-query threshold or more (an "
            "exhausted pool; never counted as slow statements).",
            value=database.pool_wait_stats.slow,
        )
        yield from (errors, slow, long_waits)
        yield from self._replicas(getattr(database, "replicas", None))

    def _replicas(self, replicas: ReplicaSet | None) -> Iterator[Metric]:
        reads = CounterMetricFamily(
            "chatkeep_db_reads",
            "Reads that may go to a read replica (history, room lists, unread counts), by "
            "where they went.",
            labels=["target"],
        )
        fallbacks = CounterMetricFamily(
            "chatkeep_db_replica_fallbacks",
            "Reads that may go to a replica but went to the primary, by reason.",
            labels=["reason"],
        )
        counted = replicas.reads if replicas is not None else dict.fromkeys(READ_TARGETS, 0)
        for target, count in counted.items():
            reads.add_metric([target], count)
        why = replicas.fallbacks if replicas is not None else dict.fromkeys(FALLBACK_REASONS, 0)
        for reason, count in why.items():
            fallbacks.add_metric([reason], count)
        yield from (reads, fallbacks)
        if replicas is None:
            return
        lag = GaugeMetricFamily(
            "chatkeep_db_replica_lag_seconds",
            "Seconds the replica is behind the primary, as last measured (absent before its "
            "first measurement).",
            labels=["replica"],
        )
        up = GaugeMetricFamily(
            "chatkeep_db_replica_up",
            "1 when the replica answered its last check as a streaming standby, else 0.",
            labels=["replica"],
        )
        now = time.monotonic()
        for replica in replicas.replicas:
            seconds = replica.lag(now)
            if seconds is not None:
                lag.add_metric([replica.name], seconds)
            up.add_metric([replica.name], 1 if replica.up else 0)
        yield from (lag, up)

    def _failures(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "chatkeep_db_connection_failures",
            "Failed attempts to connect to PostgreSQL, by host, role and reason.",
            labels=["host", "role", "reason"],
        )
        for failure in self._owner.connection_failures():
            family.add_metric([failure.host, failure.role, failure.reason], failure.count)
        yield family

    def _redis(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "chatkeep_redis_pubsub_reconnects",
            "Times the Redis pub/sub connection was re-established.",
        )
        redis = self._owner.redis
        family.add_metric([], redis.pubsub_reconnects if redis is not None else 0)
        yield family


ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], ASGIReceive, ASGISend], Awaitable[None]]


class ChatkeepMetrics:
    """chatkeep's metric families in one registry, fed by the stores and by hooks.

    Args:
        database: the pool to report (``chat.db``); can be set later with :meth:`attach`.
        redis: the Redis client to report (``chat.redis``).
        registry: where to register (default: a registry of this object's own, so several
            instances never clash); pass ``prometheus_client.REGISTRY`` to join the
            process-wide one.
        connection_failures: where failed connection counts come from (default:
            :func:`chatkeep.storage.security.connection_failures`).
        probe_timeout: seconds a store has to answer a probe before it counts as down.
        cache_seconds: scrapes this soon after a probe share its answer.

    Raises:
        InvalidInput: ``probe_timeout`` or ``cache_seconds`` is not a positive number.

    Example:
        >>> metrics = ChatkeepMetrics()
        >>> metrics.rate_limited("send")
        >>> b"chatkeep_rate_limit_rejections_total" in metrics.exposition()
        True
    """

    def __init__(
        self,
        *,
        database: DatabaseSource | None = None,
        redis: RedisSource | None = None,
        registry: CollectorRegistry | None = None,
        connection_failures: Callable[[], Sequence[ConnectionFailure]] = _default_failures,
        probe_timeout: float = 2.0,
        cache_seconds: float = 1.0,
    ) -> None:
        for field, value in (("probe_timeout", probe_timeout), ("cache_seconds", cache_seconds)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidInput(field, "must be a positive number of seconds")
        self.database: DatabaseSource | None = None
        self.redis: RedisSource | None = None
        self.connection_failures = connection_failures
        self.probe_timeout = float(probe_timeout)
        self.cache_seconds = float(cache_seconds)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: _Probe | None = None
        self._probing: asyncio.Future[None] | None = None
        # Held by a scraping thread while it waits for the loop: concurrent scrapes share.
        self._scrape_lock = threading.Lock()
        reg = self.registry
        Gauge(
            "chatkeep_build_info", "chatkeep's version (always 1).", ["version"], registry=reg
        ).labels(__version__).set(1)
        self.pool_waiting = Gauge(
            "chatkeep_db_pool_waiting", "Tasks waiting for a pooled connection.", registry=reg
        )
        self.pool_acquire_seconds = Histogram(
            "chatkeep_db_pool_acquire_seconds",
            "Time spent waiting for a pooled connection (not counted in statement time).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.operation_seconds = Histogram(
            "chatkeep_operation_seconds",
            "Duration of facade operations (send_message, history...), failed ones included.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.statement_seconds = Histogram(
            "chatkeep_db_statement_seconds",
            "Duration of named database operations (a statement, or a transaction), from "
            "holding a connection to done.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.redis_command_seconds = Histogram(
            "chatkeep_redis_command_seconds",
            "Redis command latency, by command.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.pubsub_published = Counter(
            "chatkeep_pubsub_published", "Events published to room channels.", registry=reg
        )
        self.pubsub_deliveries = Counter(
            "chatkeep_pubsub_deliveries",
            "Subscribers the published events reached (Redis's receiver counts).",
            registry=reg,
        )
        self.pubsub_received = Counter(
            "chatkeep_pubsub_received", "Events this process received.", registry=reg
        )
        self.pubsub_gaps = Counter(
            "chatkeep_pubsub_gaps",
            "Gaps reported to subscribers (they catch up from PostgreSQL).",
            ["reason"],
            registry=reg,
        )
        self.rate_limit_rejections = Counter(
            "chatkeep_rate_limit_rejections",
            "Requests refused by a rate limit, by action.",
            ["action"],
            registry=reg,
        )
        self.errors = Counter(
            "chatkeep_errors", "chatkeep errors raised, by class.", ["type"], registry=reg
        )
        reg.register(_SourcesCollector(self))
        self.attach(database=database, redis=redis)

    def attach(
        self, *, database: DatabaseSource | None = None, redis: RedisSource | None = None
    ) -> None:
        """Start reporting ``database`` and/or ``redis``, and hook them.

        The pool's acquire timer and operation observer and the Redis client's command
        timer are set to this object's (one :class:`ChatkeepMetrics` per store: a second
        one attached takes the hooks over). Called inside a running event loop, that loop
        is the one scrapes probe the stores on; else the first :meth:`sample` sets it.
        """
        if database is not None:
            self.database = database
            database.acquire_timer = self.time_acquire
            database.operation_observer = self.observe_statement
        if redis is not None:
            self.redis = redis
            redis.command_timer = self.time_redis
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    # -- hooks -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def time_acquire(self) -> Iterator[None]:
        """Wrap a pool acquire: counts the waiter and observes the wait."""
        self.pool_waiting.inc()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.pool_waiting.dec()
            self.pool_acquire_seconds.observe(time.perf_counter() - started)

    def observe_statement(self, name: str, seconds: float, failed: bool) -> None:
        """One named database operation took ``seconds`` (its errors are read from stats)."""
        del failed  # counted by the Database itself (chatkeep_db_statement_errors_total)
        self.statement_seconds.labels(name).observe(seconds)

    def time_operation(self, operation: str) -> contextlib.AbstractContextManager[None]:
        """Wrap one facade operation: observes its duration, counts its chatkeep errors."""
        return self._timed(self.operation_seconds.labels(operation))

    def time_redis(self, command: str) -> contextlib.AbstractContextManager[None]:
        """Wrap one Redis command (or script): observes its latency, counts its errors."""
        return self._timed(self.redis_command_seconds.labels(command))

    @contextlib.contextmanager
    def _timed(self, latency: Histogram) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with self.count_errors():
                yield
        finally:
            latency.observe(time.perf_counter() - started)

    def published(self, receivers: int) -> None:
        """One event was published; ``receivers`` subscribers got it (PUBLISH's answer)."""
        self.pubsub_published.inc()
        if receivers > 0:
            self.pubsub_deliveries.inc(receivers)

    def received(self, count: int = 1) -> None:
        """This process received ``count`` events."""
        self.pubsub_received.inc(count)

    def gap(self, reason: str) -> None:
        """Subscribers were told to catch up (``reconnected``, ``overflow`` or ``position``)."""
        self.pubsub_gaps.labels(reason).inc()

    def rate_limited(self, action: str) -> None:
        """A rate limit refused a request for ``action`` (``send``, ``login``...)."""
        self.rate_limit_rejections.labels(action).inc()

    def record_error(self, exc: BaseException) -> None:
        """Count a chatkeep error by class (a :class:`RateLimited` also as a rejection)."""
        if not isinstance(exc, ChatkeepError) or _PROBING.get():
            return
        self.errors.labels(type(exc).__name__).inc()
        if isinstance(exc, RateLimited):
            self.rate_limited(exc.action or "other")

    @contextlib.contextmanager
    def count_errors(self) -> Iterator[None]:
        """Count any chatkeep error the block raises (and let it through)."""
        try:
            yield
        except ChatkeepError as exc:
            self.record_error(exc)
            raise

    # -- probing the stores ------------------------------------------------------------------

    async def sample(self) -> None:
        """Probe both stores now (concurrently, each bounded by ``probe_timeout``).

        A store that does not answer in time, or answers with an error, is reported down
        (and no round trip for it). Never raises for a down store.
        """
        self._loop = asyncio.get_running_loop()
        marked = _PROBING.set(True)
        try:
            (db_up, db_seconds), (redis_up, redis_seconds) = await asyncio.gather(
                self._ping(self.database), self._ping(self.redis)
            )
        finally:
            _PROBING.reset(marked)
        self._probe = _Probe(time.monotonic(), db_seconds, db_up, redis_seconds, redis_up)

    async def _ping(
        self, store: DatabaseSource | RedisSource | None
    ) -> tuple[bool | None, float | None]:
        """Whether ``store`` answered and its round trip (``None`` when not measured)."""
        if store is None:
            return None, None
        try:
            async with asyncio.timeout(self.probe_timeout):
                answer = await store.health()
        except (ChatkeepError, TimeoutError):
            return False, None
        if not getattr(answer, "ok", True):  # Redis's health says ok=False, never raises
            return False, None
        return True, None if answer.latency_ms is None else answer.latency_ms / 1000

    def _fresh(self) -> bool:
        probe = self._probe
        return probe is not None and time.monotonic() - probe.taken < self.cache_seconds

    async def refresh(self) -> None:
        """Probe the stores unless a probe is fresh; concurrent callers share one probe."""
        if self._fresh():
            return
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self.sample())
        # Shielded: a cancelled scrape does not cancel the probe others are waiting for.
        await asyncio.shield(self._probing)

    def _scrape_probe(self) -> _Probe | None:
        """The probe a scrape reports: fresh where it can be had without blocking the loop.

        From a thread other than the stores' event loop, the probe runs on that loop and
        the scrape waits for it (at most ``probe_timeout`` + 1 s). On the loop itself a
        synchronous scrape cannot wait, and starts nothing behind the caller's back: it
        reports the last answer (none before the first), which is why :meth:`asgi_app`
        probes before it renders.
        """
        loop = self._loop
        if self._fresh() or loop is None or loop.is_closed() or not loop.is_running():
            return self._probe
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return self._probe
        with self._scrape_lock:
            if not self._fresh():
                waiting = asyncio.run_coroutine_threadsafe(self.refresh(), loop)
                try:
                    waiting.result(timeout=self.probe_timeout + 1.0)
                except TimeoutError:
                    # The loop did not run the probe in time: report the old answer
                    # (chatkeep_probe_age_seconds shows how old).
                    waiting.cancel()
        return self._probe

    # -- output ------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format, as a scrape would see it."""
        return bytes(generate_latest(self.registry))

    def asgi_app(self) -> ASGIApp:
        """An ASGI app serving the registry that probes the stores before it renders.

        Mount it where ``prometheus_client.make_asgi_app`` would go (``app.mount("/metrics",
        metrics.asgi_app())``); unlike that one, its scrapes see the stores as they are now.
        """
        render = make_asgi_app(registry=self.registry)

        async def app(scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
            await self.refresh()
            await render(scope, receive, send)

        return app

    def serve(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` on ``host:port`` from a background thread.

        Returns:
            The HTTP server; call its ``shutdown()`` and ``server_close()`` to stop it.

        Raises:
            InvalidInput: ``port`` is not 0-65535.
            Unavailable: the port cannot be bound (in use, or not permitted).
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidInput("port", "must be an integer from 0 to 65535")
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise Unavailable(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        return server
