"""The socket.io recipe of docs/howto/socketio.md (the page shows these sections verbatim).

Run it as ``uvicorn tests.integrations.socketio_app:app``; tests/integrations/
test_socketio.py starts two of them and checks each client gets each message once.
"""

from __future__ import annotations

# --8<-- [start:server]
import asyncio
import contextlib
import os
import uuid
from typing import Any

import socketio
from fastapi import FastAPI
from pydantic import ValidationError

from chatkeep import ChatKeep, ChatkeepError, InvalidInput, SendMessageBody
from chatkeep.integrations.fastapi import lifespan
from chatkeep.integrations.http import error_body
from chatkeep.models import invalid_input
from chatkeep.realtime import EventSubscription, RoomGap

# The default (in-process) manager: each process emits to its own sockets only. Do NOT
# give it a socket.io Redis manager as well: chatkeep's event bus already carries every
# event to every process, and both together would deliver each message twice.
sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins=[])
# Opens chatkeep on api.state.chatkeep. Each process needs a node id of its own (the host
# name by default: set one when several processes share a host).
api = FastAPI(lifespan=lifespan(node_id=os.environ.get("CHATKEEP_NODE_ID")))
app = socketio.ASGIApp(sio, other_asgi_app=api)  # socket.io, and the API for the rest


def chat() -> ChatKeep:
    keeper: ChatKeep = api.state.chatkeep
    return keeper


class RoomFanout:
    """One bus subscription per process, for the rooms its sockets are in."""

    def __init__(self) -> None:
        self.events: EventSubscription | None = None
        self.task: asyncio.Task[None] | None = None

    async def add(self, room_id: uuid.UUID) -> None:
        if self.events is None:
            self.events = await chat().subscribe(room_id)
            self.task = asyncio.create_task(self.forward(self.events))
        elif room_id not in self.events.room_ids:
            await self.events.add_rooms(room_id)

    async def forward(self, events: EventSubscription) -> None:
        async for event in events:
            if isinstance(event, RoomGap):
                # Missed events: tell the rooms' clients to catch up by seq (over HTTP).
                for room_id in event.room_ids:
                    await sio.emit("gap", {"room_id": str(room_id)}, room=str(room_id))
            else:
                # To this process's sockets in the room: each client hears it once.
                await sio.emit(event.type, event.model_dump(mode="json"), room=str(event.room_id))


fanout = RoomFanout()


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> None:
    token = (auth or {}).get("token")
    session = None
    with contextlib.suppress(InvalidInput):  # not shaped like a token: refused alike
        session = await chat().sessions.validate(token) if isinstance(token, str) else None
    if session is None:
        raise socketio.exceptions.ConnectionRefusedError("unauthenticated")
    await sio.save_session(sid, {"user_id": session.user_id})
    await chat().connect_socket(session.user_id, sid)


@sio.event
async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    user_id = (await sio.get_session(sid))["user_id"]
    try:
        room_id = _room_id(data)
        # Checks membership, and marks the user present in the room.
        await chat().connect_socket(user_id, sid, rooms=[room_id])
    except ChatkeepError as exc:
        return {"ok": False, **error_body(exc)[1]}
    await fanout.add(room_id)
    await sio.enter_room(sid, str(room_id))
    return {"ok": True}


@sio.event
async def send(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    user_id = (await sio.get_session(sid))["user_id"]
    try:
        room_id = _room_id(data)
        fields = {key: value for key, value in data.items() if key != "room_id"}
        try:
            body = SendMessageBody.model_validate(fields)  # the rules of a message
        except ValidationError as exc:
            raise invalid_input(exc) from None  # ValidationError as chatkeep's InvalidInput
        message = await chat().send_message(
            room_id, user_id, body.content, client_msg_id=body.client_msg_id, type=body.type
        )
    except ChatkeepError as exc:
        return {"ok": False, **error_body(exc)[1]}
    return {"ok": True, "id": str(message.id), "seq": message.seq}


@sio.event
async def disconnect(sid: str, reason: str = "") -> None:
    await chat().disconnect_socket(sid)


def _room_id(data: dict[str, Any]) -> uuid.UUID:
    try:
        return uuid.UUID(str(data["room_id"]))
    except (KeyError, ValueError):
        raise InvalidInput("room_id", "must be a UUID") from None


# --8<-- [end:server]
