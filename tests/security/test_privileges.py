"""What the roles may not do, whatever the acting user: the grants and owners behind RLS."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from chatkeep.errors import PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.security import acting_as
from tests.security.conftest import World

# Every table the application works with: each must have row security enabled and forced.
APP_TABLES = ("users", "rooms", "room_users", "messages", "message_read_status")


async def refused(conn: asyncpg.Connection, sql: str, *args: Any) -> None:
    with pytest.raises(PermissionDenied), translate_errors("test"):
        await conn.execute(sql, *args)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE messages ADD COLUMN x int",
        "ALTER TABLE messages DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE rooms NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY messages_select ON messages",
        "DROP TABLE messages",
        "TRUNCATE messages",
        "TRUNCATE audit_log",
        "CREATE TABLE mine (id int)",
        "CREATE FUNCTION mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER TABLE messages DISABLE TRIGGER messages_guard",
        "SET ROLE chatapp_owner",
        "SET ROLE chatapp_rls",
        "SELECT * FROM audit_log",
        "INSERT INTO audit_log (action, table_name, row_id) "
        "VALUES ('user.delete', 'users', gen_random_uuid())",
        "UPDATE audit_log SET action = 'user.update'",
        "DELETE FROM audit_log",
        "DELETE FROM chatkeep_schema_history",
        "SELECT chatkeep_audit_row()",
    ],
)
async def test_the_app_role_cannot(app_conn: asyncpg.Connection, sql: str) -> None:
    await refused(app_conn, sql)


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("messages", "room_id"),
        ("messages", "user_id"),
        ("messages", "seq"),
        ("room_users", "room_id"),
        ("room_users", "user_id"),
        ("rooms", "created_by"),
        ("rooms", "direct_user_low"),
        ("users", "id"),
        ("users", "created_at"),
    ],
)
async def test_identity_columns_cannot_be_rewritten(
    app_conn: asyncpg.Connection, world: World, table: str, column: str
) -> None:
    # Even for a row the acting user owns: moving a message to another room or a membership
    # to another user is never the application's business.
    async with acting_as(app_conn, world.alice) as c:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await c.execute(f"UPDATE {table} SET {column} = {column}")


async def test_row_security_cannot_be_switched_off_by_the_app(
    app_conn: asyncpg.Connection, world: World
) -> None:
    async with acting_as(app_conn, world.dave) as c:
        await c.execute("SET LOCAL row_security = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await c.fetch("SELECT * FROM messages")


async def test_readonly_reads_every_row_but_no_secret(
    readonly_conn: asyncpg.Connection, world: World
) -> None:
    assert await readonly_conn.fetchval("SELECT count(*) FROM messages") == 7
    assert await readonly_conn.fetchval("SELECT count(*) FROM room_users") == 7
    assert await readonly_conn.fetchval("SELECT count(username) FROM users") == 4
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await readonly_conn.fetch("SELECT password_hash FROM users")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await readonly_conn.execute("DELETE FROM messages")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await readonly_conn.execute("UPDATE rooms SET name = 'x'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # no membership look-ups either
        await readonly_conn.fetch("SELECT chatkeep_acting_rooms('member')")


async def test_every_app_table_forces_row_security(conn: asyncpg.Connection) -> None:
    # A table the app may write without row security would undo everything else: this
    # catches a later migration that forgets (default privileges give the app DML).
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           AND (has_table_privilege('chatapp_app', c.oid, 'INSERT')
                OR has_table_privilege('chatapp_app', c.oid, 'UPDATE')
                OR has_table_privilege('chatapp_app', c.oid, 'DELETE')
                OR has_any_column_privilege('chatapp_app', c.oid, 'UPDATE'))
         ORDER BY 1
        """
    )
    assert sorted(r["relname"] for r in rows) == sorted(APP_TABLES)
    assert all(r["relrowsecurity"] and r["relforcerowsecurity"] for r in rows)


