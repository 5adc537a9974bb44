"""chatkeep on Citus: the schema distributed by room, per-room statements on one shard,
and the facade's basic flows with row security, on a real coordinator and two workers.

Run: ``CI=true pytest tests/citus`` (the cluster is started by tests/citus/conftest.py).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    CreateUserDto,
    NotFound,
    PermissionDenied,
    Settings,
)
from chatkeep.ids import uuid7
from chatkeep.storage.changes import CHANGES_CITUS
from chatkeep.storage.messages import (
    FIND_BY_CLIENT_ID,
    HISTORY_AFTER,
    HISTORY_BEFORE,
    MARK_READ_CITUS,
    READ_WATERMARK,
    ROOM_POSITION,
    SEND_INSERT_CITUS,
    SEND_SEEN_CITUS,
    WHY_NOT_SENT,
)
from chatkeep.storage.rooms import direct_room_id
from chatkeep.testing import url_as

pytestmark = pytest.mark.asyncio(loop_scope="session")

PER_ROOM = (
    "rooms",
    "room_users",
    "messages",
    "room_changes",
    "message_reactions",
    "message_read_status",
)


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    citus_database: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ChatKeep]:
    settings = Settings(
        database_url=url_as(citus_database, "chatapp_app"),
        redis_url=redis_url,
        citus=True,
        data_dir=tmp_path_factory.mktemp("data"),
    )
    async with ChatKeep.connect(settings, node_id="citus-a", bcrypt_rounds=10) as facade:
        yield facade


async def _users(chat: ChatKeep, *names: str) -> list[uuid.UUID]:
    tag = uuid.uuid4().hex[:6]
    found = []
    for name in names:
        user = await chat.register(
            CreateUserDto(
                email=f"{name}{tag}@example.com", username=f"{name}{tag}", password="correct horse"
            )
        )
        found.append(user.id)
    return found


async def test_users_is_a_reference_table_and_rooms_are_colocated(citus_database: str) -> None:
    conn = await asyncpg.connect(citus_database)
    try:
        rows = await conn.fetch(
            "SELECT logicalrelid::text AS t, partmethod::text, colocationid,"
            "       column_to_column_name(logicalrelid, partkey) AS key"
            "  FROM pg_dist_partition"
        )
    finally:
        await conn.close()
    by_table = {r["t"]: r for r in rows}
    assert by_table["users"]["partmethod"] == "n"  # reference: a copy on every node
    for table in PER_ROOM:
        assert by_table[table]["partmethod"] == "h", table
        assert by_table[table]["key"] == ("id" if table == "rooms" else "room_id"), table
    assert len({by_table[t]["colocationid"] for t in PER_ROOM}) == 1
    assert "audit_log" not in by_table  # one plain table per node (migrations/citus)


async def _plan(conn: asyncpg.Connection, user: uuid.UUID, query: str, *args: object) -> str:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL app.user_id = '{user}'")
        rows = await conn.fetch(f"EXPLAIN (COSTS OFF) {query}", *args)
    return "\n".join(r[0] for r in rows)


async def test_per_room_statements_are_single_shard_router_queries(
    chat: ChatKeep, citus_database: str
) -> None:
    (alice,) = await _users(chat, "alice")
    room = await chat.create_room(CreateRoomDto(name="plans", created_by=alice))
    await chat.send_message(room.id, alice, "first")
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        plans = {
            "send: retry look-up": await _plan(
                conn, alice, FIND_BY_CLIENT_ID, room.id, alice, "c-1"
            ),
            "send: checks": await _plan(conn, alice, WHY_NOT_SENT, room.id, alice),
            "send: insert": await _plan(
                conn, alice, SEND_INSERT_CITUS, uuid7(), room.id, alice, None, "hello", "text", None
            ),
            "send: own watermark": await _plan(
                conn, alice, SEND_SEEN_CITUS, room.id, alice, 2, datetime.now(UTC)
            ),
            "send: position": await _plan(conn, alice, ROOM_POSITION, room.id),
            "history": await _plan(conn, alice, HISTORY_BEFORE, room.id, 100, 50),
            "change log": await _plan(conn, alice, CHANGES_CITUS, room.id, 0, 50),
            "catch-up": await _plan(conn, alice, HISTORY_AFTER, room.id, 0, 50),
            "mark-read": await _plan(conn, alice, MARK_READ_CITUS, room.id, alice, None),
            "mark-read: watermark": await _plan(conn, alice, READ_WATERMARK, room.id, alice),
        }
    finally:
        await conn.close()
    for flow, plan in plans.items():
        assert "Custom Scan (Citus Adaptive)" in plan, (flow, plan)
        counts = [line.strip() for line in plan.splitlines() if "Task Count" in line]
        assert counts == ["Task Count: 1"], (flow, plan)


_SHARD_NAME = re.compile(
    r"\b(rooms|room_users|messages|room_changes|message_reactions|message_read_status)_(\d+)\b"
)


async def test_flow_functions_touch_only_the_rooms_shards(
    chat: ChatKeep, citus_database: str
) -> None:
    """013's flow functions run inside PL/pgSQL, where EXPLAIN does not reach: the remote
    commands Citus logs for a call name only the shards of the room's shard group."""
    alice, bob = await _users(chat, "alice", "bob")
    room = await chat.create_room(CreateRoomDto(name="routed", created_by=alice))
    await chat.join(room.id, bob)
    sent = await chat.send_message(room.id, alice, "hello")
    await chat.react(sent.id, bob, "\N{THUMBS UP SIGN}")
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
    calls: dict[str, tuple[str, tuple[object, ...]]] = {
        "history": ("SELECT * FROM chatkeep_history($1, $2, $3, 50, 50)", (bob, room.id, 1)),
        "mark-read": ("SELECT * FROM chatkeep_mark_read($1, $2, NULL)", (bob, room.id)),
        "changes": ("SELECT * FROM chatkeep_changes($1, $2, 0, 50)", (bob, room.id)),
        "position": ("SELECT chatkeep_room_position($1, $2)", (bob, room.id)),
    }
    try:
        shards = {
            table: await conn.fetchval(
                "SELECT get_shard_id_for_distribution_column($1::regclass, $2::uuid)",
                table,
                room.id,
            )
            for table in PER_ROOM
        }
        touched: dict[str, set[tuple[str, int]]] = {}
        for flow, (query, args) in calls.items():
            notices.clear()
            async with conn.transaction():
                await conn.execute(f"SET LOCAL app.user_id = '{bob}'")
                await conn.execute("SET LOCAL citus.log_remote_commands = on")
                rows = await conn.fetch(query, *args)
            assert rows, flow
            touched[flow] = {
                (m.group(1), int(m.group(2))) for n in notices for m in _SHARD_NAME.finditer(n)
            }
    finally:
        await conn.close()
    for flow, names in touched.items():
        assert names, (flow, "no remote command named a shard")
        assert all(shards[table] == shard for table, shard in names), (flow, names, shards)
    assert ("messages", shards["messages"]) in touched["history"]
    assert ("message_reactions", shards["message_reactions"]) in touched["history"]
    assert ("room_changes", shards["room_changes"]) in touched["changes"]


