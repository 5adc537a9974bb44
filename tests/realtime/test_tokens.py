from __future__ import annotations

import asyncio
import secrets
from typing import Any
from uuid import uuid4

import pytest

from chatkeep.errors import InvalidInput, PermissionDenied, Unavailable
from chatkeep.realtime import RedisClient, RefreshTokenStore, SessionStore, TokenReuse
from tests.realtime.conftest import ClientFactory


async def test_issue_and_rotate_a_chain(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    user = uuid4()
    first = await store.issue(user, session_id="s1")
    assert first.token not in repr(first)
    assert first.user_id == user
    current = first
    for _ in range(3):
        following = await store.rotate(current.token)
        assert following.family_id == first.family_id
        assert following.user_id == user
        assert following.token != current.token
        current = following
    assert await store.family_alive(first.family_id)


async def test_every_token_is_single_use_and_reuse_revokes_the_family(
    client: RedisClient,
) -> None:
    reports: list[TokenReuse] = []

    async def on_reuse(event: TokenReuse) -> None:
        reports.append(event)

    store = RefreshTokenStore(client, on_reuse=on_reuse)
    user = uuid4()
    first = await store.issue(user)
    second = await store.rotate(first.token)
    with pytest.raises(PermissionDenied, match="already used"):
        await store.rotate(first.token)  # a thief (or the victim) replays the spent token
    assert [(r.user_id, r.family_id) for r in reports] == [(user, first.family_id)]
    assert not await store.family_alive(first.family_id)
    # The legitimate holder's newest token is dead too: both must log in again.
    with pytest.raises(PermissionDenied, match="revoked"):
        await store.rotate(second.token)


async def test_racing_rotations_of_one_token_let_only_one_win(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    first = await store.issue(uuid4())
    results = await asyncio.gather(
        *(store.rotate(first.token) for _ in range(5)), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, PermissionDenied) for r in results if r not in winners)
    # The losers replayed a spent token: the family is gone, the winner's token with it.
    with pytest.raises(PermissionDenied):
        await store.rotate(winners[0].token)


async def test_a_retried_rotation_is_not_mistaken_for_theft(
    client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RefreshTokenStore(client)
    first = await store.issue(uuid4())
    # The connection layer re-sends the same script call when a reply is lost: same
    # presented token, same successor. Simulate it by drawing the same successor twice.
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: "R" * 43)
    once = await store.rotate(first.token)
    again = await store.rotate(first.token)
    assert once.token == again.token
    assert await store.family_alive(first.family_id)


async def test_only_a_hash_is_stored(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    issued = await store.issue(uuid4())
    secret = issued.token.split(".", 1)[1]
    names = [key async for key in client.redis.scan_iter("refresh*")]
    assert names
    for name in names:
        assert secret.encode() not in name
        values = await client.redis.hgetall(name)
        assert all(secret.encode() not in v for v in values.values())


async def test_tokens_expire(client: RedisClient) -> None:
    store = RefreshTokenStore(client, ttl=0.2)
    issued = await store.issue(uuid4())
    key_ttls = [await client.redis.pttl(k) async for k in client.redis.scan_iter("refresh:*")]
    assert key_ttls
    assert all(0 < ttl <= 200 for ttl in key_ttls)
    await asyncio.sleep(0.3)
    with pytest.raises(PermissionDenied, match="unknown or expired"):
        await store.rotate(issued.token)


async def test_the_family_lifetime_caps_rotation(client: RedisClient) -> None:
    store = RefreshTokenStore(client, ttl=10, max_family_lifetime=0.3)
    issued = await store.issue(uuid4())
    await asyncio.sleep(0.15)
    rotated = await store.rotate(issued.token)
    await asyncio.sleep(0.2)
    with pytest.raises(PermissionDenied):
        await store.rotate(rotated.token)
    assert not await store.family_alive(issued.family_id)


async def test_revoke_logout_and_revoke_all(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    user = uuid4()
    laptop = await store.issue(user)
    phone = await store.issue(user)
    tablet = await store.issue(user)
    other = await store.issue(uuid4())
    assert await store.revoke(laptop.token)
    assert not await store.revoke(laptop.token)
    with pytest.raises(PermissionDenied):
        await store.rotate(laptop.token)
    assert await store.revoke_all(user) == 2
    for issued in (phone, tablet):
        with pytest.raises(PermissionDenied):
            await store.rotate(issued.token)
    assert await store.revoke_all(user) == 0
    assert (await store.rotate(other.token)).user_id == other.user_id


async def test_unknown_token_is_denied(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    with pytest.raises(PermissionDenied, match="unknown"):
        await store.rotate(f"{uuid4().hex}.{'b' * 43}")


@pytest.mark.parametrize("token", ["", "abc", f"{'0' * 32}.short", None])
async def test_malformed_tokens_are_invalid_input(client: RedisClient, token: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        await RefreshTokenStore(client).rotate(token)
    assert caught.value.field == "token"


async def test_a_failing_reuse_handler_does_not_let_the_reuse_through(
    client: RedisClient,
) -> None:
    async def broken(event: TokenReuse) -> None:
        raise RuntimeError("audit table is down")

    store = RefreshTokenStore(client, on_reuse=broken)
    first = await store.issue(uuid4())
    await store.rotate(first.token)
    with pytest.raises(PermissionDenied):
        await store.rotate(first.token)


async def test_session_id_is_checked(client: RedisClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        await RefreshTokenStore(client).issue(uuid4(), session_id="x" * 65)
    assert caught.value.field == "session_id"


def test_bad_options_are_refused(client: RedisClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        RefreshTokenStore(client, ttl=0)
    assert caught.value.field == "ttl"


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    store = RefreshTokenStore(await make_client(dead_url))
    with pytest.raises(Unavailable):
        await store.issue(uuid4())
    with pytest.raises(Unavailable):
        await store.rotate(f"{uuid4().hex}.{'b' * 43}")


async def test_reuse_ends_every_session_the_family_minted(client: RedisClient) -> None:
    reports: list[TokenReuse] = []

    async def on_reuse(event: TokenReuse) -> None:
        reports.append(event)

    sessions = SessionStore(client)
    store = RefreshTokenStore(client, on_reuse=on_reuse)
    user = uuid4()
    at_login = await sessions.create(user)
    first = await store.issue(user, session_id=at_login.session.session_id)
    other_login = await sessions.create(user)
    other = await store.issue(user, session_id=other_login.session.session_id)
    second = await store.rotate(first.token)
    refreshed = await sessions.create(user)
    await store.attach_session(first.family_id, refreshed.session.session_id)
    assert await sessions.validate(at_login.token) is None  # replaced by the refresh's
    with pytest.raises(PermissionDenied, match="already used"):
        await store.rotate(first.token)
    assert await sessions.validate(refreshed.token) is None
    assert sorted(reports[0].session_ids) == sorted(
        [at_login.session.session_id, refreshed.session.session_id]
    )
    # A session minted after the revocation cannot join the dead family.
    late = await sessions.create(user)
    with pytest.raises(PermissionDenied, match="revoked"):
        await store.attach_session(first.family_id, late.session.session_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        await store.rotate(second.token)
    # The user's other login is another family: untouched.
    assert await sessions.validate(other_login.token) is not None
    await store.rotate(other.token)


async def test_a_replay_finishes_ending_the_sessions(client: RedisClient) -> None:
    # Should the sessions' HDEL be lost after the family's revocation (an outage between
    # the two commands), any later presentation of the family's tokens ends them.
    sessions = SessionStore(client)
    store = RefreshTokenStore(client)
    user = uuid4()
    login = await sessions.create(user)
    first = await store.issue(user, session_id=login.session.session_id)
    second = await store.rotate(first.token)
    assert await store.revoke_family(first.family_id)
    assert await sessions.validate(login.token) is None
    restored = client.keys.session(user)
    await client.redis.hset(restored, login.session.session_id, '{"c":0,"a":0,"e":1,"m":1}')
    with pytest.raises(PermissionDenied, match="revoked"):
        await store.rotate(second.token)
    assert not await client.redis.hexists(restored, login.session.session_id)


async def test_logout_by_refresh_token_ends_the_login_session(client: RedisClient) -> None:
    sessions = SessionStore(client)
    store = RefreshTokenStore(client)
    user = uuid4()
    login = await sessions.create(user)
    issued = await store.issue(user, session_id=login.session.session_id)
    assert await store.revoke(issued.token)
    assert await sessions.validate(login.token) is None
    assert not await store.revoke(issued.token)


async def test_attach_session_checks_its_input(client: RedisClient) -> None:
    store = RefreshTokenStore(client)
    for bad in ("", "x" * 65, 7):
        with pytest.raises(InvalidInput) as caught:
            await store.attach_session(uuid4(), bad)  # type: ignore[arg-type]
        assert caught.value.field == "session_id"
