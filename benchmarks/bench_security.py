"""What row-level security costs: the same chatkeep calls as chatapp_app and as a superuser.

In one run, on one database migrated to the full schema (roles, policies, audit), at
``--concurrency`` tasks (20), for ``--seconds`` per side and round:

* history: a page of 50 with authors at a random depth of a 10,000-message room;
* unread: the unread counts of the user.

for users in 201 public rooms (the storage benchmark's fixture), then for users in 10, 200
and 1,000 private rooms (``--rooms``), created by someone else: the case where every room
row goes through the membership test (issue 12). Their history room is private too.

Each call is ``async with db.acting_as(user): <repository call>``, the path every facade flow
takes. The *policy* ratio compares that path on a pool connected as ``chatapp_app`` (row
security filters every statement) with the same path on a pool connected as a superuser
(which bypasses row security): the issue's target is within 10% (ratio >= 0.9). The
*end-to-end* column compares ``chatapp_app`` with the superuser making the bare call with no
transaction at all, for information: that gap is the acting user's transaction (BEGIN,
``set_config``, COMMIT), not the policies.

Run (PostgreSQL 15 here; the chatapp_* roles must exist: ``chatkeep setup`` once)::

    python benchmarks/bench_security.py --database-url postgresql://root@127.0.0.1:5432/postgres

Then the server's side (``--explain``, on by default): the median of ``EXPLAIN ANALYZE``
(planning and execution) of the unread counts, the room list and a history page, per tier,
as ``chatapp_app`` and as the superuser, and whether a plan scans ``rooms`` whole.
``--big-rooms N`` measures that on a second database (``<name>_big``) of N private rooms
(200,000 for the figures in docs/performance.md), built once with generate_series, where
users in 10, 200 and 1,000 of them are the tiers.

``--to N`` migrates the benchmark's database up or down to schema version ``N`` first, so
two schema versions can be compared in alternating runs on one fixture: ``--to 12`` is
the policies before 013 (arrays of the user's rooms). The statements need 012 (history
pages read reaction counts), so ``N`` must be at least 12. ``--tiny`` runs it all in
seconds (small tiers, short rounds, a 2,000-room big database) for the test suite, and
``--drop`` drops its databases at the end.

The URL names a server and a superuser; the script works in its own database
(``chatkeep_bench_rls``) and connects to it as ``chatapp_app`` without a password, so the
server must trust local connections (as test servers do) or the URL must carry the app
role's password in ``--app-password``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.messages import HISTORY_BEFORE, UNREAD_COUNTS
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.rooms import ROOMS_OF

sys.path.insert(0, os.path.dirname(__file__))
from bench_storage import HISTORY_MESSAGES, Fixture, bench_database, build_fixture, rate

BENCH_DB = "chatkeep_bench_rls"
TARGET = 0.9
TIERS = (10, 200, 1000)
TIER_USERS = 4  # users in each tier, all in the same rooms
OLDEST_SCHEMA = 12  # the statements read message_reactions (012)
BIG_ROOMS = 200_000
NO_PASSWORD = "$2b$10$" + "b" * 53  # nobody signs in: the format is all the schema checks

Op = Callable[[int, random.Random], Awaitable[Any]]


def as_role(url: str, role: str, password: str | None) -> str:
    return urls.with_user(url, role, password or None)


async def build_private_tiers(
    conn: asyncpg.Connection, tiers: tuple[int, ...]
) -> dict[int, Fixture]:
    """For each tier N: users in N private rooms, one of them a 10,000-message history room.

    The rooms are created by a user outside the tiers, so no policy shortcut (creator, public
    room) lets a room through before the membership test. Tiers share rooms: the private
    rooms are numbered, and tier N's users are in the first N - 1 and the history room.
    """
    if not tiers:  # `--rooms ''`: the public fixture only
        return {}
    need = max(tiers) - 1
    creator = await conn.fetchval("SELECT id FROM users WHERE username = 'rls_private_owner'")
    if creator is None:
        creator = uuid7()
        await conn.execute(
            "INSERT INTO users (id, email, username, password_hash)"
            " VALUES ($1, 'rls-private-owner@example.org', 'rls_private_owner', $2)",
            creator,
            NO_PASSWORD,
        )
        history = uuid7()
        await conn.execute(
            "INSERT INTO rooms (id, name, type, created_by)"
            " VALUES ($1, 'rls private history', 'private', $2)",
            history,
            creator,
        )
        await conn.execute(
            """
            INSERT INTO messages (room_id, user_id, seq, content)
            SELECT $1, $2, g, 'private history message number ' || g || ' with some text'
              FROM generate_series(1, $3::int) AS g
            """,
            history,
            creator,
            HISTORY_MESSAGES,
        )
        await conn.execute(
            "UPDATE rooms SET last_seq = $2 WHERE id = $1", history, HISTORY_MESSAGES
        )
    history = await conn.fetchval("SELECT id FROM rooms WHERE name = 'rls private history'")
    have = await conn.fetchval("SELECT count(*) FROM rooms WHERE name ~ '^rls private [0-9]+$'")
    if have < need:
        await conn.execute(
            """
            INSERT INTO rooms (id, name, type, created_by, last_seq)
            SELECT gen_random_uuid(), 'rls private ' || to_char(g, 'FM0000'), 'private', $1, 5
              FROM generate_series($2::int + 1, $3::int) AS g
            """,
            creator,
            have,
            need,
        )
    rooms = [
        row["id"]
        for row in await conn.fetch(
            "SELECT id FROM rooms WHERE name ~ '^rls private [0-9]+$' ORDER BY name"
        )
    ]
    fixtures: dict[int, Fixture] = {}
    for tier in tiers:
        names = [f"rls_private_{tier}_{i}" for i in range(TIER_USERS)]
        found = await conn.fetch(
            "SELECT id FROM users WHERE username = ANY($1::text[]) ORDER BY username", names
        )
        users = [row["id"] for row in found]
        if not users:
            users = [uuid7() for _ in names]
            await conn.copy_records_to_table(
                "users",
                records=[
                    (u, f"{n}@example.org", n, NO_PASSWORD)
                    for u, n in zip(users, names, strict=True)
                ],
                columns=["id", "email", "username", "password_hash"],
            )
            await conn.copy_records_to_table(
                "room_users",
                records=[(r, u) for r in [history, *rooms[: tier - 1]] for u in users],
                columns=["room_id", "user_id"],
            )
        fixtures[tier] = Fixture(users, rooms[: tier - 1], history)
    return fixtures


async def prepare(
    server_url: str, name: str, fresh: bool, to: int | None, tiers: tuple[int, ...]
) -> tuple[str, Fixture, dict[int, Fixture], int]:
    admin = await asyncpg.connect(maintenance_url(server_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()
    url = await bench_database(server_url, name, fresh)
    conn = await asyncpg.connect(url)
    try:
        await prepare_database(conn)
        migrator = Migrator(conn)
        await migrator.up()
        if to is not None:
            await migrator.down(to=to)
        version = max(e.version for e in await migrator.status() if e.state == "applied")
        fixture = await build_fixture(conn)
        private = await build_private_tiers(conn, tiers)
        # The steady state autovacuum keeps a live database in: visibility maps set, so
        # the membership look-up of every policy is an index-only scan. Right after the
        # COPY it would visit the heap too, and the ratio would measure that instead.
        await conn.execute("VACUUM ANALYZE room_users, rooms, messages, users")
    finally:
        await conn.close()
    return url, fixture, private, version


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


async def server_ms(
    conn: asyncpg.Connection, user: Any, sql: str, args: tuple[Any, ...]
) -> tuple[float, bool]:
    """Planning + execution time of one EXPLAIN ANALYZE, and whether it seq-scans rooms."""
    async with conn.transaction():
        if user is not None:
            await conn.execute("SELECT set_config('app.user_id', $1, true)", str(user))
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
    plan = json.loads(raw)[0]

    def seq_rooms(node: dict[str, Any]) -> bool:
        here = node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "rooms"
        return here or any(seq_rooms(child) for child in node.get("Plans", []))

    return plan["Planning Time"] + plan["Execution Time"], seq_rooms(plan["Plan"])


async def explain(
    url: str, app_url: str, title: str, cases: dict[str, Fixture], samples: int
) -> None:
    """Prints server times (median of ``samples``) per tier: superuser and chatapp_app."""
    superuser = await asyncpg.connect(url)
    app = await asyncpg.connect(app_url)
    try:
        print(f"\n{title}: server ms per statement, median of {samples} EXPLAIN ANALYZE")
        print(f"{'rooms per user':<15} {'statement':<9} {'superuser':>10} {'chatapp_app':>12}")
        for case, fx in cases.items():
            user = fx.users[0]
            statements = {
                "unread": (UNREAD_COUNTS, (user,)),
                "rooms_of": (ROOMS_OF, (user, False)),
                "history": (HISTORY_BEFORE, (fx.history_room, HISTORY_MESSAGES // 2, 51)),
            }
            for name, (sql, args) in statements.items():
                times: dict[str, list[float]] = {"super": [], "app": []}
                scanned = {"super": False, "app": False}
                for i in range(samples):
                    sides = [("super", superuser, None), ("app", app, user)]
                    for side, conn, acting in sides if i % 2 else sides[::-1]:
                        ms, seq = await server_ms(conn, acting, sql, args)
                        times[side].append(ms)
                        scanned[side] = scanned[side] or seq
                marks = {k: " (seq scan of rooms)" if v else "" for k, v in scanned.items()}
                print(
                    f"{case:<15} {name:<9} {statistics.median(times['super']):>8.2f}ms"
                    f"{marks['super']} {statistics.median(times['app']):>10.2f}ms{marks['app']}",
                    flush=True,
                )
    finally:
        await superuser.close()
        await app.close()


async def build_big(
    server_url: str, name: str, rooms: int, tiers: tuple[int, ...], to: int | None
) -> tuple[str, dict[int, Fixture]]:
    """A database of ``rooms`` private rooms (5 members each) and a user per tier."""
    url = await bench_database(server_url, name, False)
    conn = await asyncpg.connect(url)
    try:
        await prepare_database(conn)
        migrator = Migrator(conn)
        await migrator.up()
        if to is not None:
            await migrator.down(to=to)
        history = await conn.fetchval("SELECT id FROM rooms WHERE name = 'big history'")
        if history is None:
            print(f"building {rooms:,} rooms (once; later runs reuse them)...", flush=True)
            creator = uuid7()
            history = uuid7()
            # Bulk set-up as the superuser: no change log or audit rows for it.
            await conn.execute("SET session_replication_role = replica")
            await conn.execute(
                "INSERT INTO users (id, email, username, password_hash)"
                " SELECT CASE g WHEN 0 THEN $1 ELSE gen_random_uuid() END,"
                "        'big' || g || '@example.org', 'big_' || g, $2"
                "   FROM generate_series(0, 5000) g",
                creator,
                NO_PASSWORD,
            )
            await conn.execute(
                "INSERT INTO rooms (id, name, type, created_by, last_seq)"
                " SELECT CASE g WHEN 0 THEN $1 ELSE gen_random_uuid() END,"
                "        CASE g WHEN 0 THEN 'big history' ELSE 'big ' || g END,"
                "        'private', $2, 5"
                "   FROM generate_series(0, $3::int - 1) g",
                history,
                creator,
                rooms,
            )
            # Three members per room, spread over 5,000 users.
            await conn.execute(
                """
                INSERT INTO room_users (room_id, user_id)
                SELECT r.id, u.id
                  FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM rooms) r
                  JOIN (SELECT id, row_number() OVER (ORDER BY id) AS n FROM users
                         WHERE username <> 'big_0') u
                    ON u.n IN (1 + (r.n * 7) % 5000, 1 + (r.n * 13 + 1) % 5000,
                               1 + (r.n * 31 + 2) % 5000)
                ON CONFLICT DO NOTHING
                """
            )
            await conn.execute(
                "INSERT INTO messages (room_id, user_id, seq, content)"
                " SELECT $1, $2, g, 'big history message ' || g"
                "   FROM generate_series(1, $3::int) g",
                history,
                creator,
                HISTORY_MESSAGES,
            )
            await conn.execute(
                "UPDATE rooms SET last_seq = $2 WHERE id = $1", history, HISTORY_MESSAGES
            )
            await conn.execute("RESET session_replication_role")
        fixtures: dict[int, Fixture] = {}
        for tier in tiers:
            username = f"big_tier_{tier}"
            user = await conn.fetchval("SELECT id FROM users WHERE username = $1", username)
            if user is None:
                user = uuid7()
                await conn.execute(
                    "INSERT INTO users (id, email, username, password_hash)"
                    " VALUES ($1, $2, $3, $4)",
                    user,
                    f"{username}@example.org",
                    username,
                    NO_PASSWORD,
                )
                # The history room and tier - 1 rooms spread over the whole table.
                await conn.execute("SET session_replication_role = replica")
                await conn.execute(
                    """
                    INSERT INTO room_users (room_id, user_id)
                    SELECT id, $1::uuid FROM (
                        SELECT id, row_number() OVER (ORDER BY id) AS n FROM rooms
                         WHERE name <> 'big history') r
                     WHERE r.n % ($2::int / $3::int) = 0 AND r.n / ($2::int / $3::int) < $3
                    UNION ALL SELECT $4::uuid, $1::uuid
                    """,
                    user,
                    rooms,
                    max(tier - 1, 1),
                    history,
                )
                await conn.execute("RESET session_replication_role")
            fixtures[tier] = Fixture([user], [], history)
        await conn.execute("VACUUM ANALYZE room_users, rooms, messages, users")
    finally:
        await conn.close()
    return url, fixtures


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
    parser.add_argument("--database-name", default=BENCH_DB, help="the benchmark's database")
    parser.add_argument(
        "--to",
        type=int,
        default=None,
        help=f"migrate up or down to this schema version first (>= {OLDEST_SCHEMA})",
    )
    parser.add_argument("--samples", type=int, default=31, help="EXPLAIN ANALYZE runs per case")
    parser.add_argument(
        "--no-explain", action="store_true", help="skip the server-side EXPLAIN figures"
    )
    parser.add_argument(
        "--big-rooms",
        type=int,
        default=0,
        help=f"also EXPLAIN on a database of this many rooms (e.g. {BIG_ROOMS:,}); 0: skip",
    )
    parser.add_argument("--tiny", action="store_true", help="seconds in all (tests, CI)")
    parser.add_argument("--drop", action="store_true", help="drop the databases at the end")
    parser.add_argument(
        "--rooms",
        default=",".join(map(str, TIERS)),
        help="private rooms per user, comma-separated (empty: the public fixture only)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.rooms, args.rounds, args.seconds, args.concurrency = "2,5", 1, 0.3, 4
        args.samples, args.big_rooms = 3, 2000
    tiers = tuple(int(n) for n in args.rooms.split(",") if n.strip())
    if any(n < 1 for n in tiers):
        parser.error("--rooms: each tier needs at least 1 room (the history room)")
    if args.to is not None and args.to < OLDEST_SCHEMA:
        parser.error(f"--to: the benchmark's statements need schema {OLDEST_SCHEMA} or later")
    try:
        return await run(args, tiers)
    finally:
        if args.drop:
            admin = await asyncpg.connect(maintenance_url(args.database_url))
            try:
                for name in (args.database_name, f"{args.database_name}_big"):
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


async def run(args: argparse.Namespace, tiers: tuple[int, ...]) -> int:
    """The benchmark proper: throughput rounds, then the server-side figures."""

    url, fixture, private, schema = await prepare(
        args.database_url, args.database_name, args.fresh, args.to, tiers
    )
    settings = Settings(database_url=url, pool_min_size=args.concurrency)
    size = max(args.concurrency, settings.pool_max_size)
    superuser = Database(settings, max_size=size)
    app = Database(settings, dsn=as_role(url, "chatapp_app", args.app_password), max_size=size)
    async with superuser, app:
        await check_rls(app, fixture)
        cases = {"201 public": fixture} | {f"{n} private": fx for n, fx in private.items()}
        version = (await superuser.health()).server_version.split()[0]
        print(
            f"PostgreSQL {version}, schema version {schema}, {os.cpu_count()} CPUs, "
            f"{args.concurrency} tasks, {args.rounds} rounds of {args.seconds:g} s per side"
        )
        print("calls/s: the median round; ratios: the median of back-to-back rounds")
        print(
            f"{'rooms per user':<15} {'operation':<9} {'superuser':>10} {'chatapp_app':>12}"
            f" {'policy ratio':>13} {'bare superuser':>15} {'end-to-end':>11}"
        )
        failed = False
        for case, fx in cases.items():
            filtered = ops(MessageRepository(app), fx, acting=True)
            unfiltered = ops(MessageRepository(superuser), fx, acting=True)
            bare = ops(MessageRepository(superuser), fx, acting=False)
            failed = (
                await measure(
                    case, filtered, unfiltered, bare, args.concurrency, args.seconds, args.rounds
                )
                or failed
            )
    if not args.no_explain:
        app_url = as_role(url, "chatapp_app", args.app_password)
        await explain(url, app_url, f"fixture, schema {schema}", cases, args.samples)
    if args.big_rooms:
        big_url, big = await build_big(
            args.database_url,
            f"{args.database_name}_big",
            args.big_rooms,
            (10, 200, 1000) if not args.tiny else (2, 5),
            args.to,
        )
        big_cases = {f"{n} private": fx for n, fx in big.items()}
        app_big = as_role(big_url, "chatapp_app", args.app_password)
        await explain(big_url, app_big, f"{args.big_rooms:,} rooms", big_cases, args.samples)
    return 1 if failed and not args.tiny else 0


async def measure(
    case: str,
    filtered: dict[str, Op],
    unfiltered: dict[str, Op],
    bare: dict[str, Op],
    concurrency: int,
    seconds: float,
    rounds: int,
) -> bool:
    """Prints one line per operation; True if a policy ratio is below the target."""
    failed = False
    for name in ("history", "unread"):
        rates: dict[str, list[float]] = {"super": [], "app": [], "bare": []}
        policy: list[float] = []
        whole: list[float] = []
        for round_ in range(rounds):
            sides = [("super", unfiltered), ("app", filtered), ("bare", bare)]
            if round_ % 2:
                sides.reverse()  # neither side always runs on a warmer server
            measured = {
                side: await rate(table[name], concurrency, seconds) for side, table in sides
            }
            for side, value in measured.items():
                rates[side].append(value)
            policy.append(measured["app"] / measured["super"])
            whole.append(measured["app"] / measured["bare"])
        ratio = statistics.median(policy)
        failed = failed or ratio < TARGET
        verdict = "ok" if ratio >= TARGET else f"BELOW {TARGET}"
        print(
            f"{case:<15} {name:<9} {statistics.median(rates['super']):>10,.0f}"
            f" {statistics.median(rates['app']):>12,.0f} {ratio:>13.2f}"
            f" {statistics.median(rates['bare']):>15,.0f}"
            f" {statistics.median(whole):>11.2f}  {verdict}",
            flush=True,
        )
    return failed


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
