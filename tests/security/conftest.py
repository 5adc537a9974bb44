"""Fixtures for the security tests: connections as the real roles, and a small world.

The tests connect as ``chatapp_app`` (and ``chatapp_readonly``), never as a superuser:
a superuser bypasses row security, so a test running as one would pass whatever the
policies say. Both test servers (the local PostgreSQL and the embedded one) trust local
connections, so the role URLs need no password.

:func:`acting_as` and :func:`set_acting_user` name the acting user on a raw asyncpg
connection, so the policies are checked without chatkeep's pool in between (the library's
own way is ``Database.acting_as``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import pytest_asyncio

from chatkeep.ids import uuid7
from chatkeep.storage.errors import translate_errors
from tests.conftest import url_as

# Local to the transaction (third argument true), as the library sets it.
SET_ACTING_USER = "SELECT set_config('app.user_id', $1, true)"


async def set_acting_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
    """Name the acting user for the rest of the transaction open on ``conn``."""
    assert conn.is_in_transaction(), "outside a transaction the setting ends at once"
    await conn.execute(SET_ACTING_USER, str(user_id))


@contextlib.asynccontextmanager
async def acting_as(
    target: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on ``target`` (a connection, or one borrowed from a pool) acting as
    ``user_id``; driver errors come out translated, as from chatkeep (PermissionDenied)."""
    borrowed: contextlib.AbstractAsyncContextManager[Any]
    if isinstance(target, asyncpg.Connection):
        borrowed = contextlib.nullcontext(target)
    else:
        borrowed = target.acquire()
    with translate_errors("acting as a user"):
        async with borrowed as borrowed_conn:
            conn = cast(asyncpg.Connection, borrowed_conn)  # a pool's proxy acts as one
            async with conn.transaction():
                await set_acting_user(conn, user_id)
                yield conn


HASH = "$2b$12$" + "a" * 53


@pytest_asyncio.fixture(loop_scope="session")
async def readonly_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's database as chatapp_readonly."""
    connection = await asyncpg.connect(url_as(database_url, "chatapp_readonly"))
    try:
        yield connection
    finally:
        await connection.close()


@dataclass(frozen=True)
class World:
    """Four users and three rooms, written as the superuser before a test runs.

    * ``public``: owner alice, member bob.
    * ``private``: owner alice, admin bob, member carol.
    * ``direct``: alice and bob.
    * dave belongs to nothing.

    Each room holds one message from each of its members (``msg[(room, user)]``).
    """

    alice: uuid.UUID
    bob: uuid.UUID
    carol: uuid.UUID
    dave: uuid.UUID
    public: uuid.UUID
    private: uuid.UUID
    direct: uuid.UUID
    msg: dict[tuple[str, str], uuid.UUID]


async def insert_user(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    user_id = uuid7()
    await conn.execute(
        "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)",
        user_id,
        f"{name}@example.org",
        name,
        HASH,
    )
    return user_id


@pytest_asyncio.fixture(loop_scope="session")
async def world(conn: asyncpg.Connection) -> World:
    users = {name: await insert_user(conn, name) for name in ("alice", "bob", "carol", "dave")}
    a, b, c = users["alice"], users["bob"], users["carol"]
    rooms = {"public": uuid7(), "private": uuid7(), "direct": uuid7()}
    low, high = sorted((a, b))
    await conn.execute(
        "INSERT INTO rooms (id, name, type, created_by, direct_user_low, direct_user_high)"
        " VALUES ($1, 'lobby', 'public', $4, NULL, NULL),"
        "        ($2, 'secret', 'private', $4, NULL, NULL),"
        "        ($3, 'direct', 'direct', $4, $5, $6)",
        rooms["public"],
        rooms["private"],
        rooms["direct"],
        a,
        low,
        high,
    )
    members = {
        "public": [("alice", "owner"), ("bob", "member")],
        "private": [("alice", "owner"), ("bob", "admin"), ("carol", "member")],
        "direct": [("alice", "member"), ("bob", "member")],
    }
    msg: dict[tuple[str, str], uuid.UUID] = {}
    for room, people in members.items():
        for name, role in people:
            await conn.execute(
                "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, $3)",
                rooms[room],
                users[name],
                role,
            )
        for name, _role in people:
            msg[(room, name)] = await conn.fetchval(
                "INSERT INTO messages (id, room_id, user_id, content) VALUES ($1, $2, $3, $4)"
                " RETURNING id",
                uuid7(),
                rooms[room],
                users[name],
                f"{name} in {room}",
            )
    return World(
        alice=a,
        bob=b,
        carol=c,
        dave=users["dave"],
        public=rooms["public"],
        private=rooms["private"],
        direct=rooms["direct"],
        msg=msg,
    )
