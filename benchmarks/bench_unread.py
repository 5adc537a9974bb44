"""Unread badges (issue 14): one call per user, for every room, at 5,000,000 messages.

A user in 500 private rooms (created by someone else, so no policy shortcut applies),
10,000 messages in each (5,000,000 in all), some of them thread replies and mentions of the
user, with read watermarks spread over the rooms. Each call is a repository call on a pool
connected as ``chatapp_app`` (row security on), one call at a time, so the percentiles are
latencies:

* badges: ``ThreadRepository.badges`` -- unread, mentions, unread threads and thread
  mentions per room, one statement (``chatkeep_badges``);
* baseline: ``MessageRepository.unread_counts`` -- the plain unread subtraction, measured in
  the same run, alternating call by call with badges;
* the same two in one round trip, outside any transaction, as the facade calls them since
  migration 020 (``as_user=``: ``chatkeep_unread`` acts as the user for its own statement).
  The target is judged on ``badges, one round trip`` (on ``badges, in a transaction``
  before 020).

The issue's target: badges p50 < 5 ms and p99 < 20 ms on this machine. The answer is
checked once against a direct count over the data, as a superuser.

The dataset is built once with ``generate_series`` in its own database (default
``chatkeep_bench_h4_unread``) and reused by later runs (``--fresh`` rebuilds it). Run::

    python benchmarks/bench_unread.py --database-url postgresql://root@127.0.0.1:5432/postgres

``--tiny`` builds 20 rooms of 200 messages (database ``chatkeep_bench_h4_unread_tiny``) and
makes 40 calls: seconds, for the test that keeps the script working. ``--drop`` drops the
database at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.threads import ThreadRepository

BENCH_DB = "chatkeep_bench_h4_unread"
NO_PASSWORD = "$2b$10$" + "b" * 53
P50_TARGET_MS = 5.0
P99_TARGET_MS = 20.0
THREADS_PER_ROOM = 3
REPLIES_PER_THREAD = 5
MENTIONS_PER_ROOM = 4


async def bench_database(server_url: str, name: str, fresh: bool) -> str:
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and fresh:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = False
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return maintenance_url(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def build(conn: asyncpg.Connection, rooms: int, per_room: int) -> uuid.UUID:
    """The dataset (once): returns the badge user's id."""
    user = await conn.fetchval("SELECT id FROM users WHERE username = 'badge_user'")
    if user is not None:
        return uuid.UUID(str(user))
    started = time.perf_counter()
    user, poster = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO users (id, email, username, password_hash)"
        " VALUES ($1, 'badge@example.org', 'badge_user', $3),"
        "        ($2, 'poster@example.org', 'badge_poster', $3)",
        user,
        poster,
        NO_PASSWORD,
    )
    await conn.execute(
        """
        INSERT INTO rooms (id, name, type, created_by)
        SELECT gen_random_uuid(), 'badge room ' || to_char(g, 'FM00000'), 'private', $1
          FROM generate_series(1, $2::int) AS g
        """,
        poster,
        rooms,
    )
    # Watermarks spread over the rooms: some read up to date, most some way behind.
    await conn.execute(
        """
        INSERT INTO room_users (room_id, user_id, role, last_read_seq)
        SELECT r.id, u.id, 'member',
               CASE WHEN u.id = $1 THEN (abs(hashtext(r.id::text)) % $2) ELSE 0 END
          FROM rooms r CROSS JOIN users u
         WHERE r.name LIKE 'badge room %'
        """,
        user,
        per_room,
    )
    # The bulk: plain messages with explicit seqs (no '@', no reply: the 015 triggers'
    # WHEN clauses skip them), in the rooms' seq order.
    await conn.execute(
        """
        INSERT INTO messages (id, room_id, user_id, seq, content, created_at)
        SELECT gen_random_uuid(), r.id, $1, g,
               'message number ' || g || ' in a room with some ordinary text',
               now() - make_interval(secs => $2::int - g)
          FROM rooms r CROSS JOIN generate_series(1, $2::int) AS g
         WHERE r.name LIKE 'badge room %'
        """,
        poster,
        per_room,
    )
    # Threads and mentions through the triggers: the badge user writes a few roots in each
    # room (so follows them), the poster replies, and mentions the user now and then.
    extra = THREADS_PER_ROOM * (1 + REPLIES_PER_THREAD) + MENTIONS_PER_ROOM
    await conn.execute(
        """
        INSERT INTO messages (id, room_id, user_id, seq, content)
        SELECT gen_random_uuid(), r.id, $1, $2::bigint + t, 'a thread root ' || t
          FROM rooms r CROSS JOIN generate_series(1, $3::int) AS t
         WHERE r.name LIKE 'badge room %'
        """,
        user,
        per_room,
        THREADS_PER_ROOM,
    )
    await conn.execute(
        """
        INSERT INTO messages (id, room_id, user_id, seq, content, reply_to)
        SELECT gen_random_uuid(), m.room_id, $1,
               $2::bigint + $3::int + (m.seq - $2::bigint - 1) * $4::int + k,
               CASE WHEN k = $4 THEN 'thanks @badge_user' ELSE 'a reply ' || k END, m.id
          FROM messages m CROSS JOIN generate_series(1, $4::int) AS k
         WHERE m.user_id = $5 AND m.seq > $2::bigint
         ORDER BY 4
        """,
        poster,
        per_room,
        THREADS_PER_ROOM,
        REPLIES_PER_THREAD,
        user,
    )
    await conn.execute(
        """
        INSERT INTO messages (id, room_id, user_id, seq, content)
        SELECT gen_random_uuid(), r.id, $1, $2::bigint + k, '@badge_user have a look ' || k
          FROM rooms r CROSS JOIN generate_series(1, $3::int) AS k
         WHERE r.name LIKE 'badge room %'
        """,
        poster,
        per_room + THREADS_PER_ROOM * (1 + REPLIES_PER_THREAD),
        MENTIONS_PER_ROOM,
    )
    await conn.execute(
        "UPDATE rooms SET last_seq = $1 WHERE name LIKE 'badge room %'", per_room + extra
    )
    # Half the followed threads read up to date.
    await conn.execute(
        """
        UPDATE thread_followers f SET last_read_seq = t.last_reply_seq
          FROM threads t
         WHERE t.root_id = f.root_id AND f.user_id = $1 AND t.root_seq % 2 = 0
        """,
        user,
    )
    await conn.execute("VACUUM ANALYZE")
    print(f"built the dataset in {time.perf_counter() - started:.0f} s", flush=True)
    return user


