"""The exception tree, and driver errors translated at the storage boundary.

Translations are checked against errors a real PostgreSQL raises, not hand-made ones,
wherever the server can produce them on demand.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import asyncpg
import pytest

import chatkeep.errors as errors_module
from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.errors import (
    ChatkeepError,
    ChecksumMismatch,
    ConfigurationError,
    Conflict,
    InvalidInput,
    MigrationError,
    MigrationFailed,
    MigrationLockTimeout,
    MigrationOrderError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unavailable,
)
from chatkeep.storage.bootstrap import maintenance_url
from chatkeep.storage.database import connect
from chatkeep.storage.errors import connection_is_lost, translate_error, translate_errors

BCRYPT = "$2b$12$" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"

# -- the tree -----------------------------------------------------------------------------


def test_every_public_error_is_a_chatkeep_error_with_a_public_module() -> None:
    for name in errors_module.__all__:
        cls = getattr(errors_module, name)
        assert issubclass(cls, ChatkeepError), name
        assert cls.__module__ == "chatkeep.errors", name
        assert name in (errors_module.__doc__ or ""), f"{name} is missing from the tree"


def test_all_lists_every_error_class() -> None:
    defined = {
        name
        for name, value in vars(errors_module).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    assert defined == set(errors_module.__all__)


def test_hierarchy() -> None:
    for cls in (ChecksumMismatch, MigrationOrderError, MigrationLockTimeout, MigrationFailed):
        assert issubclass(cls, MigrationError)
    for base in (
        ConfigurationError,
        InvalidInput,
        NotFound,
        Conflict,
        PermissionDenied,
        RateLimited,
        Unavailable,
        MigrationError,
    ):
        assert base.__bases__ == (ChatkeepError,)
    assert ChatkeepError.__bases__ == (Exception,)


def test_errors_carry_their_details() -> None:
    invalid = InvalidInput("email", "must contain @")
    assert (invalid.field, invalid.rule, str(invalid)) == (
        "email",
        "must contain @",
        "email: must contain @",
    )
    assert str(InvalidInput("email", "rule", "custom message")) == "custom message"
    assert Conflict("taken", constraint="users_email_lower_key").constraint == (
        "users_email_lower_key"
    )
    assert NotFound("gone", entity="rooms").entity == "rooms"
    assert RateLimited("slow down", retry_after=1.5).retry_after == 1.5
    assert ConfigurationError("bad", field="redis_url").field == "redis_url"
    assert ChecksumMismatch("edited", version=3).version == 3
    failed = MigrationFailed("boom", version=4, statement="SELECT 1")
    assert (failed.version, failed.statement, failed.message) == (4, "SELECT 1", "boom")
    assert repr(ChatkeepError("x")) == "ChatkeepError('x')"


# -- translation of real server errors ----------------------------------------------------


async def server_error(conn: asyncpg.Connection, sql: str, *args: object) -> ChatkeepError:
    """Run ``sql`` expecting a server error; return its translation (raised from it)."""
    with pytest.raises(ChatkeepError) as info, translate_errors("test op"):
        await conn.execute(sql, *args)
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)
    return info.value


async def test_unique_violation_is_a_conflict_naming_the_constraint(
    conn: asyncpg.Connection,
) -> None:
    insert = "INSERT INTO users (email, password_hash, username) VALUES ($1, $2, $3)"
    await conn.execute(insert, "a@example.com", BCRYPT, "alice")
    error = await server_error(conn, insert, "A@example.com", BCRYPT, "other")
    assert isinstance(error, Conflict)
    assert error.constraint == "users_email_lower_key"
    assert str(error) == "test op: already exists (users_email_lower_key)"


async def test_foreign_key_violation_is_not_found(conn: asyncpg.Connection) -> None:
    error = await server_error(
        conn,
        "INSERT INTO rooms (name, type, created_by) VALUES ('r', 'public', gen_random_uuid())",
    )
    assert isinstance(error, NotFound)
    assert error.entity == "rooms"
    assert "rooms_created_by_fkey" in str(error)


async def test_check_violation_is_invalid_input_naming_the_column(
    conn: asyncpg.Connection,
) -> None:
    error = await server_error(
        conn,
        "INSERT INTO users (email, password_hash, username) VALUES ('bad', $1, 'alice')",
        BCRYPT,
    )
    assert isinstance(error, InvalidInput)
    assert error.field == "email"
    assert error.rule == "violates users_email_check"


async def test_multi_word_column_constraint_names_the_column(conn: asyncpg.Connection) -> None:
    error = await server_error(
        conn,
        "INSERT INTO users (email, password_hash, username) VALUES ('a@b.io', 'plain', 'alice')",
    )
    assert isinstance(error, InvalidInput)
    assert error.field == "password_hash"


async def test_not_null_violation_is_invalid_input_naming_the_column(
    conn: asyncpg.Connection,
) -> None:
    error = await server_error(
        conn, "INSERT INTO users (email, password_hash) VALUES ('a@b.io', $1)", BCRYPT
    )
    assert isinstance(error, InvalidInput)
    assert error.field == "username"
    assert error.rule == "violates not-null"


async def test_invalid_text_representation_is_invalid_input(econn: asyncpg.Connection) -> None:
    error = await server_error(econn, "SELECT 'not-a-uuid'::uuid")
    assert isinstance(error, InvalidInput)
    assert error.rule == "invalid value (22P02)"


async def test_value_too_long_for_a_column_names_it(econn: asyncpg.Connection) -> None:
    await econn.execute("CREATE TABLE t (code varchar(3))")
    error = await server_error(econn, "INSERT INTO t VALUES ('abcdef')")
    assert isinstance(error, InvalidInput)
    assert error.rule == "invalid value (22001)"


async def test_exclusion_violation_is_invalid_input(econn: asyncpg.Connection) -> None:
    await econn.execute(
        "CREATE TABLE booking (slot int4range, CONSTRAINT booking_slot_excl"
        " EXCLUDE USING gist (slot WITH &&))"
    )
    await econn.execute("INSERT INTO booking VALUES ('[1,5)')")
    error = await server_error(econn, "INSERT INTO booking VALUES ('[3,8)')")
    assert isinstance(error, InvalidInput)
    assert error.field == "slot"


async def test_insufficient_privilege_is_permission_denied(conn: asyncpg.Connection) -> None:
    # The migration history refuses updates with insufficient_privilege.
    error = await server_error(conn, "DELETE FROM chatkeep_schema_history")
    assert isinstance(error, PermissionDenied)
    assert "secret" not in str(error)


async def test_statement_timeout_is_unavailable(econn: asyncpg.Connection) -> None:
    await econn.execute("SET statement_timeout = '50ms'")
    error = await server_error(econn, "SELECT pg_sleep(2)")
    assert isinstance(error, Unavailable)
    assert "57014" in str(error)


async def test_lock_not_available_is_unavailable(
    econn: asyncpg.Connection, emptied_database_url: str
) -> None:
    await econn.execute("CREATE TABLE busy (id int)")
    holder = await asyncpg.connect(emptied_database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE busy")
            async with econn.transaction():
                error = await server_error(econn, "LOCK TABLE busy NOWAIT")
    finally:
        await holder.close()
    assert isinstance(error, Unavailable)
    assert "55P03" in str(error)


async def test_serialization_failure_is_unavailable(econn: asyncpg.Connection) -> None:
    error = await server_error(
        econn, "DO $$ BEGIN RAISE EXCEPTION 'retry me' USING ERRCODE = '40001'; END $$"
    )
    assert isinstance(error, Unavailable)


async def test_other_server_errors_are_plain_chatkeep_errors(econn: asyncpg.Connection) -> None:
    error = await server_error(econn, "SELEC 1")
    assert type(error) is ChatkeepError
    assert "42601" in str(error)


async def test_missing_database_is_a_configuration_error(
    admin_url: str, make_settings: Callable[..., Settings]
) -> None:
    url = maintenance_url(admin_url, "chatkeep_no_such_database")
    with pytest.raises(ConfigurationError) as info:
        await connect(url, make_settings(), operation="probe")
    assert info.value.field == "database_url"
    assert "chatkeep setup" in str(info.value)
    assert isinstance(info.value.__cause__, asyncpg.InvalidCatalogNameError)


async def test_unknown_role_is_a_configuration_error(
    admin_url: str, make_settings: Callable[..., Settings]
) -> None:
    url = urls.with_user(admin_url, "chatkeep_no_such_role", "pw")
    with pytest.raises(ConfigurationError) as info:
        await connect(url, make_settings(), operation="probe")
    assert info.value.field == "database_url"
    assert "refused the credentials" in str(info.value)
    assert ":pw@" not in str(info.value)


async def test_unreachable_server_is_unavailable(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(Unavailable) as info:
        await connect("postgresql://u:pw@127.0.0.1:1/db", make_settings(), operation="probe")
    assert "unreachable" in str(info.value)
    assert "u:***@127.0.0.1:1" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


async def test_bad_connection_option_is_a_configuration_error(
    admin_url: str, make_settings: Callable[..., Settings]
) -> None:
    separator = "&" if "?" in admin_url else "?"
    with pytest.raises(ConfigurationError) as info:
        await connect(admin_url + f"{separator}sslmode=bogus", make_settings())
    assert info.value.field == "database_url"
    assert "sslmode" in str(info.value)


# -- translation rules without a server ---------------------------------------------------


def test_chatkeep_errors_pass_through() -> None:
    error = NotFound("gone")
    assert translate_error(error) is error
    with pytest.raises(NotFound) as info, translate_errors():
        raise error
    assert info.value is error


def test_foreign_exceptions_are_left_alone() -> None:
    assert translate_error(KeyError("x")) is None
    with pytest.raises(KeyError), translate_errors():
        raise KeyError("x")


@pytest.mark.parametrize(
    "exc",
    [
        OSError("network down"),
        TimeoutError(),
        ConnectionResetError(),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ConnectionDoesNotExistError("gone"),
        # What asyncpg raises for a connection left mid-operation by a dead backend.
        asyncpg.InternalClientError("cannot switch to state 12; another operation (2)"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.IdleInTransactionSessionTimeoutError("terminating connection"),
    ],
)
def test_link_failures_are_unavailable(exc: BaseException) -> None:
    with pytest.raises(Unavailable) as info, translate_errors("ping"):
        raise exc
    assert str(info.value).startswith("ping: database un")
    assert info.value.__cause__ is exc
    # The session is gone: its connection must not go back to the pool.
    assert connection_is_lost(exc)
    assert connection_is_lost(info.value)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.SerializationError("could not serialize access"),
        NotFound("no cause"),
        KeyError("x"),
    ],
)
def test_answers_of_a_live_server_keep_the_connection(exc: BaseException) -> None:
    assert not connection_is_lost(exc)


def test_field_falls_back_to_constraint_or_table() -> None:
    error = asyncpg.CheckViolationError("x")
    error.constraint_name = "odd_name"
    error.table_name = "users"
    translated = translate_error(error)
    assert isinstance(translated, InvalidInput)
    assert translated.field == "odd_name"
    bare = translate_error(asyncpg.CheckViolationError("x"))
    assert isinstance(bare, InvalidInput)
    assert bare.field == "value"
