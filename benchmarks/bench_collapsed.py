"""The collapsed view (roots only) with and without migration 021's roots index.

``ChatKeep.collapsed_history`` pages a room's roots (messages that are not replies). Without
``messages_room_roots_idx (room_id, seq) WHERE reply_to IS NULL`` a page walks the room's
``(room_id, seq)`` key and skips the replies in between; behind one long thread it reads
every reply of it. This script measures pages of 50 roots as ``chatapp_app`` acting as a
member (row security on): the server's execution time (``EXPLAIN ANALYZE``, median of 7
per case), in rounds that drop the index (``DROP INDEX CONCURRENTLY``) and build it again
(``CREATE INDEX CONCURRENTLY``, timed), so both sides come from one run.

The database (``--database-name``, by default ``chatkeep_bench_collapsed_h5``) is built
once with ``generate_series`` (triggers off, as ``chatkeep seed`` writes with COPY) and
kept for the next run: a room of 1,000,000 messages where one in 20 is a root (chatty
threads), one of 1,000,000 where one in 5 is a reply, 98 rooms of 30,612 like it, and one
of 200,101 where a single root has 200,000 replies: 5,200,101 messages in all.

Run (PostgreSQL on this machine; the chatapp_* roles must exist, or the script makes them)::

    python benchmarks/bench_collapsed.py --database-url postgresql://root@127.0.0.1:5432/postgres

``--tiny`` (about 9,000 messages) runs in seconds; ``tests/test_benchmarks.py`` runs it.
Figures only: no timed assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from bench_storage import bench_database

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.threads import COLLAPSED_AFTER, COLLAPSED_BEFORE

BENCH_DB = "chatkeep_bench_collapsed_h5"
INDEX = "messages_room_roots_idx"
CREATE_INDEX = (
    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON messages (room_id, seq)"
    " WHERE reply_to IS NULL"
)
PAGE = 50
LOADAVG = Path("/proc/loadavg")
MEMBERS = 50


@dataclass(frozen=True)
class Size:
    chatty: int  # messages of the room where one in 20 is a root
    typical: int  # messages of the room where one in 5 is a reply
    fillers: int  # more rooms like the typical one
    filler: int  # messages of each
    thread: int  # replies of the long thread (its room has 50 roots before and after)
    rounds: int


FULL = Size(
    chatty=1_000_000, typical=1_000_000, fillers=98, filler=30_612, thread=200_000, rounds=2
)
TINY = Size(chatty=2000, typical=2000, fillers=3, filler=500, thread=2000, rounds=1)


def room_id(n: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_OID, f"chatkeep-bench-collapsed-room-{n}")


def user_id(n: int) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_OID, f"chatkeep-bench-collapsed-user-{n}")


# Rooms 1 (chatty), 2 (typical), 3.. (fillers), and LONG (the long thread). Message ids are
# md5 of room and seq, so a reply can name its root's id without a lookup.
LONG = 0
FILL = """
INSERT INTO messages (id, room_id, user_id, seq, content, type, created_at, reply_to)
SELECT md5($1::uuid::text || ':' || s)::uuid, $1::uuid,
       ($3::uuid[])[1 + s % cardinality($3::uuid[])], s,
       'message number ' || s, 'text', now() - interval '1 second' * ($2::bigint - s),
       CASE WHEN {root} THEN NULL ELSE md5($1::uuid::text || ':' || ({root_of}))::uuid END
  FROM generate_series(1, $2::bigint) AS s
