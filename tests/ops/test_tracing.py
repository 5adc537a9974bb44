"""OpenTelemetry spans from real flows on PostgreSQL and Redis, and JSON log lines in them.

The SDK's in-memory exporter collects the spans. The provider is put in the API's global
for the test alone (the API lets a process set it once, through ``set_tracer_provider``),
so the rest of the suite runs untraced.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    Settings,
    User,
)
from chatkeep.errors import ChatkeepError, Unavailable
from chatkeep.ops import logging as ops_logging
from chatkeep.ops import tracing
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database

PASSWORD = "correct horse"
CONTENT = "the launch code is 0000"
EMAIL = "alice@example.org"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span chatkeep ends during the test, kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The API's global (what set_tracer_provider sets once per process), for this test only.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def attrs(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def named(found: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def one(found: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    matches = named(found, name)
    assert len(matches) == 1, [s.name for s in found]
    return matches[0]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    found: int = span.context.span_id
    return found


def ancestors(span: ReadableSpan, found: Sequence[ReadableSpan]) -> list[str]:
    """The names of ``span``'s ancestors among ``found``, nearest first."""
    by_id = {span_id(s): s for s in found}
    names: list[str] = []
    current = parent_id(span)
    while current is not None and current in by_id:
        names.append(by_id[current].name)
        current = parent_id(by_id[current])
    return names


def json_capture(logger_name: str) -> tuple[io.StringIO, Callable[[], None]]:
    """JSON lines of ``logger_name`` into a stream; the returned call removes the handler."""
    stream = io.StringIO()
    handler = ops_logging.configure(
        json=True, level=logging.DEBUG, stream=stream, logger=logger_name
    )
    target = logging.getLogger(logger_name)
    propagate, target.propagate = target.propagate, False

    def stop() -> None:
        target.removeHandler(handler)
        handler.close()
        target.propagate = propagate
        target.setLevel(logging.NOTSET)

    return stream, stop


@pytest_asyncio.fixture(loop_scope="session")
async def alice(
    make_settings: Callable[..., Settings], database_url: str, redis_url: str
) -> AsyncIterator[tuple[ChatKeep, User]]:
    """A facade on the test's stores, and a user registered in it."""
    async with ChatKeep.connect(make_settings(), node_id="node-t", bcrypt_rounds=10) as chat:
        user = await chat.register(CreateUserDto(email=EMAIL, username="alice", password=PASSWORD))
        yield chat, user


async def test_a_send_is_one_flow_span_over_its_sql_and_redis_spans(
    alice: tuple[ChatKeep, User], spans: InMemorySpanExporter
) -> None:
    chat, user = alice
    room = await chat.create_room(CreateRoomDto(name="general", created_by=user.id))
    spans.clear()
    message = await chat.send_message(room.id, user.id, CONTENT, client_msg_id="c-1")
    found = spans.get_finished_spans()

    flow = one(found, "chatkeep.send_message")
    assert flow.parent is None  # no request span around it here
    assert flow.kind is SpanKind.INTERNAL
    assert flow.status.status_code is StatusCode.UNSET
    assert attrs(flow)["chatkeep.flow"] == "send_message"
    assert attrs(flow)["chatkeep.room_id"] == str(room.id)
    assert attrs(flow)["chatkeep.user_id"] == str(user.id)
    assert flow.context is not None
    assert {s.context.trace_id for s in found if s.context is not None} == {flow.context.trace_id}

    # PostgreSQL: one named statement, no transaction around it (the send is one round
    # trip); a lone send's batch runs in the flow's context, so it is the flow's child.
    assert not [s for s in found if s.name == "facade.send_message"]
    send = one(found, "messages.send")
    assert parent_id(send) == span_id(flow)
    assert send.kind is SpanKind.CLIENT
    assert attrs(send)["db.system"] == "postgresql"
    assert attrs(send)["db.system.name"] == "postgresql"
    assert attrs(send)["chatkeep.operation"] == "messages.send"
    assert attrs(send)["db.operation.name"] == "SELECT"
    # The statement waited for its pooled connection: the wait is recorded on it.
    waited = attrs(send)["chatkeep.pool_wait_ms"]
    assert isinstance(waited, float)
    assert waited >= 0

    # Redis: the rate limit before the write and the publish after it, under the flow.
    limit = one(found, "ratelimit.check_many")
    assert parent_id(limit) == span_id(flow)
    assert limit.kind is SpanKind.CLIENT
    assert attrs(limit)["db.system"] == "redis"
    assert attrs(limit)["db.operation.name"] == "EVALSHA"
    # EVALSHA alone once the server has the script; before, SCRIPT LOAD and EVALSHA again.
    assert list(attrs(limit)["chatkeep.redis.commands"]) in (
        ["EVALSHA"],
        ["EVALSHA", "SCRIPT LOAD"],
    )
    publish = one(found, "events.publish_many")
    assert parent_id(publish) == span_id(flow)
    assert attrs(publish)["db.system"] == "redis"
    assert attrs(publish)["db.operation.name"]
    # Publishing comes after the commit: the span starts after the statement ended.
    assert send.end_time is not None
    assert publish.start_time is not None
    assert publish.start_time >= send.end_time

    # Every span of the send belongs to it, and none carries the content or a key's value.
    for span in found:
        assert span is flow or "chatkeep.send_message" in ancestors(span, found), span.name
        for value in attrs(span).values():
            assert CONTENT not in str(value)
            assert EMAIL not in str(value)
    assert message.content == CONTENT


