"""The change stream: every change of some rooms, in order, exactly as PostgreSQL has it.

::

    async with chat.stream(room_ids, user_id, since={room: 41}) as stream:
        async for item in stream:
            match item:
                case Change():
                    apply(item)  # carries the resulting state: applying twice is harmless
                case RoomReset():
                    reload(item.room_id)  # history, then changes after item.position
                case RoomClosed():
                    forget(item.room_id)  # left, removed, or the room was deleted

Redis pub/sub is the nudge, PostgreSQL the truth. The stream subscribes to the rooms
*first*, then reads each room's log (:meth:`~chatkeep.ChatKeep.changes`) after the
position the client has (``since[room]``; a room absent from ``since`` starts at its
current :meth:`~chatkeep.ChatKeep.room_position`, without replaying history), so a change
committed in between shows up in the read or as an event, never in neither. From then on
an event with a position the stream has not reached, a position jump or a
:class:`~chatkeep.realtime.RoomGap` (Redis reconnected, the reader fell behind) makes it
read the room's log again from the last position it handed out. Events that arrive
together for a room cost one read, and pages follow ``next_after`` until the room's
position. Every change comes out once, in ascending position per room; an event at or
below what was read is a duplicate and dropped (the outbox relay may republish).

Events are never turned into changes directly: they do not carry everything a
:class:`~chatkeep.models.Change` holds (the actor, the payload of an edit), so each nudge
is one ``changes()`` read per room, coalesced.

The stream must be opened with ``async with`` (or :meth:`ChangeStream.open` and
:meth:`ChangeStream.aclose`): that is what releases its subscription whatever way the
loop ends, a ``break`` included. Iterating an unopened stream raises ``InvalidInput``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Protocol, Self
from uuid import UUID

from chatkeep.errors import InvalidInput, NotFound, ResyncRequired, Unavailable
from chatkeep.ids import check_id
from chatkeep.models import Change, ChangePage
from chatkeep.realtime.events import Event, EventSubscription, RoomGap

__all__ = [
    "CHANGE_PAGE_SIZE",
    "ChangeSource",
    "ChangeStream",
    "RoomClosed",
    "RoomReset",
    "StreamItem",
]

logger = logging.getLogger("chatkeep.stream")

CHANGE_PAGE_SIZE: Final = 100
"""Changes read per ``changes()`` call while catching up."""

# Kinds after which the streaming user has no room left to follow.
_ROOM_ENDS: Final = frozenset({"room.deleted"})
_MEMBER_ENDS: Final = frozenset({"member.left", "member.removed"})
# Waits between reads while PostgreSQL is unavailable (seconds, doubling, capped).
_RETRY_FIRST: Final = 0.1
_RETRY_CAP: Final = 2.0


@dataclass(frozen=True, slots=True)
class RoomReset:
    """The room's log no longer reaches back to where the stream was: reload the room.

    Load a fresh snapshot (history) and apply the changes that follow; the stream goes on
    with the changes after ``position`` (applying one the snapshot already shows is
    harmless: changes carry resulting state).

    Attributes:
        room_id: the room to reload.
        position: the room's position when the reset was found; changes after it follow.
        oldest_position: the oldest position the log still keeps.
    """

    room_id: UUID
    position: int
    oldest_position: int


@dataclass(frozen=True, slots=True)
class RoomClosed:
    """The streaming user can no longer see the room; the stream stops following it.

    After the user left or was removed (the change that says so comes first when the
    log could still show it) or the room was deleted. When no room is left the stream
    ends.

    Attributes:
        room_id: the room.
        position: the last position handed out for it.
        reason: ``"left"`` (the user's own membership ended or the room was deleted, as
            a change said) or ``"not visible"`` (the log refused the read: the change
            that ended the membership was not readable any more).
    """

    room_id: UUID
    position: int
    reason: Literal["left", "not visible"]


StreamItem = Change | RoomReset | RoomClosed
"""What a :class:`ChangeStream` yields."""


class ChangeSource(Protocol):
    """What the stream reads from (:class:`~chatkeep.ChatKeep` is one)."""

    async def changes(
        self, room_id: UUID, user_id: UUID, *, after: int, limit: int = ...
    ) -> ChangePage:
        """A page of the room's log after ``after``."""

    async def room_position(self, room_id: UUID, user_id: UUID) -> int:
        """The room's current position."""

    async def subscribe(self, *room_ids: UUID) -> EventSubscription:
        """A subscription to the rooms' events."""


