"""One plain test per wrong-type leak the bad-input suite found (issue 11 and after).

Each call used to raise a raw ``TypeError``, ``AttributeError``, ``ValueError``,
``UnicodeEncodeError`` (or to accept the value, or act on a default in its place); now it
raises ``InvalidInput`` naming the field, and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from chatkeep import InvalidInput, UpdateUserDto
from tests.fuzz.conftest import World, snapshot

Call = Callable[[World], Awaitable[object]]
PROFILE = UpdateUserDto(avatar_url="https://example.org/a.png")

CASES: dict[str, tuple[Call, str]] = {
    # issue 11, item 5
    "join role={}": (lambda w: w.chat.join(w.public.id, w.outsider.id, role={}), "role"),  # type: ignore[arg-type]
    "change_role role=[]": (
        lambda w: w.chat.change_role(w.public.id, w.member.id, [], by=w.owner.id),  # type: ignore[arg-type]
        "role",
    ),
    "limiter action={}": (lambda w: w.chat.limiter.check("u", {}), "action"),  # type: ignore[arg-type]
    "limiter limit='x'": (lambda w: w.chat.limiter.check("u", "send", limit="x"), "limit"),  # type: ignore[arg-type]
    "sessions metadata=b''": (
        lambda w: w.chat.sessions.create(w.member.id, metadata=b""),  # type: ignore[arg-type]
        "metadata",
    ),
    "sessions metadata=50": (
        lambda w: w.chat.sessions.create(w.member.id, metadata=50),  # type: ignore[arg-type]
        "metadata",
    ),
    # found by tests/fuzz
    "rooms_of include_inactive={}": (
        lambda w: w.chat.rooms_of(w.member.id, include_inactive={}),  # type: ignore[arg-type]
        "include_inactive",
    ),
    "change_password current lone surrogate": (
        lambda w: w.chat.change_password(w.member.id, "\ud800", "another horse"),
        "current_password",
    ),
    "change_password current over 72 bytes": (
        lambda w: w.chat.change_password(w.member.id, "x" * 73, "another horse"),
        "current_password",
    ),
    "authenticate lone surrogate, no account": (
        lambda w: w.repos.users.authenticate("nobody@example.org", "\ud800"),
        "password",
    ),
    "send_message client_msg_id=b'x'": (
        lambda w: w.chat.send_message(w.public.id, w.member.id, "hi", client_msg_id=b"x"),  # type: ignore[arg-type]
        "client_msg_id",
    ),
    "users.create dto={}": (lambda w: w.repos.users.create({}), "dto"),  # type: ignore[arg-type]
    "rooms.update dto={}": (lambda w: w.repos.rooms.update(w.public.id, {}), "dto"),  # type: ignore[arg-type]
    "users.update_profile user_id names user_id": (
        lambda w: w.repos.users.update_profile("nope", PROFILE),  # type: ignore[arg-type]
        "user_id",
    ),
    "touch_last_seen min_interval=nan": (
        lambda w: w.repos.users.touch_last_seen(w.member.id, min_interval=math.nan),
        "min_interval",
    ),
    "touch_last_seen min_interval=1e100": (
        lambda w: w.repos.users.touch_last_seen(w.member.id, min_interval=1e100),
        "min_interval",
    ),
    "touch_last_seen min_interval=True": (
        lambda w: w.repos.users.touch_last_seen(w.member.id, min_interval=True),
        "min_interval",
    ),
    "presence.connect rooms=5": (
        lambda w: w.chat.presence.connect(w.member.id, "s1", rooms=5),  # type: ignore[arg-type]
        "rooms",
    ),
    "presence.connect rooms=[[]]": (
        lambda w: w.chat.presence.connect(w.member.id, "s1", rooms=[[]]),  # type: ignore[list-item]
        "rooms",
    ),
    "presence.heartbeat_many beats=5": (
        lambda w: w.chat.presence.heartbeat_many(5),  # type: ignore[arg-type]
        "beats",
    ),
    "presence.online_among user_ids=5": (
        lambda w: w.chat.presence.online_among(5),  # type: ignore[arg-type]
        "user_ids",
    ),
    "presence.online_among user_ids=[[]]": (
        lambda w: w.chat.presence.online_among([[]]),  # type: ignore[list-item]
        "user_id",
    ),
    "presence.sweep limit=True": (lambda w: w.chat.presence.sweep(limit=True), "limit"),
    "sockets_of_node node_id=0": (
        lambda w: w.chat.sockets.sockets_of_node(0),  # type: ignore[arg-type]
        "node_id",
    ),
    "purge_node node_id=''": (lambda w: w.chat.sockets.purge_node(""), "node_id"),
    "events.publish event={}": (lambda w: w.chat.events.publish({}), "event"),  # type: ignore[arg-type]
    "events.publish_many events=5": (
        lambda w: w.chat.events.publish_many(5),  # type: ignore[arg-type]
        "events",
    ),
    "tokens.issue session_id lone surrogate": (
        lambda w: w.chat.tokens.issue(w.member.id, session_id="\ud800"),
        "session_id",
    ),
    "sessions.validate slide='yes'": (
        lambda w: w.chat.sessions.validate(w.session_token, slide="yes"),  # type: ignore[arg-type]
        "slide",
    ),
    "profiles.get loader=5 on a hit": (
        lambda w: w.chat.profiles.get(w.member.id, loader=5),  # type: ignore[arg-type]
        "loader",
    ),
    "profiles.get_many idents=5": (
        lambda w: w.chat.profiles.get_many(5),  # type: ignore[arg-type]
        "idents",
    ),
    "profiles.get_many idents=[[]]": (
        lambda w: w.chat.profiles.get_many([[]]),  # type: ignore[list-item]
        "id",
    ),
    "members.members asking='x' on a hit": (
        lambda w: w.chat.members.members(w.public.id, asking="x"),  # type: ignore[arg-type]
        "asking",
    ),
    "members.is_member user_id=[]": (
        lambda w: w.chat.members.is_member(w.public.id, []),  # type: ignore[arg-type]
        "user_id",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_wrong_value_is_invalid_input(
    case: str, world: World, snapshot_conn: asyncpg.Connection
) -> None:
    call, field = CASES[case]
    before = await snapshot(snapshot_conn, world.chat)
    with pytest.raises(InvalidInput) as raised:
        await call(world)
    assert raised.value.field == field
    after: dict[str, Any] = await snapshot(snapshot_conn, world.chat)
    assert {k: v for k, v in after.items() if k.startswith("table ")} == {
        k: v for k, v in before.items() if k.startswith("table ")
    }
    assert set(after) <= set(before)


async def test_a_falsy_node_id_no_longer_purges_this_node(world: World) -> None:
    # purge_node(0) fell back to this node (``node_id or self._node``) and purged it.
    await world.chat.sockets.register("kept", world.member.id)
    with pytest.raises(InvalidInput):
        await world.chat.sockets.purge_node(0)  # type: ignore[arg-type]
    assert await world.chat.sockets.get("kept") is not None


async def test_refresh_names_its_own_parameter(world: World) -> None:
    # The token store's error named its own parameter, ``token``.
    for bad in (object(), "not-a-token"):
        with pytest.raises(InvalidInput) as caught:
            await world.chat.refresh(bad)  # type: ignore[arg-type]
        assert caught.value.field == "refresh_token"
