"""The aiohttp recipe of docs/howto/aiohttp.md (the page shows these sections verbatim).

tests/integrations/test_aiohttp.py serves it on a real socket and calls it.
"""

from __future__ import annotations

# --8<-- [start:app]
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    InvalidInput,
    Message,
    SendMessageBody,
    Settings,
    Unauthenticated,
)
from chatkeep.integrations.http import error_body, error_headers
from chatkeep.integrations.streams import room_stream
from chatkeep.models import invalid_input

CHAT = web.AppKey("chat", ChatKeep)
SETTINGS = web.AppKey("settings", Settings)
MESSAGE = TypeAdapter(Message)


async def chatkeep_context(app: web.Application) -> AsyncIterator[None]:
    """Open chatkeep before the app serves, sweep presence, close it at cleanup."""
    async with ChatKeep.connect(app.get(SETTINGS)) as chat:
        app[CHAT] = chat
        sweeper = asyncio.create_task(chat.presence.run_sweeper(5.0))
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


@web.middleware
async def chatkeep_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every chatkeep error as its status and JSON error body (bad input: 422)."""
    try:
        return await handler(request)
    except ChatkeepError as exc:
        status, body = error_body(exc)
        return web.json_response(body, status=status, headers=error_headers(exc))


async def user_of(request: web.Request) -> uuid.UUID:
    """The user of the request's bearer session token (or ``?token=`` on a WebSocket)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token if scheme.lower() == "bearer" else request.query.get("token", "")
    session = None
    with contextlib.suppress(InvalidInput):  # not shaped like a token: refused alike
        session = await request.app[CHAT].sessions.validate(token)
    if session is None:
        raise Unauthenticated("log in first")
    return session.user_id


def room_of(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["room_id"])
    except ValueError:
        raise InvalidInput("room_id", "must be a UUID") from None


routes = web.RouteTableDef()


@routes.post("/rooms/{room_id}/messages")
async def send(request: web.Request) -> web.Response:
    user_id = await user_of(request)
    try:
        body = SendMessageBody.model_validate_json(await request.read())
    except ValidationError as exc:
        raise invalid_input(exc) from None  # 422 with every problem, by the middleware
    message = await request.app[CHAT].send_message(
        room_of(request),
        user_id,
        body.content,
        client_msg_id=body.client_msg_id,
        type=body.type,
    )
    return web.json_response(MESSAGE.dump_python(message, mode="json"), status=201)


@routes.get("/rooms/{room_id}/events")
async def events(request: web.Request) -> web.WebSocketResponse:
    """The room's live events, as chatkeep.integrations.streams describes them."""
    user_id = await user_of(request)  # before the upgrade: a plain 401 if not logged in
    room_id = room_of(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)

    async def pump() -> None:
        after_seq = int(request.query.get("after_seq", "0"))
        stream = room_stream(request.app[CHAT], room_id, user_id, after_seq=after_seq)
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    await ws.send_json(item)
        except ChatkeepError as exc:
            status, body = error_body(exc)
            await ws.close(code=4000 + status, message=body["error"]["code"].encode())
            return
        await ws.close()  # the user left the room

    sender = asyncio.create_task(pump())
    try:
        async for _ in ws:
            pass  # until the client (or pump) closes; clients have nothing to say here
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return ws


def make_app(settings: Settings | None = None) -> web.Application:
    app = web.Application(middlewares=[chatkeep_errors])
    if settings is not None:
        app[SETTINGS] = settings
    app.cleanup_ctx.append(chatkeep_context)
    app.add_routes(routes)
    return app


# --8<-- [end:app]
