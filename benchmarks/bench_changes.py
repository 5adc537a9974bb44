"""What the room change log costs a send, and what a catch-up of 1,000 changes takes.

In one run, on two databases of one server with the same fixture (the storage benchmark's:
20 users, all in 200 public rooms), both as ``chatapp_app`` with row security on:

* send: ``async with db.acting_as(user):`` one guarded ``INSERT`` into the task's own room
  (``PLAIN_SEND``: the statement the repository sent when the log came; today's sends go
  through 014's function, which a database at 011 lacks), at ``--concurrency`` tasks (20), for
  ``--seconds`` per side and round, on the database migrated to the full schema (with the
  log: migration 012) and on one migrated to 011 (today's path, without it). Rounds
  alternate which side goes first; the ratio printed is the median of the back-to-back
  pairs' ratios. The target is >= 0.9.
* catch-up: one client reading 1,000 changes of one room with ``changes(after=p)`` (one
  page of 1,000, then pages of 100), against reading the same 1,000 messages by the
  older path (``history(after_seq=...)``, pages of 200): milliseconds per 1,000, the median
  of ``--repeat`` reads.

Run (PostgreSQL 15 here; the chatapp_* roles must exist: ``chatkeep setup`` once)::

    python benchmarks/bench_changes.py --database-url postgresql://root@127.0.0.1:5432/postgres

The URL names a server and a superuser; the script works in its own databases
(``chatkeep_bench_log`` and ``chatkeep_bench_nolog``) and connects to them as
``chatapp_app`` without a password (``--app-password`` otherwise); ``--database-name P``
names them ``P_log`` and ``P_nolog`` instead, and ``--drop`` drops them at the end.
``--tiny`` runs one short round at 4 tasks and a catch-up of 100 changes, without judging
the ratio, so a test or CI can run the whole script in seconds (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

sys.path.insert(0, os.path.dirname(__file__))

from bench_security import as_role, prepare
from bench_storage import Fixture, rate

from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import maintenance_url
from chatkeep.storage.changes import ChangeRepository

TARGET = 0.9
WITHOUT_LOG = 11  # the schema before the change log
CATCH_UP = 1000

Op = Callable[[int, random.Random], Awaitable[Any]]


# The send both schemas can run: the repository's own statement needs what later
# migrations added (013-016), so the comparison sends this one on both sides, in the
# acting user's transaction, and what differs is the log's trigger work.
PLAIN_SEND = """
INSERT INTO messages (id, room_id, user_id, content, type)
SELECT $1, $2, $3, $4, 'text'
 WHERE EXISTS (SELECT 1 FROM rooms WHERE id = $2 AND is_active)
   AND EXISTS (SELECT 1 FROM room_users WHERE room_id = $2 AND user_id = $3)
