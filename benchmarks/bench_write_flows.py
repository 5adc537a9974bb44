"""The facade's write flows in one round trip (migration 018) against their old transactions.

Issue 12, item 1, for the flows that change a message, a reaction or a thread's follow
state: ``edit_message``, ``delete_message``, ``react`` / ``unreact``, ``mark_thread_read``
and ``follow_thread`` / ``unfollow_thread``. Three sides, in one run:

* **raw**: asyncpg running the repository's statement alone, as a superuser (no row
  security, no Redis, no read-back of the change's position): the floor;
* **before**: the flow as it was before migration 018, replayed by this script with the
  library's public pieces: a transaction acting as the user (BEGIN with its ``set_config``,
  the statement, the read-back of the change log's position or of the logged change,
  COMMIT; delete looked the message up first), then the event published to Redis;
* **facade**: the public call (``chat.edit_message(...)``...): one statement, the flow
  function, then the same publish.

Operations (``--concurrency`` tasks, each acting as its own user; every user a member of
every room; messages spread over ``--rooms`` rooms, so the room row lock the change log's
trigger takes is shared by few writers):

* ``edit``: the task's user edits their own message in a random room;
* ``delete``: the user deletes one of their own messages (seeded before each run; a fixed
  number per side and round, so the rate is calls over the wall time they took);
* ``react``: the user adds, then takes back (every other call), a reaction to a message;
* ``mark_thread_read``: the user marks a thread (one per room) read;
* ``follow``: the user follows, then unfollows (every other call), a thread.

Each round runs the three sides back to back (the order rotates every round); ops/s are
the median round's, the ratios the median of per-round ratios, p50/p99 the single calls'
latency over every round. Then, unless ``--statement-calls 0``, the server's share alone:
each flow's statements one call after another on one connection per side, with
``synchronous_commit = off`` in those sessions (raw statement, the old transaction, the flow
function; medians). Numbers only, no timed assertion.

Run (PostgreSQL and Redis on this machine; the chatapp_* roles are made if missing)::

    python benchmarks/bench_write_flows.py \\
        --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/3 --database-name chatkeep_bench_writes

It works in its own database (kept for the next run unless ``--drop``) and FLUSHes the
logical Redis database of ``--redis-url``: give it one of its own. ``--tiny``: a small
fixture and short rounds (tests/test_benchmarks.py runs it).
"""

from __future__ import annotations

import asyncio
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
from bench_facade import NO_REAL_LIMIT, Measured, database, drop_database, rate

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import (
    MessageDeleted,
    MessageEdited,
    ReactionAdded,
    ReactionRemoved,
    RedisClient,
)
from chatkeep.storage import Database
from chatkeep.storage.changes import LAST_CHANGE, LAST_POSITION
from chatkeep.storage.messages import DELETE_AS, DELETE_LOGGED_AS, EDIT, EDIT_AS, SEQ_OF
from chatkeep.storage.reactions import REACT, REACT_AS, UNREACT
from chatkeep.storage.threads import FOLLOW, FOLLOW_AS, MARK_THREAD_READ, MARK_THREAD_READ_AS

BENCH_DB = "chatkeep_bench_write_flows"
OPERATIONS = ("edit", "delete", "react", "mark_thread_read", "follow")
LABELS = {
    "edit": "edit_message",
    "delete": "delete_message",
    "react": "react / unreact",
    "mark_thread_read": "mark_thread_read",
    "follow": "follow / unfollow_thread",
}
SIDES = ("raw", "before", "facade")
# Each side reacts with its own emoji, so their add/remove alternations never meet.
EMOJI = {"raw": "🔥", "before": "🎉", "facade": "👍"}

Op = Callable[[int, random.Random], Awaitable[Any]]
Statement = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True)
class Sizes:
    users: int
    rooms: int
    deletes: int  # per side and round

    @property
    def tag(self) -> str:
        return f"w{self.users}u{self.rooms}r"


FULL = Sizes(users=20, rooms=100, deletes=2000)
TINY = Sizes(users=4, rooms=5, deletes=20)


