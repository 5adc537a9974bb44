"""Sends, history pages and thread pages on Citus against single-node PostgreSQL, as ratios.

Both stores get the same workload through chatkeep's repositories, as ``chatapp_app`` with
row security on (each call acting as the room's owner): ``--rooms`` rooms, each sent
``--sends`` messages one after another while the rooms run concurrently, then
``--pages`` history pages of 50 per room, then (after an untimed reply to every fifth
message) ``--pages`` pages of 50 of one thread per room, named by its root's id as the
facade's ``thread()`` takes it (on Citus: the root's room found on every shard, then the
page on the room's shard; migration 023). With ``--redis-url`` (issue 17), Citus then
pages the threads again as the facade does, the roots' rooms remembered in Redis
(``MessageRoomCache``, cold: each room's first page fills it): one shard checks the
remembered room instead of every shard looking for it. Printed per store: sends/s,
pages/s and thread pages/s (and, on Citus, thread pages/s with the room cache), and the
ratios Citus / single node, measured in the same run. Each pool
connection makes one untimed call first: on Citus a connection's first statement opens
the coordinator's connections to the workers, which takes seconds on the test cluster.

What the ratio means, and what it does not: on this machine the coordinator, both workers
and the single node share the same two cores, so Citus pays its extra hop (coordinator to
worker) and its planning without gaining any hardware; a ratio below 1 is the price of
distribution on one machine, not a forecast for a cluster, where each worker brings its
own cores and disks and per-room statements (one shard each) scale out with the workers.

Run (the machine's PostgreSQL and the test cluster of ``../shared/citus/cluster.sh``)::

    python benchmarks/bench_citus.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --citus-url postgresql://root@127.0.0.1:9700/postgres

It works in its own database on each server (``--database-name``, default
``chatkeep_h8_bench_citus``), made afresh each run and dropped with ``--drop``. ``--tiny``
runs in seconds. ``--redis-url`` names a Redis database for the room cache (its
``bench_citus:`` keys are deleted before and after). Numbers only: no timed assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Iterable

import asyncpg
import bcrypt

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto
from chatkeep.realtime import MessageRoomCache, RedisClient
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import ROLES, bootstrap
from chatkeep.storage.citus import CITUS_ROLES, prepare_citus
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.threads import ThreadRepository


async def _drop(server_url: str, name: str, ports: Iterable[int] = ()) -> None:
    targets = [server_url, *(urls.with_host(server_url, "127.0.0.1", p) for p in ports)]
    for target in targets:
        conn = await asyncpg.connect(urls.with_database(target, "postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def _worker_ports(citus_url: str) -> list[int]:
    conn = await asyncpg.connect(urls.with_database(citus_url, "postgres"))
    try:
        rows = await conn.fetch("SELECT nodeport FROM pg_dist_node WHERE groupid <> 0")
    finally:
        await conn.close()
    return [r["nodeport"] for r in rows]


async def prepare(server_url: str, name: str, *, citus: bool) -> str:
    """A fresh, migrated database ``name`` on the server; its superuser URL."""
    ports = await _worker_ports(server_url) if citus else []
    await _drop(server_url, name, ports)
    url = urls.with_database(server_url, name)
    settings = Settings(database_url=url)
    await bootstrap(url, settings, generate_passwords=False, roles=CITUS_ROLES if citus else ROLES)
    if citus:
        await prepare_citus(url, settings)
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn).up()
    finally:
        await conn.close()
    return url


async def seed(url: str, rooms: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``rooms`` public rooms, each with its owner (a user of its own): (room, owner)."""
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    pairs = [(uuid7(), uuid7()) for _ in range(rooms)]
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO users (id, email, username, password_hash) VALUES ($1, $2, $3, $4)",
                [
                    (u, f"owner{i}@example.org", f"owner{i}", hashed)
                    for i, (_, u) in enumerate(pairs)
                ],
            )
            await conn.executemany(
                "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, $2, 'public', $3)",
                [(r, f"room {i}", u) for i, (r, u) in enumerate(pairs)],
            )
            await conn.executemany(
                "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'owner')", pairs
            )
    finally:
        await conn.close()
    return pairs


