"""The facade's flows against real PostgreSQL and real Redis (or Valkey).

Events are checked in publish order: one client publishes them in order on one channel, so
"the next event is X" also proves that nothing was published before X.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    Conflict,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Room,
    Settings,
    Unavailable,
    UpdateUserDto,
    User,
)
from chatkeep.realtime import (
    EventSubscription,
    LoginThrottle,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    MessagesRead,
    PresenceChanged,
    RateLimit,
    RedisClient,
    RoomGap,
    TypingChanged,
)
from chatkeep.storage import Database
from tests.realtime.conftest import FAST, wait_until
from tests.servers import RedisServer

PASSWORD = "correct horse"
ROUNDS = 10  # bcrypt's minimum here: tests hash many passwords
E = TypeVar("E")


# -- fixtures ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade on this test's database and flushed Redis db, as node ``node-a``.

    It connects as ``chatapp_app``, as the library does in production: row security binds
    every flow (a superuser would bypass it and hide a flow that forgot its acting user).
    """
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(settings, node_id="node-a", bcrypt_rounds=ROUNDS) as facade:
        yield facade


MakeChat = Callable[..., Awaitable[ChatKeep]]


@pytest_asyncio.fixture(loop_scope="session")
async def make_chat(chat: ChatKeep, redis_url: str) -> AsyncIterator[MakeChat]:
    """More facades on the same database, each with a Redis client of its own (fast fails)."""
    clients: list[RedisClient] = []

    async def factory(url: str | None = None, **options: Any) -> ChatKeep:
        client = RedisClient(url or redis_url, **FAST, pubsub_ping_interval=0.5)
        clients.append(client)
        options.setdefault("bcrypt_rounds", ROUNDS)
        return ChatKeep(chat.db, client, **options)

    yield factory
    for client in clients:
        await client.aclose()


@dataclass(frozen=True)
class World:
    """alice owns the public room ``general``; bob is a member; carol is not."""

    alice: User
    bob: User
    carol: User
    general: Room


async def register(chat: ChatKeep, name: str, email: str | None = None) -> User:
    return await chat.register(
        CreateUserDto(email=email or f"{name}@example.org", username=name, password=PASSWORD)
    )


@pytest_asyncio.fixture(loop_scope="session")
async def world(chat: ChatKeep) -> World:
    alice, bob, carol = [await register(chat, name) for name in ("alice", "bob", "carol")]
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    await chat.join(general.id, bob.id)
    return World(alice, bob, carol, general)


async def next_event(sub: EventSubscription, within: float = 5.0) -> object:
    async with asyncio.timeout(within):
        item = await sub.get()
    assert item is not None, "subscription closed"
    return item


async def expect(sub: EventSubscription, kind: type[E], within: float = 5.0) -> E:
    item = await next_event(sub, within)
    assert isinstance(item, kind), f"expected {kind.__name__}, got {item!r}"
    return item


async def cached(chat: ChatKeep, key: str) -> bool:
    return bool(await chat.redis.redis.exists(key))


async def last_seq(chat: ChatKeep, room: Room) -> int:
    async with chat.acting_as(room.created_by):  # the creator sees their room
        return (await chat.rooms.get(room.id)).last_seq


# -- connecting -------------------------------------------------------------------------------


async def test_connect_opens_both_stores_and_reports_their_health(chat: ChatKeep) -> None:
    health = await chat.health()
    assert health.ok
    assert health.redis.latency_ms is not None
    assert health.database.latency_ms >= 0
    assert chat.node_id == "node-a"
    assert chat.db.is_open


async def test_bad_options_are_refused(chat: ChatKeep) -> None:
    with pytest.raises(InvalidInput) as caught:
        ChatKeep(chat.db, chat.redis, send_limit=30)  # type: ignore[arg-type]
    assert caught.value.field == "send_limit"
    with pytest.raises(InvalidInput) as caught:
        ChatKeep(chat.db, chat.redis, node_id="has space")
    assert caught.value.field == "node_id"
    with pytest.raises(InvalidInput) as caught:
        ChatKeep(chat.db, chat.redis, bcrypt_rounds=4)
    assert caught.value.field == "bcrypt_rounds"
    with pytest.raises(InvalidInput) as caught:
        ChatKeep(chat.db, chat.redis, presence_timeout=0)
    assert caught.value.field == "timeout"


async def test_the_node_id_defaults_to_the_host_name(chat: ChatKeep) -> None:
    import socket

    assert ChatKeep(chat.db, chat.redis).node_id == socket.gethostname()[:100]


# -- messages ---------------------------------------------------------------------------------


async def test_send_persists_then_publishes_the_message(chat: ChatKeep, world: World) -> None:
    sub = await chat.subscribe(world.general.id)
    message = await chat.send_message(world.general.id, world.bob.id, "hello", client_msg_id="c-1")
    assert (message.seq, message.content, message.user_id) == (1, "hello", world.bob.id)
    async with chat.acting_as(world.bob.id):
        stored = await chat.messages.get(message.id)
    assert stored == message
    event = await expect(sub, MessageCreated)
    assert (event.message_id, event.seq, event.sender_id) == (message.id, 1, world.bob.id)
    assert (event.body, event.client_msg_id, event.origin) == ("hello", "c-1", "node-a")
    # The sender's own message is not unread for them.
    assert (await chat.unread_counts(world.bob.id))[world.general.id] == 0
    assert (await chat.unread_counts(world.alice.id))[world.general.id] == 1
    await sub.aclose()


