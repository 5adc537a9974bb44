"""What does ``send_message`` cost an application? The facade against raw asyncpg, in one run.

Issue 12 measured the facade's send at 0.18x raw asyncpg over 100 rooms and 0.29x in one hot
room: three round trips per send (BEGIN + set_config, the INSERT, COMMIT) with the room row
lock held across the COMMIT's. This benchmark sends messages from ``--concurrency`` tasks
(20), each sending one message after another, for ``--seconds`` per variant and round, over
two workloads: ``100 rooms`` (each task writes to the rooms in turn) and ``hot room`` (every
task writes to one room). The variants:

* ``raw``: asyncpg as a superuser, one statement per message doing the same job (insert with
  the seq and change-log trigger, move the sender's watermark); no row security, no Redis;
* ``3 round trips``: the shape of the send before issue 12 (BEGIN + set_config as
  ``chatapp_app``, the statement, COMMIT), with the rate limit and the publish around it;
* ``facade, group commit off``: ``ChatKeep.send_message`` as ``chatapp_app``, one statement
  (one round trip) per send, rate limit and publish included;
* ``facade, group commit on``: the same with the sends of all tasks gathered into batches.

Two ceilings run in the same rounds, as what bounds the facade on this machine:

* ``ceiling: batched INSERT``: asyncpg as a superuser, ``--batch-size`` messages per
  ``INSERT ... SELECT FROM unnest(...)`` (the seq and change-log triggers run; no row
  security, no watermark, no Redis): the most this server stores with batching;
* ``ceiling: send function``: ``chatkeep_send_messages`` called directly as
  ``chatapp_app`` with batches of ``--batch-size`` (everything the facade's statement does,
  without the facade's client work or Redis).

Each ceiling runs as many batches at once as the group commit has in flight (``--in-flight``):
more full batches at once over 100 rooms mostly wait on each other's room locks.

Last, ``redis work of a batch``: the rate-limit check and the publishes of a batch of 1, 4,
16 and 64 sends (``RateLimiter.check_many``, ``EventBus.publish_many``), one batch after
another, against Redis alone: wall time per batch and client CPU per message. It calls
public methods only, so the same script run with another checkout's ``src`` first on
``PYTHONPATH`` measures that checkout's Redis work (docs/performance.md compares two so).

The facade with group commit also reports its client CPU per message (this process's CPU
time over the messages it sent: what one Python process can carry), and a last part sends
from one task alone: the lone send's latency through the facade against raw's single
insert.

Variants run in turn within each round (the order rotates between rounds), and the script
prints messages/s and p50/p99 latency (medians over rounds) and the median of per-round
ratios against ``raw``. It prints numbers only: no timed assertion.

Run (PostgreSQL and Redis on this machine; the chatapp_* roles must exist, or the script
makes them)::

    python benchmarks/bench_send.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/1

The script works in its own database (``--database-name``, by default
``chatkeep_bench_send``, kept for the next run unless ``--drop``) and FLUSHes the logical
Redis database of ``--redis-url``: give it one of its own. ``--tiny`` measures for a fraction
of a second with few tasks and rooms, so a test can run the whole script in seconds
(tests/test_groupcommit.py does).
"""

from __future__ import annotations

import asyncio
import logging
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
from bench_members import database, drop_database

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.models import CreateMessageDto
from chatkeep.realtime import MessageCreated, RateLimit, RedisClient
from chatkeep.storage import Database
from chatkeep.storage.messages import SEND_MANY

BENCH_DB = "chatkeep_bench_send"
USERS = 20
GENEROUS = RateLimit(limit=1_000_000, period=1.0)

# The same job as the facade's send, in one statement, as a superuser (row security does
# not bind it): store the message (the trigger takes its seq and change-log position under
# the room lock) and move the sender's watermark to it.
RAW_SEND = """
WITH inserted AS (
    INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type)
    VALUES ($1, $2, $3, $4, $5, 'text')
    RETURNING id, room_id, user_id, seq, client_msg_id, content, type, is_edited, edited_at,
              created_at
), seen AS (
    UPDATE room_users SET last_read_seq = inserted.seq, last_read_at = inserted.created_at
      FROM inserted
     WHERE room_users.room_id = $2 AND room_users.user_id = $3
       AND room_users.last_read_seq < inserted.seq
)
SELECT * FROM inserted
"""
# The batched-INSERT ceiling: a batch in one statement, rows in room order (the seq trigger
# takes the room locks in one order, so concurrent batches never deadlock).
RAW_BATCH = """
INSERT INTO messages (id, room_id, user_id, content)
SELECT b.id, b.room_id, b.user_id, b.content
  FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) AS b(id, room_id, user_id, content)
 ORDER BY b.room_id
"""
# The statement the send sent inside its transaction before issue 12 (the guards of
# membership and active room in the statement, row security around it).
OLD_SEND = """
WITH inserted AS (
    INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type)
    SELECT $1, $2, $3, $4, $5, 'text'
     WHERE EXISTS (SELECT 1 FROM rooms WHERE id = $2 AND is_active)
       AND EXISTS (SELECT 1 FROM room_users WHERE room_id = $2 AND user_id = $3)
    RETURNING id, room_id, user_id, seq, client_msg_id, content, type, is_edited, edited_at,
              created_at, nullif(current_setting('chatkeep.position', true), '')::bigint AS pos
), seen AS (
    UPDATE room_users SET last_read_seq = inserted.seq, last_read_at = inserted.created_at
      FROM inserted
     WHERE room_users.room_id = $2 AND room_users.user_id = $3
       AND room_users.last_read_seq < inserted.seq
)
SELECT * FROM inserted
"""


