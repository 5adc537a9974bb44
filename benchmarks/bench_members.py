"""Does a room's size slow its history? A 20-member room against a 5,000-member one.

Issue 12 measured every ``history`` and ``catch_up`` loading and decoding the room's whole
member list from Redis to check one membership: a room of 5,020 members served a seventh
of the pages of a room of 20. This benchmark calls ``chat.history(room, member, limit=50)``
through the facade, as ``chatapp_app`` (row security in force, as in production), from
``--concurrency`` tasks (20) on each room in turn, and prints pages/s for each room and the
ratio big/small (the target is >= 0.9: the member check must not grow with the room). The
askers are the same 20 users in both rooms and both rooms hold the same messages, so only
the member count differs. It prints numbers only: no timed assertion.

It then checks the cold-cache herd: ``--herd`` (50) concurrent first calls on the big room,
and prints how many PostgreSQL loads of the member list they caused (one is the goal). The
calls are catch-ups with nothing new (``after_seq`` at the newest message): since migration
017 a page with rows proves membership by itself and never asks the member cache, so an
empty page is the read that does.

Run (PostgreSQL and Redis on this machine; the chatapp_* roles must exist, or the script
makes them)::

    python benchmarks/bench_members.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/14

The script works in its own database (``--database-name``, by default
``chatkeep_bench_members``, kept for the next run unless ``--drop``) and FLUSHes the
logical Redis database of ``--redis-url``: give it one of its own. ``--tiny`` builds rooms
of 3 and 60 members and measures for a fraction of a second, so a test or CI can run the
whole script in seconds (tests/test_facade_members.py does).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import asyncpg
import bcrypt
from _args import server_parser
from bench_storage import bench_database

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator

BENCH_DB = "chatkeep_bench_members"
TARGET = 0.9
MESSAGES = 200


@dataclass(frozen=True)
class Rooms:
    """``small`` and ``big`` rooms; ``askers`` are members of both."""

    small: uuid.UUID
    big: uuid.UUID
    askers: list[uuid.UUID]
    big_size: int


async def database(server_url: str, name: str, *, fresh: bool) -> str:
    """The benchmark's database, migrated (created if missing, again if ``fresh``)."""
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()
    url = await bench_database(server_url, name, fresh)
    conn = await asyncpg.connect(url)
    try:
        await prepare_database(conn)
        await Migrator(conn).up()
    finally:
        await conn.close()
    return url


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def build_rooms(url: str, small_size: int, big_size: int) -> Rooms:
    """Two public rooms (``small_size`` and ``big_size`` members), built once per size."""
    tag = f"{small_size}_{big_size}"
    conn = await asyncpg.connect(url)
    try:
        small = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", f"small {tag}")
        big = await conn.fetchval("SELECT id FROM rooms WHERE name = $1", f"big {tag}")
        if small is None or big is None:
            small, big = await _seed(conn, tag, small_size, big_size)
        askers = [
            row["user_id"]
            for row in await conn.fetch(
                "SELECT user_id FROM room_users WHERE room_id = $1 ORDER BY user_id", small
            )
        ]
    finally:
        await conn.close()
    return Rooms(small, big, askers, big_size)


async def _seed(
    conn: asyncpg.Connection, tag: str, small_size: int, big_size: int
) -> tuple[uuid.UUID, uuid.UUID]:
    print(f"seeding rooms of {small_size} and {big_size:,} members (once)...", flush=True)
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(big_size)]
    async with conn.transaction():
        await conn.copy_records_to_table(
            "users",
            records=[
                (u, f"m{tag}_{i}@example.org", f"m{tag}_{i}", hashed) for i, u in enumerate(users)
            ],
            columns=["id", "email", "username", "password_hash"],
        )
        small, big = uuid7(), uuid7()
        await conn.copy_records_to_table(
            "rooms",
            records=[
                (small, f"small {tag}", "public", users[0]),
                (big, f"big {tag}", "public", users[0]),
            ],
            columns=["id", "name", "type", "created_by"],
        )
        await conn.copy_records_to_table(
            "room_users",
            records=[(small, u) for u in users[:small_size]] + [(big, u) for u in users],
            columns=["room_id", "user_id"],
        )
        for room in (small, big):
            await conn.execute(
                """
                INSERT INTO messages (room_id, user_id, seq, content)
                SELECT $1, ($2::uuid[])[1 + g % array_length($2::uuid[], 1)], g,
                       'message number ' || g || ' with a little text in it'
                  FROM generate_series(1, $3::int) AS g
                """,
                room,
                users[:small_size],
                MESSAGES,
            )
            await conn.execute("UPDATE rooms SET last_seq = $2 WHERE id = $1", room, MESSAGES)
    await conn.execute("VACUUM ANALYZE users, rooms, room_users, messages")
    return small, big


