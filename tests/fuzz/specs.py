"""Per-method argument specs: a valid call of every public coroutine method, and its types.

Each :class:`Spec` builds a call that would succeed from a :class:`~tests.fuzz.conftest.World`
and says, for each parameter, which types it takes (:class:`Param`). The suite replaces one
argument at a time with a bad value; a value of a type the parameter does not take must be
refused with ``InvalidInput`` naming the parameter (or one of its ``blames``: a DTO field,
the rule's own name).

The completeness test checks that these specs name exactly the public coroutine methods
of :data:`CLASSES` and exactly their parameters, so a new method or parameter without a
spec here fails the suite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from chatkeep import (
    ChatKeep,
    CreateMessageDto,
    CreateRoomDto,
    CreateUserDto,
    UpdateUserDto,
)
from chatkeep.models import ThreadSummary, UpdateRoomDto
from chatkeep.realtime import (
    EventBus,
    EventSubscription,
    Heartbeat,
    LoginThrottle,
    MessagesRead,
    Presence,
    RateLimit,
    RateLimiter,
    RefreshTokenStore,
    RoomMembersCache,
    SessionStore,
    SocketRegistry,
    TypingIndicators,
    UserProfileCache,
)
from chatkeep.realtime.events import _EVENT_TYPES
from chatkeep.relay import OutboxRelay
from chatkeep.storage import MessageRepository, RoomRepository, UserRepository
from chatkeep.storage.changes import ChangeRepository
from chatkeep.storage.reactions import ReactionRepository
from chatkeep.stream import ChangeStream
from tests.fuzz.conftest import PASSWORD, World

Accepts = Callable[[object], bool]

#: Every class whose public coroutine methods take caller input. (``ReadThroughCache``
#: is covered through ``UserProfileCache``, its subclass the facade uses.)
CLASSES: tuple[type, ...] = (
    ChatKeep,
    UserRepository,
    RoomRepository,
    MessageRepository,
    ChangeRepository,
    ReactionRepository,
    SessionStore,
    RefreshTokenStore,
    Presence,
    TypingIndicators,
    SocketRegistry,
    EventBus,
    EventSubscription,
    RateLimiter,
    LoginThrottle,
    UserProfileCache,
    RoomMembersCache,
    OutboxRelay,
    ChangeStream,
)


def of(*types: type) -> Accepts:
    """Values of ``types`` may be valid (``bool`` only if listed: it is an ``int``)."""

    def accepts(value: object) -> bool:
        if isinstance(value, bool) and bool not in types:
            return False
        return isinstance(value, types)

    return accepts


def collection(value: object) -> bool:
    """A collection of values: iterable, but not a string, bytes or a lone UUID."""
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | bytearray)


NONE = type(None)
ID = of(uuid.UUID, str)  # the facade and the repositories take a UUID or its string
OPT_ID = of(uuid.UUID, str, NONE)
UUID_ONLY = of(uuid.UUID)  # the realtime services take UUID objects only
OPT_UUID = of(uuid.UUID, NONE)
STR = of(str)
OPT_STR = of(str, NONE)
INT = of(int)
OPT_INT = of(int, NONE)
BOOL = of(bool)
NUMBER = of(int, float)
OPT_NUMBER = of(int, float, NONE)


@dataclass(frozen=True)
class Param:
    """One parameter: the types it takes, and other field names its errors may carry."""

    accepts: Accepts
    blames: frozenset[str] = frozenset()


def P(accepts: Accepts, *blames: str) -> Param:  # noqa: N802 - reads as a type in the tables
    return Param(accepts, frozenset(blames))


@dataclass(frozen=True)
class Spec:
    """A method's valid call (keyword arguments; a ``*args`` parameter as a tuple)."""

    target: Callable[[World], Any]
    valid: Callable[[World], dict[str, Any]]
    params: Mapping[str, Param] = field(default_factory=dict)
    #: The method runs until cancelled when its input is good (a sweeper loop): a good
    #: value is one still running after FOREVER_TIMEOUT seconds.
    forever: bool = False


def _reaction(target: Callable[[World], Any]) -> Spec:
    """react and unreact, on the facade or the repository: the member's 👍 on the message."""
    return Spec(
        target,
        lambda w: {"message_id": w.message.id, "user_id": w.member.id, "emoji": "👍"},
        {"message_id": P(ID), "user_id": P(ID), "emoji": P(STR)},
    )


def _family(world: World) -> uuid.UUID:
    return uuid.UUID(hex=world.refresh_token.partition(".")[0])


def _chat(w: World) -> Any:
    return w.chat


