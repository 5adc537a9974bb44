"""Write flows cost one round trip to PostgreSQL too (migration 018), with their old answers.

edit_message, delete_message, react / unreact, mark_thread_read and follow_thread /
unfollow_thread each send exactly one statement, their flow function, and no BEGIN/COMMIT
(asyncpg's query logger sees every statement: tests/test_facade_round_trips.py has the
control). Row security still binds them as the acting user: a member who is not the author
is refused, an outsider sees nothing, and the position each returns is the one its change
took in the room's log.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    CreateMessageDto,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Settings,
    User,
)
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from chatkeep.storage.messages import MessageRepository
from chatkeep.storage.reactions import ReactionRepository
from chatkeep.storage.threads import ThreadRepository

ROUNDS = 10


@dataclass
class Logged:
    queries: list[str]

    def clear(self) -> None:
        self.queries.clear()


@dataclass(frozen=True)
class Setup:
    chat: ChatKeep
    log: Logged
    alice: User  # owner of room
    bob: User  # member of room
    carol: User  # in no room
    room: uuid.UUID  # private


@pytest_asyncio.fixture(loop_scope="session")
async def setup(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[Setup]:
    log = Logged([])

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: log.queries.append(record.query))

    async with Database(make_settings(database_url=app_url), init=init) as db:
        client = RedisClient(redis_url)
        try:
            chat = ChatKeep(db, client, bcrypt_rounds=ROUNDS)
            alice, bob, carol = [
                await chat.register(
                    CreateUserDto(email=f"{n}@example.org", username=n, password="correct horse")
                )
                for n in ("alice", "bob", "carol")
            ]
            room = await chat.create_room(
                CreateRoomDto(name="secret", type="private", created_by=alice.id)
            )
            await chat.join(room.id, bob.id, by=alice.id)
            yield Setup(chat, log, alice, bob, carol, room.id)
        finally:
            await client.aclose()


def only_statement(log: Logged, function: str) -> None:
    assert len(log.queries) == 1, log.queries
    assert function in log.queries[0], log.queries
    assert not any(q.lstrip().upper().startswith(("BEGIN", "COMMIT")) for q in log.queries)


async def test_edit_is_one_round_trip_and_keeps_its_errors(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    sent = await chat.send_message(setup.room, setup.bob.id, "first")
    log.clear()
    edited = await chat.edit_message(sent.id, setup.bob.id, "second")
    only_statement(log, "chatkeep_edit_message(")
    assert (edited.id, edited.content, edited.is_edited, edited.seq) == (
        sent.id,
        "second",
        True,
        sent.seq,
    )
    assert edited.edited_at is not None
    # The position is the one the edit took: the room's head right after it.
    again, position = await chat.messages.edit_logged(sent.id, "third", by=setup.bob.id)
    assert again.content == "third"
    assert position == await chat.room_position(setup.room, setup.bob.id)
    page = await chat.changes(setup.room, setup.bob.id, after=position - 1)
    assert [(c.kind, c.message_id) for c in page.items] == [("message.edited", sent.id)]
    # A member who is not the author: refused, nothing changed.
    with pytest.raises(PermissionDenied):
        await chat.edit_message(sent.id, setup.alice.id, "hijacked")
    # An outsider: the same NotFound as a made-up id.
    with pytest.raises(NotFound) as hidden:
        await chat.edit_message(sent.id, setup.carol.id, "hijacked")
    with pytest.raises(NotFound) as made_up:
        await chat.edit_message(uuid.uuid4(), setup.carol.id, "hijacked")
    assert str(hidden.value) == str(made_up.value) == "message not found"
    with pytest.raises(InvalidInput) as bad:
        await chat.edit_message(sent.id, setup.bob.id, "   ")
    assert bad.value.field == "content"
    history = await chat.history(setup.room, setup.bob.id)
    assert [m.content for m in history.items if m.id == sent.id] == ["third"]


async def test_delete_is_one_round_trip_and_keeps_its_errors(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    mine = await chat.send_message(setup.room, setup.bob.id, "bob's")
    theirs = await chat.send_message(setup.room, setup.alice.id, "alice's")
    log.clear()
    # A member may not delete someone else's message.
    with pytest.raises(PermissionDenied):
        await chat.delete_message(theirs.id, setup.bob.id)
    only_statement(log, "chatkeep_delete_message(")
    # An outsider, or a made-up id: False, nothing published.
    assert await chat.delete_message(theirs.id, setup.carol.id) is False
    assert await chat.delete_message(uuid.uuid4(), setup.bob.id) is False
    # The room's owner may.
    before = await chat.room_position(setup.room, setup.alice.id)
    log.clear()
    assert await chat.delete_message(mine.id, setup.alice.id) is True
    only_statement(log, "chatkeep_delete_message(")
    assert await chat.delete_message(mine.id, setup.alice.id) is False  # already gone
    gone = await chat.messages.delete_logged(theirs.id, by=setup.alice.id)
    assert gone is not None
    room, seq, position = gone
    assert (room, seq) == (setup.room, theirs.seq)
    assert position == await chat.room_position(setup.room, setup.alice.id) == before + 2
    page = await chat.history(setup.room, setup.bob.id)
    assert {mine.id, theirs.id}.isdisjoint(m.id for m in page.items)


async def test_react_and_unreact_are_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    sent = await chat.send_message(setup.room, setup.alice.id, "react to me")
    log.clear()
    assert await chat.react(sent.id, setup.bob.id, "👍") is True
    only_statement(log, "chatkeep_react(")
    log.clear()
    assert await chat.react(sent.id, setup.bob.id, "👍") is False  # already there
    only_statement(log, "chatkeep_react(")
    change = await chat.reactions.react_logged(sent.id, setup.alice.id, "👍")
    assert change is not None
    assert (change.kind, change.room_id, change.message_id, change.seq) == (
        "reaction.added",
        setup.room,
        sent.id,
        sent.seq,
    )
    assert change.data["count"] == 2
    assert change.position == await chat.room_position(setup.room, setup.alice.id)
    log.clear()
    assert await chat.unreact(sent.id, setup.bob.id, "👍") is True
    only_statement(log, "chatkeep_react(")
    assert await chat.unreact(sent.id, setup.bob.id, "👍") is False
    removed = await chat.reactions.unreact_logged(sent.id, setup.alice.id, "👍")
    assert removed is not None
    assert (removed.kind, removed.data["count"]) == ("reaction.removed", 0)
    # An outsider: the same NotFound as a made-up id, for both.
    for call in (chat.react, chat.unreact):
        with pytest.raises(NotFound) as hidden:
            await call(sent.id, setup.carol.id, "👍")
        with pytest.raises(NotFound) as made_up:
            await call(uuid.uuid4(), setup.carol.id, "👍")
        assert str(hidden.value) == str(made_up.value) == "message not found"
    with pytest.raises(InvalidInput) as bad:
        await chat.react(sent.id, setup.bob.id, "not an emoji")
    assert bad.value.field == "emoji"
    page = await chat.history(setup.room, setup.bob.id)
    assert [m.reactions for m in page.items if m.id == sent.id] == [()]


async def test_thread_flows_are_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    root = await chat.send_message(setup.room, setup.alice.id, "a thread")
    reply = await chat.send_message(setup.room, setup.alice.id, "a reply", reply_to=root.id)
    log.clear()
    await chat.follow_thread(root.id, setup.bob.id)
    only_statement(log, "chatkeep_follow_thread(")
    followed = await chat.followed_threads(setup.bob.id)
    assert [t.thread.root_id for t in followed] == [root.id]
    log.clear()
    assert await chat.mark_thread_read(reply.id, setup.bob.id) == reply.seq  # the reply's root
    only_statement(log, "chatkeep_mark_thread_read(")
    log.clear()
    await chat.unfollow_thread(root.id, setup.bob.id)
    only_statement(log, "chatkeep_follow_thread(")
    assert await chat.followed_threads(setup.bob.id) == []
    # Marking read does not follow; the watermark never moves back.
    assert await chat.mark_thread_read(root.id, setup.bob.id) == reply.seq
    assert await chat.followed_threads(setup.bob.id) == []
    for call in (chat.follow_thread, chat.unfollow_thread, chat.mark_thread_read):
        with pytest.raises(NotFound) as hidden:
            await call(root.id, setup.carol.id)
        with pytest.raises(NotFound) as made_up:
            await call(uuid.uuid4(), setup.carol.id)
        assert str(hidden.value) == str(made_up.value) == "message not found"


async def test_the_functions_join_the_users_own_transaction_only(setup: Setup) -> None:
    chat = setup.chat
    sent = await chat.send_message(setup.room, setup.bob.id, "in a block")
    async with chat.acting_as(setup.bob.id):
        edited, position = await chat.messages.edit_logged(sent.id, "edited", by=setup.bob.id)
        change = await chat.reactions.react_logged(sent.id, setup.bob.id, "🎉")
        await chat.threads.follow(sent.id, setup.bob.id, as_user=setup.bob.id)
    assert edited.content == "edited"
    assert change is not None
    assert position is not None
    assert change.position == position + 1  # one transaction, two changes, in order
    with pytest.raises(InvalidInput) as other:
        async with chat.acting_as(setup.alice.id):
            await chat.messages.edit_logged(sent.id, "edited", by=setup.bob.id)
    assert other.value.field == "user_id"
    with pytest.raises(InvalidInput) as someone:
        await chat.threads.mark_read(sent.id, setup.bob.id, as_user=setup.alice.id)
    assert someone.value.field == "as_user"
    with pytest.raises(InvalidInput) as someone:
        await chat.threads.follow(sent.id, setup.bob.id, as_user=setup.alice.id)
    assert someone.value.field == "as_user"


async def test_nothing_is_left_on_the_connection(
    make_settings: Callable[..., Settings], app_url: str, setup: Setup
) -> None:
    # One connection: the next borrower after each flow function acts as no one.
    settings = make_settings(database_url=app_url, pool_min_size=1, pool_max_size=1)
    async with Database(settings) as db:
        messages, reactions = MessageRepository(db), ReactionRepository(db)
        sent = await messages.send(
            _dto(setup.room, setup.bob.id, "alone"),
        )
        await messages.edit_logged(sent.id, "alone, edited", by=setup.bob.id)
        assert await db.fetchval("t", "SELECT current_setting('app.user_id', true)") in ("", None)
        await reactions.react_logged(sent.id, setup.bob.id, "👍")
        assert await db.fetchval("t", "SELECT current_setting('app.user_id', true)") in ("", None)
        await ThreadRepository(db).mark_read(sent.id, setup.bob.id, as_user=setup.bob.id)
        assert await db.fetchval("t", "SELECT current_setting('app.user_id', true)") in ("", None)
        assert await messages.delete_logged(sent.id, by=setup.bob.id) is not None
        assert await db.fetchval("t", "SELECT current_setting('app.user_id', true)") in ("", None)
        # As no one, row security shows nothing.
        assert await db.fetchval("t", "SELECT count(*) FROM messages") == 0


async def test_the_one_round_trip_methods_refuse_citus_mode(
    make_settings: Callable[..., Settings], app_url: str
) -> None:
    # Refused before anything is sent (the database is never opened here).
    db = Database(make_settings(database_url=app_url, citus=True))
    user, key = uuid.uuid4(), uuid.uuid4()
    calls = [
        MessageRepository(db).edit_logged(key, "x", by=user),
        MessageRepository(db).delete_logged(key, by=user),
        ReactionRepository(db).react_logged(key, user, "👍"),
        ReactionRepository(db).unreact_logged(key, user, "👍"),
        ThreadRepository(db).mark_read(key, user, as_user=user),
        ThreadRepository(db).follow(key, user, as_user=user),
    ]
    for call in calls:
        with pytest.raises(ChatkeepError, match=r"not available with Settings\.citus"):
            await call


def _dto(room: uuid.UUID, user: uuid.UUID, content: str) -> CreateMessageDto:
    return CreateMessageDto(room_id=room, user_id=user, content=content)
