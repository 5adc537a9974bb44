from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import uuid4

import pytest

from chatkeep.errors import InvalidInput, RateLimited, Unavailable
from chatkeep.realtime import LoginThrottle, RateLimit, RateLimiter, RedisClient
from tests.realtime.conftest import ClientFactory


async def test_a_fresh_subject_gets_exactly_its_burst(client: RedisClient) -> None:
    limiter = RateLimiter(client, {"send": RateLimit(5, 60.0, burst=3)})
    results = [await limiter.check("u1", "send") for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.remaining for r in results[:3]] == [2, 1, 0]
    denied = results[3]
    assert denied.remaining == 0
    assert 11.5 < denied.retry_after <= 12.0  # one emission interval (60 s / 5)
    assert denied.reset_after > 0
    # Another subject, or another action, has its own budget.
    assert (await limiter.check("u2", "send")).allowed


async def test_check_many_counts_each_subject_in_order(client: RedisClient) -> None:
    # Standalone: one script call; on a cluster the subjects' keys sit in many slots.
    limiter = RateLimiter(client, {"send": RateLimit(5, 60.0, burst=2)})
    subjects = [f"batch-{i}" for i in range(12)]
    results = await limiter.check_many([*subjects, subjects[0], subjects[0]], "send")
    assert [r.allowed for r in results] == [True] * 13 + [False]
    assert [r.remaining for r in results[:12]] == [1] * 12
    # What check() sees next agrees with what check_many counted.
    assert not (await limiter.check(subjects[0], "send")).allowed
    assert (await limiter.check(subjects[1], "send")).allowed
    assert await limiter.check_many([], "send") == []


async def hammer(
    client: RedisClient, limit: RateLimit, *, tasks: int, window: float
) -> tuple[int, float, float]:
    """Call as fast as possible for ``window`` seconds.

    Returns the allowed count and two spans: the shortest the server can have seen (last
    call sent to first reply) and the longest (first call sent to last reply).
    """
    limiter = RateLimiter(client)
    await asyncio.gather(*(client.ping() for _ in range(tasks)))  # warm the pool
    allowed = 0
    starts: list[float] = []
    ends: list[float] = []
    stop = time.monotonic() + window

    async def worker() -> None:
        nonlocal allowed
        while (sent := time.monotonic()) < stop:
            starts.append(sent)
            if (await limiter.check("hammered", "send", limit=limit)).allowed:
                allowed += 1
            ends.append(time.monotonic())

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return allowed, max(starts) - min(ends), max(ends) - min(starts)


# After the burst, GCRA lets exactly one request through per emission interval however
# late callers poll, so over a window the count is burst + rate x window, within one. The
# window is measured from the client, bracketing what the server saw.
@pytest.mark.parametrize("tasks", [1, 20])
async def test_allowed_count_over_a_window_is_within_one_of_the_rate(
    client: RedisClient, tasks: int
) -> None:
    rate, burst, window = 50, 5, 0.6
    limit = RateLimit(rate, 1.0, burst=burst)
    allowed, shortest, longest = await hammer(client, limit, tasks=tasks, window=window)
    assert shortest > window - 0.1
    assert burst + rate * shortest - 1 <= allowed <= burst + rate * longest + 1


async def test_retry_after_is_accurate(client: RedisClient) -> None:
    limiter = RateLimiter(client)
    limit = RateLimit(10, 1.0, burst=1)
    assert (await limiter.check("s", "a", limit=limit)).allowed
    denied = await limiter.check("s", "a", limit=limit)
    assert not denied.allowed
    assert 0.05 < denied.retry_after <= 0.1
    await asyncio.sleep(denied.retry_after + 0.005)
    assert (await limiter.check("s", "a", limit=limit)).allowed


async def test_cost_and_peeking(client: RedisClient) -> None:
    limiter = RateLimiter(client, {"upload": RateLimit(10, 60.0)})
    assert (await limiter.check("s", "upload", cost=7)).remaining == 3
    assert not (await limiter.check("s", "upload", cost=4)).allowed
    peek = await limiter.check("s", "upload", cost=0)
    assert peek.allowed
    assert peek.remaining == 3
    assert (await limiter.check("s", "upload", cost=3)).allowed
    with pytest.raises(InvalidInput) as caught:
        await limiter.check("s", "upload", cost=11)
    assert caught.value.field == "cost"
    with pytest.raises(InvalidInput):
        await limiter.check("s", "upload", cost=-1)


async def test_enforce_raises_rate_limited(client: RedisClient) -> None:
    limiter = RateLimiter(client, {"send": RateLimit(1, 10.0)})
    await limiter.enforce("u", "send")
    with pytest.raises(RateLimited) as caught:
        await limiter.enforce("u", "send")
    assert 9 < caught.value.retry_after <= 10
    assert caught.value.action == "send"
    await limiter.reset("u", "send")
    assert (await limiter.enforce("u", "send")).allowed