def _users(w: World) -> Any:
    return w.repos.users


def _rooms(w: World) -> Any:
    return w.repos.rooms


def _messages(w: World) -> Any:
    return w.repos.messages


def _new_user(w: World) -> CreateUserDto:
    return CreateUserDto(email=f"new{w.n}@example.org", username=f"new{w.n}", password=PASSWORD)


def _new_room(w: World) -> CreateRoomDto:
    return CreateRoomDto(name="new room", created_by=w.owner.id)


def _new_message(w: World) -> CreateMessageDto:
    return CreateMessageDto(room_id=w.public.id, user_id=w.member.id, content="new")


_AVATAR = UpdateUserDto(avatar_url="https://example.org/a.png")
_HISTORY = {
    "cursor": P(OPT_STR),
    "before_seq": P(OPT_INT),
    "after_seq": P(OPT_INT),
    "around": P(of(int, uuid.UUID, NONE)),
    "limit": P(INT),
}
_NO_POSITION = {"cursor": None, "before_seq": None, "after_seq": None, "around": None}
# A thread page, or the room's collapsed timeline: positions are seqs only.
_THREAD_PAGE = {**_HISTORY, "around": P(OPT_INT)}


def _thread_call() -> Spec:
    """A call on the member's message as a thread root, as the member."""
    return Spec(
        _chat,
        lambda w: {"root_message_id": w.message.id, "user_id": w.member.id},
        {"root_message_id": P(ID), "user_id": P(ID)},
    )


_SOCKET = {"user_id": P(UUID_ONLY), "socket_id": P(STR), "rooms": P(collection)}
_LIMIT = {
    "subject": P(STR),
    "action": P(STR),
    "limit": P(of(RateLimit, NONE)),
    "cost": P(INT),
}


def _repository_crud(
    target: Callable[[World], Any],
    entity: Callable[[World], uuid.UUID],
    create: Callable[[World], Any],
    create_type: type,
    update: Callable[[World], Any],
    update_type: type,
) -> dict[str, Spec]:
    return {
        "find_by_id": Spec(target, lambda w: {"id": entity(w)}, {"id": P(ID)}),
        "get": Spec(target, lambda w: {"id": entity(w)}, {"id": P(ID)}),
        "create": Spec(target, lambda w: {"dto": create(w)}, {"dto": P(of(create_type))}),
        "update": Spec(
            target,
            lambda w: {"id": entity(w), "dto": update(w)},
            {"id": P(ID), "dto": P(of(update_type))},
        ),
    }


