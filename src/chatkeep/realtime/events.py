"""The event bus: typed room events over Redis pub/sub, one channel per room.

Events are pydantic models, sent as JSON with a version field ``v`` and a discriminator
``type``::

    {"v": 1, "type": "message.created", "room_id": "...", "event_id": "...",
     "occurred_at": "...", "origin": "node-a", "message_id": "...", "seq": 42, ...}

They are published *after* the PostgreSQL commit (by the facade) on
``room:{roomId}:events``, and every node subscribed to the room receives them. Pub/sub is
a best-effort nudge, not storage: a subscriber that was disconnected receives a
:class:`RoomGap` once it is subscribed again and catches up from PostgreSQL by ``seq``.

Events of changes in the room's change log (migration 012) carry ``position``, the room
position their change took: a receiver that holds position P and gets P + 2 knows it
missed one, and catches up with :meth:`chatkeep.ChatKeep.changes`. Events outside the log
(typing, presence, ``read``) and events from nodes of earlier versions have none
(``None``). Publishing an event with a position also raises the room's
``room:{roomId}:published`` mark to it (never lowers it), in the same round trip: what a
crashed writer never published shows as log positions above that mark.

Compatibility: a reader ignores fields it does not know (so fields can be added within
version 1) and skips, with a warning, events of a newer version or an unknown type
instead of failing, so nodes can be upgraded one at a time. A renamed field is read under
both names and written under the new one: ``message.created`` says ``client_msg_id``
(like :class:`~chatkeep.models.Message`) and still reads the ``client_message_id`` of
earlier versions.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Annotated, Any, Final, Literal, Self
from uuid import UUID, uuid4

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from chatkeep.errors import InvalidInput
from chatkeep.models import Change
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.keys import validate_collection, validate_id
from chatkeep.realtime.pubsub import ChannelSubscription, PubSubMessage, SubscriptionGap

__all__ = [
    "PUBLISHED_MARK_TTL_MS",
    "WIRE_VERSION",
    "ChangesAvailable",
    "Event",
    "EventBus",
    "EventSubscription",
    "GapReason",
    "MemberJoined",
    "MemberLeft",
    "MemberRoleChanged",
    "MessageCreated",
    "MessageDeleted",
    "MessageEdited",
    "MessagesRead",
    "PresenceChanged",
    "ReactionAdded",
    "ReactionRemoved",
    "RoomEvent",
    "RoomGap",
    "RoomUpdated",
    "TypingChanged",
    "decode_event",
    "encode_event",
    "event_of_change",
]

logger = logging.getLogger("chatkeep.realtime.events")

WIRE_VERSION: Final = 1
"""The version written in ``v``; readers skip events with a higher one."""


PUBLISHED_MARK_TTL_MS: Final = 7 * 24 * 3600 * 1000
"""How long a room's published mark outlives its last publish with a position (7 days)."""

# The mark is a sorted set with one member, so ZADD GT raises it and never lowers it (on a
# cluster a plain command in the publish's pipeline: a script in a pipeline would cost a
# SCRIPT EXISTS round trip on every execute; on one server, see _PUBLISH_MANY).
_MARK_MEMBER: Final = "published"

# publish_many on one server, in one command (a pipeline packed three commands per room
# and event). KEYS: the rooms' published marks. ARGV: the mark's member, its TTL in ms,
# one position per key, then channel and data of each event. Marks first, as there.
_PUBLISH_MANY: Final = """
local n = #KEYS
for i = 1, n do
  redis.call('ZADD', KEYS[i], 'GT', ARGV[2 + i], ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
local out = {}
for j = n + 3, #ARGV, 2 do
  out[#out + 1] = redis.call('PUBLISH', ARGV[j], ARGV[j + 1])
end
return out
"""


def _now() -> datetime:
    return datetime.now(UTC)