@dataclass
class Fixture:
    users: list[uuid.UUID]
    rooms: list[uuid.UUID]
    #: (user, room) -> the user's message in the room (edits and reactions).
    own: dict[tuple[uuid.UUID, uuid.UUID], uuid.UUID]
    #: One thread root (with a reply) per room.
    roots: list[uuid.UUID]
    #: side -> per user, messages of theirs to delete (seeded each run).
    victims: dict[str, dict[uuid.UUID, list[uuid.UUID]]]

    def user(self, task: int) -> uuid.UUID:
        return self.users[task % len(self.users)]


# -- the fixture ----------------------------------------------------------------------------


async def build_fixture(url: str, sizes: Sizes, rounds: int, concurrency: int) -> Fixture:
    """Users, rooms, one message per user and room, a thread per room; fresh victims."""
    tag = sizes.tag
    conn = await asyncpg.connect(url)
    try:
        rooms = await _rooms(conn, tag)
        if len(rooms) != sizes.rooms:
            await _seed(conn, sizes)
            rooms = await _rooms(conn, tag)
        users = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM users WHERE username LIKE $1 ORDER BY username", f"{tag}\\_%"
            )
        ]
        # The first message of each user in each room (seeded first: seqs 1..users; their
        # content changes with every run's edits).
        own = {
            (r["user_id"], r["room_id"]): r["id"]
            for r in await conn.fetch(
                "SELECT id, room_id, user_id FROM messages WHERE room_id = ANY($1) AND seq <= $2",
                rooms,
                len(users),
            )
        }
        roots = [
            r["root_id"]
            for r in await conn.fetch(
                "SELECT root_id FROM threads WHERE room_id = ANY($1) ORDER BY room_id", rooms
            )
        ]
        # Only the users the tasks act as delete.
        victims = await _victims(conn, sizes, users[:concurrency], rooms, rounds)
    finally:
        await conn.close()
    return Fixture(users, rooms, own, roots, victims)


async def _rooms(conn: asyncpg.Connection, tag: str) -> list[uuid.UUID]:
    rows = await conn.fetch("SELECT id FROM rooms WHERE name LIKE $1 ORDER BY name", f"{tag} %")
    return [r["id"] for r in rows]


async def _seed(conn: asyncpg.Connection, sizes: Sizes) -> None:
    tag = sizes.tag
    print(f"seeding the fixture {tag} (once; later runs reuse it)...", flush=True)
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(sizes.users)]
    rooms = [uuid7() for _ in range(sizes.rooms)]
    async with conn.transaction():
        await conn.execute("DELETE FROM rooms WHERE name LIKE $1", f"{tag} %")
        await conn.execute("DELETE FROM users WHERE username LIKE $1", f"{tag}\\_%")
        await conn.copy_records_to_table(
            "users",
            records=[
                (u, f"{tag}_{i}@example.org", f"{tag}_{i:03d}", hashed) for i, u in enumerate(users)
            ],
            columns=["id", "email", "username", "password_hash"],
        )
        await conn.copy_records_to_table(
            "rooms",
            records=[(r, f"{tag} {i:04d}", "public", users[0]) for i, r in enumerate(rooms)],
            columns=["id", "name", "type", "created_by"],
        )
        await conn.copy_records_to_table(
            "room_users",
            records=[(r, u) for r in rooms for u in users],
            columns=["room_id", "user_id"],
        )
        # Through the triggers (seq, change log, threads), as a send would store them.
        await conn.execute(
            "INSERT INTO messages (room_id, user_id, content)"
            " SELECT r, u, 'own message of ' || u FROM unnest($1::uuid[]) AS r,"
            " unnest($2::uuid[]) AS u ORDER BY r, u",
            rooms,
            users,
        )
        await conn.execute(
            "INSERT INTO messages (room_id, user_id, content)"
            " SELECT r, $2, 'a thread' FROM unnest($1::uuid[]) AS r ORDER BY r",
            rooms,
            users[0],
        )
        await conn.execute(
            "INSERT INTO messages (room_id, user_id, content, reply_to)"
            " SELECT m.room_id, $2, 'a reply', m.id FROM messages m"
            " WHERE m.room_id = ANY($1) AND m.content = 'a thread' ORDER BY m.room_id",
            rooms,
            users[-1],
        )
    await conn.execute("VACUUM ANALYZE users, rooms, room_users, messages, threads")


