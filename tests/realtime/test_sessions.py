from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import RedisClient, SessionStore
from tests.realtime.conftest import ClientFactory


async def test_create_validate_and_list(client: RedisClient) -> None:
    store = SessionStore(client)
    user = uuid4()
    issued = await store.create(user, metadata={"device": "phone", "ip": "10.0.0.1"})
    assert issued.token.startswith(f"{user}.")
    assert issued.token not in repr(issued)
    session = await store.validate(issued.token)
    assert session is not None
    assert session.user_id == user
    assert session.session_id == issued.session.session_id
    assert dict(session.metadata) == {"device": "phone", "ip": "10.0.0.1"}
    assert session.expires_at > session.created_at
    assert session.absolute_expires_at - session.created_at == timedelta(days=90)
    listed = await store.list(user)
    assert [s.session_id for s in listed] == [session.session_id]


async def test_only_a_hash_of_the_secret_is_stored(client: RedisClient) -> None:
    store = SessionStore(client)
    issued = await store.create(uuid4())
    secret = issued.token.split(".", 1)[1]
    stored = await client.redis.hgetall(client.keys.session(issued.session.user_id))
    assert secret not in repr(stored)
    assert issued.session.session_id.encode() in stored


async def test_unknown_and_forged_tokens_are_not_sessions(client: RedisClient) -> None:
    store = SessionStore(client)
    issued = await store.create(uuid4())
    other_user = uuid4()
    forged = f"{other_user}.{issued.token.split('.', 1)[1]}"
    assert await store.validate(forged) is None
    assert await store.validate(f"{issued.session.user_id}.{'A' * 43}") is None


@pytest.mark.parametrize(
    "token", ["", "nope", "not-a-uuid.abcdefabcdefabcdefabcdefabcdefabcdef", 42]
)
async def test_malformed_tokens_are_invalid_input(client: RedisClient, token: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        await SessionStore(client).validate(token)
    assert caught.value.field == "token"


async def test_sliding_expiry(client: RedisClient) -> None:
    store = SessionStore(client, idle_timeout=0.3)
    issued = await store.create(uuid4())
    for _ in range(3):
        await asyncio.sleep(0.15)
        assert await store.validate(issued.token) is not None  # each use slides it
    # Reading without sliding does not keep it alive.
    await asyncio.sleep(0.15)
    assert await store.validate(issued.token, slide=False) is not None
    await asyncio.sleep(0.2)
    assert await store.validate(issued.token) is None
    assert await store.list(issued.session.user_id) == []


async def test_sliding_never_passes_the_absolute_lifetime(client: RedisClient) -> None:
    store = SessionStore(client, idle_timeout=10, max_lifetime=0.3)
    issued = await store.create(uuid4())
    assert issued.session.expires_at == issued.session.absolute_expires_at
    await asyncio.sleep(0.15)
    session = await store.validate(issued.token)
    assert session is not None
    assert session.expires_at == session.absolute_expires_at
    await asyncio.sleep(0.2)
    assert await store.validate(issued.token) is None


async def test_the_key_expires_with_its_last_session(client: RedisClient) -> None:
    store = SessionStore(client, idle_timeout=0.2)
    issued = await store.create(uuid4())
    key = client.keys.session(issued.session.user_id)
    assert 0 < await client.redis.pttl(key) <= 200
    await asyncio.sleep(0.3)
    assert not await client.redis.exists(key)


async def test_revoke_one_all_and_by_token(client: RedisClient) -> None:
    store = SessionStore(client)
    user = uuid4()
    first, second, third = [await store.create(user) for _ in range(3)]
    assert await store.revoke(user, first.session.session_id)
    assert not await store.revoke(user, first.session.session_id)
    assert await store.validate(first.token) is None
    assert await store.revoke_token(second.token)
    assert await store.validate(second.token) is None
    assert await store.validate(third.token) is not None
    await store.create(user)
    assert await store.revoke_all(user) == 2
    assert await store.validate(third.token) is None
    assert await store.revoke_all(user) == 0


async def test_sessions_of_other_users_are_untouched(client: RedisClient) -> None:
    store = SessionStore(client)
    mine = await store.create(uuid4())
    theirs = await store.create(uuid4())
    await store.revoke_all(mine.session.user_id)
    assert await store.validate(theirs.token) is not None


async def test_the_least_recently_active_session_makes_room(client: RedisClient) -> None:
    store = SessionStore(client, max_sessions_per_user=2)
    user = uuid4()
    oldest = await store.create(user)
    newer = await store.create(user)
    await asyncio.sleep(0.01)
    assert await store.validate(oldest.token) is not None  # now the most recently active
    newest = await store.create(user)
    assert await store.validate(newer.token) is None
    assert await store.validate(oldest.token) is not None
    assert await store.validate(newest.token) is not None
    assert len(await store.list(user)) == 2


async def test_list_is_ordered_oldest_first(client: RedisClient) -> None:
    store = SessionStore(client)
    user = uuid4()
    ids = []
    for _ in range(3):
        ids.append((await store.create(user)).session.session_id)
        await asyncio.sleep(0.005)
    assert [s.session_id for s in await store.list(user)] == ids


@pytest.mark.parametrize(
    ("metadata", "rule"),
    [
        ({str(n): "v" for n in range(17)}, "at most 16"),
        ({"": "v"}, "keys"),
        ({"k": "v" * 513}, "values"),
        ({"k": 1}, "values"),
    ],
)
async def test_metadata_is_checked(client: RedisClient, metadata: Any, rule: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await SessionStore(client).create(uuid4(), metadata=metadata)
    assert caught.value.field == "metadata"
    assert rule in caught.value.rule


async def test_revoke_checks_the_session_id(client: RedisClient) -> None:
    with pytest.raises(InvalidInput) as caught:
        await SessionStore(client).revoke(uuid4(), "xyz")
    assert caught.value.field == "session_id"


@pytest.mark.parametrize(
    ("option", "value"),
    [("idle_timeout", 0), ("max_lifetime", -1), ("max_sessions_per_user", 0)],
)
def test_bad_options_are_refused(client: RedisClient, option: str, value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        SessionStore(client, **{option: value})
    assert caught.value.field == option


async def test_redis_down_is_unavailable(make_client: ClientFactory, dead_url: str) -> None:
    store = SessionStore(await make_client(dead_url))
    user = uuid4()
    with pytest.raises(Unavailable):
        await store.create(user)
    with pytest.raises(Unavailable):
        await store.validate(f"{user}.{'a' * 43}")
    with pytest.raises(Unavailable):
        await store.revoke_all(user)
