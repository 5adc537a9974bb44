"""Rate limiting with GCRA, and login throttling with lockout.

GCRA (the generic cell rate algorithm) keeps one number per (action, subject): the
*theoretical arrival time* (TAT) of the next request if requests came exactly at the
allowed rate. A request is allowed when, after adding its cost, the TAT is no further in
the future than the burst tolerance. Compared with fixed windows it has no boundary spike
(twice the limit across a window edge); compared with sliding logs it stores one number,
not one entry per request. It runs in one Lua script with the server's clock (``TIME``),
so every node shares one view and a check is one round trip; the key expires when the TAT
is reached, which is exactly when it would no longer change an answer.

:class:`LoginThrottle` adds what logins need on top: a per-account GCRA on attempts and a
lockout after ``max_failures`` failures within ``failure_window``; each lockout in a row
lasts twice as long as the one before, up to ``max_lockout``.

Account names are case-folded and stripped first, so ``Alice@x`` and ``alice@x `` share
one counter.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from chatkeep.errors import InvalidInput, RateLimited
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.clock import seconds
from chatkeep.realtime.keys import validate_id

__all__ = ["LoginFailure", "LoginThrottle", "RateLimit", "RateLimitResult", "RateLimiter"]

# KEYS[1] TAT. ARGV: emission interval ms, burst, cost. Returns
# {allowed 0/1, remaining, retry_after ms, reset_after ms} (integers: Lua numbers are
# truncated on the way out, so times are rounded up first).
_GCRA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tolerance = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local allow_at = new_tat - tolerance
if allow_at > now then
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, math.ceil(allow_at - now), math.ceil(tat - now)}
end
if cost > 0 then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
end
return {1, math.floor((now - allow_at) / interval), 0, math.ceil(new_tat - now)}
"""