async def _victims(
    conn: asyncpg.Connection,
    sizes: Sizes,
    users: list[uuid.UUID],
    rooms: list[uuid.UUID],
    rounds: int,
) -> dict[str, dict[uuid.UUID, list[uuid.UUID]]]:
    """Messages to delete: twice ``sizes.deletes`` per side and round (tasks take unevenly)."""
    per_side = sizes.deletes * (2 * rounds + 1)
    victims: dict[str, dict[uuid.UUID, list[uuid.UUID]]] = {}
    for side in SIDES:
        rows = await conn.fetch(
            "INSERT INTO messages (room_id, user_id, content)"
            " SELECT ($1::uuid[])[1 + g % cardinality($1::uuid[])],"
            "        ($2::uuid[])[1 + g % cardinality($2::uuid[])], 'to delete ' || g"
            "   FROM generate_series(0, $3::int - 1) AS g"
            " ORDER BY 1, g RETURNING id, user_id",
            rooms,
            users,
            per_side,
        )
        mine: dict[uuid.UUID, list[uuid.UUID]] = {u: [] for u in users}
        for row in rows:
            mine[row["user_id"]].append(row["id"])
        victims[side] = mine
    return victims


# -- the three sides ------------------------------------------------------------------------


def _own(fx: Fixture, user: uuid.UUID, rng: random.Random) -> uuid.UUID:
    return fx.own[(user, rng.choice(fx.rooms))]


def _take(fx: Fixture, side: str, user: uuid.UUID) -> uuid.UUID:
    return fx.victims[side][user].pop()


def _alternate() -> Callable[[int], bool]:
    """Per task: True, False, True... (add then take back, follow then unfollow)."""
    calls: dict[int, int] = {}

    def next_is_add(task: int) -> bool:
        calls[task] = calls.get(task, 0) + 1
        return calls[task] % 2 == 1

    return next_is_add


