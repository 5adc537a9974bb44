"""Refresh-token rotation through the facade: a login is its token family and its sessions.

The rule (docs/security.md): presenting a spent refresh token again revokes the whole
login, the family and every session it minted (at login and by each refresh), so whoever
refreshed with a stolen token loses their session too; the user's other logins go on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateUserDto, LoginResult, PermissionDenied, Settings, User
from chatkeep.realtime import IssuedSession

PASSWORD = "correct horse"


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as ``chatapp_app``, on this test's database and Redis db."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(settings, node_id="node-a", bcrypt_rounds=10) as facade:
        yield facade


@pytest_asyncio.fixture(loop_scope="session")
async def bob(chat: ChatKeep) -> User:
    return await chat.register(
        CreateUserDto(email="bob@example.org", username="bob", password=PASSWORD)
    )


async def login(chat: ChatKeep) -> LoginResult:
    result = await chat.login("bob@example.org", PASSWORD)
    assert result is not None
    return result


async def valid(chat: ChatKeep, session: IssuedSession) -> bool:
    return await chat.sessions.validate(session.token) is not None


async def test_reusing_a_rotated_refresh_token_ends_the_login_session(
    chat: ChatKeep, bob: User
) -> None:
    first = await login(chat)
    other = await login(chat)  # another device: another family
    rotated = await chat.tokens.rotate(first.refresh.token)
    with pytest.raises(PermissionDenied, match="already used"):
        await chat.tokens.rotate(first.refresh.token)
    assert not await valid(chat, first.session)  # the login's session ended with it
    with pytest.raises(PermissionDenied, match="revoked"):
        await chat.tokens.rotate(rotated.token)
    assert await valid(chat, other.session)
    await chat.tokens.rotate(other.refresh.token)


async def test_refresh_rotates_and_replaces_the_login_session(chat: ChatKeep, bob: User) -> None:
    first = await login(chat)
    again = await chat.refresh(first.refresh.token)
    assert again.user.id == bob.id
    assert again.refresh.family_id == first.refresh.family_id
    assert again.refresh.token != first.refresh.token
    assert await valid(chat, again.session)
    assert not await valid(chat, first.session)  # one current session per login
    assert [s.session_id for s in await chat.sessions.list(bob.id)] == [
        again.session.session.session_id
    ]


async def test_a_thief_who_refreshed_first_loses_the_session_on_reuse(
    chat: ChatKeep, bob: User
) -> None:
    victim = await login(chat)
    elsewhere = await login(chat)
    thief = await chat.refresh(victim.refresh.token)  # stolen and used first
    later = await chat.refresh(thief.refresh.token)  # and again
    with pytest.raises(PermissionDenied, match="already used"):
        await chat.refresh(victim.refresh.token)  # the victim's client replays it
    assert not await valid(chat, thief.session)
    assert not await valid(chat, later.session)
    assert not await valid(chat, victim.session)
    with pytest.raises(PermissionDenied, match="revoked"):
        await chat.refresh(later.refresh.token)
    assert [s.session_id for s in await chat.sessions.list(bob.id)] == [
        elsewhere.session.session.session_id
    ]
    assert await valid(chat, (await chat.refresh(elsewhere.refresh.token)).session)


async def test_a_reuse_between_rotation_and_new_session_leaves_no_session(
    chat: ChatKeep, bob: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await login(chat)
    create = chat.sessions.create
    made: list[IssuedSession] = []

    async def create_then_reuse(*args: Any, **kwargs: Any) -> IssuedSession:
        session = await create(*args, **kwargs)
        made.append(session)
        # Another party replays the spent token while this refresh is half done.
        with pytest.raises(PermissionDenied, match="already used"):
            await chat.tokens.rotate(first.refresh.token)
        return session

    monkeypatch.setattr(chat.sessions, "create", create_then_reuse)
    with pytest.raises(PermissionDenied, match="revoked"):
        await chat.refresh(first.refresh.token)
    assert len(made) == 1
    assert not await valid(chat, made[0])
    assert await chat.sessions.list(bob.id) == []


async def test_refresh_of_an_inactive_account_is_refused(chat: ChatKeep, bob: User) -> None:
    first = await login(chat)
    async with chat.acting_as(bob.id):  # deactivated behind the facade's back
        await chat.users.deactivate(bob.id)
    with pytest.raises(PermissionDenied, match="not active"):
        await chat.refresh(first.refresh.token)
    assert not await chat.tokens.family_alive(first.refresh.family_id)
    assert not await valid(chat, first.session)
    assert await chat.sessions.list(bob.id) == []
