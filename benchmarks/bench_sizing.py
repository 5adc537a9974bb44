"""Per-node figures for sizing on paper (docs/scaling.md, "Capacity on paper").

What it measures, each printed with the machine's load average:

* **Storage bytes** (PostgreSQL): in a fresh database migrated to the newest schema, seed
  users and rooms, then memberships, then messages (through the schema's own insert
  trigger, so every message also gets its change-log row, its seq under the room lock, and
  its search-index entries), ``VACUUM ANALYZE``, and measure every table and index with
  ``pg_table_size`` / ``pg_relation_size`` after each phase (a table's and its indexes'
  sum is its ``pg_total_relation_size``; apart, each index shows). The growth of each
  relation in a phase, divided by the rows that phase added, is the bytes per user, per
  room, per membership and per message (heap, each index, change log, search index), with the page
  and fill overheads included, as a database of that shape has them.
* **Redis bytes**: sessions (``SessionStore.create``) and presence (``Presence.connect``
  of one socket in 3 rooms) for 5,000 users (100 with ``--tiny``) in the (flushed) logical
  database of ``--redis-url``; every key's ``MEMORY USAGE`` (``SAMPLES 0``), summed by
  kind, divided by the users.
* **Throughput per busy core**: the facade benchmark's own fixture and calls
  (``bench_facade``: ``send_message`` into 100 rooms, into one hot room, ``history`` pages
  of 50) for ``--seconds``, with the CPU time each side burned meanwhile: this process
  (the application node), the PostgreSQL backends of the benchmark's pool (from
  ``/proc/<pid>/stat``; plus, separately, the server's background processes, which other
  users of a shared server also keep busy), and the Redis server (``INFO cpu``; the whole
  server's, so with a shared server that is an upper bound). Calls per CPU-second are
  calls per second per fully busy core of that component: on a machine whose cores are
  oversubscribed, each call's CPU time includes cache and scheduling losses, so these are
  floors.
* **A Redis of its own**: with ``--start-cluster`` (and no ``--standalone-url``) every
  Redis measurement runs on the throwaway single server the script starts beside the
  cluster, not on ``--redis-url``, so that ``INFO cpu`` counts this run's work alone.
* **Pub/sub** (with ``--cluster-url`` or ``--start-cluster PORT``): the cluster
  benchmark's modes (``bench_cluster_pubsub.run_mode``: one server, classic ``PUBLISH``
  on the cluster, sharded ``SPUBLISH``), each turned into deliveries per server
  CPU-second. Without a cluster, the one-server mode alone, on ``--redis-url``'s server.

Usage::

    python benchmarks/bench_sizing.py --database-url postgresql://root@127.0.0.1:5432/postgres \\
        --redis-url redis://127.0.0.1:6379/7 --start-cluster 7400

The script drops and rebuilds its own database (``--database-name``, by default
``chatkeep_bench_sizing``; ``--drop`` drops it at the end) and FLUSHes the logical Redis
database it is given. ``--tiny`` seeds a few thousand rows and measures for a fraction of
a second (tests/test_benchmarks.py runs it). It prints numbers only: no timed assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import bcrypt
from _args import server_parser
from bench_cluster_pubsub import Node, _cluster_nodes, run_mode
from bench_facade import (
    FULL,
    NO_REAL_LIMIT,
    TINY,
    Op,
    build_fixture,
    database,
    drop_database,
    facade_ops,
    rate,
)
from redis.asyncio.connection import parse_url
from redis.crc import key_slot

from chatkeep import ChatKeep, urls
from chatkeep.config import Settings
from chatkeep.ids import uuid7
from chatkeep.realtime import RedisClient
from chatkeep.realtime.presence import Presence
from chatkeep.realtime.sessions import SessionStore
from chatkeep.realtime.sockets import SocketRegistry
from chatkeep.storage import Database

BENCH_DB = "chatkeep_bench_sizing"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Made-up words for message text: the search index's size depends on distinct words.
WORDS = 4000


@dataclass(frozen=True)
class Shape:
    users: int
    rooms: int
    members_per_room: int
    messages: int
    words_per_message: int
    redis_users: int
    rooms_per_socket: int


FULL_SHAPE = Shape(
    users=2_000,
    rooms=2_000,
    members_per_room=25,
    messages=100_000,
    words_per_message=12,
    redis_users=5_000,
    rooms_per_socket=3,
)
TINY_SHAPE = Shape(
    users=60,
    rooms=30,
    members_per_room=6,
    messages=3_000,
    words_per_message=12,
    redis_users=100,
    rooms_per_socket=3,
)


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# -- storage bytes --------------------------------------------------------------------------

SIZES = """
SELECT c.relname AS name,
       CASE WHEN c.relkind = 'i' THEN i.indrelid::regclass::text ELSE c.relname END AS owner,
       c.relkind = 'i' AS is_index,
       CASE WHEN c.relkind = 'i' THEN pg_relation_size(c.oid) ELSE pg_table_size(c.oid) END
           AS bytes
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_index i ON i.indexrelid = c.oid
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')
"""


@dataclass(frozen=True)
class Relation:
    owner: str  # the table (an index's table)
    is_index: bool


async def relation_sizes(conn: asyncpg.Connection) -> dict[str, tuple[Relation, int]]:
    # Sizes after VACUUM: the visibility and free-space maps exist, as on a live table.
    await conn.execute("VACUUM ANALYZE")
    return {
        row["name"]: (Relation(row["owner"], row["is_index"]), int(row["bytes"]))
        for row in await conn.fetch(SIZES)
    }


@dataclass
class Growth:
    phase: str
    rows: int  # rows of the phase's subject (users, memberships, messages...)
    by_relation: dict[str, tuple[Relation, int]]  # relation -> bytes grown

    def per_row(self, tables: frozenset[str] | None = None) -> float:
        """Bytes grown per row, in every relation or in ``tables`` and their indexes."""
        return (
            sum(
                grown
                for relation, grown in self.by_relation.values()
                if tables is None or relation.owner in tables
            )
            / self.rows
        )


# The tables each phase appends rows to. Any other table that grew was updated (the room
# row's last_seq and position, under its lock): its dead versions are reused once vacuumed,
# so that growth is bounded churn (per room, not per row added), reported apart.
APPENDED = {
    "user": frozenset({"users"}),
    "room": frozenset({"rooms"}),
    "membership": frozenset({"room_users", "room_changes"}),
    "message": frozenset({"messages", "room_changes"}),
}


def growth(
    phase: str,
    rows: int,
    before: dict[str, tuple[Relation, int]],
    after: dict[str, tuple[Relation, int]],
) -> Growth:
    grown = {
        name: (relation, size - before.get(name, (relation, 0))[1])
        for name, (relation, size) in after.items()
        if size != before.get(name, (relation, 0))[1]
    }
    return Growth(phase, rows, grown)


async def measure_storage(url: str, shape: Shape) -> list[Growth]:
    """Seed the shape phase by phase; each phase's growth per row."""
    rng = random.Random(17)
    hashed = bcrypt.hashpw(b"sizing-password", bcrypt.gensalt(4)).decode()
    users = [uuid7() for _ in range(shape.users)]
    rooms = [uuid7() for _ in range(shape.rooms)]
    members = {
        room: rng.sample(users, shape.members_per_room) for room in rooms
    }  # room -> its members
    conn = await asyncpg.connect(url)
    phases: list[Growth] = []
    try:
        before = await relation_sizes(conn)
        await conn.copy_records_to_table(
            "users",
            records=[
                (u, f"sizing_{i}@example.org", f"sizing_{i:06d}", hashed)
                for i, u in enumerate(users)
            ],
            columns=["id", "email", "username", "password_hash"],
        )
        after = await relation_sizes(conn)
        phases.append(growth("user", shape.users, before, after))
        before = after
        await conn.copy_records_to_table(
            "rooms",
            records=[
                (room, f"sizing room {i:06d}", "public", members[room][0])
                for i, room in enumerate(rooms)
            ],
            columns=["id", "name", "type", "created_by"],
        )
        after = await relation_sizes(conn)
        phases.append(growth("room", shape.rooms, before, after))
        before = after
        await conn.copy_records_to_table(
            "room_users",
            records=[(room, u) for room in rooms for u in members[room]],
            columns=["room_id", "user_id"],
        )
        after = await relation_sizes(conn)
        phases.append(growth("membership", shape.rooms * shape.members_per_room, before, after))
        before = after
        # One statement per room: the insert trigger allocates each seq under the room's
        # lock and writes its change-log row, as a send does.
        words = [f"w{k}x{rng.randrange(36**3):x}" for k in range(WORDS)]
        per_room, extra = divmod(shape.messages, shape.rooms)
        started = time.perf_counter()
        for index, room in enumerate(rooms):
            count = per_room + (1 if index < extra else 0)
            if count:
                await conn.execute(
                    """
                    INSERT INTO messages (room_id, user_id, content)
                    SELECT $1, ($2::uuid[])[1 + (g % array_length($2::uuid[], 1))],
                           (SELECT string_agg(($3::text[])[1 + floor(
                                       power(random(), 2) * array_length($3::text[], 1))::int],
                                   ' ')
                              FROM generate_series(1, $4::int) AS w WHERE g > 0)
                      FROM generate_series(1, $5::int) AS g
                    """,
                    room,
                    members[room],
                    words,
                    shape.words_per_message,
                    count,
                )
        seeding = time.perf_counter() - started
        after = await relation_sizes(conn)
        phases.append(growth("message", shape.messages, before, after))
        average = await conn.fetchval("SELECT avg(octet_length(content)) FROM messages")
        print(
            f"seeded {shape.messages:,} messages in {seeding:.1f} s "
            f"(average content {float(average):.0f} bytes, {shape.words_per_message} words "
            f"of {WORDS:,}, skewed); load average {loadavg()}",
            flush=True,
        )
    finally:
        await conn.close()
    return phases


