"""Pub/sub on a Redis Cluster: classic PUBLISH against sharded SPUBLISH, and one server.

Room channels are spread over the shards (``room:{<id>}:events``, hash-tagged as chatkeep
names them). For each mode, one subscriber connection per shard node (as chatkeep's
sharded hub holds) listens to the rooms that node owns, and ``--publishers`` tasks publish
``--messages`` events, pipelined per node, each to the node that owns its room:

* ``standalone``: one server, classic ``SUBSCRIBE``/``PUBLISH`` (the baseline: three
  subscriber connections to it, the rooms split between them);
* ``cluster-classic``: ``SUBSCRIBE``/``PUBLISH`` on the cluster; every message is also
  copied over the cluster bus to every other node (replicas included);
* ``cluster-sharded``: ``SSUBSCRIBE``/``SPUBLISH``; a message stays on its shard (and its
  replica).

Reported per mode (median of ``--rounds``): messages/s delivered to the subscribers (from
the first publish to the last delivery) and the servers' CPU seconds per 10,000 messages
(``INFO cpu`` deltas summed over every node of the store, replicas included), then the
ratios against the baseline measured in the same run. On a small machine the client (one
Python process parsing every delivery) bounds messages/s; the CPU column shows what
the servers pay, which is where classic pub/sub's copy to every node shows.

Usage::

    python benchmarks/bench_cluster_pubsub.py --standalone-url redis://127.0.0.1:6379/0 \\
        --cluster-url redis+cluster://127.0.0.1:7100
    # or let it start a throwaway 3+3 cluster on ports 7100-7105 (run from the repo root):
    # (and a throwaway single server for the baseline, of the same software):
    PYTHONPATH=src:. python benchmarks/bench_cluster_pubsub.py --start-cluster 7100

Channels carry a random prefix; nothing is written to any key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.crc import key_slot

BATCH = 100


@dataclass(frozen=True)
class Node:
    host: str
    port: int


@dataclass
class Result:
    rate: float
    cpu_per_10k: float


def _cluster_nodes(url: str) -> tuple[list[Node], list[Node], dict[int, int]]:
    """Masters, every node, and slot -> index of its master, from CLUSTER SLOTS."""
    parts = parse_url(url.replace("+cluster", "", 1))
    seed = redis.Redis(host=parts.get("host", "127.0.0.1"), port=int(parts.get("port", 6379)))
    with seed:
        slots = seed.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    masters: list[Node] = []
    every: list[Node] = []
    owner: dict[int, int] = {}
    for start, end, master, *replicas in slots:
        node = Node(
            str(master[0], "ascii") if isinstance(master[0], bytes) else master[0], int(master[1])
        )
        if node not in masters:
            masters.append(node)
        index = masters.index(node)
        for slot in range(int(start), int(end) + 1):
            owner[slot] = index
        for entry in (master, *replicas):
            host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
            found = Node(host, int(entry[1]))
            if found not in every:
                every.append(found)
    return masters, every, owner


def _cpu(nodes: list[Node]) -> float:
    total = 0.0
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as probe:
            info = probe.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


async def _listen(
    pubsub: PubSub, kind: str, counter: list[int], done: asyncio.Event, want: int
) -> None:
    while not done.is_set():
        message = await pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == kind:
            counter[0] += 1
            if counter[0] >= want:
                done.set()


async def _subscribe(pubsub: PubSub, channels: list[str], sharded: bool) -> None:
    await pubsub.connect()  # type: ignore[no-untyped-call]
    if sharded:
        for channel in channels:  # one slot per SSUBSCRIBE
            await pubsub.ssubscribe(channel)
    else:
        await pubsub.subscribe(*channels)
    confirmed = 0
    kind = "ssubscribe" if sharded else "subscribe"
    while confirmed < len(channels):
        message = await pubsub.get_message(timeout=5)
        if message is None:
            raise RuntimeError("subscriptions were not confirmed")
        if message["type"] == kind:
            confirmed += 1


def _chunks(items: list[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def run_mode(
    *,
    masters: list[Node],
    every: list[Node],
    owner: list[int],
    channels: list[str],
    messages: int,
    publishers: int,
    sharded: bool,
) -> Result:
    """Subscribe one connection per master to its channels, publish, time the deliveries."""
    subscribers = [aioredis.Redis(host=n.host, port=n.port) for n in masters]
    pubsubs = [client.pubsub() for client in subscribers]
    by_node: list[list[str]] = [[] for _ in masters]
    for channel, index in zip(channels, owner, strict=True):
        by_node[index].append(channel)
    for pubsub, mine in zip(pubsubs, by_node, strict=True):
        if mine:
            await _subscribe(pubsub, mine, sharded)
    publish = "SPUBLISH" if sharded else "PUBLISH"
    payload = b'{"v":1,"type":"message.created","content":"' + b"x" * 200 + b'"}'
    counter = [0]
    done = asyncio.Event()
    kind = "smessage" if sharded else "message"
    listeners = [
        asyncio.create_task(_listen(p, kind, counter, done, messages))
        for p, mine in zip(pubsubs, by_node, strict=True)
        if mine
    ]
    plan = [(owner[n % len(channels)], channels[n % len(channels)]) for n in range(messages)]
    senders = [
        [aioredis.Redis(host=n.host, port=n.port) for n in masters] for _ in range(publishers)
    ]

    async def publisher(task: int) -> None:
        mine = plan[task::publishers]
        for chunk in _chunks(mine, BATCH):
            pipes = {}
            for index, channel in chunk:
                if index not in pipes:
                    pipes[index] = senders[task][index].pipeline(transaction=False)
                pipes[index].execute_command(publish, channel, payload)
            await asyncio.gather(*(pipe.execute() for pipe in pipes.values()))

    cpu_before = await asyncio.to_thread(_cpu, every)
    started = time.perf_counter()
    await asyncio.gather(*(publisher(t) for t in range(publishers)))
    async with asyncio.timeout(120):
        await done.wait()
    elapsed = time.perf_counter() - started
    cpu_after = await asyncio.to_thread(_cpu, every)
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    for pubsub in pubsubs:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    for client in subscribers + [c for row in senders for c in row]:
        await client.aclose()
    return Result(messages / elapsed, (cpu_after - cpu_before) / messages * 10_000)


async def main(args: argparse.Namespace, cluster_url: str) -> None:
    masters, every, slot_owner = _cluster_nodes(cluster_url)
    single = parse_url(args.standalone_url)
    standalone = Node(str(single.get("host", "127.0.0.1")), int(single.get("port", 6379)))
    prefix = f"bench-{secrets.token_hex(4)}:"
    channels = [f"{prefix}room:{{{uuid4()}}}:events" for _ in range(args.rooms)]
    owner = [slot_owner[key_slot(c.encode())] for c in channels]
    # The baseline: the same three subscriber connections, all to the one server.
    split = [n % len(masters) for n in range(len(channels))]
    modes = {
        "standalone": {
            "masters": [standalone] * len(masters),
            "every": [standalone],
            "owner": split,
            "sharded": False,
        },
        "cluster-classic": {"masters": masters, "every": every, "owner": owner, "sharded": False},
        "cluster-sharded": {"masters": masters, "every": every, "owner": owner, "sharded": True},
    }
    results: dict[str, list[Result]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, mode in modes.items():
            results[name].append(
                await run_mode(
                    channels=channels,
                    messages=args.messages,
                    publishers=args.publishers,
                    **mode,  # type: ignore[arg-type]
                )
            )
    print(
        f"{args.rooms} rooms over {len(masters)} shards, {args.messages} messages x "
        f"{args.rounds} round(s), {args.publishers} publishers, 1 subscriber connection "
        f"per shard node; medians"
    )
    print(f"{'mode':<18} {'msg/s delivered':>16} {'server CPU s/10k':>17}")
    medians: dict[str, Result] = {}
    for name, runs in results.items():
        medians[name] = Result(
            statistics.median(r.rate for r in runs), statistics.median(r.cpu_per_10k for r in runs)
        )
        print(f"{name:<18} {medians[name].rate:>16,.0f} {medians[name].cpu_per_10k:>17.3f}")
    base, classic, sharded = (medians[n] for n in modes)
    print(f"ratio msg/s sharded/classic: {sharded.rate / classic.rate:.2f}")
    print(f"ratio msg/s sharded/standalone: {sharded.rate / base.rate:.2f}")
    if sharded.cpu_per_10k > 0:
        print(f"ratio server CPU classic/sharded: {classic.cpu_per_10k / sharded.cpu_per_10k:.2f}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--standalone-url",
        help="the single-server baseline (default with --start-cluster: a throwaway one)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster-url", help="redis+cluster://host:port of a running cluster")
    where.add_argument(
        "--start-cluster", type=int, metavar="PORT", help="start a 3+3 cluster on PORT..PORT+5"
    )
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a few seconds (tests and CI)")
    args = parser.parse_args()
    if args.tiny:
        args.rooms, args.messages, args.rounds, args.publishers = 30, 600, 1, 2
    with contextlib.ExitStack() as stack:
        url = args.cluster_url
        if url is None:
            from tests.servers import RedisClusterServers, RedisServer, temporary_folder

            ports = tuple(range(args.start_cluster, args.start_cluster + 6))
            folder = Path(temporary_folder("chatkeep-bench-cluster-"))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            url = stack.enter_context(RedisClusterServers(folder / "cluster", ports)).url
            if args.standalone_url is None:
                server = stack.enter_context(RedisServer(folder / "single"))
                args.standalone_url = server.url
        if args.standalone_url is None:
            parser.error("--standalone-url is required with --cluster-url")
        asyncio.run(main(args, url))


if __name__ == "__main__":
    cli()
