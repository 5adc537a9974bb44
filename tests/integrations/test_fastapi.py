"""chatkeep.integrations.fastapi: a real app on the real stores, through TestClient and
through uvicorn on a socket (HTTP and WebSocket)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatkeep import (
    ChatkeepError,
    ConfigurationError,
    Conflict,
    CursorPage,
    Health,
    InvalidInput,
    LoginResult,
    Message,
    MessageReadStatus,
    MessageWithUser,
    NotFound,
    PermissionDenied,
    RateLimited,
    Room,
    RoomMember,
    RoomSummary,
    RoomUser,
    RoomWithUsers,
    SearchHit,
    SearchPage,
    Settings,
    Unauthenticated,
    Unavailable,
    UnreadCounts,
    User,
    UserProfile,
)
from chatkeep.integrations.fastapi import (
    ERROR_STATUS,
    Chat,
    CurrentUser,
    CurrentUserId,
    TokenResponse,
    add_error_handlers,
    chat_router,
    lifespan,
)
from chatkeep.realtime import IssuedRefreshToken, IssuedSession, RateLimit, RedisHealth, Session
from chatkeep.storage.database import DatabaseHealth
from tests.integrations.serving import uvicorn_server

ROUNDS = 10
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PASSWORD = "correct horse"


def make_app(settings: Settings, **options: Any) -> FastAPI:
    app = FastAPI(lifespan=lifespan(settings, bcrypt_rounds=ROUNDS, sweep_interval=0.5, **options))
    add_error_handlers(app)
    app.include_router(chat_router(), prefix="/api")
    return app


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = make_app(settings, send_limit=RateLimit(limit=3, period=60.0))
    with TestClient(app) as test_client:
        yield test_client


def register(client: TestClient | httpx2.Client, name: str) -> dict[str, Any]:
    answer = client.post(
        "/api/auth/register",
        json={"email": f"{name}@example.org", "username": name, "password": PASSWORD},
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def login(client: TestClient | httpx2.Client, name: str) -> dict[str, Any]:
    answer = client.post(
        "/api/auth/login", json={"email": f"{name}@example.org", "password": PASSWORD}
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['access_token']}"}


# -- every public return type is a response model ------------------------------------------


def _samples() -> dict[str, tuple[Any, Any]]:
    profile = UserProfile(id=uuid.uuid4(), username="ann")
    user = User(
        id=profile.id, email="ann@example.org", username="ann", created_at=NOW, updated_at=NOW
    )
    room = Room(
        id=uuid.uuid4(),
        name="general",
        type="public",
        created_by=user.id,
        created_at=NOW,
        updated_at=NOW,
    )
    message = Message(
        id=uuid.uuid4(), room_id=room.id, user_id=user.id, seq=1, content="hi", created_at=NOW
    )
    with_user = MessageWithUser(**vars(message), user=profile)
    member = RoomMember(user=profile, role="owner", joined_at=NOW)
    session = Session(
        session_id="s1",
        user_id=user.id,
        created_at=NOW,
        last_active_at=NOW,
        expires_at=NOW,
        absolute_expires_at=NOW,
    )
    login_result = LoginResult(
        user,
        IssuedSession(token="t", session=session),
        IssuedRefreshToken(token="r", family_id=uuid.uuid4(), user_id=user.id, expires_at=NOW),
    )
    health = Health(
        database=DatabaseHealth(
            latency_ms=1.0,
            server_version="15",
            pool_size=1,
            pool_min_size=1,
            pool_max_size=2,
            idle=1,
            busy=0,
        ),
        redis=RedisHealth(ok=True, latency_ms=0.5),
    )
    return {
        "user": (User, user),
        "profile": (UserProfile, profile),
        "room": (Room, room),
        "room_user": (
            RoomUser,
            RoomUser(room_id=room.id, user_id=user.id, role="owner", joined_at=NOW),
        ),
        "room_with_users": (RoomWithUsers, RoomWithUsers(**vars(room), members=(member,))),
        "summary": (
            list[RoomSummary],
            [
                RoomSummary(
                    room=room, role="owner", last_read_seq=0, unread_count=1, last_message=with_user
                )
            ],
        ),
        "message": (Message, message),
        "search": (
            SearchPage,
            SearchPage(items=(SearchHit(**vars(message), snippet="\ue000hi\ue001"),), next="c"),
        ),
        "page": (CursorPage[MessageWithUser], CursorPage(items=(with_user,), newest="n")),
        "read_status": (
            MessageReadStatus,
            MessageReadStatus(message_id=message.id, user_id=user.id),
        ),
        "unread": (UnreadCounts, UnreadCounts([(room.id, 3)])),
        "login": (LoginResult, login_result),
        "token": (TokenResponse, TokenResponse.of(login_result)),
        "health": (Health, health),
    }


def _returning(annotation: Any, value: Any) -> Callable[[], Any]:
    async def route() -> Any:
        return value

    route.__annotations__["return"] = annotation
    return route


def test_every_public_return_type_is_a_response_model() -> None:
    app = FastAPI()
    samples = _samples()
    for name, (annotation, value) in samples.items():
        app.get(f"/{name}")(_returning(annotation, value))  # FastAPI builds the model here
    schema = app.openapi()
    components = schema["components"]["schemas"]
    for needed in ("User", "Room", "MessageWithUser", "LoginResult", "Health", "TokenResponse"):
        assert needed in components
    text = json.dumps(schema)
    for markup in (">>>", ":class:", ":meth:", "``", "Attributes:", "Example"):
        assert markup not in text, markup
    with TestClient(app) as client:
        for name in samples:
            answer = client.get(f"/{name}")
            assert answer.status_code == 200, (name, answer.text)
        room_id = str(samples["room"][1].id)
        assert client.get("/unread").json() == {room_id: 3}
        assert client.get("/login").json()["session"]["token"] == "t"
        assert client.get("/health").json()["redis"] == {
            "ok": True,
            "latency_ms": 0.5,
            "error": None,
        }
        assert client.get("/page").json()["items"][0]["user"]["username"] == "ann"
        assert client.get("/search").json()["items"][0]["snippet"] == "\ue000hi\ue001"
        assert "password_hash" not in client.get("/user").json()


# -- errors ---------------------------------------------------------------------------------


def _raising(error: ChatkeepError) -> Callable[[], Any]:
    async def route() -> None:
        raise error

    return route


def test_every_error_class_has_its_status_and_body() -> None:
    app = FastAPI()
    add_error_handlers(app)
    raised: dict[str, ChatkeepError] = {
        "invalid": InvalidInput("content", "must not be empty"),
        "unauthenticated": Unauthenticated("log in"),
        "denied": PermissionDenied("not yours"),
        "missing": NotFound("room not found", entity="room"),
        "conflict": Conflict("taken", constraint="users_email_key"),
        "limited": RateLimited("slow down", retry_after=1.2),
        "down": Unavailable("redis is down"),
        "other": ConfigurationError("secret detail"),
    }
    for name, error in raised.items():
        app.get(f"/{name}")(_raising(error))
    with TestClient(app) as client:
        answers = {name: client.get(f"/{name}") for name in raised}
    assert {name: answer.status_code for name, answer in answers.items()} == {
        "invalid": 422,
        "unauthenticated": 401,
        "denied": 403,
        "missing": 404,
        "conflict": 409,
        "limited": 429,
        "down": 503,
        "other": 500,
    }
    assert answers["invalid"].json() == {
        "error": {
            "code": "invalid_input",
            "message": "content: must not be empty",
            "field": "content",
            "errors": [{"field": "content", "rule": "must not be empty"}],
        }
    }
    assert answers["missing"].json() == {
        "error": {"code": "not_found", "message": "room not found"}
    }
    assert answers["limited"].headers["Retry-After"] == "2"
    assert answers["unauthenticated"].headers["WWW-Authenticate"] == "Bearer"
    assert answers["other"].json() == {"error": {"code": "internal", "message": "internal"}}
    codes = {answer.json()["error"]["code"] for answer in answers.values()}
    assert codes == {code for _, code in ERROR_STATUS.values()} | {"internal"}


# -- the router, through TestClient ---------------------------------------------------------


def test_bad_input_is_422_with_every_problem_and_no_values(client: TestClient) -> None:
    # Before: InvalidInput raised inside pydantic's validation made FastAPI answer 500.
    answer = client.post(
        "/api/auth/register",
        json={"email": "nope", "username": "_x", "password": "sekrit!", "avatar_url": "ftp://x"},
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == "email"
    assert [problem["field"] for problem in error["errors"]] == [
        "email",
        "username",
        "password",
        "avatar_url",
    ]
    assert "sekrit" not in answer.text
    assert client.post("/api/auth/register", json=[]).status_code == 422
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["CreateUserDto"]["properties"]["username"]["maxLength"] == 32
    assert "created_by" not in schema["CreateRoomBody"]["properties"]


def test_a_whole_conversation(client: TestClient) -> None:
    ann = register(client, "ann")
    register(client, "bob")
    assert (
        client.post(
            "/api/auth/login", json={"email": "ann@example.org", "password": "wrong password"}
        ).status_code
        == 401
    )
    assert (
        client.post(
            "/api/auth/register",
            json={"email": "ann@example.org", "username": "ann2", "password": PASSWORD},
        ).status_code
        == 409
    )
    token = login(client, "ann")
    bob = bearer(login(client, "bob"))
    auth = bearer(token)
    assert token["token_type"] == "bearer"
    assert token["user"]["id"] == ann["id"]
    assert client.get("/api/me", headers=auth).json()["username"] == "ann"

    room = client.post("/api/rooms", headers=auth, json={"name": " general "})
    assert room.status_code == 201
    room_id = room.json()["id"]
    assert room.json()["name"] == "general"
    assert room.json()["created_by"] == ann["id"]
    # A room body with created_by is refused: the creator is the caller.
    spoofed = client.post("/api/rooms", headers=auth, json={"name": "x", "created_by": ann["id"]})
    assert spoofed.status_code == 422

    sent = client.post(
        f"/api/rooms/{room_id}/messages",
        headers=auth,
        json={"content": "hello", "client_msg_id": "c-1"},
    )
    assert sent.status_code == 201
    again = client.post(
        f"/api/rooms/{room_id}/messages",
        headers=auth,
        json={"content": "hello", "client_msg_id": "c-1"},
    )
    assert again.json()["id"] == sent.json()["id"]  # idempotent
    # bob is not a member yet: 403, then he joins and reads.
    assert (
        client.post(
            f"/api/rooms/{room_id}/messages", headers=bob, json={"content": "hi"}
        ).status_code
        == 403
    )
    assert client.post(f"/api/rooms/{room_id}/join", headers=bob).json()["role"] == "member"
    assert client.get("/api/unread", headers=bob).json() == {room_id: 1}
    page = client.get(f"/api/rooms/{room_id}/messages", headers=bob, params={"limit": 10}).json()
    assert [m["content"] for m in page["items"]] == ["hello"]
    assert page["items"][0]["user"]["username"] == "ann"
    assert client.post(f"/api/rooms/{room_id}/read", headers=bob).json() == {"last_read_seq": 1}
    assert client.get("/api/unread", headers=bob).json() == {room_id: 0}
    rooms = client.get("/api/rooms", headers=bob).json()
    assert [(r["room"]["id"], r["unread_count"]) for r in rooms] == [(room_id, 0)]

    message_id = sent.json()["id"]
    edited = client.patch(f"/api/messages/{message_id}", headers=auth, json={"content": "hello!"})
    assert (edited.status_code, edited.json()["is_edited"]) == (200, True)
    assert (
        client.patch(f"/api/messages/{message_id}", headers=bob, json={"content": "no"}).status_code
        == 403
    )
    assert (
        client.post(f"/api/rooms/{room_id}/typing", headers=bob, json={"typing": True}).status_code
        == 204
    )
    assert client.delete(f"/api/messages/{message_id}", headers=auth).status_code == 204
    assert client.delete(f"/api/messages/{message_id}", headers=auth).status_code == 404
    assert client.post(f"/api/rooms/{room_id}/leave", headers=bob).status_code == 204
    assert client.post(f"/api/rooms/{room_id}/leave", headers=bob).status_code == 404
    assert client.get(f"/api/rooms/{uuid.uuid4()}/messages", headers=auth).status_code == 404
    assert (
        client.get("/api/rooms/not-a-uuid/messages", headers=auth).json()["error"]["field"]
        == "room_id"
    )

    # Three sends a minute (the app's limit); the third above was the idempotent retry.
    for n in range(2):
        client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": f"m{n}"})
    limited = client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": "more"})
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1


def test_search(client: TestClient) -> None:
    auth = bearer(login(client, register(client, "ann")["username"]))
    outsider = bearer(login(client, register(client, "bob")["username"]))
    room_id = client.post("/api/rooms", headers=auth, json={"name": "general"}).json()["id"]
    for text in ("the blue heron", "a grey heron", "no birds"):
        sent = client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": text})
        assert sent.status_code == 201, sent.text
    first = client.get("/api/search", headers=auth, params={"q": "heron", "limit": 1})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [hit["content"] for hit in page["items"]] == ["a grey heron"]
    assert "\ue000heron\ue001" in page["items"][0]["snippet"]
    rest = client.get(
        "/api/search",
        headers=auth,
        params={"q": "heron", "limit": 1, "cursor": page["next"], "room_id": room_id},
    )
    assert rest.status_code == 422  # a cursor of another search (no room filter)
    assert rest.json()["error"]["field"] == "cursor"
    rest = client.get("/api/search", headers=auth, params={"q": "heron", "cursor": page["next"]})
    assert [hit["content"] for hit in rest.json()["items"]] == ["the blue heron"]
    assert rest.json()["next"] is None
    ranked = client.get("/api/search", headers=auth, params={"q": "heron", "order": "rank"})
    assert all(hit["rank"] > 0 for hit in ranked.json()["items"])
    assert client.get("/api/search", headers=outsider, params={"q": "heron"}).json() == {
        "items": [],
        "next": None,
    }
    empty = client.get("/api/search", headers=auth, params={"q": "   "})
    assert empty.status_code == 422
    assert empty.json()["error"]["field"] == "query"
    huge = client.get("/api/search", headers=auth, params={"q": "x" * 300})
    assert huge.status_code == 422
    assert huge.json()["error"]["errors"] == [{"field": "query", "rule": "at most 256 characters"}]
    assert client.get("/api/search", headers=auth, params={"q": "a & !(b"}).status_code == 200
    assert client.get("/api/search", params={"q": "heron"}).status_code == 401


def test_sessions_refresh_and_logout(client: TestClient) -> None:
    register(client, "cid")
    for headers in (
        {},
        {"Authorization": "Bearer nonsense"},
        {"Authorization": f"Bearer {uuid.uuid4()}.x"},
    ):
        answer = client.get("/api/me", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert answer.json()["error"]["code"] == "unauthenticated"
    first = login(client, "cid")
    renewed = client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert renewed.status_code == 200
    assert client.get("/api/me", headers=bearer(renewed.json())).status_code == 200
    # A spent refresh token is refused (and ends that login): 401, log in again.
    reused = client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401
    assert client.get("/api/me", headers=bearer(renewed.json())).status_code == 401

    second = login(client, "cid")
    out = client.post(
        "/api/auth/logout", headers=bearer(second), json={"refresh_token": second["refresh_token"]}
    )
    assert out.status_code == 204
    assert client.get("/api/me", headers=bearer(second)).status_code == 401
    assert (
        client.post(
            "/api/auth/refresh", json={"refresh_token": second["refresh_token"]}
        ).status_code
        == 401
    )
    third = login(client, "cid")
    assert client.post("/api/auth/logout", headers=bearer(third)).status_code == 204
    assert client.get("/api/me", headers=bearer(third)).status_code == 401


def test_the_websocket_streams_a_room(client: TestClient) -> None:
    register(client, "dee")
    auth = bearer(login(client, "dee"))
    room_id = client.post("/api/rooms", headers=auth, json={"name": "ws"}).json()["id"]
    client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": "before"})
    with client.websocket_connect(f"/api/rooms/{room_id}/events?after_seq=0", headers=auth) as ws:
        assert ws.receive_json()["message"]["content"] == "before"  # caught up
        client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": "live"})
        item = ws.receive_json()
        assert (item["kind"], item["message"]["content"], item["message"]["seq"]) == (
            "message",
            "live",
            2,
        )
        client.post(f"/api/rooms/{room_id}/typing", headers=auth, json={"typing": True})
        event = ws.receive_json()
        assert (event["kind"], event["event"]["type"]) == ("event", "typing")
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect(f"/api/rooms/{room_id}/events") as ws,
    ):
        ws.receive_json()
    assert refused.value.code == 4401
    with (
        pytest.raises(WebSocketDisconnect) as missing,
        client.websocket_connect(f"/api/rooms/{uuid.uuid4()}/events", headers=auth) as ws,
    ):
        ws.receive_json()
    assert missing.value.code == 4404


# -- the same app over a real socket --------------------------------------------------------


async def test_over_uvicorn_http_and_websocket(settings: Settings) -> None:
    app = make_app(settings)

    def serve_and_call(base: str) -> tuple[str, str, str]:
        with httpx2.Client(base_url=f"http://{base}") as http:
            register(http, "eve")
            token = login(http, "eve")
            room_id = http.post("/api/rooms", headers=bearer(token), json={"name": "net"}).json()[
                "id"
            ]
            return token["access_token"], room_id, base

    with uvicorn_server(app) as base:
        access, room_id, _ = await asyncio.to_thread(serve_and_call, base)
        url = f"ws://{base}/api/rooms/{room_id}/events?token={access}"
        async with ws_connect(url) as ws:
            async with httpx2.AsyncClient(base_url=f"http://{base}") as http:
                sent = await http.post(
                    f"/api/rooms/{room_id}/messages",
                    headers={"Authorization": f"Bearer {access}"},
                    json={"content": "over the wire"},
                )
                assert sent.status_code == 201
            item = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            assert item["message"]["content"] == "over the wire"
        async with ws_connect(f"ws://{base}/api/rooms/{room_id}/events") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4401


# -- dependencies on their own -------------------------------------------------------------


def test_dependencies_in_an_app_of_ones_own(settings: Settings) -> None:
    app = FastAPI(lifespan=lifespan(settings, bcrypt_rounds=ROUNDS, sweep_interval=None))
    add_error_handlers(app)
    app.include_router(chat_router(websocket=False), prefix="/api")

    @app.get("/whoami")
    async def whoami(chat: Chat, user: CurrentUser, user_id: CurrentUserId) -> dict[str, Any]:
        assert user.id == user_id
        profile = await chat.profile(user_id)
        assert profile is not None
        return {"name": profile.username}

    with TestClient(app) as client:
        register(client, "fay")
        assert client.get("/whoami", headers=bearer(login(client, "fay"))).json() == {"name": "fay"}
        assert client.get("/whoami").status_code == 401
        assert "/api/rooms/{room_id}/events" not in {
            getattr(route, "path", None) for route in app.routes
        }
    assert not hasattr(app.state, "chatkeep")  # closed and forgotten at shutdown


def test_the_lifespan_sweeps_presence(settings: Settings) -> None:
    app = FastAPI(
        lifespan=lifespan(settings, bcrypt_rounds=ROUNDS, presence_timeout=0.3, sweep_interval=0.1)
    )
    add_error_handlers(app)
    app.include_router(chat_router(websocket=False), prefix="/api")
    with TestClient(app) as client:
        user_id = uuid.UUID(register(client, "gus")["id"])
        auth = bearer(login(client, "gus"))
        assert client.get("/api/me", headers=auth).json()["last_seen"] is None
        assert client.portal is not None
        client.portal.call(app.state.chatkeep.connect_socket, user_id, "socket-1")
        # No heartbeat: the lifespan's sweeper takes the user offline, which writes
        # last_seen (nothing else sweeps here).
        deadline = time.monotonic() + 10
        while client.get("/api/me", headers=auth).json()["last_seen"] is None:
            assert time.monotonic() < deadline, "the sweeper never ran"
            time.sleep(0.1)


# -- every change of a user's rooms: /changes ------------------------------------------------

Shown = dict[str, tuple[str, bool, dict[str, int]]]  # message id -> content, edited, reactions


def apply_change(state: Shown, change: dict[str, Any]) -> None:
    """What a client does with a change: its data is the resulting state."""
    message_id, data = change["message_id"], change["data"]
    if change["kind"] in ("message.created", "message.edited"):
        reactions = state[message_id][2] if message_id in state else {}
        state[message_id] = (data["content"], data["is_edited"], reactions)
    elif change["kind"] == "message.deleted":
        state.pop(message_id, None)
    elif change["kind"] in ("reaction.added", "reaction.removed") and message_id in state:
        reactions = state[message_id][2]
        reactions[data["emoji"]] = data["count"]
        if not data["count"]:
            del reactions[data["emoji"]]


def history_state(client: TestClient, room_id: str, auth: dict[str, str]) -> Shown:
    page = client.get(f"/api/rooms/{room_id}/messages", headers=auth, params={"limit": 200})
    assert page.status_code == 200, page.text
    return {
        item["id"]: (
            item["content"],
            item["is_edited"],
            {reaction["emoji"]: reaction["count"] for reaction in item["reactions"]},
        )
        for item in page.json()["items"]
    }


def receive_changes(ws: Any, count: int) -> list[dict[str, Any]]:
    items = [ws.receive_json() for _ in range(count)]
    assert [item["kind"] for item in items] == ["change"] * count, items
    return [item["change"] for item in items]


def test_the_changes_websocket_delivers_every_change_and_resumes(settings: Settings) -> None:
    with TestClient(make_app(settings)) as client:
        register(client, "fay")
        register(client, "gus")
        fay, gus = bearer(login(client, "fay")), bearer(login(client, "gus"))
        room_id = client.post("/api/rooms", headers=fay, json={"name": "log"}).json()["id"]
        assert client.post(f"/api/rooms/{room_id}/join", headers=gus).status_code == 200
        chat = client.app.state.chatkeep  # type: ignore[attr-defined]
        fay_id = client.get("/api/me", headers=fay).json()["id"]
        assert client.portal is not None
        portal = client.portal

        def send(content: str) -> str:
            sent = client.post(
                f"/api/rooms/{room_id}/messages", headers=fay, json={"content": content}
            )
            assert sent.status_code == 201, sent.text
            return str(sent.json()["id"])

        def edit(message_id: str, content: str) -> None:
            edited = client.patch(
                f"/api/messages/{message_id}", headers=fay, json={"content": content}
            )
            assert edited.status_code == 200, edited.text

        def delete(message_id: str) -> None:
            assert client.delete(f"/api/messages/{message_id}", headers=fay).status_code == 204

        def react(message_id: str, emoji: str) -> None:
            assert portal.call(chat.react, uuid.UUID(message_id), uuid.UUID(fay_id), emoji)

        state: Shown = history_state(client, room_id, gus)  # the snapshot: empty
        with client.websocket_connect(f"/api/changes?room={room_id}", headers=gus) as ws:
            ready = ws.receive_json()
            assert ready["kind"] == "ready"
            assert list(ready["positions"]) == [room_id]
            first = send("one")
            edit(first, "one, edited")
            react(first, "👍")
            kept = send("kept")
            # Received before the delete: a read after it would rightly leave out the
            # changes of the deleted message (its tombstone says), and 5 would never come.
            live = receive_changes(ws, 4)
            delete(first)
            live += receive_changes(ws, 1)
        assert [(c["kind"], c["message_id"]) for c in live] == [
            ("message.created", first),
            ("message.edited", first),
            ("reaction.added", first),
            ("message.created", kept),
            ("message.deleted", first),
        ]
        assert live[0]["data"]["content"] in ("one", "one, edited")  # the state when read
        assert live[1]["data"]["content"] == "one, edited"
        assert (live[2]["data"]["emoji"], live[2]["data"]["count"]) == ("👍", 1)
        assert live[0]["actor_id"] == fay_id
        assert {c["room_id"] for c in live} == {room_id}
        positions = [c["position"] for c in live]
        assert positions == list(range(positions[0], positions[0] + 5))  # gapless, in order
        for change in live:
            apply_change(state, change)
        last = positions[-1]

        # Away: fay sends, edits, reacts and deletes; nothing reaches gus.
        second = send("two")
        third = send("three")
        edit(second, "two, edited")
        react(kept, "🎉")
        delete(third)
        with client.websocket_connect(
            f"/api/changes?room={room_id}:{last}&token={gus['Authorization'][7:]}"
        ) as ws:
            assert ws.receive_json() == {"kind": "ready", "positions": {room_id: last}}
            missed = receive_changes(ws, 4)
            marker = send("marker")  # the next item is the marker: nothing else was missed
            after = receive_changes(ws, 1)
        # The log drops the created change of a message deleted since: its tombstone says.
        assert [(c["kind"], c["message_id"]) for c in missed] == [
            ("message.created", second),
            ("message.edited", second),
            ("reaction.added", kept),
            ("message.deleted", third),
        ]
        assert [c["position"] for c in missed + after] == [last + n for n in (1, 3, 4, 5, 6)]
        assert (after[0]["kind"], after[0]["message_id"]) == ("message.created", marker)
        for change in missed + after:
            apply_change(state, change)
        assert state == history_state(client, room_id, gus)
        assert state == {
            kept: ("kept", False, {"🎉": 1}),
            second: ("two, edited", True, {}),
            marker: ("marker", False, {}),
        }


def test_the_changes_websocket_ends_when_no_room_is_left(settings: Settings) -> None:
    with TestClient(make_app(settings)) as client:
        register(client, "hal")
        register(client, "ivy")
        owner, auth = bearer(login(client, "hal")), bearer(login(client, "ivy"))
        room_id = client.post("/api/rooms", headers=owner, json={"name": "bye"}).json()["id"]
        assert client.post(f"/api/rooms/{room_id}/join", headers=auth).status_code == 200
        with client.websocket_connect(f"/api/changes?room={room_id}", headers=dict(auth)) as ws:
            assert ws.receive_json()["kind"] == "ready"  # subscribed: nothing is missed now
            assert client.post(f"/api/rooms/{room_id}/leave", headers=auth).status_code == 204
            # The member.left change when the log could still show it, then the close.
            items = [ws.receive_json()]
            if items[0]["kind"] == "change":
                assert items[0]["change"]["kind"] == "member.left"
                items.append(ws.receive_json())
            closed = items[-1]
            assert (closed["kind"], closed["room_id"]) == ("closed", room_id), items
            assert closed["reason"] in ("left", "not visible")
            with pytest.raises(WebSocketDisconnect) as ended:
                ws.receive_json()
            assert (ended.value.code, ended.value.reason) == (1000, "no room left")


REFUSALS: Final = [
    ("room={room}", 4401, "unauthenticated"),  # no token
    ("room={missing}", 4404, "not_found"),
    ("room={private}", 4404, "not_found"),  # another user's room: not seen
    ("room={room}&room={private}", 4404, "not_found"),
    ("", 4422, "invalid_input"),  # no room
    ("room=not-a-uuid", 4422, "invalid_input"),
    ("room={room}:abc", 4422, "invalid_input"),
    ("room={room}:-1", 4422, "invalid_input"),
    ("room={room}:", 4422, "invalid_input"),
    ("room={room}:1&room={room}", 4422, "invalid_input"),  # twice
    ("room={room}:999999", 4422, "invalid_input"),  # a position the room has not reached
    ("room={room}:99999999999999999999", 4422, "invalid_input"),
    (
        "room=" + "&room=".join(str(uuid.UUID(int=n)) for n in range(1, 102)),
        4422,
        "invalid_input",
    ),
]


def test_the_changes_websocket_refuses(client: TestClient) -> None:
    register(client, "ida")
    register(client, "jon")
    auth, other = bearer(login(client, "ida")), bearer(login(client, "jon"))
    room = client.post("/api/rooms", headers=auth, json={"name": "mine"}).json()["id"]
    private = client.post(
        "/api/rooms", headers=other, json={"name": "theirs", "type": "private"}
    ).json()["id"]
    for query, code, reason in REFUSALS:
        url = "/api/changes?" + query.format(room=room, missing=uuid.uuid4(), private=private)
        headers = {} if code == 4401 else dict(auth)
        kinds: list[str] = []
        with client.websocket_connect(url, headers=headers) as ws:
            while True:
                try:
                    kinds.append(ws.receive_json()["kind"])
                except WebSocketDisconnect as exc:
                    refused = exc
                    break
        assert (refused.code, refused.reason) == (code, reason), query
        # A position is checked by the first read, after the "ready" frame.
        assert kinds == (["ready"] if query.endswith(":999999") else []), query


async def test_the_changes_websocket_over_uvicorn_resumes(settings: Settings) -> None:
    app = make_app(settings)

    def account(base: str) -> tuple[str, str]:
        with httpx2.Client(base_url=f"http://{base}") as http:
            register(http, "kim")
            token = login(http, "kim")["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            room_id = http.post("/api/rooms", headers=auth, json={"name": "wire"}).json()["id"]
            return token, room_id

    async def next_change(ws: Any) -> dict[str, Any]:
        item = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert item["kind"] == "change", item
        return dict(item["change"])

    with uvicorn_server(app) as base:
        token, room_id = await asyncio.to_thread(account, base)
        async with httpx2.AsyncClient(
            base_url=f"http://{base}", headers={"Authorization": f"Bearer {token}"}
        ) as http:

            async def send(content: str) -> str:
                sent = await http.post(f"/api/rooms/{room_id}/messages", json={"content": content})
                assert sent.status_code == 201, sent.text
                return str(sent.json()["id"])

            async with ws_connect(f"ws://{base}/api/changes?room={room_id}&token={token}") as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 10))["kind"] == "ready"
                first = await send("over the wire")
                change = await next_change(ws)
                assert (change["kind"], change["message_id"]) == ("message.created", first)
            last = change["position"]
            away = await send("while away")
            edited = await http.patch(f"/api/messages/{away}", json={"content": "edited away"})
            assert edited.status_code == 200
            async with ws_connect(
                f"ws://{base}/api/changes?room={room_id}:{last}&token={token}"
            ) as ws:
                ready = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
                assert ready == {"kind": "ready", "positions": {room_id: last}}
                missed = [await next_change(ws), await next_change(ws)]
            assert [(c["kind"], c["position"], c["data"]["content"]) for c in missed] == [
                ("message.created", last + 1, "edited away"),  # its state when read
                ("message.edited", last + 2, "edited away"),
            ]
        async with ws_connect(f"ws://{base}/api/changes?room={room_id}:x&token={token}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4422, "invalid_input")