async def rate(
    chat: ChatKeep, room: uuid.UUID, askers: list[uuid.UUID], tasks: int, seconds: float
) -> float:
    """Pages of ``chat.history`` per second from ``tasks`` concurrent tasks."""
    counts = [0] * tasks
    stop = False
    progressed = asyncio.Event()

    async def worker(index: int) -> None:
        user = askers[index % len(askers)]
        while not stop:
            await chat.history(room, user, limit=50)
            counts[index] += 1
            progressed.set()

    running = [asyncio.create_task(worker(i)) for i in range(tasks)]
    await asyncio.sleep(min(0.5, seconds / 4))  # warm-up (fills the cache), not counted
    before = sum(counts)
    start = time.perf_counter()
    progressed.clear()
    await asyncio.sleep(seconds)
    # A loaded machine may finish no page in a short window: time the first one instead
    # of reporting a rate of zero (and dividing by it).
    await progressed.wait()
    done = sum(counts) - before
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*running)
    return done / elapsed


async def herd(chat: ChatKeep, rooms: Rooms, callers: int) -> int:
    """Member-list loads caused by ``callers`` first calls (empty catch-ups: they ask it)."""
    await chat.members.invalidate(rooms.big)

    def loads() -> int:
        found = chat.db.stats.get("rooms.members")
        return 0 if found is None else found.calls

    before = loads()
    askers = rooms.askers
    await asyncio.gather(
        *(
            chat.catch_up(rooms.big, askers[i % len(askers)], after_seq=MESSAGES)
            for i in range(callers)
        )
    )
    return loads() - before


async def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=14)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per room and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", type=int, default=20, help="members of the small room")
    parser.add_argument("--big", type=int, default=5_000, help="members of the big room")
    parser.add_argument("--herd", type=int, default=50, help="concurrent cold first calls")
    parser.add_argument("--tiny", action="store_true", help="tiny rooms, short rounds (seconds)")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = parser.parse_args()
    # Cold loads of a big room are slow by design here: their warnings would bury the table.
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    if args.tiny:
        args.small, args.big, args.seconds, args.rounds = 3, 60, 0.2, 1
        args.concurrency, args.herd = min(args.concurrency, 5), min(args.herd, 10)

    url = await database(args.database_url, args.database_name, fresh=args.fresh)
    rooms = await build_rooms(url, args.small, args.big)
    app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
    settings = Settings(database_url=app_url, redis_url=args.redis_url)
    size = max(args.concurrency, settings.pool_max_size)
    async with (
        Database(settings, min_size=args.concurrency, max_size=size) as db,
        RedisClient.from_settings(settings) as redis,
    ):
        await redis.redis.flushdb()
        chat = ChatKeep(db, redis, node_id="bench")
        print(
            f"{args.concurrency} tasks, {args.rounds} rounds of {args.seconds:g} s per room; "
            f"rooms of {args.small} and {args.big:,} members, {MESSAGES} messages each"
        )
        small_rates: list[float] = []
        big_rates: list[float] = []
        ratios: list[float] = []
        for round_ in range(args.rounds):
            order = [("small", rooms.small), ("big", rooms.big)]
            if round_ % 2:
                order.reverse()  # neither room always runs on a warmer server
            measured = {
                name: await rate(chat, room, rooms.askers, args.concurrency, args.seconds)
                for name, room in order
            }
            small_rates.append(measured["small"])
            big_rates.append(measured["big"])
            ratios.append(measured["big"] / measured["small"])
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio >= TARGET else f"BELOW {TARGET}"
        print(f"{'room':<6} {'members':>8} {'pages/s':>9}")
        print(f"{'small':<6} {args.small:>8,} {statistics.median(small_rates):>9,.0f}")
        print(f"{'big':<6} {args.big:>8,} {statistics.median(big_rates):>9,.0f}")
        print(f"ratio big/small (median of rounds): {ratio:.2f}  {verdict}")
        print("ratios per round: " + " ".join(f"{r:.2f}" for r in ratios))
        loads = await herd(chat, rooms, args.herd)
        print(f"cold herd: {args.herd} concurrent first calls -> {loads} member-list load(s)")
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
