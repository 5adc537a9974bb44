"""What applications call: the ChatKeep facade against raw asyncpg and SQLAlchemy 2 ORM.

Issue 12's headline. An application does not run repository statements: it calls
``ChatKeep.send_message``, ``history``, ``catch_up``, ``unread_counts`` and ``mark_read``,
connected as ``chatapp_app`` (row security in force) with Redis (rate limit, publish,
membership cache). This script measures those calls, in one run, against:

* **raw**: asyncpg doing the same job in one statement per call, as a superuser (no row
  security, no Redis): the floor of what the database work costs;
* **SQLAlchemy**: SQLAlchemy 2's async ORM (asyncpg driver) doing the same job the way an
  ORM application would (a session per call, mapped classes), as a superuser. Orientation
  only: it shows what picking an ORM would cost or gain.

Operations (``--concurrency`` tasks, 20 by default, each acting as its own user (beyond 20
tasks, users are shared), every user a member of every room; each side has a pool of
``--pool-size`` connections, by default as many as tasks up to 20):

* ``send_100``: a message into one of 100 rooms at random;
* ``send_hot``: a message into one shared room (one row lock orders every writer);
* ``history``: a page of 50 with its authors, before a random seq of a room of 10,000;
* ``catch_up``: the 50 messages after a random seq of that room, with authors;
* ``unread``: the unread counts of a user in 200 rooms (``--rooms-per-user``: 10, 1000...);
* ``mark_read``: move the user's watermark to the newest message of one of the 100 rooms.

The facade calls are the plain public calls (``chat.send_message(room, user, text)``...),
so the figures follow whatever the facade does underneath. Each round runs the three sides
of an operation back to back (the order rotates every round, so no side always meets a
warmer server); the ops/s printed are the median round's, the ratios the median of the
per-round ratios (steadier on a shared machine than a ratio of medians), and p50/p99 the
latency of single calls over every round. It prints numbers only: no timed assertion.

Run (PostgreSQL and Redis on this machine; the chatapp_* roles are made if missing)::

    python benchmarks/bench_facade.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/3

The script works in its own database (``--database-name``, by default
``chatkeep_bench_facade``, kept for the next run unless ``--drop``) and FLUSHes the logical
Redis database of ``--redis-url``: give it one of its own. ``--tiny`` builds a small
fixture and measures each side for a fraction of a second, so a test or CI can run the whole
script in seconds (tests/test_benchmarks.py does). SQLAlchemy comes with the ``bench`` extra
(``pip install -e '.[bench]'``); without it, ``--no-sqlalchemy`` leaves its column out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import bcrypt
from _args import server_parser
from bench_storage import bench_database

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import RedisClient
from chatkeep.realtime.ratelimit import RateLimit
from chatkeep.storage import Database
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator

BENCH_DB = "chatkeep_bench_facade"
PAGE = 50
# The facade's rate limit is checked on every send (a Redis round trip), as in production,
# but set far above what the benchmark sends, so that no send is refused.
NO_REAL_LIMIT = RateLimit(limit=1_000_000_000, period=1.0)
HANG_SECONDS = 60.0  # a call still running this long after its round ended is reported

Op = Callable[[int, random.Random], Awaitable[Any]]
OPERATIONS = ("send_100", "send_hot", "history", "catch_up", "unread", "mark_read")
LABELS = {
    "send_100": "send, 100 rooms",
    "send_hot": "send, one hot room",
    "history": f"history page of {PAGE} + authors",
    "catch_up": "catch_up after seq k",
    "unread": "unread counts, {rooms} rooms",
    "mark_read": "mark_read",
}


@dataclass(frozen=True)
class Sizes:
    users: int  # one per task
    send_rooms: int
    rooms_per_user: int  # send rooms + hot room + history room + filler rooms
    history_messages: int

    @property
    def tag(self) -> str:
        return f"{self.users}u{self.send_rooms}s{self.rooms_per_user}r{self.history_messages}m"


FULL = Sizes(users=20, send_rooms=100, rooms_per_user=200, history_messages=10_000)
TINY = Sizes(users=4, send_rooms=5, rooms_per_user=10, history_messages=300)


@dataclass(frozen=True)
class Fixture:
    users: list[uuid.UUID]
    send_rooms: list[uuid.UUID]
    hot_room: uuid.UUID
    history_room: uuid.UUID
    history_messages: int

    def user(self, task: int) -> uuid.UUID:
        """The user task number ``task`` acts as (tasks beyond the users share them)."""
        return self.users[task % len(self.users)]


# -- the database ---------------------------------------------------------------------------


async def database(server_url: str, name: str, *, fresh: bool) -> str:
    """The benchmark's database, migrated to the newest schema (created if missing)."""
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