class RoomEvent(BaseModel):
    """Fields every event has.

    Attributes:
        v: wire format version.
        event_id: unique id of this event (for de-duplication by receivers).
        room_id: the room the event belongs to (and whose channel carries it).
        occurred_at: when it happened (UTC).
        origin: node id of the publisher, so a node can skip its own events.
        position: the room position the event's change took in the room's change log,
            or ``None`` for events that are not in the log.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = WIRE_VERSION
    event_id: UUID = Field(default_factory=uuid4)
    room_id: UUID
    occurred_at: datetime = Field(default_factory=_now)
    origin: str | None = Field(default=None, max_length=200)
    position: int | None = Field(default=None, ge=1)


class MessageCreated(RoomEvent):
    """A message was stored in the room (``seq`` is its place in the room).

    Attributes:
        client_msg_id: the sender's idempotency key, as on
            :class:`~chatkeep.models.Message`. Written as ``client_msg_id``; read from
            ``client_msg_id`` or, as earlier versions wrote it, ``client_message_id``.
    """

    type: Literal["message.created"] = "message.created"
    message_id: UUID
    seq: int = Field(ge=1)
    sender_id: UUID
    # During a rolling deploy older nodes still publish (and read) the old key: accepting
    # both on input keeps their events readable here. Output uses the field name.
    client_msg_id: str | None = Field(
        default=None,
        max_length=100,
        validation_alias=AliasChoices("client_msg_id", "client_message_id"),
    )
    body: str | None = None
    #: The root of the thread the message replies to, or ``None``.
    reply_to: UUID | None = None
    #: The members the message mentions (sorted; members only: a name that is no
    #: member's is never resolved, so never revealed). A receiver badges with it without
    #: re-reading: ``user_id in mentions or mentions_room``. Events of nodes before
    #: migration 021, and every event on Citus (no mentions kept), carry none.
    mentions: tuple[UUID, ...] = ()
    #: The message mentions the whole room (``@room``, ``@here``, ``@all`` by an owner or
    #: admin): every member but the sender.
    mentions_room: bool = False


class MessageEdited(RoomEvent):
    """A message's body changed."""

    type: Literal["message.edited"] = "message.edited"
    message_id: UUID
    seq: int = Field(ge=1)
    editor_id: UUID
    body: str | None = None


class MessageDeleted(RoomEvent):
    """A message was deleted."""

    type: Literal["message.deleted"] = "message.deleted"
    message_id: UUID
    seq: int = Field(ge=1)
    deleted_by: UUID


class MessagesRead(RoomEvent):
    """A member's read watermark moved forward to ``last_read_seq``."""

    type: Literal["read"] = "read"
    user_id: UUID
    last_read_seq: int = Field(ge=0)


class TypingChanged(RoomEvent):
    """A member started or stopped typing."""

    type: Literal["typing"] = "typing"
    user_id: UUID
    typing: bool


class PresenceChanged(RoomEvent):
    """A member came online or went offline."""

    type: Literal["presence"] = "presence"
    user_id: UUID
    status: Literal["online", "offline"]
    last_seen: datetime | None = None


class MemberJoined(RoomEvent):
    """A user joined the room."""

    type: Literal["member.joined"] = "member.joined"
    user_id: UUID
    role: str | None = Field(default=None, max_length=32)


class MemberLeft(RoomEvent):
    """A user left (or was removed from) the room."""

    type: Literal["member.left"] = "member.left"
    user_id: UUID


class MemberRoleChanged(RoomEvent):
    """A member's role changed (``role`` is the new one)."""

    type: Literal["member.role_changed"] = "member.role_changed"
    user_id: UUID
    role: str = Field(max_length=32)


class _ReactionEvent(RoomEvent):
    """What both reaction events carry; ``count`` is the emoji's count on it now."""

    message_id: UUID
    seq: int = Field(ge=1)
    user_id: UUID
    emoji: str = Field(max_length=64)
    count: int = Field(ge=0)


class ReactionAdded(_ReactionEvent):
    """A member reacted to a message."""

    type: Literal["reaction.added"] = "reaction.added"


class ReactionRemoved(_ReactionEvent):
    """A member took a reaction back."""

    type: Literal["reaction.removed"] = "reaction.removed"


class RoomUpdated(RoomEvent):
    """The room's name, description or state changed (its values now)."""

    type: Literal["room.updated"] = "room.updated"
    name: str = Field(max_length=100)
    description: str | None = Field(default=None, max_length=1000)
    is_active: bool = True


class ChangesAvailable(RoomEvent):
    """The room's log holds changes up to ``position`` that were never announced.

    Published by the outbox relay (:mod:`chatkeep.relay`) when a writer committed a
    change but did not publish it (it died, or Redis refused it): read the room's
    changes after the last position you have. ``after`` is the room's published mark
    when the relay looked, so the first unannounced change is ``after + 1``.
    """

    type: Literal["changes"] = "changes"
    position: int = Field(ge=1)
    after: int = Field(ge=0)