# The same for every key of KEYS in order, cost ARGV[3] each, under one TIME: a subject
# named twice is counted twice. Returns the four numbers of each key, one flat list.
_GCRA_MANY: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tolerance = interval * burst
local out = {}
local seen = {}
for _, key in ipairs(KEYS) do
  -- A key met again uses the exact TAT set here (its stored text is rounded).
  local tat = seen[key] or tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - tolerance
  if allow_at > now then
    local remaining = math.floor((tolerance - (tat - now)) / interval)
    if remaining < 0 then remaining = 0 end
    out[#out + 1] = 0
    out[#out + 1] = remaining
    out[#out + 1] = math.ceil(allow_at - now)
    out[#out + 1] = math.ceil(tat - now)
  else
    if cost > 0 then
      redis.call('SET', key, tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
      seen[key] = new_tat
    end
    out[#out + 1] = 1
    out[#out + 1] = math.floor((now - allow_at) / interval)
    out[#out + 1] = 0
    out[#out + 1] = math.ceil(new_tat - now)
  end
end
return out
"""

# KEYS: failures, lock, lockouts. ARGV: max failures, window ms, lockout ms, max lockout
# ms, lockout memory ms. Returns {failures, locked 0/1, lock ms left}.
_FAILURE: Final = """
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {0, 1, left} end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n < tonumber(ARGV[1]) then return {n, 0, 0} end
local k = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local dur = math.min(tonumber(ARGV[3]) * 2 ^ (k - 1), tonumber(ARGV[4]))
dur = math.floor(dur)
redis.call('SET', KEYS[2], k, 'PX', dur)
redis.call('DEL', KEYS[1])
return {n, 1, dur}
"""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``limit`` requests per ``period`` seconds, with bursts of up to ``burst``.

    Attributes:
        limit: sustained requests per period (at least 1).
        period: the period in seconds.
        burst: requests a fresh subject may make at once (default: ``limit``).
    """

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise InvalidInput("limit", "must be a positive integer")
        seconds(self.period, "period", maximum=366 * 86_400.0)
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise InvalidInput("burst", "must be a positive integer")

    @property
    def emission_interval_ms(self) -> float:
        """Milliseconds between two requests at the sustained rate."""
        return float(self.period) * 1000.0 / self.limit

    @property
    def effective_burst(self) -> int:
        """The burst, defaulting to ``limit``."""
        return self.burst if self.burst is not None else self.limit


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """What a rate-limit check decided.

    Attributes:
        allowed: the request may proceed (and was counted).
        remaining: further requests allowed right now.
        retry_after: seconds until this request would be allowed (0 if allowed).
        reset_after: seconds until the subject is back to a full burst.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


class RateLimiter:
    """GCRA rate limits per (subject, action).

    Args:
        client: the shared Redis connection.
        policies: the default :class:`RateLimit` of each action (``{"send": RateLimit(...)}``).
    """

    def __init__(
        self, client: RedisClient, policies: Mapping[str, RateLimit] | None = None
    ) -> None:
        self._client = client
        self._policies = dict(policies or {})
        for action, policy in self._policies.items():
            validate_id(action, "action")
            if not isinstance(policy, RateLimit):
                raise InvalidInput("policies", "values must be RateLimit objects")
        self._gcra = client.script(_GCRA)
        self._gcra_many = client.script(_GCRA_MANY)

    def policy(self, action: str) -> RateLimit:
        """The configured limit of ``action``.

        Raises:
            InvalidInput: ``action`` is not a valid id, or has no configured policy.
        """
        validate_id(action, "action")
        try:
            return self._policies[action]
        except KeyError:
            raise InvalidInput("action", "has no configured rate limit") from None

    async def check(
        self, subject: str, action: str, *, limit: RateLimit | None = None, cost: int = 1
    ) -> RateLimitResult:
        """Count a request of ``subject`` for ``action`` if the limit allows it.

        Args:
            subject: who is limited (a user id, an IP address, an account name...).
            action: what is limited (``"send"``, ``"login"``...).
            limit: the limit to apply (default: the action's configured policy).
            cost: how many requests this one counts as; 0 only looks.

        Raises:
            InvalidInput: bad ``subject``/``action``/``limit``/``cost``, no policy for ``action``,
                or ``cost`` above the burst (it could never be allowed).
            Unavailable: Redis could not be reached.
        """
        # Every argument is checked before use: a dict as ``action`` would otherwise reach
        # the policy look-up (TypeError: unhashable) and a string as ``limit`` its
        # attribute reads (AttributeError).
        validate_id(subject, "subject")
        validate_id(action, "action")
        if limit is not None and not isinstance(limit, RateLimit):
            raise InvalidInput("limit", "must be a RateLimit or None")
        policy = limit if limit is not None else self.policy(action)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise InvalidInput("cost", "must be a non-negative integer")
        if cost > policy.effective_burst:
            raise InvalidInput("cost", "must not exceed the limit's burst")
        key = self._client.keys.rate_limit(action, subject)
        with self._client.guard("ratelimit.check"):
            allowed, remaining, retry_ms, reset_ms = await self._gcra(
                keys=[key],
                args=[repr(policy.emission_interval_ms), policy.effective_burst, cost],
            )
        return RateLimitResult(
            allowed=bool(allowed),
            remaining=int(remaining),
            retry_after=int(retry_ms) / 1000.0,
            reset_after=int(reset_ms) / 1000.0,
        )

    async def check_many(self, subjects: Sequence[str], action: str) -> list[RateLimitResult]:
        """:meth:`check` for each of ``subjects`` (cost 1 each, in order), in one round trip.

        A subject named twice is counted twice, in order, as two :meth:`check` calls
        would. The group commit of ``send_message`` checks a whole batch's senders so.

        Raises:
            InvalidInput: a bad subject or action, or no policy for ``action``.
            Unavailable: Redis could not be reached (nothing is known to be counted).
        """
        validate_id(action, "action")
        policy = self.policy(action)
        if not isinstance(subjects, Sequence) or isinstance(subjects, str | bytes):
            raise InvalidInput("subjects", "must be a sequence of subjects")
        for subject in subjects:
            validate_id(subject, "subject")
        if not subjects:
            return []
        if self._client.cluster:
            return await self._check_many_on_a_cluster(subjects, action)
        # One script call for the whole batch: one command to pack and one round trip (a
        # pipeline of per-subject calls cost a SCRIPT EXISTS round trip more, and a
        # command per subject).
        keys = [self._client.keys.rate_limit(action, subject) for subject in subjects]
        args: list[str | int] = [repr(policy.emission_interval_ms), policy.effective_burst, 1]
        with self._client.guard("ratelimit.check_many"):
            flat: list[Any] = await self._gcra_many(keys=keys, args=args)
        return [
            RateLimitResult(
                allowed=bool(flat[i]),
                remaining=int(flat[i + 1]),
                retry_after=int(flat[i + 2]) / 1000.0,
                reset_after=int(flat[i + 3]) / 1000.0,
            )
            for i in range(0, 4 * len(subjects), 4)
        ]

    async def _check_many_on_a_cluster(
        self, subjects: Sequence[str], action: str
    ) -> list[RateLimitResult]:
        # The subjects' keys live in many slots: one GCRA call each, different subjects at
        # once, a subject named twice in order (as two check() calls would count it).
        places: dict[str, list[int]] = {}
        for i, subject in enumerate(subjects):
            places.setdefault(subject, []).append(i)
        results: dict[int, RateLimitResult] = {}

        async def count(subject: str, indexes: list[int]) -> None:
            for i in indexes:
                results[i] = await self.check(subject, action)

        await asyncio.gather(*(count(s, indexes) for s, indexes in places.items()))
        return [results[i] for i in range(len(subjects))]

    async def enforce(
        self, subject: str, action: str, *, limit: RateLimit | None = None, cost: int = 1
    ) -> RateLimitResult:
        """Like :meth:`check`, but raise when the request is not allowed.

        Raises:
            RateLimited: over the limit (``retry_after`` says for how long).
            InvalidInput: as :meth:`check`.
            Unavailable: Redis could not be reached.
        """
        result = await self.check(subject, action, limit=limit, cost=cost)
        if not result.allowed:
            raise RateLimited(
                f"rate limit of {action!r} reached; retry in {result.retry_after:.3f} s",
                retry_after=result.retry_after,
                action=action,
            )
        return result

    async def reset(self, subject: str, action: str) -> None:
        """Forget ``subject``'s history for ``action`` (a full burst again).

        Raises:
            Unavailable: Redis could not be reached.
        """
        key = self._client.keys.rate_limit(action, subject)
        with self._client.guard("ratelimit.reset"):
            await self._client.redis.delete(key)


@dataclass(frozen=True, slots=True)
class LoginFailure:
    """What recording a failed login did.

    Attributes:
        failures: failures counted in the current window (0 if already locked).
        locked: the account is locked now.
        retry_after: seconds until the lock ends (0 if not locked).
    """

    failures: int
    locked: bool
    retry_after: float


def normalize_account(account: str) -> str:
    """The canonical form of an account name (case-folded, stripped), validated.

    Raises:
        InvalidInput: empty, too long, or holding characters not allowed in a key.
    """
    if not isinstance(account, str):
        raise InvalidInput("account", "must be a string")
    return validate_id(account.strip().casefold(), "account")


class LoginThrottle:
    """Throttles login attempts per account and locks accounts after repeated failures.

    Use: :meth:`check` before verifying the password, then :meth:`record_failure` or
    :meth:`record_success`.

    Args:
        client: the shared Redis connection.
        max_failures: failures within ``failure_window`` that lock the account.
        failure_window: how long a failure is remembered (default 15 minutes).
        lockout: length of the first lockout (default 5 minutes); each further lockout
            within ``lockout_memory`` lasts twice as long.
        max_lockout: longest lockout (default 24 hours).
        lockout_memory: how long past lockouts count toward doubling (default 24 hours).
        attempts: GCRA limit on attempts per account, failed or not (default 10 a minute).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        max_failures: int = 5,
        failure_window: float | timedelta = timedelta(minutes=15),
        lockout: float | timedelta = timedelta(minutes=5),
        max_lockout: float | timedelta = timedelta(hours=24),
        lockout_memory: float | timedelta = timedelta(hours=24),
        attempts: RateLimit | None = None,
    ) -> None:
        week = 7 * 86_400.0
        if (
            isinstance(max_failures, bool)
            or not isinstance(max_failures, int)
            or not 1 <= max_failures <= 1000
        ):
            raise InvalidInput("max_failures", "must be an integer from 1 to 1000")
        self._client = client
        self._max_failures = max_failures
        self._window_ms = math.ceil(seconds(failure_window, "failure_window", maximum=week) * 1000)
        self._lockout_ms = math.ceil(seconds(lockout, "lockout", maximum=week) * 1000)
        self._max_lockout_ms = math.ceil(seconds(max_lockout, "max_lockout", maximum=week) * 1000)
        self._memory_ms = math.ceil(seconds(lockout_memory, "lockout_memory", maximum=week) * 1000)
        if self._max_lockout_ms < self._lockout_ms:
            raise InvalidInput("max_lockout", "must not be shorter than lockout")
        self._attempts = attempts if attempts is not None else RateLimit(10, 60.0)
        self._limiter = RateLimiter(client, {"login": self._attempts})
        self._failure = client.script(_FAILURE)

    async def check(self, account: str) -> None:
        """Count a login attempt; raise if the account is locked or attempts too fast.

        Raises:
            RateLimited: locked out, or over the attempt rate (``retry_after`` says how
                long to wait).
            InvalidInput: bad ``account``.
            Unavailable: Redis could not be reached.
        """
        name = normalize_account(account)
        with self._client.guard("login.check"):
            left = await self._client.redis.pttl(self._client.keys.login_lock(name))
        if left > 0:
            raise RateLimited(
                "account is locked after repeated failed logins",
                retry_after=left / 1000.0,
                action="login",
            )
        await self._limiter.enforce(name, "login")

    async def record_failure(self, account: str) -> LoginFailure:
        """Count a failed login; locks the account when it reaches ``max_failures``.

        Raises:
            InvalidInput: bad ``account``.
            Unavailable: Redis could not be reached.
        """
        name = normalize_account(account)
        keys = self._client.keys
        with self._client.guard("login.record_failure"):
            failures, locked, left = await self._failure(
                keys=[keys.login_failures(name), keys.login_lock(name), keys.login_lockouts(name)],
                args=[
                    self._max_failures,
                    self._window_ms,
                    self._lockout_ms,
                    self._max_lockout_ms,
                    self._memory_ms,
                ],
            )
        return LoginFailure(int(failures), bool(locked), int(left) / 1000.0)

    async def record_success(self, account: str) -> None:
        """Clear the failure count after a successful login (past lockouts still count).

        Raises:
            InvalidInput: bad ``account``.
            Unavailable: Redis could not be reached.
        """
        name = normalize_account(account)
        with self._client.guard("login.record_success"):
            await self._client.redis.delete(self._client.keys.login_failures(name))

    async def unlock(self, account: str) -> None:
        """Lift a lockout and forget every failure and lockout (an administrator's call).

        Raises:
            InvalidInput: bad ``account``.
            Unavailable: Redis could not be reached.
        """
        name = normalize_account(account)
        keys = self._client.keys
        with self._client.guard("login.unlock"):
            await self._client.redis.delete(
                keys.login_failures(name), keys.login_lock(name), keys.login_lockouts(name)
            )
