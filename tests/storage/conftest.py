"""Fixtures for the repository tests: an open Database on the test's fresh database, the
repositories over it, and fast factories for users and rooms (no bcrypt per user)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import bcrypt
import pytest_asyncio

from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.models import Room, User
from chatkeep.storage import Database, MessageRepository, RoomRepository, UserRepository

MakeUser = Callable[..., Awaitable[User]]
MakeRoom = Callable[..., Awaitable[Room]]


@functools.cache
def known_hash(password: str = "correct horse") -> str:  # noqa: S107
    """A real bcrypt hash (cost 10) made once, for users the tests insert directly."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    settings = Settings(database_url=database_url, pool_min_size=1, pool_max_size=20)
    async with Database(settings) as database:
        yield database


@pytest_asyncio.fixture(loop_scope="session")
async def users(db: Database) -> UserRepository:
    return UserRepository(db, bcrypt_rounds=10)


@pytest_asyncio.fixture(loop_scope="session")
async def rooms(db: Database) -> RoomRepository:
    return RoomRepository(db)


@pytest_asyncio.fixture(loop_scope="session")
async def messages(db: Database) -> MessageRepository:
    return MessageRepository(db)


@pytest_asyncio.fixture(loop_scope="session")
async def make_user(db: Database, users: UserRepository) -> MakeUser:
    """Insert a user directly (password "correct horse"), skipping bcrypt's cost."""

    async def factory(username: str | None = None, email: str | None = None) -> User:
        name = username or f"u{uuid.uuid4().hex[:12]}"
        await db.execute(
            "test.make_user",
            "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)",
            uid := uuid7(),
            email or f"{name}@example.org",
            name,
            known_hash(),
        )
        found = await users.find_by_id(uid)
        assert found is not None
        return found

    return factory


@pytest_asyncio.fixture(loop_scope="session")
async def make_room(rooms: RoomRepository) -> MakeRoom:
    """Create a room owned by ``owner`` with ``members`` added as members."""
    from chatkeep.models import CreateRoomDto

    async def factory(
        owner: User, *members: User, name: str = "general", type: str = "public"
    ) -> Room:
        room = await rooms.create(CreateRoomDto(name=name, type=type, created_by=owner.id))
        for member in members:
            await rooms.add_member(room.id, member.id)
        return room

    return factory


async def fill_room(conn: asyncpg.Connection, room: Room, author: User, count: int) -> None:
    """``count`` messages in ``room`` by ``author``, seq 1..count, in one statement."""
    await conn.execute(
        """
        INSERT INTO messages (room_id, user_id, seq, content)
        SELECT $1, $2, g, 'message ' || g FROM generate_series(1, $3::int) AS g
        """,
        room.id,
        author.id,
        count,
    )
    await conn.execute("UPDATE rooms SET last_seq = $2 WHERE id = $1", room.id, count)
