"""The aiohttp recipe (tests/integrations/aiohttp_app.py) on a real socket."""

from __future__ import annotations

import uuid

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings, Unavailable
from tests.integrations.aiohttp_app import CHAT, make_app


async def test_the_aiohttp_recipe(chat: ChatKeep, settings: Settings) -> None:
    ann = await chat.register(
        CreateUserDto(email="ann@example.org", username="ann", password="correct horse")
    )
    room = await chat.create_room(CreateRoomDto(name="general", created_by=ann.id))
    other = await chat.create_room(CreateRoomDto(name="other", type="private", created_by=ann.id))
    stranger = await chat.register(
        CreateUserDto(email="sam@example.org", username="sam", password="correct horse")
    )
    token = (await chat.sessions.create(ann.id)).token
    auth = {"Authorization": f"Bearer {token}"}
    app = make_app(settings)
    async with TestClient(TestServer(app)) as client:
        opened: ChatKeep = app[CHAT]
        sent = await client.post(
            f"/rooms/{room.id}/messages", headers=auth, json={"content": "one"}
        )
        assert sent.status == 201
        assert (await sent.json())["seq"] == 1
        async with client.ws_connect(f"/rooms/{room.id}/events?after_seq=0", headers=auth) as ws:
            first = await ws.receive_json(timeout=10)
            assert first["message"]["content"] == "one"
            await client.post(f"/rooms/{room.id}/messages", headers=auth, json={"content": "two"})
            second = await ws.receive_json(timeout=10)
            assert (second["message"]["content"], second["message"]["seq"]) == ("two", 2)

        bad = await client.post(
            f"/rooms/{room.id}/messages", headers=auth, json={"content": "", "type": "system"}
        )
        assert bad.status == 422
        problems = (await bad.json())["error"]["errors"]
        assert [problem["field"] for problem in problems] == ["content", "type"]
        anonymous = await client.post(f"/rooms/{room.id}/messages", json={"content": "x"})
        assert (anonymous.status, anonymous.headers["WWW-Authenticate"]) == (401, "Bearer")
        malformed = await client.post(
            f"/rooms/{room.id}/messages", headers={"Authorization": "Bearer x"}, json={}
        )
        assert malformed.status == 401
        assert (await client.post("/rooms/nope/messages", headers=auth, json={})).status == 422
        sam = {"Authorization": f"Bearer {(await chat.sessions.create(stranger.id)).token}"}
        denied = await client.post(f"/rooms/{room.id}/messages", headers=sam, json={"content": "x"})
        assert denied.status == 403
        async with client.ws_connect(f"/rooms/{other.id}/events", headers=sam) as ws:
            closing = await ws.receive(timeout=10)
            assert closing.type == WSMsgType.CLOSE
            assert closing.data == 4404
        assert (await client.get(f"/rooms/{uuid.uuid4()}/events")).status == 401
    # cleanup_ctx closed chatkeep with the app.
    with pytest.raises(Unavailable):
        await opened.db.health()
