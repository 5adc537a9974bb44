"""Read flows cost one round trip to PostgreSQL, with row security still binding them.

Every statement the facade's connections send is logged by asyncpg's query logger (BEGIN
and COMMIT included: the control below proves the logger sees them), so "one round trip"
is asserted as "exactly one statement, the flow's function, and no BEGIN/COMMIT".
The member cache is warmed first: its loader (a cache miss) is Redis-side work, not the
flow's own statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from redis.asyncio.connection import AbstractConnection

from chatkeep import (
    ChatKeep,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Settings,
    User,
)
from chatkeep.realtime import (
    EventSubscription,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    PresenceChanged,
    RedisClient,
    TypingChanged,
)
from chatkeep.storage import Database

ROUNDS = 10


@dataclass
class Logged:
    """The statements sent on the facade's connections since the last ``clear``."""

    queries: list[str]

    def clear(self) -> None:
        self.queries.clear()


@dataclass(frozen=True)
class Setup:
    chat: ChatKeep
    log: Logged
    alice: User
    bob: User
    carol: User
    room: uuid.UUID  # private: alice (owner) and bob
    public: uuid.UUID  # alice only


@pytest_asyncio.fixture(loop_scope="session")
async def setup(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[Setup]:
    log = Logged([])

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: log.queries.append(record.query))

    settings = make_settings(database_url=app_url)
    async with Database(settings, init=init) as db:
        client = RedisClient(redis_url)
        try:
            chat = ChatKeep(db, client, bcrypt_rounds=ROUNDS)
            users = [
                await chat.register(
                    CreateUserDto(email=f"{n}@example.org", username=n, password="correct horse")
                )
                for n in ("alice", "bob", "carol")
            ]
            alice, bob, carol = users
            room = await chat.create_room(
                CreateRoomDto(name="secret", type="private", created_by=alice.id)
            )
            await chat.join(room.id, bob.id, by=alice.id)
            public = await chat.create_room(CreateRoomDto(name="open", created_by=alice.id))
            for i in range(5):
                await chat.send_message(room.id, alice.id, f"m{i}")
            yield Setup(chat, log, alice, bob, carol, room.id, public.id)
        finally:
            await client.aclose()


async def next_event(sub: EventSubscription, within: float = 5.0) -> object:
    async with asyncio.timeout(within):
        item = await sub.get()
    assert item is not None, "subscription closed"
    return item


def only_statement(log: Logged, function: str) -> None:
    assert len(log.queries) == 1, log.queries
    assert function in log.queries[0], log.queries
    assert not any(q.lstrip().upper().startswith(("BEGIN", "COMMIT")) for q in log.queries)


async def test_the_logger_sees_a_transaction_round_trips(setup: Setup) -> None:
    """The control: the old path (acting_as, then the statement) logs three statements."""
    for _ in range(2):  # the first run also introspects the result's types
        setup.log.clear()
        async with setup.chat.acting_as(setup.bob.id):
            await setup.chat.messages.history(setup.room, limit=5)
    assert len(setup.log.queries) == 3, setup.log.queries
    assert setup.log.queries[0].startswith("BEGIN")
    assert setup.log.queries[-1].startswith("COMMIT")


async def test_history_and_catch_up_are_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    await chat.history(setup.room, setup.bob.id)  # the first call introspects types
    # An empty page asks the member cache who bob is (a page with rows needs not): warm it.
    assert await chat.members.is_member(setup.room, setup.bob.id)
    loads = chat.members.stats.loads
    log.clear()
    page = await chat.history(setup.room, setup.bob.id, limit=3)
    only_statement(log, "chatkeep_history_page(")
    assert [m.content for m in page.items] == ["m2", "m3", "m4"]
    assert page.before is not None
    assert page.after is None
    log.clear()
    older = await chat.history(setup.room, setup.bob.id, cursor=page.before, limit=3)
    only_statement(log, "chatkeep_history_page(")
    assert [m.content for m in older.items] == ["m0", "m1"]
    log.clear()
    around = await chat.history(setup.room, setup.bob.id, around=3, limit=2)
    only_statement(log, "chatkeep_history_page(")
    assert [m.seq for m in around.items] == [2, 3]
    log.clear()
    caught = await chat.catch_up(setup.room, setup.bob.id, after_seq=3)
    only_statement(log, "chatkeep_history_page(")
    assert [m.content for m in caught.items] == ["m3", "m4"]
    assert caught.after is None
    log.clear()
    assert (await chat.catch_up(setup.room, setup.bob.id, after_seq=2**63 - 1)).items == ()
    assert log.queries == []  # nothing can come after the largest seq: no statement at all
    assert chat.members.stats.loads == loads  # and bob's membership came from the cache