async def test_a_failed_flow_marks_its_span_with_the_chatkeep_error(
    alice: tuple[ChatKeep, User], spans: InMemorySpanExporter
) -> None:
    chat, user = alice
    spans.clear()
    with pytest.raises(NotFound):
        await chat.send_message(uuid.uuid4(), user.id, CONTENT)
    with pytest.raises(InvalidInput):
        await chat.mark_read("not-an-id", user.id)  # type: ignore[arg-type]
    found = spans.get_finished_spans()

    flow = one(found, "chatkeep.send_message")
    assert flow.status.status_code is StatusCode.ERROR
    assert flow.status.description == "NotFound"
    assert attrs(flow)["error.type"] == "NotFound"
    (event,) = (e for e in flow.events if e.name == "exception")
    assert (event.attributes or {})["exception.type"] == "chatkeep.errors.NotFound"
    assert "room not found" in str((event.attributes or {})["exception.message"])
    # The statement answered "no room" for this send alone: it did not fail.
    send = one(found, "messages.send")
    assert "error.type" not in attrs(send)
    assert parent_id(send) == span_id(flow)

    read = one(found, "chatkeep.mark_read")
    assert attrs(read)["error.type"] == "InvalidInput"
    assert "chatkeep.room_id" not in attrs(read)  # the id was refused before it was named
    assert ancestors(read, found) == []


async def test_statement_and_redis_errors_are_recorded_on_their_spans(
    make_settings: Callable[..., Settings], spans: InMemorySpanExporter, database_url: str
) -> None:
    async with Database(make_settings(), dsn=database_url) as db:
        with pytest.raises(ChatkeepError) as failed:
            await db.fetchval("test.divide", "SELECT 1 / $1::int", 0)
    statement = one(spans.get_finished_spans(), "test.divide")
    assert attrs(statement)["error.type"] == type(failed.value).__name__
    assert attrs(statement)["db.operation.name"] == "SELECT"
    assert statement.status.status_code is StatusCode.ERROR
    # The parameter (0) is nowhere: only names and the verb are recorded.
    assert set(attrs(statement)) == {
        "db.system",
        "db.system.name",
        "db.operation.name",
        "chatkeep.operation",
        "error.type",
        "chatkeep.pool_wait_ms",
    }

    client = RedisClient("redis://127.0.0.1:1/0", retries=0, operation_timeout=0.5)
    try:
        with pytest.raises(Unavailable):
            await client.ping()
    finally:
        await client.aclose()
    ping = one(spans.get_finished_spans(), "ping")
    assert attrs(ping)["error.type"] == "Unavailable"
    assert attrs(ping)["db.operation.name"] == "PING"


async def test_redis_spans_name_commands_and_batches_never_values(
    redis_url: str, spans: InMemorySpanExporter
) -> None:
    secret = "value-" + uuid.uuid4().hex
    async with RedisClient(redis_url, key_prefix="t8:") as client:
        with client.guard("test.single"):
            await client.redis.set("t8:k", secret)
        with client.guard("test.same"):
            pipe = client.pipeline()
            pipe.set("t8:a", secret)
            pipe.set("t8:b", secret)
            await pipe.execute()
        with client.guard("test.mixed"):
            pipe = client.pipeline(transaction=True)
            pipe.set("t8:c", secret)
            pipe.get("t8:c")
            pipe.set("t8:d", secret)
            await pipe.execute()
            await client.redis.delete("t8:c")
        await client.redis.get("t8:k")  # unguarded: no span, nothing recorded
    found = spans.get_finished_spans()
    assert [s.name for s in found] == ["test.single", "test.same", "test.mixed"]
    single, same, mixed = found
    assert attrs(single)["db.operation.name"] == "SET"
    assert "db.operation.batch.size" not in attrs(single)
    assert "chatkeep.redis.calls" not in attrs(single)
    assert attrs(same)["db.operation.name"] == "BATCH SET"
    assert attrs(same)["db.operation.batch.size"] == 2
    assert list(attrs(same)["chatkeep.redis.commands"]) == ["SET"]
    assert attrs(mixed)["db.operation.name"] == "BATCH"
    assert attrs(mixed)["db.operation.batch.size"] == 3
    assert attrs(mixed)["chatkeep.redis.calls"] == 2
    assert list(attrs(mixed)["chatkeep.redis.commands"]) == ["SET", "GET", "DEL"]
    for span in found:
        assert span.status.status_code is StatusCode.UNSET
        assert not any(secret in str(v) or "t8:" in str(v) for v in attrs(span).values())


