"""What the roles may not do, whatever the acting user: the grants and owners behind RLS."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from chatkeep.errors import PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.storage.errors import translate_errors
from tests.security.conftest import World, acting_as

# Every table the application works with: each must have row security enabled and forced.
APP_TABLES = (
    "users",
    "rooms",
    "room_users",
    "messages",
    "message_read_status",
    "message_reactions",
    "thread_followers",
)


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
           AND (has_any_column_privilege('chatapp_app', c.oid, 'INSERT')
                OR has_any_column_privilege('chatapp_app', c.oid, 'UPDATE')
                OR has_table_privilege('chatapp_app', c.oid, 'DELETE'))
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
    # Its two functions, and the policies' membership view (013) with its row types.
    assert by_owner["chatapp_rls"] == {
        "chatkeep_acting_rooms",
        "chatkeep_room_is_empty",
        "chatkeep_acting_memberships",
        "_chatkeep_acting_memberships",
    }
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
        "chatkeep_assign_message_seq",
        "chatkeep_audit_row",
        "chatkeep_badges",
        "chatkeep_follower_mentions_recount",
        "chatkeep_log_change",
        "chatkeep_log_member",
        "chatkeep_log_message",
        "chatkeep_log_reaction",
        "chatkeep_log_room",
        "chatkeep_member_mentions_recount",
        "chatkeep_mention_added",
        "chatkeep_mention_removed",
        "chatkeep_message_edited",
        "chatkeep_message_removed",
        "chatkeep_message_stored",
        "chatkeep_reaction_room",
        "chatkeep_record_mentions",
        "chatkeep_relay_changes",
        "chatkeep_room_is_empty",
        "chatkeep_search_messages",
        "chatkeep_sent_mentions",
        "chatkeep_thread_follower_room",
        "chatkeep_thread_root",
        "chatkeep_unread",
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


# What the repositories' SQL writes as chatapp_app (src/chatkeep/storage/*.py), and all it
# may write: migration 011 revoked the rest. A flow that needs another column grants it in
# a new migration and adds it here.
APP_WRITES = {
    ("users", "INSERT"): {"id", "email", "password_hash", "username", "avatar_url"},
    ("users", "UPDATE"): {"username", "avatar_url", "password_hash", "is_active", "last_seen"},
    ("rooms", "INSERT"): {
        "id",
        "name",
        "description",
        "type",
        "created_by",
        "direct_user_low",
        "direct_user_high",
    },
    ("rooms", "UPDATE"): {"name", "description"},
    ("room_users", "INSERT"): {"room_id", "user_id", "role"},
    ("room_users", "UPDATE"): {"role", "last_read_seq", "last_read_at"},
    ("messages", "INSERT"): {
        "id",
        "room_id",
        "user_id",
        "client_msg_id",
        "content",
        "type",
        "reply_to",
    },
    ("messages", "UPDATE"): {"content", "is_edited", "edited_at"},
    ("message_read_status", "INSERT"): {"message_id", "user_id"},
    ("message_reactions", "INSERT"): {"message_id", "emoji", "user_id"},
    ("thread_followers", "INSERT"): {
        "root_id",
        "user_id",
        "following",
        "last_read_seq",
        "last_read_at",
    },
    ("thread_followers", "UPDATE"): {"following", "last_read_seq", "last_read_at"},
}
APP_DELETES = {"users", "rooms", "room_users", "messages", "message_reactions"}


async def test_the_app_role_holds_exactly_the_writes_the_flows_need(
    conn: asyncpg.Connection,
) -> None:
    rows = await conn.fetch(
        """
        SELECT c.relname, p.privilege, a.attname
          FROM pg_class c
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         CROSS JOIN (VALUES ('INSERT'), ('UPDATE')) AS p (privilege)
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           AND has_column_privilege('chatapp_app', c.oid, a.attnum, p.privilege)
        """
    )
    held: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        held.setdefault((row["relname"], row["privilege"]), set()).add(row["attname"])
    assert held == APP_WRITES
    deletes = await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p') AND has_table_privilege('chatapp_app', oid, 'DELETE')"
    )
    assert {r["relname"] for r in deletes} == APP_DELETES
    # Nor anything on the schema's tables beyond SELECT, the column grants and DELETE.
    others = await conn.fetch(
        """
        SELECT c.relname, p.privilege
          FROM pg_class c
         CROSS JOIN (VALUES ('TRUNCATE'), ('REFERENCES'), ('TRIGGER')) AS p (privilege)
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
           AND has_table_privilege('chatapp_app', c.oid, p.privilege)
        """
    )
    assert others == []


async def test_tables_made_later_start_with_nothing_for_the_app(conn: asyncpg.Connection) -> None:
    # A later migration grants its flows' writes itself, next to its table's policies.
    await conn.execute("SET ROLE chatapp_owner; CREATE TABLE later (id int); RESET ROLE")
    granted = await conn.fetchval(
        "SELECT has_any_column_privilege('chatapp_app', 'later', 'SELECT, INSERT, UPDATE')"
        " OR has_table_privilege('chatapp_app', 'later', 'DELETE')"
    )
    assert granted is False


async def test_the_app_may_write_what_it_needs(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    # The column grants are not too tight for the repositories' writes.
    async with acting_as(app_conn, world.alice) as c:
        await c.execute(
            "UPDATE users SET username = 'alice2', avatar_url = NULL, password_hash = $2,"
            " is_active = true, last_seen = now() WHERE id = $1",
            world.alice,
            "$2b$12$" + "c" * 53,
        )
        await c.execute(
            "UPDATE rooms SET name = 'n', description = 'd' WHERE id = $1", world.private
        )
        await c.execute(
            "UPDATE messages SET content = 'c', is_edited = true, edited_at = now() WHERE id = $1",
            world.msg[("private", "alice")],
        )
        await c.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", world.private)
        message = await c.fetchval(
            "INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type)"
            " VALUES ($1, $2, $3, 'c1', 'x', 'text') RETURNING seq",
            uuid7(),
            world.private,
            world.alice,
        )
        assert message == 4  # the trigger took the room's next seq
    assert await conn.fetchval("SELECT username FROM users WHERE id = $1", world.alice) == "alice2"


# -- item 8 of issue 11: rooms.last_seq and chatkeep_room_is_empty() ------------------------


async def test_the_app_cannot_move_a_rooms_counter_by_hand(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    # A member could set last_seq and leave gaps in seq; only a message insert moves it now.
    for sql in (
        "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1",
        "UPDATE rooms SET last_seq = 1000 WHERE id = $1",
    ):
        with pytest.raises(PermissionDenied):
            async with acting_as(app_conn, world.alice) as c:  # the room's owner
                await c.execute(sql, world.private)
    with pytest.raises(PermissionDenied):  # nor pick a message's seq (a gap, or a collision)
        async with acting_as(app_conn, world.alice) as c:
            await c.execute(
                "INSERT INTO messages (room_id, user_id, seq, content) VALUES ($1, $2, 9, 'x')",
                world.private,
                world.alice,
            )
    with pytest.raises(PermissionDenied):  # nor start a new room's counter ahead
        async with acting_as(app_conn, world.dave) as c:
            await c.execute(
                "INSERT INTO rooms (name, type, created_by, last_seq)"
                " VALUES ('mine', 'private', $1, 50)",
                world.dave,
            )
    assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", world.private) == 3
    # The send path still moves it, by one, with the message.
    async with acting_as(app_conn, world.carol) as c:
        seq = await c.fetchval(
            "INSERT INTO messages (room_id, user_id, content) VALUES ($1, $2, 'hi') RETURNING seq",
            world.private,
            world.carol,
        )
    assert seq == 4
    assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", world.private) == 4


async def test_room_is_empty_answers_only_the_rooms_creator(
    app_conn: asyncpg.Connection, world: World
) -> None:
    # It answered for any room id: whether a private room you cannot see has members.
    empty = uuid7()
    async with acting_as(app_conn, world.dave) as c:
        await c.execute(
            "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'new', 'private', $2)",
            empty,
            world.dave,
        )
        ask = "SELECT chatkeep_room_is_empty($1)"
        assert await c.fetchval(ask, empty) is True  # the creator, about their own room
        for room in (world.private, world.direct, world.public, uuid7()):
            assert await c.fetchval(ask, room) is None, room
    async with acting_as(app_conn, world.bob) as c:  # a member, but not the creator
        assert await c.fetchval(ask, world.private) is None
    assert await app_conn.fetchval(ask, world.private) is None  # nobody acting
    async with acting_as(app_conn, world.alice) as c:  # the creator of a room with members
        assert await c.fetchval(ask, world.private) is False


async def test_bulk_copy_under_row_security_is_refused_with_a_clear_error(
    app_conn: asyncpg.Connection, world: World
) -> None:
    # PostgreSQL refuses COPY FROM into tables under row security; the caller is told to
    # use a role that bypasses it, not handed a bare feature-not-supported code.
    with pytest.raises(PermissionDenied, match="BYPASSRLS") as caught:
        async with acting_as(app_conn, world.alice) as c:
            await c.copy_records_to_table(
                "messages",
                records=[(world.public, world.alice, "bulk")],
                columns=["room_id", "user_id", "content"],
            )
    assert isinstance(caught.value.__cause__, asyncpg.FeatureNotSupportedError)
