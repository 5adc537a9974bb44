"""The facade: one object over both stores, and the flows that span them.

::

    async with ChatKeep.connect(settings) as chat:
        user = await chat.users.register(CreateUserDto(...))
        message = await chat.send_message(room_id, user.id, "hello", client_msg_id="c-1")
        page = await chat.catch_up(room_id, user.id, after_seq=41)

Each flow lives here once: rate-limit, persist in PostgreSQL, publish on Redis, return.
PostgreSQL is the truth and goes first; Redis work comes after the commit and is
best-effort. If Redis is down, sends still succeed (the rate limit fails open, the event
is not published, and a warning is logged): subscribers learn of missed events through a
gap notification and catch up from PostgreSQL with :meth:`ChatKeep.catch_up`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final, Self

from chatkeep.config import Settings
from chatkeep.embedded import resolve_endpoints
from chatkeep.errors import ChatkeepError, InvalidInput, PermissionDenied, Unavailable
from chatkeep.models import (
    CreateMessageDto,
    CursorPage,
    Message,
    MessageType,
    MessageWithUser,
    RoomRole,
    RoomUser,
    User,
    UserProfile,
)
from chatkeep.realtime import (
    Event,
    EventBus,
    EventSubscription,
    IssuedRefreshToken,
    IssuedSession,
    JsonSerializer,
    LoginThrottle,
    MemberJoined,
    MemberLeft,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    MessagesRead,
    OfflineUser,
    Presence,
    PresenceChanged,
    RateLimit,
    RateLimiter,
    RedisClient,
    RedisHealth,
    RefreshTokenStore,
    RoomMembersCache,
    SessionStore,
    SocketRegistry,
    TypingChanged,
    TypingIndicators,
    UserProfileCache,
)
from chatkeep.storage import Database, MessageRepository, RoomRepository, UserRepository
from chatkeep.storage.database import DatabaseHealth

__all__ = ["ChatKeep", "Health", "LoginResult"]

logger = logging.getLogger("chatkeep.facade")

DEFAULT_SEND_LIMIT: Final = RateLimit(limit=30, period=10.0, burst=20)
"""Messages a user may send: 30 per 10 seconds, bursts of 20."""


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A successful login: the user, a session token and the first refresh token."""

    user: User
    session: IssuedSession
    refresh: IssuedRefreshToken


@dataclass(frozen=True, slots=True)
class Health:
    """Both stores' health in one value."""

    database: DatabaseHealth
    redis: RedisHealth

    @property
    def ok(self) -> bool:
        """Both stores answered."""
        return self.redis.ok


