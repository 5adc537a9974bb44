"""What a user outside a room learns from the facade, whatever the membership cache holds.

The rule (docs/security.md): a room the user cannot see (a private or direct room they are
not in, or no room at all) is ``NotFound("room not found")`` from every flow, the same
text whether the room exists or not; a public room, which anyone may see, refuses a
non-member with ``PermissionDenied``. Neither answer may depend on whether a member has
just filled the cache, or the cache would tell an outsider which ids are private rooms.

Each flow that takes a room is called as the outsider three times: with the room's member
list not cached, again after a member filled it, and for a room id that does not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    CreateRoomDto,
    CreateUserDto,
    Message,
    NotFound,
    Settings,
    User,
)

PASSWORD = "correct horse"
ROUNDS = 10


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as ``chatapp_app``, so row security binds every flow."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(settings, node_id="node-a", bcrypt_rounds=ROUNDS) as facade:
        yield facade


@dataclass(frozen=True)
class Setup:
    """``room`` (of the kind under test) has ``owner`` and ``member``; ``outsider`` asks."""

    room: uuid.UUID
    owner: User
    member: User
    outsider: User
    message: Message


Kind = Literal["private", "direct", "removed", "public"]


async def register(chat: ChatKeep, name: str) -> User:
    return await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
    )


async def setup(chat: ChatKeep, kind: Kind) -> Setup:
    owner, member, outsider = [await register(chat, n) for n in ("olga", "mia", "otto")]
    if kind == "direct":
        room = (await chat.open_direct(owner.id, member.id)).id
    else:
        room_type = "public" if kind == "public" else "private"
        dto = CreateRoomDto(name="r", type=room_type, created_by=owner.id)
        room = (await chat.create_room(dto)).id
        await chat.join(room, member.id, by=owner.id)
        if kind == "removed":  # the outsider was a member once
            await chat.join(room, outsider.id, by=owner.id)
            await chat.send_message(room, outsider.id, "bye")
            await chat.remove_member(room, outsider.id, by=owner.id)
    message = await chat.send_message(room, owner.id, "hello")
    return Setup(room, owner, member, outsider, message)


Flow = Callable[[ChatKeep, Setup, uuid.UUID, uuid.UUID], Awaitable[object]]
"""Calls one flow as the outsider on a room id and a message id."""

FLOWS: dict[str, Flow] = {
    "history": lambda c, s, room, msg: c.history(room, s.outsider.id),
    "catch_up": lambda c, s, room, msg: c.catch_up(room, s.outsider.id, after_seq=0),
    "set_typing": lambda c, s, room, msg: c.set_typing(room, s.outsider.id),
    "connect_socket": lambda c, s, room, msg: c.connect_socket(s.outsider.id, "o-1", rooms=[room]),
    "send_message": lambda c, s, room, msg: c.send_message(room, s.outsider.id, "hi"),
    "mark_read": lambda c, s, room, msg: c.mark_read(room, s.outsider.id),
    "join_self": lambda c, s, room, msg: c.join(room, s.outsider.id),
    "join_other": lambda c, s, room, msg: c.join(room, uuid.uuid4(), by=s.outsider.id),
    "leave": lambda c, s, room, msg: c.leave(room, s.outsider.id),
    "remove_member": lambda c, s, room, msg: c.remove_member(room, s.member.id, by=s.outsider.id),
    "change_role": lambda c, s, room, msg: c.change_role(
        room, s.member.id, "admin", by=s.outsider.id
    ),
    "delete_room": lambda c, s, room, msg: c.delete_room(room, by=s.outsider.id),
    "members": lambda c, s, room, msg: c.members.members(room, asking=s.outsider.id),
    "edit_message": lambda c, s, room, msg: c.edit_message(msg, s.outsider.id, "mine now"),
    "delete_message": lambda c, s, room, msg: c.delete_message(msg, s.outsider.id),
}


async def outcome(call: Awaitable[object]) -> tuple[str, str]:
    """What the caller sees: the exception's type and text, or the value returned."""
    try:
        value = await call
    except ChatkeepError as exc:
        return type(exc).__name__, str(exc)
    return "returned", repr(value)