async def measure(
    url: str,
    *,
    citus: bool,
    rooms: int,
    sends: int,
    pages: int,
    redis: RedisClient | None = None,
) -> tuple[float, float, float, float | None]:
    """(sends/s, pages/s, thread pages/s, thread pages/s with the room cache or ``None``)
    on the database at ``url``, as chatapp_app; the last only on Citus with ``redis``."""
    pairs = await seed(url, rooms)
    settings = Settings(database_url=urls.with_user(url, "chatapp_app"), citus=citus)
    db = Database(settings, min_size=max(rooms, 2), max_size=max(rooms, 2))
    await db.open()
    try:
        messages = MessageRepository(db)
        threads = ThreadRepository(db)
        roots: dict[uuid.UUID, uuid.UUID] = {}

        async def send_all(room: uuid.UUID, owner: uuid.UUID) -> None:
            for i in range(sends):
                async with db.acting_as(owner):
                    await messages.send(
                        CreateMessageDto(room_id=room, user_id=owner, content=f"message {i}")
                    )

        async def read_all(room: uuid.UUID, owner: uuid.UUID) -> None:
            for _ in range(pages):
                async with db.acting_as(owner):
                    page = await messages.history(room, limit=50)
                assert page.items, "a page of the room's messages"

        async def reply_all(room: uuid.UUID, owner: uuid.UUID) -> None:
            async with db.acting_as(owner):
                root = await messages.send(
                    CreateMessageDto(room_id=room, user_id=owner, content="a thread root")
                )
            roots[room] = root.id
            for i in range(max(sends // 5, 1)):
                async with db.acting_as(owner):
                    await messages.send(
                        CreateMessageDto(
                            room_id=room, user_id=owner, content=f"reply {i}", reply_to=root.id
                        )
                    )

        async def read_threads(room: uuid.UUID, owner: uuid.UUID) -> None:
            for _ in range(pages):
                async with db.acting_as(owner):
                    page = await threads.page(roots[room], limit=50)
                assert page.items, "a page of the thread's replies"

        async def warm(room: uuid.UUID, owner: uuid.UUID) -> None:
            async with db.acting_as(owner):
                await messages.history(room, limit=1)
                await asyncio.sleep(0.2)  # hold the connection: the next room takes another

        # Untimed: a connection's first statement on Citus opens the coordinator's own
        # connections to the workers (about 4 s each on the test cluster).
        await asyncio.gather(*(warm(r, o) for r, o in pairs))
        started = time.perf_counter()
        await asyncio.gather(*(send_all(r, o) for r, o in pairs))
        send_rate = rooms * sends / (time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(read_all(r, o) for r, o in pairs))
        page_rate = rooms * pages / (time.perf_counter() - started)
        await asyncio.gather(*(reply_all(r, o) for r, o in pairs))  # untimed
        started = time.perf_counter()
        await asyncio.gather(*(read_threads(r, o) for r, o in pairs))
        thread_rate = rooms * pages / (time.perf_counter() - started)
        hinted_rate = None
        if citus and redis is not None:
            # The facade's thread(): the roots' rooms remembered in Redis (cold: each
            # room's first page reads every shard and fills the cache).
            threads = ThreadRepository(db, hints=MessageRoomCache(redis))
            started = time.perf_counter()
            await asyncio.gather(*(read_threads(r, o) for r, o in pairs))
            hinted_rate = rooms * pages / (time.perf_counter() - started)
    finally:
        await db.close()
    return send_rate, page_rate, thread_rate, hinted_rate


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--database-url", required=True, help="single-node PostgreSQL server")
    parser.add_argument("--citus-url", required=True, help="the Citus coordinator")
    parser.add_argument("--database-name", default="chatkeep_h8_bench_citus")
    parser.add_argument("--rooms", type=int, default=16)
    parser.add_argument("--sends", type=int, default=100)
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--redis-url", help="Redis for the room cache (thread pages, Citus)")
    parser.add_argument("--tiny", action="store_true", help="a few rooms and calls: seconds")
    parser.add_argument("--drop", action="store_true", help="drop the databases afterwards")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rooms, args.sends, args.pages = 2, 5, 5
    redis = None
    if args.redis_url is not None:
        redis = RedisClient(args.redis_url, key_prefix="bench_citus")
        await redis.__aenter__()
    results: dict[str, tuple[float, float, float, float | None]] = {}
    try:
        for label, server, citus in (
            ("single node", args.database_url, False),
            ("citus", args.citus_url, True),
        ):
            url = await prepare(server, args.database_name, citus=citus)
            try:
                if redis is not None:
                    await _forget(redis)
                results[label] = await measure(
                    url,
                    citus=citus,
                    rooms=args.rooms,
                    sends=args.sends,
                    pages=args.pages,
                    redis=redis,
                )
            finally:
                if args.drop:
                    ports = await _worker_ports(server) if citus else []
                    await _drop(server, args.database_name, ports)
            sends_s, pages_s, threads_s, hinted_s = results[label]
            print(
                f"{label:>11}: {sends_s:8.1f} sends/s  {pages_s:8.1f} pages/s"
                f"  {threads_s:8.1f} thread pages/s"
                + ("" if hinted_s is None else f"  {hinted_s:8.1f} with the room cache")
            )
    finally:
        if redis is not None:
            await _forget(redis)
            await redis.__aexit__(None, None, None)
    (s1, p1, t1, _), (s2, p2, t2, h2) = results["single node"], results["citus"]
    print(
        f"ratio citus/single node: sends {s2 / s1:.2f}  pages {p2 / p1:.2f}"
        f"  thread pages {t2 / t1:.2f}"
        + ("" if h2 is None else f" ({h2 / t1:.2f} with the room cache)")
        + f"  ({args.rooms} rooms x {args.sends} sends, {args.pages} pages each)"
    )
    return 0


async def _forget(redis: RedisClient) -> None:
    """Delete the benchmark's room cache entries (its own key prefix only)."""
    keys = [key async for key in redis.redis.scan_iter(match="bench_citus:*", count=1000)]
    if keys:
        await redis.redis.delete(*keys)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
