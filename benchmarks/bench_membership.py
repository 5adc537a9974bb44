"""Membership flows through the facade against raw asyncpg doing the same change.

Issue 12 asked for one round trip per flow. ``join``/``leave`` and ``change_role`` acted
for their user as BEGIN + set_config, three to five statements and COMMIT; migration 022
makes each one function call. This benchmark measures what an application calls:
``ChatKeep.join`` + ``ChatKeep.leave`` (a self-join and a leave of a public room) and
``ChatKeep.change_role`` twice (an owner promoting a member to admin and back), as
``chatapp_app`` with row security on and the facade's Redis work included (member-cache
invalidation, the events), and the PostgreSQL work alone in its two shapes (the
transaction acting as the user, and migration 022's one function call, when the tree
measured has it), against raw asyncpg as a superuser doing the same change in
one statement each (``INSERT ... ON CONFLICT DO NOTHING RETURNING``, ``DELETE``,
``UPDATE ... RETURNING``; the change-log triggers fire for both). Alternating rounds, the
median of per-round ratios, for one task alone and for ``--concurrency`` tasks (20), each
task its own user and its rooms spread over ``--rooms`` (20). Numbers only: no timed
assertion.

Run it against this tree and against another (``PYTHONPATH=<tree>/src``) to compare
before and after; each run prints ``cat /proc/loadavg`` first::

    PYTHONPATH=src python benchmarks/bench_membership.py \\
        --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/14 --database-name chatkeep_bench_membership

The script works in its own database (``--database-name``, dropped with ``--drop``) and
FLUSHes the logical Redis database of ``--redis-url``: give it one of its own. ``--tiny``
measures for a fraction of a second with few tasks, so a test or CI can run it in seconds
(tests/test_benchmarks.py does).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import bcrypt
from _args import server_parser
from bench_members import database, drop_database

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database

BENCH_DB = "chatkeep_bench_membership"

RAW_JOIN = """
INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'member')
ON CONFLICT (room_id, user_id) DO NOTHING
RETURNING room_id, user_id, role, joined_at, last_read_at, last_read_seq
"""
RAW_LEAVE = "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2"
RAW_ROLE = """
UPDATE room_users SET role = $3 WHERE room_id = $1 AND user_id = $2
RETURNING room_id, user_id, role, joined_at, last_read_at, last_read_seq
"""

# One cycle of an operation for task ``i``: (owner, room, user) -> awaitable.
Cycle = Callable[[uuid.UUID, uuid.UUID, uuid.UUID], Awaitable[object]]


def load_average() -> str:
    """``/proc/loadavg`` (the figures are noisy on a shared machine: print the load)."""
    load = Path("/proc/loadavg")
    return load.read_text().strip() if load.exists() else "unknown"


async def seed(
    url: str, rooms: int, users: int
) -> tuple[list[uuid.UUID], uuid.UUID, list[uuid.UUID]]:
    """``rooms`` public rooms owned by one owner, and ``users`` users (fresh each run)."""
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    tag = uuid.uuid4().hex[:8]
    owner, people = uuid7(), [uuid7() for _ in range(users)]
    room_ids = [uuid7() for _ in range(rooms)]
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "users",
                records=[
                    (u, f"b{tag}_{i}@example.org", f"b{tag}_{i}", hashed)
                    for i, u in enumerate([owner, *people])
                ],
                columns=["id", "email", "username", "password_hash"],
            )
            await conn.copy_records_to_table(
                "rooms",
                records=[
                    (r, f"membership {tag} {i}", "public", owner) for i, r in enumerate(room_ids)
                ],
                columns=["id", "name", "type", "created_by"],
            )
            await conn.copy_records_to_table(
                "room_users",
                records=[(r, owner, "owner") for r in room_ids],
                columns=["room_id", "user_id", "role"],
            )
        await conn.execute("ANALYZE users, rooms, room_users")
    finally:
        await conn.close()
    return room_ids, owner, people


async def rate(
    cycle: Cycle,
    owner: uuid.UUID,
    rooms: list[uuid.UUID],
    users: list[uuid.UUID],
    tasks: int,
    seconds: float,
) -> float:
    """Cycles per second from ``tasks`` concurrent tasks, each with its own user."""
    counts = [0] * tasks
    stop = False

    async def worker(index: int) -> None:
        user, room = users[index], rooms[index % len(rooms)]
        while not stop:
            await cycle(owner, room, user)
            counts[index] += 1

    running = [asyncio.create_task(worker(i)) for i in range(tasks)]
    await asyncio.sleep(min(0.3, seconds / 4))  # warm-up, not counted
    before = sum(counts)
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    done = sum(counts) - before
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*running)
    return max(done, 1) / elapsed


async def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=14)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0, help="per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="few tasks, short rounds (seconds)")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = parser.parse_args()
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    if args.tiny:
        args.concurrency, args.rooms, args.seconds, args.rounds = 3, 2, 0.2, 1
    print(f"load average: {load_average()}")

    url = await database(args.database_url, args.database_name, fresh=args.fresh)
    rooms, owner, users = await seed(url, args.rooms, args.concurrency)
    app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
    settings = Settings(database_url=app_url, redis_url=args.redis_url)
    size = max(args.concurrency, 2)
    raw = await asyncpg.create_pool(url, min_size=size, max_size=size)
    try:
        async with (
            Database(settings, min_size=size, max_size=size) as db,
            RedisClient.from_settings(settings) as redis,
        ):
            await redis.redis.flushdb()
            chat = ChatKeep(db, redis, node_id="bench")

            rooms_repo, change_log = chat.rooms, chat.change_log
            one_round_trip = hasattr(rooms_repo, "join_as")  # the tree measured has 022

            async def facade_join_leave(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await chat.join(room, user)
                await chat.leave(room, user)

            async def tx_join_leave(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                async with db.acting_as(user, "bench.join"):
                    await rooms_repo.add_member(room, user, by=user)
                    await change_log.last_position()
                async with db.acting_as(user, "bench.leave"):
                    await rooms_repo.remove_member(room, user, by=user)
                    await change_log.last_position()

            async def one_join_leave(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await rooms_repo.join_as(room, user, by=user)
                await rooms_repo.remove_member_as(room, user, by=user)

            async def raw_join_leave(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await raw.fetchrow(RAW_JOIN, room, user)
                await raw.execute(RAW_LEAVE, room, user)

            async def facade_roles(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await chat.change_role(room, user, "admin", by=owner)
                await chat.change_role(room, user, "member", by=owner)

            async def tx_roles(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                for role in ("admin", "member"):
                    async with db.acting_as(owner, "bench.change_role"):
                        await rooms_repo.change_role(room, user, role, by=owner)
                        await change_log.last_position()

            async def one_roles(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await rooms_repo.change_role_as(room, user, "admin", by=owner)
                await rooms_repo.change_role_as(room, user, "member", by=owner)

            async def raw_roles(owner: uuid.UUID, room: uuid.UUID, user: uuid.UUID) -> None:
                await raw.fetchrow(RAW_ROLE, room, user, "admin")
                await raw.fetchrow(RAW_ROLE, room, user, "member")

            print(
                f"{args.rounds} rounds of {args.seconds:g} s per side; {args.rooms} public rooms; "
                "a cycle is two calls (join + leave, or promote + demote)"
            )
            print(
                "facade: ChatKeep's flow (Redis work included); transaction: its PostgreSQL "
                "work as BEGIN + set_config, statements, COMMIT; one call: the 022 function "
                "(- where the tree has none); raw: superuser, one statement per call"
            )
            print(
                f"{'operation':<18} {'tasks':>5} {'raw/s':>7} "
                + " ".join(f"{side + '/raw':>16}" for side in ("facade", "transaction", "one call"))
            )
            for name, variants, needs_member in (
                (
                    "join + leave",
                    {
                        "facade": facade_join_leave,
                        "transaction": tx_join_leave,
                        "one call": one_join_leave,
                        "raw": raw_join_leave,
                    },
                    False,
                ),
                (
                    "promote + demote",
                    {
                        "facade": facade_roles,
                        "transaction": tx_roles,
                        "one call": one_roles,
                        "raw": raw_roles,
                    },
                    True,
                ),
            ):
                if not one_round_trip:
                    del variants["one call"]
                if needs_member:
                    for i, user in enumerate(users):
                        await chat.join(rooms[i % len(rooms)], user)
                for tasks in sorted({1, args.concurrency}):
                    rates: dict[str, list[float]] = {side: [] for side in variants}
                    ratios: dict[str, list[float]] = {side: [] for side in variants}
                    order = list(variants)
                    for round_ in range(args.rounds):
                        # Rotate: no side always runs first, on a warmer or cooler server.
                        turn = order[round_ % len(order) :] + order[: round_ % len(order)]
                        got = {
                            side: await rate(
                                variants[side], owner, rooms, users, tasks, args.seconds
                            )
                            for side in turn
                        }
                        for side in variants:
                            rates[side].append(got[side])
                            ratios[side].append(got[side] / got["raw"])
                    cells = [
                        f"{statistics.median(ratios[side]):>5.2f} "
                        f"({statistics.median(rates[side]):>6,.0f}/s)"
                        if side in variants
                        else f"{'-':>16}"
                        for side in ("facade", "transaction", "one call")
                    ]
                    print(
                        f"{name:<18} {tasks:>5} {statistics.median(rates['raw']):>7,.0f} "
                        + " ".join(f"{cell:>16}" for cell in cells)
                    )
    finally:
        await raw.close()
    print(f"load average: {load_average()}")
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
