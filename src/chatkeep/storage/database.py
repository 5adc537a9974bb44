"""PostgreSQL connections: the application's pool, and single connections for maintenance.

The pooled :class:`Database` and the migration runner both open connections through
:func:`connect_options`, so TLS, timeouts and ``application_name`` are set the same way
everywhere.

:class:`Database` is what repositories run on. Every statement goes through one of its
named helpers (``await db.fetch("messages.history", SQL, *args)``): the name is logged with
the duration at DEBUG, counted in :attr:`Database.stats`, logged at WARNING when slower
than ``slow_query_threshold`` (the name, never the parameters), and driver errors are
translated to ``chatkeep.errors`` there, ``from`` the original. An operation's time
counts from when it has its connection: the wait for a free one is measured apart
(:attr:`Database.pool_wait_stats`, the metrics' pool-wait histogram, and a rate-limited
"pool exhausted" warning), so a busy pool never shows up as slow statements. Inside
``async with db.transaction():`` every helper call from the same task runs on the
transaction's connection, so repository methods called in the block join it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, Self, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from pydantic import ConfigDict

from chatkeep.config import Settings, redact_url
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from chatkeep.ids import check_id
from chatkeep.models import SCHEMA_CONFIG
from chatkeep.ops import tracing
from chatkeep.storage.errors import (
    DRIVER_ERRORS,
    connection_is_lost,
    translate_error,
    translate_errors,
)
from chatkeep.storage.replicas import ReplicaSet
from chatkeep.storage.security import connection_failed

__all__ = [
    "Database",
    "DatabaseHealth",
    "OperationStats",
    "Transaction",
    "connect",
    "connect_options",
    "ssl_option",
]

_T = TypeVar("_T")


def ssl_option(settings: Settings) -> ssl.SSLContext | str | None:
    """The ``ssl=`` argument for asyncpg from ``ssl_mode`` and ``ssl_ca_file``.

    ``None`` leaves the choice to the URL's own ``sslmode`` (or asyncpg's default).
    """
    mode = settings.ssl_mode
    if mode is None:
        return None
    if mode in ("verify-full", "verify-ca"):
        cafile = str(settings.ssl_ca_file) if settings.ssl_ca_file else None
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = mode == "verify-full"
        return context
    return mode


def connect_options(settings: Settings, *, application_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool``."""
    options: dict[str, Any] = {
        "timeout": settings.connect_timeout,
        "statement_cache_size": settings.statement_cache_size,
        "server_settings": {
            "application_name": application_name or settings.application_name,
        },
    }
    ssl_arg = ssl_option(settings)
    if ssl_arg is not None:
        options["ssl"] = ssl_arg
    return options


async def connect(
    dsn: str,
    settings: Settings,
    *,
    application_name: str | None = None,
    operation: str = "connect",
) -> asyncpg.Connection:
    """Open one connection (for migrations and maintenance; the app uses the pool).

    Raises:
        Unavailable: the server cannot be reached in ``connect_timeout``.
        ConfigurationError: the credentials or database name are wrong, or the server's
            TLS certificate fails verification (``ssl_ca_file``, the host name).
    """
    try:
        with translate_errors(f"{operation} to {redact_url(dsn)}"):
            conn: asyncpg.Connection = await asyncpg.connect(
                dsn, **connect_options(settings, application_name=application_name)
            )
    except ChatkeepError as exc:
        # Counted and logged (host, role, reason; never the password) for `chatkeep doctor`.
        raise connection_failed(dsn, exc) from exc.__cause__
    return conn


# -- the pool ---------------------------------------------------------------------------

logger = logging.getLogger("chatkeep.storage")

InitHook = Callable[[asyncpg.Connection], Awaitable[None]]
IsolationLevel = Literal["read_committed", "repeatable_read", "serializable"]


@dataclass(slots=True)
class OperationStats:
    """Counters for one named operation (for metrics exporters and tests)."""

    calls: int = 0
    errors: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0
    slow: int = 0

    @property
    def mean_seconds(self) -> float:
        """Average duration of a call, 0 before the first."""
        return self.total_seconds / self.calls if self.calls else 0.0


# At most one "waiting for a free connection" warning per this many seconds: a pool
# exhausted for a minute under 500 tasks would otherwise log one line per waiting call
# (about 1,000 in 25 s, issue 12). Each warning counts the long waits since the last.
POOL_WARNING_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class DatabaseHealth:
    """What :meth:`Database.health` saw: a round trip's latency and the pool's state."""

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    latency_ms: float
    server_version: str
    pool_size: int
    pool_min_size: int
    pool_max_size: int
    idle: int
    busy: int


class Transaction:
    """An open transaction, as ``async with db.transaction() as tx`` yields it.

    Repository calls made in the block (from the same task) join it on their own; use
    :attr:`connection` only for SQL of your own.
    """

    __slots__ = (
        "_connection",
        "_exposed",
        "_lost",
        "_rollback_failed",
        "_touched",
        "acting_user",
        "depth",
        "name",
        "task",
    )

    def __init__(
        self, connection: PoolConnectionProxy, name: str, task: asyncio.Task[Any] | None
    ) -> None:
        self._connection = connection
        self._exposed = False
        # A nested block failed and its savepoint could not be rolled back: its writes may
        # still be in the transaction, so the transaction must not commit.
        self._rollback_failed = False
        # A statement in the block timed out, lost its socket or was cancelled: the
        # connection is beyond a clean ROLLBACK and is dropped instead (see _abandoned).
        self._lost = False
        # A statement in the block may have changed session state (_may_change_session):
        # the COMMIT then carries the session reset.
        self._touched = False
        self.name = name
        self.task = task
        self.depth = 0
        #: The user row security acts for (``db.acting_as``), or ``None``.
        self.acting_user: uuid.UUID | None = None

    @property
    def connection(self) -> PoolConnectionProxy:
        """The transaction's connection (its session is fully reset, as for ``acquire()``).

        For a nested block use ``db.transaction()`` (a savepoint); asyncpg's own
        ``connection.transaction()`` refuses to start inside this one.
        """
        self._exposed = True
        return self._connection

    def __repr__(self) -> str:
        return f"<Transaction {self.name!r} depth={self.depth}>"


