"""chatkeep's storage layer against raw asyncpg running the same SQL.

In one run, on one database, at ``--concurrency`` tasks (20), for ``--seconds`` per round:

* send: one message into the task's own room (``messages.SEND_MANY``, a batch of one);
* history: a page of 50 with authors at a random depth of a 10,000-message room
  (``messages.HISTORY_BEFORE``; chatkeep also builds the models and cursors);
* unread: the unread counts of a user who is in 200 rooms (``messages.UNREAD_COUNTS``);
* mark_read: move a watermark to the newest message (``messages.MARK_READ``).

Raw asyncpg gets a pool with the same options chatkeep's Database uses (sizes, statement
cache, reset hook), so the ratio is the cost of the library itself; ``--default-pool``
adds a column with asyncpg's default pool, which resets every connection with a
``RESET ALL`` round trip. Each round runs raw and chatkeep back to back (alternating which
goes first); the ratio printed is the median of the per-round ratios, which a drifting
background load on a shared machine disturbs far less than a ratio of medians.

``--big-room`` also builds (once; reused later) a room of ``--big-room-messages``
(5,000,000) messages with ``generate_series`` and compares a history page deep in the
past with the newest page: keyset pagination should make them cost the same.

Run (PostgreSQL 15 here)::

    python benchmarks/bench_storage.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --big-room

The URL names a server; the script works in its own database (``chatkeep_bench``, or
``--database-name``; ``--drop`` drops it at the end). ``--tiny`` runs one short round at 4
tasks, without the deep-page test and without judging the ratios, so a test or CI can run
the whole script in seconds (tests/test_benchmarks.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import bcrypt
from pydantic import TypeAdapter

from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto, MessageWithUser, UserProfile
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import maintenance_url
from chatkeep.storage.database import _reset_connection
from chatkeep.storage.messages import (
    HISTORY_BEFORE,
    MARK_READ,
    SEND_MANY,
    UNREAD_COUNTS,
    _messages,
)
from chatkeep.storage.migrate import Migrator

BENCH_DB = "chatkeep_bench"
# Sends call chatkeep_send_messages as 015 left it (reply_to) and pages read reply_to;
# 016 adds the search index every send keeps up. RLS binds no superuser: not measured here.
SCHEMA_VERSION = 16
ROOMS = 200
USERS = 20
HISTORY_MESSAGES = 10_000
BIG_ROOM_NAME = "bench big room"

Op = Callable[[int, random.Random], Awaitable[Any]]


@dataclass
class Fixture:
    users: list[uuid.UUID]
    rooms: list[uuid.UUID]
    history_room: uuid.UUID
    big_room: uuid.UUID | None = None
    big_room_seq: int = 0


# -- database setup -------------------------------------------------------------------------


async def bench_database(server_url: str, name: str, fresh: bool) -> str:
    """The URL of database ``name`` on the server, created if missing (again if ``fresh``)."""
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and fresh:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = False
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return maintenance_url(server_url, name)


async def prepare_database(server_url: str, fresh: bool, name: str = BENCH_DB) -> str:
    url = await bench_database(server_url, name, fresh)
    conn = await asyncpg.connect(url)
    try:
        await Migrator(conn).up(to=SCHEMA_VERSION)
    finally:
        await conn.close()
    return url


async def build_fixture(conn: asyncpg.Connection) -> Fixture:
    """20 users, all in 200 rooms, and a 10,000-message room written by all of them."""
    found = await conn.fetch("SELECT id FROM users WHERE username LIKE 'bench\\_%' ORDER BY 1")
    if len(found) == USERS:
        users = [row["id"] for row in found]
        rooms = [
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM rooms WHERE name LIKE 'bench room %' ORDER BY name"
            )
        ]
        history_room = await conn.fetchval("SELECT id FROM rooms WHERE name = 'bench history'")
        return Fixture(users, rooms, history_room)
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(10)).decode()
    users = [uuid7() for _ in range(USERS)]
    await conn.copy_records_to_table(
        "users",
        records=[(u, f"bench{i}@example.org", f"bench_{i}", hashed) for i, u in enumerate(users)],
        columns=["id", "email", "username", "password_hash"],
    )
    rooms = [uuid7() for _ in range(ROOMS)]
    history_room = uuid7()
    await conn.copy_records_to_table(
        "rooms",
        records=[(r, f"bench room {i:03d}", "public", users[0]) for i, r in enumerate(rooms)]
        + [(history_room, "bench history", "public", users[0])],
        columns=["id", "name", "type", "created_by"],
    )
    await conn.copy_records_to_table(
        "room_users",
        records=[(r, u) for r in [*rooms, history_room] for u in users],
        columns=["room_id", "user_id"],
    )
    await conn.execute(
        """
        INSERT INTO messages (room_id, user_id, seq, content)
        SELECT $1, ($2::uuid[])[1 + g % array_length($2::uuid[], 1)], g,
               'history message number ' || g || ' with a little text in it'
          FROM generate_series(1, $3::int) AS g
        """,
        history_room,
        users,
        HISTORY_MESSAGES,
    )
    await conn.execute(
        "UPDATE rooms SET last_seq = $2 WHERE id = $1", history_room, HISTORY_MESSAGES
    )
    await conn.execute("ANALYZE")
    return Fixture(users, rooms, history_room)


async def build_big_room(conn: asyncpg.Connection, fixture: Fixture, count: int) -> None:
    room = await conn.fetchrow("SELECT id, last_seq FROM rooms WHERE name = $1", BIG_ROOM_NAME)
    if room is not None and room["last_seq"] >= count:
        fixture.big_room, fixture.big_room_seq = room["id"], room["last_seq"]
        return
    if room is not None:
        await conn.execute("DELETE FROM rooms WHERE id = $1", room["id"])
    room_id = uuid7()
    print(f"building a room of {count:,} messages (once; later runs reuse it)...", flush=True)
    start = time.perf_counter()
    await conn.execute(
        "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, $2, 'public', $3)",
        room_id,
        BIG_ROOM_NAME,
        fixture.users[0],
    )
    step = 500_000
    for first in range(1, count + 1, step):
        last = min(first + step - 1, count)
        await conn.execute(
            """
            INSERT INTO messages (room_id, user_id, seq, content, created_at)
            SELECT $1, ($2::uuid[])[1 + g % array_length($2::uuid[], 1)], g,
                   'message ' || g, now() - make_interval(secs => ($4::int - g))
              FROM generate_series($3::int, $4::int) AS g
            """,
            room_id,
            fixture.users,
            first,
            last,
        )
        print(f"  {last:,} messages, {time.perf_counter() - start:.0f} s", flush=True)
    await conn.execute("UPDATE rooms SET last_seq = $2 WHERE id = $1", room_id, count)
    await conn.execute("VACUUM ANALYZE messages")
    fixture.big_room, fixture.big_room_seq = room_id, count


# -- measuring ------------------------------------------------------------------------------


async def rate(op: Op, concurrency: int, seconds: float) -> float:
    """Operations per second of ``op`` run by ``concurrency`` tasks for ``seconds``."""
    counts = [0] * concurrency
    stop = False
    progressed = asyncio.Event()

    async def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            while not stop:
                await op(index, rng)
                counts[index] += 1
                progressed.set()
        finally:
            progressed.set()  # a failed worker wakes the wait below; gather raises its error

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(min(0.5, seconds / 4))  # warm-up, not counted
    before = sum(counts)
    start = time.perf_counter()
    progressed.clear()
    await asyncio.sleep(seconds)
    # A loaded machine may finish no call in a short (--tiny) window: wait for the first
    # one rather than report a rate of zero (and divide by it). A worker that failed
    # already (in the warm-up, say) set the event before it was cleared: do not wait for
    # it, gather below raises its error.
    if not any(task.done() for task in tasks):
        await progressed.wait()
    done = sum(counts) - before
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks)
    return done / elapsed


def raw_ops(pool: asyncpg.Pool, fx: Fixture) -> dict[str, Op]:
    async def send(index: int, rng: random.Random) -> Any:
        return await pool.fetch(
            SEND_MANY,
            [uuid7()],
            [fx.rooms[index]],
            [fx.users[index]],
            [None],
            ["hello from raw"],
            ["text"],
            [None],
        )

    async def history(index: int, rng: random.Random) -> Any:
        seq = rng.randint(100, HISTORY_MESSAGES)
        return await pool.fetch(HISTORY_BEFORE, fx.history_room, seq, 51)

    async def unread(index: int, rng: random.Random) -> Any:
        return await pool.fetch(UNREAD_COUNTS, fx.users[index])

    async def mark_read(index: int, rng: random.Random) -> Any:
        room = fx.rooms[rng.randrange(ROOMS)]
        return await pool.fetchval(MARK_READ, room, fx.users[index], None)

    return {"send": send, "history": history, "unread": unread, "mark_read": mark_read}


def chatkeep_ops(messages: MessageRepository, fx: Fixture) -> dict[str, Op]:
    async def send(index: int, rng: random.Random) -> Any:
        return await messages.send(
            CreateMessageDto(
                room_id=fx.rooms[index], user_id=fx.users[index], content="hello from chatkeep"
            )
        )

    async def history(index: int, rng: random.Random) -> Any:
        seq = rng.randint(100, HISTORY_MESSAGES)
        return await messages.history(fx.history_room, before_seq=seq, limit=50)

    async def unread(index: int, rng: random.Random) -> Any:
        return await messages.unread_counts(fx.users[index])

    async def mark_read(index: int, rng: random.Random) -> Any:
        room = fx.rooms[rng.randrange(ROOMS)]
        return await messages.mark_read(room, fx.users[index])

    return {"send": send, "history": history, "unread": unread, "mark_read": mark_read}


async def deep_vs_newest(messages: MessageRepository, fx: Fixture, seconds: float) -> None:
    assert fx.big_room is not None
    room = fx.big_room
    newest_seq = fx.big_room_seq

    async def newest(index: int, rng: random.Random) -> Any:
        return await messages.history(room, limit=50)

    async def deep(index: int, rng: random.Random) -> Any:
        # Anywhere in the oldest 2% of the room: millions of messages back.
        seq = rng.randint(1_000, max(1_001, newest_seq // 50))
        return await messages.history(room, before_seq=seq, limit=50)

    async def middle(index: int, rng: random.Random) -> Any:
        return await messages.history(room, before_seq=newest_seq // 2, limit=50)

    rates: dict[str, list[float]] = {"newest": [], "middle": [], "deep": []}
    for _ in range(3):
        for name, op in (("newest", newest), ("middle", middle), ("deep", deep)):
            rates[name].append(await rate(op, 20, seconds))
    med = {name: statistics.median(values) for name, values in rates.items()}
    print()
    print(f"history in a room of {newest_seq:,} messages (chatkeep, 20 tasks, page of 50)")
    for name in ("newest", "middle", "deep"):
        print(f"  {name:<8} {med[name]:>9,.0f} pages/s  {1000 * 20 / med[name]:6.2f} ms/page")
    print(f"  deep/newest cost ratio: {med['newest'] / med['deep']:.2f} (target <= 1.5)")


def model_costs(rows: list[asyncpg.Record]) -> None:
    """What turning one page of rows into objects costs, several ways (best of 25 runs).

    The rows are frozen dataclasses: pydantic validation (``TypeAdapter``) and the
    dataclass ``__init__`` are what a caller building them by hand would pay; chatkeep
    builds them with one ``__dict__`` store per object.
    """

    def best(build: Callable[[], object]) -> float:
        runs = timeit.repeat(build, number=200, repeat=25)
        return min(runs) / 200 * 1e6

    def split(row: asyncpg.Record) -> tuple[dict[str, Any], dict[str, Any]]:
        values = dict(row)
        author = {
            "id": values["user_id"],
            "username": values.pop("username"),
            "avatar_url": values.pop("avatar_url"),
        }
        return values, author

    page = TypeAdapter(list[MessageWithUser])
    split_rows = [split(row) for row in rows]

    def validated() -> object:
        return page.validate_python(
            [dict(values, user=author) for values, author in map(split, rows)]
        )

    def initialised() -> object:
        return [
            MessageWithUser(**values, user=UserProfile(**author))
            for values, author in map(split, rows)
        ]

    def initialised_only() -> object:
        return [
            MessageWithUser(**values, user=UserProfile(**author)) for values, author in split_rows
        ]

    print()
    print(f"building {len(rows)} MessageWithUser rows from records (best of 25, us per page)")
    print(f"  pydantic validation        {best(validated):8.1f}")
    print(f"  dataclass __init__         {best(initialised):8.1f}")
    print(f"  (__init__ alone, no split) {best(initialised_only):8.1f}")
    print(f"  chatkeep (_messages)       {best(lambda: _messages(rows)):8.1f}")
    print(f"  dict(record) per row       {best(lambda: [dict(row) for row in rows]):8.1f}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"),
        help="a server to work on; the benchmark uses its own database there",
    )
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--big-room", action="store_true", help="also run the deep-page test")
    parser.add_argument("--big-room-messages", type=int, default=5_000_000)
    parser.add_argument(
        "--default-pool", action="store_true", help="also measure asyncpg's default pool"
    )
    parser.add_argument("--only", nargs="*", default=None, help="operations to run")
    parser.add_argument(
        "--models", action="store_true", help="also time model building for one page"
    )
    parser.add_argument("--database-name", default=BENCH_DB, help="the benchmark's database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument(
        "--tiny", action="store_true", help="one short round at 4 tasks, no verdicts (seconds)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.seconds, args.big_room = 1, 0.2, False
        args.concurrency = min(args.concurrency, 4)
    if not 1 <= args.concurrency <= USERS:
        parser.error(f"--concurrency: 1 to {USERS} (one user and room per task)")

    url = await prepare_database(args.database_url, args.fresh, args.database_name)
    setup = await asyncpg.connect(url)
    try:
        fixture = await build_fixture(setup)
        if args.big_room:
            await build_big_room(setup, fixture, args.big_room_messages)
    finally:
        await setup.close()

    settings = Settings(database_url=url, pool_min_size=args.concurrency)
    db = Database(settings, max_size=max(args.concurrency, settings.pool_max_size))
    await db.open()
    options = db.pool_options()
    options.pop("init")
    raw_pool = await asyncpg.create_pool(url, **options)
    assert options["reset"] is _reset_connection
    default_pool = None
    if args.default_pool:
        default_pool = await asyncpg.create_pool(
            url,
            min_size=args.concurrency,
            max_size=args.concurrency,
            statement_cache_size=settings.statement_cache_size,
        )
    try:
        messages = MessageRepository(db)
        ours = chatkeep_ops(messages, fixture)
        theirs = raw_ops(raw_pool, fixture)
        defaults = raw_ops(default_pool, fixture) if default_pool is not None else None
        names = args.only or list(ours)
        version = (await db.health()).server_version.split()[0]
        print(
            f"PostgreSQL {version}, "
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"{args.concurrency} tasks, {args.rounds} rounds of {args.seconds:g} s per side"
        )
        header = f"{'operation':<10} {'raw ops/s':>11} {'chatkeep ops/s':>15} {'ratio':>7}"
        if defaults is not None:
            header += f" {'asyncpg default pool':>21}"
        print("ops/s: the median round; ratio: the median of the back-to-back pairs' ratios")
        print(header)
        targets = {"send": 0.9, "history": 0.85, "unread": 0.9, "mark_read": 0.9}
        failed = False
        for name in names:
            raw_rates: list[float] = []
            our_rates: list[float] = []
            default_rates: list[float] = []
            pair_ratios: list[float] = []
            for round_ in range(args.rounds):
                pair = [("raw", theirs[name]), ("chatkeep", ours[name])]
                if round_ % 2:
                    pair.reverse()  # neither side always runs on a warmer server
                measured: dict[str, float] = {}
                for side, op in pair:
                    measured[side] = await rate(op, args.concurrency, args.seconds)
                raw_rates.append(measured["raw"])
                our_rates.append(measured["chatkeep"])
                # Back-to-back pairs see the same background load; their ratio is steadier
                # than a ratio of medians on a shared machine.
                pair_ratios.append(measured["chatkeep"] / measured["raw"])
                if defaults is not None:
                    default_rates.append(await rate(defaults[name], args.concurrency, args.seconds))
            raw_rate = statistics.median(raw_rates)
            our_rate = statistics.median(our_rates)
            ratio = statistics.median(pair_ratios)
            verdict = "ok" if ratio >= targets[name] else f"BELOW {targets[name]}"
            failed = failed or ratio < targets[name]
            line = f"{name:<10} {raw_rate:>11,.0f} {our_rate:>15,.0f} {ratio:>7.2f}"
            if default_rates:
                line += f" {statistics.median(default_rates):>21,.0f}"
            print(f"{line}  {verdict}", flush=True)
        if args.models:
            rows = await db.fetch("bench.page", HISTORY_BEFORE, fixture.history_room, 5_000, 50)
            model_costs(rows)
        if args.big_room:
            await deep_vs_newest(messages, fixture, args.seconds)
    finally:
        await raw_pool.close()
        if default_pool is not None:
            await default_pool.close()
        await db.close()
    if args.drop:
        admin = await asyncpg.connect(maintenance_url(args.database_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{args.database_name}" WITH (FORCE)')
        finally:
            await admin.close()
    # A tiny run measures too little to judge: it only shows the script still works.
    return 1 if failed and not args.tiny else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