async def test_the_cross_room_reads_fan_out(chat: ChatKeep, citus_database: str) -> None:
    """A user's unread counts read every shard (measured, not routed): said plainly."""
    from chatkeep.storage.messages import UNREAD_COUNTS

    (alice,) = await _users(chat, "alice")
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        plan = await _plan(conn, alice, UNREAD_COUNTS, alice)
    finally:
        await conn.close()
    counts = [line.strip() for line in plan.splitlines() if "Task Count" in line]
    assert counts, plan
    assert counts != ["Task Count: 1"], plan


async def test_send_history_read_and_unread_counts(chat: ChatKeep) -> None:
    alice, bob = await _users(chat, "alice", "bob")
    room = await chat.create_room(CreateRoomDto(name="general", created_by=alice))
    await chat.join(room.id, bob)
    sent = [await chat.send_message(room.id, alice, f"message {i}") for i in range(1, 6)]
    assert [m.seq for m in sent] == [1, 2, 3, 4, 5]
    again = await chat.send_message(room.id, alice, "retry", client_msg_id="c-1")
    assert await chat.send_message(room.id, alice, "retry", client_msg_id="c-1") == again

    page = await chat.history(room.id, bob, limit=3)
    assert [m.content for m in page.items] == ["message 4", "message 5", "retry"]
    caught = await chat.catch_up(room.id, bob, after_seq=2)
    assert [m.seq for m in caught.items] == [3, 4, 5, 6]

    assert (await chat.unread_counts(bob))[room.id] == 6
    assert await chat.mark_read(room.id, bob, 4) == 4
    assert (await chat.unread_counts(bob))[room.id] == 2
    assert (await chat.unread_counts(alice))[room.id] == 0  # own messages are read

    # The room's change log (what a reconnecting client resumes from) reads on Citus too.
    log = await chat.changes(room.id, bob, after=0)
    created = [c.seq for c in log.items if c.kind == "message.created"]
    assert created == [1, 2, 3, 4, 5, 6]
    assert await chat.room_position(room.id, bob) == log.position

    # Migration 013's flow functions, as the facade calls them on Citus: the room list (all
    # of the user's shards), a watermark that does not move, reactions in a history page.
    (summary,) = [s for s in await chat.rooms_of(bob) if s.room.id == room.id]
    assert summary.unread_count == 2
    assert summary.last_message is not None
    assert summary.last_message.content == "retry"
    assert await chat.mark_read(room.id, bob, 2) == 4  # never backward
    await chat.react(sent[4].id, bob, "\N{THUMBS UP SIGN}")
    page = await chat.history(room.id, bob, limit=2)
    reacted = {m.id: m for m in page.items}[sent[4].id]
    assert [(r.emoji, r.count, r.me) for r in reacted.reactions] == [
        ("\N{THUMBS UP SIGN}", 1, True)
    ]


