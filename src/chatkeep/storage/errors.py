"""Translation of asyncpg errors into ``chatkeep.errors`` at the storage boundary.

Callers never see a driver exception: every storage entry point runs its database work
under :func:`translate_errors`, which raises the matching chatkeep error ``from`` the
original so the driver's detail is still on ``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

import asyncpg

from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)

__all__ = ["DRIVER_ERRORS", "connection_is_lost", "translate_error", "translate_errors"]

#: Every exception the driver raises for a failed call. ``InternalClientError`` (not an
#: ``InterfaceError``) is asyncpg refusing to start an operation on a connection left in
#: the middle of another, as one is after its server process died under a query.
DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

# SQLSTATE classes (first two characters) that mean "the server or the link is in trouble".
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53", "57", "58", "40"})
# Codes in class 55 that are about waiting, not about the request.
_UNAVAILABLE_CODES: Final = frozenset({"55P03", "55006"})
# Server errors after which the server closes the connection: the session is gone
# (administrator command, crash, starting up, idle-in-transaction and idle timeouts).
_SESSION_ENDING_CODES: Final = frozenset({"57P01", "57P02", "57P03", "25P03", "57P05"})


def _field_of(exc: asyncpg.PostgresError) -> str:
    column = getattr(exc, "column_name", None)
    if column:
        return str(column)
    constraint: str | None = getattr(exc, "constraint_name", None)
    table: str | None = getattr(exc, "table_name", None)
    if constraint and table and constraint.startswith(f"{table}_"):
        # Our constraints are named <table>_<column>_<kind>; report the column part.
        middle = constraint[len(table) + 1 :].rsplit("_", 1)[0]
        return middle or constraint
    return str(constraint or table or "value")


def translate_error(exc: BaseException, operation: str = "database") -> ChatkeepError | None:
    """Map a driver exception to the chatkeep error a caller should see, or ``None``."""
    if isinstance(exc, ChatkeepError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        constraint = exc.constraint_name
        return Conflict(f"{operation}: already exists ({constraint})", constraint=constraint)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound(
            f"{operation}: a referenced row does not exist ({exc.constraint_name})",
            entity=exc.table_name,
        )
    if isinstance(
        exc,
        asyncpg.CheckViolationError
        | asyncpg.NotNullViolationError
        | asyncpg.ExclusionViolationError,
    ):
        field = _field_of(exc)
        return InvalidInput(field, f"violates {exc.constraint_name or 'not-null'}")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return PermissionDenied(f"{operation}: permission denied")
    if isinstance(exc, asyncpg.FeatureNotSupportedError) and "row-level security" in str(exc):
        # COPY FROM into a table under row security: bulk loads are system work.
        return PermissionDenied(
            f"{operation}: PostgreSQL does not COPY into tables under row-level security; "
            "connect as a superuser or a BYPASSRLS role for bulk loads"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConfigurationError(
            f"{operation}: the database does not exist; run `chatkeep setup` first",
            field="database_url",
        )
    if isinstance(
        exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
    ):
        return ConfigurationError(
            f"{operation}: the server refused the credentials ({exc.sqlstate})",
            field="database_url",
        )
    if isinstance(exc, asyncpg.ClientConfigurationError):
        # A bad connection option (sslmode=bogus...): the settings are wrong, not the server.
        return ConfigurationError(
            f"{operation}: invalid connection settings ({exc})", field="database_url"
        )
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state.startswith("22"):  # data exceptions: bad encoding, too long, out of range
            return InvalidInput(_field_of(exc), f"invalid value ({state})")
        if (
            state[:2] in _UNAVAILABLE_CLASSES
            or state in _UNAVAILABLE_CODES
            or state in _SESSION_ENDING_CODES
        ):
            return Unavailable(
                f"{operation}: database unavailable ({state}: {exc.__class__.__name__})"
            )
        # Anything else is a bug or an unexpected server state; still one of ours.
        return ChatkeepError(f"{operation}: database error {state} ({exc.__class__.__name__})")
    if isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | asyncpg.PostgresConnectionError
        | asyncpg.ConnectionDoesNotExistError
        | OSError
        | TimeoutError
        | asyncio.TimeoutError,
    ):
        return Unavailable(f"{operation}: database unreachable ({exc.__class__.__name__})")
    return None


def connection_is_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or the driver error behind a chatkeep error) means the session is gone.

    True for everything but an answer from a live server: a connection error, asyncpg's
    protocol refusing an operation, a timeout, and the server's errors that end the session
    (``57P01`` administrator command...). The connection must then be discarded, not
    returned to the pool: its server process may be gone or still busy.
    """
    cause: BaseException | None = exc
    while isinstance(cause, ChatkeepError):
        cause = cause.__cause__
    if cause is None or not isinstance(cause, DRIVER_ERRORS):
        return False
    if isinstance(cause, asyncpg.PostgresError):
        state = cause.sqlstate or ""
        return state.startswith("08") or state in _SESSION_ENDING_CODES
    return True


@contextlib.contextmanager
def translate_errors(operation: str = "database") -> Iterator[None]:
    """Run a block and re-raise any driver error as its chatkeep equivalent."""
    try:
        yield
    except ChatkeepError:
        raise
    except DRIVER_ERRORS as exc:
        translated = translate_error(exc, operation)
        if translated is None:
            raise
        raise translated from exc