@dataclass(frozen=True)
class Place:
    users: list[uuid.UUID]
    rooms: list[uuid.UUID]
    hot: uuid.UUID


async def build(url: str, rooms: int) -> Place:
    """``USERS`` users, each a member of ``rooms`` public rooms and of one hot room."""
    conn = await asyncpg.connect(url)
    try:
        tag = f"send{rooms}"
        found = await conn.fetch(
            "SELECT id FROM rooms WHERE name LIKE $1 ORDER BY name", f"{tag} %"
        )
        if len(found) != rooms + 1:
            return await _seed(conn, tag, rooms)
        room_ids = [r["id"] for r in found]
        users = [
            r["user_id"]
            for r in await conn.fetch(
                "SELECT user_id FROM room_users WHERE room_id = $1 ORDER BY user_id", room_ids[0]
            )
        ]
        return Place(users, room_ids[1:], room_ids[0])
    finally:
        await conn.close()


async def _seed(conn: asyncpg.Connection, tag: str, rooms: int) -> Place:
    hashed = bcrypt.hashpw(b"bench-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(USERS)]
    room_ids = [uuid7() for _ in range(rooms + 1)]
    async with conn.transaction():
        await conn.copy_records_to_table(
            "users",
            records=[
                (u, f"{tag}_{i}@example.org", f"{tag}_{i}", hashed) for i, u in enumerate(users)
            ],
            columns=["id", "email", "username", "password_hash"],
        )
        # "send20 0000" is the hot room: it sorts first.
        await conn.copy_records_to_table(
            "rooms",
            records=[(r, f"{tag} {i:04d}", "public", users[0]) for i, r in enumerate(room_ids)],
            columns=["id", "name", "type", "created_by"],
        )
        await conn.copy_records_to_table(
            "room_users",
            records=[(r, u) for r in room_ids for u in users],
            columns=["room_id", "user_id"],
        )
    await conn.execute("VACUUM ANALYZE users, rooms, room_users")
    return Place(users, room_ids[1:], room_ids[0])


Send = Callable[[uuid.UUID, uuid.UUID, str], Awaitable[Any]]


@dataclass
class Measured:
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # this process's CPU time per message


def batch_of(
    statement: str, pool: asyncpg.Pool, size: int, *, function: bool = False
) -> Callable[[Place, bool, int], Awaitable[int]]:
    """A ceiling's call: ``size`` messages in one statement; returns how many it stored."""

    async def call(place: Place, hot: bool, k: int) -> int:
        rooms = [place.hot if hot else place.rooms[(k + j) % len(place.rooms)] for j in range(size)]
        users = [place.users[(k + j) % len(place.users)] for j in range(size)]
        ids = [uuid7() for _ in range(size)]
        texts = [f"ceiling {k}-{j}" for j in range(size)]
        if function:
            nothing: list[Any] = [None] * size
            rows = await pool.fetch(
                statement, ids, rooms, users, nothing, texts, ["text"] * size, nothing
            )
            return sum(1 for row in rows if row["outcome"] == "sent")
        await pool.execute(statement, ids, rooms, users, texts)
        return size

    return call


async def measure_batches(
    call: Callable[[Place, bool, int], Awaitable[int]],
    place: Place,
    hot: bool,
    tasks: int,
    seconds: float,
) -> Measured:
    """Messages per second stored by ``call`` (whole batches) from ``tasks`` tasks."""
    latencies: list[float] = []
    stored = 0
    stop = False
    counting = False
    counted = asyncio.Event()

    async def worker(index: int) -> None:
        nonlocal stored
        k = index * 7
        while not stop:
            started = time.perf_counter()
            n = await call(place, hot, k)
            if counting:
                stored += n
                latencies.append(time.perf_counter() - started)
                counted.set()
            k += 1

    running = [asyncio.create_task(worker(i)) for i in range(tasks)]
    await asyncio.sleep(min(0.3, seconds / 4))
    counting = True
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    await counted.wait()
    done = stored
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*running)
    ordered = sorted(latencies)
    return Measured(
        rate=done / elapsed,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    )


