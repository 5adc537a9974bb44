"""``chatkeep setup``'s roles and database preparation, and who migrations run as."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from typer.testing import CliRunner

from chatkeep.cli import app
from chatkeep.config import Settings
from chatkeep.errors import ConfigurationError, InvalidInput, Unavailable
from chatkeep.storage.bootstrap import (
    RoleSpec,
    ensure_roles,
    maintenance_url,
    prepare_database,
    scram_verifier,
)
from chatkeep.storage.database import connect
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.security import (
    connection_failed,
    connection_failures,
    reset_connection_failures,
)
from tests.conftest import url_as

Env = Callable[..., dict[str, str]]


@pytest_asyncio.fixture(loop_scope="session")
async def scratch_roles(admin_url: str) -> AsyncIterator[tuple[RoleSpec, ...]]:
    """Role specs like the real ones but with names of this test's own (roles are
    cluster-wide, and other test sessions use the real ones)."""
    tag = f"ck_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    specs = (
        RoleSpec(
            f"{tag}_owner", login=False, bypass_rls=False, member_of=(), credential_field=None
        ),
        RoleSpec(
            f"{tag}_app",
            login=True,
            bypass_rls=False,
            member_of=(f"{tag}_owner",),
            credential_field="app_password",
        ),
        RoleSpec(
            f"{tag}_ro",
            login=True,
            bypass_rls=False,
            member_of=(),
            credential_field="readonly_password",
        ),
    )
    yield specs
    admin = await asyncpg.connect(admin_url)
    try:
        for spec in reversed(specs):
            await admin.execute(f'DROP ROLE IF EXISTS "{spec.name}"')
    finally:
        await admin.close()


async def role_state(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT rolsuper, rolcanlogin, rolbypassrls, rolcreatedb, rolpassword"
        "  FROM pg_authid WHERE rolname = $1",
        name,
    )


async def test_roles_are_created_once_with_generated_passwords(
    conn: asyncpg.Connection, scratch_roles: tuple[RoleSpec, ...]
) -> None:
    owner, app_role, ro = scratch_roles
    first = await ensure_roles(conn, Settings(), roles=scratch_roles)
    assert first.created == (owner.name, app_role.name, ro.name)
    assert set(first.generated) == {app_role.name, ro.name}  # login roles only
    assert all(len(s.get_secret_value()) >= 32 for s in first.generated.values())
    state = await role_state(conn, app_role.name)
    assert state is not None
    assert state["rolpassword"].startswith("SCRAM-SHA-256$4096:")
    owner_state = await role_state(conn, owner.name)
    assert owner_state is not None
    assert owner_state["rolpassword"] is None
    assert not owner_state["rolcanlogin"]
    member = await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", app_role.name, owner.name)
    assert member is True

    again = await ensure_roles(conn, Settings(), roles=scratch_roles)
    assert (again.created, again.corrected, dict(again.generated)) == ((), (), {})
    unchanged = await role_state(conn, app_role.name)
    assert unchanged is not None
    assert unchanged["rolpassword"] == state["rolpassword"]  # never rotated by surprise


async def test_passwords_from_settings_and_drifted_attributes(
    conn: asyncpg.Connection, scratch_roles: tuple[RoleSpec, ...]
) -> None:
    _owner, app_role, ro = scratch_roles
    await ensure_roles(conn, Settings(), roles=scratch_roles, generate_passwords=False)
    before = await role_state(conn, app_role.name)
    assert before is not None
    assert before["rolpassword"] is None
    await conn.execute(f'ALTER ROLE "{ro.name}" CREATEDB BYPASSRLS')
    settings = Settings(app_password=SecretStr("correct horse battery"))
    report = await ensure_roles(conn, settings, roles=scratch_roles)
    assert report.corrected == (ro.name,)
    assert report.passwords_set == (app_role.name,)
    assert dict(report.generated) == {}
    fixed = await role_state(conn, ro.name)
    assert fixed is not None
    assert (fixed["rolcreatedb"], fixed["rolbypassrls"]) == (False, False)
    # The verifier stored is the one this password gives with the stored salt: the server
    # will accept the password, and it never saw it.
    after = await role_state(conn, app_role.name)
    assert after is not None
    stored = after["rolpassword"]
    salt = base64.b64decode(stored.split("$")[1].split(":")[1])
    assert stored == scram_verifier("correct horse battery", salt=salt)


async def test_concurrent_setups_agree(admin_url: str, scratch_roles: tuple[RoleSpec, ...]) -> None:
    conns = [await asyncpg.connect(admin_url) for _ in range(3)]
    try:
        reports = await asyncio.gather(
            *(ensure_roles(c, Settings(), roles=scratch_roles) for c in conns)
        )
    finally:
        for c in conns:
            await c.close()
    created = [name for r in reports for name in r.created]
    assert sorted(created) == sorted(s.name for s in scratch_roles)  # each exactly once


def test_password_rules() -> None:
    with pytest.raises(ConfigurationError, match="app_password"):
        Settings.load(app_password="short")
    with pytest.raises(ConfigurationError, match="readonly_password"):
        Settings.load(readonly_password="ünïcode password")
    assert Settings(migrator_password="").migrator_password is None
    with pytest.raises(InvalidInput):
        scram_verifier("naïve password")
    shown = repr(Settings(app_password=SecretStr("a secret password")))
    assert "secret password" not in shown
    assert "app_password=SecretStr('**********')" in shown


async def test_prepare_database_adopts_and_locks_down(
    empty_database_url: str, admin_url: str
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("CREATE TABLE legacy (id int GENERATED ALWAYS AS IDENTITY)")
        await conn.execute("CREATE TYPE mood AS ENUM ('ok')")
        await conn.execute("CREATE FUNCTION legacy_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        await conn.execute("CREATE VIEW legacy_view AS SELECT id FROM legacy")
        adopted = await prepare_database(conn)
        assert set(adopted) == {
            "SCHEMA public",
            "TABLE public.legacy",
            "VIEW public.legacy_view",
            "FUNCTION legacy_fn()",
            "TYPE public.mood",
        }
        owners = await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) AS o FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace"
        )
        assert [r["o"] for r in owners] == ["chatapp_owner"]  # the sequence followed its table
        assert await prepare_database(conn) == ()  # nothing left to do
        name = await conn.fetchval("SELECT current_database()")
        acl = await conn.fetchval("SELECT datacl::text FROM pg_database WHERE datname = $1", name)
        assert "chatapp_app=c/" in acl
        assert not any(entry.startswith("=") for entry in acl.strip("{}").split(","))
    finally:
        await conn.close()
    # Others than the chatkeep roles may no longer connect.
    admin = await asyncpg.connect(admin_url)
    stranger = f"ck_stranger_{os.getpid()}"
    try:
        await admin.execute(f'CREATE ROLE "{stranger}" LOGIN')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(url_as(empty_database_url, stranger))
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{stranger}"')
        await admin.close()


async def test_migrations_run_as_the_owner_once_setup_ran(
    empty_database_url: str,
) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        # Not prepared: nobody but the connected user may create here, so it runs as itself.
        assert await Migrator(conn).up(to=1)
        assert (
            await conn.fetchval(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'users'"
            )
            != "chatapp_owner"
        )
        await prepare_database(conn)  # adopts what is there
        await Migrator(conn).up()
        owners = await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) AS o FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace"
            " AND relname <> 'chatkeep_acting_memberships'"  # chatapp_rls's view (013)
        )
        assert [r["o"] for r in owners] == ["chatapp_owner"]
        by = await conn.fetch("SELECT DISTINCT db_user FROM chatkeep_schema_history")
        assert [r["db_user"] for r in by] == [await conn.fetchval("SELECT session_user")]
        assert await conn.fetchval("SELECT current_user") == await conn.fetchval(
            "SELECT session_user"
        )  # the role was reset afterwards
        # An explicit role, or none at all, is honoured.
        runner = Migrator(conn, role=None)
        assert await runner._resolve_role() is None
        assert await Migrator(conn, role="chatapp_owner")._resolve_role() == "chatapp_owner"
    finally:
        await conn.close()


async def test_the_migrator_login_can_migrate(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    try:
        await prepare_database(conn)
    finally:
        await conn.close()
    migrator = await asyncpg.connect(url_as(empty_database_url, "chatapp_migrator"))
    try:
        applied = await Migrator(migrator).up()
        assert len(applied) >= 10
        owner = await migrator.fetchval(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'audit_log'"
        )
        assert owner == "chatapp_owner"
    finally:
        await migrator.close()


def test_cli_setup_reports_roles(cli_env: Env, database_url: str) -> None:
    result = CliRunner().invoke(
        app, ["setup", "--database-url", database_url], env=cli_env(COLUMNS="200")
    )
    assert result.exit_code == 0, result.output
    assert "already exists" in result.stdout
    assert "roles already exist" in result.stdout
    assert "password for" not in result.stdout


def test_doctor_as_each_role(cli_env: Env, database_url: str, redis_url: str) -> None:
    def doctor(role: str) -> str:
        env = cli_env(COLUMNS="250", REDIS_URL=redis_url)
        result = CliRunner().invoke(
            app, ["doctor", "--database-url", url_as(database_url, role)], env=env
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    app_report = doctor("chatapp_app")
    assert "connected as chatapp_app: bound by row-level security" in app_report
    assert "chatapp_* roles as `chatkeep setup` made them" in app_report
    migrator_report = doctor("chatapp_migrator")
    assert "owns" in migrator_report
    assert "can act as chatapp_owner" in migrator_report


async def test_failed_connections_are_counted_without_the_password(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    reset_connection_failures()
    bad = url_as(database_url, "chatkeep_nobody").replace(
        "chatkeep_nobody@", "chatkeep_nobody:hunter2hunter2@"
    )
    for _ in range(2):
        with pytest.raises(ConfigurationError):
            await connect(bad, Settings())
    [failure] = connection_failures()
    assert (failure.role, failure.count) == ("chatkeep_nobody", 2)
    assert failure.reason.startswith("authentication failed")
    assert "hunter2" not in caplog.text
    assert "chatkeep_nobody" in caplog.text
    reset_connection_failures()
    assert connection_failures() == []


async def test_failed_connections_name_the_reason(database_url: str) -> None:
    reset_connection_failures()
    missing = maintenance_url(database_url, "chatkeep_no_such_db")
    with pytest.raises(ConfigurationError, match="does not exist"):
        await connect(missing, Settings())
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Unavailable):
        await connect(f"postgresql://someone@127.0.0.1:{port}/db", Settings(connect_timeout=2))
    reasons = {(f.host, f.reason) for f in connection_failures()}
    assert (f"127.0.0.1:{port}", "connection refused") in reasons
    assert any(reason == "the database does not exist" for _host, reason in reasons)
    reset_connection_failures()


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (TimeoutError(), "timed out"),
        (ssl.SSLError(1, "wrong version number"), "TLS error: "),
        (asyncpg.UndefinedTableError("x"), "server error 42P01"),
        (OSError("no route"), "OSError"),
        (None, "Unavailable"),
    ],
)
def test_failure_reasons_for_faults_a_test_server_cannot_produce(
    cause: BaseException | None, reason: str
) -> None:
    # Pure logic: how each driver fault is summarised (no real server times out on demand).
    reset_connection_failures()
    error = Unavailable("connect failed")
    error.__cause__ = cause
    assert connection_failed("postgresql://u:pw@[::1", error) is error
    [failure] = connection_failures()
    assert (failure.host, failure.role) == ("<unparseable url>", "?")
    assert failure.reason.startswith(reason)
    reset_connection_failures()
