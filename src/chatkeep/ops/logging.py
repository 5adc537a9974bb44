"""Structured logging: records with fields, JSON lines, and a redactor.

chatkeep logs through the standard :mod:`logging` module under the ``chatkeep`` logger
hierarchy (``chatkeep.storage``, ``chatkeep.realtime``, ``chatkeep.migrate``...). As a
library it installs no handlers: the application decides where logs go. Records carry
structured fields through ``extra=``::

    logger.info("sent message", extra={"operation": "send_message",
                                       "duration_ms": 3.2, "rows": 1, "room_id": room_id})

The common fields are :data:`STRUCTURED_FIELDS`; any other ``extra`` key is kept too.

**JSON logs.** One call at startup sends every record of the process to stderr as one JSON
object per line, redacted::

    import chatkeep.ops.logging
    chatkeep.ops.logging.configure(json=True)

(``chatkeep --log-json COMMAND`` does the same for the command-line tool.) To keep your own
handlers, add :class:`JsonFormatter` and :class:`RedactingFilter` to them instead.

**What is never logged.** :func:`redact_record` (run by :class:`RedactingFilter` and by
:class:`JsonFormatter`) replaces, in the message, its arguments, the ``extra`` fields and
the exception text:

* passwords in URLs (``postgresql://user:***@host``) and ``password=...``/``token=...``
  pairs, ``Bearer`` tokens, JSON Web Tokens and bcrypt hashes;
* any field or mapping key that names a secret or a message body (``password``,
  ``password_hash``, ``token``, ``refresh_token``, ``secret``, ``api_key``,
  ``authorization``, ``cookie``, ``content``, ``body``...);
* models and dataclasses passed as arguments are logged with those attributes masked, so
  ``logger.info("stored %s", message)`` shows the message's ids, never its text.

chatkeep's own code logs ids, counts and durations only; the redactor is the second line.
"""

from __future__ import annotations

import dataclasses
import json as jsonlib
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, Final

from pydantic import BaseModel, SecretBytes, SecretStr

from chatkeep.ops import tracing

__all__ = [
    "REDACTED",
    "STRUCTURED_FIELDS",
    "JsonFormatter",
    "RedactingFilter",
    "configure",
    "install_redactor",
    "is_sensitive_key",
    "redact_record",
    "redact_text",
    "redact_value",
]

REDACTED: Final = "***"
"""What a secret is replaced with."""

STRUCTURED_FIELDS: Final = (
    "operation",
    "duration_ms",
    "failed",
    "pool_wait_ms",
    "long_waits",
    "longest_wait_ms",
    "pool_min_size",
    "pool_max_size",
    "rows",
    "events",
    "rooms",
    "room_id",
    "user_id",
)
"""The fields chatkeep's records carry where they apply (``extra=`` keys).

:class:`JsonFormatter` adds ``trace_id`` and ``span_id`` to lines written inside an
OpenTelemetry span (:mod:`chatkeep.ops.tracing`).
"""

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "_chatkeep_redacted",
}

_SENSITIVE_KEY: Final = re.compile(
    r"pass(?:word|wd|phrase)?(?:_?hash)?$|pwd$|secret|token|authori[sz]ation|cookie|"
    r"api_?key|credential|private_?key|^content$|_content$|^body$|^text$|^message_text$",
    re.IGNORECASE,
)

_TEXT_RULES: Final = (
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)(@)", re.IGNORECASE), r"\1***\3"),
    # password=..., "token": "...", api_key: ... (keys that name a secret)
    (
        re.compile(
            r"""(["']?\b(?:[a-z_]*password|passwd|pwd|secret|[a-z_]*token|api[_-]?key|"""
            r"""authorization)["']?\s*[=:]\s*)("[^"]*"|'[^']*'|[^\s,;&}\])]+)""",
            re.IGNORECASE,
        ),
        r"\1***",
    ),
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1 ***"),
    # JSON Web Tokens: three base64url parts, the first a JSON header ("eyJ").
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # bcrypt hashes
    (re.compile(r"\$2[abxy]\$\d{2}\$[./A-Za-z0-9]{53}"), REDACTED),
)


def is_sensitive_key(key: str) -> bool:
    """True when a field or mapping key names a secret or a message body."""
    return bool(_SENSITIVE_KEY.search(key))


def redact_text(text: str) -> str:
    """``text`` with URL passwords, secret pairs, tokens and password hashes masked."""
    for pattern, replacement in _TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