async def test_the_owner_owns_everything_and_the_definer_role_its_functions_alone(
    conn: asyncpg.Connection,
) -> None:
    owners = await conn.fetch(
        """
        SELECT pg_get_userbyid(relowner) AS owner, relname AS name FROM pg_class
         WHERE relnamespace = 'public'::regnamespace
        UNION ALL
        SELECT pg_get_userbyid(proowner), proname FROM pg_proc
         WHERE pronamespace = 'public'::regnamespace
        UNION ALL
        SELECT pg_get_userbyid(typowner), typname FROM pg_type
         WHERE typnamespace = 'public'::regnamespace
        UNION ALL
        SELECT pg_get_userbyid(nspowner), nspname FROM pg_namespace WHERE nspname = 'public'
        """
    )
    by_owner: dict[str, set[str]] = {}
    for row in owners:
        by_owner.setdefault(row["owner"], set()).add(row["name"])
    assert set(by_owner) == {"chatapp_owner", "chatapp_rls"}
    assert by_owner["chatapp_rls"] == {"chatkeep_acting_rooms", "chatkeep_room_is_empty"}
    role = await conn.fetchrow(
        "SELECT rolcanlogin, rolbypassrls, rolsuper FROM pg_roles WHERE rolname = 'chatapp_rls'"
    )
    assert role is not None
    assert tuple(role.values()) == (False, True, False)


async def test_definer_functions_are_locked_down(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch(
        """
        SELECT p.proname, p.proconfig, p.proacl::text[] AS acl
          FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef
         ORDER BY 1
        """
    )
    assert [r["proname"] for r in rows] == [
        "chatkeep_acting_rooms",
        "chatkeep_audit_row",
        "chatkeep_room_is_empty",
    ]
    for row in rows:
        # A fixed search_path with no schema anyone else can create objects in.
        assert row["proconfig"] == ["search_path=pg_catalog, pg_temp"], row["proname"]
        # No "=X/..." entry: EXECUTE is not granted to PUBLIC.
        assert not any(entry.startswith("=") for entry in row["acl"]), row["proname"]


async def test_public_schema_and_database_are_closed_to_others(
    conn: asyncpg.Connection,
) -> None:
    acl = await conn.fetchval("SELECT nspacl::text[] FROM pg_namespace WHERE nspname = 'public'")
    assert not any(entry.startswith("=") for entry in acl)  # nothing for PUBLIC
    assert not any(entry.startswith("chatapp_app=") and "C" in entry.split("/")[0] for entry in acl)


async def test_the_app_role_holds_no_power(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        """
        SELECT r.rolsuper, r.rolbypassrls, r.rolcreatedb, r.rolcreaterole,
               (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) AS memberships
          FROM pg_roles r WHERE r.rolname = 'chatapp_app'
        """
    )
    assert row is not None
    assert json.dumps(dict(row)) == json.dumps(
        {
            "rolsuper": False,
            "rolbypassrls": False,
            "rolcreatedb": False,
            "rolcreaterole": False,
            "memberships": 0,
        }
    )


async def test_the_app_may_write_what_it_needs(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    # The column grants are not too tight for the repositories' writes.
    async with acting_as(app_conn, world.alice) as c:
        await c.execute(
            "UPDATE users SET email = 'a2@example.org', username = 'alice2', avatar_url = NULL,"
            " is_active = true, last_seen = now(), updated_at = now() WHERE id = $1",
            world.alice,
        )
        await c.execute(
            "UPDATE rooms SET name = 'n', description = 'd', is_active = true,"
            " last_seq = last_seq, updated_at = now() WHERE id = $1",
            world.private,
        )
        await c.execute(
            "UPDATE messages SET content = 'c', type = 'text', is_edited = true,"
            " edited_at = now() WHERE id = $1",
            world.msg[("private", "alice")],
        )
        await c.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", world.private)
        message = uuid7()
        await c.execute(
            "INSERT INTO messages (id, room_id, user_id, seq, content)"
            " SELECT $1, $2, $3, last_seq + 1, 'x' FROM rooms WHERE id = $2",
            message,
            world.private,
            world.alice,
        )
    assert await conn.fetchval("SELECT username FROM users WHERE id = $1", world.alice) == "alice2"


async def test_bulk_copy_under_row_security_is_refused_with_a_clear_error(
    app_conn: asyncpg.Connection, world: World
) -> None:
    # PostgreSQL refuses COPY FROM into tables under row security; the caller is told to
    # use a role that bypasses it, not handed a bare feature-not-supported code.
    with pytest.raises(PermissionDenied, match="BYPASSRLS") as caught:
        async with acting_as(app_conn, world.alice) as c:
            await c.copy_records_to_table(
                "messages",
                records=[(world.public, world.alice, 99, "bulk")],
                columns=["room_id", "user_id", "seq", "content"],
            )
    assert isinstance(caught.value.__cause__, asyncpg.FeatureNotSupportedError)