async def measure(send: Send, place: Place, hot: bool, tasks: int, seconds: float) -> Measured:
    """Messages per second and latencies of ``send`` from ``tasks`` concurrent tasks."""
    latencies: list[float] = []
    stop = False
    counting = False
    counted = asyncio.Event()

    async def worker(index: int) -> None:
        user = place.users[index % len(place.users)]
        k = 0
        while not stop:
            room = place.hot if hot else place.rooms[(index * 7 + k) % len(place.rooms)]
            started = time.perf_counter()
            await send(room, user, f"message {index}-{k}")
            if counting:
                latencies.append(time.perf_counter() - started)
                counted.set()
            k += 1

    running = [asyncio.create_task(worker(i)) for i in range(tasks)]
    await asyncio.sleep(min(0.3, seconds / 4))  # warm-up: statements prepared, pools full
    counting = True
    start = time.perf_counter()
    cpu = time.process_time()
    await asyncio.sleep(seconds)
    await counted.wait()  # a loaded machine may finish nothing in a short window
    done = len(latencies)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stop = True
    await asyncio.gather(*running)
    ordered = sorted(latencies)
    return Measured(
        rate=done / elapsed,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        cpu_us=cpu / max(done, 1) * 1e6,
    )


async def redis_work(chat: ChatKeep, place: Place, batches: int) -> None:
    """Time a batch's Redis work alone: the senders' rate limits, then the publishes."""
    print(f"\nredis work of a batch ({batches} batches each, load average {_load()}):")
    for size in (1, 4, 16, 64):
        walls: list[float] = []
        cpu = 0.0
        for k in range(batches):
            senders = [str(place.users[j % len(place.users)]) for j in range(size)]
            events = [
                MessageCreated(
                    position=k * size + j + 1,
                    room_id=place.rooms[(k * size + j) % len(place.rooms)],
                    message_id=uuid7(),
                    seq=k + 1,
                    sender_id=place.users[j % len(place.users)],
                    body="hello",
                    origin="bench",
                )
                for j in range(size)
            ]
            started, used = time.perf_counter(), time.process_time()
            await chat.limiter.check_many(senders, "send")
            await chat.events.publish_many(events)
            walls.append(time.perf_counter() - started)
            cpu += time.process_time() - used
        print(
            f"batch of {size:>2}: wall per batch p50 {statistics.median(walls) * 1000:.2f} ms, "
            f"client CPU {cpu / (batches * size) * 1e6:.0f} µs per message"
        )


def _load() -> str:
    try:
        with open("/proc/loadavg") as found:
            return " ".join(found.read().split()[:3])
    except OSError:  # not Linux
        return "unknown"