def raw_ops(pool: asyncpg.Pool, fx: Fixture) -> dict[str, Op]:
    adding, following = _alternate(), _alternate()
    last: dict[int, uuid.UUID] = {}

    async def edit(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        return await pool.fetchrow(EDIT, _own(fx, user, rng), user, f"edited {rng.random()}")

    async def delete(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        return await pool.fetchval(DELETE_AS, _take(fx, "raw", user), user)

    async def react(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        if adding(task):
            last[task] = _own(fx, user, rng)
            return await pool.fetchrow(REACT, last[task], user, EMOJI["raw"])
        return await pool.fetchrow(UNREACT, last[task], user, EMOJI["raw"])

    async def mark_thread_read(task: int, rng: random.Random) -> Any:
        return await pool.fetchval(MARK_THREAD_READ, rng.choice(fx.roots), fx.user(task))

    async def follow(task: int, rng: random.Random) -> Any:
        return await pool.fetchval(FOLLOW, rng.choice(fx.roots), fx.user(task), following(task))

    return {
        "edit": edit,
        "delete": delete,
        "react": react,
        "mark_thread_read": mark_thread_read,
        "follow": follow,
    }


def before_ops(chat: ChatKeep, fx: Fixture) -> dict[str, Op]:
    """The flows as they were before migration 018 (facade.py at issue 12's first merges)."""
    adding, following = _alternate(), _alternate()
    last: dict[int, uuid.UUID] = {}
    db = chat.db

    async def edit(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        async with db.acting_as(user, "facade.edit_message"):
            message = await chat.messages.edit(_own(fx, user, rng), f"e {rng.random()}", by=user)
            position = await chat.change_log.last_position()
        await chat.events.publish_many(
            [
                MessageEdited(
                    position=position,
                    room_id=message.room_id,
                    message_id=message.id,
                    seq=message.seq,
                    editor_id=user,
                    body=message.content,
                )
            ]
        )

    async def delete(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        key = _take(fx, "before", user)
        async with db.acting_as(user, "facade.delete_message"):
            found = await chat.messages.find_by_id(key)
            if found is None or not await chat.messages.delete(key, by=user):
                raise RuntimeError("a victim was not deleted")
            position = await chat.change_log.last_position()
        await chat.events.publish_many(
            [
                MessageDeleted(
                    position=position,
                    room_id=found.room_id,
                    message_id=found.id,
                    seq=found.seq,
                    deleted_by=user,
                )
            ]
        )

    async def react(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        added = adding(task)
        if added:
            last[task] = _own(fx, user, rng)
        change = chat.reactions.react if added else chat.reactions.unreact
        async with db.acting_as(user, "facade.react"):
            if not await change(last[task], user, EMOJI["before"]):
                return
            logged = await chat.change_log.last_change()
        assert logged is not None
        event = ReactionAdded if added else ReactionRemoved
        await chat.events.publish_many(
            [
                event(
                    position=logged.position,
                    room_id=logged.room_id,
                    message_id=last[task],
                    seq=logged.seq,
                    user_id=user,
                    emoji=EMOJI["before"],
                    count=logged.data["count"],
                )
            ]
        )

    async def mark_thread_read(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        async with db.acting_as(user, "facade.mark_thread_read"):
            return await chat.threads.mark_read(rng.choice(fx.roots), user)

    async def follow(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        async with db.acting_as(user, "facade.follow_thread"):
            await chat.threads.follow(rng.choice(fx.roots), user, following=following(task))

    return {
        "edit": edit,
        "delete": delete,
        "react": react,
        "mark_thread_read": mark_thread_read,
        "follow": follow,
    }


def facade_ops(chat: ChatKeep, fx: Fixture) -> dict[str, Op]:
    adding, following = _alternate(), _alternate()
    last: dict[int, uuid.UUID] = {}

    async def edit(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        return await chat.edit_message(_own(fx, user, rng), user, f"edited {rng.random()}")

    async def delete(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        if not await chat.delete_message(_take(fx, "facade", user), user):
            raise RuntimeError("a victim was not deleted")

    async def react(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        if adding(task):
            last[task] = _own(fx, user, rng)
            return await chat.react(last[task], user, EMOJI["facade"])
        return await chat.unreact(last[task], user, EMOJI["facade"])

    async def mark_thread_read(task: int, rng: random.Random) -> Any:
        return await chat.mark_thread_read(rng.choice(fx.roots), fx.user(task))

    async def follow(task: int, rng: random.Random) -> Any:
        user = fx.user(task)
        if following(task):
            return await chat.follow_thread(rng.choice(fx.roots), user)
        return await chat.unfollow_thread(rng.choice(fx.roots), user)

    return {
        "edit": edit,
        "delete": delete,
        "react": react,
        "mark_thread_read": mark_thread_read,
        "follow": follow,
    }


# -- the statements alone -------------------------------------------------------------------


def _victim(fx: Fixture) -> tuple[uuid.UUID, uuid.UUID]:
    """A message left to delete, and its author (whichever side's list still has one)."""
    for side in SIDES:
        for user, left in fx.victims[side].items():
            if left:
                return left.pop(), user
    raise RuntimeError("no message left to delete: run with fewer --statement-calls")


async def statement_costs(url: str, app_url: str, fx: Fixture, calls: int) -> None:
    """Server work per flow without the commit's flush and without Python or Redis.

    One connection per side, one call after another, ``synchronous_commit = off`` in these
    sessions only (the WAL flush of each commit, the same for every side, would bury the
    difference on a loaded disk): raw (the statement as a superuser), the old transaction
    (BEGIN + set_config, the statements, COMMIT, as chatapp_app) and the flow function (as
    chatapp_app). Medians in ms; the sides take turns going first, call by call.
    """
    su = await asyncpg.connect(url)
    app = await asyncpg.connect(app_url)
    try:
        for conn in (su, app):
            await conn.execute("SET synchronous_commit = off")

        async def old(user: uuid.UUID, statements: list[Statement]) -> None:
            async with app.transaction():
                await app.execute("SELECT set_config('app.user_id', $1, true)", str(user))
                for sql, values in statements:
                    await app.fetch(sql, *values)

        rng = random.Random(7)
        timed: dict[str, dict[str, list[float]]] = {}
        for name in OPERATIONS:
            timed[name] = {side: [] for side in SIDES}
            for i in range(calls):
                user = fx.users[i % len(fx.users)]
                own, root = _own(fx, user, rng), rng.choice(fx.roots)
                add = i % 2 == 0
                victims = [_victim(fx) for _ in SIDES] if name == "delete" else []
                # Per side: the statements, as (sql, arguments); "before" runs its own in
                # a transaction acting as its user.
                raw: Statement
                before: tuple[uuid.UUID, list[Statement]]
                facade: Statement
                if name == "edit":
                    raw = (EDIT, (own, user, "raw"))
                    before = (user, [(EDIT, (own, user, "before")), (LAST_POSITION, ())])
                    facade = (EDIT_AS, (user, own, "facade"))
                elif name == "delete":
                    (v_raw, u_raw), (v_old, u_old), (v_new, u_new) = victims
                    raw = (DELETE_AS, (v_raw, u_raw))
                    before = (
                        u_old,
                        [(SEQ_OF, (v_old,)), (DELETE_AS, (v_old, u_old)), (LAST_POSITION, ())],
                    )
                    facade = (DELETE_LOGGED_AS, (u_new, v_new))
                elif name == "react":
                    change = REACT if add else UNREACT
                    raw = (change, (own, user, EMOJI["raw"]))
                    before = (user, [(change, (own, user, EMOJI["before"])), (LAST_CHANGE, ())])
                    facade = (REACT_AS, (user, own, EMOJI["facade"], add))
                elif name == "mark_thread_read":
                    raw = (MARK_THREAD_READ, (root, user))
                    before = (user, [(MARK_THREAD_READ, (root, user))])
                    facade = (MARK_THREAD_READ_AS, (user, root))
                else:
                    raw = (FOLLOW, (root, user, add))
                    before = (user, [(FOLLOW, (root, user, add))])
                    facade = (FOLLOW_AS, (user, root, add))
                # Rotated call by call: the first to touch a row after the last call also
                # prunes what the others left on its page.
                for side in SIDES[i % 3 :] + SIDES[: i % 3]:
                    began = time.perf_counter()
                    if side == "raw":
                        await su.fetch(raw[0], *raw[1])
                    elif side == "before":
                        await old(before[0], before[1])
                    else:
                        await app.fetch(facade[0], *facade[1])
                    timed[name][side].append(time.perf_counter() - began)
    finally:
        await su.close()
        await app.close()
    print(
        f"\nthe statements alone ({calls} calls per side, one connection each, "
        "synchronous_commit off; ms, medians): "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'operation':<26} {'raw':>7} {'before':>7} {'function':>9}"
        f" {'before/raw':>11} {'function/raw':>13} {'before/function':>16}"
    )
    for name in OPERATIONS:
        ms_raw, ms_old, ms_new = (statistics.median(timed[name][side]) * 1000 for side in SIDES)
        print(
            f"{LABELS[name]:<26} {ms_raw:>7.2f} {ms_old:>7.2f} {ms_new:>9.2f}"
            f" {ms_old / ms_raw:>11.2f} {ms_new / ms_raw:>13.2f} {ms_old / ms_new:>16.2f}",
            flush=True,
        )


# -- measuring ------------------------------------------------------------------------------


async def rate_of_calls(op: Op, concurrency: int, calls: int, latencies: list[float]) -> float:
    """``calls`` calls of ``op`` shared by ``concurrency`` tasks: calls per second of wall time."""
    left = calls

    async def worker(index: int) -> None:
        nonlocal left
        rng = random.Random(index * 7919 + int(time.time()))
        while left > 0:
            left -= 1
            began = time.perf_counter()
            await op(index, rng)
            latencies.append(time.perf_counter() - began)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return calls / (time.perf_counter() - start)


async def _no_reset(conn: asyncpg.Connection) -> None:
    del conn


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


async def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=3)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=OPERATIONS, default=None)
    parser.add_argument(
        "--statement-calls",
        type=int,
        default=300,
        help="calls per side of each flow's statements alone, after the table (0: none)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny fixture, short rounds")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = parser.parse_args()
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    sizes = FULL
    if args.tiny:
        sizes, args.seconds, args.rounds = TINY, 0.2, 1
        args.statement_calls = min(args.statement_calls, 6)
    concurrency = min(args.concurrency, sizes.users) if args.tiny else args.concurrency
    if concurrency < 1:
        parser.error("--concurrency: at least 1")
    pool_size = min(concurrency, 20)

    url = await database(args.database_url, args.database_name, fresh=args.fresh)
    fx = await build_fixture(url, sizes, args.rounds, concurrency)
    app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
    settings = Settings(database_url=app_url, redis_url=args.redis_url)
    raw_pool = await asyncpg.create_pool(
        url, min_size=pool_size, max_size=pool_size, statement_cache_size=100, reset=_no_reset
    )
    try:
        async with (
            Database(settings, min_size=pool_size, max_size=pool_size) as db,
            RedisClient.from_settings(settings) as redis,
        ):
            await redis.redis.flushdb()
            chat = ChatKeep(db, redis, node_id="bench", send_limit=NO_REAL_LIMIT)
            sides = {
                "raw": raw_ops(raw_pool, fx),
                "before": before_ops(chat, fx),
                "facade": facade_ops(chat, fx),
            }
            version = (await db.health()).server_version.split()[0]
            print(
                f"PostgreSQL {version}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
                f"{concurrency} tasks on pools of {pool_size}, {args.rounds} rounds of "
                f"{args.seconds:g} s per side ({sizes.deletes} calls for delete); "
                f"{sizes.rooms} rooms; load average {os.getloadavg()[0]:.2f}"
            )
            print(
                "raw: asyncpg, the statement alone, superuser; before: the flow's transaction "
                "(BEGIN + set_config, statements, COMMIT) + publish; facade: the public call "
                "(one flow function) + publish, as chatapp_app with row security"
            )
            print(
                f"{'operation':<26} {'raw ops/s':>10} {'before ops/s':>13} {'facade ops/s':>13}"
                f" {'before/raw':>11} {'facade/raw':>11} {'facade/before':>14}"
                f"  {'p50/p99 raw':>12} {'p50/p99 before':>15} {'p50/p99 facade':>15}"
            )
            for name in args.only or OPERATIONS:
                measured = {side: Measured([], []) for side in SIDES}
                ratios: dict[str, list[float]] = {"before": [], "facade": [], "gain": []}
                for round_ in range(args.rounds):
                    shift = round_ % len(SIDES)
                    for side in SIDES[shift:] + SIDES[:shift]:
                        op, into = sides[side][name], measured[side].latencies
                        if name == "delete":
                            got = await rate_of_calls(op, concurrency, sizes.deletes, into)
                        else:
                            got = await rate(op, concurrency, args.seconds, into)
                        measured[side].rates.append(got)
                    raw, before, facade = (measured[s].rates[-1] for s in SIDES)
                    ratios["before"].append(before / raw)
                    ratios["facade"].append(facade / raw)
                    ratios["gain"].append(facade / before)

                def cell(side: str, m: dict[str, Measured] = measured) -> tuple[str, str]:
                    found = m[side]
                    return (
                        f"{statistics.median(found.rates):,.0f}",
                        f"{found.percentile(0.5):.1f}/{found.percentile(0.99):.1f}",
                    )

                (raw_r, raw_l), (bef_r, bef_l), (fac_r, fac_l) = (cell(s) for s in SIDES)
                print(
                    f"{LABELS[name]:<26} {raw_r:>10} {bef_r:>13} {fac_r:>13}"
                    f" {_ratio(ratios['before']):>11} {_ratio(ratios['facade']):>11}"
                    f" {_ratio(ratios['gain']):>14}"
                    f"  {raw_l:>12} {bef_l:>15} {fac_l:>15}",
                    flush=True,
                )
        if args.statement_calls > 0:
            await statement_costs(url, app_url, fx, args.statement_calls)
    finally:
        await raw_pool.close()
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
