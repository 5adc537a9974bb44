"""Refresh tokens: hashed, single use, rotated on every use, with theft detection.

Each login starts a *family*. Using a refresh token spends it and issues the family's next
one. If a spent token is presented again, two parties hold the family (the client and a
thief, and we cannot tell which is which), so the whole login is revoked and both must
log in again: the refresh-token reuse detection of OAuth 2.0 Security BCP section 4.14.

*The whole login* is the family and every session it minted (the login's own, and one per
refresh): a thief who refreshed first holds a session too, and revoking only the tokens
would leave it working for up to the session's idle timeout. The family records those
session ids in ``refresh_family:{familyId}:sessions`` (same hash tag), so one script
revokes the family and reads the set together; the sessions themselves live in the user's
``session:{userId}`` hash (another slot), so they are ended by the next command. That set
outlives the revocation (until the family would have expired) and every later
presentation of any token of the family ends them again, so an outage between the two
steps is finished by the next attempt, and nothing that reaches Redis ever brings them back.

The token handed out is ``<familyId hex>.<secret>``. Redis stores only the SHA-256 of the
secret, in ``refresh:<familyId>.<sha256>`` (a hash: owner, state, successor). The family
id is in the name, as the cluster hash tag, so a token and its family
(``refresh_family:{familyId}``) share a slot and rotate in one atomic script: two requests
racing with the same token cannot both win.

A spent token is kept (state ``used``) until it would have expired anyway, which is as
long as its reuse can be detected. A family is alive while its key exists; revoking it is
a ``DEL``, after which none of its tokens rotates. ``user:{userId}:refresh_families``
indexes a user's families for "log out everywhere".

A rotation retried by the connection layer after its reply was lost carries the same new
token; the script recognises it (the spent token's successor is that very token) and
answers as if it were the first try, instead of mistaking the retry for theft.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Final
from uuid import UUID, uuid4

from pydantic import ConfigDict

from chatkeep.errors import InvalidInput, PermissionDenied
from chatkeep.models import SCHEMA_CONFIG
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import from_ms, seconds

__all__ = ["IssuedRefreshToken", "RefreshTokenStore", "TokenReuse"]

logger = logging.getLogger("chatkeep.realtime.tokens")

_TOKEN_PATTERN: Final = re.compile(r"^([0-9a-f]{32})\.([A-Za-z0-9_-]{32,128})$")

# KEYS: token, family, family's sessions. ARGV: user id, token hash, token ttl ms, family
# lifetime ms, session id ('' for none).
_ISSUE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fam_end = now + tonumber(ARGV[4])
local e = math.min(now + tonumber(ARGV[3]), fam_end)
redis.call('HSET', KEYS[2], 'u', ARGV[1], 'c', ARGV[2], 'x', fam_end, 's', ARGV[5])
redis.call('PEXPIREAT', KEYS[2], fam_end)
if ARGV[5] ~= '' then
  redis.call('SADD', KEYS[3], ARGV[5])
  redis.call('PEXPIREAT', KEYS[3], fam_end)
end
redis.call('HSET', KEYS[1], 'u', ARGV[1], 's', 'active', 'e', e)
redis.call('PEXPIREAT', KEYS[1], e)
return e
"""

# The family's minted sessions after an outcome that ends the login (the set is kept).
_ENDING: Final = """
local function ending(outcome, user)
  local out = {outcome, user, 0}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do out[#out + 1] = id end
  return out
end
"""

