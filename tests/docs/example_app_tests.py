"""An application's own tests on chatkeep's ``chatkeep`` fixture.

docs/howto/testing.md shows the section between the snippet markers verbatim, and
tests/test_testing.py runs this file as an application's test module (pytester, in a
subprocess, pytest-asyncio in its default strict mode), so what readers copy is what runs.
The file name does not start with ``test_``: chatkeep's own suite does not collect it.
"""

from __future__ import annotations

# --8<-- [start:tests]
import pytest
import redis.asyncio as aioredis

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, User


async def sign_up(chat: ChatKeep, name: str) -> User:
    """What the application's sign-up handler does."""
    dto = CreateUserDto(email=f"{name}@example.org", username=name, password="correct horse")
    return await chat.register(dto)


@pytest.mark.asyncio
async def test_a_message_is_in_the_history(chatkeep: ChatKeep) -> None:
    alice = await sign_up(chatkeep, "alice")
    room = await chatkeep.create_room(CreateRoomDto(name="general", created_by=alice.id))
    await chatkeep.send_message(room.id, alice.id, "hello", client_msg_id="c-1")
    page = await chatkeep.history(room.id, alice.id)
    assert [message.content for message in page.items] == ["hello"]


@pytest.mark.asyncio
async def test_each_test_starts_empty(chatkeep: ChatKeep) -> None:
    # A database of its own: alice from the test above is not here, her address is free.
    alice = await sign_up(chatkeep, "alice")
    assert await chatkeep.rooms_of(alice.id) == []


@pytest.mark.asyncio
async def test_redis_is_clean_too(chatkeep: ChatKeep, chatkeep_redis_url: str) -> None:
    client = aioredis.from_url(chatkeep_redis_url)
    try:
        assert await client.dbsize() == 0  # nothing left by the tests before
        await client.set("app:leftover", "1")  # ... and this is gone after this test
    finally:
        await client.aclose()


# --8<-- [end:tests]
