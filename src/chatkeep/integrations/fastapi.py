"""FastAPI glue: lifespan, dependencies, error handlers, a router and a WebSocket stream.

Install with ``pip install chatkeep[fastapi]``. The smallest app::

    from fastapi import FastAPI
    from chatkeep.integrations.fastapi import add_error_handlers, chat_router, lifespan

    app = FastAPI(lifespan=lifespan())
    add_error_handlers(app)
    app.include_router(chat_router(), prefix="/api")

* :func:`lifespan` opens a :class:`~chatkeep.ChatKeep` when the app starts, keeps it on
  ``app.state.chatkeep``, sweeps presence in the background, and closes it at shutdown.
* Dependencies: :data:`Chat` (the facade), :data:`CurrentUserId` (the user of the bearer
  session token: 401 with ``WWW-Authenticate: Bearer`` without a valid one) and
  :data:`CurrentUser` (that user's account, read from PostgreSQL).
* :func:`add_error_handlers` answers every :class:`~chatkeep.errors.ChatkeepError`, and
  FastAPI's own request validation errors, with one JSON body::

      {"error": {"code": "invalid_input", "message": "content: ...", "field": "content",
                 "errors": [{"field": "content", "rule": "..."}]}}

  ``code`` is stable (see :data:`ERROR_STATUS`); ``field`` and ``errors`` are there for
  invalid input only; ``message`` is for people, never parse it. Bad input answers 422,
  whether FastAPI or chatkeep found it, so a client has one status to handle.
* :func:`chat_router` is a ready-made :class:`fastapi.APIRouter` (accounts, rooms,
  messages, read state, typing; WebSockets of every change of the user's rooms and of a
  room's events) to mount or copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect

from chatkeep.config import Settings
from chatkeep.errors import (
    ChatkeepError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from chatkeep.facade import ChatKeep, LoginResult
from chatkeep.integrations.http import ERROR_STATUS, error_body, error_headers
from chatkeep.integrations.streams import changes_stream, room_stream
from chatkeep.models import (
    CreateRoomBody,
    CreateUserDto,
    CursorPage,
    EditMessageBody,
    Message,
    MessageWithUser,
    Room,
    RoomSummary,
    RoomUser,
    SearchPage,
    SendMessageBody,
    UnreadCounts,
    User,
)

__all__ = [
    "ERROR_STATUS",
    "MAX_STREAM_ROOMS",
    "Chat",
    "CurrentUser",
    "CurrentUserId",
    "ErrorBody",
    "ErrorDetail",
    "LoginBody",
    "LogoutBody",
    "MarkReadBody",
    "ReadState",
    "RefreshBody",
    "TokenResponse",
    "TypingBody",
    "add_error_handlers",
    "chat_router",
    "current_user",
    "current_user_id",
    "error_body",
    "get_chat",
    "lifespan",
]

logger = logging.getLogger("chatkeep.integrations.fastapi")

# Where FastAPI says a request value was: left out of a field's name ("body.content").
_LOCATIONS: Final = frozenset({"body", "query", "path", "header", "cookie"})


# -- the lifespan ---------------------------------------------------------------------------


def lifespan(
    settings: Settings | None = None,
    *,
    sweep_interval: float | None = 5.0,
    **options: Any,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A FastAPI lifespan that opens chatkeep at startup and closes it at shutdown.

    The facade is kept on ``app.state.chatkeep`` (the :data:`Chat` dependency reads it).
    While the app runs, users whose sockets stopped heartbeating are taken offline every
    ``sweep_interval`` seconds (``None``: no sweeper, for apps that run one elsewhere).

    Args:
        settings: passed to :meth:`ChatKeep.connect <chatkeep.ChatKeep.connect>`
            (``None``: read from the environment).
        sweep_interval: seconds between presence sweeps, or ``None``.
        **options: other keyword arguments of ``ChatKeep.connect`` (``node_id``...).
    """

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with ChatKeep.connect(settings, **options) as chat:
            app.state.chatkeep = chat
            sweeper = (
                None
                if sweep_interval is None
                else asyncio.create_task(
                    chat.presence.run_sweeper(sweep_interval), name="chatkeep presence sweeper"
                )
            )
            try:
                yield
            finally:
                if sweeper is not None:
                    sweeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweeper
                del app.state.chatkeep

    return run


# -- dependencies ---------------------------------------------------------------------------


