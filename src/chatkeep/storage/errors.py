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

__all__ = ["translate_error", "translate_errors"]

# SQLSTATE classes (first two characters) that mean "the server or the link is in trouble".
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "53", "57", "58", "40"})
# Codes in class 55 that are about waiting, not about the request.
_UNAVAILABLE_CODES: Final = frozenset({"55P03", "55006"})


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
        if state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_CODES:
            return Unavailable(
                f"{operation}: database unavailable ({state}: {exc.__class__.__name__})"
            )
        # Anything else is a bug or an unexpected server state; still one of ours.
        return ChatkeepError(f"{operation}: database error {state} ({exc.__class__.__name__})")
    if isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.ConnectionDoesNotExistError
        | OSError
        | TimeoutError
        | asyncio.TimeoutError,
    ):
        return Unavailable(f"{operation}: database unreachable ({exc.__class__.__name__})")
    return None


@contextlib.contextmanager
def translate_errors(operation: str = "database") -> Iterator[None]:
    """Run a block and re-raise any driver error as its chatkeep equivalent."""
    try:
        yield
    except ChatkeepError:
        raise
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        translated = translate_error(exc, operation)
        if translated is None:
            raise
        raise translated from exc
