"""A room's live events for one client, in order, without loss: what a socket sends.

:func:`room_stream` is the one place that turns chatkeep's event bus and history into
what a client of a room receives. It subscribes first, then reads PostgreSQL from the
client's last ``seq``, so a message sent in between arrives both ways and is sent once;
after a gap in the bus (Redis restarted, a slow reader) it reads PostgreSQL again. The
FastAPI WebSocket endpoint and the aiohttp recipe send what it yields as JSON.

Each item is a JSON-ready dict with a ``kind``:

* ``{"kind": "message", "message": {...}}``: a new message (a
  :class:`~chatkeep.models.MessageWithUser`), in ``seq`` order, each once;
* ``{"kind": "event", "event": {...}}``: any other room event (edit, delete, read,
  typing, presence, membership) as the bus carries it, with its ``type``;
* ``{"kind": "gap"}``: events may have been missed (messages are caught up; edits,
  deletions and the rest are not, so a client re-reads what it shows).

The stream ends when the user leaves (or is removed from) the room.

It is built on :meth:`ChatKeep.subscribe <chatkeep.ChatKeep.subscribe>` and
:meth:`ChatKeep.catch_up <chatkeep.ChatKeep.catch_up>`; when the facade offers a stream
of its own that does both, this function becomes a thin adapter over it and its callers
do not change.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import TypeAdapter

from chatkeep.facade import ChatKeep
from chatkeep.models import MessageWithUser
from chatkeep.realtime import MemberLeft, MessageCreated, RoomGap

__all__ = ["room_stream"]

_MESSAGE: TypeAdapter[MessageWithUser] = TypeAdapter(MessageWithUser)


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