async def build_fixture(url: str, sizes: Sizes) -> Fixture:
    """Users, rooms and a history room for ``sizes``, built once and found again later."""
    tag = sizes.tag
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, name FROM rooms WHERE name LIKE $1 ORDER BY name", f"f{tag} %"
        )
        if len(rows) != sizes.rooms_per_user:
            await _seed(conn, sizes)
            rows = await conn.fetch(
                "SELECT id, name FROM rooms WHERE name LIKE $1 ORDER BY name", f"f{tag} %"
            )
        by_name = {row["name"]: row["id"] for row in rows}
        users = [
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM users WHERE username LIKE $1 ORDER BY username", f"f{tag}\\_%"
            )
        ]
    finally:
        await conn.close()
    return Fixture(
        users=users,
        send_rooms=[by_name[f"f{tag} send {i:04d}"] for i in range(sizes.send_rooms)],
        hot_room=by_name[f"f{tag} hot"],
        history_room=by_name[f"f{tag} history"],
        history_messages=sizes.history_messages,
    )


async def _seed(conn: asyncpg.Connection, sizes: Sizes) -> None:
    tag = sizes.tag
    print(f"seeding the fixture {tag} (once; later runs reuse it)...", flush=True)
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(sizes.users)]
    names = [f"f{tag} send {i:04d}" for i in range(sizes.send_rooms)]
    names += [f"f{tag} hot", f"f{tag} history"]
    names += [f"f{tag} other {i:04d}" for i in range(sizes.rooms_per_user - len(names))]
    rooms = {name: uuid7() for name in names}
    async with conn.transaction():
        await conn.execute("DELETE FROM rooms WHERE name LIKE $1", f"f{tag} %")
        await conn.execute("DELETE FROM users WHERE username LIKE $1", f"f{tag}\\_%")
        await conn.copy_records_to_table(
            "users",
            records=[
                (u, f"f{tag}_{i}@example.org", f"f{tag}_{i:03d}", hashed)
                for i, u in enumerate(users)
            ],
            columns=["id", "email", "username", "password_hash"],
        )
        await conn.copy_records_to_table(
            "rooms",
            records=[(room, name, "public", users[0]) for name, room in rooms.items()],
            columns=["id", "name", "type", "created_by"],
        )
        await conn.copy_records_to_table(
            "room_users",
            records=[(room, u) for room in rooms.values() for u in users],
            columns=["room_id", "user_id"],
        )
        history = rooms[f"f{tag} history"]
        await conn.execute(
            """
            INSERT INTO messages (room_id, user_id, seq, content)
            SELECT $1, ($2::uuid[])[1 + g % array_length($2::uuid[], 1)], g,
                   'history message number ' || g || ' with a little text in it'
              FROM generate_series(1, $3::int) AS g
            """,
            history,
            users,
            sizes.history_messages,
        )
        await conn.execute(
            "UPDATE rooms SET last_seq = $2 WHERE id = $1", history, sizes.history_messages
        )
    await conn.execute("VACUUM ANALYZE users, rooms, room_users, messages")


# -- the three sides ------------------------------------------------------------------------