async def three_ways(chat: ChatKeep, s: Setup, name: str) -> list[tuple[str, str]]:
    """The flow's outcome with the cache cold, warm, and for a room that does not exist."""
    flow = FLOWS[name]
    assert await chat.members.invalidate(s.room)
    cold = await outcome(flow(chat, s, s.room, s.message.id))
    await chat.members.is_member(s.room, s.member.id)  # a member fills the cache
    assert await chat.redis.redis.exists(chat.members.cache.key(s.room))
    warm = await outcome(flow(chat, s, s.room, s.message.id))
    absent = await outcome(flow(chat, s, uuid.uuid4(), uuid.uuid4()))
    return [cold, warm, absent]


HIDDEN = ("NotFound", "room not found")
HIDDEN_MESSAGE = ("NotFound", "message not found")
# What a room the outsider cannot see answers, flow by flow (the same when it does not exist).
EXPECTED_HIDDEN: dict[str, tuple[str, str]] = {
    name: HIDDEN for name in FLOWS if name not in ("delete_room", "edit_message", "delete_message")
} | {
    "delete_room": ("returned", "False"),
    "edit_message": HIDDEN_MESSAGE,
    "delete_message": ("returned", "False"),
}


@pytest.mark.parametrize("kind", ["private", "direct", "removed"])
async def test_a_room_the_user_cannot_see_answers_as_if_it_did_not_exist(
    chat: ChatKeep, kind: Kind
) -> None:
    s = await setup(chat, kind)
    seen = {name: await three_ways(chat, s, name) for name in FLOWS}
    expected = {name: [EXPECTED_HIDDEN[name]] * 3 for name in FLOWS}
    assert seen == expected
    # Nothing the outsider tried was written.
    page = await chat.history(s.room, s.owner.id)
    assert [m.content for m in page.items][-1] == "hello"
    assert s.outsider.id not in await chat.members.members(s.room, asking=s.owner.id)
    assert await chat.sockets.get("o-1") is None


# A public room is no secret: a non-member is refused as such, the same way whatever the
# cache holds; a missing room is still NotFound.
EXPECTED_PUBLIC: dict[str, tuple[str, str]] = {
    "history": ("PermissionDenied", "only members of the room may do this"),
    "catch_up": ("PermissionDenied", "only members of the room may do this"),
    "set_typing": ("PermissionDenied", "only members of the room may do this"),
    "connect_socket": ("PermissionDenied", "only members of the room may do this"),
    "send_message": ("PermissionDenied", "only members may send to this room"),
    "mark_read": ("PermissionDenied", "only members have read state in this room"),
    "join_other": ("PermissionDenied", "only owners and admins may add members"),
    "leave": ("returned", "False"),
    "remove_member": ("PermissionDenied", "only owners and admins may remove members"),
    "change_role": ("PermissionDenied", "only owners and admins may change roles"),
    "delete_room": ("PermissionDenied", "only an owner may delete the room"),
    "members": ("returned", "frozenset()"),
    # A public room's messages, like its members, are its members' only (row security).
    "edit_message": HIDDEN_MESSAGE,
    "delete_message": ("returned", "False"),
}


async def test_a_public_room_refuses_a_non_member_the_same_way_whatever_is_cached(
    chat: ChatKeep,
) -> None:
    s = await setup(chat, "public")
    seen = {name: await three_ways(chat, s, name) for name in EXPECTED_PUBLIC}
    missing = {
        "leave": HIDDEN,
        "delete_room": ("returned", "False"),
        "edit_message": HIDDEN_MESSAGE,
        "delete_message": ("returned", "False"),
    }
    expected = {
        name: [answer, answer, missing.get(name, HIDDEN)]
        for name, answer in EXPECTED_PUBLIC.items()
    }
    assert seen == expected


async def test_a_member_still_reads_through_the_cache(chat: ChatKeep) -> None:
    s = await setup(chat, "private")
    await chat.set_typing(s.room, s.owner.id)  # fills the cache
    loads = chat.members.cache.stats.loads
    await chat.set_typing(s.room, s.member.id)
    await chat.catch_up(s.room, s.owner.id, after_seq=0)
    await chat.catch_up(s.room, s.member.id, after_seq=2**62)  # empty: asks the cache
    assert chat.members.cache.stats.loads == loads  # hits, no PostgreSQL read
    assert await chat.members.members(s.room, asking=s.member.id) == {s.owner.id, s.member.id}


async def test_no_such_room_is_not_found_with_the_entity(chat: ChatKeep) -> None:
    user = await register(chat, "solo")
    with pytest.raises(NotFound) as caught:
        await chat.history(uuid.uuid4(), user.id)
    assert caught.value.entity == "room"