def get_chat(connection: HTTPConnection) -> ChatKeep:
    """The app's :class:`~chatkeep.ChatKeep` (put there by :func:`lifespan`).

    Any other way of opening it works too: set ``app.state.chatkeep``.
    """
    chat: ChatKeep = connection.app.state.chatkeep
    return chat


Chat = Annotated[ChatKeep, Depends(get_chat)]
"""The facade, as a dependency: ``async def handler(chat: Chat)``."""

_bearer = HTTPBearer(auto_error=False, description="A session token from login.")


async def current_user_id(
    chat: Chat,
    connection: HTTPConnection,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> uuid.UUID:
    """The id of the user whose session token the request bears.

    Validating the session moves its sliding idle deadline forward. A WebSocket may
    give the token as the ``token`` query parameter instead (browsers cannot set headers
    on one; mind that query strings can end up in access logs).

    Raises:
        Unauthenticated: no token, or one malformed, unknown, expired or revoked.
    """
    token = credentials.credentials if credentials is not None else None
    if token is None and connection.scope["type"] == "websocket":
        # HTTPBearer reads HTTP requests only: a WebSocket's header is read here.
        scheme, _, value = connection.headers.get("authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
        token = token or connection.query_params.get("token")
    if not token:
        raise Unauthenticated("a bearer session token is required")
    try:
        session = await chat.sessions.validate(token)
    except InvalidInput:
        session = None  # not even shaped like a token: as unknown as any other
    if session is None:
        raise Unauthenticated("the session token is unknown or expired: log in again")
    return session.user_id


CurrentUserId = Annotated[uuid.UUID, Depends(current_user_id)]
"""The logged-in user's id, as a dependency (the acting user of every flow)."""


async def current_user(chat: Chat, user_id: CurrentUserId) -> User:
    """The logged-in user's account (one PostgreSQL read, as that user).

    Raises:
        Unauthenticated: no valid session, or the account is gone or deactivated.
    """
    async with chat.acting_as(user_id):
        user = await chat.users.find_by_id(user_id)
    if user is None or not user.is_active:
        raise Unauthenticated("the account is not active")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
"""The logged-in user's :class:`~chatkeep.User`, as a dependency."""


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong: a stable code, a message for people and, for bad input, where."""

    code: str = Field(description="Stable: invalid_input, unauthenticated, ..., internal.")
    message: str = Field(description="For people; do not parse it.")
    field: str | None = Field(default=None, description="The first field at fault.")
    errors: list[dict[str, str]] | None = Field(
        default=None, description="Every problem of bad input, each a field and a rule."
    )


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    status: {"model": ErrorBody} for status, _ in (*ERROR_STATUS.values(), (500, "internal"))
}


async def _chatkeep_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChatkeepError)  # noqa: S101 - registered for it alone
    status, body = error_body(exc)
    if status == 500:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


def _field_name(loc: Sequence[int | str]) -> str:
    parts = list(loc[1:]) if len(loc) > 1 and loc[0] in _LOCATIONS else list(loc)
    return ".".join(str(part) for part in parts)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it alone
    # The values are not echoed (one may be a password), unlike FastAPI's default answer.
    problems = [
        (_field_name(error.get("loc", ())), str(error.get("msg", "invalid")))
        for error in exc.errors()
    ]
    invalid = InvalidInput.of_all(problems or [("body", "invalid")])
    return await _chatkeep_error(request, invalid)


def add_error_handlers(app: FastAPI) -> None:
    """Answer chatkeep's errors and bad requests with the JSON error body.

    :class:`~chatkeep.errors.ChatkeepError` subclasses get the status of
    :data:`ERROR_STATUS` (429 with ``Retry-After``, 401 with ``WWW-Authenticate:
    Bearer``), anything else of chatkeep 500; FastAPI's request validation errors 422.
    """
    app.add_exception_handler(ChatkeepError, _chatkeep_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# -- request and response bodies of the router -----------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class LoginBody(_Body):
    """An email address and password to log in with."""

    email: str = Field(max_length=254, json_schema_extra={"format": "email"})
    password: str = Field(max_length=1024, json_schema_extra={"format": "password"})


class RefreshBody(_Body):
    """A refresh token to exchange for a new session (it is spent)."""

    refresh_token: str = Field(max_length=1024)


class LogoutBody(_Body):
    """The login's refresh token, to end it too (its family and every session it made)."""

    refresh_token: str | None = Field(default=None, max_length=1024)


class MarkReadBody(_Body):
    """How far the user has read (default: to the newest message)."""

    seq: int | None = Field(default=None, ge=0)


class TypingBody(_Body):
    """Whether the user is typing (it expires by itself)."""

    typing: bool = True


class ReadState(BaseModel):
    """The user's read watermark in a room after marking it read."""

    last_read_seq: int


class TokenResponse(BaseModel):
    """A login: the bearer session token, the refresh token, and the account."""

    access_token: str = Field(description="Send it as Authorization: Bearer <token>.")
    token_type: str = "bearer"  # noqa: S105 - OAuth 2's token type, not a secret
    expires_at: datetime = Field(description="When the session ends unless used again.")
    refresh_token: str = Field(description="Exchange it at /auth/refresh; spent on use.")
    refresh_expires_at: datetime
    user: User

    @classmethod
    def of(cls, login: LoginResult) -> TokenResponse:
        """The answer to a login or refresh."""
        return cls(
            access_token=login.session.token,
            expires_at=login.session.session.expires_at,
            refresh_token=login.refresh.token,
            refresh_expires_at=login.refresh.expires_at,
            user=login.user,
        )


# -- the router -----------------------------------------------------------------------------


def chat_router(*, websocket: bool = True) -> APIRouter:
    """A router of chat endpoints over the facade, to mount (or copy from).

    ====== ================================ ==============================================
    POST   /auth/register                   a new account (201, the :class:`User`)
    POST   /auth/login                      a session: :class:`TokenResponse` (401 if wrong)
    POST   /auth/refresh                    a new session for a refresh token
    POST   /auth/logout                     end the session (and the login, given its
                                            refresh token)
    GET    /me                              the logged-in user
    POST   /rooms                           a new room, the user its owner (201)
    GET    /rooms                           the user's rooms, with unread counts
    POST   /rooms/{room_id}/join            join a public room
    POST   /rooms/{room_id}/leave           leave a room (204)
    GET    /rooms/{room_id}/messages        a page of history (``cursor``, ``before_seq``,
                                            ``after_seq``, ``limit``)
    POST   /rooms/{room_id}/messages        send a message (201)
    PATCH  /messages/{message_id}           edit one's message
    DELETE /messages/{message_id}           delete a message (204)
    POST   /rooms/{room_id}/read            mark read (up to ``seq``)
    GET    /unread                          unread counts per room
    POST   /rooms/{room_id}/typing          start or stop typing (204)
    WS     /changes                         every change of the user's rooms
                                            (``room=<id>[:<position>]``, repeated;
                                            ``token``)
    WS     /rooms/{room_id}/events          the room's live events (``after_seq``,
                                            ``token``)
    ====== ================================ ==============================================

    Every endpoint but register, login and refresh needs a bearer session token. Mount
    :func:`add_error_handlers` too, for the error bodies.

    Args:
        websocket: include the WebSocket endpoints.
    """
    router = APIRouter(responses=_ERROR_RESPONSES)

    @router.post("/auth/register", status_code=201, tags=["auth"])
    async def register(chat: Chat, body: CreateUserDto) -> User:
        return await chat.register(body)

    @router.post("/auth/login", tags=["auth"])
    async def login(chat: Chat, body: LoginBody) -> TokenResponse:
        found = await chat.login(body.email, body.password)
        if found is None:
            raise Unauthenticated("wrong email or password")
        return TokenResponse.of(found)

    @router.post("/auth/refresh", tags=["auth"])
    async def refresh(chat: Chat, body: RefreshBody) -> TokenResponse:
        try:
            return TokenResponse.of(await chat.refresh(body.refresh_token))
        except PermissionDenied as exc:
            raise Unauthenticated(str(exc)) from exc

    @router.post("/auth/logout", status_code=204, tags=["auth"])
    async def logout(
        chat: Chat,
        user_id: CurrentUserId,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        body: Annotated[LogoutBody | None, Body()] = None,
    ) -> None:
        if body is not None and body.refresh_token is not None:
            with contextlib.suppress(InvalidInput):  # a malformed one ends nothing
                await chat.tokens.revoke(body.refresh_token)
        if credentials is not None:
            await chat.sessions.revoke_token(credentials.credentials)

    @router.get("/me", tags=["auth"])
    async def me(user: CurrentUser) -> User:
        return user

    @router.post("/rooms", status_code=201, tags=["rooms"])
    async def create_room(chat: Chat, user_id: CurrentUserId, body: CreateRoomBody) -> Room:
        return await chat.create_room(body.by(user_id))

    @router.get("/rooms", tags=["rooms"])
    async def my_rooms(chat: Chat, user_id: CurrentUserId) -> list[RoomSummary]:
        return await chat.rooms_of(user_id)

    @router.post("/rooms/{room_id}/join", tags=["rooms"])
    async def join(chat: Chat, user_id: CurrentUserId, room_id: uuid.UUID) -> RoomUser:
        return await chat.join(room_id, user_id)

    @router.post("/rooms/{room_id}/leave", status_code=204, tags=["rooms"])
    async def leave(chat: Chat, user_id: CurrentUserId, room_id: uuid.UUID) -> None:
        if not await chat.leave(room_id, user_id):
            raise NotFound("not a member of this room", entity="membership")

    @router.get("/rooms/{room_id}/messages", tags=["messages"])
    async def history(
        chat: Chat,
        user_id: CurrentUserId,
        room_id: uuid.UUID,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        before_seq: Annotated[int | None, Query(ge=0)] = None,
        after_seq: Annotated[int | None, Query(ge=0)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> CursorPage[MessageWithUser]:
        return await chat.history(
            room_id,
            user_id,
            cursor=cursor,
            before_seq=before_seq,
            after_seq=after_seq,
            limit=limit,
        )

    @router.post("/rooms/{room_id}/messages", status_code=201, tags=["messages"])
    async def send(
        chat: Chat, user_id: CurrentUserId, room_id: uuid.UUID, body: SendMessageBody
    ) -> Message:
        return await chat.send_message(
            room_id, user_id, body.content, client_msg_id=body.client_msg_id, type=body.type
        )

    @router.patch("/messages/{message_id}", tags=["messages"])
    async def edit(
        chat: Chat, user_id: CurrentUserId, message_id: uuid.UUID, body: EditMessageBody
    ) -> Message:
        return await chat.edit_message(message_id, user_id, body.content)

    @router.delete("/messages/{message_id}", status_code=204, tags=["messages"])
    async def delete(chat: Chat, user_id: CurrentUserId, message_id: uuid.UUID) -> None:
        if not await chat.delete_message(message_id, user_id):
            raise NotFound("message not found", entity="message")

    @router.post("/rooms/{room_id}/read", tags=["messages"])
    async def mark_read(
        chat: Chat,
        user_id: CurrentUserId,
        room_id: uuid.UUID,
        body: Annotated[MarkReadBody | None, Body()] = None,
    ) -> ReadState:
        seq = body.seq if body is not None else None
        return ReadState(last_read_seq=await chat.mark_read(room_id, user_id, seq))

    @router.get("/search", tags=["messages"])
    async def search(
        chat: Chat,
        user_id: CurrentUserId,
        q: Annotated[str, Query(max_length=1000)],
        room_id: uuid.UUID | None = None,
        author_id: uuid.UUID | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        order: Literal["newest", "rank"] = "newest",
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> SearchPage:
        # The query's own rules (not empty, <= 256 characters, <= 32 terms) are the
        # facade's, so the error body names them exactly as a library caller sees them.
        return await chat.search(
            user_id,
            q,
            room_id=room_id,
            author_id=author_id,
            since=since,
            until=until,
            order=order,
            cursor=cursor,
            limit=limit,
        )

    @router.get("/unread", tags=["messages"])
    async def unread(chat: Chat, user_id: CurrentUserId) -> UnreadCounts:
        return await chat.unread_counts(user_id)

    @router.post("/rooms/{room_id}/typing", status_code=204, tags=["rooms"])
    async def typing(
        chat: Chat, user_id: CurrentUserId, room_id: uuid.UUID, body: TypingBody
    ) -> None:
        await chat.set_typing(room_id, user_id, body.typing)

    if websocket:
        router.add_api_websocket_route("/changes", room_changes)
        router.add_api_websocket_route("/rooms/{room_id}/events", room_events)
    return router


# -- the WebSocket ----------------------------------------------------------------------------

# Close codes of the WebSocket endpoint: 4000 + the HTTP status the error would have had.
_WS_CLOSE_BASE: Final = 4000


# Rooms one /changes socket may follow (each is a subscription and a read per nudge).
MAX_STREAM_ROOMS: Final = 100


async def room_changes(
    websocket: WebSocket,
    chat: Chat,
    room: Annotated[list[str] | None, Query()] = None,
) -> None:
    """Send a member every change of some rooms as JSON (:func:`changes_stream`'s items).

    The rooms come from the query, one ``room`` parameter each: ``room=<id>:<position>``
    resumes after the last position the client received, ``room=<id>`` starts at the
    room's current position (no history replay). Authenticates like every endpoint (or
    with a ``token`` query parameter). A refused connection is closed with 4000 + the
    HTTP status (4401 no valid token, 4422 bad rooms or positions, 4404 a room the user
    is not in) and the error's code as the reason; the socket closes with 1000 when the
    user can see none of the rooms any more.
    """

    def items(user_id: uuid.UUID) -> AsyncGenerator[dict[str, Any], None]:
        room_ids, since = _stream_rooms(room or [])
        return changes_stream(chat, room_ids, user_id, since=since)

    await _serve_stream(websocket, chat, items, "no room left")


def _stream_rooms(values: Sequence[str]) -> tuple[list[uuid.UUID], dict[uuid.UUID, int]]:
    """``room`` query values (``<id>`` or ``<id>:<position>``) as rooms and positions.

    Raises:
        InvalidInput: none, too many, a bad id or position, or a room named twice.
    """
    if not values:
        raise InvalidInput("room", "name at least one room: room=<id> or room=<id>:<position>")
    if len(values) > MAX_STREAM_ROOMS:
        raise InvalidInput("room", f"at most {MAX_STREAM_ROOMS} rooms per socket")
    rooms: list[uuid.UUID] = []
    since: dict[uuid.UUID, int] = {}
    for value in values:
        text, colon, position = value.partition(":")
        try:
            room_id = uuid.UUID(text)
        except ValueError:
            raise InvalidInput("room", "must be <id> or <id>:<position>, id a UUID") from None
        if room_id in rooms:
            raise InvalidInput("room", "names a room twice")
        rooms.append(room_id)
        if colon:
            if not position.isascii() or not position.isdecimal() or len(position) > 18:
                raise InvalidInput("room", "a position must be an int >= 0")
            since[room_id] = int(position)
    return rooms, since


async def room_events(
    websocket: WebSocket,
    chat: Chat,
    room_id: uuid.UUID,
    after_seq: Annotated[int, Query(ge=0)] = 0,
) -> None:
    """Send a member the room's live events as JSON (see :mod:`chatkeep.integrations.streams`).

    Authenticates like every endpoint (or with a ``token`` query parameter), then sends
    each item of :func:`~chatkeep.integrations.streams.room_stream` from ``after_seq``
    on. A refused connection is closed with 4000 + the HTTP status (4401, 4403, 4404...)
    and the error's code as the reason.
    """

    def items(user_id: uuid.UUID) -> AsyncGenerator[dict[str, Any], None]:
        return room_stream(chat, room_id, user_id, after_seq=after_seq)

    await _serve_stream(websocket, chat, items, "left the room")


async def _serve_stream(
    websocket: WebSocket,
    chat: ChatKeep,
    items: Callable[[uuid.UUID], AsyncGenerator[dict[str, Any], None]],
    ended: str,
) -> None:
    """Accept, authenticate, send ``items(user)`` as JSON until it ends or the client goes.

    A chatkeep error (from authentication, ``items`` or the stream) closes the socket
    with 4000 + its HTTP status; the stream's end closes it with 1000 and ``ended``.
    """
    await websocket.accept()
    try:
        user_id = await current_user_id(chat, websocket, None)
    except ChatkeepError as exc:
        await websocket.close(*_close_reason(exc))
        return
    closing: tuple[int, str] | None = None

    async def send() -> None:
        nonlocal closing
        try:
            async with contextlib.aclosing(items(user_id)) as stream:
                async for item in stream:
                    await websocket.send_json(item)
            closing = (1000, ended)
        except ChatkeepError as exc:
            closing = _close_reason(exc)
        except (WebSocketDisconnect, OSError):
            pass  # the client went away mid-send
        group.cancel_scope.cancel()

    async def read() -> None:
        # The client may go away while the rooms are quiet: noticing it ends the stream
        # (and its subscription) now, not at the next event.
        await _until_disconnected(websocket)
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(send)
        group.start_soon(read)
    if closing is not None:
        await websocket.close(*closing)


def _close_reason(exc: ChatkeepError) -> tuple[int, str]:
    status, body = error_body(exc)
    return _WS_CLOSE_BASE + status, str(body["error"]["code"])


async def _until_disconnected(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass  # what a client sends (pings) is not for this endpoint
