"""The tutorial's code (docs/tutorial.md shows these sections verbatim), run for real.

The sections between ``--8<-- [start:NAME]`` and ``--8<-- [end:NAME]`` markers are pulled
into the tutorial by the docs build, so what readers copy is what this test runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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
    Settings,
    Unavailable,
)
from chatkeep.models import Change
from chatkeep.realtime import RateLimit
from chatkeep.stream import RoomReset

# --8<-- [start:errors]
STATUS = {InvalidInput: 400, PermissionDenied: 403, NotFound: 404, Conflict: 409}


def error_response(exc: ChatkeepError) -> dict[str, Any]:
    """One chatkeep error as an HTTP-style response (never the message's text)."""
    if isinstance(exc, RateLimited):
        return {"status": 429, "error": "slow down", "retry_after": exc.retry_after}
    if isinstance(exc, InvalidInput):
        return {"status": 400, "error": f"{exc.field}: {exc.rule}"}
    if isinstance(exc, Unavailable):
        return {"status": 503, "error": "try again shortly"}
    return {"status": STATUS.get(type(exc), 500), "error": str(exc)}


# --8<-- [end:errors]


# --8<-- [start:endpoint]
class ChatEndpoint:
    """The server side of a chat client: one call per request, errors as status codes.

    Mount ``handle`` on any framework: a FastAPI route, a socket.io event handler, an
    aiohttp WebSocket loop. The bearer token comes from ``chat.login``.
    """

    def __init__(self, chat: ChatKeep) -> None:
        self.chat = chat

    async def handle(self, token: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            session = await self.chat.sessions.validate(token)
            if session is None:
                return {"status": 401, "error": "log in again"}
            user_id = session.user_id
            match request:
                case {"op": "send", "room": room, "text": text, "client_id": client_id}:
                    # client_id makes a retried send return the first message, not a copy.
                    message = await self.chat.send_message(
                        room, user_id, text, client_msg_id=client_id
                    )
                    return {"status": 200, "id": str(message.id), "seq": message.seq}
                case {"op": "history", "room": room, "after": after}:
                    page = await self.chat.catch_up(room, user_id, after_seq=after)
                    return {
                        "status": 200,
                        "messages": [
                            {"seq": m.seq, "from": m.user.username, "text": m.content}
                            for m in page.items
                        ],
                        "more": page.after is not None,
                    }
                case {"op": "read", "room": room}:
                    return {"status": 200, "read_up_to": await self.chat.mark_read(room, user_id)}
                case {"op": "unread"}:
                    counts = await self.chat.unread_counts(user_id)
                    return {"status": 200, "unread": {str(r): n for r, n in counts.items()}}
                case _:
                    return {"status": 400, "error": "unknown request"}
        except ChatkeepError as exc:
            return error_response(exc)


# --8<-- [end:endpoint]


# --8<-- [start:stream]
async def stream_rooms(
    chat: ChatKeep,
    user_id: uuid.UUID,
    since: dict[uuid.UUID, int],
    push: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Push every change of a user's rooms to one client: in order, none missed, none twice.

    ``since`` maps each room to the last position the client has (0: everything from the
    room's start). It is kept up to date as changes go out, so a client that reconnects
    passes the same dict again and resumes exactly where it left off.
    """
    async with chat.stream(since, user_id, since=since) as stream:
        async for item in stream:
            room = str(item.room_id)
            if isinstance(item, Change):
                # Changes carry the resulting state: applying one twice is harmless.
                await push({"room": room, "kind": item.kind, "text": item.data.get("content")})
                since[item.room_id] = item.position
            elif isinstance(item, RoomReset):
                # The log no longer reaches back that far: reload the room (history).
                await push({"room": room, "kind": "reload"})
                since[item.room_id] = item.position
            else:  # RoomClosed: the user left, was removed, or the room was deleted
                await push({"room": room, "kind": "closed"})
                del since[item.room_id]


# --8<-- [end:stream]


# -- the tutorial's walk-through, as a test ------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    # This test's database (as chatapp_app, the role production uses) and Redis.
    settings = make_settings(database_url=app_url)
    # --8<-- [start:connect]
    async with ChatKeep.connect(
        settings,  # Settings() reads DATABASE_URL and REDIS_URL; unset means embedded
        send_limit=RateLimit(limit=5, period=60.0),  # per user; the default is 30 per 10 s
        bcrypt_rounds=10,  # the minimum; keep the default (12) in production
    ) as chat:
        # --8<-- [end:connect]
        yield chat


async def test_the_tutorial(chat: ChatKeep, database_url: str, redis_url: str) -> None:
    # --8<-- [start:setup]
    alice = await chat.register(
        CreateUserDto(email="alice@example.org", username="alice", password="correct horse")
    )
    bob = await chat.register(
        CreateUserDto(email="bob@example.org", username="bob", password="battery staple")
    )
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    await chat.join(general.id, bob.id)

    login = await chat.login("alice@example.org", "correct horse")
    assert login is not None  # None: wrong email or password (same answer for both)
    alice_token = login.session.token
    # --8<-- [end:setup]
    bob_login = await chat.login("bob@example.org", "battery staple")
    assert bob_login is not None
    bob_token = bob_login.session.token
    assert await chat.login("alice@example.org", "wrong") is None

    endpoint = ChatEndpoint(chat)

    # bob listens before anything is sent; what he receives is checked at the end.
    received: list[dict[str, Any]] = []
    got_two = asyncio.Event()

    async def push(item: dict[str, Any]) -> None:
        if item["kind"] == "message.created":
            received.append(item)
        if len(received) == 2:
            got_two.set()

    positions = {general.id: 0}
    listener = asyncio.create_task(stream_rooms(chat, bob.id, positions, push))

    # --8<-- [start:requests]
    sent = await endpoint.handle(
        alice_token, {"op": "send", "room": general.id, "text": "hi bob", "client_id": "a-1"}
    )
    retried = await endpoint.handle(
        alice_token, {"op": "send", "room": general.id, "text": "hi bob", "client_id": "a-1"}
    )
    assert sent == retried == {"status": 200, "id": sent["id"], "seq": 1}  # stored once
    # --8<-- [end:requests]

    second = await endpoint.handle(
        alice_token, {"op": "send", "room": general.id, "text": "lunch?", "client_id": "a-2"}
    )
    assert second["seq"] == 2
    await asyncio.wait_for(got_two.wait(), timeout=10)
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    room = str(general.id)
    assert received == [
        {"room": room, "kind": "message.created", "text": "hi bob"},
        {"room": room, "kind": "message.created", "text": "lunch?"},
    ]
    assert positions[general.id] == await chat.room_position(general.id, bob.id)

    history = await endpoint.handle(bob_token, {"op": "history", "room": general.id, "after": 0})
    assert history == {
        "status": 200,
        "messages": [
            {"seq": 1, "from": "alice", "text": "hi bob"},
            {"seq": 2, "from": "alice", "text": "lunch?"},
        ],
        "more": False,
    }
    assert await endpoint.handle(bob_token, {"op": "unread"}) == {
        "status": 200,
        "unread": {str(general.id): 2},
    }
    assert await endpoint.handle(bob_token, {"op": "read", "room": general.id}) == {
        "status": 200,
        "read_up_to": 2,
    }
    assert (await endpoint.handle(bob_token, {"op": "unread"}))["unread"] == {str(general.id): 0}

    # --8<-- [start:failures]
    await chat.register(
        CreateUserDto(email="carol@example.org", username="carol", password="not a member")
    )
    carol_login = await chat.login("carol@example.org", "not a member")
    assert carol_login is not None
    outsider = await endpoint.handle(
        carol_login.session.token, {"op": "history", "room": general.id, "after": 0}
    )
    assert outsider["status"] == 403  # row security and the facade both say no

    empty = await endpoint.handle(
        alice_token, {"op": "send", "room": general.id, "text": "   ", "client_id": "a-3"}
    )
    assert empty == {"status": 400, "error": "content: must not be empty or only whitespace"}

    burst = [
        await endpoint.handle(
            alice_token, {"op": "send", "room": general.id, "text": f"#{i}", "client_id": f"b{i}"}
        )
        for i in range(6)
    ]
    assert burst[-1]["status"] == 429
    assert burst[-1]["retry_after"] > 0
    # --8<-- [end:failures]

    assert await endpoint.handle("not-a-token", {"op": "unread"}) == {
        "status": 400,
        "error": "token: is not a session token",
    }
    await chat.sessions.revoke_token(alice_token)
    assert await endpoint.handle(alice_token, {"op": "unread"}) == {
        "status": 401,
        "error": "log in again",
    }
    assert (await endpoint.handle(bob_token, {"op": "dance"}))["status"] == 400
    assert error_response(Unavailable("redis down")) == {
        "status": 503,
        "error": "try again shortly",
    }
    assert error_response(ChatkeepError("odd"))["status"] == 500


async def test_the_tutorial_threads(chat: ChatKeep) -> None:
    alice = await chat.register(
        CreateUserDto(email="alice@example.org", username="alice", password="correct horse")
    )
    bob = await chat.register(
        CreateUserDto(email="bob@example.org", username="bob", password="battery staple")
    )
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    await chat.join(general.id, bob.id)
    # --8<-- [start:threads]
    question = await chat.send_message(general.id, alice.id, "who has the keys?")
    answer = await chat.send_message(general.id, bob.id, "I do, @alice", reply_to=question.id)
    assert answer.reply_to == question.id  # a reply to `answer` would attach here too

    page = await chat.thread(question.id, alice.id)  # keyset pages, like history
    assert [m.content for m in page.items] == ["I do, @alice"]
    summary = await chat.thread_summary(question.id, alice.id)
    assert summary is not None
    assert summary.reply_count == 1

    badges = await chat.badges(alice.id)  # one query for every room of alice
    room = badges[general.id]
    assert (room.unread, room.mentions, room.unread_threads, room.thread_mentions) == (1, 1, 1, 1)
    assert [m.message_id for m in await chat.mentions(alice.id)] == [answer.id]

    await chat.mark_thread_read(question.id, alice.id)  # forward only
    await chat.mark_read(general.id, alice.id)
    room = (await chat.badges(alice.id))[general.id]
    assert (room.unread, room.mentions, room.unread_threads) == (0, 0, 0)
    # --8<-- [end:threads]
