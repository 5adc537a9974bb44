"""Every row-security policy, both ways, as the real application role (chatapp_app).

A denied write raises PermissionDenied (from a policy's WITH CHECK or a guard trigger) and
leaves nothing behind; a denied read returns nothing. The superuser connection ``conn``
only checks what really happened.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from chatkeep.config import Settings
from chatkeep.errors import NotFound, PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.storage import Database
from tests.security.conftest import HASH, World, acting_as


async def as_user(app: asyncpg.Connection, user: uuid.UUID, sql: str, *args: Any) -> str:
    """Run one statement as ``user``; returns its status (``UPDATE 1``...)."""
    async with acting_as(app, user) as c:
        status: str = await c.execute(sql, *args)
        return status


async def rows_as(
    app: asyncpg.Connection, user: uuid.UUID | None, sql: str, *args: Any
) -> list[Any]:
    if user is None:
        return [tuple(r.values()) for r in await app.fetch(sql, *args)]
    async with acting_as(app, user) as c:
        return [tuple(r.values()) for r in await c.fetch(sql, *args)]


async def denied(app: asyncpg.Connection, user: uuid.UUID, sql: str, *args: Any) -> None:
    with pytest.raises(PermissionDenied):
        await as_user(app, user, sql, *args)


# -- users ---------------------------------------------------------------------------------


async def test_users_are_visible_to_everyone(app_conn: asyncpg.Connection, world: World) -> None:
    everyone = {world.alice, world.bob, world.carol, world.dave}
    assert {r[0] for r in await rows_as(app_conn, world.dave, "SELECT id FROM users")} == everyone
    # Sign-in looks a user up before anyone is acting.
    assert {r[0] for r in await rows_as(app_conn, None, "SELECT id FROM users")} == everyone


async def test_anyone_may_sign_up(app_conn: asyncpg.Connection, conn: asyncpg.Connection) -> None:
    new = uuid7()
    await app_conn.execute(
        "INSERT INTO users (id, email, username, password_hash) VALUES ($1, 'e@x.org', 'eve', $2)",
        new,
        HASH,
    )
    assert await conn.fetchval("SELECT username FROM users WHERE id = $1", new) == "eve"


async def test_a_user_updates_only_themself(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "UPDATE users SET username = $2 WHERE id = $1"
    assert await as_user(app_conn, world.carol, sql, world.carol, "carol2") == "UPDATE 1"
    await denied(app_conn, world.carol, sql, world.bob, "bobbed")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # nobody acting: nobody to be
        await app_conn.execute(sql, world.bob, "bobbed")
    assert await conn.fetchval("SELECT username FROM users WHERE id = $1", world.bob) == "bob"


async def test_a_user_deletes_only_themself(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await denied(app_conn, world.carol, "DELETE FROM users WHERE id = $1", world.dave)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_conn.execute("DELETE FROM users WHERE id = $1", world.dave)
    assert await conn.fetchval("SELECT count(*) FROM users WHERE id = $1", world.dave) == 1
    status = await as_user(app_conn, world.dave, "DELETE FROM users WHERE id = $1", world.dave)
    assert status == "DELETE 1"


# -- rooms ---------------------------------------------------------------------------------


async def test_rooms_visible_by_type_and_membership(
    app_conn: asyncpg.Connection, world: World
) -> None:
    def ids(rows: list[Any]) -> set[uuid.UUID]:
        return {r[0] for r in rows}

    sql = "SELECT id FROM rooms"
    assert ids(await rows_as(app_conn, world.dave, sql)) == {world.public}
    assert ids(await rows_as(app_conn, None, sql)) == {world.public}
    assert ids(await rows_as(app_conn, world.carol, sql)) == {world.public, world.private}
    assert ids(await rows_as(app_conn, world.bob, sql)) == {
        world.public,
        world.private,
        world.direct,
    }
    # Asking by id does not help.
    byid = "SELECT id FROM rooms WHERE id = $1"
    assert await rows_as(app_conn, world.dave, byid, world.private) == []
    assert await rows_as(app_conn, world.carol, byid, world.direct) == []


async def test_room_creation_as_yourself_only(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'mine', 'private', $2)"
    mine = uuid7()
    await as_user(app_conn, world.dave, sql, mine, world.dave)
    # The creator sees a private room before being its member (INSERT ... RETURNING works).
    assert await rows_as(app_conn, world.dave, "SELECT id FROM rooms WHERE id = $1", mine) == [
        (mine,)
    ]
    await denied(app_conn, world.dave, sql, uuid7(), world.alice)
    low, high = sorted((world.alice, world.bob))
    await denied(  # a direct room between two other people
        app_conn,
        world.dave,
        "INSERT INTO rooms (id, name, type, created_by, direct_user_low, direct_user_high)"
        " VALUES ($1, 'dm', 'direct', $2, $3, $4)",
        uuid7(),
        world.dave,
        low,
        high,
    )
    assert await conn.fetchval("SELECT count(*) FROM rooms") == 4


async def test_room_updates(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    # Nobody moves the counter by hand (only a message insert does, test_privileges.py).
    bump = "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1"
    await denied(app_conn, world.carol, bump, world.private)
    # Admins and owners rename the room; members do not.
    rename = "UPDATE rooms SET name = $2 WHERE id = $1"
    assert await as_user(app_conn, world.bob, rename, world.private, "renamed") == "UPDATE 1"
    await denied(app_conn, world.carol, rename, world.private, "mine now")
    # No flow changes a room's type: not even its admins may (system work does).
    retype = "UPDATE rooms SET type = 'public' WHERE id = $1"
    await denied(app_conn, world.carol, retype, world.private)
    await denied(app_conn, world.bob, retype, world.private)
    # A public room is visible to outsiders, but not theirs to change.
    await denied(app_conn, world.dave, bump, world.public)
    await denied(app_conn, world.dave, rename, world.public, "graffiti")
    # A private room is invisible to outsiders: nothing to update.
    assert await as_user(app_conn, world.dave, rename, world.private, "x") == "UPDATE 0"
    row = await conn.fetchrow("SELECT name, type, last_seq FROM rooms WHERE id = $1", world.private)
    assert row is not None
    assert tuple(row.values()) == ("renamed", "private", 3)


async def test_only_owners_delete_rooms(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "DELETE FROM rooms WHERE id = $1"
    await denied(app_conn, world.bob, sql, world.private)  # an admin
    await denied(app_conn, world.dave, sql, world.public)  # an outsider, room visible
    assert await as_user(app_conn, world.dave, sql, world.private) == "DELETE 0"  # invisible
    assert await conn.fetchval("SELECT count(*) FROM rooms WHERE id = $1", world.private) == 1
    assert await as_user(app_conn, world.alice, sql, world.private) == "DELETE 1"
    assert (
        await conn.fetchval("SELECT count(*) FROM messages WHERE room_id = $1", world.private) == 0
    )


# -- room_users ----------------------------------------------------------------------------


async def test_members_see_their_rooms_members(app_conn: asyncpg.Connection, world: World) -> None:
    sql = "SELECT user_id FROM room_users WHERE room_id = $1"
    members = {world.alice, world.bob, world.carol}
    assert {r[0] for r in await rows_as(app_conn, world.carol, sql, world.private)} == members
    assert await rows_as(app_conn, world.dave, sql, world.private) == []
    assert await rows_as(app_conn, world.carol, sql, world.direct) == []
    mine = "SELECT room_id FROM room_users WHERE user_id = $1"
    assert {r[0] for r in await rows_as(app_conn, world.carol, mine, world.carol)} == {
        world.private
    }


JOIN = "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, $3)"


async def test_joining_a_public_room(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await denied(app_conn, world.dave, JOIN, world.public, world.dave, "admin")
    await denied(app_conn, world.dave, JOIN, world.public, world.carol, "member")
    await denied(app_conn, world.dave, JOIN, world.private, world.dave, "member")
    assert await as_user(app_conn, world.dave, JOIN, world.public, world.dave, "member") == (
        "INSERT 0 1"
    )
    roles = await conn.fetch(
        "SELECT user_id, role FROM room_users WHERE room_id = $1", world.public
    )
    assert {(r["user_id"], r["role"]) for r in roles} == {
        (world.alice, "owner"),
        (world.bob, "member"),
        (world.dave, "member"),
    }


async def test_a_creator_owns_their_new_room_once(
    app_conn: asyncpg.Connection, world: World
) -> None:
    room = uuid7()
    async with acting_as(app_conn, world.dave) as c:
        await c.execute(
            "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'd', 'private', $2)",
            room,
            world.dave,
        )
        await c.execute(JOIN, room, world.dave, "owner")
        await c.execute(JOIN, room, world.carol, "member")  # now an owner, dave invites
    # Leaving and coming back as owner is not possible: the room is not empty.
    await as_user(
        app_conn,
        world.dave,
        "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2",
        room,
        world.dave,
    )
    await denied(app_conn, world.dave, JOIN, room, world.dave, "owner")
    # Nobody makes themself owner of someone else's room.
    await denied(app_conn, world.carol, JOIN, world.private, world.carol, "owner")


async def test_invitations_by_rank(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await denied(app_conn, world.carol, JOIN, world.private, world.dave, "member")  # member
    await denied(app_conn, world.bob, JOIN, world.private, world.dave, "owner")  # admin
    assert await as_user(app_conn, world.bob, JOIN, world.private, world.dave, "admin") == (
        "INSERT 0 1"
    )
    await conn.execute(
        "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2", world.private, world.dave
    )
    assert await as_user(app_conn, world.alice, JOIN, world.private, world.dave, "owner") == (
        "INSERT 0 1"
    )


async def test_direct_rooms_hold_their_pair_only(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await denied(app_conn, world.alice, JOIN, world.direct, world.carol, "member")
    low, high = sorted((world.carol, world.dave))
    dm = uuid7()
    async with acting_as(app_conn, world.carol) as c:
        await c.execute(
            "INSERT INTO rooms (id, name, type, created_by, direct_user_low, direct_user_high)"
            " VALUES ($1, 'dm', 'direct', $2, $3, $4)",
            dm,
            world.carol,
            low,
            high,
        )
        await c.execute(JOIN, dm, world.carol, "member")
        await c.execute(JOIN, dm, world.dave, "member")
    assert await conn.fetchval("SELECT count(*) FROM room_users WHERE room_id = $1", dm) == 2


ROLE = "UPDATE room_users SET role = $3 WHERE room_id = $1 AND user_id = $2"


async def test_role_changes_only_downwards_from_your_own_rank(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    p = world.private
    await denied(app_conn, world.carol, ROLE, p, world.carol, "admin")  # self-promotion
    await denied(app_conn, world.carol, ROLE, p, world.bob, "member")  # a member demoting
    await denied(app_conn, world.bob, ROLE, p, world.alice, "member")  # admin vs owner
    await denied(app_conn, world.bob, ROLE, p, world.carol, "owner")  # above your rank
    assert await as_user(app_conn, world.bob, ROLE, p, world.carol, "admin") == "UPDATE 1"
    assert await as_user(app_conn, world.alice, ROLE, p, world.bob, "owner") == "UPDATE 1"
    rows = await conn.fetch("SELECT user_id, role FROM room_users WHERE room_id = $1", p)
    roles = {r["user_id"]: r["role"] for r in rows}
    assert roles == {world.alice: "owner", world.bob: "owner", world.carol: "admin"}


async def test_read_state_is_your_own(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    mark = (
        "UPDATE room_users SET last_read_seq = 3, last_read_at = now()"
        " WHERE room_id = $1 AND user_id = $2"
    )
    assert await as_user(app_conn, world.carol, mark, world.private, world.carol) == "UPDATE 1"
    await denied(app_conn, world.bob, mark, world.private, world.carol)  # even an admin
    assert await as_user(app_conn, world.dave, mark, world.private, world.carol) == "UPDATE 0"
    seqs = await conn.fetch(
        "SELECT user_id, last_read_seq FROM room_users WHERE room_id = $1", world.private
    )
    assert {(r[0], r[1]) for r in seqs} == {(world.alice, 0), (world.bob, 0), (world.carol, 3)}


async def test_leaving_and_removing_members(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2"
    p = world.private
    await denied(app_conn, world.carol, sql, p, world.bob)  # a member removing an admin
    await denied(app_conn, world.bob, sql, p, world.alice)  # an admin removing the owner
    assert await as_user(app_conn, world.dave, sql, p, world.carol) == "DELETE 0"  # invisible
    assert await as_user(app_conn, world.bob, sql, p, world.carol) == "DELETE 1"
    assert await as_user(app_conn, world.alice, sql, p, world.bob) == "DELETE 1"
    assert await as_user(app_conn, world.alice, sql, p, world.alice) == "DELETE 1"  # leaving
    assert await conn.fetchval("SELECT count(*) FROM room_users WHERE room_id = $1", p) == 0


# -- messages ------------------------------------------------------------------------------


async def test_messages_are_read_by_members_only(
    app_conn: asyncpg.Connection, world: World
) -> None:
    sql = "SELECT count(*) FROM messages WHERE room_id = $1"
    assert await rows_as(app_conn, world.carol, sql, world.private) == [(3,)]
    assert await rows_as(app_conn, world.dave, sql, world.private) == [(0,)]
    assert await rows_as(app_conn, world.dave, sql, world.public) == [(0,)]  # not a member
    assert await rows_as(app_conn, None, "SELECT count(*) FROM messages") == [(0,)]
    by_id = "SELECT content FROM messages WHERE id = $1"
    assert await rows_as(app_conn, world.carol, by_id, world.msg[("direct", "alice")]) == []


SEND = "INSERT INTO messages (id, room_id, user_id, content) VALUES ($1, $2, $3, 'hi')"


async def test_members_write_as_themselves(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    assert await as_user(app_conn, world.carol, SEND, uuid7(), world.private, world.carol) == (
        "INSERT 0 1"
    )
    await denied(app_conn, world.dave, SEND, uuid7(), world.public, world.dave)
    await denied(app_conn, world.carol, SEND, uuid7(), world.private, world.bob)
    # A room you cannot see is, to you, a room that does not exist.
    with pytest.raises(NotFound):
        await as_user(app_conn, world.dave, SEND, uuid7(), world.private, world.dave)
    counts = await conn.fetchval("SELECT count(*) FROM messages WHERE room_id = $1", world.private)
    assert counts == 4
    # The seq trigger moved the room's counter, for the member's message only.
    assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", world.private) == 4


async def test_only_the_author_edits(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "UPDATE messages SET content = $2, is_edited = true, edited_at = now() WHERE id = $1"
    carols = world.msg[("private", "carol")]
    assert await as_user(app_conn, world.carol, sql, carols, "edited") == "UPDATE 1"
    await denied(app_conn, world.alice, sql, carols, "owner's words")  # even the owner
    assert await as_user(app_conn, world.dave, sql, carols, "x") == "UPDATE 0"
    assert await conn.fetchval("SELECT content FROM messages WHERE id = $1", carols) == "edited"


async def test_message_deletes_by_author_or_room_managers(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    sql = "DELETE FROM messages WHERE id = $1"
    await denied(app_conn, world.carol, sql, world.msg[("private", "alice")])
    assert await as_user(app_conn, world.dave, sql, world.msg[("private", "alice")]) == "DELETE 0"
    assert await as_user(app_conn, world.carol, sql, world.msg[("private", "carol")]) == "DELETE 1"
    assert await as_user(app_conn, world.bob, sql, world.msg[("private", "alice")]) == "DELETE 1"
    left = await conn.fetch("SELECT user_id FROM messages WHERE room_id = $1", world.private)
    assert [r[0] for r in left] == [world.bob]


# -- message_read_status -------------------------------------------------------------------


RECEIPT = "INSERT INTO message_read_status (message_id, user_id) VALUES ($1, $2)"


async def test_receipts(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    alices = world.msg[("private", "alice")]
    assert await as_user(app_conn, world.carol, RECEIPT, alices, world.carol) == "INSERT 0 1"
    assert await as_user(app_conn, world.bob, RECEIPT, alices, world.bob) == "INSERT 0 1"
    await denied(app_conn, world.dave, RECEIPT, alices, world.dave)  # cannot see it
    await denied(app_conn, world.carol, RECEIPT, world.msg[("private", "bob")], world.bob)
    # Members see the room's receipts; outsiders none.
    seen = "SELECT user_id FROM message_read_status WHERE message_id = $1"
    assert {r[0] for r in await rows_as(app_conn, world.alice, seen, alices)} == {
        world.bob,
        world.carol,
    }
    assert await rows_as(app_conn, world.dave, seen, alices) == []
    # A receipt is written once and stays (no flow changes or removes one; cascades do).
    touch = "UPDATE message_read_status SET read_at = now() WHERE message_id = $1 AND user_id = $2"
    await denied(app_conn, world.carol, touch, alices, world.carol)
    drop = "DELETE FROM message_read_status WHERE message_id = $1 AND user_id = $2"
    await denied(app_conn, world.carol, drop, alices, world.carol)
    left = await conn.fetch("SELECT user_id FROM message_read_status")
    assert {r[0] for r in left} == {world.bob, world.carol}


# -- the acting user -----------------------------------------------------------------------


async def test_a_denied_write_leaves_nothing_of_the_block(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    async def two_sends() -> None:
        async with acting_as(app_conn, world.carol) as c:
            await c.execute(SEND, uuid7(), world.private, world.carol)
            await c.execute(SEND, uuid7(), world.public, world.carol)

    with pytest.raises(PermissionDenied):
        await two_sends()
    assert await conn.fetchval("SELECT count(*) FROM messages") == 7
    assert not app_conn.is_in_transaction()


async def test_the_acting_user_ends_with_its_transaction(
    app_conn: asyncpg.Connection, world: World
) -> None:
    async with app_conn.transaction():
        await app_conn.execute(
            "SELECT set_config('app.user_id', $1, true)", str(world.carol)
        )  # the text form, as the library sends it
        assert await app_conn.fetchval("SELECT chatkeep_acting_user_id()") == world.carol
        assert await app_conn.fetchval("SELECT count(*) FROM messages") == 3
    assert await app_conn.fetchval("SELECT chatkeep_acting_user_id()") is None
    assert await app_conn.fetchval("SELECT count(*) FROM messages") == 0


async def test_the_acting_user_never_leaks_to_the_next_borrower(app_url: str, world: World) -> None:
    pool = await asyncpg.create_pool(app_url, min_size=1, max_size=1)
    try:
        async with acting_as(pool, world.alice) as c:
            assert await c.fetchval("SELECT count(*) FROM messages") == 7
        async with pool.acquire() as c:  # the same, only connection
            assert await c.fetchval("SELECT chatkeep_acting_user_id()") is None
            assert await c.fetchval("SELECT count(*) FROM messages") == 0
        with pytest.raises(PermissionDenied):
            async with acting_as(pool, world.carol) as c:
                await c.execute(SEND, uuid7(), world.public, world.carol)
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT chatkeep_acting_user_id()") is None
        # Even a buggy session-level setting does not survive the pool's reset.
        async with pool.acquire() as c:
            await c.execute("SELECT set_config('app.user_id', $1, false)", str(world.alice))
        async with pool.acquire() as c:
            assert await c.fetchval("SELECT chatkeep_acting_user_id()") is None
            assert await c.fetchval("SELECT count(*) FROM messages") == 0
    finally:
        await pool.close()


# -- session-level leftovers through chatkeep's Database -------------------------------------

LEAK = "SELECT set_config('app.user_id', $1, false)"
PRIVATE_COUNT = "SELECT count(*) FROM messages WHERE room_id = $1"


@pytest_asyncio.fixture(loop_scope="session")
async def one_app(app_url: str) -> AsyncIterator[Database]:
    """chatkeep's pool as chatapp_app with one connection: every borrower gets the same."""
    async with Database(Settings(database_url=app_url), min_size=1, max_size=1) as db:
        yield db


