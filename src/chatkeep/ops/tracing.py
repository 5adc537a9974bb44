"""OpenTelemetry traces: a span per facade flow, named database operation and Redis operation.

Install the extra (``pip install 'chatkeep[otel]'``, the ``opentelemetry-api`` package) and
set a tracer provider in the application's startup, as for any OpenTelemetry library;
chatkeep then traces by itself (``docs/operations.md``, "Tracing")::

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

The spans, each under the one current when it starts (an HTTP request's span, say):

* ``chatkeep.<flow>`` (``chatkeep.send_message``...): one call of a facade flow, with
  ``chatkeep.flow`` and, where the flow has them, ``chatkeep.room_id`` and
  ``chatkeep.user_id`` (ids only: never a message's content, an email or a token);
* a transaction (its name, ``facade.mark_read``), and in it or alone one span per named
  database operation (``messages.send``): ``db.system`` ``postgresql``,
  ``db.operation.name`` (the statement's SQL verb), ``chatkeep.operation`` (the name);
  never the SQL's parameters. A wait for a free pooled connection is an event
  ``pool.acquired`` with ``chatkeep.pool_wait_ms`` on the span that waited;
* one span per Redis operation (``ratelimit.check``): ``db.system`` ``redis``,
  ``db.operation.name`` (the command, ``EVALSHA``, or ``BATCH ...`` for a pipeline),
  ``chatkeep.redis.commands`` (the command names); never keys or values.

A span that ends with an exception has status ERROR, ``error.type`` set to the exception's
class (``NotFound``, ``Unavailable``... for chatkeep's errors) and an ``exception`` event
with its redacted message.

**Cost.** Without ``opentelemetry-api``, or with it but no tracer provider set, every
hook is one function call that returns at once (:func:`tracer` is ``None``): no span, no
context change, no attribute is made.

JSON log lines written inside a span carry its ``trace_id`` and ``span_id``
(:class:`chatkeep.ops.logging.JsonFormatter`, through :func:`current_ids`).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

_PRESENT: bool
try:
    from opentelemetry import trace as otel_trace
except ImportError:  # the extra is not installed: every hook returns at once
    _PRESENT = False
else:
    _PRESENT = True

if TYPE_CHECKING:
    import uuid

    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "available",
    "current_ids",
    "describe",
    "flow",
    "pool_waited",
    "redis_commands",
    "redis_operation",
    "sql_verb",
    "statement",
    "tracer",
    "transaction",
]

INSTRUMENTATION_NAME: Final = "chatkeep"
"""The instrumentation scope of chatkeep's spans."""

# The tracer of the provider it came from: providers are set once per process, so the
# cache is almost always a hit (tests swap providers, hence the identity check).
_cached: tuple[object, Tracer] | None = None
# Whether the public get_tracer_provider() was asked once (see _global_provider).
_asked = False

