"""What a WebSocket sends one client: a room's live events, or every change of its rooms.

Two streams, both JSON-ready dicts with a ``kind``:

* :func:`changes_stream` (recommended): every change of the client's rooms (messages,
  edits, deletions, reactions, membership, room updates), once and in order per room,
  each with its ``position``; a client that reconnects with the positions it last
  received gets exactly what it missed. Built on :meth:`ChatKeep.stream
  <chatkeep.ChatKeep.stream>`.
* :func:`room_stream`: one room's new messages in ``seq`` order plus the bus's other
  events as they come; after a gap only messages are caught up. For message-only
  clients.

``changes_stream`` yields:

* first, once subscribed: ``{"kind": "ready", "positions": {room_id: position}}``, where
  each room starts (what the client sent, or the room's current position): changes
  after it follow;
* ``{"kind": "change", "change": {...}}``: a :class:`~chatkeep.models.Change`
  (``room_id``, ``position``, ``kind``, ``occurred_at``, ``actor_id``, ``message_id``,
  ``seq``, ``data``);
* ``{"kind": "reset", "room_id": ..., "position": ..., "oldest_position": ...}``: the
  room's log no longer reaches back to the client's position: reload the room (history),
  then apply the changes that follow (after ``position``);
* ``{"kind": "closed", "room_id": ..., "position": ..., "reason": ...}``: the user can no
  longer see the room (``"left"`` or ``"not visible"``); when no room is left the stream
  ends.

:func:`room_stream` turns chatkeep's event bus and history into what a message-only
client of a room receives. It subscribes first, then reads PostgreSQL from the
client's last ``seq``, so a message sent in between arrives both ways and is sent once;
after a gap in the bus (Redis restarted, a slow reader) it reads PostgreSQL again. The
FastAPI ``/rooms/{room_id}/events`` endpoint and the aiohttp recipe send what it yields.
Its items:

* ``{"kind": "message", "message": {...}}``: a new message (a
  :class:`~chatkeep.models.MessageWithUser`), in ``seq`` order, each once;
* ``{"kind": "event", "event": {...}}``: any other room event (edit, delete, read,
  typing, presence, membership) as the bus carries it, with its ``type``;
* ``{"kind": "gap"}``: events may have been missed (messages are caught up; edits,
  deletions and the rest are not, so a client re-reads what it shows).

The outbox relay's notice (``ChangesAvailable``: a writer committed but never published)
is not sent on: it makes the stream read the room's new messages from PostgreSQL.

The stream ends when the user leaves (or is removed from) the room.

It is built on :meth:`ChatKeep.subscribe <chatkeep.ChatKeep.subscribe>` and
:meth:`ChatKeep.catch_up <chatkeep.ChatKeep.catch_up>`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Any

from pydantic import TypeAdapter

from chatkeep.facade import ChatKeep
from chatkeep.models import Change, MessageWithUser
from chatkeep.realtime import ChangesAvailable, MemberLeft, MessageCreated, RoomGap
from chatkeep.stream import RoomClosed, RoomReset, StreamItem

__all__ = ["change_item", "changes_stream", "room_stream"]

_MESSAGE: TypeAdapter[MessageWithUser] = TypeAdapter(MessageWithUser)
_CHANGE: TypeAdapter[Change] = TypeAdapter(Change)


async def changes_stream(
    chat: ChatKeep,
    room_ids: Iterable[uuid.UUID],
    user_id: uuid.UUID,
    *,
    since: Mapping[uuid.UUID, int] | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield every change of the user's rooms as JSON-ready items (see the module).

    Close the generator when done (``contextlib.aclosing``): that ends the subscription.
    The generator ends when the user can see none of the rooms any more.

    Args:
        chat: the facade.
        room_ids: the rooms to follow (the user must be a member of each).
        user_id: whose view.
        since: the last position the client has per room (a room absent starts at its
            current position: no history replay).

    Raises:
        InvalidInput: a bad id, ``since`` naming another room or a bad position.
        NotFound: a room the user cannot see.
        Unavailable: Redis or PostgreSQL could not be reached.
    """
    async with chat.stream(room_ids, user_id, since=since) as stream:
        positions = {str(room): position for room, position in stream.positions.items()}
        yield {"kind": "ready", "positions": positions}
        async for item in stream:
            yield change_item(item)


def change_item(item: StreamItem) -> dict[str, Any]:
    """One item of :meth:`ChatKeep.stream <chatkeep.ChatKeep.stream>` as JSON-ready data."""
    if isinstance(item, RoomReset | RoomClosed):
        fields = dataclasses.asdict(item)
        fields["room_id"] = str(item.room_id)
        return {"kind": "reset" if isinstance(item, RoomReset) else "closed", **fields}
    return {"kind": "change", "change": _CHANGE.dump_python(item, mode="json")}


async def room_stream(
    chat: ChatKeep, room_id: uuid.UUID, user_id: uuid.UUID, *, after_seq: int = 0
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield what a member's client should receive of a room, from ``after_seq`` on.

    Close the generator when done (``contextlib.aclosing``): that ends the subscription.

    Args:
        chat: the facade.
        room_id: the room.
        user_id: the member (membership is checked before anything is sent).
        after_seq: the last ``seq`` the client has (0: the whole history).

    Raises:
        PermissionDenied: the user is not a member of the (public) room.
        NotFound: no such room, or one the user cannot see.
        InvalidInput: a bad id or ``after_seq``.
        Unavailable: Redis could not be reached to subscribe.
    """
    # Subscribe first, then read PostgreSQL: a message committed in between is in both,
    # and the seq check sends it once.
    async with await chat.subscribe(room_id) as events:
        last_seq = after_seq
        async for message in _messages_after(chat, room_id, user_id, last_seq):
            last_seq = message.seq
            yield _message_item(message)
        async for event in events:
            if isinstance(event, MessageCreated):
                if event.seq <= last_seq:
                    continue  # already sent from PostgreSQL
            elif isinstance(event, RoomGap):
                yield {"kind": "gap"}
            elif isinstance(event, ChangesAvailable):
                pass  # the outbox relay: a writer's changes were never published; read them
            else:
                yield {"kind": "event", "event": event.model_dump(mode="json")}
                if isinstance(event, MemberLeft) and event.user_id == user_id:
                    return
                continue
            # Something new (or missed): PostgreSQL says what, in seq order, each once.
            async for message in _messages_after(chat, room_id, user_id, last_seq):
                last_seq = message.seq
                yield _message_item(message)


async def _messages_after(
    chat: ChatKeep, room_id: uuid.UUID, user_id: uuid.UUID, after_seq: int
) -> AsyncGenerator[MessageWithUser, None]:
    page = await chat.catch_up(room_id, user_id, after_seq=after_seq)
    while True:
        for message in page.items:
            yield message
        if page.after is None:
            return
        page = await chat.catch_up(room_id, user_id, cursor=page.after)


def _message_item(message: MessageWithUser) -> dict[str, Any]:
    return {"kind": "message", "message": _MESSAGE.dump_python(message, mode="json")}