def _positions(since: object, rooms: frozenset[UUID]) -> dict[UUID, int]:
    if since is None:
        return {}
    if not isinstance(since, Mapping):
        raise InvalidInput("since", "must be a mapping of room id to position")
    found: dict[UUID, int] = {}
    for key, value in since.items():
        room = check_id("since", key)
        if room not in rooms:
            raise InvalidInput("since", "names a room that is not in room_ids")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInput("since", "positions must be ints >= 0")
        found[room] = value
    return found


def _room_ids(room_ids: object) -> frozenset[UUID]:
    if isinstance(room_ids, str | bytes | UUID) or not isinstance(room_ids, Iterable):
        raise InvalidInput("room_ids", "must be a collection of UUIDs")
    rooms = frozenset(check_id("room_ids", room) for room in room_ids)
    if not rooms:
        raise InvalidInput("room_ids", "must name at least one room")
    return rooms


class ChangeStream:
    """Every change of some rooms for one user, caught up from PostgreSQL, then live.

    Made by :meth:`chatkeep.ChatKeep.stream`; see the module's docstring for the
    guarantees. Open it with ``async with`` and iterate it for :data:`StreamItem`.

    Args:
        source: where changes and events come from (the facade).
        room_ids: the rooms to follow (at least one; the user must be a member of each).
        user_id: whose view (``changes()`` checks membership).
        since: the last position the client has per room; rooms absent start at their
            current position.
        page_size: changes per read (1 to 1000).

    Raises:
        InvalidInput: a bad id, ``since`` naming a room outside ``room_ids`` or holding a
            position that is not an int >= 0, or a bad ``page_size``.
    """

    def __init__(
        self,
        source: ChangeSource,
        room_ids: Iterable[UUID],
        user_id: UUID,
        *,
        since: Mapping[UUID, int] | None = None,
        page_size: int = CHANGE_PAGE_SIZE,
    ) -> None:
        self._source = source
        self._rooms = set(_room_ids(room_ids))
        self._user = check_id("user_id", user_id)
        self._since = _positions(since, frozenset(self._rooms))
        if (
            not isinstance(page_size, int)
            or isinstance(page_size, bool)
            or not (1 <= page_size <= 1000)
        ):
            raise InvalidInput("page_size", "must be an int from 1 to 1000")
        self._page_size = page_size
        self._subscription: EventSubscription | None = None
        self._closed = False
        self._last: dict[UUID, int] = {}  # read up to, per room
        self._handed: dict[UUID, int] = {}  # handed out up to, per room
        self._dirty: set[UUID] = set()
        self._ready: deque[StreamItem] = deque()
        self._retry = _RETRY_FIRST
        self.reads = 0
        """``changes()`` calls made so far (for tests and metrics)."""

    @property
    def positions(self) -> Mapping[UUID, int]:
        """The last position handed out per followed room: pass it as ``since`` to resume."""
        if not self._ready:  # everything read was handed out (and reads may skip positions)
            return {room: self._last[room] for room in self._rooms}
        return {room: self._handed[room] for room in self._rooms}

    @property
    def room_ids(self) -> frozenset[UUID]:
        """The rooms still followed."""
        return frozenset(self._rooms)

    async def open(self) -> Self:
        """Subscribe, then find where each room starts (``async with`` calls this).

        Raises:
            NotFound: the user cannot see one of the rooms (``room not found``).
            InvalidInput: the stream was opened before.
            Unavailable: Redis or PostgreSQL could not be reached.
        """
        if self._subscription is not None or self._closed:
            raise InvalidInput("stream", "can be opened once")
        # Subscribe first: a change committed after this is delivered as an event or is
        # in the read below, never lost in between.
        subscription = await self._source.subscribe(*self._rooms)
        self._subscription = subscription
        try:
            for room in self._rooms:
                if room in self._since:
                    self._last[room] = self._since[room]
                    self._dirty.add(room)  # the client is behind by an unknown amount
                else:
                    self._last[room] = await self._source.room_position(room, self._user)
                subscription.advance(room, self._last[room])
                self._handed[room] = self._last[room]
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Unsubscribe and end the iteration (idempotent)."""
        self._closed = True
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamItem:
        while True:
            if self._ready:
                ready = self._ready.popleft()
                if not isinstance(ready, RoomClosed):
                    self._handed[ready.room_id] = ready.position
                return ready
            subscription = self._subscription
            if subscription is None:
                if self._closed:
                    raise StopAsyncIteration
                raise InvalidInput("stream", "must be opened with 'async with' first")
            if not self._rooms:
                await self.aclose()
                raise StopAsyncIteration
            if self._dirty:
                await self._catch_up(subscription)
                continue
            item = await subscription.get()
            if item is None:
                raise StopAsyncIteration
            self._note(item)
            # Whatever else has arrived joins this read: a burst is one read per room.
            while (more := subscription.poll()) is not None:
                self._note(more)

    def _note(self, item: Event | RoomGap) -> None:
        """Mark the rooms ``item`` says have news."""
        if isinstance(item, RoomGap):
            self._dirty.update(item.room_ids & self._rooms)
            return
        room, position = item.room_id, item.position
        if room in self._rooms and position is not None and position > self._last[room]:
            self._dirty.add(room)

    async def _catch_up(self, subscription: EventSubscription) -> None:
        """Read every room marked as having news, concurrently, one read chain each.

        The reads change nothing; their results are taken in one step after all of them
        ended, so a caller cancelled meanwhile (a timeout around ``anext``) loses no
        change: the rooms are still marked and the next call reads them again.
        """
        rooms = sorted(self._dirty)
        found = await asyncio.gather(*(self._read(room) for room in rooms), return_exceptions=True)
        failed: list[Unavailable] = []
        gone: list[UUID] = []
        for room, result in zip(rooms, found, strict=True):
            if isinstance(result, Unavailable):
                # PostgreSQL is down or the pool is exhausted: the stream outlives it, and
                # the room's position did not move, so the next read starts where this one did.
                failed.append(result)
                continue
            if isinstance(result, BaseException):
                raise result
            items, last, closed = result
            self._dirty.discard(room)
            self._ready.extend(items)
            if closed:
                self._rooms.discard(room)
                self._last.pop(room, None)
                gone.append(room)
            else:
                self._last[room] = last
                subscription.advance(room, last)
        if gone:
            await subscription.remove_rooms(*gone)
        if failed:
            logger.warning(
                "change stream read failed, retrying in %.1f s: %s", self._retry, failed[0]
            )
            await asyncio.sleep(self._retry)
            self._retry = min(self._retry * 2, _RETRY_CAP)
        else:
            self._retry = _RETRY_FIRST

    async def _read(self, room: UUID) -> tuple[list[StreamItem], int, bool]:
        """Every change of ``room`` after the last one read (all pages).

        Returns the items, the position reached, and whether the stream stops following
        the room. Changes no state of the stream (see :meth:`_catch_up`).
        """
        after = self._last[room]
        items: list[StreamItem] = []
        while True:
            self.reads += 1
            try:
                page = await self._source.changes(
                    room, self._user, after=after, limit=self._page_size
                )
            except ResyncRequired as exc:
                items.append(RoomReset(room, exc.position, exc.oldest_position))
                after = exc.position
                continue
            except NotFound:
                items.append(RoomClosed(room, after, "not visible"))
                return items, after, True
            for change in page.items:
                if change.position <= after:
                    continue
                items.append(change)
                after = change.position
                if self._ends_membership(change):
                    items.append(RoomClosed(room, after, "left"))
                    return items, after, True
            # A page may hold fewer items than positions (the log drops a created or
            # edited change of a message deleted since: its tombstone follows), so the
            # page's own markers, not its last item, say how far it reached.
            if page.next_after is None:
                return items, max(after, page.position), False
            if page.next_after <= after and not page.items:  # pragma: no cover - defensive
                return items, after, False
            after = max(after, page.next_after)

    def _ends_membership(self, change: Change) -> bool:
        if change.kind in _ROOM_ENDS:
            return True
        return change.kind in _MEMBER_ENDS and str(change.data.get("user_id")) == str(self._user)
