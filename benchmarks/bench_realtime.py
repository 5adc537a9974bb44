"""Realtime benchmark: chatkeep's Redis services against plain redis-py doing the same.

Each operation runs at 20 concurrent tasks, once through chatkeep and once through a plain
redis-py client with the same connection settings sending the same commands (the same
pipeline, the same Lua script, the same JSON payload), alternating over several rounds in
the same run in back-to-back pairs; the medians are reported, with the median of the
per-pair ratios chatkeep/raw. Then
10,000 heartbeats are sent through ``Presence.heartbeat_many`` over a connection that
counts its writes, to show they travel in one pipelined round trip per batch
(the ``INFO commandstats`` delta gives the commands the server ran meanwhile: on a shared
server it includes other clients').

Usage::

    python benchmarks/bench_realtime.py --url redis://127.0.0.1:6379/0

Keys are written under a random ``bench-<hex>:`` prefix and deleted afterwards; nothing else
in the database is touched. ``--tiny`` runs one round of 20 operations per task and a batch
test of 500 users, so a test or CI can run the whole script in seconds
(tests/test_benchmarks.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from chatkeep.realtime import (
    EventBus,
    Heartbeat,
    MessageCreated,
    Presence,
    RateLimit,
    RateLimiter,
    RedisClient,
    SocketRegistry,
    TypingIndicators,
)
from chatkeep.realtime.ratelimit import _GCRA

TASKS = 20
TIMEOUT_MS = 60_000
TYPING_MS = 5_000
SEND = RateLimit(1_000_000, 1.0)  # never denies: the benchmark measures the check itself

Op = Callable[[int, int], Awaitable[Any]]


async def run(op: Op, *, tasks: int, per_task: int) -> float:
    """Run ``op(task, n)`` ``per_task`` times in each of ``tasks`` tasks; return ops/s."""

    async def worker(task: int) -> None:
        for n in range(per_task):
            await op(task, n)

    started = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in range(tasks)))
    return tasks * per_task / (time.perf_counter() - started)


class Fixture:
    """Ids shared by both sides, so both touch the same shapes of keys."""

    def __init__(self, tasks: int) -> None:
        self.users = [uuid4() for _ in range(tasks)]
        self.room = uuid4()
        self.sockets = [f"sock-{t}" for t in range(tasks)]


def chatkeep_ops(client: RedisClient, fx: Fixture) -> dict[str, Op]:
    registry = SocketRegistry(client, node_id="bench-node")
    presence = Presence(client, registry, timeout=TIMEOUT_MS / 1000)
    typing = TypingIndicators(client, ttl=TYPING_MS / 1000)
    limiter = RateLimiter(client, {"send": SEND})
    bus = EventBus(client, node_id="bench-node")
    rooms = frozenset({fx.room})

    async def heartbeat(t: int, n: int) -> None:
        await presence.heartbeat(fx.users[t], fx.sockets[t], rooms=rooms)

    async def typing_start(t: int, n: int) -> None:
        await typing.start(fx.room, fx.users[t])

    async def rate_check(t: int, n: int) -> None:
        await limiter.check(str(fx.users[t]), "send")

    async def publish(t: int, n: int) -> None:
        await bus.publish(
            MessageCreated(
                room_id=fx.room, message_id=uuid4(), seq=n + 1, sender_id=fx.users[t], body="hi"
            )
        )

    return {
        "presence heartbeat": heartbeat,
        "typing start": typing_start,
        "rate-limit check": rate_check,
        "publish event": publish,
    }


def raw_ops(raw: aioredis.Redis, prefix: str, fx: Fixture) -> dict[str, Op]:
    """The same commands written by hand, as an application without chatkeep would."""
    gcra = raw.register_script(_GCRA)
    interval = repr(SEND.emission_interval_ms)
    room = str(fx.room)

    async def heartbeat(t: int, n: int) -> None:
        user, sock = str(fx.users[t]), fx.sockets[t]
        now = int(time.time() * 1000)
        deadline = now + TIMEOUT_MS
        pipe = raw.pipeline(transaction=False)
        pipe.zadd(f"{prefix}presence:deadlines", {user: deadline}, gt=True)
        pipe.set(f"{prefix}presence:{user}", now, px=TIMEOUT_MS, get=True)
        pipe.hset(f"{prefix}socket:{sock}", mapping={"u": user, "n": "bench-node", "r": room})
        pipe.pexpire(f"{prefix}socket:{sock}", TIMEOUT_MS)
        pipe.zadd(f"{prefix}user:{user}:sockets", {sock: deadline})
        pipe.pexpire(f"{prefix}user:{user}:sockets", TIMEOUT_MS)
        pipe.zadd(f"{prefix}node:bench-node:sockets", {sock: deadline})
        pipe.pexpire(f"{prefix}node:bench-node:sockets", TIMEOUT_MS)
        pipe.zadd(f"{prefix}room:{room}:presence", {user: deadline}, gt=True)
        pipe.pexpire(f"{prefix}room:{room}:presence", TIMEOUT_MS)
        await pipe.execute()

    async def typing_start(t: int, n: int) -> None:
        key = f"{prefix}typing:{room}"
        pipe = raw.pipeline(transaction=False)
        pipe.zadd(key, {str(fx.users[t]): int(time.time() * 1000) + TYPING_MS})
        pipe.pexpire(key, TYPING_MS, gt=True)
        pipe.pexpire(key, TYPING_MS, nx=True)
        await pipe.execute()

    async def rate_check(t: int, n: int) -> None:
        await gcra(keys=[f"{prefix}ratelimit:send:{fx.users[t]}"], args=[interval, SEND.limit, 1])

    async def publish(t: int, n: int) -> None:
        payload = {
            "v": 1,
            "event_id": str(uuid4()),
            "room_id": room,
            "occurred_at": datetime.now(UTC).isoformat(),
            "origin": "bench-node",
            "type": "message.created",
            "message_id": str(uuid4()),
            "seq": n + 1,
            "sender_id": str(fx.users[t]),
            "client_msg_id": None,
            "body": "hi",
        }
        await raw.publish(f"{prefix}room:{room}:events", json.dumps(payload))

    return {
        "presence heartbeat": heartbeat,
        "typing start": typing_start,
        "rate-limit check": rate_check,
        "publish event": publish,
    }


async def heartbeat_round_trips(url: str, prefix: str, users: int, batch: int) -> dict[str, Any]:
    """Send ``users`` heartbeats and count the writes (round trips) that carried them."""
    writes = [0]

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            writes[0] += 1
            await super().send_packed_command(command, check_health)

    async with RedisClient(url, key_prefix=prefix, connection_class=CountingConnection) as client:
        await client.ping()  # connect and handshake before counting
        presence = Presence(client, SocketRegistry(client, node_id="bench-node"), batch_size=batch)
        room = uuid4()
        beats = [Heartbeat(uuid4(), f"s-{n}", frozenset({room})) for n in range(users)]
        before_stats = await client.redis.info("commandstats")
        before = writes[0]
        started = time.perf_counter()
        came_online = await presence.heartbeat_many(beats)
        elapsed = time.perf_counter() - started
        round_trips = writes[0] - before
        after_stats = await client.redis.info("commandstats")
    commands = _command_count(after_stats) - _command_count(before_stats) - 1  # minus INFO
    return {
        "users": users,
        "batch": batch,
        "round_trips": round_trips,
        "commands": commands,
        "seconds": elapsed,
        "came_online": len(came_online),
    }


def _command_count(stats: dict[str, Any]) -> int:
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def cleanup(raw: aioredis.Redis, prefix: str) -> int:
    deleted = 0
    async for key in raw.scan_iter(f"{prefix}*", count=1000):
        deleted += int(await raw.unlink(key))
    return deleted


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument("--per-task", type=int, default=500, help="operations per task")
    parser.add_argument("--rounds", type=int, default=7, help="back-to-back pairs per operation")
    parser.add_argument("--users", type=int, default=10_000, help="users in the batch test")
    parser.add_argument(
        "--raw-without-timeouts",
        action="store_true",
        help="give the raw client no socket timeout (redis-py's default)",
    )
    parser.add_argument("--tiny", action="store_true", help="one short round (seconds)")
    args = parser.parse_args()
    if args.tiny:
        args.per_task, args.rounds, args.users = 20, 1, 500

    prefix = f"bench-{secrets.token_hex(4)}:"
    fx = Fixture(TASKS)
    # The raw client gets the connection settings RedisClient uses (a bounded blocking
    # pool, socket and connect timeouts, health checks), so the ratio measures chatkeep's
    # own code. --raw-without-timeouts shows what redis-py's socket timeout costs by itself.
    timeouts: dict[str, Any] = (
        {}
        if args.raw_without_timeouts
        else {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, "health_check_interval": 30}
    )
    pool = aioredis.BlockingConnectionPool.from_url(
        args.url, max_connections=50, timeout=5, **timeouts
    )
    raw = aioredis.Redis(connection_pool=pool)
    client = RedisClient(args.url, key_prefix=prefix, max_connections=50)
    info = await raw.info("server")
    server = (
        f"{info.get('server_name', 'redis')} {info.get('valkey_version') or info['redis_version']}"
    )
    print(
        f"server: {server} at {args.url}; {TASKS} concurrent tasks x {args.per_task} ops, "
        f"medians of {args.rounds} back-to-back pairs"
    )
    try:
        ours = chatkeep_ops(client, fx)
        theirs = raw_ops(raw, prefix, fx)
        print(f"{'operation':<20} {'chatkeep ops/s':>15} {'raw ops/s':>12} {'ratio':>7}")
        ratios = []
        for name in ours:
            # Warm both sides (pools, script cache), then alternate so drift hits both.
            await run(ours[name], tasks=TASKS, per_task=20)
            await run(theirs[name], tasks=TASKS, per_task=20)
            mine: list[float] = []
            plain: list[float] = []
            for round_no in range(args.rounds):
                # Back-to-back pairs, order swapped every round: load from other processes
                # drifts slowly, so each pair sees about the same machine.
                pair = [(theirs[name], plain), (ours[name], mine)]
                for op, sink in pair if round_no % 2 == 0 else reversed(pair):
                    sink.append(await run(op, tasks=TASKS, per_task=args.per_task))
            ratio = statistics.median(m / p for m, p in zip(mine, plain, strict=True))
            ratios.append(ratio)
            print(
                f"{name:<20} {statistics.median(mine):>15,.0f} "
                f"{statistics.median(plain):>12,.0f} {ratio:>7.2f}"
            )
        print(f"{'geometric mean':<20} {'':>15} {'':>12} {statistics.geometric_mean(ratios):>7.2f}")

        for batch in (args.users, max(1, args.users // 4)):
            result = await heartbeat_round_trips(args.url, prefix, args.users, batch)
            print(
                f"heartbeat_many: {result['users']:,} users, batch {result['batch']:,}: "
                f"{result['round_trips']} round trip(s), {result['commands']:,} server commands, "
                f"{result['seconds'] * 1000:,.0f} ms, {result['came_online']:,} came online"
            )
    finally:
        deleted = await cleanup(raw, prefix)
        print(f"cleaned up {deleted:,} keys under {prefix}")
        await client.aclose()
        await raw.aclose()
        await pool.aclose()


if __name__ == "__main__":
    asyncio.run(main())