async def test_a_burst_is_rate_limited_with_retry_after(make_chat: MakeChat, world: World) -> None:
    limited = await make_chat(send_limit=RateLimit(limit=1, period=60.0, burst=3))
    for n in range(3):
        await limited.send_message(world.general.id, world.bob.id, f"burst {n}")
    with pytest.raises(RateLimited) as caught:
        await limited.send_message(world.general.id, world.bob.id, "one too many")
    assert 0 < caught.value.retry_after <= 60.0
    # Refused before PostgreSQL: nothing stored, no seq taken.
    assert await last_seq(limited, world.general) == 3
    # The limit is per user: alice still has her whole burst.
    await limited.send_message(world.general.id, world.alice.id, "mine")
    assert await last_seq(limited, world.general) == 4


async def test_a_repeated_client_msg_id_returns_the_first_message(
    chat: ChatKeep, world: World
) -> None:
    room = world.general.id
    first = await chat.send_message(room, world.bob.id, "once", client_msg_id="retry-1")
    sub = await chat.subscribe(room)
    again = await chat.send_message(room, world.bob.id, "once", client_msg_id="retry-1")
    assert again == first
    assert await last_seq(chat, world.general) == first.seq  # the seq did not advance
    # The retry publishes the same message again (a lost first publish is repaired).
    event = await expect(sub, MessageCreated)
    assert (event.message_id, event.seq) == (first.id, first.seq)
    # The same client id from another sender is another message, with the next seq.
    other = await chat.send_message(room, world.alice.id, "mine", client_msg_id="retry-1")
    assert (other.id != first.id, other.seq) == (True, first.seq + 1)
    page = await chat.catch_up(room, world.bob.id, after_seq=0)
    assert [m.seq for m in page.items] == [first.seq, other.seq]
    # Two racing first sends of one client id store one message and take one seq.
    raced = await asyncio.gather(
        *(chat.send_message(room, world.bob.id, "race", client_msg_id="race-1") for _ in range(4))
    )
    assert len({m.id for m in raced}) == 1
    assert raced[0].seq == other.seq + 1 == await last_seq(chat, world.general)
    await sub.aclose()


async def test_sending_requires_membership_and_an_existing_room(
    chat: ChatKeep, world: World
) -> None:
    with pytest.raises(PermissionDenied):
        await chat.send_message(world.general.id, world.carol.id, "let me in")
    with pytest.raises(NotFound):
        await chat.send_message(uuid.uuid4(), world.bob.id, "anyone?")
    assert await last_seq(chat, world.general) == 0


