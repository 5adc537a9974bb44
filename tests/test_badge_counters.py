"""The stored badge counters of migration 020 against a direct count, as chatapp_app.

``room_users.unread_mentions``, ``thread_followers.unread_mentions`` and
``room_mention_heads`` are kept by triggers; ``chatkeep_badges`` reads them instead of
counting. After every kind of change that moves a mention or a watermark (send, edit,
delete, mark read, thread read, leave and join again, concurrent sends and reads), each
user's badges through the facade must equal the count made the slow way over
``message_mentions`` by a superuser. Outsiders see no counter and no head.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings, User
from chatkeep.errors import PermissionDenied
from chatkeep.realtime.ratelimit import RateLimit

PASSWORD = "correct horse"
UNLIMITED = RateLimit(limit=10_000, period=1.0)

# What 015 counted per room, probing: the definition the counters must keep.
SLOW = """
SELECT ru.room_id,
       GREATEST(r.last_seq - ru.last_read_seq, 0) AS unread,
       (SELECT count(*) FROM message_mentions mm
         WHERE mm.room_id = ru.room_id AND mm.seq > ru.last_read_seq
           AND (mm.user_id = $1 OR (mm.user_id IS NULL AND mm.author_id <> $1))) AS mentions,
       (SELECT count(*) FROM thread_followers f
         WHERE f.room_id = ru.room_id AND f.user_id = $1 AND f.following
           AND EXISTS (SELECT 1 FROM messages m
                        WHERE m.reply_to = f.root_id AND m.seq > f.last_read_seq))
         AS unread_threads,
       (SELECT count(*) FROM thread_followers f
          JOIN message_mentions mm ON mm.root_id = f.root_id AND mm.user_id = f.user_id
         WHERE f.room_id = ru.room_id AND f.user_id = $1 AND f.following
           AND mm.seq > f.last_read_seq) AS thread_mentions
  FROM room_users ru JOIN rooms r ON r.id = ru.room_id
 WHERE ru.user_id = $1
