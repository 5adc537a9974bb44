"""Fixtures of the bad-input suite: one migrated database per module, a fresh world per test.

The facade connects as ``chatapp_app`` (as production does); the repositories are called
as the system (a superuser pool, no acting user), so their SQL runs against real rows and
nothing outside them (a caller's transaction, row security) can hide a partial write.
Redis keys live under the prefix ``fuzz:``, which the snapshots read.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import bcrypt
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateMessageDto, CreateRoomDto, Message, Room, Settings, User
from chatkeep.embedded import Endpoints
from chatkeep.ids import uuid7
from chatkeep.realtime import EventSubscription
from chatkeep.storage import Database, MessageRepository, RoomRepository, UserRepository
from chatkeep.storage.changes import ChangeRepository
from chatkeep.storage.reactions import ReactionRepository
from tests.conftest import _redis_test_url, scratch_database, url_as, url_for
from tests.fuzz.strategies import tampered_cursors

PREFIX = "fuzz"
PASSWORD = "correct horse"
# Cost 4 (bcrypt's least): the world's users are inserted directly, many times over.
_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
_counter = itertools.count()


@dataclass(frozen=True)
class Repositories:
    """The repositories over a system (superuser) pool."""

    users: UserRepository
    rooms: RoomRepository
    messages: MessageRepository
    changes: ChangeRepository
    reactions: ReactionRepository


@dataclass
class World:
    """owner owns ``public`` and ``private``; member is in ``public``; outsider in nothing.

    ``message`` is the member's in ``public``; ``cursor`` an ``after`` cursor of ``public``
    and ``cursors`` the ways to tamper with it. Caches of ``public`` are warm.
    """

    chat: ChatKeep
    repos: Repositories
    owner: User
    member: User
    outsider: User
    public: Room
    private: Room
    other: Room
    message: Message
    cursor: str
    cursors: list[str]
    session_token: str
    session_id: str
    refresh_token: str
    subscription: EventSubscription
    n: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzz_database_url(admin_url: str, template_database: str) -> AsyncIterator[str]:
    """One migrated database for the module (a fresh world per test keeps tests apart)."""
    async with scratch_database(admin_url, "chatkeep_fz", template=template_database) as name:
        yield url_for(admin_url, name)


@pytest.fixture(scope="module")
def fuzz_settings(
    fuzz_database_url: str, servers: Endpoints, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    return Settings(
        data_dir=data_dir,
        database_url=url_as(fuzz_database_url, "chatapp_app"),
        redis_url=_redis_test_url(servers.redis_url),
        redis_key_prefix=PREFIX,
        pool_min_size=1,
        pool_max_size=4,  # the server is shared: take few connections
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzz_chat(fuzz_settings: Settings) -> AsyncIterator[ChatKeep]:
    """The facade as ``chatapp_app``, its Redis keys under ``fuzz:``."""
    async with ChatKeep.connect(fuzz_settings, node_id="fuzz-node", bcrypt_rounds=10) as chat:
        await _delete_prefixed(chat)
        yield chat
        await _delete_prefixed(chat)


async def _delete_prefixed(chat: ChatKeep) -> None:
    keys = [key async for key in chat.redis.redis.scan_iter(match=f"{PREFIX}:*")]
    if keys:
        await chat.redis.redis.delete(*keys)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system_db(fuzz_settings: Settings, fuzz_database_url: str) -> AsyncIterator[Database]:
    async with Database(fuzz_settings, dsn=fuzz_database_url) as db:
        yield db


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def snapshot_conn(fuzz_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fuzz_database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _user(conn: asyncpg.Connection, name: str) -> User:
    row = await conn.fetchrow(
        "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)"
        " RETURNING id, email, username, avatar_url, is_active, last_seen, created_at,"
        " updated_at",
        uuid7(),
        f"{name}@example.org",
        name,
        _HASH,
    )
    assert row is not None
    return User._from_row(row)


@pytest_asyncio.fixture(loop_scope="session")
async def world(
    fuzz_chat: ChatKeep, system_db: Database, snapshot_conn: asyncpg.Connection
) -> AsyncIterator[World]:
    chat = fuzz_chat
    repos = Repositories(
        UserRepository(system_db, bcrypt_rounds=10),
        RoomRepository(system_db),
        MessageRepository(system_db),
        ChangeRepository(system_db),
        ReactionRepository(system_db),
    )
    n = next(_counter)
    owner, member, outsider = [
        await _user(snapshot_conn, f"{role}{n}") for role in ("owner", "member", "outsider")
    ]
    public = await repos.rooms.create(CreateRoomDto(name=f"public {n}", created_by=owner.id))
    private = await repos.rooms.create(
        CreateRoomDto(name=f"private {n}", type="private", created_by=owner.id)
    )
    other = await repos.rooms.create(CreateRoomDto(name=f"other {n}", created_by=owner.id))
    await repos.rooms.add_member(public.id, member.id)
    for text in ("one", "two"):
        await repos.messages.send(
            CreateMessageDto(room_id=public.id, user_id=owner.id, content=text)
        )
    message = await repos.messages.send(
        CreateMessageDto(room_id=public.id, user_id=member.id, content="three")
    )
    page = await repos.messages.history(public.id, after_seq=0, limit=1)
    assert page.after is not None
    session = await chat.sessions.create(member.id)
    refresh = await chat.tokens.issue(member.id)
    subscription = await chat.subscribe(public.id)
    for user in (owner, member):  # warm caches: a read that fills one is not a write
        await chat.members.is_member(public.id, user.id)
        await chat.profile(user.id)
    made = World(
        chat=chat,
        repos=repos,
        owner=owner,
        member=member,
        outsider=outsider,
        public=public,
        private=private,
        other=other,
        message=message,
        cursor=page.after,
        cursors=tampered_cursors(page.after, public.id, other.id),
        session_token=session.token,
        session_id=session.session.session_id,
        refresh_token=refresh.token,
        subscription=subscription,
        n=n,
    )
    try:
        yield made
    finally:
        await subscription.aclose()


#: Keys a failing call may write by design: read-through cache fills (a read's side effect,
#: not a change of state) and attempt counters (a refused attempt still counts toward the
#: send rate limit and the login throttle).
UNWATCHED: tuple[str, ...] = (f"{PREFIX}:cache:", f"{PREFIX}:ratelimit:", f"{PREFIX}:login:")
_tables_sql: str | None = None


async def _tables_query(conn: asyncpg.Connection) -> str:
    # One round trip for every table: each one's rows as sorted text.
    global _tables_sql
    if _tables_sql is None:
        names = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        _tables_sql = "SELECT " + ", ".join(
            f"(SELECT coalesce(array_agg(t::text ORDER BY t::text), '{{}}') FROM \"{name}\" t)"
            f' AS "{name}"'
            for (name,) in names
        )
    return _tables_sql


async def snapshot(conn: asyncpg.Connection, chat: ChatKeep) -> dict[str, Any]:
    """Every row of every table, and every watched Redis key under the prefix.

    Redis values come with their TTL in milliseconds (``-1``: none), so a comparison can
    tell a key that expired by itself from one a call deleted. A key that expires while
    it is being read is left out.
    """
    row = await conn.fetchrow(await _tables_query(conn))
    assert row is not None
    state: dict[str, Any] = {f"table {name}": value for name, value in row.items()}
    redis = chat.redis.redis
    keys = sorted(
        [
            key
            async for key in redis.scan_iter(match=f"{PREFIX}:*", count=1000)
            if not key.decode().startswith(UNWATCHED)
        ]
    )
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = [kind.decode() for kind in await pipe.execute()]
    pipe = redis.pipeline(transaction=False)
    for key, kind in zip(keys, kinds, strict=True):
        if kind == "string":
            pipe.get(key)
        elif kind == "hash":
            pipe.hgetall(key)
        elif kind == "zset":
            pipe.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            pipe.smembers(key)
        else:  # gone meanwhile ("none"), or a kind chatkeep never writes
            pipe.type(key)
        pipe.pttl(key)
    read = await pipe.execute()
    for i, key in enumerate(keys):
        value, ttl = read[2 * i], read[2 * i + 1]
        if ttl == -2:
            continue  # expired while being read
        if isinstance(value, dict | set):
            value = sorted(value.items()) if isinstance(value, dict) else sorted(value)
        state[f"key {key.decode()}"] = (value, ttl)
    return state
