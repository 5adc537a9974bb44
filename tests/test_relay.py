"""The background tasks: the presence sweeper and the outbox relay, on real services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ConfigurationError,
    CreateUserDto,
    InvalidInput,
    Settings,
    Unavailable,
)
from chatkeep.realtime import RedisClient
from chatkeep.relay import OutboxRelay
from tests.realtime.conftest import FAST

ROUNDS = 10


@pytest_asyncio.fixture(loop_scope="session")
async def app_chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as chatapp_app, as in production, with a short presence timeout."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(
        settings, node_id="bg", bcrypt_rounds=ROUNDS, presence_timeout=0.2
    ) as chat:
        yield chat


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    for _ in range(int(within / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_background_sweeps_presence(app_chat: ChatKeep) -> None:
    user = await app_chat.register(
        CreateUserDto(email="sweep@example.org", username="sweep", password="correct horse")
    )
    assert await app_chat.connect_socket(user.id, "s-1")
    async with app_chat.background(relay=False, sweep_interval=0.05):

        async def swept() -> bool:  # offline, with last_seen written to PostgreSQL
            return (await app_chat.users.get(user.id)).last_seen is not None

        await until(swept)
    assert not await app_chat.presence.is_online(user.id)


async def test_the_relay_refuses_the_confined_application_role(
    app_chat: ChatKeep, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        await app_chat.run_relay()
    assert caught.value.field == "relay_database_url"
    # In the background it is logged and the sweeper keeps going.
    with caplog.at_level(logging.ERROR, logger="chatkeep.facade"):
        async with app_chat.background(sweep_interval=0.05):

            async def logged() -> bool:
                return "chatkeep-relay stopped" in caplog.text

            await until(logged)


async def test_bad_options_are_refused(app_chat: ChatKeep, redis_url: str) -> None:
    for bad in (0, "1", True, 10_000):
        with pytest.raises(InvalidInput) as caught:
            async with app_chat.background(sweep_interval=bad):  # type: ignore[arg-type]
                pass
        assert caught.value.field == "sweep_interval"
    with pytest.raises(InvalidInput) as caught:
        await app_chat.run_relay(database_url=b"x")  # type: ignore[arg-type]
    assert caught.value.field == "database_url"
    async with RedisClient(redis_url, **FAST) as client:
        for field, options in (("interval", {"interval": 0}), ("grace", {"grace": -1})):
            with pytest.raises(InvalidInput) as caught:
                OutboxRelay(app_chat.events, client, app_chat.db.settings, "x", **options)
            assert caught.value.field == field


@pytest.mark.parametrize("swallowed_as", ["error", "nothing"])
async def test_the_relay_stops_when_a_call_below_swallows_the_cancel(
    app_chat: ChatKeep, redis_url: str, swallowed_as: str
) -> None:
    # As the presence sweeper: a stop request answered below with an error of its own
    # (Unavailable) or with nothing must still end the loop, or a lifespan's shutdown hangs.
    async with RedisClient(redis_url, **FAST) as client:
        relay = OutboxRelay(
            app_chat.events, client, app_chat.db.settings, "x", standby_interval=0.01
        )
        entered = asyncio.Event()

        async def session() -> None:
            entered.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                if swallowed_as == "error":
                    raise Unavailable("postgres did not answer (the call was cut short)") from None

        relay._session = session  # type: ignore[method-assign]
        task = asyncio.create_task(relay.run())
        await entered.wait()
        task.cancel()
        async with asyncio.timeout(2):
            with pytest.raises(asyncio.CancelledError):
                await task