SPECS: dict[str, Spec] = {
    # -- the facade ------------------------------------------------------------------------
    "ChatKeep.register": Spec(
        _chat, lambda w: {"dto": _new_user(w)}, {"dto": P(of(CreateUserDto))}
    ),
    "ChatKeep.login": Spec(
        _chat,
        lambda w: {"email": w.member.email, "password": PASSWORD},
        {"email": P(STR), "password": P(STR)},
    ),
    "ChatKeep.refresh": Spec(
        _chat, lambda w: {"refresh_token": w.refresh_token}, {"refresh_token": P(STR)}
    ),
    "ChatKeep.unlock_login": Spec(_chat, lambda w: {"email": w.member.email}, {"email": P(STR)}),
    "ChatKeep.update_profile": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "dto": _AVATAR},
        {"user_id": P(ID), "dto": P(of(UpdateUserDto))},
    ),
    "ChatKeep.change_password": Spec(
        _chat,
        lambda w: {
            "user_id": w.member.id,
            "current_password": PASSWORD,
            "new_password": "another horse",
        },
        {
            "user_id": P(ID),
            "current_password": P(STR),
            "new_password": P(STR, "password"),
        },
    ),
    "ChatKeep.deactivate_user": Spec(_chat, lambda w: {"user_id": w.member.id}, {"user_id": P(ID)}),
    "ChatKeep.profile": Spec(_chat, lambda w: {"user_id": w.member.id}, {"user_id": P(ID)}),
    "ChatKeep.send_message": Spec(
        _chat,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.member.id,
            "content": "hi",
            "client_msg_id": None,
            "type": "text",
            "reply_to": None,
        },
        {
            "room_id": P(ID),
            "user_id": P(ID),
            "content": P(STR),
            "client_msg_id": P(OPT_STR),
            "type": P(STR),
            "reply_to": P(OPT_ID),
        },
    ),
    "ChatKeep.edit_message": Spec(
        _chat,
        lambda w: {"message_id": w.message.id, "user_id": w.member.id, "content": "edited"},
        {"message_id": P(ID), "user_id": P(ID), "content": P(STR)},
    ),
    "ChatKeep.delete_message": Spec(
        _chat,
        lambda w: {"message_id": w.message.id, "user_id": w.member.id},
        {"message_id": P(ID), "user_id": P(ID)},
    ),
    "ChatKeep.mark_read": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "seq": None},
        {"room_id": P(ID), "user_id": P(ID), "seq": P(OPT_INT)},
    ),
    "ChatKeep.unread_counts": Spec(_chat, lambda w: {"user_id": w.member.id}, {"user_id": P(ID)}),
    "ChatKeep.react": _reaction(_chat),
    "ChatKeep.unreact": _reaction(_chat),
    "ChatKeep.room_position": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id},
        {"room_id": P(ID), "user_id": P(ID)},
    ),
    "ChatKeep.changes": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "after": 0, "limit": 100},
        {"room_id": P(ID), "user_id": P(ID), "after": P(INT), "limit": P(INT)},
    ),
    "ChatKeep.catch_up": Spec(
        _chat,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.member.id,
            "after_seq": 0,
            "cursor": None,
            "limit": 50,
        },
        {
            "room_id": P(ID),
            "user_id": P(ID),
            # Exactly one of the two: the rule is reported under after_seq.
            "after_seq": P(OPT_INT),
            "cursor": P(OPT_STR, "after_seq"),
            "limit": P(INT),
        },
    ),
    "ChatKeep.history": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, **_NO_POSITION, "limit": 50},
        {"room_id": P(ID), "user_id": P(ID), **_HISTORY},
    ),
    "ChatKeep.collapsed_history": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, **_NO_POSITION, "limit": 50},
        {"room_id": P(ID), "user_id": P(ID), **_THREAD_PAGE},
    ),
    "ChatKeep.thread": Spec(
        _chat,
        lambda w: {
            "root_message_id": w.message.id,
            "user_id": w.member.id,
            **_NO_POSITION,
            "limit": 50,
        },
        {"root_message_id": P(ID), "user_id": P(ID), **_THREAD_PAGE},
    ),
    "ChatKeep.thread_summary": _thread_call(),
    "ChatKeep.follow_thread": _thread_call(),
    "ChatKeep.unfollow_thread": _thread_call(),
    "ChatKeep.mark_thread_read": _thread_call(),
    "ChatKeep.room_threads": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "before_seq": None, "limit": 50},
        {"room_id": P(ID), "user_id": P(ID), "before_seq": P(OPT_INT), "limit": P(INT)},
    ),
    "ChatKeep.followed_threads": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "room_id": None, "before": None, "limit": 50},
        {
            "user_id": P(ID),
            "room_id": P(OPT_ID),
            "before": P(of(ThreadSummary, NONE)),
            "limit": P(INT),
        },
    ),
    "ChatKeep.mentions": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "before": None, "limit": 50},
        {"user_id": P(ID), "before": P(OPT_ID), "limit": P(INT)},
    ),
    "ChatKeep.badges": Spec(_chat, lambda w: {"user_id": w.member.id}, {"user_id": P(ID)}),
    "ChatKeep.search": Spec(
        _chat,
        lambda w: {
            "user_id": w.member.id,
            "query": "hello world",
            "room_id": None,
            "author_id": None,
            "since": None,
            "until": None,
            "order": "newest",
            "limit": 20,
            "cursor": None,
        },
        {
            "user_id": P(ID),
            "query": P(STR),
            "room_id": P(OPT_ID),
            "author_id": P(OPT_ID),
            "since": P(of(datetime, NONE)),
            "until": P(of(datetime, NONE)),
            "order": P(STR),
            "limit": P(INT),
            "cursor": P(OPT_STR),
        },
    ),
    "ChatKeep.rooms_of": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "include_inactive": False},
        {"user_id": P(ID), "include_inactive": P(BOOL)},
    ),
    "ChatKeep.create_room": Spec(
        _chat, lambda w: {"dto": _new_room(w)}, {"dto": P(of(CreateRoomDto))}
    ),
    "ChatKeep.open_direct": Spec(
        _chat,
        lambda w: {"user_a": w.member.id, "user_b": w.owner.id},
        {"user_a": P(ID), "user_b": P(ID)},
    ),
    "ChatKeep.join": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.outsider.id, "role": "member", "by": None},
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(OPT_ID)},
    ),
    "ChatKeep.leave": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "by": None},
        {"room_id": P(ID), "user_id": P(ID), "by": P(OPT_ID)},
    ),
    "ChatKeep.remove_member": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "by": w.owner.id},
        {"room_id": P(ID), "user_id": P(ID), "by": P(ID)},
    ),
    "ChatKeep.change_role": Spec(
        _chat,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.member.id,
            "role": "admin",
            "by": w.owner.id,
        },
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(OPT_ID)},
    ),
    "ChatKeep.delete_room": Spec(
        _chat,
        lambda w: {"room_id": w.private.id, "by": w.owner.id},
        {"room_id": P(ID), "by": P(OPT_ID)},
    ),
    "ChatKeep.connect_socket": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "socket_id": f"s{w.n}", "rooms": [w.public.id]},
        {"user_id": P(ID), "socket_id": P(STR), "rooms": P(collection)},
    ),
    "ChatKeep.heartbeat": Spec(
        _chat,
        lambda w: {"user_id": w.member.id, "socket_id": f"s{w.n}", "rooms": [w.public.id]},
        {"user_id": P(ID), "socket_id": P(STR), "rooms": P(collection)},
    ),
    "ChatKeep.disconnect_socket": Spec(
        _chat,
        lambda w: {"socket_id": f"s{w.n}", "rooms": [w.public.id]},
        {"socket_id": P(STR), "rooms": P(collection)},
    ),
    "ChatKeep.sweep_presence": Spec(_chat, lambda w: {}),
    "ChatKeep.set_typing": Spec(
        _chat,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "typing": True},
        {"room_id": P(ID), "user_id": P(ID), "typing": P(BOOL)},
    ),
    "ChatKeep.run_relay": Spec(
        _chat,
        lambda w: {
            "database_url": None,
            "interval": 0.1,
            "grace": 0.25,
            "standby_interval": 1.0,
        },
        {
            "database_url": P(OPT_STR),
            "interval": P(NUMBER),
            "grace": P(NUMBER),
            "standby_interval": P(NUMBER),
        },
        forever=True,
    ),
    # The stream's input is checked when it is made (ChatKeep.stream); these take none.
    "ChangeStream.open": Spec(lambda w: w.chat.stream([w.public.id], w.member.id), lambda w: {}),
    "ChangeStream.aclose": Spec(lambda w: w.chat.stream([w.public.id], w.member.id), lambda w: {}),
    "OutboxRelay.run": Spec(
        lambda w: OutboxRelay(w.chat.events, w.chat.redis, w.chat.db.settings, w.chat.db.dsn),
        lambda w: {},
        forever=True,
    ),
    "ChatKeep.subscribe": Spec(_chat, lambda w: {"room_ids": (w.public.id,)}, {"room_ids": P(ID)}),
    "ChatKeep.health": Spec(_chat, lambda w: {}),
    # A facade of its own on the world's stores: closing it leaves the world's facade open.
    "ChatKeep.close": Spec(lambda w: ChatKeep(w.chat.db, w.chat.redis), lambda w: {}),
    # -- the repositories (as the system) ---------------------------------------------------
    **{
        f"UserRepository.{name}": spec
        for name, spec in _repository_crud(
            _users,
            lambda w: w.member.id,
            _new_user,
            CreateUserDto,
            lambda w: _AVATAR,
            UpdateUserDto,
        ).items()
    },
    "UserRepository.delete": Spec(_users, lambda w: {"id": w.outsider.id}, {"id": P(ID)}),
    "UserRepository.hash_password": Spec(
        _users, lambda w: {"password": PASSWORD}, {"password": P(STR)}
    ),
    "UserRepository.register": Spec(
        _users, lambda w: {"dto": _new_user(w)}, {"dto": P(of(CreateUserDto))}
    ),
    "UserRepository.authenticate": Spec(
        _users,
        lambda w: {"email": w.member.email, "password": PASSWORD},
        {"email": P(STR), "password": P(STR)},
    ),
    "UserRepository.find_by_email": Spec(
        _users, lambda w: {"email": w.member.email}, {"email": P(STR)}
    ),
    "UserRepository.find_by_username": Spec(
        _users, lambda w: {"username": w.member.username}, {"username": P(STR)}
    ),
    "UserRepository.update_profile": Spec(
        _users,
        lambda w: {"user_id": w.member.id, "dto": _AVATAR},
        {"user_id": P(ID), "dto": P(of(UpdateUserDto))},
    ),
    "UserRepository.change_password": Spec(
        _users,
        lambda w: {
            "user_id": w.member.id,
            "current_password": PASSWORD,
            "new_password": "another horse",
        },
        {"user_id": P(ID), "current_password": P(STR), "new_password": P(STR, "password")},
    ),
    "UserRepository.touch_last_seen": Spec(
        _users,
        lambda w: {"user_id": w.member.id, "min_interval": 0.0},
        {"user_id": P(ID), "min_interval": P(NUMBER)},
    ),
    "UserRepository.deactivate": Spec(
        _users, lambda w: {"user_id": w.member.id}, {"user_id": P(ID)}
    ),
    **{
        f"RoomRepository.{name}": spec
        for name, spec in _repository_crud(
            _rooms,
            lambda w: w.public.id,
            _new_room,
            CreateRoomDto,
            lambda w: UpdateRoomDto(description="about"),
            UpdateRoomDto,
        ).items()
    },
    "RoomRepository.delete": Spec(_rooms, lambda w: {"id": w.private.id}, {"id": P(ID)}),
    "RoomRepository.open_direct": Spec(
        _rooms,
        lambda w: {"user_a": w.member.id, "user_b": w.owner.id},
        {"user_a": P(ID), "user_b": P(ID)},
    ),
    "RoomRepository.add_member": Spec(
        _rooms,
        lambda w: {"room_id": w.public.id, "user_id": w.outsider.id, "role": "member", "by": None},
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(OPT_ID)},
    ),
    "RoomRepository.remove_member": Spec(
        _rooms,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "by": w.owner.id},
        {"room_id": P(ID), "user_id": P(ID), "by": P(OPT_ID)},
    ),
    "RoomRepository.change_role": Spec(
        _rooms,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.member.id,
            "role": "admin",
            "by": w.owner.id,
        },
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(OPT_ID)},
    ),
    "RoomRepository.join_as": Spec(
        _rooms,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.outsider.id,
            "role": "member",
            "by": w.outsider.id,
        },
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(ID)},
    ),
    "RoomRepository.remove_member_as": Spec(
        _rooms,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "by": w.owner.id},
        {"room_id": P(ID), "user_id": P(ID), "by": P(ID)},
    ),
    "RoomRepository.change_role_as": Spec(
        _rooms,
        lambda w: {
            "room_id": w.public.id,
            "user_id": w.member.id,
            "role": "admin",
            "by": w.owner.id,
        },
        {"room_id": P(ID), "user_id": P(ID), "role": P(STR), "by": P(ID)},
    ),
    "RoomRepository.members": Spec(_rooms, lambda w: {"room_id": w.public.id}, {"room_id": P(ID)}),
    "RoomRepository.rooms_of": Spec(
        _rooms,
        lambda w: {"user_id": w.member.id, "include_inactive": False, "as_user": None},
        {"user_id": P(ID), "include_inactive": P(BOOL), "as_user": P(OPT_ID)},
    ),
    # A message has no generic create/update: it is sent and edited (see below).
    **{
        f"MessageRepository.{name}": spec
        for name, spec in _repository_crud(
            _messages,
            lambda w: w.message.id,
            _new_message,
            CreateMessageDto,
            _new_message,
            CreateMessageDto,
        ).items()
        if name in ("find_by_id", "get")
    },
    "MessageRepository.delete": Spec(
        _messages,
        lambda w: {"id": w.message.id, "by": w.member.id},
        {"id": P(ID), "by": P(OPT_ID)},
    ),
    "MessageRepository.send": Spec(
        _messages, lambda w: {"dto": _new_message(w)}, {"dto": P(of(CreateMessageDto))}
    ),
    "MessageRepository.send_logged": Spec(
        _messages, lambda w: {"dto": _new_message(w)}, {"dto": P(of(CreateMessageDto))}
    ),
    "MessageRepository.send_many": Spec(
        _messages, lambda w: {"dtos": [_new_message(w)]}, {"dtos": P(of(list, tuple))}
    ),
    "ChangeRepository.changes": Spec(
        lambda w: w.repos.changes,
        lambda w: {"room_id": w.public.id, "after": 0, "limit": 100, "as_user": None},
        {"room_id": P(ID), "after": P(INT), "limit": P(INT), "as_user": P(OPT_ID)},
    ),
    "ChangeRepository.position": Spec(
        lambda w: w.repos.changes,
        lambda w: {"room_id": w.public.id, "as_user": None},
        {"room_id": P(ID), "as_user": P(OPT_ID)},
    ),
    "ChangeRepository.relay_changes": Spec(
        lambda w: w.repos.changes,
        lambda w: {"since": datetime.now(UTC) - timedelta(minutes=5), "limit": 100},
        {"since": P(of(datetime)), "limit": P(INT)},
    ),
    "ChangeRepository.sent_mentions": Spec(
        lambda w: w.repos.changes,
        lambda w: {"sent": [(w.message.id, w.message.user_id)]},
        {"sent": P(of(list, tuple), "message_id", "author_id")},
    ),
    "ChangeRepository.last_position": Spec(lambda w: w.repos.changes, lambda w: {}),
    "ChangeRepository.last_change": Spec(lambda w: w.repos.changes, lambda w: {}),
    # Valid values that prune nothing the world holds (it is minutes old at most).
    "ChangeRepository.prune": Spec(
        lambda w: w.repos.changes,
        lambda w: {"keep": 1_000_000, "max_age": timedelta(days=1)},
        {"keep": P(OPT_INT), "max_age": P(of(timedelta, NONE))},
    ),
    "ReactionRepository.react": _reaction(lambda w: w.repos.reactions),
    "ReactionRepository.unreact": _reaction(lambda w: w.repos.reactions),
    "ReactionRepository.react_logged": _reaction(lambda w: w.repos.reactions),
    "ReactionRepository.unreact_logged": _reaction(lambda w: w.repos.reactions),
    "MessageRepository.edit_logged": Spec(
        _messages,
        lambda w: {"message_id": w.message.id, "content": "edited", "by": w.member.id},
        {"message_id": P(ID), "content": P(STR), "by": P(ID)},
    ),
    "MessageRepository.delete_logged": Spec(
        _messages,
        lambda w: {"message_id": w.message.id, "by": w.member.id},
        {"message_id": P(ID), "by": P(ID)},
    ),
    "MessageRepository.edit": Spec(
        _messages,
        lambda w: {"message_id": w.message.id, "content": "edited", "by": w.member.id},
        {"message_id": P(ID), "content": P(STR), "by": P(ID)},
    ),
    "MessageRepository.history": Spec(
        _messages,
        lambda w: {"room_id": w.public.id, **_NO_POSITION, "limit": 50, "as_user": None},
        {"room_id": P(ID), **_HISTORY, "as_user": P(OPT_ID)},
    ),
    "MessageRepository.mark_read": Spec(
        _messages,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "seq": None, "as_user": None},
        {"room_id": P(ID), "user_id": P(ID), "seq": P(OPT_INT), "as_user": P(OPT_ID)},
    ),
    "MessageRepository.mark_message_read": Spec(
        _messages,
        lambda w: {"message_id": w.message.id, "user_id": w.owner.id},
        {"message_id": P(ID), "user_id": P(ID)},
    ),
    "MessageRepository.read_by": Spec(
        _messages, lambda w: {"message_id": w.message.id}, {"message_id": P(ID)}
    ),
    "MessageRepository.unread_counts": Spec(
        _messages,
        lambda w: {"user_id": w.member.id, "as_user": None},
        {"user_id": P(ID), "as_user": P(OPT_ID)},
    ),
    # -- the realtime services (the facade's own instances) ----------------------------------
    "SessionStore.create": Spec(
        lambda w: w.chat.sessions,
        lambda w: {"user_id": w.member.id, "metadata": {"device": "phone"}},
        {"user_id": P(UUID_ONLY), "metadata": P(of(Mapping, NONE))},
    ),
    "SessionStore.validate": Spec(
        lambda w: w.chat.sessions,
        lambda w: {"token": w.session_token, "slide": True},
        {"token": P(STR), "slide": P(BOOL)},
    ),
    "SessionStore.list": Spec(
        lambda w: w.chat.sessions, lambda w: {"user_id": w.member.id}, {"user_id": P(UUID_ONLY)}
    ),
    "SessionStore.revoke": Spec(
        lambda w: w.chat.sessions,
        lambda w: {"user_id": w.member.id, "session_id": w.session_id},
        {"user_id": P(UUID_ONLY), "session_id": P(STR)},
    ),
    "SessionStore.revoke_token": Spec(
        lambda w: w.chat.sessions, lambda w: {"token": w.session_token}, {"token": P(STR)}
    ),
    "SessionStore.revoke_all": Spec(
        lambda w: w.chat.sessions, lambda w: {"user_id": w.member.id}, {"user_id": P(UUID_ONLY)}
    ),
    "RefreshTokenStore.issue": Spec(
        lambda w: w.chat.tokens,
        lambda w: {"user_id": w.member.id, "session_id": w.session_id},
        {"user_id": P(UUID_ONLY), "session_id": P(STR)},
    ),
    "RefreshTokenStore.rotate": Spec(
        lambda w: w.chat.tokens, lambda w: {"token": w.refresh_token}, {"token": P(STR)}
    ),
    "RefreshTokenStore.revoke": Spec(
        lambda w: w.chat.tokens, lambda w: {"token": w.refresh_token}, {"token": P(STR)}
    ),
    "RefreshTokenStore.attach_session": Spec(
        lambda w: w.chat.tokens,
        lambda w: {"family_id": _family(w), "session_id": w.session_id},
        {"family_id": P(UUID_ONLY), "session_id": P(STR)},
    ),
    "RefreshTokenStore.revoke_family": Spec(
        lambda w: w.chat.tokens, lambda w: {"family_id": _family(w)}, {"family_id": P(UUID_ONLY)}
    ),
    "RefreshTokenStore.revoke_all": Spec(
        lambda w: w.chat.tokens, lambda w: {"user_id": w.member.id}, {"user_id": P(UUID_ONLY)}
    ),
    "RefreshTokenStore.family_alive": Spec(
        lambda w: w.chat.tokens, lambda w: {"family_id": _family(w)}, {"family_id": P(UUID_ONLY)}
    ),
    "Presence.connect": Spec(
        lambda w: w.chat.presence,
        lambda w: {"user_id": w.member.id, "socket_id": f"p{w.n}", "rooms": [w.public.id]},
        _SOCKET,
    ),
    "Presence.heartbeat": Spec(
        lambda w: w.chat.presence,
        lambda w: {"user_id": w.member.id, "socket_id": f"p{w.n}", "rooms": [w.public.id]},
        _SOCKET,
    ),
    "Presence.heartbeat_many": Spec(
        lambda w: w.chat.presence,
        lambda w: {"beats": [Heartbeat(w.member.id, f"p{w.n}", frozenset({w.public.id}))]},
        {"beats": P(collection)},
    ),
    "Presence.disconnect": Spec(
        lambda w: w.chat.presence, lambda w: {"socket_id": f"p{w.n}"}, {"socket_id": P(STR)}
    ),
    "Presence.sweep": Spec(lambda w: w.chat.presence, lambda w: {"limit": 10}, {"limit": P(INT)}),
    "Presence.is_online": Spec(
        lambda w: w.chat.presence, lambda w: {"user_id": w.member.id}, {"user_id": P(UUID_ONLY)}
    ),
    "Presence.online_among": Spec(
        lambda w: w.chat.presence,
        lambda w: {"user_ids": [w.member.id]},
        {"user_ids": P(collection, "user_id")},
    ),
    "Presence.in_room": Spec(
        lambda w: w.chat.presence, lambda w: {"room_id": w.public.id}, {"room_id": P(UUID_ONLY)}
    ),
    "Presence.leave_room": Spec(
        lambda w: w.chat.presence,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id},
        {"room_id": P(UUID_ONLY), "user_id": P(UUID_ONLY)},
    ),
    "Presence.run_sweeper": Spec(
        lambda w: w.chat.presence,
        lambda w: {"interval": 5.0},
        {"interval": P(NUMBER)},
        forever=True,
    ),
    "TypingIndicators.start": Spec(
        lambda w: w.chat.typing,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id, "ttl": None},
        {"room_id": P(UUID_ONLY), "user_id": P(UUID_ONLY), "ttl": P(OPT_NUMBER)},
    ),
    "TypingIndicators.stop": Spec(
        lambda w: w.chat.typing,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id},
        {"room_id": P(UUID_ONLY), "user_id": P(UUID_ONLY)},
    ),
    "TypingIndicators.typers": Spec(
        lambda w: w.chat.typing, lambda w: {"room_id": w.public.id}, {"room_id": P(UUID_ONLY)}
    ),
    "SocketRegistry.register": Spec(
        lambda w: w.chat.sockets,
        lambda w: {"socket_id": f"r{w.n}", "user_id": w.member.id, "rooms": [w.public.id]},
        _SOCKET,
    ),
    "SocketRegistry.get": Spec(
        lambda w: w.chat.sockets, lambda w: {"socket_id": f"r{w.n}"}, {"socket_id": P(STR)}
    ),
    "SocketRegistry.unregister": Spec(
        lambda w: w.chat.sockets, lambda w: {"socket_id": f"r{w.n}"}, {"socket_id": P(STR)}
    ),
    "SocketRegistry.sockets_of_user": Spec(
        lambda w: w.chat.sockets, lambda w: {"user_id": w.member.id}, {"user_id": P(UUID_ONLY)}
    ),
    "SocketRegistry.sockets_of_node": Spec(
        lambda w: w.chat.sockets, lambda w: {"node_id": None}, {"node_id": P(OPT_STR)}
    ),
    "SocketRegistry.purge_node": Spec(
        lambda w: w.chat.sockets, lambda w: {"node_id": "gone-node"}, {"node_id": P(OPT_STR)}
    ),
    "EventBus.publish": Spec(
        lambda w: w.chat.events,
        lambda w: {
            "event": MessagesRead(room_id=w.public.id, user_id=w.member.id, last_read_seq=1)
        },
        {"event": P(of(*_EVENT_TYPES))},
    ),
    "EventBus.publish_many": Spec(
        lambda w: w.chat.events,
        lambda w: {
            "events": [MessagesRead(room_id=w.public.id, user_id=w.member.id, last_read_seq=1)]
        },
        {"events": P(collection, "event")},
    ),
    "EventBus.published": Spec(
        lambda w: w.chat.events, lambda w: {"room_id": w.public.id}, {"room_id": P(UUID_ONLY)}
    ),
    "EventBus.published_marks": Spec(
        lambda w: w.chat.events,
        lambda w: {"room_ids": [w.public.id]},
        {"room_ids": P(collection, "room_id")},
    ),
    "EventBus.subscribe": Spec(
        lambda w: w.chat.events,
        lambda w: {"room_ids": (w.public.id,)},
        {"room_ids": P(UUID_ONLY, "room_id")},
    ),
    "EventSubscription.add_rooms": Spec(
        lambda w: w.subscription,
        lambda w: {"room_ids": (w.other.id,)},
        {"room_ids": P(UUID_ONLY, "room_id")},
    ),
    "EventSubscription.remove_rooms": Spec(
        lambda w: w.subscription,
        lambda w: {"room_ids": (w.other.id,)},
        {"room_ids": P(UUID_ONLY, "room_id")},
    ),
    "EventSubscription.get": Spec(lambda w: w.subscription, lambda w: {}),
    "EventSubscription.aclose": Spec(lambda w: w.subscription, lambda w: {}),
    "RateLimiter.check": Spec(
        lambda w: w.chat.limiter,
        lambda w: {"subject": f"u{w.n}", "action": "send", "limit": None, "cost": 1},
        _LIMIT,
    ),
    "RateLimiter.enforce": Spec(
        lambda w: w.chat.limiter,
        lambda w: {"subject": f"u{w.n}", "action": "send", "limit": None, "cost": 1},
        _LIMIT,
    ),
    "RateLimiter.check_many": Spec(
        lambda w: w.chat.limiter,
        lambda w: {"subjects": [f"u{w.n}"], "action": "send"},
        {"subjects": P(of(list, tuple), "subject"), "action": P(STR)},
    ),
    "RateLimiter.reset": Spec(
        lambda w: w.chat.limiter,
        lambda w: {"subject": f"u{w.n}", "action": "send"},
        {"subject": P(STR), "action": P(STR)},
    ),
    **{
        f"LoginThrottle.{name}": Spec(
            lambda w: w.chat.login_throttle,
            lambda w: {"account": w.member.email},
            {"account": P(STR)},
        )
        for name in ("check", "record_failure", "record_success", "unlock")
    },
    "UserProfileCache.get": Spec(
        lambda w: w.chat.profiles,
        lambda w: {"ident": w.member.id, "loader": None},
        {"ident": P(UUID_ONLY, "id"), "loader": P(lambda v: v is None or callable(v))},
    ),
    "UserProfileCache.get_many": Spec(
        lambda w: w.chat.profiles,
        lambda w: {"idents": [w.member.id]},
        {"idents": P(collection, "id")},
    ),
    "UserProfileCache.invalidate": Spec(
        lambda w: w.chat.profiles,
        lambda w: {"idents": (w.member.id,)},
        {"idents": P(UUID_ONLY, "id")},
    ),
    "RoomMembersCache.members": Spec(
        lambda w: w.chat.members,
        lambda w: {"room_id": w.public.id, "asking": None},
        {"room_id": P(UUID_ONLY, "id"), "asking": P(OPT_UUID)},
    ),
    "RoomMembersCache.is_member": Spec(
        lambda w: w.chat.members,
        lambda w: {"room_id": w.public.id, "user_id": w.member.id},
        {"room_id": P(UUID_ONLY, "id"), "user_id": P(UUID_ONLY)},
    ),
    "RoomMembersCache.invalidate": Spec(
        lambda w: w.chat.members,
        lambda w: {"room_ids": (w.public.id,)},
        {"room_ids": P(UUID_ONLY, "id")},
    ),
}
