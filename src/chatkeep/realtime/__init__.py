"""Realtime state on Redis: sessions, tokens, presence, typing, sockets, events, limits, caches.

Everything here talks to Redis only (PostgreSQL lives in :mod:`chatkeep.storage`; flows
that span both live in the facade). Start with a :class:`RedisClient` and hand it to the
services::

    async with RedisClient.from_settings(settings) as client:
        sessions = SessionStore(client)
        presence = Presence(client, SocketRegistry(client, node_id="web-1"))
        bus = EventBus(client, node_id="web-1")

Every key name comes from :class:`KeySpace` (see ``docs/redis-keys.md``). Redis errors
reach callers as :class:`chatkeep.errors.Unavailable` (or ``ConfigurationError`` for
rejected credentials), chained with ``from exc``.
"""

from __future__ import annotations

from chatkeep.realtime.cache import (
    CacheStats,
    JsonSerializer,
    Loader,
    MessageRoomCache,
    ReadThroughCache,
    RoomMembersCache,
    Serializer,
    Unshared,
    UserProfileCache,
)
from chatkeep.realtime.client import RedisClient, RedisHealth
from chatkeep.realtime.errors import translate_error
from chatkeep.realtime.events import (
    PUBLISHED_MARK_TTL_MS,
    WIRE_VERSION,
    ChangesAvailable,
    Event,
    EventBus,
    EventSubscription,
    GapReason,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    MessageDeleted,
    MessageEdited,
    MessagesRead,
    PresenceChanged,
    ReactionAdded,
    ReactionRemoved,
    RoomEvent,
    RoomGap,
    RoomUpdated,
    TypingChanged,
    decode_event,
    encode_event,
    event_of_change,
)
from chatkeep.realtime.keys import KeySpace
from chatkeep.realtime.presence import Heartbeat, OfflineHandler, OfflineUser, Presence
from chatkeep.realtime.pubsub import ChannelSubscription, PubSubMessage, SubscriptionGap
from chatkeep.realtime.ratelimit import (
    LoginFailure,
    LoginThrottle,
    RateLimit,
    RateLimiter,
    RateLimitResult,
)
from chatkeep.realtime.sessions import IssuedSession, Session, SessionStore
from chatkeep.realtime.sockets import SocketInfo, SocketRegistry
from chatkeep.realtime.tokens import IssuedRefreshToken, RefreshTokenStore, TokenReuse
from chatkeep.realtime.typing_indicators import TypingIndicators

__all__ = [
    "PUBLISHED_MARK_TTL_MS",
    "WIRE_VERSION",
    "CacheStats",
    "ChangesAvailable",
    "ChannelSubscription",
    "Event",
    "EventBus",
    "EventSubscription",
    "GapReason",
    "Heartbeat",
    "IssuedRefreshToken",
    "IssuedSession",
    "JsonSerializer",
    "KeySpace",
    "Loader",
    "LoginFailure",
    "LoginThrottle",
    "MemberJoined",
    "MemberLeft",
    "MemberRoleChanged",
    "MessageCreated",
    "MessageDeleted",
    "MessageEdited",
    "MessageRoomCache",
    "MessagesRead",
    "OfflineHandler",
    "OfflineUser",
    "Presence",
    "PresenceChanged",
    "PubSubMessage",
    "RateLimit",
    "RateLimitResult",
    "RateLimiter",
    "ReactionAdded",
    "ReactionRemoved",
    "ReadThroughCache",
    "RedisClient",
    "RedisHealth",
    "RefreshTokenStore",
    "RoomEvent",
    "RoomGap",
    "RoomMembersCache",
    "RoomUpdated",
    "Serializer",
    "Session",
    "SessionStore",
    "SocketInfo",
    "SocketRegistry",
    "SubscriptionGap",
    "TokenReuse",
    "TypingChanged",
    "TypingIndicators",
    "Unshared",
    "UserProfileCache",
    "decode_event",
    "encode_event",
    "event_of_change",
    "translate_error",
]
