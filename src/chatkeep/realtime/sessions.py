"""Login sessions: opaque bearer tokens with sliding expiry, revocable one by one or all.

All of a user's sessions live in one hash, ``session:{userId}``: field = session id,
value = the session as JSON. One key per user makes "log out everywhere" a single ``DEL``
and "list my devices" a single read, and in cluster mode keeps them in the user's slot.

The token handed to the client is ``<userId>.<secret>``. Redis never sees the secret: the
session id is the first 32 hex digits of its SHA-256, so a leaked dump or ``MONITOR``
output cannot be replayed, while the session id can be shown and revoked safely.

Expiry is per session and sliding: every :meth:`SessionStore.validate` moves the idle
deadline forward, never past the absolute lifetime. Scripts use the server's clock, so all
nodes agree on what has expired; the key's own TTL follows the longest-living session so
an abandoned hash disappears.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final
from uuid import UUID

from pydantic import ConfigDict, PlainSerializer

from chatkeep.errors import InvalidInput
from chatkeep.models import SCHEMA_CONFIG
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import from_ms, seconds

__all__ = ["IssuedSession", "Session", "SessionStore"]

_TOKEN_PATTERN: Final = re.compile(
    r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.([A-Za-z0-9_-]{32,128})$"
)
_MAX_METADATA: Final = 16

# Shared prologue: server time in ms, and dropping expired sessions (returns the latest
# expiry among the live ones so the key's TTL can follow it).
_PRUNE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function prune(key)
  local all = redis.call('HGETALL', key)
  local live, horizon = {}, 0
  for i = 1, #all, 2 do
    local s = cjson.decode(all[i + 1])
    if s.e <= now then
      redis.call('HDEL', key, all[i])
    else
      live[#live + 1] = {all[i], s.a, s.e}
      if s.e > horizon then horizon = s.e end
    end
  end
  return live, horizon
end
"""

# KEYS[1] session hash; ARGV: session id, idle ms, lifetime ms, max sessions, metadata JSON.
_CREATE: Final = (
    _PRUNE
    + """
local idle, life, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local live, horizon = prune(KEYS[1])
if #live >= cap then
  -- Over the cap the least recently active sessions make room (an abandoned device).
  table.sort(live, function(x, y) return x[2] < y[2] end)
  for i = 1, #live - cap + 1 do redis.call('HDEL', KEYS[1], live[i][1]) end
end
local e = now + math.min(idle, life)
local rec = cjson.encode({c = now, a = now, e = e, m = now + life, d = cjson.decode(ARGV[5])})
redis.call('HSET', KEYS[1], ARGV[1], rec)
if e > horizon then horizon = e end
redis.call('PEXPIREAT', KEYS[1], horizon)
return rec
"""
)

# KEYS[1] session hash; ARGV: session id, idle ms, slide (1/0). Returns the record or nil.
_VALIDATE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local s = cjson.decode(raw)
if s.e <= now then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return false
end
if ARGV[3] == '1' then
  s.a = now
  s.e = math.min(now + tonumber(ARGV[2]), s.m)
  raw = cjson.encode(s)
  redis.call('HSET', KEYS[1], ARGV[1], raw)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and now + ttl < s.e then redis.call('PEXPIREAT', KEYS[1], s.e) end
end
return raw
"""

# KEYS[1] session hash. Returns every live session as {id, record, id, record, ...}.
_LIST: Final = (
    _PRUNE
    + """