async def private_messages_seen_by_no_one(db: Database, world: World) -> list[int]:
    """What a borrower acting as no one counts in the private room, through each helper."""
    row = await db.fetchrow("t.row", PRIVATE_COUNT, world.private)
    assert row is not None
    return [
        await db.fetchval("t.val", PRIVATE_COUNT, world.private),
        (await db.fetch("t.all", PRIVATE_COUNT, world.private))[0][0],
        row[0],
        await db.fetchval(
            "t.who", "SELECT count(*) FROM messages WHERE chatkeep_acting_user_id() IS NOT NULL"
        ),
    ]


@pytest.mark.parametrize("how", ["execute", "set-command", "fetch", "fetchrow", "executemany"])
async def test_a_session_level_user_set_through_the_helpers_never_reaches_the_next_borrower(
    one_app: Database, world: World, how: str
) -> None:
    alice = str(world.alice)
    if how == "execute":
        await one_app.execute("t.leak", LEAK, alice)
    elif how == "set-command":
        await one_app.execute("t.leak", f"SET app.user_id = '{alice}'")
    elif how == "fetch":
        await one_app.fetch("t.leak", LEAK, alice)
    elif how == "fetchrow":
        await one_app.fetchrow("t.leak", LEAK, alice)
    else:
        await one_app.executemany("t.leak", LEAK, [(alice,)])
    assert await private_messages_seen_by_no_one(one_app, world) == [0, 0, 0, 0]


