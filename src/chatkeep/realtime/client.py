"""The Redis connection: pooling, retries, timeouts, health; it owns the pub/sub hub.

:class:`RedisClient` owns two things:

* a bounded pool of command connections (redis-py asyncio with the hiredis parser) whose
  commands are retried by redis-py's own :class:`~redis.asyncio.retry.Retry` with
  :class:`~redis.backoff.ExponentialWithJitterBackoff`, only on connection and timeout
  errors; a ``WRONGTYPE`` or script error is a bug, and retrying it would only hide it;
* one separate pub/sub connection shared by every
  :class:`~chatkeep.realtime.pubsub.ChannelSubscription`, read and healed by the hub of
  :mod:`chatkeep.realtime.pubsub` (reconnect with backoff, subscribe again, then a
  :class:`~chatkeep.realtime.pubsub.SubscriptionGap`). The client makes the hub, hands it
  its connection factory and backoff, and closes it in :meth:`RedisClient.aclose`.

Every redis-py error is translated at this boundary
(:func:`~chatkeep.realtime.errors.translate_error`): connection and timeout problems
become :class:`~chatkeep.errors.Unavailable`, wrong credentials
:class:`~chatkeep.errors.ConfigurationError`, always chained with ``from exc``.

Every command run under :meth:`RedisClient.guard` (all of chatkeep's are) also has a
deadline, ``operation_timeout`` (``Settings.redis_timeout``), for the whole operation:
connecting, the handshake, every retry and backoff. redis-py's own timeouts bound each
step, but its retries nest (a command's retries each retry the connect, whose handshake
waits ``socket_timeout`` per reply), so against a frozen server one command could wait
minutes; the deadline makes it :class:`~chatkeep.errors.Unavailable` instead.

:class:`~chatkeep.realtime.pubsub.ChannelSubscription`,
:class:`~chatkeep.realtime.pubsub.PubSubMessage`,
:class:`~chatkeep.realtime.pubsub.SubscriptionGap` and
:func:`~chatkeep.realtime.errors.translate_error` are importable from here too, where they
lived before they had modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Self, cast

import redis.asyncio as aioredis
from pydantic import ConfigDict
from redis import exceptions as rex
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript

from chatkeep.config import Settings, redact_url
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput, Unavailable
from chatkeep.models import SCHEMA_CONFIG
from chatkeep.ops import tracing
from chatkeep.realtime.errors import DRIVER_ERRORS, translate_error
from chatkeep.realtime.keys import KeySpace
from chatkeep.realtime.pubsub import (
    ChannelSubscription,
    PubSubMessage,
    SubscriptionGap,
    _PubSubHub,
)
from chatkeep.realtime.shards import _ShardedPubSubHub

__all__ = [
    # Re-exported from their own modules (their home before the split), so that existing
    # imports, typed ones included, keep working.
    "ChannelSubscription",
    "PubSubMessage",
    "RedisClient",
    "RedisHealth",
    "SubscriptionGap",
    "translate_error",
]

_SCHEMES: Final = (
    "redis://",
    "rediss://",
    "unix://",
    "valkey://",
    "valkeys://",
    "redis+cluster://",
    "rediss+cluster://",
    "valkey+cluster://",
    "valkeys+cluster://",
)
DEFAULT_SOCKET_TIMEOUT: Final = 5.0
DEFAULT_OPERATION_TIMEOUT: Final = 1.0
DEFAULT_QUEUE_SIZE: Final = 10_000


@dataclass(frozen=True, slots=True)
class RedisHealth:
    """Result of :meth:`RedisClient.health`.

    Attributes:
        ok: the server answered ``PING``.
        latency_ms: round-trip time of the ping, if it answered.
        error: why it did not answer (no secrets), if it did not.
    """

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    ok: bool
    latency_ms: float | None
    error: str | None = None


class _Pipeline(Pipeline):
    """A redis-py pipeline that names its commands to the traced operation running it."""

    def execute(self, raise_on_error: bool = True) -> Coroutine[Any, Any, list[Any]]:
        tracing.redis_commands(args[0] for args, _options in self.command_stack)
        return super().execute(raise_on_error)


class _Redis(aioredis.Redis):
    """redis-py's client, naming each command to the traced operation running it.

    Outside a traced :meth:`RedisClient.guard` the naming is one context variable read.
    """

    def execute_command(self, *args: Any, **options: Any) -> Coroutine[Any, Any, Any]:
        tracing.redis_commands(args[:1])
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


# Set while an operation holds one of its cluster client's permits, so that what it runs
# inside (a pipeline's redirected commands, a multi-node command's tasks) takes no other.
_HOLDS_PERMIT: ContextVar[bool] = ContextVar("chatkeep_cluster_permit", default=False)


class _RedisCluster(aioredis.RedisCluster):
    """redis-py's cluster client, made safe for many concurrent tasks.

    It names each command to the traced operation running it, and corrects three things
    redis-py's asyncio cluster client does under concurrency (docs/design.md, "Redis
    Cluster"): before it has discovered the cluster it sends a keyed command to a random
    master (so a new client's first burst of commands drew a MOVED each), and every fifth
    MOVED made it close every connection of every node, those other tasks were reading
    from included (they failed with "Connection closed by server"): the client discovers
    the cluster before its first command and is built with ``reinitialize_steps=0`` (a
    MOVED patches its slot, a lost connection still rediscovers everything). And a node
    whose ``max_connections`` are all in use fails the next command at once
    (``MaxConnectionsError``) where the single-server pool waits: here an operation waits
    for one of ``max_connections`` permits instead (bounded by the guard's deadline), so
    no node is ever asked for more connections than it has.
    """

    _permits: asyncio.Semaphore

    def limit(self, operations: int) -> None:
        """Let at most ``operations`` commands or pipelines run at once."""
        self._permits = asyncio.Semaphore(operations)

    async def _with_permit(self, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        if _HOLDS_PERMIT.get():
            return await _driver_faults_as_connection_errors(work)
        async with self._permits:
            token = _HOLDS_PERMIT.set(True)
            try:
                if self._initialize:
                    await self.initialize()
                return await _driver_faults_as_connection_errors(work)
            finally:
                _HOLDS_PERMIT.reset(token)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        tracing.redis_commands(args[:1])
        run = super().execute_command
        return await self._with_permit(lambda: run(*args, **kwargs))

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            raise rex.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


_REDIS_PACKAGE: Final = os.path.dirname(os.path.abspath(rex.__file__)) + os.sep


def _raised_in_redis(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by redis-py's own code (its innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_REDIS_PACKAGE)


async def _driver_faults_as_connection_errors(
    work: Callable[[], Coroutine[Any, Any, Any]],
) -> Any:
    """Run ``work``, taking an AttributeError or TypeError inside redis-py as a lost link.

    redis-py's cluster client can trip over its own state while a node fails or the slot
    map changes: a connection closed under a pipeline (``'NoneType' object has no
    attribute 'writelines'``, seen when a master was killed during a send load) or a slot
    whose node is momentarily unknown (redis-py#3835). The command did not complete, just
    as if the socket had dropped, so the caller gets the ConnectionError the guard turns
    into ``Unavailable``; the same errors raised by chatkeep's own code stay bugs.
    """
    try:
        return await work()
    except (AttributeError, TypeError) as exc:
        if not _raised_in_redis(exc):
            raise
        raise rex.ConnectionError(f"redis-py lost its connection mid-command: {exc}") from exc


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline that runs under one of its client's permits."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        run = super().execute
        client = self.cluster_client
        if not isinstance(client, _RedisCluster):  # pragma: no cover - made by _RedisCluster
            return await run(raise_on_error, allow_redirections)
        result: list[Any] = await client._with_permit(
            lambda: run(raise_on_error, allow_redirections)
        )
        return result


def _plain_url(url: str) -> str:
    """``url`` with the scheme redis-py knows (``valkey`` and ``+cluster`` taken off)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.removesuffix("+cluster").replace("valkey", "redis", 1)
    return f"{scheme}{sep}{rest}"


def _cluster_client(url: str, **options: Any) -> _RedisCluster:
    """A cluster client seeded by ``url``'s node (the others are discovered)."""
    try:
        parts = parse_url(url)
    except ValueError as exc:
        raise ConfigurationError(
            f"redis_url: cannot be parsed ({redact_url(url)})", field="redis_url"
        ) from exc
    if int(parts.get("db", 0) or 0) != 0:
        raise ConfigurationError(
            "redis_url: a Redis Cluster has only database 0", field="redis_url"
        )
    try:
        # A MOVED patches its slot alone: reinitializing closes connections in use.
        client = cast(_RedisCluster, _RedisCluster.from_url(url, reinitialize_steps=0, **options))
    except (ValueError, rex.RedisClusterException) as exc:
        raise ConfigurationError(
            f"redis_url: not a usable cluster URL ({redact_url(url)}): {exc}", field="redis_url"
        ) from exc
    client.limit(int(options.get("max_connections", 50)))
    return client


def _node_options(url: str) -> dict[str, Any]:
    """The connection options of ``url`` (credentials, TLS) for a link to any node."""
    parts: dict[str, Any] = dict(parse_url(url))
    for name in ("host", "port", "db", "path"):
        parts.pop(name, None)
    return parts


def _check_positive(name: str, value: float, *, maximum: float = 3600.0) -> None:
    if not isinstance(value, int | float) or not 0 < value <= maximum:
        raise InvalidInput(name, f"must be a number > 0 and <= {maximum:g}")


class _Deadline:
    """:func:`asyncio.timeout`'s mechanism, for a plain ``with`` block.

    :meth:`RedisClient.guard` is a synchronous context manager around ``await``s (every
    service uses it so), so it cannot enter ``asyncio.timeout``; this does what that does:
    cancel the task at the deadline, and on the way out tell our cancellation from
    anyone else's by the task's cancel-request count.
    """

    __slots__ = ("_cancelling", "_fired", "_handle", "_task")

    def __init__(self, seconds: float) -> None:
        self._task = asyncio.current_task()
        self._fired = False
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        if self._task is not None:
            self._cancelling = self._task.cancelling()
            self._handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel()

    def expired(self) -> bool:
        """Whether a CancelledError leaving the block is the deadline's own (consumed)."""
        if not self._fired or self._task is None:
            return False
        self._fired = False
        # Ours alone if nobody else asked to cancel the task meanwhile; otherwise the
        # CancelledError goes on to whoever did.
        return self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired and self._task is not None:
            # Fired, but the block swallowed the cancellation: withdraw our request.
            self._fired = False
            self._task.uncancel()


class RedisClient:
    """The connection to Redis every realtime service shares.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (may hold a password: it is
            never logged or shown), or ``redis+cluster://host:port`` (``rediss+cluster://``
            with TLS) for a Redis Cluster reached through that seed node (the other
            nodes are discovered): commands then go through redis-py's ``RedisCluster``
            and room events through sharded pub/sub (``chatkeep.realtime.shards``).
        key_prefix: namespace put in front of every key (``Settings.redis_key_prefix``).
        cluster_mode: hash-tag ids in key names (``Settings.redis_cluster_mode``); always
            on with a cluster URL.
        socket_timeout: seconds a command may wait for its reply.
        connect_timeout: seconds a new connection may take.
        retries: how many times a command is retried after a connection or timeout error
            (0 turns retrying off). Other errors are never retried.
        backoff_base: first backoff step in seconds; each retry doubles it, with jitter.
        backoff_cap: longest backoff between two tries, in seconds.
        max_connections: size of the command connection pool.
        pool_timeout: seconds a command waits for a free pooled connection before
            :class:`Unavailable` (single server; on a cluster at most
            ``max_connections`` operations run at once, the others wait for their turn
            within their ``operation_timeout``).
        operation_timeout: seconds a guarded operation may take in all (waiting for a
            connection, connecting, retries and backoff included) before
            :class:`Unavailable`; see :meth:`guard`.
        health_check_interval: idle seconds after which a pooled connection is pinged
            before reuse (0 turns it off).
        pubsub_ping_interval: idle seconds after which the pub/sub connection is pinged,
            so a silently dead link is noticed.
        subscription_queue_size: messages a slow subscriber may fall behind before its
            backlog is replaced by a :class:`SubscriptionGap`.
        client_name: ``CLIENT SETNAME`` of every connection (visible in ``CLIENT LIST``).
        connection_class: a redis-py connection class (for TLS tuning or instrumentation;
            single server only).

    Raises:
        InvalidInput: a numeric option is out of range.
        ConfigurationError: the URL is not a Redis URL.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "",
        cluster_mode: bool = False,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float = 5.0,
        retries: int = 3,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
        max_connections: int = 50,
        pool_timeout: float = 5.0,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        health_check_interval: float = 30.0,
        pubsub_ping_interval: float = 15.0,
        subscription_queue_size: int = DEFAULT_QUEUE_SIZE,
        client_name: str = "chatkeep",
        connection_class: type[Connection] | None = None,
    ) -> None:
        for name, value in (
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
            ("pool_timeout", pool_timeout),
            ("operation_timeout", operation_timeout),
            ("pubsub_ping_interval", pubsub_ping_interval),
        ):
            _check_positive(name, value)
        if not isinstance(retries, int) or not 0 <= retries <= 20:
            raise InvalidInput("retries", "must be an integer from 0 to 20")
        if not isinstance(max_connections, int) or not 1 <= max_connections <= 10_000:
            raise InvalidInput("max_connections", "must be an integer from 1 to 10000")
        if not 0 <= health_check_interval <= 3600:
            raise InvalidInput("health_check_interval", "must be from 0 to 3600 seconds")
        if not isinstance(subscription_queue_size, int) or subscription_queue_size < 1:
            raise InvalidInput("subscription_queue_size", "must be a positive integer")
        if not url.startswith(_SCHEMES):
            raise ConfigurationError(
                "redis_url: must start with redis://, rediss://, unix:// or, for a cluster, "
                "redis+cluster:// or rediss+cluster://",
                field="redis_url",
            )
        self._cluster = "+cluster://" in url.split("@", 1)[0]
        self._url = _plain_url(url)
        self._operation_timeout = float(operation_timeout)
        self._connect_timeout = float(connect_timeout)
        # A cluster needs every multi-key operation in one slot: hash tags are not optional.
        self._keys = KeySpace(key_prefix, cluster_mode=cluster_mode or self._cluster)
        self._retry = Retry(
            ExponentialWithJitterBackoff(cap=backoff_cap, base=backoff_base), retries
        )
        backoff = ExponentialWithJitterBackoff(cap=backoff_cap, base=backoff_base)
        # Optional observer wrapped around every guarded command, given its operation name
        # (``ChatkeepMetrics.time_redis``); unset, commands pay nothing for it.
        self.command_timer: Callable[[str], contextlib.AbstractContextManager[object]] | None = None
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._pubsub_pool: aioredis.ConnectionPool | None = None
        self._pubsub_redis: aioredis.Redis | None = None
        self._hub: _PubSubHub | _ShardedPubSubHub
        if self._cluster:
            if connection_class is not None:
                raise InvalidInput("connection_class", "is not supported on a cluster URL")
            common: dict[str, Any] = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": connect_timeout,
                "health_check_interval": health_check_interval,
                "client_name": client_name,
            }
            self._redis: aioredis.Redis | aioredis.RedisCluster = _cluster_client(
                self._url,
                max_connections=max_connections,
                retry=self._retry,
                retry_on_error=[],
                **common,
            )
            topology = _cluster_client(
                self._url, max_connections=2, retry=Retry(NoBackoff(), 0), **common
            )
            link_options = _node_options(self._url)

            def make_link(host: str, port: int) -> aioredis.Redis:
                pool = aioredis.ConnectionPool(
                    host=host,
                    port=port,
                    max_connections=2,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=connect_timeout,
                    retry=Retry(NoBackoff(), 0),
                    retry_on_error=[],
                    client_name=f"{client_name}-pubsub",
                    **link_options,
                )
                return aioredis.Redis(connection_pool=pool)

            self._hub = _ShardedPubSubHub(
                topology,
                make_link,
                backoff=backoff,
                confirm_timeout=socket_timeout,
                ping_interval=pubsub_ping_interval,
            )
        else:
            self._redis, self._hub = self._standalone(
                max_connections=max_connections,
                pool_timeout=pool_timeout,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                health_check_interval=health_check_interval,
                pubsub_ping_interval=pubsub_ping_interval,
                client_name=client_name,
                connection_class=connection_class,
                backoff=backoff,
            )
        self._queue_size = subscription_queue_size
        self._closed = False

    def _standalone(
        self,
        *,
        max_connections: int,
        pool_timeout: float,
        socket_timeout: float,
        connect_timeout: float,
        health_check_interval: float,
        pubsub_ping_interval: float,
        client_name: str,
        connection_class: type[Connection] | None,
        backoff: ExponentialWithJitterBackoff,
    ) -> tuple[aioredis.Redis, _PubSubHub]:
        extra: dict[str, Any] = {}
        if connection_class is not None:
            extra["connection_class"] = connection_class
        try:
            self._pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=max_connections,
                timeout=pool_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=self._retry,
                # Only the Retry's own (ConnectionError, TimeoutError) are retried.
                retry_on_error=[],
                health_check_interval=health_check_interval,
                client_name=client_name,
                **extra,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"redis_url: cannot be parsed ({redact_url(self._url)})", field="redis_url"
            ) from exc
        self._pubsub_pool = aioredis.ConnectionPool.from_url(
            self._url,
            max_connections=2,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # The hub reconnects by itself (with backoff, then a gap notice), so the
            # connection must report a failure at once instead of retrying underneath.
            retry=Retry(NoBackoff(), 0),
            retry_on_error=[],
            client_name=f"{client_name}-pubsub",
            **extra,
        )
        self._pubsub_redis = aioredis.Redis(connection_pool=self._pubsub_pool)
        hub = _PubSubHub(
            self._pubsub_redis.pubsub,
            backoff=backoff,
            confirm_timeout=socket_timeout,
            ping_interval=pubsub_ping_interval,
        )
        return _Redis(connection_pool=self._pool), hub

    @classmethod
    def from_settings(cls, settings: Settings, *, url: str | None = None, **options: Any) -> Self:
        """A client configured from :class:`~chatkeep.config.Settings`.

        Args:
            settings: supplies the URL, key prefix, cluster mode, connect timeout and
                operation timeout (``redis_timeout``).
            url: the Redis URL to use instead of ``settings.redis_url`` (for example the
                embedded server's, from :func:`chatkeep.embedded.resolve_endpoints`).
            **options: any other constructor argument.

        Raises:
            ConfigurationError: neither ``url`` nor ``settings.redis_url`` is set.
        """
        if url is None:
            if settings.redis_url is None:
                raise ConfigurationError(
                    "redis_url: not set; pass the embedded server's URL or set REDIS_URL",
                    field="redis_url",
                )
            url = settings.redis_url.get_secret_value()
        options.setdefault("connect_timeout", settings.connect_timeout)
        options.setdefault("operation_timeout", settings.redis_timeout)
        return cls(
            url,
            key_prefix=settings.redis_key_prefix,
            cluster_mode=settings.redis_cluster_mode,
            **options,
        )

    # -- accessors -------------------------------------------------------------------------

    @property
    def redis(self) -> aioredis.Redis | aioredis.RedisCluster:
        """The underlying redis-py client (commands through it are not translated).

        A :class:`redis.asyncio.RedisCluster` when the URL names a cluster: it routes each
        command by its key's slot and follows ``MOVED`` after a failover.
        """
        return self._redis

    @property
    def cluster(self) -> bool:
        """Whether the URL named a Redis Cluster (``redis+cluster://``)."""
        return self._cluster

    @property
    def publish_command(self) -> str:
        """``SPUBLISH`` on a cluster (sharded pub/sub), ``PUBLISH`` on a single server."""
        return "SPUBLISH" if self._cluster else "PUBLISH"

    @property
    def keys(self) -> KeySpace:
        """Builds every key name (prefix and cluster hash tags applied)."""
        return self._keys

    @property
    def operation_timeout(self) -> float:
        """Seconds a guarded operation may take in all before :class:`Unavailable`."""
        return self._operation_timeout

    @property
    def retry(self) -> Retry:
        """The retry policy of command connections (redis-py's own object)."""
        return self._retry

    @property
    def pubsub_reconnects(self) -> int:
        """How many times the pub/sub connection has been re-established."""
        return self._hub.reconnects

    @property
    def pubsub_connected(self) -> bool:
        """Whether the shared pub/sub connection is up right now."""
        return self._hub.connected

    # -- commands --------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, operation: str, *, timeout: float | None = None) -> Iterator[None]:
        """Bound the block by ``operation_timeout`` and translate redis-py's errors.

        Past the deadline the block is cancelled (redis-py then drops the connection it
        was using, so no late reply can be read by another command) and
        :class:`Unavailable` is raised. When :attr:`command_timer` is set, the block also
        runs inside ``command_timer(operation)`` (which sees the translated error); when a
        tracer provider is set, inside a span named ``operation``
        (:func:`chatkeep.ops.tracing.redis_operation`).

        Args:
            operation: a dotted name (``"presence.heartbeat"``) put in the message.
            timeout: seconds instead of ``operation_timeout``, for bulk work whose one
                round trip carries thousands of commands.

        Raises:
            Unavailable: Redis could not be reached, or did not answer in time.
        """
        seconds = self._operation_timeout if timeout is None else timeout
        if self._cluster and getattr(self._redis, "_initialize", False):
            # A cluster client's first command first discovers the cluster (CLUSTER
            # SLOTS, COMMAND): that has the connect timeout of its own on top.
            seconds += self._connect_timeout
        timer = self.command_timer
        found = tracing.tracer()
        if found is not None:
            # The span outermost: it sees the error as translated, and the timer's time.
            with contextlib.ExitStack() as stack:
                stack.enter_context(tracing.redis_operation(found, operation))
                if timer is not None:
                    stack.enter_context(timer(operation))
                stack.enter_context(self._bounded(operation, seconds))
                yield
        elif timer is None:
            with self._bounded(operation, seconds):
                yield
        else:
            with timer(operation), self._bounded(operation, seconds):
                yield

    @contextlib.contextmanager
    def _bounded(self, operation: str, seconds: float) -> Iterator[None]:
        deadline = _Deadline(seconds)
        try:
            yield
        except DRIVER_ERRORS as exc:
            raise translate_error(exc, operation) from exc
        except asyncio.CancelledError:
            if deadline.expired():
                raise Unavailable(
                    f"redis did not answer {operation} within {seconds:g} s"
                ) from TimeoutError(operation)
            raise
        finally:
            deadline.close()

    def pipeline(self, *, transaction: bool = False) -> Pipeline | ClusterPipeline:
        """A redis-py pipeline: its commands travel in one round trip on ``execute()``.

        On a cluster, one round trip per node its keys live on (one, for keys of one room
        or one user); a transaction's keys must share a slot.
        """
        return self._redis.pipeline(transaction=transaction)

    def script(self, source: str) -> AsyncScript:
        """Register a Lua script (sent by SHA, loaded once on first ``NOSCRIPT``)."""
        return self._redis.register_script(source)

    async def ping(self) -> float:
        """Ping the server and return the round-trip time in seconds.

        Raises:
            Unavailable: the server did not answer (after retries).
        """
        started = time.perf_counter()
        with self.guard("ping"):
            await self._redis.ping()
        return time.perf_counter() - started

    async def health(self) -> RedisHealth:
        """Ping once and report; never raises for a down server."""
        try:
            latency = await self.ping()
        except ChatkeepError as exc:
            return RedisHealth(ok=False, latency_ms=None, error=str(exc))
        return RedisHealth(ok=True, latency_ms=round(latency * 1000, 3))

    async def publish(self, channel: str, data: bytes) -> int:
        """Publish ``data`` on ``channel``; returns how many subscribers received it.

        Raises:
            Unavailable: Redis could not be reached.
        """
        with self.guard("publish"):
            return int(await self._redis.execute_command(self.publish_command, channel, data))

    async def subscribe(self, *channels: str) -> ChannelSubscription:
        """Subscribe to ``channels`` on the shared pub/sub connection.

        Returns once Redis confirmed the subscription, so anything published afterwards
        is received. After a lost connection the subscription is restored by itself and
        yields a :class:`SubscriptionGap`.

        Raises:
            Unavailable: Redis could not be reached.
            InvalidInput: no channel, or an invalid name.
        """
        if self._closed:
            raise Unavailable("the redis client is closed")
        sub = ChannelSubscription(self._hub, self._queue_size)
        await sub.add(*channels)
        return sub

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close subscriptions and both connection pools."""
        if self._closed:
            return
        self._closed = True
        await self._hub.aclose()
        for client, pool in ((self._pubsub_redis, self._pubsub_pool), (self._redis, self._pool)):
            if client is not None:
                with contextlib.suppress(rex.RedisError, OSError):
                    await asyncio.shield(client.aclose())
            if pool is not None:
                with contextlib.suppress(rex.RedisError, OSError):
                    await asyncio.shield(pool.aclose())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        kind = ", cluster=True" if self._cluster else ""
        return f"RedisClient(url={redact_url(self._url)!r}{kind}, keys={self._keys!r})"