local live = prune(KEYS[1])
local out = {}
for _, item in ipairs(live) do
  out[#out + 1] = item[1]
  out[#out + 1] = redis.call('HGET', KEYS[1], item[1])
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Session:
    """One login session (never holds the secret).

    Attributes:
        session_id: public id of the session (safe to show and log).
        user_id: whose session it is.
        created_at: when it was created.
        last_active_at: when it was last validated with sliding on.
        expires_at: when it expires unless used again (sliding).
        absolute_expires_at: when it expires however much it is used.
        metadata: what the caller stored at creation (device, IP address...).
    """

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    session_id: str
    user_id: UUID
    created_at: datetime
    last_active_at: datetime
    expires_at: datetime
    absolute_expires_at: datetime
    # A read-only view, which pydantic (and so FastAPI) cannot serialise as it is.
    metadata: Annotated[Mapping[str, str], PlainSerializer(dict, return_type=dict[str, str])] = (
        field(default_factory=lambda: MappingProxyType({}))
    )


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """A new session and its bearer token (give the token to the client, once)."""

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    token: str = field(repr=False)
    session: Session


def _session_id(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:32]


def _decode(user_id: UUID, session_id: str, raw: bytes | str) -> Session:
    record: dict[str, Any] = json.loads(raw)
    metadata = record.get("d") or {}
    return Session(
        session_id=session_id,
        user_id=user_id,
        created_at=from_ms(record["c"]),
        last_active_at=from_ms(record["a"]),
        expires_at=from_ms(record["e"]),
        absolute_expires_at=from_ms(record["m"]),
        metadata=MappingProxyType({str(k): str(v) for k, v in dict(metadata).items()}),
    )


def _parse_token(token: str) -> tuple[UUID, str]:
    if not isinstance(token, str):
        raise InvalidInput("token", "must be a string")
    match = _TOKEN_PATTERN.match(token)
    if match is None:
        raise InvalidInput("token", "is not a session token")
    return UUID(match.group(1)), _session_id(match.group(2))


def _check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not re.fullmatch(r"[0-9a-f]{32}", session_id):
        raise InvalidInput("session_id", "must be 32 lowercase hex digits")
    return session_id


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):  # bytes and ints have no items(); 50 has no len()
        raise InvalidInput("metadata", "must be a mapping of strings to strings")
    if len(metadata) > _MAX_METADATA:
        raise InvalidInput("metadata", f"must have at most {_MAX_METADATA} entries")
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise InvalidInput("metadata", "keys must be strings of 1 to 64 characters")
        if not isinstance(value, str) or len(value) > 512:
            raise InvalidInput("metadata", "values must be strings of at most 512 characters")
        checked[key] = value
    return checked


class SessionStore:
    """Creates, validates, lists and revokes login sessions.

    Args:
        client: the shared Redis connection.
        idle_timeout: a session unused this long expires (sliding; default 14 days).
        max_lifetime: a session expires this long after creation however much it is used
            (default 90 days).
        max_sessions_per_user: past this many, creating one evicts the least recently
            active (default 50).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        idle_timeout: float | timedelta = timedelta(days=14),
        max_lifetime: float | timedelta = timedelta(days=90),
        max_sessions_per_user: int = 50,
    ) -> None:
        year = 366 * 86_400.0
        self._client = client
        self._idle_ms = int(seconds(idle_timeout, "idle_timeout", maximum=year) * 1000)
        self._life_ms = int(seconds(max_lifetime, "max_lifetime", maximum=year) * 1000)
        if self._idle_ms < 1 or self._life_ms < 1:
            raise InvalidInput("idle_timeout", "must be at least one millisecond")
        if not isinstance(max_sessions_per_user, int) or not 1 <= max_sessions_per_user <= 1000:
            raise InvalidInput("max_sessions_per_user", "must be an integer from 1 to 1000")
        self._cap = max_sessions_per_user
        self._create = client.script(_CREATE)
        self._validate = client.script(_VALIDATE)
        self._list = client.script(_LIST)

    async def create(
        self, user_id: UUID, *, metadata: Mapping[str, str] | None = None
    ) -> IssuedSession:
        """Start a session for ``user_id``.

        Args:
            user_id: the user who logged in.
            metadata: up to 16 short strings to keep with it (device, IP address...).

        Raises:
            InvalidInput: bad ``user_id`` or ``metadata``.
            Unavailable: Redis could not be reached (no session exists then).
        """
        key = self._client.keys.session(user_id)
        data = _check_metadata(metadata)
        secret = secrets.token_urlsafe(32)
        session_id = _session_id(secret)
        with self._client.guard("sessions.create"):
            raw = await self._create(
                keys=[key],
                args=[session_id, self._idle_ms, self._life_ms, self._cap, json.dumps(data)],
            )
        return IssuedSession(f"{user_id}.{secret}", _decode(user_id, session_id, raw))

    async def validate(self, token: str, *, slide: bool = True) -> Session | None:
        """The session ``token`` belongs to, or ``None`` if it is unknown or expired.

        Args:
            token: the bearer token from :meth:`create`.
            slide: move the idle deadline forward (the usual case for a request).

        Raises:
            InvalidInput: ``token`` is not shaped like a session token, or ``slide`` is
                not a bool.
            Unavailable: Redis could not be reached.
        """
        user_id, session_id = _parse_token(token)
        if not isinstance(slide, bool):
            raise InvalidInput("slide", "must be a bool")
        with self._client.guard("sessions.validate"):
            raw = await self._validate(
                keys=[self._client.keys.session(user_id)],
                args=[session_id, self._idle_ms, 1 if slide else 0],
            )
        if raw is None:
            return None
        return _decode(user_id, session_id, raw)

    async def list(self, user_id: UUID) -> list[Session]:
        """Every live session of ``user_id``, oldest first.

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.session(user_id)
        with self._client.guard("sessions.list"):
            flat = await self._list(keys=[key], args=[])
        found = [_decode(user_id, _text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(found, key=lambda s: (s.created_at, s.session_id))

    async def revoke(self, user_id: UUID, session_id: str) -> bool:
        """End one session; ``True`` if it existed.

        Raises:
            InvalidInput: bad ``user_id`` or ``session_id``.
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.session(user_id)
        field_name = _check_session_id(session_id)
        with self._client.guard("sessions.revoke"):
            return bool(await self._client.redis.hdel(key, field_name))

    async def revoke_token(self, token: str) -> bool:
        """End the session of ``token`` (logout); ``True`` if it existed.

        Raises:
            InvalidInput: ``token`` is not shaped like a session token.
            Unavailable: Redis could not be reached.
        """
        user_id, session_id = _parse_token(token)
        return await self.revoke(user_id, session_id)

    async def revoke_all(self, user_id: UUID) -> int:
        """End every session of ``user_id``; returns how many there were.

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.session(user_id)
        with self._client.guard("sessions.revoke_all"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hlen(key)
            pipe.delete(key)
            count, _ = await pipe.execute()
        return int(count)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
