"""The example chat application: FastAPI, one WebSocket per room, one static page.

Run it from the repository root with ``uvicorn examples.chat.app:app`` and open
http://127.0.0.1:8000/. With no ``CHATKEEP_DATABASE_URL``/``CHATKEEP_REDIS_URL`` set it
starts embedded PostgreSQL and Valkey and migrates the database (``ChatKeep.connect``
does both), so nothing else needs setting up.

Almost everything is chatkeep's ready-made FastAPI router under ``/api`` (accounts,
rooms, messages, read state, typing). The example adds only what the router lacks:

* ``GET /api/public-rooms``: the public rooms one can join;
* ``GET /api/rooms/{room_id}/members``: a room's members, each with an ``online`` flag;
* ``WS /api/rooms/{room_id}/live``: the router's room WebSocket
  (:func:`chatkeep.integrations.fastapi.room_events`), with the socket registered for
  presence in all of the user's rooms while it is open (heartbeats from the server, the
  socket dropped at the end).

The page (``static/index.html``) is plain HTML and JavaScript, no build step.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Annotated, Any, Final

import anyio
from fastapi import APIRouter, FastAPI, Query, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from chatkeep import ChatKeep, Settings
from chatkeep.errors import ChatkeepError, PermissionDenied
from chatkeep.integrations.fastapi import (
    Chat,
    CurrentUserId,
    add_error_handlers,
    chat_router,
    current_user_id,
    lifespan,
    room_events,
)

__all__ = ["Member", "PublicRoom", "app", "create_app"]

STATIC: Final = Path(__file__).resolve().parent / "static"
_CLEANUP_TIMEOUT: Final = 5.0  # seconds to take a closed socket's user offline

# chatkeep has no listing of public rooms yet: one query of the example's own, as the
# user (row security shows every active public room to any user).
PUBLIC_ROOMS: Final = """
SELECT id, name, description
FROM rooms
WHERE type = 'public' AND is_active
ORDER BY created_at DESC
LIMIT 100
"""


class PublicRoom(BaseModel):
    """A public room anyone may join."""

    id: uuid.UUID
    name: str
    description: str | None = None


class Member(BaseModel):
    """A member of a room, and whether they are online now."""

    id: uuid.UUID
    username: str
    role: str
    online: bool


def example_router() -> APIRouter:
    """The endpoints the example adds to chatkeep's router."""
    router = APIRouter()

    @router.get("/public-rooms", tags=["example"])
    async def public_rooms(chat: Chat, user_id: CurrentUserId) -> list[PublicRoom]:
        async with chat.acting_as(user_id):
            rows = await chat.db.fetch("example.public_rooms", PUBLIC_ROOMS)
        return [PublicRoom(**dict(row)) for row in rows]

    @router.get("/rooms/{room_id}/members", tags=["example"])
    async def members(chat: Chat, user_id: CurrentUserId, room_id: uuid.UUID) -> list[Member]:
        async with chat.acting_as(user_id):
            room = await chat.rooms.members(room_id)
        if all(member.user.id != user_id for member in room.members):
            raise PermissionDenied("not a member of this room")
        online = await chat.presence.online_among(member.user.id for member in room.members)
        return [
            Member(
                id=member.user.id,
                username=member.user.username,
                role=member.role,
                online=member.user.id in online,
            )
            for member in room.members
        ]

    router.add_api_websocket_route("/rooms/{room_id}/live", live_room)
    return router


async def live_room(
    websocket: WebSocket,
    chat: Chat,
    room_id: uuid.UUID,
    after_seq: Annotated[int, Query(ge=0)] = 0,
) -> None:
    """The router's room WebSocket, with the socket counted for the user's presence.

    A refused connection (no session, not a member...) is left to ``room_events``, which
    closes it with 4000 + the HTTP status.
    """
    socket_id = f"example:{uuid.uuid4().hex}"
    try:
        user_id = await current_user_id(chat, websocket, None)
        # Registered in all of the user's rooms, not just this one: presence is the
        # user's, so coming online (the first socket) and going offline (the last) are
        # told to every room, whichever room's socket that is.
        rooms = [summary.room.id for summary in await chat.rooms_of(user_id)]
        if room_id not in rooms:
            raise PermissionDenied("not a member of this room")
        await chat.connect_socket(user_id, socket_id, rooms=rooms)
    except ChatkeepError:
        await room_events(websocket, chat, room_id, after_seq)
        return
    beating = asyncio.create_task(_heartbeat(chat, user_id, socket_id, rooms))
    try:
        await room_events(websocket, chat, room_id, after_seq)
    finally:
        # Shielded: the server cancels the endpoint when the client goes (or at shutdown),
        # and the user must still be taken offline.
        with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            with contextlib.suppress(ChatkeepError):
                await chat.disconnect_socket(socket_id)


async def _heartbeat(
    chat: ChatKeep, user_id: uuid.UUID, socket_id: str, rooms: list[uuid.UUID]
) -> None:
    # While the socket is open the user is present; a connection that died silently is
    # noticed by uvicorn's WebSocket pings, which ends room_events and this loop.
    while True:
        await asyncio.sleep(10)
        with contextlib.suppress(ChatkeepError):
            await chat.heartbeat(user_id, socket_id, rooms=rooms)


def create_app(settings: Settings | None = None, **options: Any) -> FastAPI:
    """The example app.

    Args:
        settings: chatkeep's settings (``None``: read from the environment).
        **options: keyword arguments of :meth:`ChatKeep.connect
            <chatkeep.ChatKeep.connect>` (``bcrypt_rounds``...).
    """
    app = FastAPI(title="chatkeep example chat", lifespan=lifespan(settings, **options))
    add_error_handlers(app)
    app.include_router(chat_router(), prefix="/api")
    app.include_router(example_router(), prefix="/api")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


app = create_app()
