"""What does routing reads to a replica cost, and how much of the load does it move?

History pages (``chat.history(room, reader, limit=50)``, as ``chatapp_app``, row security in
force) are read from ``--concurrency`` tasks (20) by readers who do not write, for
``--seconds`` each, in three set-ups measured in the same run:

* ``primary``: no replica configured (the baseline);
* ``replica/redis``: ``CHATKEEP_REPLICA_URLS`` set, ``replica_fence=redis`` (the default:
  each routed read asks Redis whether the reader wrote recently, one ``GET``);
* ``replica/process``: the same with ``replica_fence=process`` (no Redis round trip).

Then ``write+read``: each task sends a message and reads the page right after, so every
read is fenced to the primary (read-your-writes), against the same loop with no replica.

It prints pages/s, the share of reads the replica served, and each set-up's ratio to the
baseline. Both servers run on this machine and share its cores: the ratios measure what
routing costs a read, not what a replica on its own machine adds (that is the primary's
read load taken away: the "replica share" column). No timed assertion anywhere.

Run it against a primary and a streaming standby of it (superuser URLs; the script makes
the chatapp_* roles, its database ``--database-name`` on the primary, and waits for the
standby to have it)::

    python benchmarks/bench_replica.py \\
        --database-url postgresql://postgres@127.0.0.1:5480/postgres \\
        --replica-url postgresql://postgres@127.0.0.1:5481/postgres \\
        --redis-url redis://127.0.0.1:6379/7

It FLUSHes the logical Redis database of ``--redis-url``: give it one of its own.
``--tiny`` uses 3 readers and measures a fraction of a second per set-up, so a test can
run the whole script in seconds (tests/storage/test_replicas.py does, on the standby it
starts).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, urls
from chatkeep.config import Settings
from chatkeep.realtime import RateLimit
from chatkeep.realtime.client import RedisClient
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator

BENCH_DB = "chatkeep_bench_replica"
PASSWORD = "correct horse"  # noqa: S105 - the benchmark's throwaway accounts
SENDS = RateLimit(limit=1_000_000, period=1.0)


@dataclass(frozen=True)
class World:
    room: uuid.UUID
    readers: list[uuid.UUID]
    writers: list[uuid.UUID]


async def prepare(admin_url: str, name: str, drop: bool) -> None:
    """Roles, and a migrated database ``name`` on the primary (fresh when ``drop``)."""
    admin = await asyncpg.connect(admin_url)
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
        if drop:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(maintenance_url(admin_url, name))
    try:
        await prepare_database(conn)
        await Migrator(conn).up()
    finally:
        await conn.close()


async def seed(chat: ChatKeep, readers: int, messages: int) -> World:
    run = uuid.uuid4().hex[:6]

    async def user(i: int, kind: str) -> uuid.UUID:
        made = await chat.register(
            CreateUserDto(
                email=f"{kind}{i}-{run}@example.org",
                username=f"{kind}{i}{run}",
                password=PASSWORD,
            )
        )
        return made.id

    owner = await user(0, "owner")
    room = await chat.create_room(CreateRoomDto(name=f"bench {run}", created_by=owner))
    reader_ids = [await user(i, "reader") for i in range(readers)]
    writer_ids = [await user(i, "writer") for i in range(readers)]
    for member in reader_ids + writer_ids:
        await chat.join(room.id, member)
    for i in range(messages):
        await chat.send_message(room.id, owner, f"message {i} " + "x" * 80)
    return World(room.id, reader_ids, writer_ids)


async def until_on_replica(replica_url: str, room: uuid.UUID, messages: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = await asyncpg.connect(replica_url)
            try:
                found = await conn.fetchval(
                    "SELECT count(*) FROM messages WHERE room_id = $1", room
                )
            finally:
                await conn.close()
            if found >= messages:
                return
        except (OSError, asyncpg.PostgresError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the standby did not receive the benchmark's data in 60 s")
        await asyncio.sleep(0.1)


async def measure(tasks: int, seconds: float, call: Callable[[int], Awaitable[object]]) -> float:
    """Calls per second of ``call`` from ``tasks`` concurrent loops for ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal done
        for i in itertools.count(k):
            if time.perf_counter() >= stop:
                return
            await call(i)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(tasks)))
    return done / (time.perf_counter() - started)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="superuser URL of the primary")
    parser.add_argument("--replica-url", required=True, help="superuser URL of the standby")
    parser.add_argument("--redis-url", required=True, help="a Redis db of its own (flushed)")
    parser.add_argument("--database-name", default=BENCH_DB)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--drop", action="store_true", help="start from an empty database")
    parser.add_argument("--tiny", action="store_true", help="a few readers, a fraction of a s")
    args = parser.parse_args(argv)
    if args.tiny:
        args.concurrency, args.seconds, args.readers, args.messages = 3, 0.3, 3, 60
    name = args.database_name
    await prepare(maintenance_url(args.database_url, "postgres"), name, args.drop)
    app = urls.with_user(maintenance_url(args.database_url, name), "chatapp_app")
    replica = urls.with_user(maintenance_url(args.replica_url, name), "chatapp_app")
    redis = RedisClient(args.redis_url)
    await redis.redis.flushdb()
    base: dict[str, Any] = {
        "database_url": app,
        "redis_url": args.redis_url,
        "pool_min_size": 1,
        "pool_max_size": max(args.concurrency, 1),
    }
    setups: dict[str, Settings] = {
        "primary": Settings(**base),
        "replica/redis": Settings(**base, replica_urls=replica, replica_fence="redis"),
        "replica/process": Settings(**base, replica_urls=replica, replica_fence="process"),
    }
    results: dict[str, tuple[float, float | None]] = {}
    try:
        async with ChatKeep.connect(setups["primary"], send_limit=SENDS, bcrypt_rounds=10) as chat:
            world = await seed(chat, args.readers, args.messages)
        await until_on_replica(maintenance_url(args.replica_url, name), world.room, args.messages)

        def reading(chat: ChatKeep) -> Callable[[int], Awaitable[object]]:
            readers = world.readers
            return lambda i: chat.history(world.room, readers[i % len(readers)], limit=50)

        def writing(chat: ChatKeep) -> Callable[[int], Awaitable[object]]:
            writers = world.writers

            async def call(i: int) -> None:
                writer = writers[i % len(writers)]
                await chat.send_message(world.room, writer, f"w{i}")
                await chat.history(world.room, writer, limit=50)

            return call

        for label, settings in setups.items():
            async with ChatKeep.connect(settings, send_limit=SENDS) as chat:
                await asyncio.sleep(3 * settings.replica_check_interval)  # first checks
                rate = await measure(args.concurrency, args.seconds, reading(chat))
                share = None
                if chat.db.replicas is not None:
                    reads = chat.db.replicas.reads
                    share = reads["replica"] / max(1, sum(reads.values()))
                results[label] = (rate, share)
        for label, settings in (
            ("write+read, primary", setups["primary"]),
            ("write+read, replica/redis", setups["replica/redis"]),
        ):
            async with ChatKeep.connect(settings, send_limit=SENDS) as chat:
                rate = await measure(args.concurrency, args.seconds, writing(chat))
                share = None
                if chat.db.replicas is not None:
                    reads = chat.db.replicas.reads
                    share = reads["replica"] / max(1, sum(reads.values()))
                results[label] = (rate, share)
    finally:
        await redis.aclose()

    print(
        f"history pages/s, {args.concurrency} tasks, {args.seconds:g} s each "
        "(primary and standby on this machine)"
    )
    print(f"{'set-up':<28}{'per s':>10}{'replica share':>15}{'ratio':>8}")
    for label, (rate, share) in results.items():
        baseline = results["write+read, primary" if label.startswith("write") else "primary"][0]
        shown = "-" if share is None else f"{share:.0%}"
        print(f"{label:<28}{rate:>10.0f}{shown:>15}{rate / baseline:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