async def test_the_state_key_expires_when_it_stops_mattering(client: RedisClient) -> None:
    limiter = RateLimiter(client)
    limit = RateLimit(10, 1.0, burst=2)
    await limiter.check("s", "a", limit=limit)
    key = client.keys.rate_limit("a", "s")
    assert 0 < await client.redis.pttl(key) <= 100
    await asyncio.sleep(0.15)
    assert not await client.redis.exists(key)


async def test_unknown_policies_and_bad_limits_are_refused(client: RedisClient) -> None:
    limiter = RateLimiter(client)
    with pytest.raises(InvalidInput) as caught:
        await limiter.check("s", "nothing-configured")
    assert caught.value.field == "action"
    with pytest.raises(InvalidInput) as caught:
        await limiter.check("has space", "a", limit=RateLimit(1, 1.0))
    assert caught.value.field == "subject"
    with pytest.raises(InvalidInput):
        RateLimiter(client, {"x": "not a limit"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": 0, "period": 1.0}, "limit"),
        ({"limit": True, "period": 1.0}, "limit"),
        ({"limit": 1, "period": 0}, "period"),
        ({"limit": 1, "period": 1.0, "burst": 0}, "burst"),
    ],
)
def test_rate_limit_values_are_checked(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        RateLimit(**kwargs)
    assert caught.value.field == field


def test_rate_limit_derived_values() -> None:
    limit = RateLimit(4, 2.0)
    assert limit.emission_interval_ms == 500.0
    assert limit.effective_burst == 4
    assert RateLimit(4, 2.0, burst=1).effective_burst == 1


async def test_login_lockout_after_repeated_failures(client: RedisClient) -> None:
    throttle = LoginThrottle(client, max_failures=3, lockout=0.2, max_lockout=10)
    account = f"alice-{uuid4().hex[:6]}@example.com"
    await throttle.check(account)
    first = await throttle.record_failure(account)
    assert (first.failures, first.locked) == (1, False)
    await throttle.record_failure(account.upper())  # same account, other case
    locked = await throttle.record_failure(f"  {account} ")
    assert locked.locked
    assert 0.15 < locked.retry_after <= 0.2
    with pytest.raises(RateLimited) as caught:
        await throttle.check(account)
    assert 0 < caught.value.retry_after <= 0.2
    assert caught.value.action == "login"
    again = await throttle.record_failure(account)  # while locked: not counted
    assert again.locked
    assert again.failures == 0
    await asyncio.sleep(0.25)
    await throttle.check(account)  # lock expired
    for _ in range(3):
        second = await throttle.record_failure(account)
    assert second.locked
    assert 0.35 < second.retry_after <= 0.4  # the second lockout lasts twice as long


async def test_success_clears_failures_and_unlock_clears_all(client: RedisClient) -> None:
    throttle = LoginThrottle(client, max_failures=2, lockout=5)
    await throttle.record_failure("bob")
    await throttle.record_success("bob")
    assert (await throttle.record_failure("bob")).failures == 1
    assert (await throttle.record_failure("bob")).locked
    await throttle.unlock("BOB")
    await throttle.check("bob")
    assert (await throttle.record_failure("bob")).failures == 1


async def test_login_attempts_are_rate_limited_per_account(client: RedisClient) -> None:
    throttle = LoginThrottle(client, attempts=RateLimit(3, 60.0))
    for _ in range(3):
        await throttle.check("carol")
    with pytest.raises(RateLimited):
        await throttle.check("carol")
    await throttle.check("dave")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_failures": 0}, "max_failures"),
        ({"lockout": 10, "max_lockout": 5}, "max_lockout"),
        ({"failure_window": 0}, "failure_window"),
    ],
)
def test_login_throttle_options_are_checked(
    client: RedisClient, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        LoginThrottle(client, **kwargs)
    assert caught.value.field == field


async def test_bad_accounts_are_refused(client: RedisClient) -> None:
    throttle = LoginThrottle(client)
    for bad in ["", "   ", "two words", 7]:
        with pytest.raises(InvalidInput) as caught:
            await throttle.check(bad)  # type: ignore[arg-type]
        assert caught.value.field == "account"


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    dead = await make_client(dead_url)
    with pytest.raises(Unavailable):
        await RateLimiter(dead).check("s", "a", limit=RateLimit(1, 1.0))
    with pytest.raises(Unavailable):
        await LoginThrottle(dead).check("x")
    with pytest.raises(Unavailable):
        await LoginThrottle(dead).record_failure("x")
