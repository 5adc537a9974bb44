"""Threads, mentions, badges and search on Citus (migration 023), as chatapp_app.

The thread tables are distributed by room and colocated with rooms; the triggers keep them
from the shards; the facade's thread, mention and badge calls answer as on PostgreSQL
(tests/test_facade_threads.py); outsiders see nothing; a thread page is a single-shard
router query.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Room,
    Settings,
)
from chatkeep.ids import uuid7
from chatkeep.realtime import MessageCreated
from chatkeep.storage.threads import (
    COLLAPSED_AROUND_CITUS,
    COLLAPSED_BEFORE_CITUS,
    FOLLOW_CITUS,
    FOLLOWED_CITUS,
    LAST_REPLY_CITUS,
    MARK_THREAD_READ_CITUS,
    MENTIONS_CITUS,
    ROOM_THREADS,
    SUMMARY_CITUS,
    THREAD_AFTER,
    THREAD_AROUND,
    THREAD_BEFORE,
)
from chatkeep.testing import url_as
from tests.test_facade import expect

pytestmark = pytest.mark.asyncio(loop_scope="session")

THREAD_TABLES = ("threads", "thread_followers", "message_mentions")


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
    async with ChatKeep.connect(settings, node_id="citus-t", bcrypt_rounds=10) as facade:
        yield facade


@dataclass
class World:
    """alice owns public ``general`` (bob and dave are members) and ``other`` (bob is a
    member); carol is in neither and owns the private ``secret``."""

    alice: uuid.UUID
    bob: uuid.UUID
    carol: uuid.UUID
    dave: uuid.UUID
    names: dict[uuid.UUID, str]
    general: Room
    other: Room
    secret: Room


@pytest_asyncio.fixture(loop_scope="session")
async def world(chat: ChatKeep) -> World:
    # One database per module: every test has its own users and rooms.
    tag = uuid.uuid4().hex[:6]
    names: dict[uuid.UUID, str] = {}
    ids = []
    for name in ("alice", "bob", "carol", "dave"):
        user = await chat.register(
            CreateUserDto(
                email=f"{name}{tag}@example.org", username=f"{name}{tag}", password="correct horse"
            )
        )
        names[user.id] = user.username
        ids.append(user.id)
    alice, bob, carol, dave = ids
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice))
    other = await chat.create_room(CreateRoomDto(name="other", created_by=alice))
    secret = await chat.create_room(CreateRoomDto(name="secret", type="private", created_by=carol))
    for room in (general, other):
        await chat.join(room.id, bob)
    await chat.join(general.id, dave)
    return World(alice, bob, carol, dave, names, general, other, secret)


async def test_the_thread_tables_are_colocated_with_rooms(citus_database: str) -> None:
    conn = await asyncpg.connect(citus_database)
    try:
        rows = await conn.fetch(
            "SELECT logicalrelid::text AS t, partmethod::text, colocationid,"
            "       column_to_column_name(logicalrelid, partkey) AS key"
            "  FROM pg_dist_partition"
        )
        keys = await conn.fetch(
            "SELECT conrelid::regclass::text AS t, conname,"
            "       pg_get_constraintdef(oid) AS def FROM pg_constraint"
            " WHERE conrelid = ANY ($1::regclass[]) AND contype IN ('p', 'u', 'f')",
            list(THREAD_TABLES),
        )
        checks = await conn.fetchval(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'messages_no_replies_on_citus'"
        )
    finally:
        await conn.close()
    by_table = {r["t"]: r for r in rows}
    for table in THREAD_TABLES:
        assert by_table[table]["partmethod"] == "h", table
        assert by_table[table]["key"] == "room_id", table
        assert by_table[table]["colocationid"] == by_table["rooms"]["colocationid"], table
    # Every unique key includes the room; references to messages go through (room_id, id).
    for key in keys:
        if key["def"].startswith(("PRIMARY KEY", "UNIQUE")):
            assert "room_id" in key["def"], key
        elif "REFERENCES messages" in key["def"]:
            assert key["def"].startswith("FOREIGN KEY (room_id, "), key
    assert checks == 0  # 015's refusal of replies is gone


async def test_replies_threads_and_pages(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "a question")
    reply = await chat.send_message(w.general.id, w.bob, "an answer", reply_to=root.id)
    assert reply.reply_to == root.id
    assert reply.seq == root.seq + 1
    nested = await chat.send_message(w.general.id, w.dave, "me too", reply_to=reply.id)
    assert nested.reply_to == root.id  # a reply to a reply attaches to the root

    summary = await chat.thread_summary(reply.id, w.alice)
    assert summary is not None
    assert (summary.root_id, summary.reply_count, summary.last_reply_seq) == (
        root.id,
        2,
        nested.seq,
    )
    assert summary.participants == (w.bob, w.dave)
    page = await chat.thread(root.id, w.alice)
    assert [m.id for m in page.items] == [reply.id, nested.id]
    assert page.items[0].user.username == w.names[w.bob]
    more = [
        await chat.send_message(w.general.id, w.bob, f"r{i}", reply_to=root.id) for i in range(4)
    ]
    seqs = [reply.seq, nested.seq, *(m.seq for m in more)]
    newest = await chat.thread(root.id, w.bob, limit=3)
    assert [m.seq for m in newest.items] == seqs[-3:]
    assert newest.before is not None
    older = await chat.thread(root.id, w.bob, cursor=newest.before, limit=3)
    assert [m.seq for m in older.items] == seqs[:3]
    after = await chat.thread(root.id, w.bob, after_seq=seqs[1], limit=2)
    assert [m.seq for m in after.items] == seqs[2:4]
    around = await chat.thread(root.id, w.bob, around=seqs[3], limit=4)
    assert [m.seq for m in around.items] == seqs[1:5]
    # A reaction on a reply shows in the thread page (the reactions join names the room).
    await chat.react(more[0].id, w.alice, "\N{THUMBS UP SIGN}")
    reacted = {m.id: m for m in (await chat.thread(root.id, w.bob)).items}[more[0].id]
    assert [(r.emoji, r.count) for r in reacted.reactions] == [("\N{THUMBS UP SIGN}", 1)]

    collapsed = await chat.collapsed_history(w.general.id, w.bob)
    assert [m.id for m in collapsed.items] == [root.id]
    thread = collapsed.items[0].thread
    assert thread is not None
    assert thread.reply_count == 6
    around_root = await chat.collapsed_history(w.general.id, w.bob, around=root.seq)
    assert [m.id for m in around_root.items] == [root.id]
    assert [t.root_id for t in await chat.room_threads(w.general.id, w.dave)] == [root.id]

    # A deleted reply leaves the thread; a reply in the main timeline carries reply_to.
    assert await chat.delete_message(more[-1].id, w.bob)
    summary = await chat.thread_summary(root.id, w.alice)
    assert summary is not None
    assert (summary.reply_count, summary.last_reply_seq) == (5, more[-2].seq)
    history = await chat.history(w.general.id, w.alice, limit=3)
    assert [m.reply_to for m in history.items] == [root.id] * 3
    lone = await chat.send_message(w.other.id, w.alice, "no replies")
    assert await chat.thread_summary(lone.id, w.bob) is None


async def test_concurrent_replies_count_exactly(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.other.id, w.alice, "busy root")
    senders = (w.alice, w.bob)
    replies = await asyncio.gather(
        *(
            chat.send_message(w.other.id, senders[i % 2], f"r{i}", reply_to=root.id)
            for i in range(12)
        )
    )
    summary = await chat.thread_summary(root.id, w.bob)
    assert summary is not None
    assert summary.reply_count == 12
    assert summary.last_reply_seq == max(r.seq for r in replies)


async def test_bad_replies_and_outsiders(chat: ChatKeep, world: World, citus_database: str) -> None:
    w = world
    in_other = await chat.send_message(w.other.id, w.alice, "elsewhere")
    hidden = await chat.send_message(w.secret.id, w.carol, "private, @" + w.names[w.carol])
    # On Citus a root is looked up in the reply's room: one of another room (seen or not)
    # reads as missing, exactly as an id that never was (migration 023 says why).
    for root in (in_other.id, hidden.id, uuid7()):
        with pytest.raises(NotFound) as caught:
            await chat.send_message(w.general.id, w.bob, "x", reply_to=root)
        assert str(caught.value) == "reply_to: message not found"
    # The secret room's thread state is not disclosed to bob.
    reply = await chat.send_message(w.secret.id, w.carol, "to myself", reply_to=hidden.id)
    for call in (
        chat.thread(hidden.id, w.bob),
        chat.thread_summary(reply.id, w.bob),
        chat.mark_thread_read(hidden.id, w.bob),
        chat.follow_thread(hidden.id, w.bob),
    ):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(PermissionDenied):
        await chat.room_threads(w.general.id, w.carol)
    assert w.secret.id not in await chat.badges(w.bob)
    # Straight to the tables as the application role: the shards' policies hide the rows.
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        for who, expected in ((w.bob, 0), (w.carol, 1)):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL app.user_id = '{who}'")
                seen = [
                    await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE room_id = $1", w.secret.id
                    )
                    for table in THREAD_TABLES
                ]
            assert seen == [expected, expected, 0], (who, seen)  # no mention of oneself
        # bob may not write a follower row in carol's room, nor one for someone else.
        for room, user in ((w.secret.id, w.bob), (w.general.id, w.dave)):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL app.user_id = '{w.bob}'")
                with pytest.raises(asyncpg.PostgresError):
                    await conn.execute(
                        "INSERT INTO thread_followers (room_id, root_id, user_id)"
                        " VALUES ($1, $2, $3)",
                        room,
                        hidden.id,
                        user,
                    )
        # A follower row's root must be a message of its room.
        async with conn.transaction():
            await conn.execute(f"SET LOCAL app.user_id = '{w.bob}'")
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute(
                    "INSERT INTO thread_followers (room_id, root_id, user_id) VALUES ($1, $2, $3)",
                    w.general.id,
                    in_other.id,
                    w.bob,
                )
    finally:
        await conn.close()


async def test_following_mentions_and_badges(chat: ChatKeep, world: World) -> None:
    w = world
    room = await chat.create_room(CreateRoomDto(name="badges", created_by=w.alice))
    for user in (w.bob, w.dave):
        await chat.join(room.id, user)
    root = await chat.send_message(room.id, w.alice, "root")
    reply = await chat.send_message(room.id, w.bob, "answer", reply_to=root.id)
    followed = await chat.followed_threads(w.alice, room_id=room.id)
    assert [(f.thread.root_id, f.unread) for f in followed] == [(root.id, 1)]
    [bobs] = await chat.followed_threads(w.bob, room_id=room.id)
    assert (bobs.unread, bobs.last_read_seq) == (0, reply.seq)
    badges = (await chat.badges(w.alice))[room.id]
    assert (badges.unread, badges.mentions, badges.unread_threads) == (1, 0, 1)
    assert await chat.mark_thread_read(root.id, w.alice) == reply.seq
    assert await chat.mark_thread_read(root.id, w.alice) == reply.seq
    assert (await chat.badges(w.alice))[room.id].unread_threads == 0
    # dave follows through a reply's id, from the last reply on.
    await chat.follow_thread(reply.id, w.dave)
    assert (await chat.badges(w.dave))[room.id].unread_threads == 0
    await chat.send_message(room.id, w.bob, f"more, @{w.names[w.dave]}", reply_to=root.id)
    dave = (await chat.badges(w.dave))[room.id]
    assert (dave.unread_threads, dave.thread_mentions, dave.mentions) == (1, 1, 1)
    [entry] = await chat.followed_threads(w.dave, room_id=room.id)
    assert (entry.unread, entry.mentions) == (1, 1)
    assert await chat.followed_threads(w.dave, room_id=room.id, before=entry.thread) == []
    await chat.unfollow_thread(root.id, w.dave)
    assert (await chat.badges(w.dave))[room.id].unread_threads == 0
    assert await chat.followed_threads(w.dave, room_id=room.id) == []
    # Reading a thread without following it does not follow it.
    other_root = await chat.send_message(room.id, w.alice, "another")
    await chat.send_message(room.id, w.bob, "x", reply_to=other_root.id)
    assert await chat.mark_thread_read(other_root.id, w.dave) > 0
    assert await chat.followed_threads(w.dave, room_id=room.id) == []
    # Mentions: members only (carol is not one), not yourself, re-resolved on an edit.
    sent = await chat.send_message(
        room.id,
        w.bob,
        f"hi @{w.names[w.alice].title()}, @{w.names[w.carol]} and @nobody; @{w.names[w.bob]}.",
    )
    assert [m.message_id for m in await chat.mentions(w.alice)][:1] == [sent.id]
    assert sent.id not in {m.message_id for m in await chat.mentions(w.carol)}
    assert sent.id not in {m.message_id for m in await chat.mentions(w.bob)}
    assert (await chat.badges(w.alice))[room.id].mentions == 1
    await chat.mark_read(room.id, w.alice)
    assert (await chat.badges(w.alice))[room.id].mentions == 0
    await chat.edit_message(sent.id, w.bob, f"hi @{w.names[w.dave]}")
    assert sent.id not in {m.message_id for m in await chat.mentions(w.alice)}
    assert [m.message_id for m in await chat.mentions(w.dave)][:1] == [sent.id]
    # Room mentions: from owners and admins only, never your own.
    plain = await chat.send_message(room.id, w.bob, "@room look")
    loud = await chat.send_message(room.id, w.alice, "hey @here")
    inbox = await chat.mentions(w.dave)
    assert [(m.message_id, m.room_wide) for m in inbox[:2]] == [(loud.id, True), (sent.id, False)]
    assert plain.id not in {m.message_id for m in inbox}
    assert loud.id not in {m.message_id for m in await chat.mentions(w.alice)}
    page = await chat.mentions(w.dave, limit=1)
    assert [m.message_id for m in page] == [loud.id]
    rest = await chat.mentions(w.dave, before=page[-1].message_id, limit=1)
    assert [m.message_id for m in rest] == [sent.id]
    # Badges answer for the acting user only.
    async with chat.acting_as(w.bob):
        with pytest.raises(PermissionDenied):
            await chat.threads.badges(w.alice)
    with pytest.raises(InvalidInput):
        await chat.badges("x")  # type: ignore[arg-type]
    # unread_counts agrees with the badges' unread.
    counts = await chat.unread_counts(w.dave)
    assert counts[room.id] == (await chat.badges(w.dave))[room.id].unread


async def test_search_finds_replies_in_the_users_rooms_only(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "where is the narwhal")
    reply = await chat.send_message(
        w.general.id, w.bob, "the narwhal is under the ice", reply_to=root.id
    )
    await chat.send_message(w.secret.id, w.carol, "a secret narwhal")
    found = await chat.search(w.dave, "narwhal ice")
    assert [h.id for h in found.items] == [reply.id]
    assert found.items[0].reply_to == root.id  # issue 14: a hit names its thread
    assert {h.room_id for h in (await chat.search(w.bob, "narwhal")).items} == {w.general.id}
    in_room = await chat.search(w.dave, "narwhal", room_id=w.general.id, order="rank")
    assert {h.id: h.reply_to for h in in_room.items} == {root.id: None, reply.id: root.id}
    assert (await chat.search(w.dave, "narwhal", room_id=w.secret.id)).items == ()


async def _plan(conn: asyncpg.Connection, user: uuid.UUID, query: str, *args: object) -> str:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL app.user_id = '{user}'")
        rows = await conn.fetch(f"EXPLAIN (COSTS OFF) {query}", *args)
    return "\n".join(r[0] for r in rows)


async def test_thread_statements_are_single_shard_router_queries(
    chat: ChatKeep, world: World, citus_database: str
) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice, "plans")
    await chat.send_message(w.general.id, w.bob, "reply", reply_to=root.id)
    room = w.general.id
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        plans = {
            "thread page": await _plan(conn, w.bob, THREAD_BEFORE, room, 100, 51, root.id),
            "thread page after": await _plan(conn, w.bob, THREAD_AFTER, room, 0, 51, root.id),
            "thread page around": await _plan(conn, w.bob, THREAD_AROUND, room, 3, 26, 26, root.id),
            "collapsed history": await _plan(conn, w.bob, COLLAPSED_BEFORE_CITUS, room, 100, 51),
            "collapsed around": await _plan(conn, w.bob, COLLAPSED_AROUND_CITUS, room, 3, 26, 26),
            "summary": await _plan(conn, w.bob, SUMMARY_CITUS, root.id, room),
            "room threads": await _plan(conn, w.bob, ROOM_THREADS, room, 100, 50),
            "last reply": await _plan(conn, w.bob, LAST_REPLY_CITUS, room, root.id),
            "mark thread read": await _plan(
                conn, w.bob, MARK_THREAD_READ_CITUS, room, root.id, w.bob, 2
            ),
            "follow": await _plan(conn, w.bob, FOLLOW_CITUS, room, root.id, w.bob, True, 2),
        }
    finally:
        await conn.close()
    for flow, plan in plans.items():
        assert "Custom Scan (Citus Adaptive)" in plan, (flow, plan)
        counts = [line.strip() for line in plan.splitlines() if "Task Count" in line]
        assert counts == ["Task Count: 1"], (flow, plan)
    # On the shard, a thread page is a range of the (reply_to, seq) index, as on PostgreSQL.
    assert "messages_reply_to_seq_idx" in plans["thread page"], plans["thread page"]


async def test_the_cross_room_thread_reads_fan_out(
    chat: ChatKeep, world: World, citus_database: str
) -> None:
    """The followed threads and the mentions inbox read all of a user's rooms: pushed down
    to every shard in one statement (measured as a fan-out, not routed): said plainly."""
    conn = await asyncpg.connect(url_as(citus_database, "chatapp_app"))
    try:
        plans = {
            "followed": await _plan(
                conn, world.bob, FOLLOWED_CITUS, world.bob, None, None, None, 50
            ),
            "mentions": await _plan(conn, world.bob, MENTIONS_CITUS, world.bob, None, 50),
        }
        shards = await conn.fetchval(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'messages'::regclass"
        )
    finally:
        await conn.close()
    for flow, plan in plans.items():
        counts = [line.strip() for line in plan.splitlines() if "Task Count" in line]
        assert counts, (flow, plan)
        # Followed threads: one pushed-down join. Mentions: two distributed subplans (the
        # user's mentions, the room mentions of their rooms), each on every shard, then
        # merged on the coordinator (the last task).
        assert f"Task Count: {shards}" in counts, (flow, plan)
    assert "Distributed Subplan" in plans["mentions"], plans["mentions"]


async def test_mention_notices_on_events_and_changes(chat: ChatKeep, world: World) -> None:
    # 023 keeps the mentions on Citus: the live message events and the room's changes say
    # who a message mentions (members only), as on PostgreSQL (tests/test_facade_feed.py).
    w = world
    room = w.general.id
    start = await chat.room_position(room, w.bob)
    sub = await chat.subscribe(room)
    await chat.send_message(room, w.alice, f"@{w.names[w.bob]} and @{w.names[w.carol]}: see @room")
    await chat.send_message(room, w.bob, f"@room is an owner's word, @{w.names[w.dave]}")
    await chat.send_message(room, w.dave, "nobody named here")
    live = [await expect(sub, MessageCreated) for _ in range(3)]
    await sub.aclose()
    assert [(e.mentions, e.mentions_room) for e in live] == [
        ((w.bob,), True),  # carol is no member of general: never named
        ((w.dave,), False),
        ((), False),
    ]
    page = await chat.changes(room, w.dave, after=start)
    created = [c for c in page.items if c.kind == "message.created"]
    assert [(c.data["mentions"], c.data["mentions_room"]) for c in created] == [
        ((w.bob,), True),
        ((w.dave,), False),
        ((), False),
    ]