async def test_a_session_level_user_does_not_come_back_after_an_acting_as_block(
    one_app: Database, world: World
) -> None:
    await one_app.execute("t.leak", LEAK, str(world.alice))
    async with one_app.acting_as(world.dave):
        # The block acts as dave alone: the leftover is not underneath it either...
        assert await one_app.fetchval("t.dave", PRIVATE_COUNT, world.private) == 0
    # ...and does not come back when its local setting ends.
    assert await private_messages_seen_by_no_one(one_app, world) == [0, 0, 0, 0]
    async with one_app.transaction():  # nor after a transaction acting as no one
        assert await one_app.fetchval("t.none", PRIVATE_COUNT, world.private) == 0
    assert await private_messages_seen_by_no_one(one_app, world) == [0, 0, 0, 0]


@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_a_session_level_user_set_inside_acting_as_ends_with_the_block(
    one_app: Database, world: World, ending: str
) -> None:
    async def block() -> None:
        async with one_app.acting_as(world.carol):
            await one_app.execute("t.leak", LEAK, str(world.alice))
            if ending == "rollback":
                raise NotFound("roll it back")

    if ending == "rollback":
        with pytest.raises(NotFound):
            await block()
    else:
        await block()
    assert await private_messages_seen_by_no_one(one_app, world) == [0, 0, 0, 0]


