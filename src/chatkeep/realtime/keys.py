"""Every Redis key and channel name chatkeep uses, built in one place.

No other module formats a key: they ask a :class:`KeySpace`. That keeps the naming
scheme (documented key by key in ``docs/redis-keys.md``) in one file, makes the prefix
and cluster mode apply everywhere, and lets a test check that every name is documented.

Names are ``<prefix><kind>:<id>[:<suffix>]``. The defaults are fixed by the specification
(``session:{userId}``, ``refresh:{token}``, ``presence:{userId}``,
``room:{roomId}:presence``, ``typing:{roomId}``, ``socket:{socketId}``); the rest serve the
features built on them.

In cluster mode the id is wrapped in a hash tag (``typing:{<roomId>}``), so Redis Cluster
hashes only the id: every key of one room lands in one slot (its presence, typing, event
channel and cached member list), and so does every key of one user. Scripts and
pipelines that touch one room or one user therefore never cross slots.

Ids that come from callers (socket ids, node ids, rate-limit subjects, account names) are
validated: printable, at most :data:`MAX_ID_LENGTH` characters, and free of ``{``, ``}``
and whitespace, so a crafted id can neither break out of its hash tag nor collide with
another key's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final
from uuid import UUID

from chatkeep.errors import InvalidInput

__all__ = ["MAX_ID_LENGTH", "KeySpace", "validate_collection", "validate_id"]

MAX_ID_LENGTH: Final = 200

# Printable ASCII except whitespace and braces (braces delimit Redis Cluster hash tags).
_ID_PATTERN: Final = re.compile(r"^[\x21-\x7a\x7c\x7e]+$")
_NAMESPACE_PATTERN: Final = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

# Every key kind, as documented in docs/redis-keys.md (the test suite checks the page).
_PATTERNS: Final[dict[str, str]] = {
    "session": "session:{userId}",
    "refresh": "refresh:{token}",
    "refresh_family": "refresh_family:{familyId}",
    "refresh_family_sessions": "refresh_family:{familyId}:sessions",
    "user_refresh_families": "user:{userId}:refresh_families",
    "recent_write": "user:{userId}:recent_write",
    "presence": "presence:{userId}",
    "presence_deadlines": "presence:deadlines",
    "room_presence": "room:{roomId}:presence",
    "typing": "typing:{roomId}",
    "socket": "socket:{socketId}",
    "user_sockets": "user:{userId}:sockets",
    "node_sockets": "node:{nodeId}:sockets",
    "room_events": "room:{roomId}:events",
    "room_published": "room:{roomId}:published",
    "rate_limit": "ratelimit:{action}:{subject}",
    "login_failures": "login:{account}:failures",
    "login_lock": "login:{account}:lock",
    "login_lockouts": "login:{account}:lockouts",
    "cache": "cache:{namespace}:{id}",
}


def validate_id(value: str, field: str) -> str:
    """Return ``value`` if it may be used inside a key name, else raise.

    Args:
        value: a caller-supplied id (socket id, node id, subject, account...).
        field: the name reported in the error.

    Raises:
        InvalidInput: ``value`` is empty, too long, or holds whitespace, braces or
            non-printable characters.
    """
    if not isinstance(value, str) or not value:
        raise InvalidInput(field, "must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(field, f"must be at most {MAX_ID_LENGTH} characters")
    if not _ID_PATTERN.match(value):
        raise InvalidInput(field, "must be printable ASCII without whitespace, '{' or '}'")
    return value


def validate_collection(value: object, field: str) -> list[Any]:
    """``value``'s items as a list, if it is a collection of ids (or of events, beats...).

    Raises:
        InvalidInput: ``value`` is not iterable (an int raised TypeError in ``for``), or is
            a string or bytes (taken character by character, it named other keys).
    """
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise InvalidInput(field, "must be a collection (a list, set or tuple)")
    return list(value)


def _uuid(value: UUID, field: str) -> str:
    if not isinstance(value, UUID):
        raise InvalidInput(field, "must be a UUID")
    return str(value)


class KeySpace:
    """Builds every key and channel name, with the prefix and cluster hash tags applied.

    Args:
        prefix: namespace put in front of every name (``"chat"`` gives ``chat:session:...``);
            a trailing ``:`` is optional.
        cluster_mode: wrap ids in ``{...}`` hash tags so a room's (or a user's) keys share
            one Redis Cluster slot.

    Example:
        >>> from uuid import UUID
        >>> room = UUID("0190c0de-0000-7000-8000-000000000001")
        >>> KeySpace("chat", cluster_mode=True).typing(room)
        'chat:typing:{0190c0de-0000-7000-8000-000000000001}'
    """

    __slots__ = ("_cluster", "_prefix")

    def __init__(self, prefix: str = "", *, cluster_mode: bool = False) -> None:
        if prefix and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", prefix):
            raise InvalidInput("redis_key_prefix", "must match [A-Za-z0-9_.:-]{1,64}")
        stripped = prefix.rstrip(":")
        self._prefix = f"{stripped}:" if stripped else ""
        self._cluster = cluster_mode

    @property
    def prefix(self) -> str:
        """The prefix put in front of every name (empty, or ending in ``:``)."""
        return self._prefix

    @property
    def cluster_mode(self) -> bool:
        """Whether ids are wrapped in hash tags."""
        return self._cluster

    @staticmethod
    def patterns() -> dict[str, str]:
        """Every key kind and its documented pattern (without prefix or hash tags)."""
        return dict(_PATTERNS)

    def _name(self, kind: str, ident: str, suffix: str = "") -> str:
        tagged = f"{{{ident}}}" if self._cluster else ident
        tail = f":{suffix}" if suffix else ""
        return f"{self._prefix}{kind}:{tagged}{tail}"

    # -- sessions and tokens -------------------------------------------------------------

    def session(self, user_id: UUID) -> str:
        """HASH of a user's sessions: field = session id, value = JSON session."""
        return self._name("session", _uuid(user_id, "user_id"))

    def refresh(self, family_id: UUID, token_hash: str) -> str:
        """HASH of one refresh token, named by its family and the SHA-256 of its secret.

        The family id rides in the name (and is the hash tag) so that a token and its
        family share a cluster slot and rotate in one atomic script.
        """
        family = _uuid(family_id, "family_id")
        token_hash = validate_id(token_hash, "token_hash")
        if self._cluster:
            return f"{self._prefix}refresh:{{{family}}}.{token_hash}"
        return f"{self._prefix}refresh:{family}.{token_hash}"

    def refresh_family(self, family_id: UUID) -> str:
        """HASH describing a refresh-token family (owner, current token); gone = revoked."""
        return self._name("refresh_family", _uuid(family_id, "family_id"))

    def refresh_family_sessions(self, family_id: UUID) -> str:
        """SET of the session ids a refresh-token family minted (ended with the family).

        Same hash tag as the family, so one script changes both.
        """
        return self._name("refresh_family", _uuid(family_id, "family_id"), "sessions")

    def user_refresh_families(self, user_id: UUID) -> str:
        """SET of a user's refresh-token family ids (for "log out everywhere")."""
        return self._name("user", _uuid(user_id, "user_id"), "refresh_families")

    def recent_write(self, user_id: UUID) -> str:
        """STRING present while a user's last write may be missing on a read replica."""
        return self._name("user", _uuid(user_id, "user_id"), "recent_write")

    # -- presence, typing, sockets -------------------------------------------------------

    def presence(self, user_id: UUID) -> str:
        """STRING present while the user is online (value: last heartbeat, ms)."""
        return self._name("presence", _uuid(user_id, "user_id"))

    def presence_deadlines(self) -> str:
        """ZSET user id -> deadline (ms) of every online user, swept to find who went away."""
        return f"{self._prefix}presence:deadlines"

    def room_presence(self, room_id: UUID) -> str:
        """ZSET user id -> deadline (ms) of the users present in a room."""
        return self._name("room", _uuid(room_id, "room_id"), "presence")

    def typing(self, room_id: UUID) -> str:
        """ZSET user id -> expiry (ms) of the users typing in a room."""
        return self._name("typing", _uuid(room_id, "room_id"))

    def socket(self, socket_id: str) -> str:
        """HASH of one socket: user id, node id, connection time."""
        return self._name("socket", validate_id(socket_id, "socket_id"))

    def user_sockets(self, user_id: UUID) -> str:
        """ZSET socket id -> deadline (ms) of a user's sockets."""
        return self._name("user", _uuid(user_id, "user_id"), "sockets")

    def node_sockets(self, node_id: str) -> str:
        """ZSET socket id -> deadline (ms) of the sockets a node holds."""
        return self._name("node", validate_id(node_id, "node_id"), "sockets")

    # -- events ----------------------------------------------------------------------------

    def room_events(self, room_id: UUID) -> str:
        """Pub/sub channel of a room's events."""
        return self._name("room", _uuid(room_id, "room_id"), "events")

    def room_published(self, room_id: UUID) -> str:
        """Sorted set of one member: the highest change-log position published for the room."""
        return self._name("room", _uuid(room_id, "room_id"), "published")

    def room_of_events_channel(self, channel: str) -> UUID | None:
        """The room id of a :meth:`room_events` channel name, or ``None`` if it is not one."""
        head = f"{self._prefix}room:"
        if not channel.startswith(head) or not channel.endswith(":events"):
            return None
        ident = channel[len(head) : -len(":events")]
        if self._cluster:
            if not (ident.startswith("{") and ident.endswith("}")):
                return None
            ident = ident[1:-1]
        try:
            return UUID(ident)
        except ValueError:
            return None

    # -- rate limits and login throttling --------------------------------------------------

    def rate_limit(self, action: str, subject: str) -> str:
        """STRING holding the GCRA theoretical arrival time of ``subject`` for ``action``."""
        action = validate_id(action, "action")
        subject = validate_id(subject, "subject")
        tagged = f"{{{subject}}}" if self._cluster else subject
        return f"{self._prefix}ratelimit:{action}:{tagged}"

    def login_failures(self, account: str) -> str:
        """STRING counter of recent failed logins of an account."""
        return self._name("login", validate_id(account, "account"), "failures")

    def login_lock(self, account: str) -> str:
        """STRING present while an account is locked out after repeated failures."""
        return self._name("login", validate_id(account, "account"), "lock")

    def login_lockouts(self, account: str) -> str:
        """STRING counter of recent lockouts (each one lasts longer than the last)."""
        return self._name("login", validate_id(account, "account"), "lockouts")

    # -- caches ----------------------------------------------------------------------------

    def cache(self, namespace: str, ident: str) -> str:
        """STRING holding one cached value (``cache:user:<id>``, ``cache:room_members:<id>``)."""
        if not _NAMESPACE_PATTERN.match(namespace):
            raise InvalidInput("namespace", "must match [a-z][a-z0-9_]{0,39}")
        return self._name(f"cache:{namespace}", validate_id(ident, "id"))

    def __repr__(self) -> str:
        return f"KeySpace(prefix={self._prefix!r}, cluster_mode={self._cluster})"