async def test_the_author_edits_and_others_may_not(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    message = await chat.send_message(room, world.bob.id, "helo")
    sub = await chat.subscribe(room)
    with pytest.raises(PermissionDenied):
        await chat.edit_message(message.id, world.alice.id, "vandalised")
    async with chat.acting_as(world.alice.id):
        assert (await chat.messages.get(message.id)).content == "helo"
    edited = await chat.edit_message(message.id, world.bob.id, "hello")
    assert (edited.content, edited.is_edited, edited.seq) == ("hello", True, message.seq)
    assert edited.edited_at is not None
    # The refused edit published nothing: the first event is the real edit.
    event = await expect(sub, MessageEdited)
    assert (event.message_id, event.editor_id, event.body) == (message.id, world.bob.id, "hello")
    with pytest.raises(NotFound):
        await chat.edit_message(uuid.uuid4(), world.bob.id, "ghost")
    await sub.aclose()


async def test_delete_by_author_or_room_owner_only(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    await chat.join(room, world.carol.id)
    bobs = await chat.send_message(room, world.bob.id, "bob's")
    carols = await chat.send_message(room, world.carol.id, "carol's")
    sub = await chat.subscribe(room)
    with pytest.raises(PermissionDenied):  # a plain member, not the author
        await chat.delete_message(bobs.id, world.carol.id)
    async with chat.acting_as(world.alice.id):
        assert await chat.messages.find_by_id(bobs.id) is not None
    assert await chat.delete_message(bobs.id, world.alice.id)  # the room's owner
    event = await expect(sub, MessageDeleted)
    assert (event.message_id, event.seq, event.deleted_by) == (bobs.id, bobs.seq, world.alice.id)
    assert await chat.delete_message(carols.id, world.carol.id)  # the author
    event = await expect(sub, MessageDeleted)
    assert (event.message_id, event.deleted_by) == (carols.id, world.carol.id)
    async with chat.acting_as(world.alice.id):
        assert await chat.messages.find_by_id(bobs.id) is None
    # Gone already, or never there: False, and nothing published.
    assert not await chat.delete_message(bobs.id, world.alice.id)
    assert not await chat.delete_message(uuid.uuid4(), world.alice.id)
    await chat.mark_read(room, world.bob.id)
    assert isinstance(await next_event(sub), MessagesRead)
    await sub.aclose()


async def test_mark_read_moves_the_watermark_and_publishes(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    for n in range(4):
        await chat.send_message(room, world.alice.id, f"news {n}")
    assert (await chat.unread_counts(world.bob.id))[room] == 4
    sub = await chat.subscribe(room)
    assert await chat.mark_read(room, world.bob.id, seq=2) == 2
    event = await expect(sub, MessagesRead)
    assert (event.user_id, event.last_read_seq) == (world.bob.id, 2)
    assert (await chat.unread_counts(world.bob.id))[room] == 2
    assert await chat.mark_read(room, world.bob.id, seq=1) == 2  # never backward
    assert await chat.mark_read(room, world.bob.id) == 4  # default: the newest
    assert (await chat.unread_counts(world.bob.id))[room] == 0
    assert (await expect(sub, MessagesRead)).last_read_seq == 2
    assert (await expect(sub, MessagesRead)).last_read_seq == 4
    with pytest.raises(PermissionDenied):
        await chat.mark_read(room, world.carol.id)
    with pytest.raises(NotFound):
        await chat.mark_read(uuid.uuid4(), world.bob.id)
    await sub.aclose()


async def test_catch_up_returns_everything_after_a_seq_exactly_once(
    chat: ChatKeep, world: World
) -> None:
    room = world.general.id
    sent = [await chat.send_message(room, world.alice.id, f"m{n}") for n in range(1, 9)]
    await chat.delete_message(sent[4].id, world.alice.id)  # seq 5 is skipped, not reused
    seen: list[int] = []
    page = await chat.catch_up(room, world.bob.id, after_seq=2, limit=2)
    pages = 1
    seen.extend(m.seq for m in page.items)
    while page.after is not None:
        page = await chat.catch_up(room, world.bob.id, cursor=page.after, limit=2)
        pages += 1
        seen.extend(m.seq for m in page.items)
    assert seen == [3, 4, 6, 7, 8]
    assert pages == 3
    assert page.items[-1].user.username == "alice"
    # Polling from the newest cursor: nothing yet, then exactly the new message.
    assert page.newest is not None
    empty = await chat.catch_up(room, world.bob.id, cursor=page.newest)
    assert empty.items == ()
    late = await chat.send_message(room, world.alice.id, "late")
    assert empty.newest is not None
    fresh = await chat.catch_up(room, world.bob.id, cursor=empty.newest)
    assert [m.id for m in fresh.items] == [late.id]


async def test_catch_up_checks_membership_and_positions(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    for n in range(3):
        await chat.send_message(room, world.alice.id, f"m{n}")
    with pytest.raises(PermissionDenied):
        await chat.catch_up(room, world.carol.id, after_seq=0)
    with pytest.raises(NotFound):
        await chat.catch_up(uuid.uuid4(), world.bob.id, after_seq=0)
    page = await chat.catch_up(room, world.bob.id, after_seq=1, limit=1)
    assert page.before is not None
    assert page.after is not None
    with pytest.raises(InvalidInput) as caught:  # a backward cursor is not a catch-up
        await chat.catch_up(room, world.bob.id, cursor=page.before)
    assert caught.value.field == "cursor"
    other = await chat.create_room(CreateRoomDto(name="other", created_by=world.bob.id))
    with pytest.raises(InvalidInput) as caught:
        await chat.catch_up(other.id, world.bob.id, cursor=page.after)
    assert caught.value.field == "cursor"


# -- membership: persisted, cache invalidated, published -----------------------------------


async def test_join_and_leave_invalidate_the_member_cache_and_publish(
    chat: ChatKeep, world: World
) -> None:
    room, carol = world.general.id, world.carol.id
    key = chat.members.cache.key(room)
    assert not await chat.members.is_member(room, carol)
    assert not await cached(chat, key)  # a non-member's view of the list is not shared
    assert await chat.members.is_member(room, world.bob.id)
    assert await cached(chat, key)  # a member's view is the whole list: cached
    sub = await chat.subscribe(room)

    member = await chat.join(room, carol)
    assert (member.role, member.user_id) == ("member", carol)
    assert await chat.members.is_member(room, carol)
    joined = await expect(sub, MemberJoined)
    assert (joined.user_id, joined.role) == (carol, "member")
    assert await chat.join(room, carol) == member  # again: the same membership

    await chat.connect_socket(carol, "carol-1", rooms=[room])
    await chat.set_typing(room, carol)
    assert await chat.members.is_member(room, carol)  # cached again
    assert await chat.leave(room, carol)
    assert not await chat.members.is_member(room, carol)
    assert carol not in await chat.presence.in_room(room)
    assert carol not in await chat.typing.typers(room)
    # (the second join published member.joined again; connect published presence)
    kinds = [type(await next_event(sub)) for _ in range(4)]
    assert kinds == [MemberJoined, PresenceChanged, TypingChanged, MemberLeft]
    assert not await chat.leave(room, carol)  # not a member: nothing to publish
    await chat.mark_read(room, world.bob.id)
    assert isinstance(await next_event(sub), MessagesRead)
    await sub.aclose()


async def test_removal_by_an_admin_invalidates_and_publishes(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    await chat.join(room, world.carol.id)
    everyone = {world.alice.id, world.bob.id, world.carol.id}
    assert await chat.members.members(room, asking=world.alice.id) == everyone
    with pytest.raises(PermissionDenied):  # a plain member removes no one
        await chat.remove_member(room, world.carol.id, by=world.bob.id)
    sub = await chat.subscribe(room)
    assert await chat.remove_member(room, world.carol.id, by=world.alice.id)
    assert await chat.members.members(room, asking=world.alice.id) == {
        world.alice.id,
        world.bob.id,
    }
    assert (await expect(sub, MemberLeft)).user_id == world.carol.id
    with pytest.raises(PermissionDenied):  # the last owner cannot go
        await chat.leave(room, world.alice.id)
    assert await chat.members.is_member(room, world.alice.id)
    await sub.aclose()


async def test_an_admin_added_by_the_owner_can_remove_members(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    await chat.join(room, world.carol.id, role="admin", by=world.alice.id)
    assert await chat.remove_member(room, world.bob.id, by=world.carol.id)
    assert not await chat.members.is_member(room, world.bob.id)


async def test_change_role_invalidates_and_publishes_the_new_role(
    chat: ChatKeep, world: World
) -> None:
    room = world.general.id
    key = chat.members.cache.key(room)
    await chat.members.members(room, asking=world.bob.id)
    assert await cached(chat, key)
    sub = await chat.subscribe(room)
    member = await chat.change_role(room, world.bob.id, "admin", by=world.alice.id)
    assert member.role == "admin"
    assert not await cached(chat, key)
    event = await expect(sub, MemberRoleChanged)
    assert (event.user_id, event.role) == (world.bob.id, "admin")
    assert event.position == await chat.room_position(room, world.bob.id)
    with pytest.raises(PermissionDenied):  # an admin may not make owners
        await chat.change_role(room, world.bob.id, "owner", by=world.bob.id)
    with pytest.raises(NotFound):
        await chat.change_role(room, world.carol.id, "admin", by=world.alice.id)
    await sub.aclose()


async def test_deleting_a_room_invalidates_and_tells_every_member(
    chat: ChatKeep, world: World
) -> None:
    room = world.general.id
    await chat.send_message(room, world.bob.id, "soon gone")
    assert await chat.members.is_member(room, world.bob.id)
    sub = await chat.subscribe(room)
    with pytest.raises(PermissionDenied):
        await chat.delete_room(room, by=world.bob.id)
    assert await chat.rooms.find_by_id(room) is not None
    assert await chat.delete_room(room, by=world.alice.id)
    assert await chat.rooms.find_by_id(room) is None
    with pytest.raises(NotFound):  # not a stale "member" from the cache
        await chat.members.is_member(room, world.bob.id)
    left = {(await expect(sub, MemberLeft)).user_id for _ in range(2)}
    assert left == {world.alice.id, world.bob.id}
    assert not await chat.delete_room(room, by=world.alice.id)
    assert not await chat.delete_room(uuid.uuid4())
    await sub.aclose()


async def test_system_acts_need_a_role_row_security_does_not_bind(
    chat: ChatKeep, world: World, make_settings: Callable[..., Settings]
) -> None:
    # As chatapp_app, a deletion by no one in particular is refused by the database.
    with pytest.raises(PermissionDenied):
        await chat.delete_room(world.general.id)
    with pytest.raises(NotFound):  # no one in particular sees no memberships
        await chat.change_role(world.general.id, world.bob.id, "admin")
    assert await chat.members.is_member(world.general.id, world.bob.id)
    # The test's own URL is a superuser's, like a maintenance job's: the system may.
    async with Database(make_settings()) as system_db:
        system = ChatKeep(system_db, chat.redis)
        assert (await system.change_role(world.general.id, world.bob.id, "admin")).role == "admin"
        assert await system.delete_room(world.general.id)
    assert await chat.unread_counts(world.bob.id) == {}


async def test_new_rooms_list_their_members(chat: ChatKeep, world: World) -> None:
    plans = await chat.create_room(
        CreateRoomDto(name="plans", type="private", created_by=world.alice.id)
    )
    assert await chat.members.members(plans.id, asking=world.alice.id) == {world.alice.id}
    with pytest.raises(NotFound):  # a private room is invisible to non-members
        await chat.join(plans.id, world.bob.id)
    await chat.join(plans.id, world.bob.id, by=world.alice.id)
    assert await chat.members.members(plans.id, asking=world.bob.id) == {
        world.alice.id,
        world.bob.id,
    }
    direct = await chat.open_direct(world.bob.id, world.carol.id)
    assert await chat.open_direct(world.carol.id, world.bob.id) == direct
    assert await chat.members.members(direct.id, asking=world.carol.id) == {
        world.bob.id,
        world.carol.id,
    }
    with pytest.raises(InvalidInput):
        await chat.join(direct.id, world.alice.id, by=world.bob.id)


# -- profiles: every write path invalidates ----------------------------------------------


async def test_update_profile_invalidates_the_cached_profile(chat: ChatKeep, world: World) -> None:
    bob = world.bob.id
    key = chat.profiles.key(bob)
    before = await chat.profile(bob)
    assert before is not None
    assert before.username == "bob"
    assert await cached(chat, key)
    assert (await chat.profile(bob)) == before
    hits = chat.profiles.stats.hits
    assert hits >= 1

    avatar = "https://example.org/bob.png"
    updated = await chat.update_profile(bob, UpdateUserDto(username="robert", avatar_url=avatar))
    assert updated.username == "robert"
    after = await chat.profile(bob)
    assert after is not None
    assert (after.username, after.avatar_url) == ("robert", avatar)
    assert (await chat.update_profile(bob, UpdateUserDto(avatar_url=None))).avatar_url is None
    cleared = await chat.profile(bob)
    assert cleared is not None
    assert (cleared.username, cleared.avatar_url) == ("robert", None)

    # A refused change leaves both stores as they were.
    with pytest.raises(Conflict):
        await chat.update_profile(bob, UpdateUserDto(username="alice"))
    assert await chat.profile(bob) == cleared
    with pytest.raises(NotFound):
        await chat.update_profile(uuid.uuid4(), UpdateUserDto(username="nobody"))


async def test_deactivation_invalidates_and_ends_every_session(
    chat: ChatKeep, world: World
) -> None:
    bob = world.bob.id
    login = await chat.login("bob@example.org", PASSWORD)
    assert login is not None
    assert await chat.sessions.validate(login.session.token) is not None
    assert await chat.profile(bob) is not None
    assert await cached(chat, chat.profiles.key(bob))
    loads = chat.profiles.stats.loads

    user = await chat.deactivate_user(bob)
    assert not user.is_active
    assert not await cached(chat, chat.profiles.key(bob))
    assert await chat.profile(bob) is not None  # authors stay visible
    assert chat.profiles.stats.loads == loads + 1  # read again from PostgreSQL
    assert await chat.sessions.validate(login.session.token) is None
    with pytest.raises(PermissionDenied):
        await chat.tokens.rotate(login.refresh.token)
    assert await chat.login("bob@example.org", PASSWORD) is None
    assert (await chat.deactivate_user(bob)).is_active is False  # idempotent
    with pytest.raises(NotFound):
        await chat.deactivate_user(uuid.uuid4())


async def test_a_password_change_ends_every_session(chat: ChatKeep, world: World) -> None:
    bob = world.bob.id
    first = await chat.login("bob@example.org", PASSWORD)
    assert first is not None
    with pytest.raises(PermissionDenied):
        await chat.change_password(bob, "wrong guess", "new battery staple")
    assert await chat.sessions.validate(first.session.token) is not None  # nothing changed

    await chat.change_password(bob, PASSWORD, "new battery staple")
    assert await chat.sessions.validate(first.session.token) is None
    with pytest.raises(PermissionDenied):
        await chat.tokens.rotate(first.refresh.token)
    assert await chat.login("bob@example.org", PASSWORD) is None
    assert await chat.login("bob@example.org", "new battery staple") is not None
    with pytest.raises(InvalidInput) as caught:
        await chat.change_password(bob, "new battery staple", "short")
    assert caught.value.field == "password"


# -- login ---------------------------------------------------------------------------------


async def test_login_starts_a_session_with_a_refresh_token(chat: ChatKeep, world: World) -> None:
    result = await chat.login("  Bob@Example.ORG ", PASSWORD)
    assert result is not None
    assert result.user.id == world.bob.id
    session = await chat.sessions.validate(result.session.token)
    assert session is not None
    assert session.user_id == world.bob.id
    assert result.refresh.user_id == world.bob.id
    rotated = await chat.tokens.rotate(result.refresh.token)
    assert rotated.family_id == result.refresh.family_id
    assert await chat.login("bob@example.org", "wrong guess") is None
    assert await chat.login("nobody@example.org", PASSWORD) is None
    assert await chat.login("bob@example.org", "x" * 73) is None  # no hash can match


async def test_repeated_failures_lock_the_account(chat: ChatKeep, world: World) -> None:
    chat.login_throttle = LoginThrottle(chat.redis, max_failures=3, lockout=60.0)
    for _ in range(3):
        assert await chat.login("bob@example.org", "wrong guess") is None
    with pytest.raises(RateLimited) as caught:  # even the right password, while locked
        await chat.login("BOB@example.org", PASSWORD)
    assert 50 < caught.value.retry_after <= 60
    # Other accounts are not affected.
    assert await chat.login("alice@example.org", PASSWORD) is not None
    await chat.unlock_login("bob@example.org")
    assert await chat.login("bob@example.org", PASSWORD) is not None


async def test_login_attempts_are_rate_limited(chat: ChatKeep, world: World) -> None:
    chat.login_throttle = LoginThrottle(
        chat.redis, max_failures=100, attempts=RateLimit(limit=2, period=60.0)
    )
    assert await chat.login("bob@example.org", PASSWORD) is not None
    assert await chat.login("bob@example.org", "wrong guess") is None
    with pytest.raises(RateLimited) as caught:
        await chat.login("bob@example.org", PASSWORD)
    assert caught.value.retry_after > 0


async def test_emails_that_are_not_valid_key_names_still_log_in(chat: ChatKeep) -> None:
    odd = "{odd}@example.org"
    long = "l" * 64 + "@" + ".".join(["d" * 60] * 3) + ".org"
    assert len(long) > 200
    chat.login_throttle = LoginThrottle(chat.redis, max_failures=1)
    for name, email in (("odd", odd), ("long", long)):
        user = await register(chat, name, email)
        result = await chat.login(email, PASSWORD)
        assert result is not None
        assert result.user.id == user.id
        assert await chat.login(email, "wrong guess") is None
        with pytest.raises(RateLimited):
            await chat.login(email, PASSWORD)
        await chat.unlock_login(email)
        assert await chat.login(email, PASSWORD) is not None


# -- sockets, presence, typing ------------------------------------------------------------


async def test_last_seen_is_written_on_going_offline_not_per_heartbeat(
    chat: ChatKeep, world: World
) -> None:
    bob, room = world.bob.id, world.general.id
    sub = await chat.subscribe(room)
    assert await chat.connect_socket(bob, "bob-phone", rooms=[room])
    assert not await chat.connect_socket(bob, "bob-laptop", rooms=[room])
    online = await expect(sub, PresenceChanged)
    assert (online.user_id, online.status, online.origin) == (bob, "online", "node-a")
    assert await chat.presence.in_room(room) == [bob]
    for _ in range(5):
        assert not await chat.heartbeat(bob, "bob-phone", rooms=[room])
        assert not await chat.heartbeat(bob, "bob-laptop", rooms=[room])
    assert (await chat.users.get(bob)).last_seen is None  # heartbeats wrote nothing

    assert await chat.disconnect_socket("bob-phone") is None  # still on the laptop
    assert (await chat.users.get(bob)).last_seen is None
    assert await chat.presence.is_online(bob)

    gone = await chat.disconnect_socket("bob-laptop")  # rooms come from the socket map
    assert gone is not None
    assert gone.user_id == bob
    last_seen = (await chat.users.get(bob)).last_seen
    assert last_seen is not None
    assert abs((last_seen - gone.last_seen).total_seconds()) < 5
    offline = await expect(sub, PresenceChanged)
    assert (offline.user_id, offline.status) == (bob, "offline")
    assert offline.last_seen == gone.last_seen
    assert not await chat.presence.is_online(bob)
    assert await chat.disconnect_socket("bob-laptop") is None  # unknown now
    await sub.aclose()


async def test_a_missed_last_seen_write_does_not_fail_the_disconnect(
    chat: ChatKeep, caplog: pytest.LogCaptureFixture
) -> None:
    ghost = uuid.uuid4()  # online in Redis, but no such row in PostgreSQL
    assert await chat.connect_socket(ghost, "ghost-1")
    gone = await chat.disconnect_socket("ghost-1")
    assert gone is not None
    assert gone.user_id == ghost
    assert f"last_seen of {ghost} not written" in caplog.text
    assert not await chat.presence.is_online(ghost)


async def test_sockets_only_join_rooms_of_their_user(chat: ChatKeep, world: World) -> None:
    carol, room = world.carol.id, world.general.id
    with pytest.raises(PermissionDenied):
        await chat.connect_socket(carol, "carol-1", rooms=[room])
    assert await chat.sockets.get("carol-1") is None  # nothing registered
    with pytest.raises(NotFound):
        await chat.connect_socket(carol, "carol-1", rooms=[uuid.uuid4()])
    assert await chat.connect_socket(carol, "carol-1")
    # A heartbeat naming a room the user is not in keeps them online, not in the room.
    assert not await chat.heartbeat(carol, "carol-1", rooms=[room, uuid.uuid4()])
    assert await chat.presence.is_online(carol)
    assert carol not in await chat.presence.in_room(room)
    # A removed member's client that keeps heartbeating does not reappear.
    await chat.connect_socket(world.bob.id, "bob-1", rooms=[room])
    await chat.remove_member(room, world.bob.id, by=world.alice.id)
    await chat.heartbeat(world.bob.id, "bob-1", rooms=[room])
    assert world.bob.id not in await chat.presence.in_room(room)


async def test_a_heartbeat_after_expiry_brings_the_user_back_online(
    make_chat: MakeChat, world: World
) -> None:
    quick = await make_chat(node_id="quick", presence_timeout=0.2)
    bob, room = world.bob.id, world.general.id
    sub = await quick.subscribe(room)
    assert await quick.connect_socket(bob, "bob-1", rooms=[room])
    assert (await expect(sub, PresenceChanged)).status == "online"
    await asyncio.sleep(0.3)
    # The sweep takes bob offline (once) and writes last_seen.
    swept = await quick.sweep_presence()
    assert [user.user_id for user in swept] == [bob]
    assert await quick.sweep_presence() == []
    assert (await quick.users.get(bob)).last_seen is not None
    assert await quick.heartbeat(bob, "bob-1", rooms=[room])
    event = await expect(sub, PresenceChanged)
    assert (event.user_id, event.status, event.origin) == (bob, "online", "quick")
    await sub.aclose()


async def test_typing_requires_membership_and_expires(make_chat: MakeChat, world: World) -> None:
    chat = await make_chat(typing_ttl=0.3)
    room = world.general.id
    sub = await chat.subscribe(room)
    with pytest.raises(PermissionDenied):
        await chat.set_typing(room, world.carol.id)
    with pytest.raises(NotFound):
        await chat.set_typing(uuid.uuid4(), world.bob.id)
    await chat.set_typing(room, world.bob.id)
    assert await chat.typing.typers(room) == [world.bob.id]
    event = await expect(sub, TypingChanged)  # the refused ones published nothing
    assert (event.user_id, event.typing) == (world.bob.id, True)
    await chat.set_typing(room, world.bob.id, typing=False)
    assert await chat.typing.typers(room) == []
    assert (await expect(sub, TypingChanged)).typing is False
    await chat.set_typing(room, world.alice.id)
    await asyncio.sleep(0.4)
    assert await chat.typing.typers(room) == []  # expired by itself
    await sub.aclose()


# -- input validation: only chatkeep errors, naming the field -----------------------------

RANDOM = uuid.uuid4()
Call = Callable[[ChatKeep, World], Awaitable[object]]
BAD_INPUT: list[tuple[str, Call]] = [
    ("room_id", lambda c, w: c.send_message("nope", w.bob.id, "hi")),  # type: ignore[arg-type]
    ("content", lambda c, w: c.send_message(w.general.id, w.bob.id, "  ")),
    ("content", lambda c, w: c.send_message(w.general.id, w.bob.id, None)),  # type: ignore[arg-type]
    (
        "client_msg_id",
        lambda c, w: c.send_message(w.general.id, w.bob.id, "x", client_msg_id="a b"),
    ),
    ("type", lambda c, w: c.send_message(w.general.id, w.bob.id, "x", type="video")),  # type: ignore[arg-type]
    ("message_id", lambda c, w: c.edit_message("x", w.bob.id, "t")),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.edit_message(RANDOM, 7, "t")),  # type: ignore[arg-type]
    ("content", lambda c, w: c.edit_message(RANDOM, w.bob.id, "")),
    ("message_id", lambda c, w: c.delete_message(None, w.bob.id)),  # type: ignore[arg-type]
    ("seq", lambda c, w: c.mark_read(w.general.id, w.bob.id, seq=-1)),
    ("seq", lambda c, w: c.mark_read(w.general.id, w.bob.id, seq="3")),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.mark_read(w.general.id, b"bob")),  # type: ignore[arg-type]
    ("after_seq", lambda c, w: c.catch_up(w.general.id, w.bob.id)),
    ("after_seq", lambda c, w: c.catch_up(w.general.id, w.bob.id, after_seq=1, cursor="x")),
    ("after_seq", lambda c, w: c.catch_up(w.general.id, w.bob.id, after_seq=-5)),
    ("cursor", lambda c, w: c.catch_up(w.general.id, w.bob.id, cursor="garbage!")),
    ("limit", lambda c, w: c.catch_up(w.general.id, w.bob.id, after_seq=0, limit=0)),
    ("limit", lambda c, w: c.catch_up(w.general.id, w.bob.id, after_seq=0, limit=201)),
    ("user_id", lambda c, w: c.join(w.general.id, "bob")),  # type: ignore[arg-type]
    ("role", lambda c, w: c.join(w.general.id, w.carol.id, role="king")),  # type: ignore[arg-type]
    ("by", lambda c, w: c.join(w.general.id, w.carol.id, by="alice")),  # type: ignore[arg-type]
    ("room_id", lambda c, w: c.leave(123, w.bob.id)),  # type: ignore[arg-type]
    ("by", lambda c, w: c.remove_member(w.general.id, w.bob.id, by=None)),  # type: ignore[arg-type]
    ("role", lambda c, w: c.change_role(w.general.id, w.bob.id, "boss")),  # type: ignore[arg-type]
    ("room_id", lambda c, w: c.delete_room("general")),  # type: ignore[arg-type]
    ("dto", lambda c, w: c.create_room({"name": "x"})),  # type: ignore[arg-type]
    ("user_b", lambda c, w: c.open_direct(w.bob.id, "carol")),  # type: ignore[arg-type]
    ("socket_id", lambda c, w: c.connect_socket(w.bob.id, "has space")),
    ("rooms", lambda c, w: c.connect_socket(w.bob.id, "s1", rooms=w.general.id)),  # type: ignore[arg-type]
    ("rooms", lambda c, w: c.connect_socket(w.bob.id, "s1", rooms=["general"])),  # type: ignore[list-item]
    ("user_id", lambda c, w: c.heartbeat("bob", "s1")),  # type: ignore[arg-type]
    ("socket_id", lambda c, w: c.heartbeat(w.bob.id, "")),
    ("socket_id", lambda c, w: c.disconnect_socket("a{b}")),
    ("rooms", lambda c, w: c.disconnect_socket("s1", rooms=5)),  # type: ignore[arg-type]
    ("typing", lambda c, w: c.set_typing(w.general.id, w.bob.id, typing="yes")),  # type: ignore[arg-type]
    ("room_id", lambda c, w: c.set_typing(None, w.bob.id)),  # type: ignore[arg-type]
    ("room_ids", lambda c, w: c.subscribe("general")),  # type: ignore[arg-type]
    ("email", lambda c, w: c.login("not-an-email", PASSWORD)),
    ("email", lambda c, w: c.login(None, PASSWORD)),  # type: ignore[arg-type]
    ("password", lambda c, w: c.login("bob@example.org", None)),  # type: ignore[arg-type]
    ("email", lambda c, w: c.unlock_login("nope")),
    ("dto", lambda c, w: c.register({"email": "x@y.org"})),  # type: ignore[arg-type]
    ("dto", lambda c, w: c.update_profile(w.bob.id, {"username": "x"})),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.update_profile("bob", UpdateUserDto())),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.deactivate_user(None)),  # type: ignore[arg-type]
    ("password", lambda c, w: c.change_password(w.bob.id, PASSWORD, "short")),
    ("current_password", lambda c, w: c.change_password(w.bob.id, None, "long enough")),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.profile("bob")),  # type: ignore[arg-type]
    ("user_id", lambda c, w: c.unread_counts(3.5)),  # type: ignore[arg-type]
]


async def test_bad_input_is_refused_naming_the_field(chat: ChatKeep, world: World) -> None:
    # One test over every case (a fresh database per case would cost more than the
    # checks): each failure is collected with its index, so all show at once.
    failures: list[str] = []
    for index, (field, call) in enumerate(BAD_INPUT):
        try:
            await call(chat, world)
        except InvalidInput as exc:
            if exc.field != field:
                failures.append(f"#{index}: field {exc.field!r}, expected {field!r}")
        except Exception as exc:  # anything but InvalidInput is the bug looked for
            failures.append(f"#{index}: raised {type(exc).__module__}.{type(exc).__name__}")
        else:
            failures.append(f"#{index}: accepted")
    assert failures == []
    # Nothing was half-written by any of them.
    assert await last_seq(chat, world.general) == 0
    assert await chat.members.members(world.general.id, asking=world.bob.id) == {
        world.alice.id,
        world.bob.id,
    }
    assert await chat.sockets.get("s1") is None
    bob = await chat.users.get(world.bob.id)
    assert (bob.username, bob.is_active) == ("bob", True)


async def test_history_and_room_lists_are_read_as_the_member(chat: ChatKeep, world: World) -> None:
    room = world.general.id
    sent = [await chat.send_message(room, world.alice.id, f"m{n}") for n in range(3)]
    page = await chat.history(room, world.bob.id, limit=2)
    assert [m.content for m in page.items] == ["m1", "m2"]
    assert {m.user.username for m in page.items} == {"alice"}
    assert page.before is not None
    older = await chat.history(room, world.bob.id, cursor=page.before)
    assert [m.id for m in older.items] == [sent[0].id]
    around = await chat.history(room, world.bob.id, around=sent[1].id, limit=3)
    assert [m.id for m in around.items] == [m.id for m in sent]
    with pytest.raises(PermissionDenied):  # carol is not a member
        await chat.history(room, world.carol.id)
    [summary] = await chat.rooms_of(world.bob.id)
    assert (summary.room.id, summary.unread_count) == (room, 3)
    assert summary.last_message is not None
    assert summary.last_message.id == sent[-1].id
    assert await chat.rooms_of(world.carol.id) == []
    # Row security itself, under the facade: a read of a room carol is not in returns
    # nothing, whatever the code asks for.
    async with chat.acting_as(world.carol.id):
        assert (await chat.messages.history(room)).items == ()
        assert await chat.messages.find_by_id(sent[0].id) is None


async def test_ids_may_be_given_as_strings(chat: ChatKeep, world: World) -> None:
    room, bob = str(world.general.id), str(world.bob.id)
    message = await chat.send_message(room, bob, "typed ids")  # type: ignore[arg-type]
    assert message.room_id == world.general.id
    assert await chat.mark_read(room, bob) == message.seq  # type: ignore[arg-type]
    page = await chat.catch_up(room, bob, after_seq=0)  # type: ignore[arg-type]
    assert [m.id for m in page.items] == [message.id]
    await chat.set_typing(room, bob)  # type: ignore[arg-type]
    assert await chat.typing.typers(world.general.id) == [world.bob.id]


async def test_flows_refuse_to_run_inside_a_transaction(chat: ChatKeep, world: World) -> None:
    async with chat.db.transaction():
        with pytest.raises(ChatkeepError, match=r"outside db\.transaction"):
            await chat.send_message(world.general.id, world.bob.id, "too early")
        with pytest.raises(ChatkeepError, match=r"outside db\.transaction"):
            await chat.join(world.general.id, world.carol.id)
        with pytest.raises(ChatkeepError, match=r"outside db\.transaction"):
            await chat.update_profile(world.bob.id, UpdateUserDto(username="robert"))
    assert await last_seq(chat, world.general) == 0
    assert not await chat.members.is_member(world.general.id, world.carol.id)


# -- Redis down: PostgreSQL writes continue -----------------------------------------------


async def test_writes_persist_and_reads_degrade_while_redis_is_down(
    chat: ChatKeep, make_chat: MakeChat, world: World, throwaway_redis: RedisServer
) -> None:
    down = await make_chat(throwaway_redis.url, node_id="node-down")
    room, bob, carol = world.general.id, world.bob.id, world.carol.id
    assert await down.profile(bob) is not None  # cached on the throwaway server
    assert not await down.members.is_member(room, carol)
    await asyncio.to_thread(throwaway_redis.stop)

    # Sends, reads and joins persist in PostgreSQL and return; nothing raises.
    first = await down.send_message(room, bob, "still here", client_msg_id="down-1")
    again = await down.send_message(room, bob, "still here", client_msg_id="down-1")
    assert again.id == first.id
    edited = await down.edit_message(first.id, bob, "still here!")
    assert edited.is_edited
    assert await down.mark_read(room, world.alice.id) == first.seq
    member = await down.join(room, carol)
    assert member.role == "member"
    async with chat.acting_as(bob):
        assert (await chat.messages.get(first.id)).content == "still here!"
    assert (await chat.unread_counts(world.alice.id))[room] == 0
    # Cached reads fall back to PostgreSQL (and see the writes made meanwhile).
    assert await down.members.is_member(room, carol)
    await down.update_profile(bob, UpdateUserDto(username="robert"))
    profile = await down.profile(bob)
    assert profile is not None
    assert profile.username == "robert"
    page = await down.catch_up(room, carol, after_seq=0)
    assert [m.id for m in page.items] == [first.id]
    assert await down.leave(room, carol)
    assert not await down.members.is_member(room, carol)
    assert await down.delete_message(first.id, bob)
    assert await down.unread_counts(bob) == {room: 0}

    # What lives only in Redis says so, as Unavailable.
    with pytest.raises(Unavailable):
        await down.set_typing(room, bob)
    with pytest.raises(Unavailable):
        await down.login("bob@example.org", PASSWORD)
    with pytest.raises(Unavailable):
        await down.connect_socket(bob, "bob-1", rooms=[room])
    with pytest.raises(Unavailable):
        await down.subscribe(room)
    with pytest.raises(Unavailable, match="call it again"):
        await down.deactivate_user(carol)
    assert not (await chat.users.get(carol)).is_active  # stored; revocation owed
    health = await down.health()
    assert not health.ok
    assert health.redis.error is not None

    # Back up: the unfinished revocation completes on a retry.
    await asyncio.to_thread(throwaway_redis.start)
    await down.deactivate_user(carol)
    assert (await down.health()).ok


async def test_a_redis_restart_during_a_subscription_loses_nothing(
    make_chat: MakeChat, world: World, throwaway_redis: RedisServer
) -> None:
    node = await make_chat(throwaway_redis.url, node_id="node-r")
    room, alice = world.general.id, world.alice.id
    sub = await node.subscribe(room)
    for n in range(2):
        await node.send_message(room, alice, f"before {n}")
    last = 0
    for _ in range(2):
        last = (await expect(sub, MessageCreated)).seq
    assert last == 2

    await asyncio.to_thread(throwaway_redis.stop)
    await wait_until(lambda: not node.redis.pubsub_connected)
    missed = [await node.send_message(room, alice, f"during {n}") for n in range(3)]
    assert [m.seq for m in missed] == [3, 4, 5]  # persisted; their publishes failed
    await asyncio.to_thread(throwaway_redis.start)

    gap = await expect(sub, RoomGap, within=15)
    assert gap.room_ids == {room}
    assert gap.reason == "reconnected"
    caught: list[int] = []
    page = await node.catch_up(room, world.bob.id, after_seq=last)
    caught.extend(m.seq for m in page.items)
    while page.after is not None:
        page = await node.catch_up(room, world.bob.id, cursor=page.after)
        caught.extend(m.seq for m in page.items)
    assert caught == [m.seq for m in missed]
    assert [m.content for m in page.items] == ["during 0", "during 1", "during 2"]
    # A caller that caught up says so; else the next event's position (past the ones it
    # never saw live) is reported as a gap of its own before the event, harmless but
    # one catch-up more.
    sub.advance(room, await node.room_position(room, world.bob.id))
    # And live delivery resumed.
    after = await node.send_message(room, alice, "after")
    assert (await expect(sub, MessageCreated)).seq == after.seq == 6
    await sub.aclose()


# -- two nodes ------------------------------------------------------------------------------


async def test_events_from_one_node_reach_the_other(
    chat: ChatKeep, make_chat: MakeChat, world: World
) -> None:
    other = await make_chat(node_id="node-b")
    room = world.general.id
    on_b = await other.subscribe(room)
    on_a = await chat.subscribe(room)
    message = await chat.send_message(room, world.bob.id, "from a")
    event = await expect(on_b, MessageCreated)
    assert (event.message_id, event.origin) == (message.id, "node-a")
    assert (await expect(on_a, MessageCreated)).message_id == message.id
    await other.join(room, world.carol.id)
    joined = await expect(on_a, MemberJoined)
    assert (joined.user_id, joined.origin) == (world.carol.id, "node-b")
    # node-a's membership cache saw node-b's invalidation (they share Redis).
    assert await chat.members.is_member(room, world.carol.id)
    # A socket connected on one node can be closed from the other.
    await chat.connect_socket(world.bob.id, "bob-a", rooms=[room])
    assert (await chat.sockets.get("bob-a")) is not None
    gone = await other.disconnect_socket("bob-a")
    assert gone is not None
    assert gone.user_id == world.bob.id
    assert (await other.users.get(world.bob.id)).last_seen is not None
    await on_a.aclose()
    await on_b.aclose()