async def test_a_bulk_write_never_runs_as_a_user_a_previous_borrower_left_in_the_session(
    one_app: Database, world: World, conn: asyncpg.Connection
) -> None:
    # executemany used to borrow like db.acquire(), which does not reset a session that a
    # single statement left dirty: the write ran as alice, whom no one named for it.
    # (copy_records takes the same path; COPY FROM refuses row-secured tables outright.)
    before = await conn.fetchval("SELECT count(*) FROM messages")
    await one_app.execute("t.leak", LEAK, str(world.alice))
    # As no one, the private room is not there to write to (its seq trigger says so).
    with pytest.raises(NotFound):
        await one_app.executemany(
            "t.bulk",
            "INSERT INTO messages (room_id, user_id, content) VALUES ($1, $2, $3)",
            [(world.private, world.alice, "as alice?")],
        )
    assert await conn.fetchval("SELECT count(*) FROM messages") == before
    assert await private_messages_seen_by_no_one(one_app, world) == [0, 0, 0, 0]


async def test_sql_of_your_own_never_runs_as_a_user_a_previous_borrower_left(
    one_app: Database, world: World
) -> None:
    # db.acquire() handed over the connection as it was; the caller's SQL ran as alice.
    await one_app.execute("t.leak", LEAK, str(world.alice))
    async with one_app.acquire() as c:
        assert await c.fetchval("SELECT chatkeep_acting_user_id()") is None
        assert await c.fetchval(PRIVATE_COUNT, world.private) == 0