class Database:
    """An asyncpg pool tuned for chatkeep, with named operations and joinable transactions.

    Example:
        >>> async def main(settings: Settings) -> None:  # doctest: +SKIP
        ...     async with Database(settings) as db:
        ...         async with db.transaction():
        ...             await db.execute("demo.touch", "SELECT 1")

    Args:
        settings: pool sizes, timeouts, statement cache size and TLS come from here.
        dsn: the PostgreSQL URL; defaults to ``settings.database_url`` (pass the embedded
            server's URL from :func:`chatkeep.embedded.resolve_endpoints` when unset).
        application_name: ``application_name`` for ``pg_stat_activity``.
        init: an extra coroutine run once on every new connection, after chatkeep's own.
            Session settings it makes with ``SET`` last only until the connection's first
            session reset; pass them as server settings or ``ALTER ROLE ... SET`` instead.
        min_size: overrides ``settings.pool_min_size``.
        max_size: overrides ``settings.pool_max_size``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        dsn: str | None = None,
        application_name: str | None = None,
        init: InitHook | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        if dsn is None and settings.database_url is not None:
            dsn = settings.database_url.get_secret_value()
        if not dsn:
            raise ConfigurationError(
                "Database needs a URL: set DATABASE_URL or pass dsn=", field="database_url"
            )
        self._settings = settings
        self._dsn = dsn
        self._application_name = application_name or settings.application_name
        self._init_hook = init
        self._min_size = settings.pool_min_size if min_size is None else min_size
        self._max_size = settings.pool_max_size if max_size is None else max_size
        if not 0 <= self._min_size <= self._max_size or self._max_size < 1:
            raise InvalidInput("max_size", "need 0 <= min_size <= max_size and max_size >= 1")
        self._pool: asyncpg.Pool | None = None
        # Connections this Database holds right now: below max_size one is free at once.
        self._in_use = 0
        self._slow = settings.slow_query_threshold
        # Waiting for a free connection is bounded like connecting: an exhausted pool
        # becomes Unavailable instead of an unbounded queue of waiters.
        self._acquire_timeout = settings.connect_timeout
        self._stats: dict[str, OperationStats] = {}
        self._pool_waits = OperationStats()
        # The rate-limited pool warning: when it was last logged, and the long waits since.
        self._pool_warned_at: float | None = None
        self._long_waits = 0
        self._longest_wait = 0.0
        #: Seconds between two "waited for a free database connection" warnings.
        self.pool_warning_interval = POOL_WARNING_INTERVAL
        # Optional observer wrapped around every pool acquire (``ChatkeepMetrics.time_acquire``);
        # unset, acquiring pays nothing for it.
        self.acquire_timer: Callable[[], contextlib.AbstractContextManager[object]] | None = None
        # Optional observer told each named operation's name, duration and failure
        # (``ChatkeepMetrics.observe_statement``, a latency histogram); unset, it costs nothing.
        self.operation_observer: Callable[[str, float, bool], None] | None = None
        # Server pids of pooled connections whose session may carry state a borrower set
        # (a SET, a session-level set_config, a temp table...): reset before their next
        # single statement (a transaction's BEGIN resets anyway). See _SESSION_RESET.
        self._dirty: set[int] = set()
        # One variable per Database, so two databases never share a transaction.
        self._tx: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
            f"chatkeep_tx_{id(self)}", default=None
        )
        # The replica read_as(one_statement=True) chose for the task's single statements.
        self._route: contextvars.ContextVar[Database | None] = contextvars.ContextVar(
            f"chatkeep_route_{id(self)}", default=None
        )
        #: The streaming replicas reads that tolerate lag may use (:meth:`read_as`), from
        #: ``settings.replica_urls`` when the pool opens; ``None`` without replicas.
        self.replicas: ReplicaSet | None = None

    @property
    def dsn(self) -> str:
        """The URL this pool connects with (secret: it may hold a password; never log it)."""
        return self._dsn

    def __repr__(self) -> str:
        state = "open" if self._pool is not None else "closed"
        return f"<Database {redact_url(self._dsn)} {state} max_size={self._max_size}>"

    # -- lifecycle ------------------------------------------------------------------------

    def pool_options(self) -> dict[str, Any]:
        """The keyword arguments :meth:`open` passes to ``asyncpg.create_pool``."""
        settings = self._settings
        options = connect_options(settings, application_name=self._application_name)
        server_settings = dict(options["server_settings"])
        statement_ms = round(settings.statement_timeout * 1000)
        server_settings["statement_timeout"] = str(statement_ms)
        # A transaction left open by a crashed task must not hold row locks forever.
        server_settings["idle_in_transaction_session_timeout"] = str(max(statement_ms * 2, 60_000))
        # No JIT: chatkeep's statements are short, and the planner's cost of a branch it
        # will never run (the send's retry look-up with a NULL client_msg_id, estimated as
        # a scan of every message under row security) crossed jit_above_cost and made
        # PostgreSQL compile ~100 functions for a 2 ms send: 0.7-1.8 s a call. A session
        # that wants JIT for a report may still SET jit = on.
        server_settings["jit"] = "off"
        options["server_settings"] = server_settings
        options.update(
            min_size=self._min_size,
            max_size=self._max_size,
            max_inactive_connection_lifetime=settings.pool_idle_timeout,
            # The server's statement_timeout fires first and cancels cleanly; the client
            # timeout is the backstop for a server or network that stops answering (the
            # connection is then dropped, never cleaned up: see _abandoned).
            command_timeout=self.client_timeout,
            connect=self._connect_counted,
            init=self._init_connection,
            reset=_reset_connection,
        )
        return options

    @property
    def client_timeout(self) -> float:
        """Seconds a statement may go unanswered before the call raises Unavailable.

        ``statement_timeout + statement_timeout_grace``: the server's own timeout cancels
        a slow statement first; this one ends the wait on a server or network that went
        silent, and the connection is then dropped rather than rolled back or reset, so
        the call raises after this long, not twice it.
        """
        return self._settings.statement_timeout + self._settings.statement_timeout_grace

    async def _connect_counted(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        # Every connection the pool opens, at start or later (growing, or replacing one
        # the server dropped): a failure is counted and logged for `chatkeep doctor`.
        try:
            conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        except DRIVER_ERRORS as exc:
            error = _translated(exc, f"connect to {redact_url(self._dsn)}")
            error.__cause__ = exc
            connection_failed(self._dsn, error)
            raise
        return conn

    async def open(self) -> Self:
        """Create the pool (``min_size`` connections are opened now).

        Raises:
            Unavailable: the server cannot be reached within ``connect_timeout``.
            ConfigurationError: the credentials or database name are wrong.
        """
        if self._pool is not None:
            return self
        start = time.perf_counter()
        with translate_errors(f"connect to {redact_url(self._dsn)}"):
            self._pool = await asyncpg.create_pool(self._dsn, **self.pool_options())
        took = (time.perf_counter() - start) * 1000
        if settings_replicas := self._settings.replica_urls:
            self.replicas = ReplicaSet(
                self,
                [url.get_secret_value() for url in settings_replicas],
                self._settings,
                application_name=self._application_name,
            )
            await self.replicas.start()
        logger.debug(
            "pool open: %s min=%d max=%d in %.1f ms",
            redact_url(self._dsn),
            self._min_size,
            self._max_size,
            took,
            extra={
                "operation": "pool.open",
                "duration_ms": round(took, 3),
                "pool_min_size": self._min_size,
                "pool_max_size": self._max_size,
            },
        )
        return self

    async def close(self) -> None:
        """Close every connection, waiting for the ones in use to come back."""
        replicas, self.replicas = self.replicas, None
        if replicas is not None:
            await replicas.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            with translate_errors("close pool"):
                await pool.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        # json/jsonb as Python objects instead of strings, for every query.
        for typename in ("json", "jsonb"):
            await conn.set_type_codec(
                typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        if self._init_hook is not None:
            await self._init_hook(conn)

    @property
    def settings(self) -> Settings:
        """The settings this database was made with."""
        return self._settings

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool (for tools and benchmarks; repositories use the helpers).

        Connections taken from it directly bypass the operation counters and are not
        counted as busy, so the helpers' "pool exhausted" timeout does not see them.

        Raises:
            Unavailable: the database is not open.
        """
        if self._pool is None:
            raise Unavailable("the database is not open: call `await db.open()` first")
        return self._pool

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._pool is not None

    # -- metrics --------------------------------------------------------------------------

    @property
    def stats(self) -> Mapping[str, OperationStats]:
        """Per-operation counters since open (a live, read-only view)."""
        return MappingProxyType(self._stats)

    @property
    def pool_wait_stats(self) -> OperationStats:
        """Waits for a pooled connection since open, apart from any statement's time.

        ``calls`` counts acquires by the named operations and transactions, ``errors``
        those that gave up (pool exhausted past ``connect_timeout``), ``slow`` the waits of
        ``slow_query_threshold`` or more, ``total_seconds``/``max_seconds`` the time waited.
        """
        return self._pool_waits

    def reset_stats(self) -> None:
        """Forget every counter (the pool waits' too)."""
        self._stats.clear()
        self._pool_waits = OperationStats()

    def _record(self, name: str, seconds: float, failed: bool, waited: float = 0.0) -> None:
        """Count one operation; ``seconds`` is its own time, ``waited`` its wait before it."""
        stats = self._stats.get(name)
        if stats is None:
            stats = self._stats[name] = OperationStats()
        stats.calls += 1
        stats.total_seconds += seconds
        if seconds > stats.max_seconds:
            stats.max_seconds = seconds
        if failed:
            stats.errors += 1
        observer = self.operation_observer
        if observer is not None:
            observer(name, seconds, failed)
        if seconds >= self._slow:
            stats.slow += 1
            # The name only: parameters may hold message contents or emails. Only the
            # statement's own time makes it slow; the wait before it is reported beside it.
            logger.warning(
                "slow database operation %s: %.1f ms (after %.1f ms waiting for a connection)",
                name,
                seconds * 1000,
                waited * 1000,
                extra={
                    "operation": name,
                    "duration_ms": round(seconds * 1000, 3),
                    "pool_wait_ms": round(waited * 1000, 3),
                    "failed": failed,
                },
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: %.2f ms%s (pool wait %.2f ms)",
                name,
                seconds * 1000,
                " (failed)" if failed else "",
                waited * 1000,
                extra={
                    "operation": name,
                    "duration_ms": round(seconds * 1000, 3),
                    "pool_wait_ms": round(waited * 1000, 3),
                    "failed": failed,
                },
            )

    # -- connections and transactions -----------------------------------------------------

    def in_transaction(self) -> bool:
        """True when the current task is inside ``db.transaction()``."""
        tx = self._tx.get()
        return tx is not None and tx.task is asyncio.current_task()

    def _joined(self) -> Transaction | None:
        tx = self._tx.get()
        # A task started inside the block inherits the context variable, but must not
        # share the connection: asyncpg runs one query at a time per connection.
        if tx is not None and tx.task is asyncio.current_task():
            return tx
        return None

    async def _acquire(self) -> tuple[PoolConnectionProxy, float]:
        """A pooled connection, and the seconds waited for it (measured apart)."""
        pool = self._pool
        if pool is None:
            raise Unavailable("the database is not open: call `await db.open()` first")
        timer = self.acquire_timer
        waits = self._pool_waits
        began = time.perf_counter()
        try:
            if timer is not None:
                with timer():
                    conn = await self._acquire_from(pool)
            else:
                conn = await self._acquire_from(pool)
        except Unavailable:
            waits.errors += 1
            raise
        self._in_use += 1
        now = time.perf_counter()
        waited = now - began
        waits.calls += 1
        waits.total_seconds += waited
        if waited > waits.max_seconds:
            waits.max_seconds = waited
        if tracing.tracer() is not None:
            tracing.pool_waited(waited)
        if waited >= self._slow:
            waits.slow += 1
            self._long_wait(waited, now)
        return conn, waited

    def _long_wait(self, waited: float, now: float) -> None:
        """Note a wait of ``slow_query_threshold`` or more; warn at most once an interval.

        Told apart from slow statements: the cure is a bigger pool or fewer concurrent
        callers, not a faster query. One line per interval says how many waits were long
        and the longest, instead of one line per waiting call.
        """
        self._long_waits += 1
        self._longest_wait = max(self._longest_wait, waited)
        last = self._pool_warned_at
        if last is not None and now - last < self.pool_warning_interval:
            return
        count, longest = self._long_waits, self._longest_wait
        self._pool_warned_at, self._long_waits, self._longest_wait = now, 0, 0.0
        logger.warning(
            "waited %.1f ms for a free database connection (pool_max_size=%d): the pool is "
            "exhausted; %d wait(s) of %.0f ms or more since the last such warning, the "
            "longest %.1f ms",
            waited * 1000,
            self._max_size,
            count,
            self._slow * 1000,
            longest * 1000,
            extra={
                "pool_wait_ms": round(waited * 1000, 3),
                "pool_max_size": self._max_size,
                "long_waits": count,
                "longest_wait_ms": round(longest * 1000, 3),
            },
        )

    async def _acquire_from(self, pool: asyncpg.Pool) -> PoolConnectionProxy:
        if self._in_use < self._max_size:
            # A connection is free (or may be opened): skip the timer wait_for would cost.
            conn = await pool.acquire()
        else:
            try:
                conn = await pool.acquire(timeout=self._acquire_timeout)
            except TimeoutError as exc:
                raise Unavailable(
                    "database pool exhausted: no connection free within "
                    f"{self._acquire_timeout:g} s (pool_max_size={self._max_size})"
                ) from exc
        return conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[PoolConnectionProxy]:
        """A connection for SQL of your own: the transaction's, inside ``transaction()``.

        A connection taken from the pool here has its session fully reset before anyone
        else uses it: asyncpg's ``RESET ALL``, advisory locks, ``LISTEN`` and cursors when it
        goes back, then the role (``SET ROLE``) and temp tables before the next statement
        (see docs/security.md). A connection whose session died in the block is dropped.

        Raises:
            Unavailable: the pool is closed or exhausted, or the server is unreachable.
        """
        tx = self._joined()
        if tx is not None:
            yield tx.connection
            return
        with translate_errors("acquire"):
            conn, _ = await self._acquire()
        pid = conn.get_server_pid()
        if pid in self._dirty:
            # A previous borrower left session state (a session-level acting user, say):
            # the caller's own SQL must not run with it.
            try:
                with translate_errors("acquire"):
                    await conn.execute(_SESSION_RESET)
            except BaseException:
                self._dirty.discard(pid)
                await self._release(conn, full_reset=False, discard=True)
                raise
        # asyncpg's full reset keeps a SET ROLE and temp tables: the next single statement
        # on this connection resets the rest first.
        self._dirty.add(pid)
        reusable = False
        try:
            yield conn
            reusable = True
        except BaseException as exc:
            reusable = not _abandoned(exc)
            raise
        finally:
            await self._release(conn, full_reset=True, discard=not reusable)

    async def _release(
        self, conn: PoolConnectionProxy, *, full_reset: bool, discard: bool = False
    ) -> None:
        """Give ``conn`` back to the pool, or drop it when it may be broken.

        ``discard`` is for a connection whose session may be gone or still busy (see
        :func:`~chatkeep.storage.errors.connection_is_lost`): it is terminated, never
        handed to another borrower, and the pool opens a new one when it needs it. Never
        raises a driver error: the caller's work is done (or failed) by now, and that is
        what the caller must hear about.
        """
        pool = self._pool
        try:
            if discard or pool is None:
                _terminate(conn)
            elif full_reset:
                # Session state set by the caller's own SQL must not leak to the next user.
                # Reset and release are one shielded unit: a cancelled caller must not hand
                # back a connection whose reset is still running.
                await asyncio.shield(_reset_and_release(pool, conn, self.client_timeout))
            else:
                # asyncpg shields the release itself, so a cancelled task still returns it.
                await pool.release(conn)
        except DRIVER_ERRORS as exc:
            # asyncpg has terminated it (a failed reset does that); the pool replaces it.
            logger.debug("connection dropped on release: %s", exc.__class__.__name__)
            _terminate(conn)
        finally:
            self._in_use -= 1

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        name: str = "transaction",
        *,
        isolation: IsolationLevel | None = None,
        readonly: bool = False,
    ) -> AsyncIterator[Transaction]:
        """A transaction that repository calls in the block (same task) join.

        Nested blocks become savepoints: an error inside one rolls back only that block.
        An exception leaving the outermost block rolls everything back; nothing is
        half-written. Its duration is counted under ``name``.

        Raises:
            Unavailable: no connection, the server went away, or a serialization failure
                or deadlock (the whole block may be retried).
        """
        async with self._transaction(name, isolation, readonly, None) as tx:
            yield tx

    @contextlib.asynccontextmanager
    async def acting_as(
        self,
        user_id: uuid.UUID | str,
        name: str = "acting_as",
        *,
        isolation: IsolationLevel | None = None,
        readonly: bool = False,
    ) -> AsyncIterator[Transaction]:
        """A transaction acting as ``user_id``: row security lets it see and write as them.

        The user is set with ``SET LOCAL app.user_id`` (as ``set_config(..., true)``),
        local to the transaction, so it ends with it and never reaches the next user of
        the pooled connection; it goes to the server with the ``BEGIN``, in one round trip.
        Repository calls in the block join it. Inside a block acting as the same user, a
        nested ``acting_as`` is a savepoint, like a nested :meth:`transaction`.

        Raises:
            InvalidInput: ``user_id`` is not a UUID, or the task is already in a
                transaction acting as someone else or as no one (the setting would
                outlive this block or change the caller's).
            PermissionDenied: a write in the block was refused by row security; nothing
                of the block is kept.
        """
        user = self._check_acting(user_id)
        routed = self._route.get()
        if routed is not None and self._joined() is None:
            # Inside read_as(one_statement=True) on a replica: a flow that needs a
            # transaction after all (two statements) takes it there, read-only.
            async with routed.acting_as(user, name, isolation=isolation, readonly=True) as tx:
                token = self._tx.set(tx)
                try:
                    yield tx
                finally:
                    self._tx.reset(token)
            return
        async with self._transaction(name, isolation, readonly, user) as tx:
            yield tx

    @contextlib.asynccontextmanager
    async def _transaction(
        self,
        name: str,
        isolation: IsolationLevel | None,
        readonly: bool,
        acting_user: uuid.UUID | None,
    ) -> AsyncIterator[Transaction]:
        # BEGIN/COMMIT/SAVEPOINT are sent as plain statements rather than through asyncpg's
        # Transaction, so that BEGIN and the acting user's set_config travel in one simple
        # query: one round trip fewer for every flow made on behalf of a user.
        outer = self._joined()
        if outer is not None:
            outer.depth += 1
            savepoint = f"chatkeep_savepoint_{outer.depth}"
            conn = outer._connection
            try:
                with translate_errors(name):
                    await conn.execute(f"SAVEPOINT {savepoint}")
                try:
                    yield outer
                except BaseException as exc:
                    if _abandoned(exc):
                        outer._lost = True
                    # Set first: a cancellation may interrupt the rollback itself. Rolling
                    # back to this savepoint also undoes any deeper block that failed to.
                    outer._rollback_failed = True
                    if not outer._lost and await _roll_back(
                        conn, f"ROLLBACK TO SAVEPOINT {savepoint}"
                    ):
                        outer._rollback_failed = False
                    if isinstance(exc, DRIVER_ERRORS):  # the caller's own SQL on tx.connection
                        raise _translated(exc, name) from exc
                    raise
                with translate_errors(name):
                    await conn.execute(f"RELEASE SAVEPOINT {savepoint}")
            finally:
                outer.depth -= 1
            return

        found = tracing.tracer()
        with _NO_SPAN if found is None else tracing.transaction(found, name):
            failed = True
            with translate_errors(name):
                conn, waited = await self._acquire()
            # A transaction's time starts once it has its connection (waits are logged apart).
            start = time.perf_counter()
            tx = Transaction(conn, name, asyncio.current_task())
            pid = conn.get_server_pid()
            # A previous borrower may have left session state: BEGIN resets it first. A ROLLBACK
            # would undo that reset, so it then carries the reset again.
            reset_first = pid in self._dirty
            rollback = _ROLLBACK if reset_first else "ROLLBACK"
            # Whether the connection ends idle and in sync with its server, fit for the next
            # borrower; anything else (a lost session, a cancelled COMMIT or ROLLBACK, a protocol
            # error) discards it.
            reusable = False
            # Until COMMIT or ROLLBACK (with the session reset they carry) succeeds, a session
            # level SET made in the block may be on the connection.
            self._dirty.add(pid)
            try:
                with translate_errors(name):
                    await conn.execute(_begin(isolation, readonly, acting_user, reset=reset_first))
                tx.acting_user = acting_user
                token = self._tx.set(tx)
                try:
                    yield tx
                except BaseException as exc:
                    self._tx.reset(token)
                    if _abandoned(exc):
                        tx._lost = True
                    # A lost connection is not rolled back: the server rolls back when the
                    # release drops it, and a ROLLBACK on a silent network would wait another
                    # full client timeout (twice the bound the caller was promised).
                    reusable = not tx._lost and await _roll_back(conn, rollback)
                    if reusable:
                        self._dirty.discard(pid)
                    if isinstance(exc, DRIVER_ERRORS):  # the caller's own SQL on tx.connection
                        raise _translated(exc, name) from exc
                    raise
                self._tx.reset(token)
                if tx._lost:
                    raise Unavailable(
                        f"{name}: the connection was lost in the block; nothing of the "
                        "transaction was committed"
                    )
                if tx._rollback_failed:
                    reusable = await _roll_back(conn, rollback)
                    if reusable:
                        self._dirty.discard(pid)
                    raise Unavailable(
                        f"{name}: a nested block failed and could not be rolled back; "
                        "nothing of the transaction was committed"
                    )
                try:
                    # Session state set in the block survives COMMIT (a ROLLBACK undoes it).
                    await conn.execute(_COMMIT if tx._touched or tx._exposed else "COMMIT")
                except DRIVER_ERRORS as exc:
                    # A live server that refuses a COMMIT has ended the transaction (and skipped
                    # the reset: the connection stays dirty); a lost session may have committed
                    # or not, and its connection is gone.
                    reusable = not connection_is_lost(exc)
                    raise _translated(exc, name) from exc
                self._dirty.discard(pid)
                reusable = True
                failed = False
            finally:
                try:
                    if (
                        tx._exposed
                    ):  # as for acquire(): the full reset keeps SET ROLE and temp tables
                        self._dirty.add(pid)
                    await self._release(conn, full_reset=tx._exposed, discard=not reusable)
                finally:
                    if not reusable:
                        self._dirty.discard(pid)  # terminated: the pid is free for a new session
                    self._record(name, time.perf_counter() - start, failed, waited)

    def acting_user(self) -> uuid.UUID | None:
        """The user the current task's transaction acts as, or ``None``."""
        tx = self._joined()
        return tx.acting_user if tx is not None else None

    # -- reads that may go to a replica ----------------------------------------------------

    async def read_as(
        self,
        user_id: uuid.UUID,
        name: str,
        work: Callable[[], Awaitable[_T]],
        *,
        fresh_since: float | None = None,
        fence: Callable[[], Awaitable[bool]] | None = None,
        one_statement: bool = False,
    ) -> _T:
        """Run the read ``work`` acting as ``user_id``: on a replica if one may serve it.

        ``work`` makes its statements through this database's helpers (repository calls),
        as in an :meth:`acting_as` block; it is called again on the primary when the replica
        fails under it, so it must only read. Without replicas, or when none is up, within
        ``replica_max_lag`` and fresh as of ``fresh_since`` (see
        ``chatkeep.storage.replicas``), it runs on the primary. ``fence`` is asked last,
        only when a replica qualifies: True means the user wrote too recently for any
        replica (a record kept elsewhere, e.g. in Redis); an error there means the primary.

        A replica that answers NotFound or PermissionDenied (a room or membership newer
        than it) is not believed: the primary is asked. A replica that fails as
        Unavailable is not used until its next check, and the read runs on the primary: a
        caller never sees a replica's failure.

        ``one_statement``: ``work`` acts as the user by itself, one statement in one round
        trip (:meth:`fetch_as`), so no transaction is opened for it: its statements outside
        a transaction go to the chosen server's pool.

        Raises:
            ChatkeepError: what ``work`` raises on the primary.
        """
        replicas = self.replicas
        if replicas is None:
            return await self._read_on_primary(user_id, name, work, one_statement)
        if self._joined() is not None:
            replicas.count_read("primary", "transaction")
            return await self._read_on_primary(user_id, name, work, one_statement)
        replica, reason = replicas.choose(fresh_since)
        if replica is not None and fence is not None:
            try:
                if await fence():
                    replica, reason = None, "own_write"
            except ChatkeepError:
                replica, reason = None, "fence_unknown"
        if replica is None:
            replicas.count_read("primary", reason)
            return await self._read_on_primary(user_id, name, work, one_statement)
        try:
            if one_statement:
                route = self._route.set(replica.db)
                try:
                    result = await work()
                finally:
                    self._route.reset(route)
            else:
                async with replica.db.acting_as(user_id, name, readonly=True) as tx:
                    # Repository calls go through this database's helpers: they join the
                    # replica's transaction as they would one of this database's own.
                    token = self._tx.set(tx)
                    try:
                        result = await work()
                    finally:
                        self._tx.reset(token)
        except Unavailable as exc:
            replicas.failed(replica, exc)
            replicas.count_read("primary", "error")
        except (NotFound, PermissionDenied):
            replicas.count_read("primary", "refused")
        else:
            replicas.count_read("replica")
            return result
        return await self._read_on_primary(user_id, name, work, one_statement)

    async def _read_on_primary(
        self,
        user_id: uuid.UUID,
        name: str,
        work: Callable[[], Awaitable[_T]],
        one_statement: bool,
    ) -> _T:
        if one_statement:
            return await work()
        async with self.acting_as(user_id, name):
            return await work()

    # -- named operations -----------------------------------------------------------------

    async def _run(
        self,
        name: str,
        query: str | None,
        call: Callable[[PoolConnectionProxy], Awaitable[_T]],
    ) -> _T:
        """Run one named operation: ``call`` on a connection, timed, counted and translated.

        On the joined transaction's connection if the task is in one, else on a pooled
        connection borrowed for this operation alone (reset first if a borrower left
        session state on it). ``query`` is the SQL ``call`` sends, for the check of whether
        it may change session state; ``None`` when it sends none of the caller's (COPY).
        """
        routed = self._route.get()
        if routed is not None and self._joined() is None:
            # read_as(one_statement=True) chose a replica: statements outside a
            # transaction run on its pool, timed and counted there.
            return await routed._run(name, query, call)
        found = tracing.tracer()
        with _NO_SPAN if found is None else tracing.statement(found, name, query):
            start = time.perf_counter()
            waited = 0.0
            failed = True
            try:
                tx = self._joined()
                if tx is not None:
                    if query is not None and _may_change_session(query):
                        tx._touched = True
                    try:
                        result = await call(tx._connection)
                    except BaseException as exc:
                        if _abandoned(exc):
                            tx._lost = True
                        raise
                else:
                    conn, waited = await self._acquire()
                    # The operation's time starts once it has a connection: a wait for a free
                    # one is logged apart (_acquire), not counted as a slow statement.
                    start = time.perf_counter()
                    pid = conn.get_server_pid()
                    reusable = False
                    try:
                        if pid in self._dirty:
                            # A borrower left session state behind: the one round trip this
                            # design pays, only after a statement that may have changed it.
                            await conn.execute(_SESSION_RESET)
                            self._dirty.discard(pid)
                        if query is not None and _may_change_session(query):
                            self._dirty.add(pid)
                        result = await call(conn)
                        reusable = True
                    except BaseException as exc:
                        reusable = not _abandoned(exc)
                        raise
                    finally:
                        if not reusable:
                            self._dirty.discard(pid)
                        await self._release(conn, full_reset=False, discard=not reusable)
            except DRIVER_ERRORS as exc:
                raise _translated(exc, name) from exc
            else:
                failed = False
                return result
            finally:
                self._record(name, time.perf_counter() - start, failed, waited)

    async def fetch(self, name: str, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run ``query`` and return every row. ``name`` labels it in logs and stats.

        Raises:
            ChatkeepError: the driver's error, translated (see :mod:`chatkeep.errors`).
        """
        result: list[asyncpg.Record] = await self._run(
            name, query, lambda conn: conn.fetch(query, *args)
        )
        return result

    async def fetchrow(self, name: str, query: str, *args: Any) -> asyncpg.Record | None:
        """Run ``query`` and return its first row, or ``None``.

        Raises:
            ChatkeepError: the driver's error, translated.
        """
        result: asyncpg.Record | None = await self._run(
            name, query, lambda conn: conn.fetchrow(query, *args)
        )
        return result

    async def fetchval(self, name: str, query: str, *args: Any) -> Any:
        """Run ``query`` and return the first column of its first row (``None`` if none).

        Raises:
            ChatkeepError: the driver's error, translated.
        """
        row = await self.fetchrow(name, query, *args)
        return None if row is None else row[0]

    # -- one round trip as a user -----------------------------------------------------------

    def _check_acting(self, user_id: uuid.UUID | str) -> uuid.UUID:
        """``user_id`` checked, and the task's transaction (if any) acting as that user."""
        user = check_id("user_id", user_id)
        outer = self._joined()
        if outer is not None and outer.acting_user != user:
            who = "no one" if outer.acting_user is None else "another user"
            raise InvalidInput(
                "user_id", f"already in a transaction acting as {who}: act in its own block"
            )
        return user

    async def fetch_as(
        self, user_id: uuid.UUID | str, name: str, query: str, *args: Any
    ) -> list[asyncpg.Record]:
        """Run ``query`` as ``user_id`` in one round trip; return every row.

        ``query`` calls a flow function of the schema (SECURITY INVOKER, so row security
        binds it as the caller) that takes the acting user as its first argument and
        starts with ``chatkeep_act_as(acting)``; the user is passed as ``$1`` and
        ``args`` follow as ``$2``... The function sets the user local to the statement's
        own transaction: outside a transaction that is the statement's implicit one (no
        BEGIN, no COMMIT, nothing left on the connection); inside :meth:`acting_as` for
        the same user, the block's. See ``docs/design.md``, "Flows in one round trip".
        With ``Settings.citus`` it runs in a transaction acting as the user (three round
        trips): Citus passes the user to its workers only from a ``SET LOCAL``.

        Raises:
            InvalidInput: ``user_id`` is not a UUID, or the task is in a transaction
                acting as someone else or as no one.
            ChatkeepError: the driver's error, translated.
        """
        user = self._check_acting(user_id)
        if self.settings.citus and self._joined() is None:
            # Citus passes the acting user to its workers (where row security runs) only
            # as a SET LOCAL of a transaction block, never from the function's set_config.
            async with self.acting_as(user, name):
                return await self.fetch(name, query, user, *args)
        return await self.fetch(name, query, user, *args)

    async def fetchrow_as(
        self, user_id: uuid.UUID | str, name: str, query: str, *args: Any
    ) -> asyncpg.Record | None:
        """:meth:`fetch_as` for the first row only (``None`` if none).

        Raises:
            InvalidInput: as :meth:`fetch_as`.
            ChatkeepError: the driver's error, translated.
        """
        user = self._check_acting(user_id)
        if self.settings.citus and self._joined() is None:
            async with self.acting_as(user, name):
                return await self.fetchrow(name, query, user, *args)
        return await self.fetchrow(name, query, user, *args)

    async def execute(self, name: str, query: str, *args: Any) -> str:
        """Run ``query`` and return its status tag (``"UPDATE 1"``).

        Raises:
            ChatkeepError: the driver's error, translated.
        """
        result: str = await self._run(name, query, lambda conn: conn.execute(query, *args))
        return result

    async def executemany(self, name: str, query: str, args: Iterable[Sequence[Any]]) -> None:
        """Run ``query`` once per argument tuple, pipelined, atomically.

        Raises:
            ChatkeepError: the driver's error, translated; nothing is written then.
        """
        await self._run(name, query, lambda conn: conn.executemany(query, args))

    async def copy_records(
        self,
        name: str,
        table: str,
        records: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        *,
        columns: Sequence[str],
    ) -> int:
        """Bulk-load ``records`` into ``table`` with binary COPY; returns the row count.

        ``table`` and ``columns`` are identifiers chosen by code (they are quoted, never
        taken from users); the values travel as data.

        Raises:
            ChatkeepError: the driver's error, translated; nothing is written then.
        """
        status: str = await self._run(
            name,
            None,
            lambda conn: conn.copy_records_to_table(table, records=records, columns=list(columns)),
        )
        return int(status.rsplit(" ", 1)[-1])

    async def health(self) -> DatabaseHealth:
        """One round trip to the server, and the pool's counts.

        Raises:
            Unavailable: the pool is closed or the server does not answer.
        """
        pool = self.pool
        start = time.perf_counter()
        version = await self.fetchval("database.health", "SELECT current_setting('server_version')")
        latency = (time.perf_counter() - start) * 1000
        size = pool.get_size()
        idle = pool.get_idle_size()
        return DatabaseHealth(
            latency_ms=latency,
            server_version=str(version),
            pool_size=size,
            pool_min_size=pool.get_min_size(),
            pool_max_size=pool.get_max_size(),
            idle=idle,
            busy=size - idle,
        )


# What a named operation or transaction enters when no tracer is set: reusable, and
# cheaper than a span that would be dropped.
_NO_SPAN: Final = contextlib.nullcontext()

_ISOLATION_SQL: Final = {
    "read_committed": " ISOLATION LEVEL READ COMMITTED",
    "repeatable_read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


# What a pooled connection's session is brought back to before another borrower may see
# it: the login role (SET SESSION AUTHORIZATION DEFAULT also ends a SET ROLE), every
# setting at its connection default (app.user_id included: a session-level set_config or
# SET of the acting user would otherwise reach the next borrower, and a setting made with
# `true` inside a transaction ends with it and lets an older session value back), and no
# temp tables (which would shadow the tables of the same name). The server settings given
# at connect (statement_timeout...) are the defaults, so they stay. Left alone, as
# asyncpg's full reset handles them for the connections handed to outside code: LISTEN,
# advisory locks, open cursors, prepared statements.
# Sent only where it may be needed (it costs the server some 20 us), and then inside the
# simple query a transaction sends anyway, so it costs no round trip there: after COMMIT
# when a statement of the block may have changed the session, after BEGIN (and ROLLBACK)
# when the connection is dirty. A ROLLBACK undoes what the block set by itself.
_SESSION_RESET: Final = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DISCARD TEMP"
_COMMIT: Final = f"COMMIT; {_SESSION_RESET}"
_ROLLBACK: Final = f"ROLLBACK; {_SESSION_RESET}"

# A statement is known to leave the session as it found it when it is one plain query
# (no `;`) that mentions none of the ways to change session state: no SET/RESET/DISCARD
# command, no set_config, no temp object. A function could still change it inside; no
# function of chatkeep's schema does (tests/security/test_rls.py checks pg_proc), and
# chatapp_app can create functions in pg_temp only, which a caller must name.
_PLAIN_QUERY: Final = re.compile(
    r"\A\s*(?:SELECT|INSERT|UPDATE|DELETE|WITH|VALUES|TABLE)\b[^;]*;?\s*\Z", re.IGNORECASE
)
_SESSION_WORDS: Final = re.compile(r"set_config|\btemp(?:orary)?\b|pg_temp", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _may_change_session(query: str) -> bool:
    """Whether ``query`` may leave session state behind (see ``_PLAIN_QUERY``); cached."""
    return _PLAIN_QUERY.match(query) is None or _SESSION_WORDS.search(query) is not None


def _begin(
    isolation: IsolationLevel | None,
    readonly: bool,
    acting_user: uuid.UUID | None,
    *,
    reset: bool = False,
) -> str:
    """The statement that opens a transaction, naming its acting user if there is one.

    Sent as a simple query (no parameters), so BEGIN, the session reset and the acting
    user cost one round trip; the user id is a checked ``uuid.UUID``, whose text form is
    hex digits and hyphens. With ``reset`` (the connection is dirty) the session reset
    comes after BEGIN, so that the isolation level still applies, and the transaction
    starts from a clean session whatever the previous borrower did.
    """
    sql = "BEGIN" + (_ISOLATION_SQL[isolation] if isolation else "")
    if readonly:
        sql += " READ ONLY"
    if reset:
        sql += f"; {_SESSION_RESET}"
    if acting_user is not None:
        # SET LOCAL rather than set_config(..., true), the same to PostgreSQL: Citus passes
        # a SET LOCAL on to the workers (citus.propagate_set_commands = local), where row
        # security runs, and a set_config call it does not.
        sql += f"; SET LOCAL app.user_id = '{acting_user}'"
    return sql


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing beyond asyncpg's own rollback and listener cleanup.

    asyncpg's default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` on every release: one extra round trip per operation. chatkeep resets the
    session only after a statement that may have changed it (``SET``, ``set_config``, a
    temp table: ``_may_change_session``), and where it costs no round trip when it can
    (``_SESSION_RESET``): in a transaction, with the ``COMMIT``; after a single statement,
    the connection is marked dirty, and its next borrower sends the reset first (in the
    ``BEGIN`` of a transaction, or as one round trip before a single statement).
    Connections handed to outside code (:meth:`Database.acquire`,
    :attr:`Transaction.connection`) also get asyncpg's full reset before they go back.
    """
    del conn


def _abandoned(exc: BaseException) -> bool:
    """Whether the connection ``exc`` left behind must be dropped rather than cleaned up.

    A lost session (:func:`~chatkeep.storage.errors.connection_is_lost`: a broken
    socket, a client-side timeout, a session the server ended) or a cancellation: after
    either, a ROLLBACK, a reset or asyncpg's wait for its cancel request would each wait
    on a server that may never answer, up to another full client timeout, past the bound
    the caller was promised (and past a caller's own ``asyncio.timeout``). Dropping costs
    a reconnect; the server rolls back when the socket closes.
    """
    return isinstance(exc, asyncio.CancelledError) or connection_is_lost(exc)


async def _roll_back(conn: PoolConnectionProxy, statement: str) -> bool:
    """Roll back after a failed block; False when the connection must be discarded.

    A failure here is not raised: the block's own error is what the caller must see, and
    the server rolls back by itself when a session it cannot finish ends. A cancellation
    while rolling back is raised; the caller's ``reusable`` is still False then, so the
    connection, whose ROLLBACK may still be running, is discarded.
    """
    try:
        await conn.execute(statement)
    except DRIVER_ERRORS:
        return False
    return True


async def _reset_and_release(
    pool: asyncpg.Pool, conn: PoolConnectionProxy, reset_timeout: float
) -> None:
    """Reset the session state of a connection handed to outside code, then give it back."""
    try:
        await conn.reset(timeout=reset_timeout)
    except DRIVER_ERRORS:
        _terminate(conn)
        return
    await pool.release(conn)


def _terminate(conn: PoolConnectionProxy) -> None:
    """Drop ``conn``: asyncpg frees its pool slot, and the pool opens a new one on demand."""
    # Already released means asyncpg dropped it when it saw the connection close.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _translated(exc: BaseException, operation: str) -> ChatkeepError:
    translated = translate_error(exc, operation)
    if translated is None:  # pragma: no cover - every DRIVER_ERRORS type is mapped
        return ChatkeepError(f"{operation}: {exc.__class__.__name__}")
    return translated
