"""ChatKeep.stream() and the outbox relay over real PostgreSQL and Redis, under churn.

The scenario of issue 13: writers make random mixed changes (send, edit, delete, react,
unreact, join, leave, role change) in a few rooms while clients connect, disconnect at
random moments and resume with the stream; at the end every client's state, built only
from the changes it was handed, equals a fresh read of each room. It runs clean, with
publishes dropped at random, and with writers that die between commit and publish (the
relay must then announce their changes). ``CHATKEEP_STREAM_SCALE`` multiplies the
number of operations (default 1: a few seconds).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ChatkeepError,
    CreateRoomDto,
    CreateUserDto,
    Settings,
    Unavailable,
)
from chatkeep.models import Change
from chatkeep.realtime import Event, RedisClient
from chatkeep.relay import OutboxRelay
from chatkeep.stream import RoomClosed, RoomReset
from tests.conftest import url_as
from tests.realtime.conftest import FAST, wait_until

ROUNDS = 10
PASSWORD = "correct horse"
SCALE = int(os.environ.get("CHATKEEP_STREAM_SCALE", "1"))
EMOJI = ("👍", "🎉", "❤️")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RoomState:
    """What a client knows of a room: built from changes, or read fresh."""

    messages: dict[uuid.UUID, str] = field(default_factory=dict)
    reactions: dict[tuple[uuid.UUID, str], int] = field(default_factory=dict)
    members: dict[uuid.UUID, str] = field(default_factory=dict)

    def apply(self, change: Change) -> None:
        data = change.data
        kind = change.kind
        if kind in ("message.created", "message.edited"):
            assert change.message_id is not None
            self.messages[change.message_id] = data["content"]
        elif kind == "message.deleted":
            assert change.message_id is not None
            self.messages.pop(change.message_id, None)
            for key in [k for k in self.reactions if k[0] == change.message_id]:
                del self.reactions[key]
        elif kind in ("reaction.added", "reaction.removed"):
            assert change.message_id is not None
            key = (change.message_id, data["emoji"])
            if data["count"]:
                self.reactions[key] = data["count"]
            else:
                self.reactions.pop(key, None)
        elif kind in ("member.joined", "member.role_changed"):
            self.members[uuid.UUID(str(data["user_id"]))] = data["role"]
        elif kind in ("member.left", "member.removed"):
            self.members.pop(uuid.UUID(str(data["user_id"])), None)


async def fresh(chat: ChatKeep, room: uuid.UUID, reader: uuid.UUID) -> RoomState:
    """The room as a new client would load it."""
    state = RoomState()
    page = await chat.history(room, reader, after_seq=0, limit=200)
    while True:
        for message in page.items:
            state.messages[message.id] = message.content
            for reaction in message.reactions:
                state.reactions[(message.id, reaction.emoji)] = reaction.count
        if page.after is None:
            break
        page = await chat.history(room, reader, cursor=page.after, limit=200)
    async with chat.acting_as(reader):
        found = await chat.rooms.members(room)
    state.members = {member.user.id: member.role for member in found.members}
    return state


@dataclass
class Client:
    """A reader that keeps its state and positions across reconnects."""

    user: uuid.UUID
    rooms: list[uuid.UUID]
    states: dict[uuid.UUID, RoomState] = field(default_factory=dict)
    positions: dict[uuid.UUID, int] = field(default_factory=dict)
    sessions: int = 0
    resets: int = 0

    def __post_init__(self) -> None:
        for room in self.rooms:
            self.states[room] = RoomState()
            self.positions[room] = 0

    def take(self, item: Change | RoomReset | RoomClosed) -> None:
        assert not isinstance(item, RoomClosed), f"{self.user} lost {item.room_id}"
        if isinstance(item, RoomReset):  # pragma: no cover - nothing is pruned here
            self.resets += 1
            return
        assert item.position > self.positions[item.room_id], "a change came twice"
        self.states[item.room_id].apply(item)
        self.positions[item.room_id] = item.position

    async def session(self, chat: ChatKeep, seconds: float) -> None:
        """Connect, follow for ``seconds``, disconnect (a stream of its own each time)."""
        self.sessions += 1
        async with chat.stream(self.rooms, self.user, since=self.positions) as stream:
            try:
                async with asyncio.timeout(seconds):
                    async for item in stream:
                        self.take(item)
            except TimeoutError:
                pass  # the client goes away mid-stream

    async def finish(self, chat: ChatKeep, targets: dict[uuid.UUID, int]) -> None:
        """Follow until every room is at its final position."""
        async with chat.stream(self.rooms, self.user, since=self.positions) as stream:
            async with asyncio.timeout(30):
                while any(self.positions[r] < p for r, p in targets.items()):
                    self.take(await anext(stream))


@pytest_asyncio.fixture(loop_scope="session")
async def system(
    make_settings: Callable[..., Settings], app_url: str, database_url: str, redis_url: str
) -> AsyncIterator[tuple[ChatKeep, str]]:
    """The facade as chatapp_app, and a URL the relay may read every room with."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(settings, node_id="stream", bcrypt_rounds=ROUNDS) as chat:
        yield chat, database_url