async def test_other_session_state_is_reset_for_the_next_borrower(
    one_app: Database, world: World
) -> None:
    await one_app.execute("t.path", "SET search_path TO pg_catalog")
    assert await one_app.fetchval("t.path", "SHOW search_path") == '"$user", public'
    # A temp table would shadow the real one for every later borrower of the session.
    await one_app.execute(
        "t.shadow",
        "CREATE TEMP TABLE messages AS SELECT 1 AS id, $1::uuid AS room_id",
        world.private,
    )
    assert await one_app.fetchval("t.real", PRIVATE_COUNT, world.private) == 0
    async with one_app.transaction():
        await one_app.execute("t.path", "SET search_path TO pg_catalog")
    assert await one_app.fetchval("t.path", "SHOW search_path") == '"$user", public'
    # The pool's own server settings are the session's defaults: they survive the reset.
    assert await one_app.fetchval("t.timeout", "SHOW statement_timeout") == "30s"


async def test_no_function_or_view_of_the_schema_changes_session_state(
    conn: asyncpg.Connection,
) -> None:
    """Database skips the session reset after a plain single statement (one that names no
    SET, set_config or temp object); that holds only while no function, trigger or view a
    statement may reach sets session state itself. A later migration must not add one."""
    setters = await conn.fetch(
        r"""
        SELECT p.oid::regprocedure::text AS what
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public'
           AND p.prosrc ~* '(set_config|(^|;|\mBEGIN|\mTHEN|\mELSE|\mLOOP)\s*(SET|RESET|DISCARD)\s)'
        UNION ALL
        SELECT viewname::text FROM pg_views
         WHERE schemaname = 'public' AND definition ~* 'set_config'
        """
    )
    # The change log's functions leave the room and position a change took in settings
    # local to the transaction (set_config(..., true)): gone when it ends, so nothing
    # reaches the next borrower. Any other setter, or a session-wide one, fails here.
    # The send function sets each row's sender as the acting user the same way, and
    # restores the caller's value before it returns.
    # chatkeep_act_as() (013) names the acting user of the one-round-trip flows' own
    # statement the same way, local to its implicit transaction; chatkeep_unread() (020)
    # does what it does, inline.
    local_only = {
        "chatkeep_act_as(uuid)",
        "chatkeep_assign_message_seq()",
        "chatkeep_log_change(uuid,text,uuid,bigint,jsonb)",
        "chatkeep_send_messages(uuid[],uuid[],uuid[],text[],text[],message_type[],uuid[])",
        "chatkeep_unread(uuid)",
    }
    assert sorted(r["what"] for r in setters) == sorted(local_only)
    sources = await conn.fetch(
        "SELECT prosrc FROM pg_proc WHERE oid::regprocedure::text = ANY ($1::text[])",
        list(local_only),
    )
    for row in sources:
        calls = re.findall(r"set_config\(([^;]*?)\)(?:,|;)", row["prosrc"])
        assert calls, row["prosrc"]
        assert all(call.replace(" ", "").endswith(",true") for call in calls), calls
    # The check itself finds one.
    await conn.execute(
        "CREATE FUNCTION sneaky() RETURNS void LANGUAGE plpgsql AS"
        " $$BEGIN PERFORM set_config('app.user_id', 'x', false); END$$"
    )
    assert (
        len(
            await conn.fetch(
                r"SELECT 1 FROM pg_proc WHERE proname = 'sneaky' AND prosrc ~* 'set_config'"
            )
        )
        == 1
    )