Event = Annotated[
    MessageCreated
    | MessageEdited
    | MessageDeleted
    | MessagesRead
    | TypingChanged
    | PresenceChanged
    | MemberJoined
    | MemberLeft
    | MemberRoleChanged
    | ReactionAdded
    | ReactionRemoved
    | RoomUpdated
    | ChangesAvailable,
    Field(discriminator="type"),
]
"""Any event, discriminated by its ``type`` field."""

_EVENT_ADAPTER: Final[TypeAdapter[Event]] = TypeAdapter(Event)
_EVENT_TYPES: Final = (
    MessageCreated,
    MessageEdited,
    MessageDeleted,
    MessagesRead,
    TypingChanged,
    PresenceChanged,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    ReactionAdded,
    ReactionRemoved,
    RoomUpdated,
    ChangesAvailable,
)


GapReason = Literal["reconnected", "overflow", "position"]
"""Why a :class:`RoomGap` was reported."""


@dataclass(frozen=True, slots=True)
class RoomGap:
    """Events of ``room_ids`` may have been missed: catch up from PostgreSQL.

    Attributes:
        room_ids: the rooms concerned (every room of the subscription for a reconnect or
            an overflow; the one room whose positions jumped for ``"position"``).
        reason: ``"reconnected"`` or ``"overflow"`` (see
            :class:`~chatkeep.realtime.pubsub.SubscriptionGap`), or ``"position"``: an
            event's ``position`` was more than one past the last one this subscription
            handed out for its room (an event was published out of order, dropped, or
            never published; the event itself follows the notice).
        since: wall-clock time (Unix seconds) when the gap began.
        positions: the last position this subscription handed out (or was told of with
            :meth:`EventSubscription.advance`) for each room of ``room_ids`` that has
            one: catch up with ``changes(after=positions[room])``. Rooms it never saw a
            position of are absent.
    """

    room_ids: frozenset[UUID]
    reason: GapReason
    since: float
    positions: Mapping[UUID, int] = field(default_factory=dict, hash=False)


def event_of_change(change: Change) -> Event | None:
    """The event a writer publishes for ``change``, built from the log alone.

    A change read from the log (:meth:`chatkeep.ChatKeep.changes`, the change stream,
    the outbox relay's read) gives the event its writer published live, field for field
    but for ``event_id``, ``occurred_at`` (the change's own time here) and ``origin``: a
    ``message.created`` carries the message's body, ``reply_to`` and mentions as the log
    shows them. ``None`` for a change no event stands for (``room.deleted``, or a
    deletion by nobody, as a cascade of a deleted user's account makes).

    Raises:
        InvalidInput: ``change`` is not a :class:`~chatkeep.models.Change`.
    """
    if not isinstance(change, Change):
        raise InvalidInput("change", "must be a chatkeep.models.Change")
    data = change.data
    common: dict[str, Any] = {
        "room_id": change.room_id,
        "position": change.position,
        "occurred_at": change.occurred_at,
    }
    kind = change.kind
    if kind == "message.created":
        return MessageCreated(
            **common,
            message_id=change.message_id,
            seq=change.seq,
            sender_id=data["user_id"],
            client_msg_id=data.get("client_msg_id"),
            body=data.get("content"),
            reply_to=data.get("reply_to"),
            mentions=tuple(data.get("mentions") or ()),
            mentions_room=bool(data.get("mentions_room")),
        )
    if kind == "message.edited":
        return MessageEdited(
            **common,
            message_id=change.message_id,
            seq=change.seq,
            editor_id=change.actor_id or data["user_id"],
            body=data.get("content"),
        )
    if kind == "message.deleted":
        if change.actor_id is None:
            return None
        return MessageDeleted(
            **common, message_id=change.message_id, seq=change.seq, deleted_by=change.actor_id
        )
    if kind in ("reaction.added", "reaction.removed"):
        model = ReactionAdded if kind == "reaction.added" else ReactionRemoved
        return model(
            **common,
            message_id=change.message_id,
            seq=change.seq,
            user_id=data["user_id"],
            emoji=data["emoji"],
            count=data["count"],
        )
    if kind == "member.joined":
        return MemberJoined(**common, user_id=data["user_id"], role=data.get("role"))
    if kind in ("member.left", "member.removed"):
        return MemberLeft(**common, user_id=data["user_id"])
    if kind == "member.role_changed":
        return MemberRoleChanged(**common, user_id=data["user_id"], role=data["role"])
    if kind == "room.updated":
        return RoomUpdated(
            **common,
            name=data["name"],
            description=data.get("description"),
            is_active=data.get("is_active", True),
        )
    return None