async def register(chat: ChatKeep, name: str) -> uuid.UUID:
    user = await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
    )
    return user.id


@dataclass
class Setup:
    owner: uuid.UUID
    writers: list[uuid.UUID]
    readers: list[uuid.UUID]
    rooms: list[uuid.UUID]


async def build(chat: ChatKeep, *, writers: int, readers: int, rooms: int) -> Setup:
    owner = await register(chat, "owner")
    made = [
        (await chat.create_room(CreateRoomDto(name=f"room {n}", created_by=owner))).id
        for n in range(rooms)
    ]
    writer_ids = [await register(chat, f"writer{n}") for n in range(writers)]
    reader_ids = [await register(chat, f"reader{n}") for n in range(readers)]
    for room in made:
        for user in reader_ids:
            await chat.join(room, user)
    return Setup(owner, writer_ids, reader_ids, made)


async def writer(chat: ChatKeep, setup: Setup, me: uuid.UUID, ops: int, seed: int) -> None:
    """Random mixed changes as ``me`` (the owner also changes roles)."""
    rng = random.Random(seed)
    mine: dict[uuid.UUID, list[uuid.UUID]] = {room: [] for room in setup.rooms}
    member = dict.fromkeys(setup.rooms, False)
    for n in range(ops):
        room = rng.choice(setup.rooms)
        try:
            if not member[room]:
                await chat.join(room, me)
                member[room] = True
                continue
            op = rng.choice(("send", "send", "edit", "delete", "react", "unreact", "leave", "role"))
            if op == "send" or (not mine[room] and op in ("edit", "delete", "react", "unreact")):
                sent = await chat.send_message(
                    room, me, f"{me} says {n}", client_msg_id=f"{me}-{n}"
                )
                mine[room].append(sent.id)
            elif op == "edit":
                await chat.edit_message(rng.choice(mine[room]), me, f"edited {n}")
            elif op == "delete":
                await chat.delete_message(mine[room].pop(rng.randrange(len(mine[room]))), me)
            elif op == "react":
                await chat.react(rng.choice(mine[room]), me, rng.choice(EMOJI))
            elif op == "unreact":
                await chat.unreact(rng.choice(mine[room]), me, rng.choice(EMOJI))
            elif op == "leave":
                await chat.leave(room, me)
                member[room] = False
                mine[room].clear()
            else:
                await chat.change_role(room, me, rng.choice(("member", "admin")), by=setup.owner)
        except ChatkeepError:
            pass  # a refused or raced change (deleted meanwhile...) writes nothing


