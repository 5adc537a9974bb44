"""What row-level security costs: the same chatkeep calls as chatapp_app and as a superuser.

In one run, on one database migrated to the full schema (roles, policies, audit), at
``--concurrency`` tasks (20), for ``--seconds`` per side and round:

* history: a page of 50 with authors at a random depth of a 10,000-message room;
* unread: the unread counts of a user who is in 201 rooms.

Each call is ``async with db.acting_as(user): <repository call>``, the path every facade flow
takes. The *policy* ratio compares that path on a pool connected as ``chatapp_app`` (row
security filters every statement) with the same path on a pool connected as a superuser
(which bypasses row security): the issue's target is within 10% (ratio >= 0.9). The
*end-to-end* column compares ``chatapp_app`` with the superuser making the bare call with no
transaction at all, for information: that gap is the acting user's transaction (BEGIN,
``set_config``, COMMIT), not the policies.

Run (PostgreSQL 15 here; the chatapp_* roles must exist: ``chatkeep setup`` once)::

    python benchmarks/bench_security.py --database-url postgresql://root@127.0.0.1:5432/postgres

The URL names a server and a superuser; the script works in its own database
(``chatkeep_bench_rls``) and connects to it as ``chatapp_app`` without a password, so the
server must trust local connections (as test servers do) or the URL must carry the app
role's password in ``--app-password``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator

sys.path.insert(0, os.path.dirname(__file__))
from bench_storage import HISTORY_MESSAGES, Fixture, bench_database, build_fixture, rate

BENCH_DB = "chatkeep_bench_rls"
TARGET = 0.9

Op = Callable[[int, random.Random], Awaitable[Any]]


def as_role(url: str, role: str, password: str | None) -> str:
    return urls.with_user(url, role, password or None)


async def prepare(server_url: str, fresh: bool) -> tuple[str, Fixture]:
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()
    url = await bench_database(server_url, BENCH_DB, fresh)
    conn = await asyncpg.connect(url)
    try:
        await prepare_database(conn)
        await Migrator(conn).up()
        fixture = await build_fixture(conn)
        # The steady state autovacuum keeps a live database in: visibility maps set, so
        # the membership look-up of every policy is an index-only scan. Right after the
        # COPY it would visit the heap too, and the ratio would measure that instead.
        await conn.execute("VACUUM ANALYZE room_users, rooms, messages, users")
    finally:
        await conn.close()
    return url, fixture


def ops(messages: MessageRepository, fx: Fixture, *, acting: bool) -> dict[str, Op]:
    db = messages.db

    async def history(index: int, rng: random.Random) -> Any:
        user = fx.users[index % len(fx.users)]
        seq = rng.randint(100, HISTORY_MESSAGES)
        if not acting:
            return await messages.history(fx.history_room, before_seq=seq, limit=50)
        async with db.acting_as(user):
            return await messages.history(fx.history_room, before_seq=seq, limit=50)

    async def unread(index: int, rng: random.Random) -> Any:
        user = fx.users[index % len(fx.users)]
        if not acting:
            return await messages.unread_counts(user)
        async with db.acting_as(user):
            return await messages.unread_counts(user)

    return {"history": history, "unread": unread}


async def check_rls(app: Database, fx: Fixture) -> None:
    """The app pool really is filtered: without an acting user it sees no messages."""
    role = await app.fetchval("bench.role", "SELECT current_user")
    hidden = await app.fetchval("bench.check", "SELECT count(*) FROM messages")
    async with app.acting_as(fx.users[0]):
        shown = await app.fetchval("bench.check", "SELECT count(*) FROM messages")
    if role != "chatapp_app" or hidden != 0 or shown < HISTORY_MESSAGES:
        raise SystemExit(f"row security is not in force: {role=} {hidden=} {shown=}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"),
        help="a superuser URL of the server; the benchmark uses its own database there",
    )
    parser.add_argument("--app-password", default=None, help="chatapp_app's password, if any")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    args = parser.parse_args()

    url, fixture = await prepare(args.database_url, args.fresh)
    settings = Settings(database_url=url, pool_min_size=args.concurrency)
    size = max(args.concurrency, settings.pool_max_size)
    superuser = Database(settings, max_size=size)
    app = Database(settings, dsn=as_role(url, "chatapp_app", args.app_password), max_size=size)
    async with superuser, app:
        await check_rls(app, fixture)
        filtered = ops(MessageRepository(app), fixture, acting=True)
        unfiltered = ops(MessageRepository(superuser), fixture, acting=True)
        bare = ops(MessageRepository(superuser), fixture, acting=False)
        version = (await superuser.health()).server_version.split()[0]
        print(
            f"PostgreSQL {version}, {os.cpu_count()} CPUs, {args.concurrency} tasks, "
            f"{args.rounds} rounds of {args.seconds:g} s per side"
        )
        print("calls/s: the median round; ratios: the median of back-to-back rounds")
        print(
            f"{'operation':<9} {'superuser':>10} {'chatapp_app':>12} {'policy ratio':>13}"
            f" {'bare superuser':>15} {'end-to-end':>11}"
        )
        failed = False
        for name in ("history", "unread"):
            rates: dict[str, list[float]] = {"super": [], "app": [], "bare": []}
            policy: list[float] = []
            whole: list[float] = []
            for round_ in range(args.rounds):
                sides = [("super", unfiltered), ("app", filtered), ("bare", bare)]
                if round_ % 2:
                    sides.reverse()  # neither side always runs on a warmer server
                measured = {
                    side: await rate(table[name], args.concurrency, args.seconds)
                    for side, table in sides
                }
                for side, value in measured.items():
                    rates[side].append(value)
                policy.append(measured["app"] / measured["super"])
                whole.append(measured["app"] / measured["bare"])
            ratio = statistics.median(policy)
            failed = failed or ratio < TARGET
            verdict = "ok" if ratio >= TARGET else f"BELOW {TARGET}"
            print(
                f"{name:<9} {statistics.median(rates['super']):>10,.0f}"
                f" {statistics.median(rates['app']):>12,.0f} {ratio:>13.2f}"
                f" {statistics.median(rates['bare']):>15,.0f}"
                f" {statistics.median(whole):>11.2f}  {verdict}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