# KEYS: presented token, family, successor token, family's sessions. ARGV: successor
# hash, token ttl ms. Returns {outcome, user id, successor expiry ms, session ids...};
# outcome is one of 'rotated', 'invalid' (unknown or expired), 'revoked' (family gone),
# 'reused'; the last two list the sessions to end.
_ROTATE: Final = (
    _ENDING
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local st = redis.call('HMGET', KEYS[1], 'u', 's', 'n')
if not st[1] then return {'invalid', '', 0} end
if st[2] == 'used' then
  if st[3] == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 1 then
    local e = redis.call('HGET', KEYS[3], 'e')
    if e then return {'rotated', st[1], e} end
  end
  redis.call('DEL', KEYS[2])
  return ending('reused', st[1])
end
local fam = redis.call('HMGET', KEYS[2], 'x', 'u')
if not fam[1] or fam[2] ~= st[1] then
  redis.call('DEL', KEYS[1])
  return ending('revoked', st[1])
end
local e = math.min(now + tonumber(ARGV[2]), tonumber(fam[1]))
if e <= now then return {'invalid', st[1], 0} end
redis.call('HSET', KEYS[1], 's', 'used', 'n', ARGV[1])
redis.call('HSET', KEYS[3], 'u', st[1], 's', 'active', 'e', e)
redis.call('PEXPIREAT', KEYS[3], e)
redis.call('HSET', KEYS[2], 'c', ARGV[1])
return {'rotated', st[1], tostring(e)}
"""
)

# KEYS: family, family's sessions. ARGV: session id. Records a session minted by a
# rotation as the family's current one; returns {the one it replaces ('' for none), user
# id}, or nil if the family is gone (revoked meanwhile: the caller ends the new session).
_ATTACH: Final = """
local fam = redis.call('HMGET', KEYS[1], 's', 'x', 'u')
if not fam[2] then return false end
redis.call('HSET', KEYS[1], 's', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], fam[2])
return {fam[1] or '', fam[3]}
"""

# KEYS: family, family's sessions. Revokes the family; returns {existed, user id,
# session ids...} (no user once the family is gone: its sessions ended with it).
_REVOKE: Final = """
local u = redis.call('HGET', KEYS[1], 'u')
if not u then return {0, ''} end
redis.call('DEL', KEYS[1])
local out = {1, u}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = id end
return out
"""


@dataclass(frozen=True, slots=True)
class IssuedRefreshToken:
    """A refresh token to hand to the client (shown once; only its hash is stored)."""

    __pydantic_config__: ClassVar[ConfigDict] = SCHEMA_CONFIG  # plain schema text

    token: str = field(repr=False)
    family_id: UUID
    user_id: UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class TokenReuse:
    """A spent refresh token was presented again; its family and sessions are revoked.

    Attributes:
        user_id: whose login it was.
        family_id: the revoked family.
        detected_at: when the reuse was seen.
        session_ids: the sessions the family had minted, now ended.
    """

    user_id: UUID
    family_id: UUID
    detected_at: datetime
    session_ids: tuple[str, ...] = ()


ReuseHandler = Callable[[TokenReuse], Awaitable[None]]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse(token: str) -> tuple[UUID, str]:
    if not isinstance(token, str):
        raise InvalidInput("token", "must be a string")
    match = _TOKEN_PATTERN.match(token)
    if match is None:
        raise InvalidInput("token", "is not a refresh token")
    return UUID(hex=match.group(1)), _hash(match.group(2))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RefreshTokenStore:
    """Issues, rotates and revokes refresh tokens.

    Args:
        client: the shared Redis connection.
        ttl: how long one token stays usable (default 30 days).
        max_family_lifetime: how long a family lives however often it rotates, after
            which the user logs in again (default 90 days).
        on_reuse: awaited when a spent token comes back (to audit or alert), after the
            login is revoked; its errors are logged, never raised.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl: float | timedelta = timedelta(days=30),
        max_family_lifetime: float | timedelta = timedelta(days=90),
        on_reuse: ReuseHandler | None = None,
    ) -> None:
        year = 366 * 86_400.0
        self._client = client
        self._ttl_ms = max(1, int(seconds(ttl, "ttl", maximum=year) * 1000))
        self._life_ms = max(
            1, int(seconds(max_family_lifetime, "max_family_lifetime", maximum=year) * 1000)
        )
        self._on_reuse = on_reuse
        self._issue = client.script(_ISSUE)
        self._rotate = client.script(_ROTATE)
        self._attach = client.script(_ATTACH)
        self._revoke = client.script(_REVOKE)

    async def issue(self, user_id: UUID, *, session_id: str = "") -> IssuedRefreshToken:
        """Start a new family for ``user_id`` and return its first token.

        Args:
            user_id: who logged in.
            session_id: the login session the family minted, if any: it ends with the
                family (on reuse of a spent token, or :meth:`revoke`).

        Raises:
            InvalidInput: bad ``user_id`` or ``session_id``.
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        index = keys.user_refresh_families(user_id)
        if not isinstance(session_id, str) or len(session_id) > 64:
            raise InvalidInput("session_id", "must be a string of at most 64 characters")
        if not session_id.isascii():
            # Redis takes UTF-8: a lone surrogate raised UnicodeEncodeError mid-pipeline.
            try:
                session_id.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput("session_id", "must be valid Unicode") from None
        family_id = uuid4()
        secret = secrets.token_urlsafe(32)
        token_hash = _hash(secret)
        with self._client.guard("tokens.issue"):
            # The index is written first: "revoke all" must never miss a live family.
            pipe = self._client.pipeline()
            pipe.sadd(index, family_id.hex)
            pipe.pexpire(index, self._life_ms)
            await pipe.execute()
            expires = await self._issue(
                keys=[
                    keys.refresh(family_id, token_hash),
                    keys.refresh_family(family_id),
                    keys.refresh_family_sessions(family_id),
                ],
                args=[str(user_id), token_hash, self._ttl_ms, self._life_ms, session_id],
            )
        return IssuedRefreshToken(f"{family_id.hex}.{secret}", family_id, user_id, from_ms(expires))

    async def rotate(self, token: str) -> IssuedRefreshToken:
        """Spend ``token`` and return the next token of its family.

        Raises:
            InvalidInput: ``token`` is not shaped like a refresh token.
            PermissionDenied: the token is unknown, expired, revoked, or was already used
                (then its whole login is revoked: the family and every session it minted;
                ``on_reuse`` is told).
            Unavailable: Redis could not be reached (a reuse may then have revoked the
                family but not yet its sessions: presenting any of its tokens again
                finishes that).
        """
        family_id, token_hash = _parse(token)
        keys = self._client.keys
        secret = secrets.token_urlsafe(32)
        next_hash = _hash(secret)
        with self._client.guard("tokens.rotate"):
            outcome, user, expires, *minted = await self._rotate(
                keys=[
                    keys.refresh(family_id, token_hash),
                    keys.refresh_family(family_id),
                    keys.refresh(family_id, next_hash),
                    keys.refresh_family_sessions(family_id),
                ],
                args=[next_hash, self._ttl_ms],
            )
        outcome = _text(outcome)
        session_ids = tuple(_text(s) for s in minted)
        if outcome in ("reused", "revoked"):
            await self._end_sessions(UUID(_text(user)), session_ids)
        if outcome == "rotated":
            return IssuedRefreshToken(
                f"{family_id.hex}.{secret}", family_id, UUID(_text(user)), from_ms(expires)
            )
        if outcome == "reused":
            user_id = UUID(_text(user))
            logger.warning("refresh token reuse: family %s of user %s revoked", family_id, user_id)
            detected = from_ms(time.time() * 1000)
            await self._report_reuse(TokenReuse(user_id, family_id, detected, session_ids))
            raise PermissionDenied("refresh token was already used; its family is revoked")
        if outcome == "revoked":
            raise PermissionDenied("refresh token belongs to a revoked session")
        raise PermissionDenied("refresh token is unknown or expired")

    async def _end_sessions(self, user_id: UUID, session_ids: tuple[str, ...]) -> None:
        # The user's session hash is another slot than the family: a second command.
        if session_ids:
            with self._client.guard("tokens.end_sessions"):
                await self._client.redis.hdel(self._client.keys.session(user_id), *session_ids)

    async def attach_session(self, family_id: UUID, session_id: str) -> None:
        """Record a session minted by a refresh as its family's, replacing the previous one.

        The session the family minted before (at login or the last refresh) ends: each
        login holds one current session, so refreshing does not pile up sessions.

        Raises:
            PermissionDenied: the family was revoked meanwhile (a reuse was detected
                between the rotation and this call); the caller ends the new session.
            InvalidInput: bad ``family_id`` or ``session_id``.
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        family_key = keys.refresh_family(family_id)
        if not isinstance(session_id, str) or not 1 <= len(session_id) <= 64:
            raise InvalidInput("session_id", "must be a string of 1 to 64 characters")
        with self._client.guard("tokens.attach_session"):
            found = await self._attach(
                keys=[family_key, keys.refresh_family_sessions(family_id)], args=[session_id]
            )
            if found is None:
                raise PermissionDenied("refresh token belongs to a revoked session")
            previous, owner = (_text(value) for value in found)
            if previous and previous != session_id:
                await self._client.redis.hdel(keys.session(UUID(owner)), previous)

    async def _report_reuse(self, event: TokenReuse) -> None:
        if self._on_reuse is None:
            return
        try:
            await self._on_reuse(event)
        except Exception:  # the caller must still be refused; the handler's failure is logged
            logger.exception("on_reuse handler failed")

    async def revoke(self, token: str) -> bool:
        """Revoke the login of ``token`` (logout): its family and the sessions it minted.

        Returns ``True`` if the family was alive.

        Raises:
            InvalidInput: ``token`` is not shaped like a refresh token.
            Unavailable: Redis could not be reached.
        """
        family_id, _ = _parse(token)
        return await self.revoke_family(family_id)

    async def revoke_family(self, family_id: UUID) -> bool:
        """Revoke one family and end the sessions it minted; ``True`` if it was alive.

        None of its tokens rotates again.

        Raises:
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        with self._client.guard("tokens.revoke_family"):
            alive, user, *minted = await self._revoke(
                keys=[keys.refresh_family(family_id), keys.refresh_family_sessions(family_id)],
                args=[],
            )
        if alive:
            await self._end_sessions(UUID(_text(user)), tuple(_text(s) for s in minted))
        return bool(alive)

    async def revoke_all(self, user_id: UUID) -> int:
        """Revoke every family of ``user_id``; returns how many were alive.

        The user's sessions are :meth:`SessionStore.revoke_all
        <chatkeep.realtime.SessionStore.revoke_all>`'s to end (one ``DEL``): "log out
        everywhere" calls both, as the facade does.

        Raises:
            Unavailable: Redis could not be reached.
        """
        keys = self._client.keys
        index = keys.user_refresh_families(user_id)
        with self._client.guard("tokens.revoke_all"):
            members = await self._client.redis.smembers(index)
            if not members:
                return 0
            pipe = self._client.pipeline()
            for member in members:
                pipe.delete(keys.refresh_family(UUID(hex=_text(member))))
            pipe.srem(index, *members)
            results = await pipe.execute()
        return sum(int(n) for n in results[:-1])

    async def family_alive(self, family_id: UUID) -> bool:
        """Whether the family still exists (not revoked, not expired).

        Raises:
            Unavailable: Redis could not be reached.
        """
        with self._client.guard("tokens.family_alive"):
            return bool(
                await self._client.redis.exists(self._client.keys.refresh_family(family_id))
            )