RETURNING seq
"""


def send_op(db: Database, fx: Fixture) -> Op:
    async def send(index: int, rng: random.Random) -> Any:
        user = fx.users[index % len(fx.users)]
        room = fx.rooms[index % len(fx.rooms)]
        async with db.acting_as(user):
            return await db.fetchval("bench.send", PLAIN_SEND, uuid7(), room, user, "benchmark")

    return send


async def timed(read: Callable[[], Awaitable[int]], repeat: int) -> tuple[float, int]:
    """Median milliseconds of ``read`` over ``repeat`` runs, and what it returned."""
    times: list[float] = []
    count = 0
    for _ in range(repeat):
        start = time.perf_counter()
        count = await read()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), count


async def catch_up(db: Database, fx: Fixture, repeat: int, count: int = CATCH_UP) -> None:
    messages, log = MessageRepository(db), ChangeRepository(db)
    user, room = fx.users[0], fx.rooms[0]
    async with db.acting_as(user):
        position = await log.position(room)
        seq = (await messages.history(room, limit=1)).items[-1].seq
    for n in range(count):
        async with db.acting_as(user):
            await messages.send(CreateMessageDto(room_id=room, user_id=user, content=f"c {n}"))

    def changes(limit: int) -> Callable[[], Awaitable[int]]:
        async def read() -> int:
            got, after = 0, position
            async with db.acting_as(user):
                while got < count:
                    page = await log.changes(room, after=after, limit=limit)
                    got += len(page.items)
                    if page.next_after is None:
                        break
                    after = page.next_after
            return got

        return read

    async def history() -> int:
        got, after = 0, seq
        async with db.acting_as(user):
            while got < count:
                page = await messages.history(room, after_seq=after, limit=200)
                got += len(page.items)
                after = page.items[-1].seq
        return got

    print(f"catch-up of {count:,} (one client, median of {repeat}):")
    for name, read in (
        (f"changes(), 1 page of {count:,}", changes(count)),
        ("changes(), pages of 100", changes(100)),
        ("history(after_seq), pages of 200", history),
    ):
        ms, items = await timed(read, repeat)
        print(f"  {name:<34} {ms:>8.1f} ms  ({items:,} items)", flush=True)


async def commit_mode(url: str, *, synchronous: bool) -> None:
    """The database's default synchronous_commit, for the sessions opened after this."""
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        setting = "RESET synchronous_commit" if synchronous else "SET synchronous_commit = off"
        await conn.execute(f'ALTER DATABASE "{name}" {setting}')
    finally:
        await conn.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"),
        help="a superuser URL of the server; the benchmark uses its own databases there",
    )
    parser.add_argument("--app-password", default=None, help="chatapp_app's password, if any")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=9, help="catch-up reads to time")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the databases")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="set synchronous_commit off in both databases (on again without the flag): "
        "on a machine whose commits wait on a slow disk, that wait hides the log's cost",
    )
    parser.add_argument(
        "--database-name", default="chatkeep_bench", help="the databases' prefix (P_log, P_nolog)"
    )
    parser.add_argument("--drop", action="store_true", help="drop both databases at the end")
    parser.add_argument(
        "--tiny", action="store_true", help="one short round at 4 tasks, no verdict (seconds)"
    )
    args = parser.parse_args()
    count = CATCH_UP
    if args.tiny:
        args.rounds, args.seconds, args.repeat, count = 1, 0.2, 1, 100
        args.concurrency = min(args.concurrency, 4)
    names = (f"{args.database_name}_log", f"{args.database_name}_nolog")

    with_url, fixture, _, schema = await prepare(args.database_url, names[0], args.fresh, None, ())
    without_url, other, _, old_schema = await prepare(
        args.database_url, names[1], args.fresh, WITHOUT_LOG, ()
    )
    for url in (with_url, without_url):
        await commit_mode(url, synchronous=not args.async_commit)
    settings = Settings(database_url=with_url, pool_min_size=args.concurrency)
    size = max(args.concurrency, settings.pool_max_size)
    logged = Database(
        settings, dsn=as_role(with_url, "chatapp_app", args.app_password), max_size=size
    )
    unlogged = Database(
        settings, dsn=as_role(without_url, "chatapp_app", args.app_password), max_size=size
    )
    async with logged, unlogged:
        version = (await logged.health()).server_version.split()[0]
        print(
            f"PostgreSQL {version}, schema {schema} (log) vs {old_schema} (no log), "
            f"{os.cpu_count()} CPUs, {args.concurrency} tasks, "
            f"{args.rounds} rounds of {args.seconds:g} s per side"
            + (", synchronous_commit off" if args.async_commit else "")
        )
        sides = {"log": send_op(logged, fixture), "no log": send_op(unlogged, other)}
        rates: dict[str, list[float]] = {side: [] for side in sides}
        ratios: list[float] = []
        for round_ in range(args.rounds):
            order = list(sides.items())
            if round_ % 2:
                order.reverse()  # neither side always runs on a warmer server
            measured = {side: await rate(op, args.concurrency, args.seconds) for side, op in order}
            for side, value in measured.items():
                rates[side].append(value)
            ratios.append(measured["log"] / measured["no log"])
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio >= TARGET else f"BELOW {TARGET}"
        print(
            f"send/s: with the log {statistics.median(rates['log']):,.0f}, without "
            f"{statistics.median(rates['no log']):,.0f}, ratio {ratio:.2f}  {verdict}",
            flush=True,
        )
        await catch_up(logged, fixture, args.repeat, count)
    if args.drop:
        admin = await asyncpg.connect(maintenance_url(args.database_url))
        try:
            for name in names:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    # A tiny run measures too little to judge: it only shows the script still works.
    return 0 if ratio >= TARGET or args.tiny else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
