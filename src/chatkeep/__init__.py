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
    Unavailable,
)
from chatkeep.facade import ChatKeep, Health, LoginResult
from chatkeep.models import (
    CreateMessageDto,
    CreateRoomDto,
    CreateUserDto,
    CursorPage,
    Message,
    MessageReadStatus,
    MessageWithUser,
    Room,
    RoomMember,
    RoomSummary,
    RoomUser,
    RoomWithUsers,
    UnreadCounts,
    UpdateRoomDto,
    UpdateUserDto,
    User,
    UserProfile,
)

__version__ = "0.1.0"

__all__ = [
    "ChatKeep",
    "ChatkeepError",
    "ConfigurationError",
    "Conflict",
    "CreateMessageDto",
    "CreateRoomDto",
    "CreateUserDto",
    "CursorPage",
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
    "Room",
    "RoomMember",
    "RoomSummary",
    "RoomUser",
    "RoomWithUsers",
    "Settings",
    "Unavailable",
    "UnreadCounts",
    "UpdateRoomDto",
    "UpdateUserDto",
    "User",
    "UserProfile",
    "__version__",
]