def redact_value(value: Any, *, _depth: int = 0) -> Any:
    """A copy of ``value`` safe to log: secrets and message bodies masked, recursively.

    Strings are scrubbed with :func:`redact_text`; mappings, models and dataclasses lose
    the values of sensitive keys; other values are returned as they are.
    """
    if _depth > 4:  # deep structures are summarised, not walked forever
        return f"<{type(value).__name__}>"
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, BaseModel):
        fields = {name: getattr(value, name, None) for name in type(value).model_fields}
        inner = redact_value(fields, _depth=_depth + 1)
        shown = ", ".join(f"{k}={v!r}" for k, v in inner.items())
        return f"{type(value).__name__}({shown})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        inner = redact_value(fields, _depth=_depth + 1)
        shown = ", ".join(f"{k}={v!r}" for k, v in inner.items())
        return f"{type(value).__name__}({shown})"
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and is_sensitive_key(k)
            else redact_value(v, _depth=_depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = [redact_value(v, _depth=_depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in a record in place (message, arguments, extras, exception); idempotent.

    The message is rendered once with redacted arguments and stored back with no
    arguments, so every handler after this sees only the safe text.
    """
    if getattr(record, "_chatkeep_redacted", False):
        return record
    if isinstance(record.args, Mapping):
        record.args = redact_value(dict(record.args))
    elif record.args:
        record.args = tuple(redact_value(a) for a in record.args)
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed format: keep the pieces, redacted
        message = f"{record.msg!r} % {record.args!r}"
    record.msg = redact_text(message)
    record.args = None
    for key, value in _extra_fields(record).items():
        setattr(record, key, REDACTED if is_sensitive_key(key) else redact_value(value))
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    record._chatkeep_redacted = True
    return record


class RedactingFilter(logging.Filter):
    """A handler filter that masks secrets in every record (see :func:`redact_record`).

    Attach it to a handler, not a logger: a logger's filters do not see records that
    propagate up from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place and let it through."""
        redact_record(record)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception.

    Example line::

        {"time": "2026-01-05T10:00:00.123Z", "level": "INFO", "logger": "chatkeep.storage",
         "message": "sent message", "operation": "send_message", "duration_ms": 3.2,
         "rows": 1, "room_id": "0190...", "trace_id": "4bf92f35...", "span_id": "00f067aa..."}

    ``trace_id`` and ``span_id`` (hex, as OpenTelemetry backends show them) are those of
    the span current where the line is formatted, when ``opentelemetry-api`` is installed
    and a span is; a record that already has them (``extra=``) keeps its own.

    Records are redacted first (:func:`redact_record`), whether or not a
    :class:`RedactingFilter` is attached. Values that are not JSON types (UUIDs, times,
    paths) are written as strings.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        redact_record(record)
        stamp = datetime.fromtimestamp(record.created, UTC)
        data: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            data.setdefault(key, value)
        ids = tracing.current_ids()
        if ids is not None:
            data.setdefault("trace_id", ids[0])
            data.setdefault("span_id", ids[1])
        if record.exc_text:
            data["exception"] = record.exc_text
        if record.stack_info:
            data["stack"] = record.stack_info
        return jsonlib.dumps(data, default=str, ensure_ascii=False)


_INSTALLED: Final = "_chatkeep_configured"


def configure(
    *,
    json: bool = False,
    level: int | str = logging.INFO,
    stream: IO[str] | None = None,
    logger: str | None = None,
    force: bool = True,
) -> logging.Handler:
    """Send log records to ``stream`` (stderr) as JSON lines or text, always redacted.

    Args:
        json: one JSON object per line (:class:`JsonFormatter`) instead of text.
        level: the level of ``logger``.
        stream: where to write (default: ``sys.stderr`` at the time of the call).
        logger: the logger to configure; default the root logger (the whole process).
        force: remove (and close) the handlers ``logger`` already has, as
            ``logging.basicConfig(force=True)`` does; otherwise only those an earlier
            ``configure`` added.

    Returns:
        The handler added, for tests or further tuning.
    """
    target = logging.getLogger(logger)
    for old in list(target.handlers):
        if force or getattr(old, _INSTALLED, False):
            target.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    setattr(handler, _INSTALLED, True)
    target.addHandler(handler)
    target.setLevel(level)
    return handler


def install_redactor(logger: str | None = None) -> int:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: root).

    For applications that configure logging themselves. Returns how many handlers got
    one (handlers that already have one are skipped).
    """
    added = 0
    for handler in logging.getLogger(logger).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
            added += 1
    return added