# The same answer, counted the slow way, as a superuser.
CHECK = """
SELECT ru.room_id,
       r.last_seq - ru.last_read_seq AS unread,
       (SELECT count(*) FROM message_mentions mm
         WHERE mm.room_id = ru.room_id AND mm.seq > ru.last_read_seq
           AND (mm.user_id = $1 OR (mm.user_id IS NULL AND mm.author_id <> $1))) AS mentions,
       (SELECT count(*) FROM thread_followers f
         WHERE f.room_id = ru.room_id AND f.user_id = $1 AND f.following
           AND EXISTS (SELECT 1 FROM messages m
                        WHERE m.reply_to = f.root_id AND m.seq > f.last_read_seq))
         AS unread_threads,
       (SELECT count(*) FROM thread_followers f
          JOIN message_mentions mm ON mm.root_id = f.root_id AND mm.user_id = f.user_id
         WHERE f.room_id = ru.room_id AND f.user_id = $1 AND f.following
           AND mm.seq > f.last_read_seq) AS thread_mentions
  FROM room_users ru JOIN rooms r ON r.id = ru.room_id
 WHERE ru.user_id = $1
"""


async def one_round_trip_available(app: Database) -> bool:
    """Whether the schema has chatkeep_unread (migration 020)."""
    found = await app.fetchval(
        "bench.has_unread", "SELECT to_regprocedure('chatkeep_unread(uuid)') IS NOT NULL"
    )
    return bool(found)


def load_average() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"),
        help="a superuser URL of the server; the benchmark uses its own database there",
    )
    parser.add_argument("--database-name", default=None)
    parser.add_argument("--rooms", type=int, default=500)
    parser.add_argument("--messages-per-room", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run")
    parser.add_argument("--fresh", action="store_true", help="rebuild the dataset")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() the heap before measuring, as a tuned application does after startup",
    )
    args = parser.parse_args()
    if args.tiny:
        args.rooms, args.messages_per_room, args.calls = 20, 200, 40
    if args.gc_freeze:
        # The p99 of a call that builds 500 rows is otherwise a full collection of every
        # object the imports made (about 60,000, 30 ms on this machine), not the database.
        gc.freeze()
    name = args.database_name or (BENCH_DB + ("_tiny" if args.tiny else ""))

    url = await bench_database(args.database_url, name, args.fresh)
    try:
        return await run(args, url)
    finally:
        if args.drop:
            await drop_database(args.database_url, name)