"""
# One root in k: seq 1, k + 1, 2k + 1, ...; a reply names the root before it.
EVERY_K = FILL.format(root="(s - 1) % $4::int = 0", root_of="s - (s - 1) % $4::int")
# Four in five are roots: the fifth message of each five replies to the first.
ONE_IN_FIVE = FILL.format(root="s % 5 <> 0", root_of="s - 4")
# 50 roots, then the thread's root (seq 51) and its replies, then 50 roots.
LONG_THREAD = FILL.format(root="s <= 51 OR s > $2::bigint - 50", root_of="51")


async def build(url: str, size: Size) -> int:
    """Fill the database once (kept for later runs); returns how many messages it holds."""
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetchval("SELECT count(*) FROM rooms WHERE id = $1", room_id(1))
        if found:
            return int(await conn.fetchval("SELECT count(*) FROM messages"))
        users = [user_id(n) for n in range(MEMBERS)]
        rooms = [LONG, 1, 2, *range(3, 3 + size.fillers)]
        hashed = "$2b$12$" + "a" * 53  # nobody logs in
        async with conn.transaction():
            # Triggers off, as a COPY seed writes: seq, threads and the log are set here.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.executemany(
                "INSERT INTO users (id, username, email, password_hash) VALUES ($1, $2, $3, $4)",
                [(u, f"cbench{n}", f"cbench{n}@example.org", hashed) for n, u in enumerate(users)],
            )
            await conn.executemany(
                "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, $2, 'public', $3)",
                [(room_id(r), f"collapsed {r}", users[0]) for r in rooms],
            )
            await conn.executemany(
                "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, $3)",
                [
                    (room_id(r), u, "owner" if n == 0 else "member")
                    for r in rooms
                    for n, u in enumerate(users)
                ],
            )
            await conn.execute(EVERY_K, room_id(1), size.chatty, users, 20)
            await conn.execute(ONE_IN_FIVE, room_id(2), size.typical, users)
            for r in range(3, 3 + size.fillers):
                await conn.execute(ONE_IN_FIVE, room_id(r), size.filler, users)
            await conn.execute(LONG_THREAD, room_id(LONG), size.thread + 101, users)
            await conn.execute(
                "UPDATE rooms r SET last_seq = m.last FROM"
                " (SELECT room_id, max(seq) AS last FROM messages GROUP BY room_id) m"
                " WHERE m.room_id = r.id"
            )
            await conn.execute(
                "INSERT INTO threads (root_id, room_id, root_seq, reply_count, last_reply_seq,"
                " last_reply_at)"
                " SELECT m.reply_to, m.room_id, r.seq, count(*), max(m.seq), max(m.created_at)"
                "   FROM messages m JOIN messages r ON r.id = m.reply_to"
                "  WHERE m.reply_to IS NOT NULL GROUP BY m.reply_to, m.room_id, r.seq"
            )
        await conn.execute("VACUUM ANALYZE messages")
        await conn.execute("VACUUM ANALYZE threads")
        return int(await conn.fetchval("SELECT count(*) FROM messages"))
    finally:
        await conn.close()


def cases(size: Size) -> list[tuple[str, uuid.UUID, str, int]]:
    thread = f"behind a {size.thread:,}-reply thread"
    return [
        ("chatty room (1 root in 20), newest page", room_id(1), COLLAPSED_BEFORE, size.chatty + 1),
        ("chatty room, a middle page", room_id(1), COLLAPSED_BEFORE, size.chatty // 2),
        ("typical room, newest page", room_id(2), COLLAPSED_BEFORE, size.typical + 1),
        (f"{thread}, page before", room_id(LONG), COLLAPSED_BEFORE, size.thread + 52),
        (f"{thread}, page after", room_id(LONG), COLLAPSED_AFTER, 51),
    ]


async def measure(app: asyncpg.Connection, size: Size) -> dict[str, float]:
    """Each case's median server time (ms) as a member, under row security."""
    found: dict[str, float] = {}
    for name, room, statement, seq in cases(size):
        times = []
        for _ in range(7):
            async with app.transaction():
                await app.execute("SELECT set_config('app.user_id', $1, true)", str(user_id(1)))
                plan = await app.fetch(f"EXPLAIN (ANALYZE) {statement}", room, seq, PAGE)
            matched = re.search(r"Execution Time: ([\d.]+)", plan[-1][0])
            assert matched is not None, plan[-1][0]
            times.append(float(matched.group(1)))
        found[name] = statistics.median(times)
    return found


def load_average() -> str:
    """The machine's load, printed with the figures: they mean little on a busy machine."""
    return LOADAVG.read_text().strip() if LOADAVG.exists() else "unknown"


async def run(url: str, app_url: str, size: Size) -> None:
    owner = await asyncpg.connect(url)
    app = await asyncpg.connect(app_url)
    try:
        without: list[dict[str, float]] = []
        with_index: list[dict[str, float]] = []
        builds: list[float] = []
        for _ in range(size.rounds):
            await owner.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
            without.append(await measure(app, size))
            started = time.perf_counter()
            await owner.execute(CREATE_INDEX)
            builds.append(time.perf_counter() - started)
            with_index.append(await measure(app, size))
        index_size = await owner.fetchval(
            "SELECT pg_size_pretty(pg_relation_size($1::regclass))", INDEX
        )
        print(
            "index build (CREATE INDEX CONCURRENTLY): "
            + ", ".join(f"{s:.1f} s" for s in builds)
            + f"; size {index_size}"
        )
        print(f"page of {PAGE} roots, server ms (median of 7), per round: without | with")
        for name, *_ in cases(size):
            before = " / ".join(f"{r[name]:.2f}" for r in without)
            after = " / ".join(f"{r[name]:.2f}" for r in with_index)
            print(f"  {name:52} {before:>18} | {after}")
        print(f"load average: {load_average()}")
    finally:
        await app.close()
        await owner.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True, help="a superuser URL to the server")
    parser.add_argument("--database-name", default=BENCH_DB)
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument("--app-password", default=None, help="chatapp_app's password, if any")
    args = parser.parse_args()
    size = TINY if args.tiny else FULL

    admin = await asyncpg.connect(maintenance_url(args.database_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()
    url = await bench_database(args.database_url, args.database_name, False)
    try:
        conn = await asyncpg.connect(url)
        try:
            await prepare_database(conn)
            await Migrator(conn).up()
        finally:
            await conn.close()
        total = await build(url, size)
        print(f"messages: {total:,}")
        await run(url, urls.with_user(url, "chatapp_app", args.app_password or None), size)
    finally:
        if args.drop:
            admin = await asyncpg.connect(maintenance_url(args.database_url))
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{args.database_name}" WITH (FORCE)')
            finally:
                await admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