def _history_position(fx: Fixture, rng: random.Random) -> int:
    return rng.randint(PAGE + 1, fx.history_messages)


def facade_ops(chat: ChatKeep, fx: Fixture) -> dict[str, Op]:
    """The public calls an application makes, as each task's own user."""

    async def send_100(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        return await chat.send_message(room, fx.user(index), "hello from the facade")

    async def send_hot(index: int, rng: random.Random) -> Any:
        return await chat.send_message(fx.hot_room, fx.user(index), "hello from the facade")

    async def history(index: int, rng: random.Random) -> Any:
        seq = _history_position(fx, rng)
        return await chat.history(fx.history_room, fx.user(index), before_seq=seq, limit=PAGE)

    async def catch_up(index: int, rng: random.Random) -> Any:
        seq = _history_position(fx, rng) - PAGE
        return await chat.catch_up(fx.history_room, fx.user(index), after_seq=seq, limit=PAGE)

    async def unread(index: int, rng: random.Random) -> Any:
        return await chat.unread_counts(fx.user(index))

    async def mark_read(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        return await chat.mark_read(room, fx.user(index))

    return {
        "send_100": send_100,
        "send_hot": send_hot,
        "history": history,
        "catch_up": catch_up,
        "unread": unread,
        "mark_read": mark_read,
    }


# One statement per job, as a superuser: the membership test in the statement, the seq (and
# the change-log entry) from the schema's own trigger, as for every insert.
RAW_SEND = """
INSERT INTO messages (id, room_id, user_id, content)
SELECT $1, $2, $3, $4
 WHERE EXISTS (SELECT 1 FROM rooms WHERE id = $2 AND is_active)
   AND EXISTS (SELECT 1 FROM room_users WHERE room_id = $2 AND user_id = $3)
RETURNING id, room_id, user_id, seq, content, type, created_at
"""
RAW_HISTORY = """
SELECT m.id, m.room_id, m.user_id, m.seq, m.content, m.type, m.is_edited, m.created_at,
       u.username, u.avatar_url
  FROM (SELECT * FROM messages WHERE room_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3) m
  JOIN users u ON u.id = m.user_id
 ORDER BY m.seq
"""
RAW_CATCH_UP = """
SELECT m.id, m.room_id, m.user_id, m.seq, m.content, m.type, m.is_edited, m.created_at,
       u.username, u.avatar_url
  FROM (SELECT * FROM messages WHERE room_id = $1 AND seq > $2 ORDER BY seq LIMIT $3) m
  JOIN users u ON u.id = m.user_id
 ORDER BY m.seq
"""
RAW_UNREAD = """
SELECT ru.room_id, GREATEST(r.last_seq - ru.last_read_seq, 0) AS unread
  FROM room_users ru JOIN rooms r ON r.id = ru.room_id
 WHERE ru.user_id = $1
"""
RAW_MARK_READ = """
UPDATE room_users ru SET last_read_seq = GREATEST(ru.last_read_seq, r.last_seq),
       last_read_at = now()
  FROM rooms r
 WHERE ru.room_id = $1 AND ru.user_id = $2 AND r.id = ru.room_id
RETURNING ru.last_read_seq
"""


def raw_ops(pool: asyncpg.Pool, fx: Fixture) -> dict[str, Op]:
    """The same jobs, one statement each, straight on an asyncpg pool."""

    async def send_100(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        return await pool.fetchrow(RAW_SEND, uuid7(), room, fx.user(index), "hello from raw")

    async def send_hot(index: int, rng: random.Random) -> Any:
        return await pool.fetchrow(RAW_SEND, uuid7(), fx.hot_room, fx.user(index), "hello raw")

    async def history(index: int, rng: random.Random) -> Any:
        return await pool.fetch(RAW_HISTORY, fx.history_room, _history_position(fx, rng), PAGE)

    async def catch_up(index: int, rng: random.Random) -> Any:
        seq = _history_position(fx, rng) - PAGE
        return await pool.fetch(RAW_CATCH_UP, fx.history_room, seq, PAGE)

    async def unread(index: int, rng: random.Random) -> Any:
        return await pool.fetch(RAW_UNREAD, fx.user(index))

    async def mark_read(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        return await pool.fetchval(RAW_MARK_READ, room, fx.user(index))

    return {
        "send_100": send_100,
        "send_hot": send_hot,
        "history": history,
        "catch_up": catch_up,
        "unread": unread,
        "mark_read": mark_read,
    }


# -- measuring ------------------------------------------------------------------------------


@dataclass
class Measured:
    """One side of one operation over every round."""

    rates: list[float]
    latencies: list[float]

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def rate(op: Op, concurrency: int, seconds: float, latencies: list[float]) -> float:
    """Calls of ``op`` per second from ``concurrency`` tasks; each call's latency appended."""
    counts = [0] * concurrency
    stop = False
    counting = False
    progressed = asyncio.Event()

    async def worker(index: int) -> None:
        rng = random.Random(index * 7919 + int(time.time()))
        try:
            while not stop:
                began = time.perf_counter()
                await op(index, rng)
                if counting:
                    latencies.append(time.perf_counter() - began)
                counts[index] += 1
                progressed.set()
        finally:
            progressed.set()  # a failed worker wakes the wait below; gather raises its error

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(min(0.5, seconds / 4))  # warm-up (fills caches), not counted
        counting = True
        before = sum(counts)
        start = time.perf_counter()
        progressed.clear()
        await asyncio.sleep(seconds)
        # A loaded machine may finish no call in a short window: wait for the first one
        # rather than report a rate of zero (and divide by it). A worker that failed
        # already (in the warm-up, say) set the event before it was cleared: do not wait
        # for it (that waited forever); the error is raised below.
        if not any(task.done() for task in tasks):
            await progressed.wait()
        done = sum(counts) - before
        elapsed = time.perf_counter() - start
    finally:
        stop = True
        # A call that never returns would hang the run: report where it is stuck instead.
        _, stuck = await asyncio.wait(tasks, timeout=HANG_SECONDS)
        if stuck:
            for task in stuck:
                task.print_stack(file=sys.stderr)
                task.cancel()
            raise SystemExit(
                f"{len(stuck)} call(s) still running {HANG_SECONDS:g} s after the round"
            )
        results = [task.exception() for task in tasks]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return done / elapsed


async def _no_reset(conn: asyncpg.Connection) -> None:
    del conn


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


async def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--pool-size", type=int, default=None, help="connections per side (min(tasks, 20))"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=OPERATIONS, default=None)
    parser.add_argument("--no-sqlalchemy", action="store_true", help="leave SQLAlchemy out")
    parser.add_argument("--tiny", action="store_true", help="a tiny fixture, short rounds")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument(
        "--rooms-per-user",
        type=int,
        default=None,
        help="rooms each user is in (200; issue 12 measures unread at 10, 200 and 1000)",
    )
    args = parser.parse_args()
    # Warnings (a slow call under load) would bury the table; errors still show.
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    sizes = FULL
    if args.tiny:
        sizes, args.seconds, args.rounds = TINY, 0.2, 1
    if args.rooms_per_user is not None:
        # The send rooms, the hot room and the history room are among the user's rooms.
        if args.rooms_per_user < 3:
            parser.error("--rooms-per-user: at least 3")
        sizes = dataclasses.replace(
            sizes,
            rooms_per_user=args.rooms_per_user,
            send_rooms=min(sizes.send_rooms, args.rooms_per_user - 2),
        )
    concurrency = min(args.concurrency, sizes.users) if args.tiny else args.concurrency
    pool_size = args.pool_size or min(concurrency, 20)
    if concurrency < 1 or pool_size < 1:
        parser.error("--concurrency and --pool-size: at least 1")

    url = await database(args.database_url, args.database_name, fresh=args.fresh)
    fx = await build_fixture(url, sizes)
    app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
    settings = Settings(database_url=app_url, redis_url=args.redis_url)
    # No session reset on release: asyncpg's default sends one more round trip per call
    # (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL), which a single statement that
    # changes no session state does not need; the floor is the statement alone.
    raw_pool = await asyncpg.create_pool(
        url,
        min_size=pool_size,
        max_size=pool_size,
        statement_cache_size=100,
        reset=_no_reset,
    )
    engine: Any = None
    try:
        async with (
            Database(settings, min_size=pool_size, max_size=pool_size) as db,
            RedisClient.from_settings(settings) as redis,
        ):
            await redis.redis.flushdb()
            chat = ChatKeep(db, redis, node_id="bench", send_limit=NO_REAL_LIMIT)
            sides: dict[str, dict[str, Op]] = {
                "raw": raw_ops(raw_pool, fx),
                "facade": facade_ops(chat, fx),
            }
            if not args.no_sqlalchemy:
                # Imported here: SQLAlchemy is the optional `bench` extra.
                from _bench_orm import sqlalchemy_ops

                sides["sqlalchemy"], engine = sqlalchemy_ops(url, fx, pool_size)
            version = (await db.health()).server_version.split()[0]
            print(
                f"PostgreSQL {version}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
                f"{concurrency} tasks on pools of {pool_size}, "
                f"{args.rounds} rounds of {args.seconds:g} s per side"
            )
            print(
                "facade: ChatKeep as chatapp_app (row security) with Redis; raw: asyncpg, "
                "one statement, superuser; SQLAlchemy: 2.x async ORM, superuser"
            )
            print(
                "ops/s: the median round; ratios: the median of per-round ratios; "
                "p50/p99: single calls, ms"
            )
            header = (
                f"{'operation':<30} {'raw ops/s':>10} {'facade ops/s':>13} {'SQLA ops/s':>11}"
                f" {'facade/raw':>11} {'facade/SQLA':>12}"
                f"  {'p50/p99 raw':>13} {'p50/p99 facade':>15} {'p50/p99 SQLA':>14}"
            )
            print(header)
            for name in args.only or OPERATIONS:
                measured = {side: Measured([], []) for side in sides}
                vs_raw: list[float] = []
                vs_orm: list[float] = []
                order = list(sides)
                for round_ in range(args.rounds):
                    shift = round_ % len(order)  # rotate: no side always runs first
                    for side in order[shift:] + order[:shift]:
                        got = await rate(
                            sides[side][name], concurrency, args.seconds, measured[side].latencies
                        )
                        measured[side].rates.append(got)
                    facade_rate = measured["facade"].rates[-1]
                    vs_raw.append(facade_rate / measured["raw"].rates[-1])
                    if "sqlalchemy" in measured:
                        vs_orm.append(facade_rate / measured["sqlalchemy"].rates[-1])
                label = LABELS[name].format(rooms=sizes.rooms_per_user)

                def cell(side: str, m: dict[str, Measured] = measured) -> tuple[str, str]:
                    if side not in m:
                        return "-", "-"
                    found = m[side]
                    return (
                        f"{statistics.median(found.rates):,.0f}",
                        f"{found.percentile(0.5):.1f}/{found.percentile(0.99):.1f}",
                    )

                (raw_r, raw_l), (fac_r, fac_l), (orm_r, orm_l) = (
                    cell("raw"),
                    cell("facade"),
                    cell("sqlalchemy"),
                )
                print(
                    f"{label:<30} {raw_r:>10} {fac_r:>13} {orm_r:>11}"
                    f" {_ratio(vs_raw):>11} {_ratio(vs_orm):>12}"
                    f"  {raw_l:>13} {fac_l:>15} {orm_l:>14}",
                    flush=True,
                )
    finally:
        await raw_pool.close()
        if engine is not None:
            await engine.dispose()
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