async def test_history_around_a_message_id_is_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    page = await chat.history(setup.room, setup.bob.id, limit=5)
    anchor = page.items[2]
    log.clear()
    around = await chat.history(setup.room, setup.bob.id, around=anchor.id, limit=2)
    only_statement(log, "chatkeep_history_around(")
    assert [m.id for m in around.items] == [page.items[1].id, anchor.id]
    assert around.before is not None
    assert around.after is not None
    with pytest.raises(NotFound) as missing:
        await chat.history(setup.room, setup.bob.id, around=uuid.uuid4(), limit=2)
    assert missing.value.entity == "message"
    # A message of another room is not "around" in this one.
    other = await chat.send_message(setup.public, setup.alice.id, "elsewhere")
    with pytest.raises(NotFound) as elsewhere:
        await chat.history(setup.room, setup.bob.id, around=other.id, limit=2)
    assert elsewhere.value.entity == "message"
    # The page's own transaction, acting as bob, still takes it (the same user).
    async with chat.acting_as(setup.bob.id):
        inside = await chat.messages.history(
            setup.room, around=anchor.id, limit=2, as_user=setup.bob.id
        )
    assert [m.id for m in inside.items] == [page.items[1].id, anchor.id]


async def test_reaction_counts_on_every_kind_of_page(setup: Setup) -> None:
    """017 counts a page's reactions in one scan: each message still gets its own."""
    chat, room, alice, bob = setup.chat, setup.room, setup.alice.id, setup.bob.id
    page = await chat.history(room, bob, limit=5)
    one, two = page.items[1], page.items[3]
    await chat.react(one.id, alice, "👍")
    await chat.react(one.id, bob, "👍")
    await chat.react(two.id, alice, "🎉")
    await chat.react(two.id, alice, "👍")
    pages = [
        await chat.history(room, bob, limit=5),
        await chat.history(room, bob, around=two.id, limit=5),
        await chat.history(room, bob, around=two.seq, limit=5),
        await chat.catch_up(room, bob, after_seq=0),
    ]
    for found in pages:
        by_id = {m.id: m for m in found.items}
        assert [(r.emoji, r.count, r.me) for r in by_id[one.id].reactions] == [("👍", 2, True)]
        assert [(r.emoji, r.count, r.me) for r in by_id[two.id].reactions] == [
            ("🎉", 1, False),
            ("👍", 1, False),
        ]
        assert all(m.reactions == () for m in found.items if m.id not in (one.id, two.id))


async def test_a_page_with_rows_asks_redis_nothing(setup: Setup) -> None:
    """A page with rows proves membership (017): not even a cold cache is consulted."""
    chat, log = setup.chat, setup.log
    await chat.history(setup.room, setup.bob.id, limit=2)  # the first calls introspect types
    await chat.catch_up(setup.room, setup.bob.id, after_seq=1, limit=2)
    await chat.redis.redis.flushdb()
    before = (chat.members.stats.hits, chat.members.stats.loads)
    log.clear()
    page = await chat.history(setup.room, setup.bob.id, limit=2)
    caught = await chat.catch_up(setup.room, setup.bob.id, after_seq=1, limit=2)
    assert len(log.queries) == 2, log.queries  # one statement each, no member-list load
    assert [m.seq for m in page.items] == [4, 5]
    assert [m.seq for m in caught.items] == [2, 3]
    assert (chat.members.stats.hits, chat.members.stats.loads) == before


async def test_empty_pages_keep_the_member_errors(setup: Setup) -> None:
    """Only an empty page asks who the caller is: member, outsider, or no room at all."""
    chat = setup.chat
    # A member's empty page is an empty page.
    assert (await chat.catch_up(setup.room, setup.bob.id, after_seq=5)).items == ()
    # carol cannot see the private room: the same NotFound as a made-up id.
    calls: list[Callable[[uuid.UUID], Awaitable[object]]] = [
        lambda room: chat.history(room, setup.carol.id),
        lambda room: chat.catch_up(room, setup.carol.id, after_seq=0),
        lambda room: chat.history(room, setup.carol.id, around=3),
    ]
    for call in calls:
        with pytest.raises(NotFound) as hidden:
            await call(setup.room)
        with pytest.raises(NotFound) as made_up:
            await call(uuid.uuid4())
        assert str(hidden.value) == str(made_up.value)
        assert hidden.value.entity == "room"
    # A message id in a room she cannot see: the room's NotFound, not the message's.
    anchor = (await chat.history(setup.room, setup.bob.id, limit=1)).items[0]
    with pytest.raises(NotFound) as hidden_anchor:
        await chat.history(setup.room, setup.carol.id, around=anchor.id)
    assert hidden_anchor.value.entity == "room"
    # A public room she is not in, with messages: visible, so a refusal.
    await chat.send_message(setup.public, setup.alice.id, "hello")
    with pytest.raises(PermissionDenied):
        await chat.history(setup.public, setup.carol.id)
    with pytest.raises(PermissionDenied):
        await chat.catch_up(setup.public, setup.carol.id, after_seq=0)