def print_storage(phases: list[Growth]) -> None:
    print("\nPostgreSQL bytes per row (growth after VACUUM ANALYZE / rows added)")
    print(f"{'per':<11} {'relation':<42} {'kind':<6} {'bytes/row':>10}")
    for phase in phases:
        for name, (relation, grown) in sorted(
            phase.by_relation.items(), key=lambda item: (item[1][0].owner, item[1][0].is_index)
        ):
            kind = "index" if relation.is_index else "table"
            label = name if not relation.is_index else f"{relation.owner}.{name}"
            print(f"{phase.phase:<11} {label:<42} {kind:<6} {grown / phase.rows:>10.1f}")
        appended = APPENDED[phase.phase]
        label = "appended rows (" + ", ".join(sorted(appended)) + ")"
        print(f"{phase.phase:<11} {label:<42} {'total':<6} {phase.per_row(appended):>10.1f}")
        print(
            f"{phase.phase:<11} {'every relation (with churn)':<42} {'total':<6} "
            f"{phase.per_row():>10.1f}"
        )


# -- Redis bytes ----------------------------------------------------------------------------


async def measure_redis(redis_url: str, shape: Shape) -> tuple[dict[str, int], int]:
    """Sessions and presence for ``redis_users`` users; MEMORY USAGE summed by key kind."""
    # Generous timeouts: on a loaded machine a burst of scripts may wait more than the
    # default second, and this measures bytes, not latency.
    async with RedisClient(redis_url, socket_timeout=30.0, operation_timeout=30.0) as client:
        await client.redis.flushdb()
        server = await client.redis.info("server")
        name = "valkey" if "valkey_version" in server else "redis"
        print(f"{name} {server.get(f'{name}_version', server.get('redis_version'))}", flush=True)
        sessions = SessionStore(client)
        registry = SocketRegistry(client, node_id="sizing-node")
        presence = Presence(client, registry)
        rooms = [uuid7() for _ in range(max(1, shape.redis_users // 10))]
        rng = random.Random(5)
        users = [uuid7() for _ in range(shape.redis_users)]
        for start in range(0, len(users), 20):
            chunk = users[start : start + 20]
            await asyncio.gather(
                *(sessions.create(u, metadata={"device": "phone", "ip": "10.0.0.1"}) for u in chunk)
            )
            await asyncio.gather(
                *(
                    presence.connect(
                        u, f"sock-{u.hex}", rooms=rng.sample(rooms, shape.rooms_per_socket)
                    )
                    for u in chunk
                )
            )
        by_kind: dict[str, int] = {}
        raw = client.redis
        async for key in raw.scan_iter(count=1000):
            text = key.decode() if isinstance(key, bytes) else str(key)
            kind = _key_kind(text)
            usage = await raw.memory_usage(key, samples=0)
            by_kind[kind] = by_kind.get(kind, 0) + int(usage or 0)
        await raw.flushdb()
    return by_kind, shape.redis_users


def _key_kind(key: str) -> str:
    """``session:<id>`` -> ``session:*``; ``room:<id>:presence`` -> ``room:*:presence``."""
    parts = key.split(":")
    return ":".join(
        part if index == 0 or not _looks_like_id(part) else "*" for index, part in enumerate(parts)
    )


def _looks_like_id(part: str) -> bool:
    bare = part.strip("{}")
    if bare.startswith("sock-") or bare == "sizing-node":
        return True
    try:
        uuid.UUID(bare)
    except ValueError:
        return False
    return True


def print_redis(by_kind: dict[str, int], users: int) -> None:
    print(f"\nRedis bytes per online user (MEMORY USAGE, SAMPLES 0; {users:,} users)")
    for kind, total in sorted(by_kind.items()):
        print(f"{kind:<32} {total / users:>10.1f}")
    print(f"{'TOTAL':<32} {sum(by_kind.values()) / users:>10.1f}")


# -- throughput per busy core ---------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


BACKENDS = """
SELECT pid, backend_type = 'client backend' AND datname = $1 AS ours
  FROM pg_stat_activity
 WHERE (backend_type = 'client backend' AND datname = $1)
    OR backend_type IN ('walwriter', 'checkpointer', 'background writer',
                        'autovacuum launcher', 'autovacuum worker', 'background worker')
"""


@dataclass
class CpuSample:
    client: float
    ours: dict[int, float]
    background: dict[int, float]
    redis: float


async def cpu_sample(admin: asyncpg.Connection, db_name: str, redis: RedisClient) -> CpuSample:
    rows = await admin.fetch(BACKENDS, db_name)
    info = await redis.redis.info("cpu")
    return CpuSample(
        client=time.process_time(),
        ours={r["pid"]: _proc_cpu(r["pid"]) for r in rows if r["ours"]},
        background={r["pid"]: _proc_cpu(r["pid"]) for r in rows if not r["ours"]},
        redis=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
    )


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    # A backend that appeared meanwhile counts from zero; one that went away is lost.
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)


@dataclass
class Throughput:
    name: str
    rate: float  # calls/s, wall clock
    client_cpu: float  # CPU seconds per call
    pg_cpu: float
    pg_background_cpu: float
    redis_cpu: float


async def measure_throughput(
    op: Op,
    name: str,
    *,
    concurrency: int,
    seconds: float,
    rounds: int,
    admin: asyncpg.Connection,
    db_name: str,
    redis: RedisClient,
) -> Throughput:
    """Median round of ``op``; CPU per call of each component over all rounds."""
    rates: list[float] = []
    calls = 0.0
    client = pg = background = redis_cpu = 0.0
    for _ in range(rounds):
        before = await cpu_sample(admin, db_name, redis)
        started = time.perf_counter()
        got = await rate(op, concurrency, seconds, [])
        elapsed = time.perf_counter() - started
        after = await cpu_sample(admin, db_name, redis)
        rates.append(got)
        # rate() warms up before counting: the CPU covers the whole call, so divide it by
        # the calls of the whole call (the measured rate over its full duration).
        calls += got * elapsed
        client += after.client - before.client
        pg += _delta(before.ours, after.ours)
        background += _delta(before.background, after.background)
        redis_cpu += after.redis - before.redis
    return Throughput(
        name,
        statistics.median(rates),
        client / calls,
        pg / calls,
        background / calls,
        redis_cpu / calls,
    )


def print_throughput(results: list[Throughput], concurrency: int) -> None:
    print(
        f"\nThroughput through the facade ({concurrency} tasks; calls/s: median round, wall "
        "clock; CPU: ms per call; per core: calls per CPU-second of that component)"
    )
    print(
        f"{'operation':<22} {'calls/s':>8} {'app ms':>7} {'pg ms':>7} {'pg+bg ms':>9}"
        f" {'redis ms':>9} {'per app core':>13} {'per pg core':>12} {'per pg core+bg':>15}"
        f" {'per redis core':>15}"
    )
    for r in results:
        print(
            f"{r.name:<22} {r.rate:>8,.0f} {r.client_cpu * 1000:>7.2f} {r.pg_cpu * 1000:>7.2f}"
            f" {(r.pg_cpu + r.pg_background_cpu) * 1000:>9.2f} {r.redis_cpu * 1000:>9.3f}"
            f" {_per(r.client_cpu):>13} {_per(r.pg_cpu):>12}"
            f" {_per(r.pg_cpu + r.pg_background_cpu):>15} {_per(r.redis_cpu):>15}"
        )


def _per(cpu: float) -> str:
    return f"{1 / cpu:,.0f}" if cpu > 0 else "-"


async def run_throughput(
    args: argparse.Namespace, url: str, db_name: str, tiny: bool
) -> tuple[list[Throughput], int]:
    sizes = TINY if tiny else FULL
    fx = await build_fixture(url, sizes)
    concurrency = min(args.concurrency, sizes.users) if tiny else args.concurrency
    settings = Settings(
        database_url=urls.with_user(url, "chatapp_app", None), redis_url=args.redis_url
    )
    results: list[Throughput] = []
    admin = await asyncpg.connect(url)
    try:
        async with (
            Database(settings, min_size=concurrency, max_size=concurrency) as db,
            RedisClient.from_settings(settings) as redis,
        ):
            await redis.redis.flushdb()
            chat = ChatKeep(db, redis, node_id="sizing", send_limit=NO_REAL_LIMIT)
            ops = facade_ops(chat, fx)
            for key, label in (
                ("send_100", "send, 100 rooms"),
                ("send_hot", "send, one hot room"),
                ("history", "history page of 50"),
            ):
                results.append(
                    await measure_throughput(
                        ops[key],
                        label,
                        concurrency=concurrency,
                        seconds=args.seconds,
                        rounds=args.rounds,
                        admin=admin,
                        db_name=db_name,
                        redis=redis,
                    )
                )
                print(f"  measured {label}; load average {loadavg()}", flush=True)
            await redis.redis.flushdb()
    finally:
        await admin.close()
    return results, concurrency


# -- pub/sub --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One of bench_cluster_pubsub's modes: where to subscribe and publish."""

    masters: list[Node]  # one subscriber connection each
    every: list[Node]  # every server whose CPU counts
    owner: list[int]  # channel -> index of its master
    sharded: bool


async def run_pubsub(
    cluster_url: str | None, standalone_url: str, tiny: bool
) -> list[tuple[str, float, float, int]]:
    """(mode, msg/s delivered, server CPU s per 10k, servers) of each mode measured."""

    rooms, messages = (30, 600) if tiny else (300, 20_000)
    single = parse_url(standalone_url)
    standalone = Node(str(single.get("host", "127.0.0.1")), int(single.get("port", 6379)))
    prefix = f"sizing-{uuid.uuid4().hex[:8]}:"
    channels = [f"{prefix}room:{{{uuid.uuid4()}}}:events" for _ in range(rooms)]
    one = Mode([standalone] * 3, [standalone], [n % 3 for n in range(rooms)], sharded=False)
    modes: list[tuple[str, Mode]] = [("one server", one)]
    if cluster_url is not None:
        masters, every, slot_owner = _cluster_nodes(cluster_url)
        owner = [slot_owner[key_slot(c.encode())] for c in channels]
        modes.append(("cluster PUBLISH", Mode(masters, every, owner, sharded=False)))
        modes.append(("cluster SPUBLISH", Mode(masters, every, owner, sharded=True)))
    found: list[tuple[str, float, float, int]] = []
    rounds = 1 if tiny else 3
    for name, mode in modes:
        runs = [
            await run_mode(
                masters=mode.masters,
                every=mode.every,
                owner=mode.owner,
                channels=channels,
                messages=messages,
                publishers=4,
                sharded=mode.sharded,
            )
            for _ in range(rounds)
        ]
        found.append(
            (
                name,
                statistics.median(r.rate for r in runs),
                statistics.median(r.cpu_per_10k for r in runs),
                len(mode.every),
            )
        )
    return found


def print_pubsub(found: list[tuple[str, float, float, int]], shared: bool) -> None:
    print(
        "\nPub/sub deliveries (one subscriber connection per shard node; server CPU summed "
        "over every node, replicas included)"
    )
    if shared:
        print("(one server: a shared server's INFO cpu counts others' work too: an upper bound)")
    print(
        f"{'mode':<18} {'servers':>7} {'msg/s delivered':>16} {'CPU s/10k':>10}"
        f" {'msgs per server CPU-s':>22}"
    )
    for name, delivered, cpu, servers in found:
        per = f"{10_000 / cpu:,.0f}" if cpu > 0 else "-"
        print(f"{name:<18} {servers:>7} {delivered:>16,.0f} {cpu:>10.3f} {per:>22}")


# -- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def started_cluster(first_port: int) -> Iterator[tuple[str, str]]:
    """A throwaway 3+3 cluster on first_port.. and a single server: (cluster, single) URLs."""
    from tests.servers import RedisClusterServers, RedisServer, temporary_folder

    folder = Path(temporary_folder("chatkeep-bench-sizing-"))
    try:
        ports = tuple(range(first_port, first_port + 6))
        with (
            RedisClusterServers(folder / "cluster", ports) as cluster,
            RedisServer(folder / "single") as single,
        ):
            yield cluster.url, single.url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def run(args: argparse.Namespace, cluster_url: str | None, single_url: str | None) -> None:
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; load average at start "
        f"{loadavg()}",
        flush=True,
    )
    await drop_database(args.database_url, args.database_name)
    url = await database(args.database_url, args.database_name, fresh=True)
    async with Database(Settings(database_url=url)) as probe:
        version = (await probe.health()).server_version.split()[0]
    print(f"PostgreSQL {version}; database {args.database_name} rebuilt", flush=True)
    try:
        phases = await measure_storage(url, shape)
        print_storage(phases)
        own_redis = single_url is not None and args.redis_url == single_url
        print(
            f"Redis: {args.redis_url} "
            + ("(this run's own server)" if own_redis else "(its CPU counts others' work too)"),
            flush=True,
        )
        by_kind, users = await measure_redis(args.redis_url, shape)
        print_redis(by_kind, users)
        print(f"load average {loadavg()}", flush=True)
        results, concurrency = await run_throughput(args, url, args.database_name, args.tiny)
        print_throughput(results, concurrency)
        found = await run_pubsub(cluster_url, single_url or args.redis_url, args.tiny)
        print_pubsub(found, shared=single_url is None)
        if not own_redis:
            print("(the Redis CPU per call above is the whole shared server's: an upper bound)")
        print(f"load average at the end {loadavg()}")
    finally:
        if args.drop:
            await drop_database(args.database_url, args.database_name)


def main() -> int:
    parser = server_parser(__doc__, database_name=BENCH_DB, redis_db=7, app_password=False)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0, help="per operation and round")
    parser.add_argument("--rounds", type=int, default=3)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cluster-url", help="redis+cluster://host:port of a running cluster")
    where.add_argument(
        "--start-cluster", type=int, metavar="PORT", help="start a 3+3 cluster on PORT..PORT+5"
    )
    parser.add_argument("--standalone-url", help="the one-server pub/sub baseline")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, short rounds")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    args = parser.parse_args()
    if args.concurrency < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--concurrency, --seconds and --rounds must be positive")
    if args.tiny:
        args.seconds, args.rounds = 0.2, 1
    logging.getLogger("chatkeep").setLevel(logging.ERROR)
    if args.start_cluster is not None:
        with started_cluster(args.start_cluster) as (cluster_url, single_url):
            if args.standalone_url is None:
                # A server with nothing else on it: its INFO cpu is this run's work alone.
                args.redis_url = single_url
            asyncio.run(run(args, cluster_url, args.standalone_url or single_url))
    else:
        asyncio.run(run(args, args.cluster_url, args.standalone_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