# The calls made inside the current Redis operation, each the names of the commands it
# sent (one, or a pipeline's); see redis_operation.
_CALLS: Final[ContextVar[list[list[str]] | None]] = ContextVar("chatkeep_redis_calls", default=None)


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed."""
    return _PRESENT


def _global_provider() -> TracerProvider | None:
    """The provider set for the process, or ``None``: read on every hook, so it must be cheap.

    ``trace.get_tracer_provider()`` looks the environment up on every call while no provider
    is set (some microseconds: more than the rest of a hook), so the API's global is read
    instead, once the public call has had its one chance to load a provider named by
    ``OTEL_PYTHON_TRACER_PROVIDER``. Should a later API drop the global, the public call is
    used (``tests/ops/test_tracing.py`` notices).
    """
    global _asked
    if hasattr(otel_trace, "_TRACER_PROVIDER"):
        found = otel_trace._TRACER_PROVIDER
        if found is not None or _asked:
            return found
    _asked = True
    public = otel_trace.get_tracer_provider()
    if isinstance(public, otel_trace.ProxyTracerProvider | otel_trace.NoOpTracerProvider):
        return None  # nothing configured: spans would be dropped, so none are made
    return public


def tracer() -> Tracer | None:
    """The tracer of chatkeep's spans; ``None`` when OpenTelemetry is absent or unset."""
    global _cached  # a one-entry cache, replaced whole
    if not _PRESENT:
        return None
    provider = _global_provider()
    if provider is None:
        return None
    cached = _cached
    if cached is not None and cached[0] is provider:
        return cached[1]
    from chatkeep import __version__

    found = provider.get_tracer(INSTRUMENTATION_NAME, __version__)
    _cached = (provider, found)
    return found


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids as hex (32 and 16 digits), or ``None``."""
    if not _PRESENT:
        return None
    context = otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def _record_error(span: Span, exc: BaseException) -> None:
    from chatkeep.ops.logging import redact_text

    kind = type(exc).__name__
    span.set_attribute("error.type", kind)
    span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, kind))
    span.add_event(
        "exception",
        {
            "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": redact_text(str(exc)),
        },
    )


@contextlib.contextmanager
def _span(
    found: Tracer, name: str, kind: otel_trace.SpanKind, attributes: dict[str, Any]
) -> Iterator[Span]:
    # OpenTelemetry's own exception recording adds the stack trace and the raw message;
    # chatkeep records the class and the redacted message instead.
    with found.start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _record_error(span, exc)
            raise


@contextlib.contextmanager
def flow(name: str) -> Iterator[Span | None]:
    """The span of one facade flow (``chatkeep.<name>``), or ``None`` when not tracing."""
    found = tracer()
    if found is None:
        yield None
        return
    with _span(
        found, f"chatkeep.{name}", otel_trace.SpanKind.INTERNAL, {"chatkeep.flow": name}
    ) as s:
        yield s


def describe(
    span: Span | None, *, room_id: uuid.UUID | None = None, user_id: uuid.UUID | None = None
) -> None:
    """Put the ids a flow acts on on its span (ids only, never contents)."""
    if span is None:
        return
    if room_id is not None:
        span.set_attribute("chatkeep.room_id", str(room_id))
    if user_id is not None:
        span.set_attribute("chatkeep.user_id", str(user_id))


_VERB: Final = re.compile(r"\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*([A-Za-z]+)", re.DOTALL)


@functools.lru_cache(maxsize=1024)
def sql_verb(query: str | None) -> str:
    """The first keyword of ``query`` in capitals (``SELECT``, ``WITH``...); ``COPY`` for None.

    chatkeep's statements are module constants, so the cache holds them all.
    """
    if query is None:
        return "COPY"
    found = _VERB.match(query)
    return found.group(1).upper() if found else "UNKNOWN"


def _db_attributes(name: str, verb: str) -> dict[str, Any]:
    return {
        # db.system is the name most backends still key on; db.system.name is its
        # successor in the semantic conventions (1.26 and later).
        "db.system": "postgresql",
        "db.system.name": "postgresql",
        "db.operation.name": verb,
        "chatkeep.operation": name,
    }


def statement(
    found: Tracer, name: str, query: str | None
) -> contextlib.AbstractContextManager[Span]:
    """The span of one named database operation; ``query`` only gives its SQL verb."""
    return _span(found, name, otel_trace.SpanKind.CLIENT, _db_attributes(name, sql_verb(query)))


def transaction(found: Tracer, name: str) -> contextlib.AbstractContextManager[Span]:
    """The span of a transaction named ``name``, BEGIN to COMMIT or ROLLBACK."""
    return _span(found, name, otel_trace.SpanKind.INTERNAL, _db_attributes(name, "TRANSACTION"))


def pool_waited(seconds: float) -> None:
    """Note on the current span how long it waited for a pooled connection."""
    if not _PRESENT:
        return
    span = otel_trace.get_current_span()
    if span.is_recording():
        waited = round(seconds * 1000, 3)
        span.set_attribute("chatkeep.pool_wait_ms", waited)
        span.add_event("pool.acquired", {"chatkeep.pool_wait_ms": waited})


def _call_name(names: list[str]) -> str:
    # The semantic conventions' names: the command, or BATCH (of one kind, or mixed).
    if len(names) == 1:
        return names[0]
    kinds = set(names)
    return f"BATCH {names[0]}" if len(kinds) == 1 else "BATCH"


@contextlib.contextmanager
def redis_operation(found: Tracer, operation: str) -> Iterator[Span]:
    """The span of one guarded Redis operation; the commands sent in it are named on it.

    ``db.operation.name`` names the operation's first call (its command, or ``BATCH ...``
    for a pipeline, with ``db.operation.batch.size``); an operation of several calls (a
    script loaded after ``NOSCRIPT``, say) has ``chatkeep.redis.calls``;
    ``chatkeep.redis.commands`` lists every command name sent, once each.
    """
    calls: list[list[str]] = []
    token = _CALLS.set(calls)
    try:
        attributes = {
            "db.system": "redis",
            "db.system.name": "redis",
            "chatkeep.operation": operation,
        }
        with _span(found, operation, otel_trace.SpanKind.CLIENT, attributes) as span:
            try:
                yield span
            finally:
                if calls:
                    first = calls[0]
                    span.set_attribute("db.operation.name", _call_name(first))
                    if len(first) > 1:
                        span.set_attribute("db.operation.batch.size", len(first))
                    if len(calls) > 1:
                        span.set_attribute("chatkeep.redis.calls", len(calls))
                    names = dict.fromkeys(name for call in calls for name in call)
                    span.set_attribute("chatkeep.redis.commands", list(names))
    finally:
        _CALLS.reset(token)


def redis_commands(names: Iterable[object]) -> None:
    """Note one call about to be sent: its command names (never keys or values)."""
    calls = _CALLS.get()
    if calls is None:
        return
    calls.append(
        [
            (name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)).upper()
            for name in names
        ]
    )