async def test_the_page_functions_prove_membership_under_any_role(
    setup: Setup, conn: asyncpg.Connection
) -> None:
    """As a role the policies do not confine, a non-member still gets nothing."""
    seen = "SELECT count(*) FROM messages WHERE room_id = $1"
    assert await conn.fetchval(seen, setup.room) == 5  # the role sees the room's every row
    anchor = (await setup.chat.history(setup.room, setup.bob.id, limit=1)).items[0]
    page = "SELECT count(*) FROM chatkeep_history_page($1, $2, 9223372036854775807, 10, 0)"
    around = "SELECT count(*) FROM chatkeep_history_around($1, $2, $3, 10, 10)"
    assert await conn.fetchval(page, setup.bob.id, setup.room) == 5
    assert await conn.fetchval(page, setup.carol.id, setup.room) == 0
    assert await conn.fetchval(around, setup.bob.id, setup.room, anchor.id) == 5
    assert await conn.fetchval(around, setup.carol.id, setup.room, anchor.id) == 0
    # The plan cache mode is the function's own: the session's is left as it was.
    assert await conn.fetchval("SHOW plan_cache_mode") == "auto"


async def test_mark_read_is_one_round_trip_and_keeps_its_errors(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    log.clear()
    assert await chat.mark_read(setup.room, setup.bob.id, 2) == 2
    only_statement(log, "chatkeep_mark_read(")
    log.clear()
    assert await chat.mark_read(setup.room, setup.bob.id) == 5
    only_statement(log, "chatkeep_mark_read(")
    # carol cannot see the private room: the same NotFound as a made-up id.
    with pytest.raises(NotFound) as hidden:
        await chat.mark_read(setup.room, setup.carol.id)
    with pytest.raises(NotFound) as made_up:
        await chat.mark_read(uuid.uuid4(), setup.carol.id)
    assert str(hidden.value) == str(made_up.value)
    # A public room she is not in: visible, so a refusal, not a NotFound.
    with pytest.raises(PermissionDenied):
        await chat.mark_read(setup.public, setup.carol.id)


async def test_rooms_of_is_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    log.clear()
    rooms = await chat.rooms_of(setup.bob.id)
    only_statement(log, "chatkeep_rooms_of(")
    assert [r.room.id for r in rooms] == [setup.room]
    assert rooms[0].last_message is not None
    assert rooms[0].last_message.content == "m4"
    assert await chat.rooms_of(setup.carol.id) == []
    with pytest.raises(NotFound):
        await chat.rooms_of(uuid.uuid4())


async def test_changes_and_room_position_are_one_round_trip(setup: Setup) -> None:
    chat, log = setup.chat, setup.log
    position = await chat.room_position(setup.room, setup.bob.id)  # warms the member cache
    log.clear()
    assert await chat.room_position(setup.room, setup.bob.id) == position
    only_statement(log, "chatkeep_room_position(")
    log.clear()
    page = await chat.changes(setup.room, setup.bob.id, after=0)
    only_statement(log, "chatkeep_changes(")
    assert page.position == position
    assert [c.kind for c in page.items].count("message.created") == 5
    with pytest.raises(NotFound):
        await chat.changes(setup.room, setup.carol.id, after=0)


async def test_repositories_refuse_to_act_for_someone_else(setup: Setup) -> None:
    chat = setup.chat
    with pytest.raises(InvalidInput) as exc:
        await chat.messages.mark_read(setup.room, setup.bob.id, as_user=setup.alice.id)
    assert exc.value.field == "as_user"
    with pytest.raises(InvalidInput) as exc:
        await chat.rooms.rooms_of(setup.bob.id, as_user=setup.alice.id)
    assert exc.value.field == "as_user"


# -- Database.fetch_as ------------------------------------------------------------------------

ROOMS_OF = "SELECT id FROM chatkeep_rooms_of($1, false)"


async def test_fetch_as_leaves_nothing_on_the_connection(
    setup: Setup, make_settings: Callable[..., Settings], app_url: str
) -> None:
    async with Database(make_settings(database_url=app_url), min_size=1, max_size=1) as db:
        rows = await db.fetch_as(setup.bob.id, "t.rooms", ROOMS_OF)
        assert [r["id"] for r in rows] == [setup.room]
        # The same, only connection: the user ended with the statement's own transaction.
        assert await db.fetchval("t.who", "SELECT chatkeep_acting_user_id()") is None
        assert await db.fetchval("t.count", "SELECT count(*) FROM messages") == 0
        row = await db.fetchrow_as(
            setup.bob.id, "t.pos", "SELECT chatkeep_room_position($1, $2)", setup.room
        )
        assert row is not None
        assert row[0] > 0
        assert await db.fetchval("t.who", "SELECT chatkeep_acting_user_id()") is None


async def test_fetch_as_joins_a_block_acting_as_the_same_user_only(
    setup: Setup, make_settings: Callable[..., Settings], app_url: str
) -> None:
    async with Database(make_settings(database_url=app_url), min_size=1, max_size=1) as db:
        async with db.acting_as(setup.bob.id):
            assert len(await db.fetch_as(setup.bob.id, "t.rooms", ROOMS_OF)) == 1
            with pytest.raises(InvalidInput, match="another user") as exc:
                await db.fetch_as(setup.alice.id, "t.rooms", ROOMS_OF)
            assert exc.value.field == "user_id"
        async with db.transaction():
            with pytest.raises(InvalidInput, match="no one"):
                await db.fetch_as(setup.bob.id, "t.rooms", ROOMS_OF)
        with pytest.raises(InvalidInput):
            await db.fetch_as("not-a-uuid", "t.rooms", ROOMS_OF)


async def test_the_functions_refuse_to_switch_the_acting_user(
    setup: Setup, make_settings: Callable[..., Settings], app_url: str
) -> None:
    """Called by hand in a transaction acting as alice, a flow function may not act as bob
    (the rest of the transaction would then run as bob)."""
    async with Database(make_settings(database_url=app_url), min_size=1, max_size=1) as db:
        with pytest.raises(PermissionDenied):
            async with db.acting_as(setup.alice.id):
                await db.fetch("t.switch", ROOMS_OF, setup.bob.id)
        with pytest.raises(InvalidInput):
            await db.fetch("t.nobody", ROOMS_OF, None)


async def test_membership_flows_are_one_round_trip_and_keep_their_errors(setup: Setup) -> None:
    chat, log, alice, bob, carol = setup.chat, setup.log, setup.alice, setup.bob, setup.carol
    log.clear()
    member = await chat.join(setup.public, carol.id)
    only_statement(log, "chatkeep_join(")
    assert (member.user_id, member.role) == (carol.id, "member")
    log.clear()
    assert await chat.join(setup.public, carol.id) == member  # already in: unchanged
    only_statement(log, "chatkeep_join(")
    log.clear()
    promoted = await chat.change_role(setup.public, carol.id, "admin", by=alice.id)
    only_statement(log, "chatkeep_change_role(")
    assert (promoted.role, promoted.joined_at) == ("admin", member.joined_at)
    log.clear()
    assert await chat.leave(setup.public, carol.id) is True
    only_statement(log, "chatkeep_remove_member(")
    log.clear()
    assert await chat.leave(setup.public, carol.id) is False
    only_statement(log, "chatkeep_remove_member(")
    # The position each returns is the one its change took in the room's log.
    joined, position = await chat.rooms.join_as(setup.public, bob.id, by=alice.id)
    assert joined.role == "member"
    assert position == await chat.room_position(setup.public, alice.id)
    removed, position = await chat.rooms.remove_member_as(setup.public, bob.id, by=alice.id)
    assert removed
    assert position == await chat.room_position(setup.public, alice.id)
    # The same refusals as before, with the same text.
    with pytest.raises(PermissionDenied, match=r"^only public rooms can be joined, as a member$"):
        await chat.join(setup.public, carol.id, role="admin")
    with pytest.raises(NotFound) as hidden:
        await chat.remove_member(setup.room, bob.id, by=carol.id)
    with pytest.raises(NotFound) as made_up:
        await chat.remove_member(uuid.uuid4(), bob.id, by=carol.id)
    assert str(hidden.value) == str(made_up.value) == "room not found"
    with pytest.raises(PermissionDenied, match=r"^only owners and admins may add members$"):
        await chat.join(setup.room, carol.id, by=bob.id)
    with pytest.raises(PermissionDenied, match=r"^only owners and admins may remove members$"):
        await chat.remove_member(setup.room, alice.id, by=bob.id)
    with pytest.raises(PermissionDenied, match=r"^the last owner cannot leave"):
        await chat.leave(setup.room, alice.id)
    with pytest.raises(PermissionDenied, match=r"^only owners and admins may change roles$"):
        await chat.change_role(setup.room, alice.id, "member", by=bob.id)
    with pytest.raises(PermissionDenied, match=r"^the last owner cannot be demoted"):
        await chat.change_role(setup.room, alice.id, "admin", by=alice.id)
    with pytest.raises(NotFound, match="is not a member of room"):
        await chat.change_role(setup.room, carol.id, "admin", by=alice.id)
    await chat.change_role(setup.room, bob.id, "admin", by=alice.id)
    with pytest.raises(PermissionDenied, match=r"^only owners may add admins or owners$"):
        await chat.join(setup.room, carol.id, role="admin", by=bob.id)
    with pytest.raises(PermissionDenied, match=r"^only owners may grant or revoke ownership$"):
        await chat.change_role(setup.room, alice.id, "admin", by=bob.id)
    with pytest.raises(PermissionDenied, match=r"^only owners may remove admins or owners"):
        await chat.remove_member(setup.room, alice.id, by=bob.id)
    with pytest.raises(InvalidInput, match="role"):
        await chat.join(setup.room, carol.id, role="king", by=alice.id)  # type: ignore[arg-type]
    # Inside a transaction acting as someone else, the repository refuses to act as ``by``.
    async with chat.acting_as(bob.id):
        with pytest.raises(InvalidInput, match="user_id"):
            await chat.rooms.join_as(setup.public, carol.id, by=carol.id)


@dataclass
class RedisTrips:
    """Guarded Redis operations, and the requests written to Redis, since ``clear``."""

    operations: list[str]
    sends: int = 0

    def clear(self) -> None:
        self.operations.clear()
        self.sends = 0


async def test_membership_flows_do_their_redis_work_in_one_round_trip(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 12: after the one SQL round trip, the member-cache invalidation, the event
    # (and for a leave the presence and typing clean-up) travel in one pipeline.
    chat, carol = setup.chat, setup.carol
    room = setup.public
    sub = await chat.subscribe(room)
    trips = RedisTrips([])
    send = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        trips.sends += 1
        await send(self, command, check_health)

    def timer(operation: str) -> contextlib.AbstractContextManager[object]:
        trips.operations.append(operation)
        return contextlib.nullcontext()

    try:
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
        chat.redis.command_timer = timer

        trips.clear()
        await chat.join(room, carol.id)
        assert (trips.operations, trips.sends) == (["facade.after_commit"], 1)
        assert isinstance(await next_event(sub), MemberJoined)
        assert await chat.members.is_member(room, carol.id)  # cached again: the join was seen

        trips.clear()
        await chat.change_role(room, carol.id, "admin", by=setup.alice.id)
        assert (trips.operations, trips.sends) == (["facade.after_commit"], 1)
        changed = await next_event(sub)
        assert isinstance(changed, MemberRoleChanged)
        assert changed.role == "admin"

        await chat.connect_socket(carol.id, "carol-1", rooms=[room])
        await chat.set_typing(room, carol.id)
        assert carol.id in await chat.presence.in_room(room)
        assert carol.id in await chat.typing.typers(room)
        assert await chat.members.is_member(room, carol.id)  # cached
        trips.clear()
        assert await chat.leave(room, carol.id) is True
        assert (trips.operations, trips.sends) == (["facade.after_commit"], 1)
        assert carol.id not in await chat.presence.in_room(room)
        assert carol.id not in await chat.typing.typers(room)
        assert not await chat.members.is_member(room, carol.id)  # the cached set was dropped
        seen = [await next_event(sub) for _ in range(3)]
        assert [type(e) for e in seen] == [PresenceChanged, TypingChanged, MemberLeft]
        left = seen[2]
        assert isinstance(left, MemberLeft)
        assert left.user_id == carol.id
        # The published mark moved with the event, as publish_many moves it.
        assert left.position is not None
        assert await chat.events.published(room) == left.position
    finally:
        chat.redis.command_timer = None
        await sub.aclose()


async def test_queueing_on_a_pipeline_checks_its_input_and_queues_nothing_bad(
    setup: Setup,
) -> None:
    chat = setup.chat
    pipe = chat.redis.pipeline()
    with pytest.raises(InvalidInput, match="events"):
        chat.events.queue_publish(pipe, "not events")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="event"):
        chat.events.queue_publish(pipe, [object()])  # type: ignore[list-item]
    with pytest.raises(InvalidInput, match="room_ids"):
        chat.members.queue_invalidate(pipe, setup.room, "not a uuid")  # type: ignore[arg-type]
    assert len(pipe) == 0
