"""Prometheus metrics: the pool, named operations, Redis, pub/sub, rate limits, errors.

Install the extra: ``pip install 'chatkeep[metrics]'`` (``prometheus-client``).

Two kinds of metric live in one :class:`ChatkeepMetrics` registry:

* **Read at scrape time** from the objects you hand it: the pool's connections and the
  per-operation counters a :class:`~chatkeep.storage.database.Database` keeps
  (``db.stats``), failed connection attempts
  (:func:`chatkeep.storage.security.connection_failures`), and the Redis client's pub/sub
  reconnects. Nothing is counted twice and nothing runs on the hot path.
* **Recorded as things happen**, through small hooks: pool acquire waits
  (:meth:`ChatkeepMetrics.time_acquire`), Redis command latency
  (:meth:`ChatkeepMetrics.time_redis`), pub/sub deliveries, gaps, rate-limit rejections
  and errors by class (:meth:`ChatkeepMetrics.record_error`).

Applications mount the registry on their own HTTP server::

    from prometheus_client import make_asgi_app
    metrics = ChatkeepMetrics(database=chat.db, redis=chat.redis)
    app.mount("/metrics", make_asgi_app(registry=metrics.registry))

``chatkeep metrics --port 9187`` serves a registry of its own for a quick look. Every family
is listed in ``docs/operations.md``; :data:`FAMILIES` names them.

The sources are described by small protocols (:class:`DatabaseSource`,
:class:`RedisSource`), so anything shaped like chatkeep's ``Database`` and ``RedisClient``
(a test double, a wrapper) can be measured.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Protocol

from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    RateLimited,
    Unavailable,
)

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        start_http_server,
    )
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the dev extra installs it
    raise ConfigurationError(
        "metrics need the 'metrics' extra: pip install 'chatkeep[metrics]'", field="metrics"
    ) from exc

__all__ = [
    "FAMILIES",
    "ChatkeepMetrics",
    "ConnectionFailure",
    "DatabaseSource",
    "OperationCounters",
    "PoolSource",
    "RedisSource",
]

FAMILIES: Final = (
    "chatkeep_db_pool_connections",
    "chatkeep_db_pool_waiting",
    "chatkeep_db_pool_acquire_seconds",
    "chatkeep_db_operations_total",
    "chatkeep_db_operation_seconds",
    "chatkeep_db_operation_max_seconds",
    "chatkeep_db_operation_errors_total",
    "chatkeep_db_slow_operations_total",
    "chatkeep_db_connection_failures_total",
    "chatkeep_db_latency_seconds",
    "chatkeep_redis_command_seconds",
    "chatkeep_redis_latency_seconds",
    "chatkeep_redis_up",
    "chatkeep_redis_pubsub_reconnects_total",
    "chatkeep_pubsub_published_total",
    "chatkeep_pubsub_deliveries_total",
    "chatkeep_pubsub_received_total",
    "chatkeep_pubsub_gaps_total",
    "chatkeep_rate_limit_rejections_total",
    "chatkeep_errors_total",
)
"""Every metric family a :class:`ChatkeepMetrics` registry exposes (with its suffix)."""


# Pool waits and Redis commands are milliseconds long; an outage pushes them to seconds.
_LATENCY_BUCKETS: Final = (
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
    def calls(self) -> int:
        """Calls made."""
        ...

    @property
    def errors(self) -> int:
        """Calls that failed."""
        ...

    @property
    def total_seconds(self) -> float:
        """Time spent in all calls."""
        ...

    @property
    def max_seconds(self) -> float:
        """The slowest call."""
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


class DatabaseSource(Protocol):
    """What the metrics read from a database (``chatkeep.storage.Database``)."""

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


class _SourcesCollector(Collector):
    """Reads the pool, the operation counters, connection failures and reconnects."""

    def __init__(self, owner: ChatkeepMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        yield from self._database()
        yield from self._failures()
        yield from self._redis()

    def _database(self) -> Iterator[Metric]:
        pool = GaugeMetricFamily(
            "chatkeep_db_pool_connections",
            "Connections of the database pool, by state.",
            labels=["state"],
        )
        calls = CounterMetricFamily(
            "chatkeep_db_operations",
            "Named database operations run.",
            labels=["operation"],
        )
        seconds = SummaryMetricFamily(
            "chatkeep_db_operation_seconds",
            "Duration of named database operations.",
            labels=["operation"],
        )
        slowest = GaugeMetricFamily(
            "chatkeep_db_operation_max_seconds",
            "The slowest call of each named database operation so far.",
            labels=["operation"],
        )
        errors = CounterMetricFamily(
            "chatkeep_db_operation_errors",
            "Named database operations that failed.",
            labels=["operation"],
        )
        slow = CounterMetricFamily(
            "chatkeep_db_slow_operations",
            "Named database operations slower than the slow-query threshold.",
            labels=["operation"],
        )
        database = self._owner.database
        if database is not None and database.is_open:
            source = database.pool
            size, idle = source.get_size(), source.get_idle_size()
            for state, value in (
                ("size", size),
                ("idle", idle),
                ("busy", size - idle),
                ("min", source.get_min_size()),
                ("max", source.get_max_size()),
            ):
                pool.add_metric([state], value)
        if database is not None:
            for name, counters in sorted(dict(database.stats).items()):
                calls.add_metric([name], counters.calls)
                seconds.add_metric(
                    [name], count_value=counters.calls, sum_value=counters.total_seconds
                )
                slowest.add_metric([name], counters.max_seconds)
                errors.add_metric([name], counters.errors)
                slow.add_metric([name], counters.slow)
        yield from (pool, calls, seconds, slowest, errors, slow)

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
    ) -> None:
        self.database = database
        self.redis = redis
        self.connection_failures = connection_failures
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.pool_waiting = Gauge(
            "chatkeep_db_pool_waiting", "Tasks waiting for a pooled connection.", registry=reg
        )
        self.pool_acquire_seconds = Histogram(
            "chatkeep_db_pool_acquire_seconds",
            "Time spent waiting for a pooled connection.",
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.db_latency_seconds = Gauge(
            "chatkeep_db_latency_seconds", "The last database health round trip.", registry=reg
        )
        self.redis_command_seconds = Histogram(
            "chatkeep_redis_command_seconds",
            "Redis command latency, by command.",
            ["command"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.redis_latency_seconds = Gauge(
            "chatkeep_redis_latency_seconds", "The last Redis ping.", registry=reg
        )
        self.redis_up = Gauge(
            "chatkeep_redis_up", "1 when the last Redis ping answered, else 0.", registry=reg
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

    def attach(
        self, *, database: DatabaseSource | None = None, redis: RedisSource | None = None
    ) -> None:
        """Start reporting ``database`` and/or ``redis`` (for objects made after this one)."""
        if database is not None:
            self.database = database
        if redis is not None:
            self.redis = redis

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

    @contextlib.contextmanager
    def time_redis(self, command: str) -> Iterator[None]:
        """Wrap one Redis command (or script): observes its latency, counts its errors."""
        started = time.perf_counter()
        try:
            yield
        except ChatkeepError as exc:
            self.record_error(exc)
            raise
        finally:
            self.redis_command_seconds.labels(command).observe(time.perf_counter() - started)

    def published(self, receivers: int) -> None:
        """One event was published; ``receivers`` subscribers got it (PUBLISH's answer)."""
        self.pubsub_published.inc()
        if receivers > 0:
            self.pubsub_deliveries.inc(receivers)

    def received(self, count: int = 1) -> None:
        """This process received ``count`` events."""
        self.pubsub_received.inc(count)

    def gap(self, reason: str) -> None:
        """Subscribers were told to catch up (``reconnected`` or ``overflow``)."""
        self.pubsub_gaps.labels(reason).inc()

    def rate_limited(self, action: str) -> None:
        """A rate limit refused a request for ``action`` (``send``, ``login``...)."""
        self.rate_limit_rejections.labels(action).inc()

    def record_error(self, exc: BaseException) -> None:
        """Count a chatkeep error by class (a :class:`RateLimited` also as a rejection)."""
        if not isinstance(exc, ChatkeepError):
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

    # -- sampling and output -----------------------------------------------------------------

    async def sample(self) -> None:
        """Ping both stores now and record their latency (and whether Redis answered).

        A database that does not answer leaves its latency as it was and counts an error;
        a Redis that does not answer sets ``chatkeep_redis_up`` to 0.
        """
        if self.database is not None:
            try:
                health = await self.database.health()
            except ChatkeepError as exc:
                self.record_error(exc)
            else:
                if health.latency_ms is not None:
                    self.db_latency_seconds.set(health.latency_ms / 1000)
        if self.redis is not None:
            answer = await self.redis.health()
            self.redis_up.set(1 if answer.ok else 0)
            if answer.latency_ms is not None:
                self.redis_latency_seconds.set(answer.latency_ms / 1000)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format, as a scrape would see it."""
        return bytes(generate_latest(self.registry))

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
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
