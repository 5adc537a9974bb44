"""Structured logging: JSON fields, redaction of every secret, the operation timer."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pydantic import BaseModel, SecretStr

from chatkeep.ops import logging as ops_logging
from tests.ops.cli import invoke

PASSWORD = "hunter2-Secret"
TOKEN = "tok_9f8e7d6c5b4a"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
BCRYPT = "$2b$12$" + "A" * 53
CONTENT = "meet me at the usual place at 9"
SECRETS = (PASSWORD, TOKEN, JWT, BCRYPT, CONTENT, "c2lnbmF0dXJl")


class Message(BaseModel):
    id: uuid.UUID
    room_id: uuid.UUID
    content: str


@dataclass
class Session:
    user_id: str
    refresh_token: str


@dataclass
class Capture:
    """A throw-away logger and a way to point it at a fresh stream."""

    logger: logging.Logger

    def start(self, *, json: bool, level: int = logging.DEBUG) -> io.StringIO:
        stream = io.StringIO()
        ops_logging.configure(json=json, level=level, stream=stream, logger=self.logger.name)
        return stream


@pytest.fixture
def capture() -> Iterator[Capture]:
    target = logging.getLogger(f"chatkeep.test.{uuid.uuid4().hex[:8]}")
    target.propagate = False
    yield Capture(target)
    for handler in list(target.handlers):
        target.removeHandler(handler)
        handler.close()


def fail_to_connect() -> None:
    raise RuntimeError(f"could not connect to redis://:{PASSWORD}@cache:6379/0")


def log_everything(logger: logging.Logger) -> None:
    """Every way a secret could reach a log line."""
    room = uuid.UUID(int=7)
    logger.info(
        "connecting to postgresql://app:%s@db.internal/chat", PASSWORD, extra={"room_id": room}
    )
    logger.info("login password=%s token: %s", PASSWORD, TOKEN)
    logger.info("header Authorization: Bearer %s", JWT)
    logger.info("retrying with Bearer %s", TOKEN)
    logger.info("stored %s", Message(id=uuid.UUID(int=1), room_id=room, content=CONTENT))
    logger.info("session %r", Session(user_id="u1", refresh_token=TOKEN))
    logger.info("payload %s", {"password_hash": BCRYPT, "nested": {"content": CONTENT}})
    logger.info("hash %s", BCRYPT)
    logger.info(
        "fields",
        extra={"password": PASSWORD, "token": TOKEN, "content": CONTENT, "rows": 3},
    )
    logger.info("dict args %(who)s", {"who": "alice", "secret": PASSWORD})
    logger.info("settings %s", SecretStr(PASSWORD))
    try:
        fail_to_connect()
    except RuntimeError:
        logger.exception("failed")
    logger.info("stack", stack_info=True, extra={"note": f"api_key={TOKEN}"})


@pytest.mark.parametrize("as_json", [True, False])
def test_secrets_never_reach_the_output(capture: Capture, as_json: bool) -> None:
    stream = capture.start(json=as_json)
    log_everything(capture.logger)
    output = stream.getvalue()
    for secret in SECRETS:
        assert secret not in output, secret
    # What is not secret survives, so the lines are still useful.
    assert "postgresql://app:***@db.internal/chat" in output
    assert "Authorization: ***" in output
    assert "retrying with Bearer ***" in output
    assert "00000000-0000-0000-0000-000000000001" in output  # the message's id
    assert "alice" in output
    assert "RuntimeError" in output


def test_json_lines_carry_the_structured_fields(capture: Capture) -> None:
    stream = capture.start(json=True)
    logger = capture.logger
    room = uuid.uuid4()
    logger.info(
        "history page",
        extra={"operation": "load_history", "duration_ms": 1.25, "rows": 50, "room_id": room},
    )
    logger.warning("plain")

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["operation"] == "load_history"
    assert first["duration_ms"] == 1.25
    assert first["rows"] == 50
    assert first["room_id"] == str(room)
    assert first["level"] == "INFO"
    assert first["logger"] == logger.name
    assert first["message"] == "history page"
    assert first["time"].endswith("Z")
    assert len(first["time"]) == len("2026-01-01T00:00:00.000Z")
    assert second["level"] == "WARNING"
    assert not set(ops_logging.STRUCTURED_FIELDS) & set(second)


def test_json_exception_field(capture: Capture) -> None:
    stream = capture.start(json=True)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        capture.logger.exception("boom")
    line = json.loads(stream.getvalue())
    assert "ZeroDivisionError" in line["exception"]


def test_configure_replaces_its_own_handler_and_honours_force() -> None:
    name = f"chatkeep.test.{uuid.uuid4().hex[:8]}"
    target = logging.getLogger(name)
    foreign = logging.NullHandler()
    target.addHandler(foreign)
    try:
        first = ops_logging.configure(logger=name, stream=io.StringIO(), force=False)
        second = ops_logging.configure(
            logger=name, stream=io.StringIO(), force=False, level="WARNING"
        )
        assert target.handlers == [foreign, second]
        assert first not in target.handlers
        assert target.level == logging.WARNING
        third = ops_logging.configure(logger=name, stream=io.StringIO())
        assert target.handlers == [third]
    finally:
        for handler in list(target.handlers):
            target.removeHandler(handler)


def test_install_redactor_adds_one_filter_per_handler() -> None:
    name = f"chatkeep.test.{uuid.uuid4().hex[:8]}"
    target = logging.getLogger(name)
    target.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    target.addHandler(handler)
    try:
        assert ops_logging.install_redactor(name) == 1
        assert ops_logging.install_redactor(name) == 0
        target.warning("dsn postgresql://u:%s@h/db", PASSWORD)
        assert PASSWORD not in stream.getvalue()
        assert "postgresql://u:***@h/db" in stream.getvalue()
    finally:
        target.removeHandler(handler)


def test_redaction_rules() -> None:
    assert ops_logging.redact_text("rediss://:pw@cache:6380/0") == "rediss://:***@cache:6380/0"
    assert ops_logging.redact_text('{"refresh_token": "abc", "n": 1}') == (
        '{"refresh_token": ***, "n": 1}'
    )
    assert ops_logging.redact_text("no secrets, 3 rows") == "no secrets, 3 rows"
    for key in ("password", "password_hash", "PASSWORD", "refresh_token", "content", "api_key"):
        assert ops_logging.is_sensitive_key(key), key
    for key in ("rows", "room_id", "operation", "duration_ms", "user_id", "content_type_id"):
        assert not ops_logging.is_sensitive_key(key), key
    deep: dict[str, object] = {"a": 1}
    for _ in range(8):
        deep = {"next": deep}
    assert "<dict>" in str(ops_logging.redact_value(deep))
    assert ops_logging.redact_value([TOKEN, {"token": TOKEN}]) == [TOKEN, {"token": "***"}]
    assert ops_logging.redact_value((1, "x")) == (1, "x")


def test_a_record_is_redacted_once_and_bad_formats_survive() -> None:
    args = ("many", f"password={PASSWORD}")
    record = logging.LogRecord("x", logging.INFO, "", 0, "%d items %s", args, None)
    ops_logging.redact_record(record)  # %d of a string: the format fails, the text stays
    assert record.args is None
    assert "many" in record.getMessage()
    assert PASSWORD not in record.getMessage()
    again = record.msg
    ops_logging.redact_record(record)
    assert record.msg == again


async def test_cli_log_json_flag(database_url: str, cli_env: Callable[..., dict[str, str]]) -> None:
    code, output, stderr = await invoke(
        ["--log-json", "setup", "--database-url", database_url], cli_env()
    )
    assert code == 0, output
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(
        line["logger"] == "chatkeep.setup" and "already exists" in line["message"] for line in lines
    ), stderr
