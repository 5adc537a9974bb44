"""chatkeep: the data layer of a real-time chat backend.

PostgreSQL is the source of truth (users, rooms, memberships, messages, read state); Redis
holds what is fast and fleeting (sessions, presence, typing, fan-out, rate limits, caches).
"""

from __future__ import annotations

from chatkeep.config import Settings
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    Conflict,
    InvalidInput,
    MigrationError,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResyncRequired,
    Unauthenticated,
    Unavailable,
)
from chatkeep.facade import ChatKeep, Health, LoginResult
from chatkeep.models import (
    Change,
    ChangePage,
    CreateMessageDto,
    CreateRoomBody,
    CreateRoomDto,
    CreateUserDto,
    CursorPage,
    EditMessageBody,
    Message,
    MessageReadStatus,
    MessageWithUser,
    ReactionCount,
    Room,
    RoomMember,
    RoomSummary,
    RoomUser,
    RoomWithUsers,
    SearchHit,
    SearchPage,
    SendMessageBody,
    UnreadCounts,
    UpdateRoomDto,
    UpdateUserDto,
    User,
    UserProfile,
)

__version__ = "0.1.0"

__all__ = [
    "Change",
    "ChangePage",
    "ChatKeep",
    "ChatkeepError",
    "ConfigurationError",
    "Conflict",
    "CreateMessageDto",
    "CreateRoomBody",
    "CreateRoomDto",
    "CreateUserDto",
    "CursorPage",
    "EditMessageBody",
    "Health",
    "InvalidInput",
    "LoginResult",
    "Message",
    "MessageReadStatus",
    "MessageWithUser",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ReactionCount",
    "ResyncRequired",
    "Room",
    "RoomMember",
    "RoomSummary",
    "RoomUser",
    "RoomWithUsers",
    "SearchHit",
    "SearchPage",
    "SendMessageBody",
    "Settings",
    "Unauthenticated",
    "Unavailable",
    "UnreadCounts",
    "UpdateRoomDto",
    "UpdateUserDto",
    "User",
    "UserProfile",
    "__version__",
]
