"""Read replicas against a real streaming replica this module starts itself.

A primary is made with ``initdb`` and a standby with ``pg_basebackup -R`` from it, on
loopback ports of their own (5480-5489), with the PostgreSQL 15 binaries of the machine
when it has them (else the embedded wheel's): the shared server is never touched. The
primary is set up as ``chatkeep setup`` and the migrations do it; the facade connects as
``chatapp_app`` to both, so row security binds the replica reads too.

What is shown: reads go to the replica; a read right after the reader's own write sees
it, many times over, in the writing process and in another one; a replica that stops
changes nothing for callers; a replica whose replay is paused is bypassed once it is
further behind than ``replica_max_lag`` and used again once it is resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings, User
from chatkeep.ops.metrics import ChatkeepMetrics
from chatkeep.realtime import RateLimit, RedisClient
from chatkeep.storage import Database
from chatkeep.storage.replicas import ReplicaSet
from chatkeep.testing import ensure_test_roles, make_template_database, url_as, url_for
from tests.realtime.conftest import FAST, wait_until
from tests.servers import PostgresServer, _postgres_bin_dir, temporary_folder

PASSWORD = "correct horse"
ROUNDS = 10
SENDS = RateLimit(limit=10_000, period=1.0)  # these tests send fast on purpose
PORTS = range(5480, 5490)  # this helper's loopback ports for servers its tests start


def _free_port(taken: set[int]) -> int:
    for port in PORTS:
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


def _bin_dir() -> Path:
    # The machine's PostgreSQL 15 where it is installed (CI), else the embedded wheel's.
    system = Path("/usr/lib/postgresql/15/bin")
    return system if (system / "pg_basebackup").exists() else _postgres_bin_dir()


@dataclass(frozen=True)
class Pair:
    primary: PostgresServer
    standby: PostgresServer
    database: str

    def app_url(self, server: PostgresServer) -> str:
        return url_as(url_for(server.url(), self.database), "chatapp_app")


@pytest.fixture(scope="module")
def servers_pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    taken: set[int] = set()
    primary = PostgresServer(
        temporary_folder("ck-h7-primary-"), port=_free_port(taken), bin_dir=_bin_dir()
    )
    standby: PostgresServer | None = None
    try:
        primary.start()
        standby = primary.standby(temporary_folder("ck-h7-standby-"), port=_free_port(taken))
        standby.start()
        primary.wait_streaming()
        yield primary, standby
    finally:
        if standby is not None:
            standby.close()
        primary.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(servers_pair: tuple[PostgresServer, PostgresServer]) -> Pair:
    primary, standby = servers_pair
    await ensure_test_roles(primary.url())
    name = await make_template_database(primary.url(), prefix="chatkeep_h7_replica")
    found = Pair(primary, standby, name)
    # The database reaches the standby by streaming, like everything else.
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await asyncpg.connect(found.app_url(standby))
        except (OSError, asyncpg.PostgresError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            await conn.close()
            return found


@pytest.fixture
def settings(pair: Pair, redis_url: str) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": pair.app_url(pair.primary),
            "replica_urls": pair.app_url(pair.standby),
            "redis_url": redis_url,
            "pool_min_size": 1,
            "pool_max_size": 4,
            "replica_check_interval": 0.05,
            "replica_max_lag": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return factory


@contextlib.asynccontextmanager
async def facade(settings: Settings, **options: Any) -> AsyncIterator[ChatKeep]:
    options.setdefault("send_limit", SENDS)
    async with ChatKeep.connect(settings, bcrypt_rounds=ROUNDS, **options) as chat:
        yield chat


def replicas_of(chat: ChatKeep) -> ReplicaSet:
    replicas = chat.db.replicas
    assert replicas is not None
    return replicas


async def until_fresh(chat: ChatKeep, seconds: float = 10.0) -> None:
    """Wait until the replica has everything committed before this call."""
    since = time.monotonic()
    replica = replicas_of(chat).replicas[0]
    await wait_until(lambda: replica.up and (replica.fresh_as_of or 0) >= since, seconds)


async def register(chat: ChatKeep, name: str) -> User:
    unique = f"{name}{uuid.uuid4().hex[:8]}"
    return await chat.register(
        CreateUserDto(email=f"{unique}@example.org", username=unique, password=PASSWORD)
    )


@dataclass(frozen=True)
class World:
    alice: User
    bob: User
    room: uuid.UUID


async def make_world(chat: ChatKeep) -> World:
    alice, bob = await register(chat, "alice"), await register(chat, "bob")
    room = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    await chat.join(room.id, bob.id)
    await chat.send_message(room.id, alice.id, "first")
    return World(alice, bob, room.id)


def replica_transactions(chat: ChatKeep, name: str) -> int:
    """Operations named ``name`` run on the first replica (a transaction, or one statement)."""
    stats = replicas_of(chat).replicas[0].db.stats.get(name)
    return 0 if stats is None else stats.calls


async def as_superuser(server: PostgresServer, sql: str) -> None:
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_reads_go_to_the_replica_and_answer_as_the_primary(
    settings: Callable[..., Settings],
) -> None:
    async with facade(settings()) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        # bob's last write (the join) is on the replica now: his reads go there.
        page = await chat.history(world.room, world.bob.id)
        rooms = await chat.rooms_of(world.bob.id)
        unread = await chat.unread_counts(world.bob.id)
        assert [m.content for m in page.items] == ["first"]
        assert [r.room.id for r in rooms] == [world.room]
        assert dict(unread) == {world.room: 1}
        assert replica_transactions(chat, "messages.history") == 1
        assert replica_transactions(chat, "rooms.rooms_of") == 1
        assert replica_transactions(chat, "messages.unread_counts") == 1
        assert replicas_of(chat).reads["replica"] == 3
        # The same reads on the primary alone give the same answers.
        async with facade(settings(replica_urls="")) as plain:
            assert plain.db.replicas is None
            assert (await plain.history(world.room, world.bob.id)).items == page.items
            assert await plain.rooms_of(world.bob.id) == rooms
            assert dict(await plain.unread_counts(world.bob.id)) == dict(unread)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_read_right_after_a_write_sees_it_every_time(
    settings: Callable[..., Settings],
) -> None:
    async with facade(settings()) as chat:
        world = await make_world(chat)
        for i in range(60):
            sent = await chat.send_message(world.room, world.alice.id, f"m{i}")
            page = await chat.history(world.room, world.alice.id, limit=5)
            assert page.items[-1].id == sent.id
            await chat.mark_read(world.room, world.alice.id)
            assert (await chat.unread_counts(world.alice.id)).get(world.room, 0) == 0
            if i % 10 == 0:
                await chat.join(
                    (
                        await chat.create_room(CreateRoomDto(name=f"r{i}", created_by=world.bob.id))
                    ).id,
                    world.alice.id,
                )
                assert len(await chat.rooms_of(world.alice.id)) == 2 + i // 10
        fallbacks = replicas_of(chat).fallbacks
        assert fallbacks["own_write"] > 0


@pytest.mark.asyncio(loop_scope="session")
async def test_the_fence_is_what_keeps_a_writer_off_a_replica_that_lacks_the_write(
    settings: Callable[..., Settings], pair: Pair, redis_url: str
) -> None:
    # Replay paused: the replica misses every write from now on, yet stays within the
    # (large) lag bound, so only read-your-writes keeps a writer's reads off it. Two more
    # "processes" (facades of their own, with no memory of this one's writes) read too:
    # one shares the fence through Redis, the other keeps it to itself.
    lax = {"replica_max_lag": 60.0}
    async with (
        facade(settings(**lax)) as chat,
        Database(settings(**lax)) as db,
        RedisClient(redis_url) as redis,
        Database(settings(**lax, replica_fence="process")) as lone_db,
    ):
        other = ChatKeep(db, redis, bcrypt_rounds=ROUNDS)
        lone = ChatKeep(lone_db, redis, bcrypt_rounds=ROUNDS)
        world = await make_world(chat)
        for each in (chat, other, lone):
            await until_fresh(each)
        await as_superuser(pair.standby, "SELECT pg_wal_replay_pause()")
        try:
            sent = await chat.send_message(world.room, world.alice.id, "after the pause")
            # alice wrote: the primary answers her, with her message.
            mine = await chat.history(world.room, world.alice.id)
            assert mine.items[-1].id == sent.id
            # bob did not: the replica answers him, without it (it really is behind).
            theirs = await chat.history(world.room, world.bob.id)
            assert [m.content for m in theirs.items] == ["first"]
            assert replica_transactions(chat, "messages.history") == 1
            # The other process finds her write in Redis and asks the primary too.
            elsewhere = await other.history(world.room, world.alice.id)
            assert elsewhere.items[-1].id == sent.id
            assert replicas_of(other).fallbacks["own_write"] == 1
            # With the fence kept per process, another process does not know of it: this
            # is what replica_fence=process gives up (docs/operations.md).
            stale = await lone.history(world.room, world.alice.id)
            assert [m.content for m in stale.items] == ["first"]
            assert replicas_of(lone).reads["replica"] == 1
        finally:
            await as_superuser(pair.standby, "SELECT pg_wal_replay_resume()")


@pytest.mark.asyncio(loop_scope="session")
async def test_unread_right_after_mark_read_is_read_from_the_primary(
    settings: Callable[..., Settings], pair: Pair, redis_url: str
) -> None:
    # mark_read is a write: bob's unread counts right after it must not come from a
    # replica that lacks it (replay paused, within the lag bound). Another process that
    # shares the fence through Redis asks the primary too.
    lax = {"replica_max_lag": 60.0}
    async with (
        facade(settings(**lax)) as chat,
        Database(settings(**lax)) as db,
        RedisClient(redis_url) as redis,
    ):
        other = ChatKeep(db, redis, bcrypt_rounds=ROUNDS)
        world = await make_world(chat)
        await chat.send_message(world.room, world.alice.id, "second")
        for each in (chat, other):
            await until_fresh(each)
        # bob's last write (the join) is on the replica: it serves him, two unread.
        assert dict(await chat.unread_counts(world.bob.id)) == {world.room: 2}
        assert replica_transactions(chat, "messages.unread_counts") == 1
        await as_superuser(pair.standby, "SELECT pg_wal_replay_pause()")
        try:
            assert await chat.mark_read(world.room, world.bob.id) == 2
            assert (await chat.unread_counts(world.bob.id)).get(world.room, 0) == 0
            badges = await chat.badges(world.bob.id)
            assert badges.get(world.room) is None or badges[world.room].unread == 0
            assert replica_transactions(chat, "messages.unread_counts") == 1
            assert replicas_of(chat).fallbacks["own_write"] >= 2
            elsewhere = await other.unread_counts(world.bob.id)
            assert elsewhere.get(world.room, 0) == 0
            assert replicas_of(other).fallbacks["own_write"] == 1
        finally:
            await as_superuser(pair.standby, "SELECT pg_wal_replay_resume()")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_lagging_replica_is_bypassed_and_used_again_once_resumed(
    settings: Callable[..., Settings], pair: Pair
) -> None:
    metrics = ChatkeepMetrics()
    async with facade(settings(replica_max_lag=0.5), metrics=metrics) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        replica = replicas_of(chat).replicas[0]
        await as_superuser(pair.standby, "SELECT pg_wal_replay_pause()")
        try:
            sent = await chat.send_message(world.room, world.alice.id, "while paused")
            await wait_until(lambda: (replica.lag() or 0) > 0.5)
            # bob did not write, but the replica is too far behind: the primary answers.
            page = await chat.history(world.room, world.bob.id)
            assert page.items[-1].id == sent.id
            assert replicas_of(chat).fallbacks["lag"] >= 1
            text = metrics.exposition().decode()
            assert 'chatkeep_db_replica_fallbacks_total{reason="lag"}' in text
            lag_line = next(
                line
                for line in text.splitlines()
                if line.startswith("chatkeep_db_replica_lag_seconds{")
            )
            assert float(lag_line.rsplit(" ", 1)[1]) > 0.5
        finally:
            await as_superuser(pair.standby, "SELECT pg_wal_replay_resume()")
        await until_fresh(chat)
        before = replica_transactions(chat, "messages.history")
        page = await chat.history(world.room, world.bob.id)
        assert page.items[-1].id == sent.id
        assert replica_transactions(chat, "messages.history") == before + 1
        text = metrics.exposition().decode()
        assert 'chatkeep_db_reads_total{target="replica"}' in text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stopped_replica_changes_nothing_for_callers(
    settings: Callable[..., Settings], pair: Pair
) -> None:
    async with facade(settings()) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        replica = replicas_of(chat).replicas[0]
        assert (await chat.history(world.room, world.bob.id)).items[-1].content == "first"
        await asyncio.to_thread(pair.standby.stop, "immediate")
        try:
            # Straight after the stop (before any check noticed) and then on: every read
            # answers, from the primary.
            for i in range(20):
                sent = await chat.send_message(world.room, world.alice.id, f"down {i}")
                page = await chat.history(world.room, world.bob.id, limit=3)
                assert page.items[-1].id == sent.id
                assert world.room in await chat.unread_counts(world.bob.id)
            assert not replica.up
            fallbacks = replicas_of(chat).fallbacks
            assert fallbacks["error"] + fallbacks["down"] >= 40
        finally:
            await asyncio.to_thread(pair.standby.start)
        await until_fresh(chat, 30)
        before = replica_transactions(chat, "messages.history")
        page = await chat.history(world.room, world.bob.id, limit=3)
        assert page.items[-1].content == "down 19"
        assert replica_transactions(chat, "messages.history") == before + 1


@pytest.mark.asyncio(loop_scope="session")
async def test_a_replica_that_is_down_at_start_is_only_noted(
    settings: Callable[..., Settings], pair: Pair
) -> None:
    taken = {pair.primary.port, pair.standby.port}
    nowhere = url_as(f"postgresql://127.0.0.1:{_free_port(taken)}/{pair.database}", "chatapp_app")
    async with facade(settings(replica_urls=nowhere, connect_timeout=1.0)) as chat:
        world = await make_world(chat)
        page = await chat.history(world.room, world.bob.id)
        assert [m.content for m in page.items] == ["first"]
        assert replicas_of(chat).fallbacks["down"] >= 1
        assert replicas_of(chat).replicas[0].last_error


@pytest.mark.asyncio(loop_scope="session")
async def test_a_replica_that_does_not_know_a_message_yet_is_not_believed(
    settings: Callable[..., Settings], pair: Pair
) -> None:
    # alice sends while replay is paused; bob (who wrote nothing, so the replica within
    # the bound may serve him) jumps to her message: the replica says NotFound, and the
    # primary is asked instead.
    async with facade(settings(replica_max_lag=60.0)) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        await as_superuser(pair.standby, "SELECT pg_wal_replay_pause()")
        try:
            sent = await chat.send_message(world.room, world.alice.id, "look at this")
            page = await chat.history(world.room, world.bob.id, around=sent.id)
            assert [m.content for m in page.items] == ["first", "look at this"]
            assert replicas_of(chat).fallbacks["refused"] == 1
            # What the replica may serve is a consistent past: the newest page from
            # before the pause, bounded by replica_max_lag (docs/design.md).
            stale = await chat.history(world.room, world.bob.id)
            assert [m.content for m in stale.items] == ["first"]
        finally:
            await as_superuser(pair.standby, "SELECT pg_wal_replay_resume()")


@pytest.mark.asyncio(loop_scope="session")
async def test_reads_inside_a_callers_transaction_stay_on_the_primary(
    settings: Callable[..., Settings],
) -> None:
    async with facade(settings()) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        async with chat.db.acting_as(world.bob.id):
            page = await chat.history(world.room, world.bob.id)
        assert [m.content for m in page.items] == ["first"]
        assert replicas_of(chat).fallbacks["transaction"] == 1
        assert replica_transactions(chat, "messages.history") == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_without_an_answer_from_redis_the_primary_serves(
    settings: Callable[..., Settings],
) -> None:
    async with facade(settings()) as chat:
        world = await make_world(chat)
        await until_fresh(chat)
        dead = RedisClient(f"redis://127.0.0.1:{_free_port(set())}/0", **FAST)
        try:
            blind = ChatKeep(chat.db, dead, bcrypt_rounds=ROUNDS)
            page = await blind.history(world.room, world.bob.id)
        finally:
            await dead.aclose()
        assert [m.content for m in page.items] == ["first"]
        assert replicas_of(chat).fallbacks["fence_unknown"] == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_a_server_that_is_not_a_standby_is_not_used(
    settings: Callable[..., Settings], pair: Pair
) -> None:
    async with facade(settings(replica_urls=pair.app_url(pair.primary))) as chat:
        world = await make_world(chat)
        assert [m.content for m in (await chat.history(world.room, world.bob.id)).items] == [
            "first"
        ]
        replica = replicas_of(chat).replicas[0]
        assert not replica.up
        assert replica.last_error is not None
        assert "not a standby" in replica.last_error
        assert replicas_of(chat).fallbacks["down"] >= 1


def test_replica_names_hide_passwords() -> None:
    settings = Settings(database_url="postgresql://app@primary/db")
    replicas = ReplicaSet(
        Database(settings), ["postgresql://app:s3cret-pw@replica-1:5433/db"], settings
    )
    assert [r.name for r in replicas.replicas] == ["postgresql://app:***@replica-1:5433/db"]
    assert "s3cret" not in repr(replicas)
    # Nothing measured yet: no read may use it, and it says so.
    assert replicas.choose() == (None, "unchecked")
    assert replicas.replicas[0].lag() is None


def test_the_benchmark_runs_in_its_tiny_mode(pair: Pair, redis_url: str) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "bench_replica.py"),
            "--tiny",
            "--database-url",
            pair.primary.url(),
            "--replica-url",
            pair.standby.url(),
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line[:28].strip(): line[28:].split() for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {
        "primary",
        "replica/redis",
        "replica/process",
        "write+read, primary",
        "write+read, replica/redis",
    }
    # Readers who do not write are served by the replica; writers reading right after
    # their own send by the primary (a replica only once a check saw it has the send).
    assert rows["replica/process"][1] == "100%"
    assert int(rows["write+read, replica/redis"][1].rstrip("%")) < 50


@pytest.mark.asyncio(loop_scope="session")
async def test_without_the_primary_no_replica_is_used(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    # The primary's database is not open: its WAL position cannot be sampled, so no
    # replica can be shown fresh, however well it answers.
    settings = Settings(database_url=pair.app_url(pair.primary), connect_timeout=1.0)
    replicas = ReplicaSet(Database(settings), [pair.app_url(pair.standby)], settings)
    try:
        await replicas.check()
        replica = replicas.replicas[0]
        assert replica.up
        assert replica.fresh_as_of is None
        assert replicas.choose() == (None, "lag")
        assert "the primary's WAL position is unknown" in caplog.text
    finally:
        await replicas.close()
    assert not replicas.replicas[0].up