async def reader_client(chat: ChatKeep, client: Client, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    # At least one reconnect each, even when the writers finish before a reader's first
    # session ends (a loaded machine's slow first subscribe, or fast group commits: CI saw
    # a reader with one session): what it missed offline is then caught up on reconnect.
    while not stop.is_set() or client.sessions < 2:
        await client.session(chat, rng.uniform(0.02, 0.3))
        await asyncio.sleep(rng.uniform(0, 0.1))  # offline for a moment


async def run_scenario(
    chat: ChatKeep,
    relay_url: str,
    *,
    writer_facades: list[ChatKeep],
    writers: int = 20,
    readers: int = 10,
    rooms: int = 5,
) -> list[Client]:
    setup = await build(chat, writers=writers, readers=readers, rooms=rooms)
    clients = [Client(user, setup.rooms) for user in setup.readers]
    stop = asyncio.Event()
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    readers_running = [
        asyncio.create_task(reader_client(chat, client, stop, seed))
        for seed, client in enumerate(clients)
    ]
    try:
        await asyncio.gather(
            *(
                writer(writer_facades[n % len(writer_facades)], setup, me, 6 * SCALE, seed=n)
                for n, me in enumerate(setup.writers)
            )
        )
        stop.set()
        await asyncio.gather(*readers_running)
        targets = {room: await chat.room_position(room, setup.owner) for room in setup.rooms}
        await asyncio.gather(*(client.finish(chat, targets) for client in clients))
        for room in setup.rooms:
            truth = await fresh(chat, room, setup.owner)
            for client in clients:
                assert client.states[room] == truth, f"client {client.user} differs in {room}"
    finally:
        relay.cancel()
        for task in readers_running:
            task.cancel()
        await asyncio.gather(relay, *readers_running, return_exceptions=True)
    assert all(client.sessions >= 2 for client in clients)  # they did reconnect
    return clients


MakeWriters = Callable[..., Any]


@pytest_asyncio.fixture(loop_scope="session")
async def writer_facades(
    system: tuple[ChatKeep, str], redis_url: str
) -> AsyncIterator[Callable[[float], Any]]:
    """Facades on the same database, each with its own Redis client; ``drop`` of their
    publishes fail (a Redis that refuses them: the change is committed, the event lost)."""
    chat, _ = system
    clients: list[RedisClient] = []

    async def factory(drop: float) -> list[ChatKeep]:
        made = []
        rng = random.Random(7)
        for n in range(4):
            client = RedisClient(redis_url, **FAST)
            clients.append(client)
            facade = ChatKeep(chat.db, client, node_id=f"writer-{n}", bcrypt_rounds=ROUNDS)
            publish_many = facade.events.publish_many

            async def flaky(events: Iterable[Event], publish_many: Any = publish_many) -> list[int]:
                if rng.random() < drop:
                    raise Unavailable("publish dropped by the test")
                return list(await publish_many(events))

            facade.events.publish_many = flaky  # type: ignore[method-assign]
            made.append(facade)
        return made

    yield factory
    for client in clients:
        await client.aclose()


async def test_clients_converge_under_churn(
    system: tuple[ChatKeep, str], writer_facades: Callable[[float], Any]
) -> None:
    chat, relay_url = system
    clients = await run_scenario(chat, relay_url, writer_facades=await writer_facades(0.0))
    assert sum(client.sessions for client in clients) >= 20


async def test_clients_converge_when_publishes_are_dropped(
    system: tuple[ChatKeep, str], writer_facades: Callable[[float], Any]
) -> None:
    chat, relay_url = system
    await run_scenario(chat, relay_url, writer_facades=await writer_facades(0.3))
    assert chat.relay is not None
    assert chat.relay.stats.nudges >= 1  # some last changes were announced by the relay only


DOOMED_WRITER = """
import asyncio, os, signal, sys, uuid
from chatkeep import ChatKeep, Settings

async def main() -> None:
    settings = Settings(database_url=sys.argv[1], redis_url=sys.argv[2])
    async with ChatKeep.connect(settings, node_id="doomed", bcrypt_rounds=10) as chat:
        async def die(*events: object) -> None:  # the commit is done; the publish never is
            os.kill(os.getpid(), signal.SIGKILL)
        chat._publish = die
        await chat.send_message(uuid.UUID(sys.argv[3]), uuid.UUID(sys.argv[4]), sys.argv[5])

asyncio.run(main())
"""


async def test_a_writer_killed_between_commit_and_publish_is_announced(
    system: tuple[ChatKeep, str], app_url: str, redis_url: str
) -> None:
    chat, relay_url = system
    setup = await build(chat, writers=1, readers=1, rooms=1)
    room, reader, author = setup.rooms[0], setup.readers[0], setup.owner
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    delays = []
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    try:
        async with chat.stream([room], reader) as stream:
            for n in range(3 * SCALE):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    DOOMED_WRITER,
                    app_url,
                    redis_url,
                    str(room),
                    str(author),
                    f"last words {n}",
                    env=env,
                )
                assert await process.wait() == -signal.SIGKILL
                died = time.monotonic()
                async with asyncio.timeout(10):
                    item = await anext(stream)
                delays.append(time.monotonic() - died)
                assert isinstance(item, Change)
                assert (item.kind, item.data["content"]) == ("message.created", f"last words {n}")
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    print(f"\nrelay delivery after a SIGKILLed writer: max {max(delays) * 1000:.0f} ms")