"""


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    # A small pool: the concurrent test queues on it (the server is shared).
    settings = make_settings(database_url=app_url, pool_min_size=1, pool_max_size=6)
    async with ChatKeep.connect(
        settings, node_id="node-b", bcrypt_rounds=10, send_limit=UNLIMITED
    ) as facade:
        yield facade


async def register(chat: ChatKeep, name: str) -> User:
    return await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
    )


async def slow(conn: asyncpg.Connection, user: uuid.UUID) -> dict[uuid.UUID, tuple[int, ...]]:
    rows = await conn.fetch(SLOW, user)
    return {r["room_id"]: tuple(r[k] for k in range(1, 5)) for r in rows}


async def assert_exact(chat: ChatKeep, conn: asyncpg.Connection, *users: User) -> None:
    for user in users:
        want = await slow(conn, user.id)
        badges = await chat.badges(user.id)
        got = {
            room: (b.unread, b.mentions, b.unread_threads, b.thread_mentions)
            for room, b in badges.items()
        }
        assert got == want, user.username
        counts = await chat.unread_counts(user.id)
        assert counts.badges() == badges
        assert dict(counts) == {room: v[0] for room, v in want.items()}


@pytest.mark.asyncio(loop_scope="session")
async def test_counters_follow_every_change(chat: ChatKeep, conn: asyncpg.Connection) -> None:
    alice, bob, dave = [await register(chat, n) for n in ("alice", "bob", "dave")]
    room = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    side = await chat.create_room(CreateRoomDto(name="side", created_by=alice.id))
    for r in (room, side):
        await chat.join(r.id, bob.id)
        await chat.join(r.id, dave.id)
    users = (alice, bob, dave)
    await assert_exact(chat, conn, *users)

    m1 = await chat.send_message(room.id, alice.id, "hi @bob and @dave")
    root = await chat.send_message(room.id, bob.id, "a thread")
    await chat.send_message(room.id, alice.id, "yes @bob", reply_to=root.id)
    r2 = await chat.send_message(room.id, dave.id, "@bob @alice look", reply_to=root.id)
    await chat.send_message(side.id, alice.id, "@room meeting")  # an owner's room mention
    await chat.send_message(side.id, dave.id, "@room not allowed, @bob")  # a member's: no
    await assert_exact(chat, conn, *users)
    bob_badge = (await chat.badges(bob.id))[room.id]
    # bob's own root moved his watermark past alice's first mention, not the replies'.
    assert (bob_badge.mentions, bob_badge.thread_mentions) == (2, 2)
    assert (await chat.badges(bob.id))[side.id].mentions == 2  # @room by alice, @bob

    # An edit that drops a name uncounts it; one that adds a name counts it.
    await chat.edit_message(m1.id, alice.id, "hi @dave only")
    await chat.edit_message(r2.id, dave.id, "nobody now")
    await assert_exact(chat, conn, *users)
    await chat.edit_message(r2.id, dave.id, "@bob again")
    await assert_exact(chat, conn, *users)

    # Reading the thread clears its mentions; reading the room clears the room's.
    await chat.mark_thread_read(root.id, bob.id)
    await assert_exact(chat, conn, *users)
    assert (await chat.badges(bob.id))[room.id].thread_mentions == 0
    await chat.mark_read(room.id, dave.id, seq=m1.seq)  # part way: m1 read, r2 not
    await chat.mark_read(side.id, bob.id)
    await assert_exact(chat, conn, *users)
    assert (await chat.badges(bob.id))[side.id].mentions == 0

    # A deleted message takes its mentions with it.
    late = await chat.send_message(room.id, alice.id, "@dave late", reply_to=root.id)
    await assert_exact(chat, conn, *users)
    assert await chat.delete_message(late.id, alice.id)
    await assert_exact(chat, conn, *users)

    # Leaving and joining again: the mentions still there count after the new watermark.
    await chat.send_message(side.id, alice.id, "@dave before you go")
    assert await chat.leave(side.id, dave.id)
    await assert_exact(chat, conn, *users)
    await conn.execute(  # back, with an old watermark (as an import or a restore might)
        "INSERT INTO room_users (room_id, user_id, last_read_seq) VALUES ($1, $2, 0)",
        side.id,
        dave.id,
    )
    await assert_exact(chat, conn, *users)
    assert (await chat.badges(dave.id))[side.id].mentions == 2  # alice's @room and @dave


@pytest.mark.asyncio(loop_scope="session")
async def test_counters_stay_exact_under_concurrent_mentions_and_reads(
    chat: ChatKeep, conn: asyncpg.Connection
) -> None:
    alice, bob, carol = [await register(chat, n) for n in ("alice", "bob", "carol")]
    room = await chat.create_room(CreateRoomDto(name="busy", created_by=alice.id))
    for u in (bob, carol):
        await chat.join(room.id, u.id)
    root = await chat.send_message(room.id, bob.id, "root")
    await chat.send_message(room.id, carol.id, "first", reply_to=root.id)

    async def mention(i: int) -> None:
        author = alice if i % 2 else carol
        await chat.send_message(
            room.id, author.id, f"@bob #{i}", reply_to=root.id if i % 3 == 0 else None
        )

    async def read(i: int) -> None:
        if i % 2:
            await chat.mark_read(room.id, bob.id)
        else:
            await chat.mark_thread_read(root.id, bob.id)

    for _ in range(3):
        await asyncio.gather(*(mention(i) for i in range(20)), *(read(i) for i in range(10)))
        await assert_exact(chat, conn, alice, bob, carol)


@pytest.mark.asyncio(loop_scope="session")
async def test_outsiders_see_no_counter(chat: ChatKeep, app_conn: asyncpg.Connection) -> None:
    alice, eve = [await register(chat, n) for n in ("alice", "eve")]
    room = await chat.create_room(
        CreateRoomDto(name="private", type="private", created_by=alice.id)
    )
    await chat.send_message(room.id, alice.id, "@room hello")
    assert await chat.badges(eve.id) == {}
    assert not (await chat.unread_counts(eve.id)).has_badges
    for sql, args in (
        ("SELECT * FROM room_mention_heads", ()),
        # eve cannot read alice's badges: the functions answer for the acting user only.
        ("SELECT * FROM chatkeep_unread($1)", (alice.id,)),
        ("SELECT * FROM chatkeep_badges($1)", (alice.id,)),
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # noqa: PT012
            async with app_conn.transaction():
                await app_conn.execute("SELECT set_config('app.user_id', $1, true)", str(eve.id))
                await app_conn.fetch(sql, *args)
    with pytest.raises(PermissionDenied):
        async with chat.acting_as(eve.id):
            await chat.threads.badges(alice.id)