async def run(args: argparse.Namespace, url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        await prepare_database(conn)
        await Migrator(conn).up()
        user = await build(conn, args.rooms, args.messages_per_room)
        # A migration run on a dataset built before it (020 fills its counters) leaves
        # updated rows whose pages the visibility map no longer covers: index-only scans
        # would visit the heap until autovacuum comes by. The small tables only.
        await conn.execute("VACUUM (ANALYZE) room_users, thread_followers, rooms")
        total = await conn.fetchval("SELECT count(*) FROM messages")
        expected = {r["room_id"]: r for r in await conn.fetch(CHECK, user)}
    finally:
        await conn.close()

    settings = Settings(database_url=url, pool_min_size=1)
    app = Database(settings, dsn=urls.with_user(url, "chatapp_app", None), max_size=2)
    async with app:
        threads, messages = ThreadRepository(app), MessageRepository(app)
        async with app.acting_as(user):
            role = await app.fetchval("bench.role", "SELECT current_user")
            got = await threads.badges(user)
        if role != "chatapp_app":
            raise SystemExit(f"not measuring through row security: connected as {role}")
        wrong = [
            room
            for room, want in expected.items()
            if (
                got[room].unread,
                got[room].mentions,
                got[room].unread_threads,
                got[room].thread_mentions,
            )
            != (want["unread"], want["mentions"], want["unread_threads"], want["thread_mentions"])
        ]
        if wrong or len(got) != len(expected):
            print(f"WRONG badges for {len(wrong)} of {len(expected)} rooms", file=sys.stderr)
            return 1

        async def in_transaction_badges() -> object:
            async with app.acting_as(user):
                return await threads.badges(user)

        async def in_transaction_unread() -> object:
            async with app.acting_as(user):
                return await messages.unread_counts(user)

        async def one_statement_badges() -> object:
            return await threads.badges(user, as_user=user)

        async def one_statement_unread() -> object:
            return await messages.unread_counts(user, as_user=user)

        # What the facade does (migration 020): one statement, no transaction around it.
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "unread_counts (baseline)": in_transaction_unread,
            "badges, in a transaction": in_transaction_badges,
            "badges, one round trip": one_statement_badges,
            "unread_counts, one round trip": one_statement_unread,
        }
        if not await one_round_trip_available(app):
            del calls["badges, one round trip"], calls["unread_counts, one round trip"]
        timings: dict[str, list[float]] = {label: [] for label in calls}
        for _ in range(min(20, args.calls)):  # warm the pool's plans
            for call in calls.values():
                await call()
        labels = list(calls)
        for i in range(args.calls):
            shift = i % len(labels)  # each call leads in turn
            for label in labels[shift:] + labels[:shift]:
                started = time.perf_counter()
                await calls[label]()
                timings[label].append((time.perf_counter() - started) * 1000)

    sums = {
        k: sum(getattr(v, k) for v in got.values())
        for k in ("unread", "mentions", "unread_threads", "thread_mentions")
    }
    print(
        f"{len(got)} rooms, {total:,} messages in the database; {args.calls} calls each, "
        f"as chatapp_app; the user's totals: {sums}; load average {load_average()}"
    )
    print(f"{'call':<34} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for label, values in timings.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"{label:<34} {p50:>8.2f} {p99:>8.2f} {statistics.mean(values):>8.2f}")
    badge = timings.get("badges, one round trip") or timings["badges, in a transaction"]
    base = timings["unread_counts (baseline)"]
    b50, b99 = percentile(badge, 0.5), percentile(badge, 0.99)
    u50, u99 = percentile(base, 0.5), percentile(base, 0.99)
    print(f"ratio badges/baseline: p50 {b50 / u50:.2f}x, p99 {b99 / u99:.2f}x")
    met = b50 < P50_TARGET_MS and b99 < P99_TARGET_MS
    print(
        f"target p50 < {P50_TARGET_MS:g} ms, p99 < {P99_TARGET_MS:g} ms: "
        + ("met" if met else "NOT met")
    )
    return 0 if met or args.tiny else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