class ChatKeep:
    """Both stores, their repositories and realtime services, and the flows that span them.

    Build it with :meth:`connect`; the attributes give direct access to each part:

    Attributes:
        db: the PostgreSQL pool.
        users, rooms, messages: the repositories (PostgreSQL only).
        redis: the Redis client.
        sessions, tokens, presence, typing, sockets, events, limiter, login_throttle:
            the realtime services (Redis only).
        profiles, members: the caches of user profiles and room membership.
    """

    def __init__(
        self,
        db: Database,
        redis: RedisClient,
        *,
        node_id: str | None = None,
        send_limit: RateLimit = DEFAULT_SEND_LIMIT,
        presence_timeout: float = 60.0,
        typing_ttl: float = 5.0,
    ) -> None:
        self.db = db
        self.redis = redis
        self.node_id = node_id or socket.gethostname()[:100] or "node"
        self.users = UserRepository(db)
        self.rooms = RoomRepository(db)
        self.messages = MessageRepository(db)
        self.sessions = SessionStore(redis)
        self.tokens = RefreshTokenStore(redis)
        self.sockets = SocketRegistry(redis, node_id=self.node_id)
        self.presence = Presence(
            redis, self.sockets, timeout=presence_timeout, on_offline=self._went_offline
        )
        self.typing = TypingIndicators(redis, ttl=typing_ttl)
        self.events = EventBus(redis, node_id=self.node_id)
        self.limiter = RateLimiter(redis, {"send": send_limit})
        self.login_throttle = LoginThrottle(redis)
        self.profiles: UserProfileCache[UserProfile] = UserProfileCache(
            redis, self._load_profile, JsonSerializer(UserProfile)
        )
        self.members = RoomMembersCache(redis, self._load_members)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        settings: Settings | None = None,
        *,
        node_id: str | None = None,
        send_limit: RateLimit = DEFAULT_SEND_LIMIT,
        presence_timeout: float = 60.0,
        typing_ttl: float = 5.0,
    ) -> AsyncIterator[Self]:
        """Open both stores (starting embedded servers where no URL is set) and yield.

        Args:
            settings: where the stores are (default: read from the environment).
            node_id: this process's name in socket mappings and events (default: host).
            send_limit: the rate limit of :meth:`send_message` per user.
            presence_timeout: seconds without a heartbeat before a user is offline.
            typing_ttl: seconds a typing indicator lasts without being renewed.

        Raises:
            ConfigurationError: settings are missing or unsafe.
            Unavailable: PostgreSQL cannot be reached (Redis being down is tolerated).
        """
        settings = settings if settings is not None else Settings.load()
        with resolve_endpoints(settings) as found:
            async with (
                Database(settings, dsn=found.database_url) as db,
                RedisClient.from_settings(settings, url=found.redis_url) as redis,
            ):
                yield cls(
                    db,
                    redis,
                    node_id=node_id,
                    send_limit=send_limit,
                    presence_timeout=presence_timeout,
                    typing_ttl=typing_ttl,
                )

    # -- loaders for the caches (PostgreSQL reads) -------------------------------------------

    async def _load_profile(self, user_id: uuid.UUID) -> UserProfile | None:
        user = await self.users.find_by_id(user_id)
        return user.profile() if user is not None else None

    async def _load_members(self, room_id: uuid.UUID) -> frozenset[uuid.UUID] | None:
        found = await self.rooms.members(room_id)
        return frozenset(m.user.id for m in found.members)

    async def _went_offline(self, users: Sequence[OfflineUser]) -> None:
        # last_seen goes to PostgreSQL when a user goes offline, not on every heartbeat.
        for gone in users:
            with contextlib.suppress(ChatkeepError):
                await self.users.touch_last_seen(gone.user_id)

    # -- best-effort Redis work after a commit ---------------------------------------------

    async def _publish(self, *events: Event) -> None:
        try:
            await self.events.publish_many(events)
        except Unavailable as exc:
            # The change is committed; subscribers will see a gap and catch up by seq.
            logger.warning("event not published (redis unavailable): %s", exc)

    async def _invalidate_members(self, room_id: uuid.UUID) -> None:
        try:
            await self.members.invalidate(room_id)
        except Unavailable as exc:  # entries expire by TTL; log so the lag is visible
            logger.warning("membership cache not invalidated for %s: %s", room_id, exc)

    def _outside_transaction(self, flow: str) -> None:
        if self.db.in_transaction():
            raise ChatkeepError(
                f"{flow} publishes after its commit: call it outside db.transaction()"
            )

    async def _require_member(self, room_id: uuid.UUID, user_id: uuid.UUID) -> None:
        if not isinstance(room_id, uuid.UUID):
            raise InvalidInput("room_id", "must be a UUID")
        if not isinstance(user_id, uuid.UUID):
            raise InvalidInput("user_id", "must be a UUID")
        if not await self.members.is_member(room_id, user_id):
            raise PermissionDenied("only members of the room may do this")

    # -- authentication ---------------------------------------------------------------------

    async def login(self, email: str, password: str) -> LoginResult | None:
        """Check a password (throttled per account) and start a session.

        Returns ``None`` for a wrong email or password, in the same time either way.

        Raises:
            RateLimited: the account is locked after repeated failures, or tried too fast.
            Unavailable: Redis is down (logins need sessions, which live there).
        """
        if not isinstance(email, str):
            raise InvalidInput("email", "must be a string")
        await self.login_throttle.check(email)
        user = await self.users.authenticate(email, password)
        if user is None:
            await self.login_throttle.record_failure(email)
            return None
        await self.login_throttle.record_success(email)
        session = await self.sessions.create(user.id)
        refresh = await self.tokens.issue(user.id, session_id=session.session.session_id)
        return LoginResult(user, session, refresh)

    # -- messages ---------------------------------------------------------------------------

    async def send_message(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        content: str,
        *,
        client_msg_id: str | None = None,
        type: MessageType = "text",
    ) -> Message:
        """Rate-limit, persist, publish; returns the stored message.

        A repeated ``client_msg_id`` returns the first message and publishes nothing new.

        Raises:
            RateLimited: the user sends too fast (``retry_after`` says how long to wait).
            PermissionDenied: the user is not a member of the room.
            NotFound: no such room.
            InvalidInput: the content or ids break a rule.
        """
        self._outside_transaction("send_message")
        dto = CreateMessageDto(
            room_id=room_id,
            user_id=user_id,
            content=content,
            type=type,
            client_msg_id=client_msg_id,
        )
        try:
            await self.limiter.enforce(str(dto.user_id), "send")
        except Unavailable as exc:
            # Fail open: an outage of the limiter must not stop messages.
            logger.warning("send rate limit not checked (redis unavailable): %s", exc)
        message = await self.messages.send(dto)
        await self._publish(
            MessageCreated(
                room_id=message.room_id,
                message_id=message.id,
                seq=message.seq,
                sender_id=message.user_id,
                client_message_id=message.client_msg_id,
            )
        )
        return message

    async def edit_message(
        self, message_id: uuid.UUID, user_id: uuid.UUID, content: str
    ) -> Message:
        """Edit the author's own message, then publish the edit.

        Raises:
            NotFound: no such message.
            PermissionDenied: the user is not the author.
            InvalidInput: the content breaks a rule.
        """
        self._outside_transaction("edit_message")
        message = await self.messages.edit(message_id, content, by=user_id)
        await self._publish(
            MessageEdited(
                room_id=message.room_id,
                message_id=message.id,
                seq=message.seq,
                editor_id=user_id,
            )
        )
        return message

    async def delete_message(self, message_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Delete a message (the author, or an owner/admin of the room); publish it.

        Returns False if there was no such message.

        Raises:
            PermissionDenied: the user may not delete it.
        """
        self._outside_transaction("delete_message")
        found = await self.messages.find_by_id(message_id)
        if found is None:
            return False
        if not await self.messages.delete(message_id, by=user_id):
            return False
        await self._publish(
            MessageDeleted(
                room_id=found.room_id, message_id=found.id, seq=found.seq, deleted_by=user_id
            )
        )
        return True

    async def mark_read(
        self, room_id: uuid.UUID, user_id: uuid.UUID, seq: int | None = None
    ) -> int:
        """Move the user's read watermark forward (default: to the newest message); publish.

        Returns the watermark after the call (it never moves backward).
        """
        self._outside_transaction("mark_read")
        watermark = await self.messages.mark_read(room_id, user_id, seq)
        await self._publish(MessagesRead(room_id=room_id, user_id=user_id, last_read_seq=watermark))
        return watermark

    async def unread_counts(self, user_id: uuid.UUID) -> dict[uuid.UUID, int]:
        """Unread messages per room for every room of the user (one query)."""
        return await self.messages.unread_counts(user_id)

    async def catch_up(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        after_seq: int,
        limit: int = 100,
    ) -> CursorPage[MessageWithUser]:
        """Messages of the room after ``after_seq``, from PostgreSQL, for a member.

        This is how a client that reconnects (or whose subscription reported a gap)
        misses nothing: it asks for everything after the last ``seq`` it saw and follows
        ``page.after`` until it is ``None``.

        Raises:
            PermissionDenied: the user is not a member of the room.
        """
        await self._require_member(room_id, user_id)
        return await self.messages.history(room_id, after_seq=after_seq, limit=limit)

    # -- membership -------------------------------------------------------------------------

    async def join(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        role: RoomRole = "member",
        by: uuid.UUID | None = None,
    ) -> RoomUser:
        """Add a member (``by`` defaults to the user: a self-join of a public room).

        Persists, invalidates the membership cache, publishes ``member.joined``.
        """
        self._outside_transaction("join")
        member = await self.rooms.add_member(
            room_id, user_id, role=role, by=user_id if by is None else by
        )
        await self._invalidate_members(room_id)
        await self._publish(MemberJoined(room_id=room_id, user_id=user_id, role=member.role))
        return member

    async def leave(
        self, room_id: uuid.UUID, user_id: uuid.UUID, *, by: uuid.UUID | None = None
    ) -> bool:
        """Remove a member (``by`` defaults to the user: leaving). False if not a member.

        Persists, invalidates the membership cache, publishes ``member.left``.
        """
        self._outside_transaction("leave")
        removed = await self.rooms.remove_member(room_id, user_id, by=user_id if by is None else by)
        if removed:
            await self._invalidate_members(room_id)
            await self._publish(MemberLeft(room_id=room_id, user_id=user_id))
        return removed

    # -- sockets, presence, typing ----------------------------------------------------------

    async def connect_socket(
        self, user_id: uuid.UUID, socket_id: str, *, rooms: Sequence[uuid.UUID] = ()
    ) -> bool:
        """Map a new socket to its user and node and mark the user online in ``rooms``.

        Returns True when the user just came online (their first socket); then a
        ``presence`` event goes to each of ``rooms``.
        """
        came_online = await self.presence.connect(user_id, socket_id, rooms=rooms)
        if came_online:
            await self._publish(
                *(PresenceChanged(room_id=r, user_id=user_id, status="online") for r in rooms)
            )
        return came_online

    async def heartbeat(
        self, user_id: uuid.UUID, socket_id: str, *, rooms: Sequence[uuid.UUID] = ()
    ) -> bool:
        """Keep a socket (and its user) alive; call every ``presence_timeout / 3`` s."""
        return await self.presence.heartbeat(user_id, socket_id, rooms=rooms)

    async def disconnect_socket(
        self, socket_id: str, *, rooms: Sequence[uuid.UUID] = ()
    ) -> OfflineUser | None:
        """Drop a socket; if it was its user's last, write last_seen and publish offline."""
        gone = await self.presence.disconnect(socket_id)
        if gone is not None:
            await self._publish(
                *(
                    PresenceChanged(
                        room_id=r, user_id=gone.user_id, status="offline", last_seen=gone.last_seen
                    )
                    for r in rooms
                )
            )
        return gone

    async def set_typing(self, room_id: uuid.UUID, user_id: uuid.UUID, typing: bool = True) -> None:
        """Start (or stop) a typing indicator of a member; it expires by itself.

        Raises:
            PermissionDenied: the user is not a member of the room.
        """
        await self._require_member(room_id, user_id)
        if typing:
            await self.typing.start(room_id, user_id)
        else:
            await self.typing.stop(room_id, user_id)
        await self._publish(TypingChanged(room_id=room_id, user_id=user_id, typing=typing))

    async def subscribe(self, *room_ids: uuid.UUID) -> EventSubscription:
        """Subscribe to the events of ``room_ids`` (see :class:`~chatkeep.realtime.EventBus`)."""
        return await self.events.subscribe(*room_ids)

    async def profile(self, user_id: uuid.UUID) -> UserProfile | None:
        """A user's public profile, from the cache (PostgreSQL on a miss or an outage)."""
        return await self.profiles.get(user_id)

    async def health(self) -> Health:
        """Latency and state of both stores.

        Raises:
            Unavailable: PostgreSQL cannot be reached (Redis's state is in ``redis``).
        """
        return Health(database=await self.db.health(), redis=await self.redis.health())