def _check_event(event: object) -> Event:
    if not isinstance(event, _EVENT_TYPES):
        raise InvalidInput("event", "must be one of the chatkeep.realtime event models")
    return event


def encode_event(event: Event) -> bytes:
    """The wire form (JSON bytes) of ``event``.

    Raises:
        InvalidInput: ``event`` is not one of the event models.
    """
    return _check_event(event).model_dump_json().encode()


def decode_event(data: bytes | str) -> Event | None:
    """Parse the wire form; ``None`` (with a warning) for anything this version can't read.

    Unreadable payloads are skipped rather than raised: one bad publisher must not stop
    every subscriber.
    """
    try:
        raw = json.loads(data)
    except ValueError:
        logger.warning("skipped an event that is not JSON")
        return None
    if not isinstance(raw, dict):
        logger.warning("skipped an event that is not a JSON object")
        return None
    version = raw.get("v")
    if not isinstance(version, int) or version > WIRE_VERSION or version < 1:
        logger.warning("skipped an event of unsupported version %r", version)
        return None
    try:
        return _EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        logger.warning(
            "skipped an unreadable event of type %r (%d errors)",
            raw.get("type"),
            exc.error_count(),
            extra={"errors": exc.error_count()},
        )
        return None


class EventSubscription:
    """A node's subscription to some rooms' events; iterate it for events and gaps.

    Made by :meth:`EventBus.subscribe`. Yields :data:`Event` models and :class:`RoomGap`
    notices; undecodable payloads are skipped.

    Events that carry a ``position`` (the changes of the room's log) are checked per
    room against the last position handed out: one at or below it is a duplicate (the
    relay republishes what a writer may already have published) and is dropped; one
    more than a step past it is preceded by a ``RoomGap`` with reason ``"position"``
    naming the room and the last position seen, so the caller catches up from there.
    The first positioned event of a room sets its baseline unless :meth:`advance` set
    one. Events without a position (typing, presence, read, or from older publishers)
    pass unchanged.
    """

    def __init__(self, bus: EventBus, inner: ChannelSubscription) -> None:
        self._bus = bus
        self._inner = inner
        self._positions: dict[UUID, int] = {}
        # An event that follows the position gap just returned.
        self._pending: deque[Event] = deque()

    @property
    def room_ids(self) -> frozenset[UUID]:
        """The rooms this subscription listens to."""
        return frozenset(
            room for room in map(self._bus.room_of_channel, self._inner.channels) if room
        )

    @property
    def positions(self) -> Mapping[UUID, int]:
        """The last position handed out (or advanced to) per room, read-only."""
        return dict(self._positions)

    def advance(self, room_id: UUID, position: int) -> None:
        """Note that the caller has everything of ``room_id`` up to ``position``.

        Later events at or below it are dropped as duplicates, and one past
        ``position + 1`` is reported as a gap. A position below the one already noted is
        ignored (positions only move forward).

        Raises:
            InvalidInput: ``position`` is not a non-negative int.
        """
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidInput("position", "must be an int >= 0")
        if position > self._positions.get(room_id, -1):
            self._positions[room_id] = position

    async def add_rooms(self, *room_ids: UUID) -> None:
        """Listen to more rooms; returns once Redis confirmed.

        Raises:
            InvalidInput: no room, or a room id is not a UUID.
            Unavailable: Redis could not be reached (nothing was added).
        """
        await self._inner.add(*self._bus.channels(room_ids))

    async def remove_rooms(self, *room_ids: UUID) -> None:
        """Stop listening to rooms (unknown ones are ignored); their positions are forgotten."""
        await self._inner.remove(*self._bus.channels(room_ids))
        for room in room_ids:
            self._positions.pop(room, None)

    async def get(self) -> Event | RoomGap | None:
        """The next event or gap notice (waiting for it); ``None`` once closed.

        Bound the wait with ``asyncio.timeout`` if needed.
        """
        while True:
            if self._pending:
                return self._observed(self._pending.popleft())
            item = await self._inner.get()
            if item is None:
                return None
            converted = self._convert(item)
            if converted is not None:
                return self._observed(converted)

    def poll(self) -> Event | RoomGap | None:
        """The next event or gap notice if one has arrived, else ``None``; never waits.

        For a reader that handles a burst at once (several events → one catch-up read).
        """
        while True:
            if self._pending:
                return self._observed(self._pending.popleft())
            item = self._inner.get_nowait()
            if item is None:
                return None
            converted = self._convert(item)
            if converted is not None:
                return self._observed(converted)

    def _convert(self, item: PubSubMessage | SubscriptionGap) -> Event | RoomGap | None:
        """The event or gap ``item`` stands for; ``None`` to skip it (unreadable, a duplicate)."""
        if isinstance(item, SubscriptionGap):
            rooms = frozenset(
                room for room in map(self._bus.room_of_channel, item.channels) if room
            )
            known = {room: self._positions[room] for room in rooms if room in self._positions}
            return RoomGap(rooms, item.reason, item.since, known)
        event = decode_event(item.data)
        if event is None or event.position is None:
            return event
        room, position = event.room_id, event.position
        last = self._positions.get(room)
        if last is not None and position <= last:
            return None  # already handed out (or caught up past it): at-least-once de-dup
        self._positions[room] = position
        if last is not None and position > last + 1:
            self._pending.append(event)
            return RoomGap(frozenset((room,)), "position", time.time(), {room: last})
        return event

    def _observed(self, item: Event | RoomGap) -> Event | RoomGap:
        observer = self._bus.on_receive
        if observer is not None:
            observer(item)
        return item

    def __aiter__(self) -> AsyncIterator[Event | RoomGap]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event | RoomGap]:
        while True:
            item = await self.get()
            if item is None:
                return
            yield item

    async def aclose(self) -> None:
        """Unsubscribe from every room and end iteration."""
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class EventBus:
    """Publishes room events and subscribes to them.

    Args:
        client: the shared Redis connection.
        node_id: stamped as ``origin`` on events this node publishes without one.
    """

    def __init__(self, client: RedisClient, *, node_id: str | None = None) -> None:
        self._client = client
        self._node = validate_id(node_id, "node_id") if node_id is not None else None
        self._publish_script = client.script(_PUBLISH_MANY)
        # Optional observer of every event and gap its subscriptions hand out (metrics).
        self.on_receive: Callable[[Event | RoomGap], None] | None = None

    def channels(self, room_ids: Iterable[UUID]) -> list[str]:
        """The pub/sub channel names of ``room_ids``."""
        return [self._client.keys.room_events(room) for room in room_ids]

    def room_of_channel(self, channel: str) -> UUID | None:
        """The room a channel name belongs to, if it is a room event channel."""
        return self._client.keys.room_of_events_channel(channel)

    def _stamp(self, event: Event) -> Event:
        if self._node is not None and event.origin is None:
            return event.model_copy(update={"origin": self._node})
        return event

    async def publish(self, event: Event) -> int:
        """Publish ``event`` on its room's channel; returns how many nodes received it.

        Call it after the PostgreSQL commit that made the event true. An event with a
        ``position`` also raises the room's published mark (see :meth:`published`).

        Raises:
            InvalidInput: ``event`` is not an event model.
            Unavailable: Redis could not be reached.
        """
        _check_event(event)  # before _stamp reads its fields (AttributeError otherwise)
        if event.position is not None:
            return (await self.publish_many([event]))[0]
        data = encode_event(self._stamp(event))
        channel = self._client.keys.room_events(event.room_id)
        with self._client.guard("events.publish"):
            command = self._client.publish_command  # SPUBLISH on a cluster
            return int(await self._client.redis.execute_command(command, channel, data))

    async def published(self, room_id: UUID) -> int:
        """The highest change-log position published for the room (0: none known).

        Raised by every publish of an event with a ``position``, never lowered; kept
        ``PUBLISHED_MARK_TTL_MS`` after the last such publish. A relay compares it with
        the room's position in PostgreSQL to find what a crashed writer did not publish.

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.room_published(room_id)
        with self._client.guard("events.published"):
            value = await self._client.redis.zscore(key, _MARK_MEMBER)
        return 0 if value is None else int(value)

    async def published_marks(self, room_ids: Iterable[UUID]) -> dict[UUID, int | None]:
        """Each room's published mark (``None``: no mark kept), in one round trip per node.

        Raises:
            InvalidInput: ``room_ids`` is not a collection of UUIDs.
            Unavailable: Redis could not be reached.
        """
        rooms = validate_collection(room_ids, "room_ids")
        keys = [self._client.keys.room_published(room) for room in rooms]
        if not keys:
            return {}
        # ZSCORE per room, pipelined: the marks are sorted sets (MGET reads them as nil),
        # and on a cluster the rooms' keys live in different slots.
        pipe = self._client.pipeline()
        for key in keys:
            pipe.zscore(key, _MARK_MEMBER)
        with self._client.guard("events.published_marks"):
            values = await pipe.execute()
        return {
            room: None if value is None else int(value)
            for room, value in zip(rooms, values, strict=True)
        }

    async def publish_many(self, events: Iterable[Event]) -> list[int]:
        """Publish several events in one round trip, in order.

        Raises:
            InvalidInput: ``events`` is not a collection, or one is not an event model
                (nothing is published then).
            Unavailable: Redis could not be reached.
        """
        checked = [_check_event(event) for event in validate_collection(events, "events")]
        encoded = [
            (self._client.keys.room_events(event.room_id), encode_event(self._stamp(event)))
            for event in checked
        ]
        if not encoded:
            return []
        marks: dict[UUID, int] = {}
        for event in checked:
            if event.position is not None:
                marks[event.room_id] = max(event.position, marks.get(event.room_id, 0))
        if not self._client.cluster:
            # One script call: one command to pack, run atomically (marks first, as below).
            args: list[str | int | bytes] = [_MARK_MEMBER, PUBLISHED_MARK_TTL_MS]
            args += marks.values()
            for channel, data in encoded:
                args += (channel, data)
            keys = [self._client.keys.room_published(room) for room in marks]
            with self._client.guard("events.publish_many"):
                counts: list[Any] = await self._publish_script(keys=keys, args=args)
            return [int(n) for n in counts]
        pipe = self._client.pipeline()
        counts_at = self._queue(pipe, encoded, marks)
        with self._client.guard("events.publish_many"):
            results = await pipe.execute()
        return [int(n) for n in results[counts_at]]

    def queue_publish(self, pipe: Pipeline | ClusterPipeline, events: Iterable[Event]) -> slice:
        """Queue the publish of ``events`` on ``pipe``, after what it already holds.

        For a caller that sends other commands in the same round trip (the facade's
        membership flows). The commands are those :meth:`publish_many` sends on a cluster
        (the published marks first, then one publish per event), so they are not atomic
        together; nor need they be (see :meth:`published`).

        Returns:
            Where the receiver counts (one per event) are in ``pipe.execute()``'s results.

        Raises:
            InvalidInput: ``events`` is not a collection, or one is not an event model
                (nothing is queued then).
        """
        checked = [_check_event(event) for event in validate_collection(events, "events")]
        encoded = [
            (self._client.keys.room_events(event.room_id), encode_event(self._stamp(event)))
            for event in checked
        ]
        marks: dict[UUID, int] = {}
        for event in checked:
            if event.position is not None:
                marks[event.room_id] = max(event.position, marks.get(event.room_id, 0))
        return self._queue(pipe, encoded, marks)

    def _queue(
        self,
        pipe: Pipeline | ClusterPipeline,
        encoded: list[tuple[str, bytes]],
        marks: dict[UUID, int],
    ) -> slice:
        # The marks go first: a reader that subscribed, then saw a mark below a change's
        # position, is sure to receive that change's publish (the facade's stream reuses a
        # finished read of the log on that proof).
        for room, position in marks.items():
            key = self._client.keys.room_published(room)
            pipe.zadd(key, {_MARK_MEMBER: position}, gt=True)
            pipe.pexpire(key, PUBLISHED_MARK_TTL_MS)
        start = len(pipe)
        for channel, data in encoded:
            pipe.execute_command(self._client.publish_command, channel, data)
        return slice(start, len(pipe))

    async def subscribe(self, *room_ids: UUID) -> EventSubscription:
        """Subscribe to the events of ``room_ids`` (at least one).

        Returns once Redis confirmed, so every event published afterwards is received
        (or covered by a :class:`RoomGap`).

        Raises:
            InvalidInput: no room, or a room id is not a UUID.
            Unavailable: Redis could not be reached.
        """
        inner = await self._client.subscribe(*self.channels(room_ids))
        return EventSubscription(self, inner)
