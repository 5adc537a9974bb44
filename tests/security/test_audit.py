"""The audit trail: a row per sensitive change with the right actor, and nothing else."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from chatkeep.cli import app
from chatkeep.errors import InvalidInput, PermissionDenied
from chatkeep.storage.audit import AuditEntry, tail
from tests.security.conftest import World, acting_as

Env = Callable[..., dict[str, str]]


async def act(app_conn: asyncpg.Connection, user: uuid.UUID, sql: str, *args: Any) -> None:
    async with acting_as(app_conn, user) as c:
        await c.execute(sql, *args)


async def entries(conn: asyncpg.Connection) -> list[AuditEntry]:
    return list(reversed(await tail(conn, limit=100)))


async def test_user_changes_are_audited_without_secrets(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    new_hash = "$2b$12$" + "b" * 53
    await act(
        app_conn,
        world.carol,
        "UPDATE users SET password_hash = $2, is_active = false WHERE id = $1",
        world.carol,
        new_hash,
    )
    await act(
        app_conn, world.carol, "UPDATE users SET username = 'carol2' WHERE id = $1", world.carol
    )
    # No flow changes an email (the app role may not, since 011): system work does.
    await conn.execute("UPDATE users SET email = 'c2@example.org' WHERE id = $1", world.carol)
    entry, by_system = await entries(conn)
    assert entry.action == by_system.action == "user.update"
    assert (entry.actor_id, entry.row_id, entry.table_name) == (world.carol, world.carol, "users")
    assert entry.changes == {"password": "changed", "is_active": {"old": True, "new": False}}
    assert (by_system.actor_id, by_system.row_id) == (None, world.carol)
    assert by_system.changes == {"email": {"old": "carol@example.org", "new": "c2@example.org"}}
    raw = await conn.fetchval("SELECT string_agg(changes::text, ' ') FROM audit_log")
    assert "$2b$" not in raw
    assert entry.db_role == "chatapp_app"
    occurred = await conn.fetchval("SELECT occurred_at FROM audit_log WHERE id = $1", entry.id)
    assert occurred == entry.occurred_at


async def test_a_user_delete_is_one_entry_not_one_per_cascaded_row(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    # Alice's rooms, memberships and messages all go with her.
    await act(app_conn, world.alice, "DELETE FROM users WHERE id = $1", world.alice)
    [entry] = await entries(conn)
    assert (entry.action, entry.actor_id, entry.row_id) == ("user.delete", world.alice, world.alice)
    assert entry.changes == {"email": "alice@example.org", "username": "alice"}
    assert await conn.fetchval("SELECT count(*) FROM rooms") == 0


async def test_membership_changes_are_audited(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    p = world.private
    await act(
        app_conn,
        world.alice,
        "UPDATE room_users SET role = 'admin' WHERE room_id = $1 AND user_id = $2",
        p,
        world.carol,
    )
    await act(
        app_conn,
        world.carol,
        "UPDATE room_users SET last_read_seq = 2, last_read_at = now()"
        " WHERE room_id = $1 AND user_id = $2",
        p,
        world.carol,
    )
    await act(
        app_conn,
        world.bob,
        "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2",
        p,
        world.carol,
    )
    await act(
        app_conn,
        world.bob,
        "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2",
        p,
        world.bob,
    )
    got = [(e.action, e.actor_id, e.row_id, e.room_id, e.changes) for e in await entries(conn)]
    assert got == [
        (
            "member.role_change",
            world.alice,
            world.carol,
            p,
            {"role": {"old": "member", "new": "admin"}},
        ),
        ("member.remove", world.bob, world.carol, p, {"role": "admin"}),
        ("member.remove", world.bob, world.bob, p, {"role": "admin"}),
    ]


async def test_room_type_changes_and_deletes_are_audited(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await act(app_conn, world.bob, "UPDATE rooms SET name = 'renamed' WHERE id = $1", world.private)
    # No flow changes a room's type (the app role may not): system work does.
    await conn.execute("UPDATE rooms SET type = 'public' WHERE id = $1", world.private)
    await act(app_conn, world.alice, "DELETE FROM rooms WHERE id = $1", world.private)
    got = [(e.action, e.actor_id, e.row_id, e.changes) for e in await entries(conn)]
    assert got == [
        (
            "room.type_change",
            None,
            world.private,
            {"type": {"old": "private", "new": "public"}},
        ),
        (
            "room.delete",
            world.alice,
            world.private,
            {"name": "renamed", "type": "public", "created_by": str(world.alice)},
        ),
    ]


async def test_message_deletes_by_others_are_audited_own_are_not(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "DELETE FROM messages WHERE id = $1"
    await act(app_conn, world.carol, sql, world.msg[("private", "carol")])
    alices = world.msg[("private", "alice")]
    await act(app_conn, world.bob, sql, alices)
    [entry] = await entries(conn)
    assert (entry.action, entry.actor_id, entry.row_id, entry.room_id) == (
        "message.delete",
        world.bob,
        alices,
        world.private,
    )
    assert entry.changes == {"author_id": str(world.alice), "seq": 1}
    assert "alice in private" not in json.dumps(entry.as_json())


async def test_system_work_is_audited_with_no_actor(conn: asyncpg.Connection, world: World) -> None:
    await conn.execute("DELETE FROM messages WHERE id = $1", world.msg[("public", "bob")])
    [entry] = await entries(conn)
    assert (entry.action, entry.actor_id) == ("message.delete", None)
    assert entry.as_json()["actor_id"] is None


async def test_the_trail_is_append_only_for_everyone(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await act(
        app_conn, world.bob, "DELETE FROM messages WHERE id = $1", world.msg[("private", "carol")]
    )
    for sql in (
        "UPDATE audit_log SET actor_id = NULL",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(sql)  # even the superuser, through the trigger
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app_conn.execute(sql)  # the app has no privilege at all
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1


async def test_tail_filters_and_validates(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "DELETE FROM messages WHERE id = $1"
    await act(app_conn, world.bob, sql, world.msg[("private", "alice")])
    await act(app_conn, world.bob, sql, world.msg[("private", "carol")])
    await act(app_conn, world.alice, "DELETE FROM rooms WHERE id = $1", world.public)
    newest = await tail(conn, limit=2)
    assert [e.action for e in newest] == ["room.delete", "message.delete"]
    assert [e.row_id for e in await tail(conn, action="room.delete")] == [world.public]
    assert len(await tail(conn, actor_id=world.bob)) == 2
    assert len(await tail(conn, room_id=world.private)) == 2
    for bad in (0, 1001, True):
        with pytest.raises(InvalidInput) as caught:
            await tail(conn, limit=bad)
        assert caught.value.field == "limit"
    with pytest.raises(InvalidInput):
        await tail(conn, action="message.edit")
    with pytest.raises(PermissionDenied):
        await tail(app_conn)


@pytest_asyncio.fixture(loop_scope="session")
async def deleted_by_bob(app_conn: asyncpg.Connection, world: World) -> World:
    sql = "DELETE FROM messages WHERE id = $1"
    await act(app_conn, world.bob, sql, world.msg[("private", "alice")])
    return world


def test_cli_audit_tail(database_url: str, deleted_by_bob: World, cli_env: Env) -> None:
    bob = str(deleted_by_bob.bob)
    env = cli_env(COLUMNS="250")
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["audit", "tail", *args, "--database-url", database_url], env=env)

    result = invoke("--json")
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert json.loads(line)["actor_id"] == bob
    table = invoke()
    assert table.exit_code == 0
    assert "message.delete" in table.stdout
    assert bob in table.stdout
    assert "no audit entries" in invoke("--action", "user.delete").stdout
    assert invoke("--actor", "nope").exit_code == 2
    assert invoke("--room", "x").exit_code == 2
    bad_action = invoke("--action", "x")
    assert bad_action.exit_code == 2  # a usage error, refused before connecting (issue 16)
    assert "'x' is not one of member.remove" in bad_action.output
