"""A bare ASGI app on chatkeep with no URLs set, for ``uvicorn --workers N`` tests.

``POST /login`` starts a session for a new user id and returns its token; ``GET /me`` with
``Authorization: Bearer <token>`` returns the session's user id (401 if unknown). Every
answer carries the worker's pid in ``x-worker``. No web framework: only what ASGI gives.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from chatkeep import ChatKeep

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_stack = contextlib.AsyncExitStack()
_chat: list[ChatKeep] = []


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            _chat.append(await _stack.enter_async_context(ChatKeep.connect()))
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _stack.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _respond(send: Send, status: int, body: str) -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-worker", str(os.getpid()).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    chat = _chat[0]
    if scope["method"] == "POST" and scope["path"] == "/login":
        issued = await chat.sessions.create(uuid.uuid4())
        await _respond(send, 200, issued.token)
        return
    auth = dict(scope["headers"]).get(b"authorization", b"").decode()
    session = await chat.sessions.validate(auth.removeprefix("Bearer "))
    if session is None:
        await _respond(send, 401, "unknown session")
    else:
        await _respond(send, 200, str(session.user_id))
