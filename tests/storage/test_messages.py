from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
import uuid

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from chatkeep.config import Settings
from chatkeep.errors import InvalidInput, NotFound, PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto, Message, MessageWithUser, Room, User, UserProfile
from chatkeep.storage import Database, MessageRepository, RoomRepository
from chatkeep.storage.messages import decode_cursor, encode_cursor

from .conftest import MakeRoom, MakeUser, fill_room, known_hash


def msg(room: Room, user: User, content: str = "hello", **extra: object) -> CreateMessageDto:
    return CreateMessageDto(room_id=room.id, user_id=user.id, content=content, **extra)


async def last_seq(db: Database, room: Room) -> int:
    value: int = await db.fetchval(
        "t.last_seq", "SELECT last_seq FROM rooms WHERE id = $1", room.id
    )
    return value


# -- send ---------------------------------------------------------------------------------


async def test_send_allocates_seq_and_moves_the_senders_watermark(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    first = await messages.send(msg(room, alice, "one"))
    second = await messages.send(msg(room, bob, "two", type="system"))
    assert (first.seq, second.seq) == (1, 2)
    assert second.type == "system"
    assert first.id.version == 7
    assert not first.is_edited
    assert await last_seq(db, room) == 2
    assert await messages.unread_counts(alice.id) == {room.id: 1}
    assert await messages.unread_counts(bob.id) == {room.id: 0}
    assert await messages.send(msg(room, alice, "three")) == await messages.get(
        (await messages.history(room.id)).items[-1].id
    )


async def test_send_enforces_membership(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    owner, outsider = await make_user(), await make_user()
    room = await make_room(owner)
    with pytest.raises(PermissionDenied, match="members"):
        await messages.send(msg(room, outsider))
    with pytest.raises(NotFound):
        await messages.send(CreateMessageDto(room_id=uuid.uuid4(), user_id=owner.id, content="x"))
    await db.execute("t.archive", "UPDATE rooms SET is_active = false WHERE id = $1", room.id)
    with pytest.raises(PermissionDenied, match="archived"):
        await messages.send(msg(room, owner))
    # Nothing half-written: no counter moved, no row stored.
    assert await last_seq(db, room) == 0
    assert await db.fetchval("t.count", "SELECT count(*) FROM messages") == 0
    with pytest.raises(InvalidInput):
        await messages.send({"content": "x"})  # type: ignore[arg-type]


async def test_a_repeated_client_msg_id_returns_the_first_message(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    first = await messages.send(msg(room, alice, "hi", client_msg_id="c-1"))
    again = await messages.send(msg(room, alice, "hi (retried)", client_msg_id="c-1"))
    assert again == first
    # Another sender may use the same client id: ids are per (room, user).
    other = await messages.send(msg(room, bob, "hi", client_msg_id="c-1"))
    assert other.id != first.id
    assert other.seq == 2  # the retry burnt no seq
    assert await db.fetchval("t.count", "SELECT count(*) FROM messages") == 2


async def test_concurrent_retries_store_one_message_and_no_gap(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    for round_ in range(5):
        results = await asyncio.gather(
            *(messages.send(msg(room, alice, "x", client_msg_id=f"r{round_}")) for _ in range(10))
        )
        assert len({m.id for m in results}) == 1
        assert results[0].seq == round_ + 1
    assert await last_seq(db, room) == 5
    seqs = await db.fetch("t.seqs", "SELECT seq FROM messages ORDER BY seq")
    assert [r["seq"] for r in seqs] == [1, 2, 3, 4, 5]


async def test_twenty_concurrent_senders_keep_seq_gapless(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    senders = [await make_user() for _ in range(20)]
    room = await make_room(senders[0], *senders[1:])

    async def sender(user: User) -> list[Message]:
        return [await messages.send(msg(room, user, f"{user.username} {i}")) for i in range(10)]

    sent = [m for batch in await asyncio.gather(*(sender(u) for u in senders)) for m in batch]
    assert sorted(m.seq for m in sent) == list(range(1, 201))
    assert await last_seq(db, room) == 200
    # Commit order is seq order: each sender's own messages ascend.
    for user in senders:
        mine = [m.seq for m in sent if m.user_id == user.id]
        assert mine == sorted(mine)


async def test_send_joins_a_transaction_and_rolls_back_with_it(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    kept = await messages.send(msg(room, alice, "kept", client_msg_id="k"))

    async def block() -> None:
        async with db.transaction():
            await messages.send(msg(room, alice, "lost"))
            # A duplicate inside the block does not abort the transaction.
            assert await messages.send(msg(room, alice, "dupe", client_msg_id="k")) == kept
            assert await db.fetchval("t.count", "SELECT count(*) FROM messages") == 2
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        await block()
    assert await db.fetchval("t.count", "SELECT count(*) FROM messages") == 1
    assert await last_seq(db, room) == 1


async def test_concurrent_duplicate_inside_transactions(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice = await make_user()
    room = await make_room(alice)

    async def in_tx() -> Message:
        async with db.transaction():
            return await messages.send(msg(room, alice, "x", client_msg_id="same"))

    results = await asyncio.gather(*(in_tx() for _ in range(6)))
    assert len({m.id for m in results}) == 1
    assert await last_seq(db, room) == 1


def test_content_is_stored_verbatim(database_url: str) -> None:
    """Random unicode and SQL metacharacters come back exactly as sent."""
    loop = asyncio.new_event_loop()
    db = Database(Settings(database_url=database_url), min_size=1, max_size=2)
    try:
        loop.run_until_complete(db.open())
        repo = MessageRepository(db)
        user_id, room_id = uuid7(), uuid7()

        async def setup() -> None:
            await db.execute(
                "t.user",
                "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)",
                user_id,
                "v@example.org",
                "verbatim",
                known_hash(),
            )
            await db.execute(
                "t.room",
                "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'r', 'public', $2)",
                room_id,
                user_id,
            )
            await db.execute(
                "t.member",
                "INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)",
                room_id,
                user_id,
            )

        loop.run_until_complete(setup())
        metachars = st.sampled_from(
            [
                "'; DROP TABLE messages; --",
                "$1 $2 \\x00 %s %(x)s {}",
                '" OR 1=1 --',
                "E'\\\\' || chr(0)",
                "🙂 ‮RTL‬ \u200b zero-width",
                "\\",
            ]
        )

        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.one_of(st.text(min_size=1, max_size=2000), metachars))
        def check(text: str) -> None:
            if "\x00" in text or not text.strip(" \t\r\n"):
                with pytest.raises(InvalidInput, match="content"):
                    CreateMessageDto.checked(room_id=room_id, user_id=user_id, content=text)
                return
            dto = CreateMessageDto(room_id=room_id, user_id=user_id, content=text)
            sent = loop.run_until_complete(repo.send(dto))
            stored = loop.run_until_complete(repo.get(sent.id))
            assert stored.content == text

        check()
    finally:
        loop.run_until_complete(db.close())
        loop.close()


# -- edit and delete ----------------------------------------------------------------------


async def test_edit(messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    sent = await messages.send(msg(room, alice, "typo"))
    edited = await messages.edit(sent.id, "fixed", by=alice.id)
    assert (edited.content, edited.is_edited, edited.seq) == ("fixed", True, sent.seq)
    assert edited.edited_at is not None
    with pytest.raises(PermissionDenied):
        await messages.edit(sent.id, "hijack", by=bob.id)
    with pytest.raises(NotFound):
        await messages.edit(uuid.uuid4(), "nothing", by=alice.id)
    with pytest.raises(InvalidInput):
        await messages.edit(sent.id, "  ", by=alice.id)
    assert (await messages.get(sent.id)).content == "fixed"


async def test_delete(
    messages: MessageRepository, rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    owner, admin, alice, bob = [await make_user() for _ in range(4)]
    room = await make_room(owner, alice, bob)
    await rooms.add_member(room.id, admin.id, role="admin")
    first, second, third, fourth = [await messages.send(msg(room, alice, str(i))) for i in range(4)]
    with pytest.raises(PermissionDenied):
        await messages.delete(first.id, by=bob.id)
    assert await messages.delete(first.id, by=alice.id) is True
    assert await messages.delete(second.id, by=admin.id) is True
    assert await messages.delete(third.id, by=owner.id) is True
    assert await messages.delete(third.id, by=owner.id) is False
    assert await messages.delete(fourth.id) is True  # the system
    assert await messages.delete(fourth.id) is False
    assert (await messages.history(room.id)).items == ()


# -- history ------------------------------------------------------------------------------


async def test_history_pages_and_cursors(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    room = await make_room(alice, bob)
    for i in range(1, 8):
        await messages.send(msg(room, alice if i % 2 else bob, f"m{i}"))

    newest = await messages.history(room.id, limit=3)
    assert [m.seq for m in newest.items] == [5, 6, 7]
    assert all(isinstance(m, MessageWithUser) for m in newest.items)
    assert newest.items[0].user.username == "alice"
    assert newest.items[1].user.username == "bob"
    assert newest.after is None
    assert newest.newest is not None
    assert newest.before is not None

    older = await messages.history(room.id, cursor=newest.before, limit=3)
    assert [m.seq for m in older.items] == [2, 3, 4]
    oldest = await messages.history(room.id, cursor=older.before, limit=3)
    assert [m.seq for m in oldest.items] == [1]
    assert oldest.before is None
    assert oldest.after is not None
    back = await messages.history(room.id, cursor=oldest.after, limit=3)
    assert [m.seq for m in back.items] == [2, 3, 4]

    # Catch-up after a known seq, and polling from `newest`.
    assert [m.seq for m in (await messages.history(room.id, after_seq=5)).items] == [6, 7]
    assert (await messages.history(room.id, cursor=newest.newest)).items == ()
    await messages.send(msg(room, alice, "m8"))
    polled = await messages.history(room.id, cursor=newest.newest)
    assert [m.seq for m in polled.items] == [8]
    empty_poll = await messages.history(room.id, cursor=polled.newest)
    assert empty_poll.items == ()
    assert empty_poll.newest == polled.newest

    assert [m.seq for m in (await messages.history(room.id, before_seq=3)).items] == [1, 2]
    assert [m.seq for m in (await messages.history(room.id, after_seq=0, limit=2)).items] == [1, 2]


async def test_history_around_an_anchor(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    sent = [await messages.send(msg(room, alice, f"m{i}")) for i in range(1, 11)]
    page = await messages.history(room.id, around=5, limit=4)
    assert [m.seq for m in page.items] == [3, 4, 5, 6]
    assert page.before is not None
    assert page.after is not None
    by_id = await messages.history(room.id, around=sent[4].id, limit=4)
    assert by_id.items == page.items
    start = await messages.history(room.id, around=1, limit=4)
    assert [m.seq for m in start.items] == [1, 2, 3, 4]
    assert start.before is None
    end = await messages.history(room.id, around=10, limit=6)
    assert [m.seq for m in end.items] == [5, 6, 7, 8, 9, 10]
    assert end.after is None
    assert end.before is not None
    whole = await messages.history(room.id, around=5, limit=20)
    assert [m.seq for m in whole.items] == list(range(1, 11))
    assert (whole.before, whole.after) == (None, None)
    past_the_end = await messages.history(room.id, around=99)
    assert [m.seq for m in past_the_end.items] == list(range(1, 11))
    assert past_the_end.after is None
    other_room = await make_room(alice, name="other")
    with pytest.raises(NotFound):
        await messages.history(other_room.id, around=sent[0].id)


async def test_history_input_rules(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    other = await make_room(alice, name="other")
    await messages.send(msg(room, alice))
    cursor = encode_cursor(room.id, 5, "before")
    assert decode_cursor(cursor) == (room.id, 5, "before")

    for bad in (0, 201, True, "50"):
        with pytest.raises(InvalidInput) as info:
            await messages.history(room.id, limit=bad)  # type: ignore[arg-type]
        assert info.value.field == "limit"
    with pytest.raises(InvalidInput, match="at most one"):
        await messages.history(room.id, cursor=cursor, after_seq=1)
    with pytest.raises(InvalidInput, match="another room"):
        await messages.history(other.id, cursor=cursor)
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[-6] ^= 1  # flip a bit of the seq
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    for bad_cursor in (tampered, "!!!", "", cursor[:-2], "A" * 70, cursor + "AAAA"):
        with pytest.raises(InvalidInput) as info:
            await messages.history(room.id, cursor=bad_cursor)
        assert info.value.field == "cursor"
    with pytest.raises(InvalidInput):
        await messages.history(room.id, after_seq=-1)
    with pytest.raises(InvalidInput):
        await messages.history(room.id, around="5")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await messages.history("room")  # type: ignore[arg-type]
    empty = await messages.history(other.id)
    assert (empty.items, empty.before, empty.after, empty.newest) == ((), None, None, None)


async def test_walk_ten_thousand_messages_both_ways(
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
    conn: asyncpg.Connection,
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    await fill_room(conn, room, alice, 10_000)
    # A few holes, as deletes leave them.
    await conn.execute(
        "DELETE FROM messages WHERE room_id = $1 AND seq = ANY($2::bigint[])",
        room.id,
        [1, 77, 5000, 9999],
    )
    expected = [s for s in range(1, 10_001) if s not in (1, 77, 5000, 9999)]

    backward: list[int] = []
    page = await messages.history(room.id, limit=200)
    pages = 1
    backward[:0] = [m.seq for m in page.items]
    while page.before is not None:
        page = await messages.history(room.id, cursor=page.before, limit=200)
        pages += 1
        backward[:0] = [m.seq for m in page.items]
    assert backward == expected
    assert pages == 50

    forward: list[int] = []
    page = await messages.history(room.id, after_seq=0, limit=200)
    forward.extend(m.seq for m in page.items)
    while page.after is not None:
        page = await messages.history(room.id, cursor=page.after, limit=200)
        forward.extend(m.seq for m in page.items)
    assert forward == expected


# -- read state ---------------------------------------------------------------------------


async def test_mark_read_moves_forward_only(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob, outsider = await make_user(), await make_user(), await make_user()
    room = await make_room(alice, bob)
    for i in range(10):
        await messages.send(msg(room, alice, f"m{i}"))
    assert await messages.mark_read(room.id, bob.id, 4) == 4
    assert await messages.mark_read(room.id, bob.id, 2) == 4  # never backward
    assert await messages.mark_read(room.id, bob.id, 50) == 10  # never past the newest
    assert await messages.unread_counts(bob.id) == {room.id: 0}
    await messages.send(msg(room, alice, "new"))
    assert await messages.unread_counts(bob.id) == {room.id: 1}
    assert await messages.mark_read(room.id, bob.id) == 11  # default: everything
    read_at = await db.fetchval(
        "t.at",
        "SELECT last_read_at FROM room_users WHERE room_id = $1 AND user_id = $2",
        room.id,
        bob.id,
    )
    assert read_at is not None
    await messages.mark_read(room.id, bob.id, 3)
    assert read_at == await db.fetchval(
        "t.at",
        "SELECT last_read_at FROM room_users WHERE room_id = $1 AND user_id = $2",
        room.id,
        bob.id,
    )
    with pytest.raises(PermissionDenied):
        await messages.mark_read(room.id, outsider.id)
    with pytest.raises(NotFound):
        await messages.mark_read(uuid.uuid4(), bob.id)
    with pytest.raises(InvalidInput):
        await messages.mark_read(room.id, bob.id, -3)


async def test_concurrent_mark_read_never_moves_backward(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, conn: asyncpg.Connection
) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    await fill_room(conn, room, alice, 500)
    rng = random.Random(7)
    targets = [rng.randint(1, 500) for _ in range(100)]
    observed: list[int] = []

    async def reader() -> None:
        for _ in range(30):
            value = await conn_value()
            observed.append(value)

    async def conn_value() -> int:
        value: int = await messages.db.fetchval(
            "t.watermark",
            "SELECT last_read_seq FROM room_users WHERE room_id = $1 AND user_id = $2",
            room.id,
            bob.id,
        )
        return value

    results = await asyncio.gather(
        reader(), *(messages.mark_read(room.id, bob.id, t) for t in targets)
    )
    assert observed == sorted(observed)
    assert await conn_value() == max(targets)
    for target, after in zip(targets, results[1:], strict=True):
        assert after is not None
        assert after >= target


async def test_receipts_only_ahead_of_the_watermark(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob, carol, outsider = [await make_user() for _ in range(4)]
    room = await make_room(alice, bob, carol)
    sent = [await messages.send(msg(room, alice, f"m{i}")) for i in range(5)]
    await messages.mark_read(room.id, bob.id, 2)
    assert await messages.mark_message_read(sent[0].id, bob.id) is False  # covered already
    assert await messages.mark_message_read(sent[3].id, bob.id) is True
    assert await messages.mark_message_read(sent[3].id, bob.id) is False  # exists already
    assert await db.fetchval("t.count", "SELECT count(*) FROM message_read_status") == 1
    with pytest.raises(NotFound):
        await messages.mark_message_read(uuid.uuid4(), bob.id)
    with pytest.raises(PermissionDenied):
        await messages.mark_message_read(sent[0].id, outsider.id)

    readers = await messages.read_by(sent[1].id)
    assert [r.user_id for r in readers] == [bob.id]  # the author is not listed
    readers = await messages.read_by(sent[3].id)
    assert [r.user_id for r in readers] == [bob.id]
    assert readers[0].read_at is not None
    assert await messages.read_by(sent[4].id) == []
    await messages.mark_read(room.id, carol.id)
    assert {r.user_id for r in await messages.read_by(sent[4].id)} == {carol.id}
    assert {r.user_id for r in await messages.read_by(sent[3].id)} == {bob.id, carol.id}
    with pytest.raises(NotFound):
        await messages.read_by(uuid.uuid4())


async def test_unread_counts_for_every_room_in_one_query(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob = await make_user(), await make_user()
    rooms = [await make_room(alice, bob, name=f"r{i}") for i in range(5)]
    for i, room in enumerate(rooms):
        for _ in range(i):
            await messages.send(msg(room, alice))
    db.reset_stats()
    counts = await messages.unread_counts(bob.id)
    assert sum(s.calls for s in db.stats.values()) == 1
    assert counts == {room.id: i for i, room in enumerate(rooms)}
    loner = await make_user()
    assert await messages.unread_counts(loner.id) == {}
    with pytest.raises(NotFound):
        await messages.unread_counts(uuid.uuid4())


async def test_author_profiles_are_shared_within_a_page(
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    room = await make_room(alice, bob)
    for user in (alice, bob, alice):
        await messages.send(msg(room, user))
    items = (await messages.history(room.id)).items
    assert items[0].user is items[2].user  # one object per author
    assert [m.user.username for m in items] == ["alice", "bob", "alice"]
    # No state outlives a page: the next page builds its own profiles.
    again = (await messages.history(room.id)).items
    assert again[0].user == items[0].user
    assert again[0].user is not items[0].user
    # A renamed author shows the new name at once.
    await messages.db.execute(
        "t.rename", "UPDATE users SET username = 'alicia' WHERE id = $1", alice.id
    )
    items = (await messages.history(room.id)).items
    assert items[0].user.username == "alicia"


async def test_history_rows_hold_exactly_their_fields(
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
) -> None:
    # Rows are built without validation: pin that they equal validated rows, field for
    # field, and carry nothing else (a stray column would become an attribute).
    alice = await make_user("alice")
    room = await make_room(alice)
    sent = await messages.send(msg(room, alice))
    [item] = (await messages.history(room.id)).items
    assert set(vars(item)) == {f.name for f in dataclasses.fields(MessageWithUser)}
    assert set(vars(sent)) == {f.name for f in dataclasses.fields(Message)}
    adapter = TypeAdapter(MessageWithUser)
    assert adapter.validate_python(adapter.dump_python(item)) == item
    assert item.user == UserProfile(id=alice.id, username="alice", avatar_url=None)
    assert Message(**{f: getattr(item, f) for f in vars(sent)}) == sent


def _parents_of_message_scans(node: dict[str, object], parent: str = "") -> list[str]:
    found = [parent] if node.get("Relation Name") == "messages" else []
    for child in node.get("Plans", []):  # type: ignore[attr-defined]
        found += _parents_of_message_scans(child, str(node["Node Type"]))
    return found


@pytest.mark.parametrize("which", ["HISTORY_BEFORE", "HISTORY_AFTER", "HISTORY_AROUND"])
async def test_history_limits_messages_before_joining_authors(
    conn: asyncpg.Connection, make_user: MakeUser, make_room: MakeRoom, which: str
) -> None:
    # The LIMIT must apply to the range scan itself: with the authors' join below it, a
    # small room in a table of big ones (a misestimate of its rows) got a hash join over
    # every older message and a sort.
    import json

    from chatkeep.storage import messages as queries

    author = await make_user()
    room = await make_room(author)
    await fill_room(conn, room, author, 500)
    await conn.execute("ANALYZE messages")
    args = [room.id, 250, 51] + ([51] if which == "HISTORY_AROUND" else [])
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {getattr(queries, which)}", *args)
    plan = json.loads(raw)[0]["Plan"]
    parents = _parents_of_message_scans(plan)
    assert parents
    assert set(parents) == {"Limit"}


# -- send_many: a batch in one statement ----------------------------------------------------


async def test_send_many_answers_each_message_and_stores_the_good_ones(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, bob, outsider = await make_user(), await make_user(), await make_user()
    room = await make_room(alice, bob)
    other = await make_room(bob)
    archived = await make_room(alice)
    await db.execute("t.archive", "UPDATE rooms SET is_active = false WHERE id = $1", archived.id)
    batch = [
        msg(room, alice, "one", client_msg_id="k-1"),
        msg(other, bob, "elsewhere"),
        msg(room, outsider, "let me in"),
        CreateMessageDto(room_id=uuid.uuid4(), user_id=alice.id, content="nowhere"),
        msg(archived, alice, "too late"),
        msg(room, bob, "two"),
        msg(room, alice, "one again", client_msg_id="k-1"),  # a retry inside the batch
    ]
    results = await messages.send_many(batch)
    assert len(results) == len(batch)
    one, elsewhere, denied, nowhere, late, two, again = results
    assert not isinstance(one, Exception)
    assert not isinstance(two, Exception)
    assert not isinstance(elsewhere, Exception)
    assert not isinstance(again, Exception)
    # Per room in the order given, gapless; each with its change-log position.
    assert (one[0].seq, two[0].seq, elsewhere[0].seq) == (1, 2, 1)
    assert one[1] is not None
    assert two[1] is not None
    assert two[1] > one[1]
    # The retry returns the first message, with no new position.
    assert again == (one[0], None)
    assert isinstance(denied, PermissionDenied)
    assert "members" in str(denied)
    assert isinstance(nowhere, NotFound)
    assert nowhere.entity == "room"
    assert isinstance(late, PermissionDenied)
    assert "archived" in str(late)
    assert await last_seq(db, room) == 2
    assert await last_seq(db, archived) == 0
    stored = await db.fetchval("t.count", "SELECT count(*) FROM messages")
    assert stored == 3
    # A retry in a later batch still returns the first message.
    (later,) = await messages.send_many([msg(room, alice, "one", client_msg_id="k-1")])
    assert later == (one[0], None)
    assert await messages.send_many([]) == []


async def test_a_row_that_raises_fails_only_itself(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice = await make_user()
    room = await make_room(alice)
    # A message the model would refuse, built without its checks: the table refuses it,
    # the whole statement fails, and each message is then sent alone.
    bad = CreateMessageDto.model_construct(
        room_id=room.id, user_id=alice.id, content=" ", type="text", client_msg_id=None
    )
    first, broken, last = await messages.send_many(
        [msg(room, alice, "before"), bad, msg(room, alice, "after")]
    )
    assert isinstance(broken, InvalidInput)
    assert not isinstance(first, Exception)
    assert not isinstance(last, Exception)
    assert (first[0].seq, last[0].seq) == (1, 2)
    assert await last_seq(db, room) == 2


async def test_send_many_refuses_bad_input(messages: MessageRepository) -> None:
    with pytest.raises(InvalidInput, match="dtos"):
        await messages.send_many("not a batch")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="dtos"):
        await messages.send_many([{"content": "x"}])  # type: ignore[list-item]
    dto = CreateMessageDto(room_id=uuid.uuid4(), user_id=uuid.uuid4(), content="x")
    with pytest.raises(InvalidInput, match="at most"):
        await messages.send_many([dto] * 1001)


async def test_inside_a_transaction_a_batch_sends_only_as_its_acting_user(
    app_url: str, make_user: MakeUser, make_room: MakeRoom
) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    async with Database(Settings(database_url=app_url), min_size=1, max_size=2) as app:
        repo = MessageRepository(app)
        async with app.acting_as(alice.id):
            sent = await repo.send(msg(room, alice, "mine"))
            # Another sender is refused and the block goes on acting as alice.
            with pytest.raises(PermissionDenied):
                await repo.send(msg(room, bob, "as bob"))
            who = await app.fetchval("t.who", "SELECT current_setting('app.user_id')")
            assert who == str(alice.id)
        # Outside a transaction the statement acts as each sender by itself, and the
        # setting ends with it.
        theirs = await repo.send(msg(room, bob, "bob's"))
        assert (sent.seq, theirs.seq) == (1, 2)
        assert await app.fetchval("t.who", "SELECT current_setting('app.user_id', true)") in (
            None,
            "",
        )
