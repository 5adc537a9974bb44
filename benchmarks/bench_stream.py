"""Do 500 clients resuming one room at once cost 500 reads? ``ChatKeep.stream`` vs one resume.

After a deploy every client reconnects at once and resumes the same busy room from about
the same position. Each resume is a ``changes(after=p)`` read; the stream shares identical
concurrent reads of a room in one process (after each caller's own membership check), so
the herd should cost about one read. This prints, for one resume, for ``--clients`` (500)
concurrent resumes through the stream, and for the same number of direct
``chat.changes()`` calls (no sharing), the PostgreSQL time of the ``changes.after``
operation (``db.stats``: from having a connection to the answer) and its call count, and
the ratios to one resume. The target is a herd below 5x one resume's database time.
Numbers only: no timed assertion.

The facade connects as ``chatapp_app`` (row security in force, as in production).

Run (PostgreSQL and Redis on this machine; the chatapp_* roles are made if missing)::

    python benchmarks/bench_stream.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/14

It works in its own database (``chatkeep_bench_stream`` or ``--database-name``, made afresh
each run and dropped with ``--drop``) and FLUSHes the logical Redis database of
``--redis-url``: give it one of its own. ``--tiny`` uses 20 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

import asyncpg
import bcrypt
from bench_members import database, drop_database

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database

BENCH_DB = "chatkeep_bench_stream"
TARGET = 5.0
BEHIND = 100  # changes each client resumes behind the head


async def seed(url: str, clients: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A public room with ``clients`` members (their joins are its log) and its owner."""
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(clients)]
    room = uuid7()
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "users",
                records=[
                    (u, f"herd{i}@example.org", f"herd{i}", hashed) for i, u in enumerate(users)
                ],
                columns=["id", "email", "username", "password_hash"],
            )
            await conn.execute(
                "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'herd', 'public', $2)",
                room,
                users[0],
            )
            await conn.executemany(
                "INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)",
                [(room, u) for u in users],
            )
        await conn.execute("VACUUM ANALYZE users, rooms, room_users, room_changes")
    finally:
        await conn.close()
    return room, users


def changes_time(db: Database) -> tuple[float, int]:
    found = db.stats.get("changes.after")
    return (found.total_seconds, found.calls) if found is not None else (0.0, 0)


async def resume(chat: ChatKeep, room: uuid.UUID, user: uuid.UUID, since: int, head: int) -> None:
    async with chat.stream([room], user, since={room: since}) as stream:
        while stream.positions.get(room, 0) < head:
            await anext(stream)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help="20 clients (for tests and CI)")
    parser.add_argument("--drop", action="store_true", help="drop the database afterwards")
    parser.add_argument("--database-name", default=BENCH_DB, help="the benchmark's database")
    args = parser.parse_args()
    if not args.database_url or not args.redis_url:
        parser.error("--database-url and --redis-url (or DATABASE_URL and REDIS_URL) are needed")
    clients = 20 if args.tiny else args.clients
    url = await database(args.database_url, args.database_name, fresh=True)
    room, users = await seed(url, clients)
    async with RedisClient(args.redis_url) as flusher:
        await flusher.redis.flushdb()
    settings = Settings(
        database_url=urls.with_user(url, "chatapp_app"),
        redis_url=args.redis_url,
        pool_max_size=20,
    )
    async with ChatKeep.connect(settings, node_id="bench") as chat:
        # The seed wrote the log without publishing: one message sent through the facade
        # publishes, so the room's published mark is where a live room's is.
        await chat.send_message(room, users[0], "the herd's room is live")
        head = await chat.room_position(room, users[0])
        since = max(0, head - BEHIND)
        # Warm the membership cache and the statement cache, not counted.
        await asyncio.gather(*(chat.room_position(room, u) for u in users))
        await resume(chat, room, users[0], since, head)

        rows = []
        for label, run in (
            ("one resume", lambda: resume(chat, room, users[0], since, head)),
            (
                f"{clients} resumes (stream, shared reads)",
                lambda: asyncio.gather(*(resume(chat, room, u, since, head) for u in users)),
            ),
            (
                f"{clients} direct changes() (no sharing)",
                lambda: asyncio.gather(
                    *(chat.changes(room, u, after=since, limit=BEHIND) for u in users)
                ),
            ),
        ):
            # Each case starts cold: no finished read of an earlier case to reuse.
            chat._recent_changes.clear()
            before, calls = changes_time(chat.db)
            started = time.perf_counter()
            await run()
            wall = time.perf_counter() - started
            after, calls_after = changes_time(chat.db)
            rows.append((label, after - before, calls_after - calls, wall))
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    base = rows[0][1] or 1e-9
    print(f"{'':45} {'db time':>10} {'reads':>6} {'wall':>9} {'x one':>7}")
    for label, db_time, calls, wall in rows:
        ratio = db_time / base
        print(f"{label:45} {db_time * 1000:8.1f}ms {calls:6d} {wall * 1000:7.0f}ms {ratio:7.1f}")
    herd = rows[1][1] / base
    verdict = "meets" if herd < TARGET else "misses"
    print(f"herd/one database time: {herd:.2f} ({verdict} the target < {TARGET:g})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