async def test_json_lines_in_a_span_carry_its_ids_and_fields(
    make_settings: Callable[..., Settings], spans: InMemorySpanExporter, database_url: str
) -> None:
    stream, stop = json_capture("chatkeep.storage")
    try:
        # Every operation is "slow" here, so each writes a WARNING line with its fields.
        settings = make_settings(slow_query_threshold=1e-9)
        async with Database(settings, dsn=database_url) as db:
            await db.fetchval("test.one", "SELECT 1")
    finally:
        stop()
    statement = one(spans.get_finished_spans(), "test.one")
    assert statement.context is not None
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (slow,) = (line for line in lines if line.get("operation") == "test.one")
    assert slow["level"] == "WARNING"
    assert slow["message"].startswith("slow database operation test.one: ")
    assert slow["duration_ms"] > 0
    assert slow["failed"] is False
    assert slow["trace_id"] == format(statement.context.trace_id, "032x")
    assert slow["span_id"] == format(statement.context.span_id, "016x")
    # The pool opened outside any span: its line has fields but no ids.
    (opened,) = (line for line in lines if line.get("operation") == "pool.open")
    assert opened["pool_max_size"] == settings.pool_max_size
    assert "trace_id" not in opened


def test_log_lines_take_the_current_span_ids(spans: InMemorySpanExporter) -> None:
    name = f"chatkeep.test.{uuid.uuid4().hex[:8]}"
    stream, stop = json_capture(name)
    logger = logging.getLogger(name)
    found = tracing.tracer()
    assert found is not None
    try:
        logger.info("before")
        with found.start_as_current_span("request") as span:
            logger.info("inside", extra={"rows": 2})
            logger.info("own ids win", extra={"trace_id": "mine"})
        logger.info("after")
    finally:
        stop()
    before, inside, own, after = (json.loads(line) for line in stream.getvalue().splitlines())
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert inside["rows"] == 2
    assert own["trace_id"] == "mine"
    assert "trace_id" not in before
    assert "trace_id" not in after
    assert "span_id" not in after


def test_no_provider_no_spans() -> None:
    # The suite sets no global provider: the API's proxy stands in, and chatkeep makes
    # nothing (a span would only be dropped).
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing.available()
    assert tracing.tracer() is None
    # chatkeep's hooks read the API's global rather than the public call, which looks the
    # environment up every time: if the API renames it, tracing still works (through the
    # public call) but pays for it, and this line says so.
    assert trace._TRACER_PROVIDER is None
    with tracing.flow("send_message") as span:
        assert span is None
        tracing.describe(span, room_id=uuid.uuid4())
    tracing.redis_commands(["GET"])  # outside a traced operation: ignored


def test_an_api_without_the_global_is_asked_through_the_public_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = TracerProvider()
    monkeypatch.delattr(trace, "_TRACER_PROVIDER")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    found = tracing.tracer()
    assert found is not None
    assert tracing.tracer() is found  # cached for its provider
    with found.start_as_current_span("request"):
        assert tracing.current_ids() is not None
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    assert tracing.tracer() is None


def test_sql_verb() -> None:
    assert tracing.sql_verb("select 1") == "SELECT"
    assert tracing.sql_verb("  -- why\n/* how */ WITH x AS (SELECT 1) INSERT") == "WITH"
    assert tracing.sql_verb(None) == "COPY"
    assert tracing.sql_verb("") == "UNKNOWN"


async def test_chatkeep_works_without_opentelemetry(
    monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings], database_url: str
) -> None:
    """With the import failing (the extra not installed), every hook is a no-op."""
    try:
        with monkeypatch.context() as patch:
            for module in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
                patch.setitem(sys.modules, module, None)
            importlib.reload(tracing)
            assert not tracing.available()
            assert tracing.tracer() is None
            assert tracing.current_ids() is None
            tracing.pool_waited(0.5)
            with tracing.flow("send_message") as span:
                assert span is None
            # The database and the log formatter reach the reloaded module.
            stream, stop = json_capture("chatkeep.storage")
            try:
                settings = make_settings(slow_query_threshold=1e-9)
                async with Database(settings, dsn=database_url) as db:
                    assert await db.fetchval("test.plain", "SELECT 41 + 1") == 42
            finally:
                stop()
            lines = [json.loads(line) for line in stream.getvalue().splitlines()]
            (slow,) = (line for line in lines if line.get("operation") == "test.plain")
            assert "trace_id" not in slow
            assert slow["duration_ms"] > 0
    finally:
        importlib.reload(tracing)
    assert tracing.available()