async def test_announcement_delay_after_a_lost_publish(system: tuple[ChatKeep, str]) -> None:
    """Figures, not assertions on time: the delay from commit to the stream's item."""
    chat, relay_url = system
    setup = await build(chat, writers=1, readers=1, rooms=1)
    room, reader, author = setup.rooms[0], setup.readers[0], setup.owner
    silent = ChatKeep(chat.db, chat.redis, node_id="silent", bcrypt_rounds=ROUNDS)

    async def lost(*events: Event) -> None:
        return None

    silent._publish = lost  # type: ignore[method-assign]
    delays = []
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    try:
        async with chat.stream([room], reader) as stream:
            for n in range(20 * SCALE):
                sent = await silent.send_message(room, author, f"quiet {n}")
                committed = time.monotonic()
                async with asyncio.timeout(10):
                    item = await anext(stream)
                delays.append(time.monotonic() - committed)
                assert isinstance(item, Change)
                assert item.message_id == sent.id
                await asyncio.sleep(random.uniform(0, 0.1))
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    ordered = sorted(delays)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"\nlost publish -> stream item: p50 {statistics.median(delays) * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms over {len(delays)}"
    )


async def test_one_relay_leads_and_a_standby_takes_over(
    system: tuple[ChatKeep, str], redis_url: str
) -> None:
    chat, relay_url = system
    settings = chat.db.settings
    # As the reporting role, as operations.md tells production to run it.
    readonly = url_as(relay_url, "chatapp_readonly")
    async with RedisClient(redis_url, **FAST) as client:
        relays = [
            OutboxRelay(chat.events, client, settings, readonly, standby_interval=0.05)
            for _ in range(2)
        ]
        tasks = [asyncio.create_task(relay.run()) for relay in relays]
        try:
            await wait_until(lambda: any(relay.is_leader for relay in relays))
            await asyncio.sleep(0.3)  # the standby keeps trying and keeps failing
            assert [relay.is_leader for relay in relays].count(True) == 1
            leader = next(n for n, relay in enumerate(relays) if relay.is_leader)
            standby = relays[1 - leader]
            assert standby.stats.leaderships == 0
            tasks[leader].cancel()  # its session ends: the server frees the lock
            await asyncio.gather(tasks[leader], return_exceptions=True)
            await wait_until(lambda: standby.is_leader)
            assert standby.stats.leaderships == 1
            await wait_until(lambda: standby.stats.ticks >= 2)  # its rounds read every room
            assert not relays[leader].is_leader
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def log_reads(chat: ChatKeep) -> int:
    """How many times this facade read a room's change log from PostgreSQL."""
    found = chat.db.stats.get("changes.after")
    return found.calls if found is not None else 0


async def resume_to(chat: ChatKeep, room: uuid.UUID, user: uuid.UUID, since: int) -> list[int]:
    """Resume ``room`` from ``since`` with a stream; the positions it hands out up to now."""
    head = await chat.room_position(room, user)
    seen: list[int] = []
    async with chat.stream([room], user, since={room: since}) as stream:
        async with asyncio.timeout(10):
            while stream.positions.get(room, since) < head:
                item = await anext(stream)
                assert isinstance(item, Change)
                seen.append(item.position)
    return seen


async def test_resumes_reuse_a_finished_read_until_the_published_mark_moves(
    system: tuple[ChatKeep, str],
) -> None:
    """Streams resuming at one place one after another share one read of the log while
    nothing newer was published; a publish, or a mark Redis no longer has, means a new read
    (and the new change is handed out, never hidden by the reused page)."""
    chat, _ = system
    owner = await register(chat, "herdowner")
    reader = await register(chat, "herdreader")
    room = (await chat.create_room(CreateRoomDto(name="herd", created_by=owner))).id
    await chat.join(room, reader)
    since = await chat.room_position(room, reader)
    for n in range(3):
        await chat.send_message(room, owner, f"before {n}")
    head = await chat.room_position(room, reader)
    expected = list(range(since + 1, head + 1))

    reads = log_reads(chat)
    for _ in range(5):
        assert await resume_to(chat, room, reader, since) == expected
    assert log_reads(chat) - reads == 1  # one read, four reuses

    await chat.send_message(room, owner, "after")  # the mark moves past the page
    reads = log_reads(chat)
    assert await resume_to(chat, room, reader, since) == [*expected, head + 1]
    assert log_reads(chat) - reads == 1

    await chat.redis.redis.delete(chat.redis.keys.room_published(room))  # Redis lost it
    reads = log_reads(chat)
    assert await resume_to(chat, room, reader, since) == [*expected, head + 1]
    assert log_reads(chat) - reads == 1  # no mark proves nothing: read again
