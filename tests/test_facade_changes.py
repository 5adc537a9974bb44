"""The room change log through the facade: positions, changes(), reactions, retention.

Runs as ``chatapp_app`` (the ``chat`` fixture of test_facade), so row security binds every
read of the log, as in production.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResyncRequired,
    Settings,
)
from chatkeep.models import Change, ReactionCount, check_emoji
from chatkeep.realtime import (
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    RateLimit,
    ReactionAdded,
    ReactionRemoved,
)
from chatkeep.storage import Database
from chatkeep.storage.changes import ChangeRepository
from tests.test_facade import World, chat, expect, world

__all__ = ["chat", "world"]  # fixtures, imported for pytest


async def all_changes(chat: ChatKeep, room: uuid.UUID, user: uuid.UUID, after: int) -> list[Change]:
    items: list[Change] = []
    cursor: int | None = after
    while cursor is not None:
        page = await chat.changes(room, user, after=cursor, limit=3)
        items.extend(page.items)
        cursor = page.next_after
    return items


async def test_every_change_takes_the_next_position_and_its_event_carries_it(
    chat: ChatKeep, world: World
) -> None:
    room, alice, bob, carol = world.general.id, world.alice.id, world.bob.id, world.carol.id
    start = await chat.room_position(room, alice)
    sub = await chat.subscribe(room)
    message = await chat.send_message(room, bob, "hello")
    created = await expect(sub, MessageCreated)
    await chat.edit_message(message.id, bob, "hello, world")
    edited = await expect(sub, MessageEdited)
    assert await chat.react(message.id, alice, "👍")
    added = await expect(sub, ReactionAdded)
    assert not await chat.react(message.id, alice, "👍")  # already there: nothing new
    assert await chat.unreact(message.id, alice, "👍")
    removed = await expect(sub, ReactionRemoved)
    await chat.join(room, carol)
    joined = await expect(sub, MemberJoined)
    await chat.change_role(room, carol, "admin", by=alice)
    promoted = await expect(sub, MemberRoleChanged)
    await chat.leave(room, carol)
    left = await expect(sub, MemberLeft)
    await chat.delete_message(message.id, bob)
    deleted = await expect(sub, MessageDeleted)
    await sub.aclose()

    events = [created, edited, added, removed, joined, promoted, left, deleted]
    assert [e.position for e in events] == list(range(start + 1, start + 9))
    assert (added.count, removed.count, added.emoji) == (1, 0, "👍")
    assert await chat.room_position(room, alice) == start + 8

    changes = await all_changes(chat, room, alice, start)
    assert [c.position for c in changes] == list(range(start + 3, start + 9))
    # created and edited of the message deleted since are compacted away; its tombstone
    # says who deleted it, and the content is gone.
    assert [c.kind for c in changes] == [
        "reaction.added",
        "reaction.removed",
        "member.joined",
        "member.role_changed",
        "member.left",
        "message.deleted",
    ]
    tombstone = changes[-1]
    assert (tombstone.message_id, tombstone.seq, tombstone.actor_id) == (
        message.id,
        message.seq,
        bob,
    )
    assert tombstone.data == {}
    assert changes[0].data == {"user_id": alice, "emoji": "👍", "count": 1}
    assert changes[2].data == {"user_id": carol, "role": "member"}
    assert changes[3].data == {"user_id": carol, "role": "admin"}


async def test_changes_carry_the_message_as_it_is_now(chat: ChatKeep, world: World) -> None:
    room, bob = world.general.id, world.bob.id
    start = await chat.room_position(room, bob)
    message = await chat.send_message(room, bob, "draft", client_msg_id="c-1")
    again = await chat.send_message(room, bob, "draft", client_msg_id="c-1")
    assert again.id == message.id  # a retry logs nothing
    await chat.edit_message(message.id, bob, "final")
    page = await chat.changes(room, bob, after=start)
    assert [c.kind for c in page.items] == ["message.created", "message.edited"]
    assert page.position == start + 2
    assert page.next_after is None
    for change in page.items:
        assert change.message_id == message.id
        assert change.seq == message.seq
        assert change.data["content"] == "final"
        assert change.data["is_edited"] is True
        assert change.data["client_msg_id"] == "c-1"
        assert change.data["user_id"] == bob
    assert (await chat.changes(room, bob, after=start + 2)).items == []


async def test_a_removal_by_an_admin_is_logged_as_removed(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    start = await chat.room_position(room, world.alice.id)
    await chat.remove_member(room, world.bob.id, by=world.alice.id)
    (change,) = (await chat.changes(room, world.alice.id, after=start)).items
    assert (change.kind, change.actor_id) == ("member.removed", world.alice.id)
    assert change.data == {"user_id": world.bob.id, "role": "member"}


async def test_pages_of_changes_resume_where_they_stopped(chat: ChatKeep, world: World) -> None:
    room, bob = world.general.id, world.bob.id
    start = await chat.room_position(room, bob)
    for n in range(5):
        await chat.send_message(room, bob, f"m{n}")
    first = await chat.changes(room, bob, after=start, limit=2)
    assert [c.position for c in first.items] == [start + 1, start + 2]
    assert first.next_after == start + 2
    assert first.position == start + 5
    rest = await all_changes(chat, room, bob, start + 2)
    assert [c.data["content"] for c in rest] == ["m2", "m3", "m4"]


async def test_bad_positions_and_outsiders_are_refused(chat: ChatKeep, world: World) -> None:
    room, bob = world.general.id, world.bob.id
    head = await chat.room_position(room, bob)
    for after, rule in ((-1, "a position"), (head + 1, "future"), (True, "a position")):
        with pytest.raises(InvalidInput) as caught:
            await chat.changes(room, bob, after=after)
        assert caught.value.field == "after"
        assert rule in caught.value.rule
    for limit in (0, 1001, "10"):
        with pytest.raises(InvalidInput) as caught:
            await chat.changes(room, bob, after=0, limit=limit)  # type: ignore[arg-type]
        assert caught.value.field == "limit"
    # Outsiders see no room at all, public or not, and no position.
    with pytest.raises(NotFound, match="room not found"):
        await chat.changes(room, world.carol.id, after=0)
    with pytest.raises(NotFound, match="room not found"):
        await chat.room_position(room, world.carol.id)
    secret = await chat.create_room(
        CreateRoomDto(name="secret", type="private", created_by=world.alice.id)
    )
    with pytest.raises(NotFound, match="room not found"):
        await chat.changes(secret.id, bob, after=0)
    with pytest.raises(NotFound, match="room not found"):
        await chat.changes(uuid.uuid4(), bob, after=0)
    with pytest.raises(InvalidInput) as caught:
        await chat.changes("not-a-uuid", bob, after=0)  # type: ignore[arg-type]
    assert caught.value.field == "room_id"


async def test_pruned_changes_ask_the_client_to_resync(
    chat: ChatKeep, world: World, make_settings: Callable[..., Settings]
) -> None:
    room, bob = world.general.id, world.bob.id
    start = await chat.room_position(room, bob)
    for n in range(4):
        await chat.send_message(room, bob, f"m{n}")
    async with Database(make_settings()) as system:
        log = ChangeRepository(system)
        assert await log.prune() == 0  # no bound: nothing goes
        assert await log.prune(keep=2) >= 2
        with pytest.raises(InvalidInput):
            await log.prune(keep=0)
        with pytest.raises(InvalidInput):
            await log.prune(max_age=timedelta(0))
    with pytest.raises(ResyncRequired) as caught:
        await chat.changes(room, bob, after=start + 1)
    error = caught.value
    assert (error.room_id, error.oldest_position, error.position) == (
        room,
        start + 3,
        start + 4,
    )
    page = await chat.changes(room, bob, after=start + 2)  # the oldest one still kept
    assert [c.position for c in page.items] == [start + 3, start + 4]
    async with Database(make_settings()) as system:
        assert await ChangeRepository(system).prune(max_age=timedelta(microseconds=1)) >= 2
    with pytest.raises(ResyncRequired) as caught:
        await chat.changes(room, bob, after=start + 3)
    assert caught.value.oldest_position == start + 5
    assert (await chat.changes(room, bob, after=start + 4)).items == []


# -- reactions ----------------------------------------------------------------------------


async def test_reactions_are_counted_on_history_pages(chat: ChatKeep, world: World) -> None:
    room, alice, bob = world.general.id, world.alice.id, world.bob.id
    first = await chat.send_message(room, alice, "first")
    second = await chat.send_message(room, alice, "second")
    await chat.react(first.id, bob, "🎉")
    await chat.react(first.id, alice, "👍🏽")
    await chat.react(first.id, bob, "👍🏽")
    page = await chat.history(room, bob)
    by_id = {m.id: m for m in page.items}
    assert by_id[first.id].reactions == (
        ReactionCount(emoji="🎉", count=1, me=True),
        ReactionCount(emoji="👍🏽", count=2, me=True),
    )
    assert by_id[second.id].reactions == ()
    seen_by_alice = {m.id: m for m in (await chat.catch_up(room, alice, after_seq=0)).items}
    assert [r.me for r in seen_by_alice[first.id].reactions] == [False, True]


async def test_reactions_refuse_bad_emoji_and_invisible_messages(
    chat: ChatKeep, world: World, conn: asyncpg.Connection
) -> None:
    room, alice, bob, carol = world.general.id, world.alice.id, world.bob.id, world.carol.id
    message = await chat.send_message(room, alice, "hi")
    before = await conn.fetchval("SELECT count(*) FROM room_changes")
    for bad in ("", "a", "👍 ", "👍\n", "x👍", "👍" * 17, "\x00", 7, None):
        with pytest.raises(InvalidInput) as caught:
            await chat.react(message.id, bob, bad)  # type: ignore[arg-type]
        assert caught.value.field == "emoji"
    with pytest.raises(NotFound, match="message not found"):
        await chat.react(message.id, carol, "👍")  # not a member
    with pytest.raises(NotFound, match="message not found"):
        await chat.react(uuid.uuid4(), bob, "👍")
    with pytest.raises(InvalidInput):
        await chat.react("nope", bob, "👍")  # type: ignore[arg-type]
    await chat.delete_message(message.id, alice)
    with pytest.raises(NotFound, match="message not found"):
        await chat.react(message.id, bob, "👍")
    with pytest.raises(NotFound, match="message not found"):
        await chat.unreact(message.id, bob, "👍")
    assert await conn.fetchval("SELECT count(*) FROM room_changes") == before + 1  # the delete
    assert await conn.fetchval("SELECT count(*) FROM message_reactions") == 0


async def test_unreact_of_a_reaction_not_there_changes_nothing(
    chat: ChatKeep, world: World
) -> None:
    message = await chat.send_message(world.general.id, world.alice.id, "hi")
    start = await chat.room_position(world.general.id, world.bob.id)
    assert not await chat.unreact(message.id, world.bob.id, "👍")
    assert await chat.room_position(world.general.id, world.bob.id) == start


async def test_a_member_cannot_write_someone_elses_reaction(chat: ChatKeep, world: World) -> None:
    message = await chat.send_message(world.general.id, world.alice.id, "hi")
    with pytest.raises(PermissionDenied):
        async with chat.acting_as(world.bob.id):
            await chat.reactions.react(message.id, world.alice.id, "👍")


def test_the_emoji_rule() -> None:
    for good in (
        "👍",
        "👍🏽",
        "🇫🇷",
        "1️⃣",
        "#️⃣",
        "👨\u200d👩\u200d👧",
        "❤️",
        "🏴\U000e0067\U000e0062\U000e007f",
    ):
        assert check_emoji(good) == good
    for bad in ("1", "#", "\u200d", "a", "👍 ", "👍\t", "\ud83d", "👍" * 17, "\ue000"):
        with pytest.raises(InvalidInput):
            check_emoji(bad)


# -- compaction: a client's state from the log equals a fresh read -------------------------


State = dict[str, Any]


async def fresh_state(chat: ChatKeep, room: uuid.UUID, reader: uuid.UUID) -> tuple[int, State]:
    """The room as a client loads it: position first, then history and members."""
    position = await chat.room_position(room, reader)
    messages: dict[uuid.UUID, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        page = await chat.catch_up(
            room, reader, after_seq=0 if cursor is None else None, cursor=cursor, limit=200
        )
        for m in page.items:
            messages[m.id] = {
                "content": m.content,
                "is_edited": m.is_edited,
                "reactions": {r.emoji: (r.count, r.me) for r in m.reactions},
            }
        if page.after is None:
            break
        cursor = page.after
    async with chat.acting_as(reader):
        members = await chat.rooms.members(room)
    return position, {
        "messages": messages,
        "members": {m.user.id: m.role for m in members.members},
    }


def apply(state: State, change: Change, reader: uuid.UUID) -> None:
    """The reference client: apply one change (resulting state, so idempotent)."""
    messages, members = state["messages"], state["members"]
    data = change.data
    if change.kind in ("message.created", "message.edited"):
        entry = messages.setdefault(change.message_id, {"reactions": {}})
        entry["content"], entry["is_edited"] = data["content"], data["is_edited"]
    elif change.kind == "message.deleted":
        messages.pop(change.message_id, None)
    elif change.kind in ("reaction.added", "reaction.removed") and change.message_id in messages:
        reactions = messages[change.message_id]["reactions"]
        me = reactions.get(data["emoji"], (0, False))[1]
        if data["user_id"] == reader:
            me = change.kind == "reaction.added"
        if data["count"]:
            reactions[data["emoji"]] = (data["count"], me)
        else:
            reactions.pop(data["emoji"], None)
    elif change.kind in ("member.joined", "member.role_changed"):
        members[data["user_id"]] = data["role"]
    elif change.kind in ("member.left", "member.removed"):
        members.pop(data["user_id"], None)


UNLIMITED = RateLimit(limit=1_000_000, period=1.0, burst=1_000_000)
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["send", "send", "edit", "delete", "react", "react", "unreact", "join", "role", "leave"]
        ),
        st.integers(0, 2),  # who: alice (owner), bob, carol
        st.integers(0, 5),  # which message (index into those sent)
        st.sampled_from(["👍", "🎉"]),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, data=st.data())
async def test_changes_after_any_snapshot_rebuild_the_fresh_state(
    chat: ChatKeep, world: World, ops: list[tuple[str, int, int, str]], data: st.DataObject
) -> None:
    alice = world.alice.id
    chat = ChatKeep(chat.db, chat.redis, send_limit=UNLIMITED)
    room = (await chat.create_room(CreateRoomDto(name="log", created_by=alice))).id
    users = [alice, world.bob.id, world.carol.id]
    for user in users[1:]:
        await chat.join(room, user)
    sent: list[uuid.UUID] = []
    snapshots = [await fresh_state(chat, room, alice)]
    for op, who_index, which, emoji in ops:
        who = users[who_index]
        target = sent[which % len(sent)] if sent else None
        try:
            if op == "send":
                sent.append((await chat.send_message(room, who, f"m{len(sent)}")).id)
            elif op == "edit" and target is not None:
                await chat.edit_message(target, who, f"edited by {who_index}")
            elif op == "delete" and target is not None:
                await chat.delete_message(target, who)
            elif op == "react" and target is not None:
                await chat.react(target, who, emoji)
            elif op == "unreact" and target is not None:
                await chat.unreact(target, who, emoji)
            elif op == "join":
                await chat.join(room, who)
            elif op == "role" and who != alice:
                await chat.change_role(room, who, "admin", by=alice)
            elif op == "leave" and who != alice:
                await chat.leave(room, who)
        except (NotFound, PermissionDenied):
            pass  # not a member, not the author, already gone: nothing changes
        snapshots.append(await fresh_state(chat, room, alice))
    final_position, final = snapshots[-1]
    # From every snapshot, the log brings the client to the fresh state (and a snapshot
    # that already holds some of the changes it then applies ends the same).
    for position, state in snapshots:
        rebuilt = copy.deepcopy(state)
        for change in await all_changes(chat, room, alice, position):
            apply(rebuilt, change, alice)
        assert rebuilt == final, f"from position {position} of {final_position}"
    stale_position, _ = snapshots[data.draw(st.integers(0, len(snapshots) - 1))]
    _, newer_state = snapshots[-1]
    replayed = copy.deepcopy(newer_state)
    for change in await all_changes(chat, room, alice, stale_position):
        apply(replayed, change, alice)
    assert replayed == final
