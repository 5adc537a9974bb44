"""The room change log as the database writes it (migration 012), as the system.

The facade's view (as chatapp_app, with events) is in tests/test_facade_changes.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import asyncpg
import pytest

from chatkeep.errors import PermissionDenied
from chatkeep.models import CreateMessageDto, UpdateRoomDto
from chatkeep.storage import Database, MessageRepository, RoomRepository
from chatkeep.storage.changes import ChangeRepository
from chatkeep.storage.errors import translate_error
from chatkeep.storage.reactions import ReactionRepository

from .conftest import MakeRoom, MakeUser


async def kinds(conn: asyncpg.Connection, room: uuid.UUID) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "SELECT position, kind FROM room_changes WHERE room_id = $1 ORDER BY position", room
    )
    return [(r["position"], r["kind"]) for r in rows]


async def test_room_updates_and_cascades_are_logged_or_not_as_designed(
    db: Database,
    conn: asyncpg.Connection,
    rooms: RoomRepository,
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
) -> None:
    owner, member = await make_user(), await make_user()
    room = await make_room(owner, member)
    await rooms.update(room.id, UpdateRoomDto(name="renamed"))
    await rooms.update(room.id, UpdateRoomDto(name="renamed"))  # no change: nothing logged
    sent = await messages.send(CreateMessageDto(room_id=room.id, user_id=member.id, content="x"))
    await ReactionRepository(db).react(sent.id, owner.id, "👍")
    # Deleting the member takes their membership and message with them (member.removed
    # and a tombstone, as the system did it); the message's reactions go unlogged.
    await conn.execute("DELETE FROM users WHERE id = $1", member.id)
    logged = [k for _, k in await kinds(conn, room.id)]
    assert logged[:5] == [
        "member.joined",  # the owner
        "member.joined",
        "room.updated",
        "message.created",
        "reaction.added",
    ]
    # The cascade's order between the two tables is PostgreSQL's.
    assert sorted(logged[5:]) == ["member.removed", "message.deleted"]
    updated = await conn.fetchval(
        "SELECT data::text FROM room_changes WHERE room_id = $1 AND kind = 'room.updated'",
        room.id,
    )
    assert json.loads(updated) == {
        "name": "renamed",
        "description": None,
        "type": "public",
        "is_active": True,
    }
    positions = [p for p, _ in await kinds(conn, room.id)]
    assert positions == list(range(1, 8))
    assert await ChangeRepository(db).position(room.id) == 7
    # Deleting the room takes its log with it, and logs nothing.
    await conn.execute("DELETE FROM rooms WHERE id = $1", room.id)
    assert await kinds(conn, room.id) == []


async def test_concurrent_writers_get_gapless_commit_ordered_positions(
    db: Database, messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    people = [await make_user() for _ in range(6)]
    room = await make_room(people[0], *people[1:])
    first = await messages.send(
        CreateMessageDto(room_id=room.id, user_id=people[0].id, content="react to me")
    )
    reactions = ReactionRepository(db)
    start = await ChangeRepository(db).position(room.id)

    async def writer(index: int) -> None:
        user = people[index].id
        for n in range(5):
            await messages.send(
                CreateMessageDto(room_id=room.id, user_id=user, content=f"{index}-{n}")
            )
            await reactions.react(first.id, user, "🎉" if n % 2 else "👍")

    await asyncio.gather(*(writer(i) for i in range(len(people))))
    page = await ChangeRepository(db).changes(room.id, after=start, limit=1000)
    assert [c.position for c in page.items] == list(range(start + 1, page.position + 1))
    assert len(page.items) == 6 * 5 + 6 * 2  # sends, and two emoji each: repeats change nothing
    # Each emoji's count went up by one at a time, in position order.
    for emoji in ("👍", "🎉"):
        counts = [c.data["count"] for c in page.items if c.data.get("emoji") == emoji]
        assert counts == list(range(1, len(counts) + 1))


async def test_last_position_belongs_to_the_transaction(
    db: Database, messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    user = await make_user()
    room = await make_room(user)
    log = ChangeRepository(db)
    async with db.transaction("test"):
        assert await log.last_position() is None
        await messages.send(CreateMessageDto(room_id=room.id, user_id=user.id, content="x"))
        assert await log.last_position() == await log.position(room.id)
        change = await log.last_change()
        assert change is not None
        assert (change.kind, change.room_id) == ("message.created", room.id)
    async with db.transaction("test"):
        assert await log.last_position() is None  # local to the transaction that set it


async def test_the_relay_reads_every_room_only_as_the_system(
    app_conn: asyncpg.Connection,
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
) -> None:
    user = await make_user()
    room = await make_room(user, type="private")
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    sent = await messages.send(CreateMessageDto(room_id=room.id, user_id=user.id, content="hi"))
    rows = await app_conn.fetch("SELECT * FROM chatkeep_relay_changes($1, 100)", since)
    created = [r for r in rows if r["kind"] == "message.created" and r["room_id"] == room.id]
    assert [(r["message_id"], r["m_content"]) for r in created] == [(sent.id, "hi")]
    async with app_conn.transaction():
        await app_conn.execute("SELECT set_config('app.user_id', $1, true)", str(user.id))
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await app_conn.fetch("SELECT * FROM chatkeep_relay_changes($1, 100)", since)
    assert isinstance(translate_error(caught.value, "relay"), PermissionDenied)


async def test_the_application_may_not_prune_or_move_positions(
    app_conn: asyncpg.Connection, make_user: MakeUser, make_room: MakeRoom
) -> None:
    user = await make_user()
    room = await make_room(user)
    for sql in (
        "DELETE FROM room_changes WHERE room_id = $1",
        "UPDATE rooms SET position = 0 WHERE id = $1",
        "SELECT chatkeep_log_change($1, 'room.updated', NULL, NULL, '{}')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app_conn.execute(sql, room.id)
