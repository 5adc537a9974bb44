"""Threads, mentions and badges (issue 14) through the facade, as chatapp_app, for real.

The thread state is kept by triggers (migration 015); these tests check each rule from the
caller's side: replies attach to their root, counts stay exact under concurrency, the
thread watermark never moves back, mentions resolve to members only, and every refusal is
a typed error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

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
    User,
)
from chatkeep.ids import uuid7
from chatkeep.models import Message, ThreadSummary
from chatkeep.realtime import MessageCreated

PASSWORD = "correct horse"


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as chatapp_app: row security binds every flow."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(settings, node_id="node-t", bcrypt_rounds=10) as facade:
        yield facade


class World:
    """alice owns the public room ``general`` (bob and dave are members); carol is not in
    it; ``other`` is alice's second room (bob is a member); ``secret`` is carol's private
    room."""

    def __init__(
        self, alice: User, bob: User, carol: User, dave: User, general: Room, other: Room,
        secret: Room,
    ) -> None:  # fmt: skip
        self.alice, self.bob, self.carol, self.dave = alice, bob, carol, dave
        self.general, self.other, self.secret = general, other, secret


async def register(chat: ChatKeep, name: str) -> User:
    return await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
    )


@pytest_asyncio.fixture(loop_scope="session")
async def world(chat: ChatKeep) -> World:
    alice, bob, carol, dave = [
        await register(chat, name) for name in ("alice", "bob", "carol", "dave")
    ]
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    other = await chat.create_room(CreateRoomDto(name="other", created_by=alice.id))
    secret = await chat.create_room(
        CreateRoomDto(name="secret", type="private", created_by=carol.id)
    )
    for room in (general, other):
        await chat.join(room.id, bob.id)
    await chat.join(general.id, dave.id)
    return World(alice, bob, carol, dave, general, other, secret)


async def root_and_reply(chat: ChatKeep, w: World) -> tuple[Message, Message]:
    root = await chat.send_message(w.general.id, w.alice.id, "a question")
    reply = await chat.send_message(w.general.id, w.bob.id, "an answer", reply_to=root.id)
    return root, reply


# -- threads --------------------------------------------------------------------------------


async def test_a_reply_joins_the_thread_of_its_root(chat: ChatKeep, world: World) -> None:
    w = world
    root, reply = await root_and_reply(chat, w)
    assert reply.reply_to == root.id
    assert reply.seq == root.seq + 1  # still a message of the room, next seq
    # A reply to a reply attaches to the root (one level).
    nested = await chat.send_message(w.general.id, w.dave.id, "me too", reply_to=reply.id)
    assert nested.reply_to == root.id

    summary = await chat.thread_summary(root.id, w.alice.id)
    assert summary is not None
    assert (summary.reply_count, summary.last_reply_seq) == (2, nested.seq)
    assert summary.participants == (w.bob.id, w.dave.id)
    assert summary.root_seq == root.seq

    page = await chat.thread(root.id, w.alice.id)
    assert [m.id for m in page.items] == [reply.id, nested.id]
    assert all(m.reply_to == root.id for m in page.items)
    # Replies are in the main timeline too, carrying reply_to.
    history = await chat.history(w.general.id, w.alice.id)
    assert [m.reply_to for m in history.items] == [None, root.id, root.id]
    # The room's thread list reads the summary.
    threads = await chat.room_threads(w.general.id, w.bob.id)
    assert [t.root_id for t in threads] == [root.id]
    # No replies yet: no summary.
    lone = await chat.send_message(w.general.id, w.alice.id, "no replies")
    assert await chat.thread_summary(lone.id, w.alice.id) is None


async def test_thread_pages_by_keyset_in_both_directions(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice.id, "root")
    replies = [
        await chat.send_message(w.general.id, w.bob.id, f"reply {i}", reply_to=root.id)
        for i in range(7)
    ]
    seqs = [r.seq for r in replies]
    newest = await chat.thread(root.id, w.bob.id, limit=3)
    assert [m.seq for m in newest.items] == seqs[-3:]
    assert newest.before is not None
    assert newest.after is None
    older = await chat.thread(root.id, w.bob.id, cursor=newest.before, limit=3)
    assert [m.seq for m in older.items] == seqs[1:4]
    oldest = await chat.thread(root.id, w.bob.id, cursor=older.before, limit=3)
    assert [m.seq for m in oldest.items] == seqs[:1]
    assert oldest.before is None
    after = await chat.thread(root.id, w.bob.id, after_seq=seqs[2], limit=2)
    assert [m.seq for m in after.items] == seqs[3:5]
    assert after.after is not None
    rest = await chat.thread(root.id, w.bob.id, cursor=after.after, limit=10)
    assert [m.seq for m in rest.items] == seqs[5:]
    around = await chat.thread(root.id, w.bob.id, around=seqs[3], limit=4)
    assert [m.seq for m in around.items] == seqs[1:5]
    before = await chat.thread(root.id, w.bob.id, before_seq=seqs[1], limit=5)
    assert [m.seq for m in before.items] == seqs[:1]
    # A cursor of another thread is refused.
    other = await chat.send_message(w.general.id, w.alice.id, "other root")
    await chat.send_message(w.general.id, w.bob.id, "x", reply_to=other.id)
    with pytest.raises(InvalidInput) as caught:
        await chat.thread(other.id, w.bob.id, cursor=newest.before)
    assert caught.value.field == "cursor"
    with pytest.raises(InvalidInput):
        await chat.thread(root.id, w.bob.id, before_seq=1, after_seq=2)
    with pytest.raises(InvalidInput):
        await chat.thread(root.id, w.bob.id, limit=0)


async def test_a_thread_page_shows_its_replies_reactions(chat: ChatKeep, world: World) -> None:
    # The page's reactions are read by room (`r.room_id = $1`, as room history): a thread
    # page once passed its root's id there and showed no reactions at all.
    w = world
    root = await chat.send_message(w.general.id, w.alice.id, "root")
    reply = await chat.send_message(w.general.id, w.bob.id, "reply", reply_to=root.id)
    assert await chat.react(reply.id, w.alice.id, "👍")
    assert await chat.react(reply.id, w.dave.id, "👍")
    page = await chat.thread(root.id, w.bob.id)
    [shown] = page.items
    assert [(r.emoji, r.count, r.me) for r in shown.reactions] == [("👍", 2, False)]
    mine = await chat.thread(root.id, w.alice.id)
    assert [(r.emoji, r.count, r.me) for r in mine.items[0].reactions] == [("👍", 2, True)]


async def test_twenty_concurrent_replies_give_an_exact_count(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice.id, "busy root")
    senders = [w.bob, w.dave, w.alice]
    # The per-user rate limit allows bursts of 20: spread over three senders anyway.
    replies = await asyncio.gather(
        *(
            chat.send_message(w.general.id, senders[i % 3].id, f"r{i}", reply_to=root.id)
            for i in range(20)
        )
    )
    summary = await chat.thread_summary(root.id, w.alice.id)
    assert summary is not None
    assert summary.reply_count == 20
    assert summary.last_reply_seq == max(r.seq for r in replies)
    assert sorted(summary.participants) == sorted({s.id for s in senders})
    page = await chat.thread(root.id, w.alice.id, limit=50)
    assert len(page.items) == 20
    # A deleted reply leaves the thread: one fewer, the last reply read back.
    last = max(replies, key=lambda r: r.seq)
    assert await chat.delete_message(last.id, last.user_id)
    summary = await chat.thread_summary(root.id, w.alice.id)
    assert summary is not None
    assert summary.reply_count == 19
    assert summary.last_reply_seq == sorted(r.seq for r in replies)[-2]


async def test_bad_replies_are_typed_errors(chat: ChatKeep, world: World) -> None:
    w = world
    in_other = await chat.send_message(w.other.id, w.alice.id, "elsewhere")
    # A message of another room the sender is in: the same-room rule.
    with pytest.raises(InvalidInput) as caught:
        await chat.send_message(w.general.id, w.bob.id, "x", reply_to=in_other.id)
    assert caught.value.field == "reply_to"
    # A message of a room the sender cannot see: not found, as if it did not exist.
    hidden = await chat.send_message(w.secret.id, w.carol.id, "private")
    with pytest.raises(NotFound) as hidden_error:
        await chat.send_message(w.general.id, w.bob.id, "x", reply_to=hidden.id)
    with pytest.raises(NotFound) as missing_error:
        await chat.send_message(w.general.id, w.bob.id, "x", reply_to=uuid7())
    assert str(hidden_error.value) == str(missing_error.value) == "reply_to: message not found"
    # A deleted message.
    gone = await chat.send_message(w.general.id, w.alice.id, "soon gone")
    assert await chat.delete_message(gone.id, w.alice.id)
    with pytest.raises(NotFound):
        await chat.send_message(w.general.id, w.bob.id, "x", reply_to=gone.id)
    with pytest.raises(InvalidInput) as bad_id:
        await chat.send_message(w.general.id, w.bob.id, "x", reply_to="nope")  # type: ignore[arg-type]
    assert bad_id.value.field == "reply_to"
    # Nothing was stored by any refused reply.
    history = await chat.history(w.general.id, w.bob.id)
    assert [m.content for m in history.items] == []
    # Thread reads of what the user cannot see are not found.
    with pytest.raises(NotFound):
        await chat.thread(hidden.id, w.bob.id)
    with pytest.raises(NotFound):
        await chat.mark_thread_read(hidden.id, w.bob.id)
    with pytest.raises(NotFound):
        await chat.follow_thread(hidden.id, w.bob.id)
    with pytest.raises(NotFound):
        await chat.thread_summary(uuid7(), w.bob.id)
    with pytest.raises(PermissionDenied):
        await chat.room_threads(w.general.id, w.carol.id)
    with pytest.raises(InvalidInput):
        await chat.room_threads(w.general.id, w.bob.id, limit=500)
    with pytest.raises(InvalidInput):
        await chat.followed_threads(w.bob.id, before="x")  # type: ignore[arg-type]


async def test_mark_thread_read_never_moves_back(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice.id, "root")
    marks: list[int] = []

    async def reply(i: int) -> None:
        await chat.send_message(w.general.id, w.bob.id, f"r{i}", reply_to=root.id)

    async def mark() -> None:
        for _ in range(10):
            marks.append(await chat.mark_thread_read(root.id, w.dave.id))
            await asyncio.sleep(0)

    await asyncio.gather(mark(), mark(), *(reply(i) for i in range(10)))
    final = await chat.mark_thread_read(root.id, w.dave.id)
    summary = await chat.thread_summary(root.id, w.dave.id)
    assert summary is not None
    assert final == summary.last_reply_seq
    assert all(m <= final for m in marks)
    # Each caller's own sequence of answers never decreases, and a later mark never
    # answers below an earlier one seen by anyone: the stored watermark only grows.
    assert await chat.mark_thread_read(root.id, w.dave.id) == final
    # Reading without following does not follow.
    assert [f.thread.root_id for f in await chat.followed_threads(w.dave.id)] == []


async def test_following_and_badges(chat: ChatKeep, world: World) -> None:
    w = world
    root, reply = await root_and_reply(chat, w)
    # alice wrote the root, bob replied: both follow; bob has read his own reply.
    followed = await chat.followed_threads(w.alice.id)
    assert [(f.thread.root_id, f.unread) for f in followed] == [(root.id, 1)]
    assert [(f.unread, f.last_read_seq) for f in await chat.followed_threads(w.bob.id)] == [
        (0, reply.seq)
    ]
    badges = await chat.badges(w.alice.id)
    general = badges[w.general.id]
    assert (general.unread, general.mentions, general.unread_threads) == (1, 0, 1)
    assert badges[w.other.id].unread == 0
    assert await chat.mark_thread_read(root.id, w.alice.id) == reply.seq
    assert (await chat.badges(w.alice.id))[w.general.id].unread_threads == 0
    # dave follows explicitly: from the last reply on.
    await chat.follow_thread(reply.id, w.dave.id)  # a reply's id names its root's thread
    assert (await chat.badges(w.dave.id))[w.general.id].unread_threads == 0
    await chat.send_message(w.general.id, w.bob.id, "more, @dave", reply_to=root.id)
    dave = (await chat.badges(w.dave.id))[w.general.id]
    assert (dave.unread_threads, dave.thread_mentions, dave.mentions) == (1, 1, 1)
    [entry] = await chat.followed_threads(w.dave.id, room_id=w.general.id)
    assert (entry.unread, entry.mentions) == (1, 1)
    assert await chat.followed_threads(w.dave.id, before=entry.thread) == []
    await chat.unfollow_thread(root.id, w.dave.id)
    assert (await chat.badges(w.dave.id))[w.general.id].unread_threads == 0
    assert await chat.followed_threads(w.dave.id) == []
    # unread_counts is unchanged: the plain room -> count mapping.
    counts = await chat.unread_counts(w.dave.id)
    assert counts[w.general.id] == (await chat.badges(w.dave.id))[w.general.id].unread


async def test_room_threads_page_by_last_reply(chat: ChatKeep, world: World) -> None:
    w = world
    roots = [await chat.send_message(w.general.id, w.alice.id, f"root {i}") for i in range(3)]
    for root in reversed(roots):
        await chat.send_message(w.general.id, w.bob.id, "r", reply_to=root.id)
    first = await chat.room_threads(w.general.id, w.bob.id, limit=2)
    assert [t.root_id for t in first] == [roots[0].id, roots[1].id]
    rest = await chat.room_threads(w.general.id, w.bob.id, before_seq=first[-1].last_reply_seq)
    assert [t.root_id for t in rest] == [roots[2].id]
    assert all(isinstance(t, ThreadSummary) for t in rest)


# -- mentions -------------------------------------------------------------------------------


async def test_mentions_resolve_to_members_only(chat: ChatKeep, world: World) -> None:
    w = world
    # carol exists but is not in general; "nobody" does not exist: both are ignored, and
    # nothing tells one case from the other.
    sent = await chat.send_message(
        w.general.id, w.bob.id, "hi @Alice, @carol and @nobody; @bob. @dave."
    )
    inbox = await chat.mentions(w.alice.id)
    assert [(m.message_id, m.room_wide, m.author_id) for m in inbox] == [(sent.id, False, w.bob.id)]
    assert [m.message_id for m in await chat.mentions(w.dave.id)] == [sent.id]
    assert await chat.mentions(w.carol.id) == []
    assert await chat.mentions(w.bob.id) == []  # your own name in your message
    async with chat.acting_as(w.bob.id):
        rows = await chat.db.fetch(
            "test.mentions", "SELECT user_id FROM message_mentions WHERE message_id = $1", sent.id
        )
    assert sorted(r["user_id"] for r in rows) == sorted([w.alice.id, w.dave.id])
    badges = await chat.badges(w.alice.id)
    assert badges[w.general.id].mentions == 1
    await chat.mark_read(w.general.id, w.alice.id)
    assert (await chat.badges(w.alice.id))[w.general.id].mentions == 0
    # An edit re-resolves: dave is no longer mentioned, carol still is not.
    await chat.edit_message(sent.id, w.bob.id, "hi @alice and @carol")
    assert await chat.mentions(w.dave.id) == []
    assert [m.message_id for m in await chat.mentions(w.alice.id)] == [sent.id]


async def test_room_mentions_follow_the_permission_rule(chat: ChatKeep, world: World) -> None:
    w = world
    from_member = await chat.send_message(w.general.id, w.bob.id, "@room look")
    assert await chat.mentions(w.dave.id) == []  # a member's @room is plain text
    from_owner = await chat.send_message(w.general.id, w.alice.id, "hey @here")
    inbox = await chat.mentions(w.dave.id)
    assert [(m.message_id, m.room_wide) for m in inbox] == [(from_owner.id, True)]
    assert await chat.mentions(w.alice.id) == []  # not your own room mention
    assert (await chat.badges(w.dave.id))[w.general.id].mentions == 1
    assert (await chat.badges(w.alice.id))[w.general.id].mentions == 0
    await chat.change_role(w.general.id, w.bob.id, "admin", by=w.alice.id)
    from_admin = await chat.send_message(w.general.id, w.bob.id, "@all: meeting")
    inbox = await chat.mentions(w.dave.id)
    assert [m.message_id for m in inbox] == [from_admin.id, from_owner.id]
    # Keyset paging of the inbox.
    page = await chat.mentions(w.dave.id, limit=1)
    assert [m.message_id for m in page] == [from_admin.id]
    rest = await chat.mentions(w.dave.id, before=page[-1].message_id)
    assert [m.message_id for m in rest] == [from_owner.id]
    assert from_member.id not in {m.message_id for m in rest}
    with pytest.raises(InvalidInput):
        await chat.mentions(w.dave.id, limit=0)


# -- events ---------------------------------------------------------------------------------


async def test_a_reply_is_published_with_its_root(chat: ChatKeep, world: World) -> None:
    w = world
    root = await chat.send_message(w.general.id, w.alice.id, "root")
    sub = await chat.subscribe(w.general.id)
    try:
        reply = await chat.send_message(w.general.id, w.bob.id, "@alice yes", reply_to=root.id)
        async with asyncio.timeout(5):
            event = await sub.get()
        assert isinstance(event, MessageCreated)
        assert (event.message_id, event.reply_to) == (reply.id, root.id)
    finally:
        await sub.aclose()


async def test_badges_answer_for_the_acting_user_only(chat: ChatKeep, world: World) -> None:
    w = world
    async with chat.acting_as(w.bob.id):
        with pytest.raises(PermissionDenied):
            await chat.threads.badges(w.alice.id)
    assert await chat.badges(uuid.uuid4()) == {}
    with pytest.raises(InvalidInput):
        await chat.badges("x")  # type: ignore[arg-type]


async def test_the_change_feed_carries_the_thread_root(chat: ChatKeep, world: World) -> None:
    w = world
    start = await chat.room_position(w.general.id, w.bob.id)
    root, reply = await root_and_reply(chat, w)
    page = await chat.changes(w.general.id, w.dave.id, after=start)
    created = {c.message_id: c.data["reply_to"] for c in page.items}
    assert created == {root.id: None, reply.id: root.id}


async def test_the_collapsed_history_shows_roots_with_their_summary(
    chat: ChatKeep, world: World
) -> None:
    w = world
    first = await chat.send_message(w.general.id, w.alice.id, "first")
    root, reply = await root_and_reply(chat, w)
    await chat.send_message(w.general.id, w.dave.id, "again", reply_to=root.id)
    last = await chat.send_message(w.general.id, w.bob.id, "last")
    page = await chat.collapsed_history(w.general.id, w.bob.id)
    assert [m.id for m in page.items] == [first.id, root.id, last.id]
    thread = page.items[1].thread
    assert thread is not None
    assert (thread.reply_count, thread.participants) == (2, (w.bob.id, w.dave.id))
    assert page.items[0].thread is None
    assert page.items[1].user.username == "alice"
    older = await chat.collapsed_history(w.general.id, w.bob.id, limit=2)
    assert [m.id for m in older.items] == [root.id, last.id]
    assert older.before is not None
    rest = await chat.collapsed_history(w.general.id, w.bob.id, cursor=older.before)
    assert [m.id for m in rest.items] == [first.id]
    after = await chat.collapsed_history(w.general.id, w.bob.id, after_seq=first.seq, limit=1)
    assert [m.id for m in after.items] == [root.id]
    assert after.after is not None
    tail = await chat.collapsed_history(w.general.id, w.bob.id, cursor=after.after)
    assert [m.id for m in tail.items] == [last.id]
    around = await chat.collapsed_history(w.general.id, w.bob.id, around=reply.seq, limit=2)
    assert [m.id for m in around.items] == [root.id, last.id]
    with pytest.raises(InvalidInput):
        await chat.collapsed_history(w.general.id, w.bob.id, before_seq=1, after_seq=1)
    await chat.send_message(w.other.id, w.bob.id, "elsewhere")
    other = await chat.collapsed_history(w.other.id, w.bob.id)
    assert other.newest is not None
    with pytest.raises(InvalidInput) as caught:
        await chat.collapsed_history(w.general.id, w.bob.id, cursor=other.newest)
    assert caught.value.field == "cursor"
    with pytest.raises(PermissionDenied):
        await chat.collapsed_history(w.general.id, w.carol.id)


async def test_a_deleted_reply_is_no_longer_unread(chat: ChatKeep, world: World) -> None:
    w = world
    root, _ = await root_and_reply(chat, w)
    await chat.mark_thread_read(root.id, w.alice.id)
    assert (await chat.badges(w.alice.id))[w.general.id].unread_threads == 0
    late = await chat.send_message(w.general.id, w.dave.id, "late, @alice", reply_to=root.id)
    room = (await chat.badges(w.alice.id))[w.general.id]
    assert (room.unread_threads, room.thread_mentions) == (1, 1)
    assert await chat.delete_message(late.id, w.dave.id)
    room = (await chat.badges(w.alice.id))[w.general.id]
    assert (room.unread_threads, room.thread_mentions) == (0, 0)
    [followed] = await chat.followed_threads(w.alice.id)
    assert (followed.unread, followed.thread.reply_count) == (0, 1)