async def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=1)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--pool-size", type=int, default=None, help="connections per side (min(tasks, 20))"
    )
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--in-flight",
        type=int,
        default=None,
        help="send_batches_in_flight of the group commit (default: the setting's default)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="send_batch_size, and the ceilings' batch"
    )
    parser.add_argument("--tiny", action="store_true", help="few rooms, short rounds")
    parser.add_argument("--fresh", action="store_true", help="drop and rebuild the database")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = parser.parse_args()
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    if args.tiny:
        args.rooms, args.seconds, args.rounds = 4, 0.2, 1
        args.concurrency = min(args.concurrency, 4)

    url = await database(args.database_url, args.database_name, fresh=args.fresh)
    place = await build(url, args.rooms)
    app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
    n = args.concurrency
    pool_size = args.pool_size or min(n, 20)
    in_flight = {} if args.in_flight is None else {"send_batches_in_flight": args.in_flight}
    on = Settings(
        database_url=app_url,
        redis_url=args.redis_url,
        send_batch_size=args.batch_size,
        **in_flight,
    )
    raw_pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    app_pool = await asyncpg.create_pool(app_url, min_size=pool_size, max_size=pool_size)
    assert raw_pool is not None
    assert app_pool is not None
    try:
        async with (
            Database(on, min_size=pool_size, max_size=pool_size) as db,
            RedisClient.from_settings(on) as redis,
        ):
            await redis.redis.flushdb()
            # One pool for every facade variant (the server's connection slots are shared);
            # the group commit is switched off on one facade as send_group_commit=False does.
            chat_on = ChatKeep(db, redis, node_id="bench-on", send_limit=GENEROUS)
            chat_off = ChatKeep(db, redis, node_id="bench-off", send_limit=GENEROUS)
            chat_off.send_batcher = None

            async def raw(room: uuid.UUID, user: uuid.UUID, text: str) -> Any:
                return await raw_pool.fetchrow(RAW_SEND, uuid7(), room, user, None, text)

            async def three_round_trips(room: uuid.UUID, user: uuid.UUID, text: str) -> Any:
                # The flow before issue 12: limit, BEGIN + set_config, statement, COMMIT,
                # publish.
                dto = CreateMessageDto(room_id=room, user_id=user, content=text)
                await chat_off.limiter.enforce(str(user), "send")
                async with db.acting_as(user, "bench.old_send"):
                    row = await db.fetchrow(
                        "bench.old_send", OLD_SEND, uuid7(), room, user, None, dto.content
                    )
                assert row is not None
                await chat_off.events.publish_many(
                    [
                        MessageCreated(
                            position=row["pos"],
                            room_id=room,
                            message_id=row["id"],
                            seq=row["seq"],
                            sender_id=user,
                            body=text,
                        )
                    ]
                )
                return row

            variants: dict[str, Send] = {
                "raw": raw,
                "3 round trips": three_round_trips,
                "facade, group commit off": chat_off.send_message,
                "facade, group commit on": chat_on.send_message,
            }
            ceilings = {
                "ceiling: batched INSERT": batch_of(RAW_BATCH, raw_pool, args.batch_size),
                "ceiling: send function": batch_of(
                    SEND_MANY, app_pool, args.batch_size, function=True
                ),
            }
            print(
                f"{n} tasks on pools of {pool_size}, {args.rounds} rounds of {args.seconds:g} s "
                f"per variant; {args.rooms} rooms and one hot room, {USERS} senders in each; "
                f"group commit of up to {args.batch_size} sends, "
                f"{on.send_batches_in_flight} batch(es) in flight; "
                f"load average {_load()}"
            )
            for workload, hot in ((f"{args.rooms} rooms", False), ("hot room", True)):
                results: dict[str, list[Measured]] = {name: [] for name in variants}
                ratios: dict[str, list[float]] = {name: [] for name in variants}
                names = [*variants, *ceilings]
                results.update({name: [] for name in ceilings})
                ratios.update({name: [] for name in ceilings})
                for round_ in range(args.rounds):
                    order = names[round_ % len(names) :] + names[: round_ % len(names)]
                    measured = {
                        name: await (
                            measure(variants[name], place, hot, n, args.seconds)
                            if name in variants
                            else measure_batches(
                                ceilings[name], place, hot, on.send_batches_in_flight, args.seconds
                            )
                        )
                        for name in order
                    }
                    for name in names:
                        results[name].append(measured[name])
                        ratios[name].append(measured[name].rate / measured["raw"].rate)
                print(f"\n{workload} (load average {_load()}):")
                print(
                    f"{'variant':<26} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'÷ raw':>7}"
                    f" {'CPU µs/msg':>11}"
                )
                for name in names:
                    rate = statistics.median(m.rate for m in results[name])
                    p50 = statistics.median(m.p50_ms for m in results[name])
                    p99 = statistics.median(m.p99_ms for m in results[name])
                    ratio = statistics.median(ratios[name])
                    cpu = (
                        f"{statistics.median(m.cpu_us for m in results[name]):>11.0f}"
                        if name in variants
                        else f"{'(batches)':>11}"
                    )
                    print(f"{name:<26} {rate:>9,.0f} {p50:>8.2f} {p99:>8.2f} {ratio:>7.2f} {cpu}")
                per_round = " ".join(f"{r:.2f}" for r in ratios["facade, group commit on"])
                print(f"group commit on ÷ raw per round: {per_round}")
            # A lone sender: one task, nothing else running (the group commit must make it
            # wait for no timer); the latency against raw's single insert.
            lone: dict[str, list[Measured]] = {"raw": [], "facade, group commit on": []}
            for round_ in range(args.rounds):
                for name in list(lone)[round_ % 2 :] + list(lone)[: round_ % 2]:
                    lone[name].append(
                        await measure(variants[name], place, False, 1, args.seconds / 2)
                    )
            raw_p50 = statistics.median(m.p50_ms for m in lone["raw"])
            on_p50 = statistics.median(m.p50_ms for m in lone["facade, group commit on"])
            print(
                f"\nlone send (1 task, load average {_load()}): raw p50 {raw_p50:.2f} ms, "
                f"facade p50 {on_p50:.2f} ms, facade ÷ raw latency {on_p50 / raw_p50:.2f}"
            )
            await redis_work(chat_on, place, 30 if args.tiny else 300)
            batcher = chat_on.send_batcher
            assert batcher is not None
            print(
                f"\ngroup commit: {batcher.sends:,} sends in {batcher.batches:,} batches "
                f"({batcher.sends / max(batcher.batches, 1):.1f} per batch)"
            )
            await chat_on.close()
            await chat_off.close()
    finally:
        await raw_pool.close()
        await app_pool.close()
    if args.drop:
        await drop_database(args.database_url, args.database_name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