async def test_search_finds_only_the_users_rooms(chat: ChatKeep, citus_database: str) -> None:
    """016's index and search function on Citus: the acting user's rooms on every shard."""
    conn = await asyncpg.connect(citus_database)
    try:
        indexed = await conn.fetch(
            "SELECT success, result FROM run_command_on_shards('messages', $$"
            "SELECT count(*) FROM pg_indexes WHERE tablename = '%s'"
            " AND indexdef LIKE '%%gin (to_tsvector(''simple''%%'$$)"
        )
    finally:
        await conn.close()
    assert indexed, "messages has shards"
    assert all(r["success"] and r["result"] == "1" for r in indexed), indexed
    alice, bob, carol = await _users(chat, "alice", "bob", "carol")
    rooms = [
        await chat.create_room(CreateRoomDto(name=f"search {i}", created_by=alice))
        for i in range(4)
    ]
    for room in rooms[:3]:
        await chat.join(room.id, bob)
        await chat.send_message(room.id, alice, f"the walrus sings in {room.name}")
    await chat.send_message(rooms[3].id, alice, "the walrus sings alone")
    page = await chat.search(bob, "walrus")
    assert sorted(h.room_id for h in page.items) == sorted(r.id for r in rooms[:3])
    ranked = await chat.search(bob, "walrus sings", room_id=rooms[1].id, order="rank")
    assert [h.content for h in ranked.items] == ["the walrus sings in search 1"]
    assert (await chat.search(carol, "walrus")).items == ()


async def test_a_hand_written_reply_keeps_its_thread(chat: ChatKeep, citus_database: str) -> None:
    """Migration 023's triggers run on the shards for any statement, not only the
    facade's: a reply to a reply inserted by hand attaches to the root and is counted
    (tests/citus/test_citus_threads.py covers the facade's thread calls)."""
    (alice,) = await _users(chat, "alice")
    room = await chat.create_room(CreateRoomDto(name="threads", created_by=alice))
    root = await chat.send_message(room.id, alice, "root")
    reply = await chat.send_message(room.id, alice, "a reply", reply_to=root.id)
    conn = await asyncpg.connect(citus_database)
    try:
        stored = await conn.fetchval(
            "INSERT INTO messages (id, room_id, user_id, content, reply_to)"
            " VALUES ($1, $2, $3, 'x', $4) RETURNING reply_to",
            uuid7(),
            room.id,
            alice,
            reply.id,
        )
        count = await conn.fetchval(
            "SELECT reply_count FROM threads WHERE room_id = $1 AND root_id = $2", room.id, root.id
        )
    finally:
        await conn.close()
    assert (stored, count) == (root.id, 2)


async def test_row_security_refuses_an_outsider(chat: ChatKeep, citus_database: str) -> None:
    alice, carol = await _users(chat, "alice", "carol")
    room = await chat.create_room(CreateRoomDto(name="secret", type="private", created_by=alice))
    await chat.send_message(room.id, alice, "for members only")
    with pytest.raises((NotFound, PermissionDenied)):
        await chat.history(room.id, carol)
    with pytest.raises((NotFound, PermissionDenied)):
        await chat.send_message(room.id, carol, "let me in")
    # Straight to the table as the application role: the shards' policies hide the room.
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        for who, expected in ((carol, 0), (alice, 1)):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL app.user_id = '{who}'")
                seen = await conn.fetchval(
                    "SELECT count(*) FROM messages WHERE room_id = $1", room.id
                )
            assert seen == expected, who
        async with conn.transaction():
            await conn.execute(f"SET LOCAL app.user_id = '{carol}'")
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(
                    "INSERT INTO messages (id, room_id, user_id, content) VALUES ($1, $2, $3, 'x')",
                    uuid7(),
                    room.id,
                    carol,
                )
    finally:
        await conn.close()


async def test_a_direct_room_is_one_per_pair(chat: ChatKeep) -> None:
    alice, bob = await _users(chat, "alice", "bob")
    first = await chat.open_direct(alice, bob)
    again = await chat.open_direct(bob, alice)
    assert again.id == first.id
    assert first.id == direct_room_id(*sorted((alice, bob)))
    sent = await chat.send_message(first.id, bob, "hello")
    page = await chat.history(first.id, alice)
    assert [m.id for m in page.items] == [sent.id]
    notes = await chat.open_direct(alice, alice)  # notes to self: one member
    assert notes.id == direct_room_id(alice, alice) != first.id