# -- cost ----------------------------------------------------------------------------------


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found.extend(plan_nodes(child))
    return found


async def test_policies_cost_one_lookup_per_statement(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    await conn.execute(
        "INSERT INTO messages (room_id, user_id, content)"
        " SELECT $1, $2, 'm' || g FROM generate_series(1, 300) g",
        world.private,
        world.carol,
    )
    await conn.execute("ANALYZE messages")
    history = (
        "SELECT m.id, m.seq, m.content FROM messages m"
        " WHERE m.room_id = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT 50"
    )
    async with acting_as(app_conn, world.carol) as c:
        raw = await c.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {history}", world.private, 250)
    plan = json.loads(raw)[0]["Plan"]
    nodes = plan_nodes(plan)
    # The membership function runs in an InitPlan: once for the statement...
    init_plans = [n for n in nodes if n.get("Parent Relationship") == "InitPlan"]
    assert init_plans
    assert all(n["Actual Loops"] == 1 for n in init_plans)
    # ...while the history page is still one backward range scan of (room_id, seq).
    scans = [n for n in nodes if n.get("Relation Name") == "messages"]
    assert [s["Index Name"] for s in scans] == ["messages_room_seq_key"]
    assert scans[0]["Actual Rows"] == 50


async def test_membership_is_probed_per_row_and_never_scans_rooms(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, world: World
) -> None:
    """Migration 013's plan shape, for a user in 1,000 private rooms among 20,000.

    History is filtered by one probe of the user's membership per row (a SubPlan over
    room_users' index, not a hash of all 1,000 rooms), and the statements over all of the
    user's rooms start from their memberships: no sequential scan of rooms (the hashed
    form tried before 013 seq-scanned rooms at 200,000 rooms; docs/performance.md).
    """
    await conn.execute(
        "INSERT INTO messages (room_id, user_id, content)"
        " SELECT $1, $2, 'm' || g FROM generate_series(1, 300) g",
        world.private,
        world.carol,
    )
    await conn.execute("SET session_replication_role = replica")  # no log/audit triggers
    await conn.execute(
        "INSERT INTO rooms (id, name, type, created_by)"
        " SELECT gen_random_uuid(), 'bulk ' || g, 'private', $1"
        "   FROM generate_series(1, 20000) g",
        world.alice,
    )
    await conn.execute(
        "INSERT INTO room_users (room_id, user_id)"
        " SELECT id, $1 FROM rooms WHERE name LIKE 'bulk %' ORDER BY id LIMIT 1000",
        world.dave,
    )
    await conn.execute(
        "INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)", world.private, world.dave
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute("ANALYZE rooms, room_users, messages")

    async def plan(sql: str, *args: object) -> list[dict[str, Any]]:
        async with acting_as(app_conn, world.dave) as c:
            raw = await c.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        return plan_nodes(json.loads(raw)[0]["Plan"])

    history = await plan(
        "SELECT m.id FROM messages m WHERE m.room_id = $1 AND m.seq < $2"
        " ORDER BY m.seq DESC LIMIT 50",
        world.private,
        250,
    )
    scan = next(n for n in history if n.get("Relation Name") == "messages")
    assert scan["Node Type"] == "Index Scan"
    assert scan["Actual Rows"] == 50
    assert "SubPlan" in scan["Filter"]
    assert "hashed" not in scan["Filter"]
    probes = [n for n in history if n.get("Relation Name") == "room_users"]
    assert probes
    assert all(n["Node Type"] == "Index Only Scan" for n in probes)
    assert all(n["Actual Loops"] == 50 for n in probes)  # one per row of the page

    unread = await plan(
        "SELECT ru.room_id FROM room_users ru JOIN rooms r ON r.id = ru.room_id"
        " WHERE ru.user_id = $1",
        world.dave,
    )
    assert sum(n.get("Actual Rows", 0) for n in unread[:1]) == 1001
    seq_scanned = {n.get("Relation Name") for n in unread if n["Node Type"] == "Seq Scan"}
    # (room_users here is almost all dave's rows: scanning it whole is fair.)
    assert "rooms" not in seq_scanned
