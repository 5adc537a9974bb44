"""Typing indicators that stop by themselves within a few seconds.

``typing:{roomId}`` is a sorted set user -> expiry (Unix ms). Starting to type adds or
refreshes the user's member and pushes the key's TTL forward; readers skip (and prune)
expired members. A client that crashes mid-sentence therefore stops "typing" after
``ttl`` seconds with nothing having to clean up, and the key itself disappears once
nobody types. (The module is not called ``typing`` so it never shadows the standard
library's.)
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from chatkeep.errors import InvalidInput
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import Clock, seconds, wall_clock

__all__ = ["TypingIndicators"]

MAX_TTL = 60.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TypingIndicators:
    """Who is typing in which room.

    Args:
        client: the shared Redis connection.
        ttl: how long a "typing" lasts without being renewed (default 5 s, at most 60).
        clock: current Unix time in seconds (tests move it).
    """

    def __init__(self, client: RedisClient, *, ttl: float = 5.0, clock: Clock = wall_clock) -> None:
        self._client = client
        self._ttl = seconds(ttl, "ttl", maximum=MAX_TTL)
        self._clock = clock

    async def start(self, room_id: UUID, user_id: UUID, *, ttl: float | None = None) -> None:
        """Mark ``user_id`` as typing in ``room_id`` for ``ttl`` seconds (renewable).

        Raises:
            InvalidInput: bad ids or ``ttl``.
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.typing(room_id)
        if not isinstance(user_id, UUID):
            raise InvalidInput("user_id", "must be a UUID")
        ttl_ms = max(
            1, int((self._ttl if ttl is None else seconds(ttl, "ttl", maximum=MAX_TTL)) * 1000)
        )
        expires = int(self._clock() * 1000) + ttl_ms
        pipe = self._client.pipeline()
        pipe.zadd(key, {str(user_id): expires})
        # GT: a short ttl must not cut a longer one another typist set on the same key.
        pipe.pexpire(key, ttl_ms, gt=True)
        pipe.pexpire(key, ttl_ms, nx=True)
        with self._client.guard("typing.start"):
            await pipe.execute()

    async def stop(self, room_id: UUID, user_id: UUID) -> bool:
        """``user_id`` stopped typing (sent, or cleared the box); ``True`` if they were.

        Raises:
            InvalidInput: bad ids.
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.typing(room_id)
        if not isinstance(user_id, UUID):
            raise InvalidInput("user_id", "must be a UUID")
        with self._client.guard("typing.stop"):
            return bool(await self._client.redis.zrem(key, str(user_id)))

    async def typers(self, room_id: UUID) -> list[UUID]:
        """The users typing in ``room_id`` now, soonest to expire first.

        Raises:
            InvalidInput: bad ``room_id``.
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.typing(room_id)
        now = int(self._clock() * 1000)
        pipe = self._client.pipeline()
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zrangebyscore(key, f"({now}", "+inf")
        with self._client.guard("typing.typers"):
            _, members = await pipe.execute()
        return [UUID(_text(member)) for member in members]
