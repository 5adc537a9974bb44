"""The facade on a Redis Cluster (3 masters, 3 replicas) with sharded pub/sub.

A send reaches a subscriber through ``SPUBLISH``; the churn scenario of the stream tests
converges on the cluster; and a master killed in the middle of a send load costs nothing:
every message acknowledged by ``send_message`` is in PostgreSQL, and every follower of a
room ends with every message of it (live, or caught up after the gap that the sharded hub
reports once it has subscribed again on the promoted replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import ChatKeep, ChatkeepError, CreateRoomDto, Settings
from chatkeep.models import Change
from chatkeep.realtime import (
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageCreated,
    PresenceChanged,
    RedisClient,
    TypingChanged,
)
from chatkeep.stream import RoomClosed, RoomReset
from tests.realtime.conftest import FAST, wait_until
from tests.servers import RedisClusterServers
from tests.test_facade_stream import ROUNDS, register, run_scenario

pytestmark = pytest.mark.cluster


@pytest_asyncio.fixture(loop_scope="session")
async def cluster_system(
    make_settings: Callable[..., Settings], app_url: str, database_url: str, cluster_url: str
) -> AsyncIterator[tuple[ChatKeep, str]]:
    """The facade as chatapp_app on the cluster, and a URL the relay may read rooms with."""
    settings = make_settings(database_url=app_url, redis_url=cluster_url)
    async with ChatKeep.connect(settings, node_id="cluster", bcrypt_rounds=ROUNDS) as chat:
        assert chat.redis.cluster
        yield chat, database_url


async def test_a_send_reaches_a_subscriber_through_sharded_pubsub(
    cluster_system: tuple[ChatKeep, str],
) -> None:
    chat, _ = cluster_system
    owner = await register(chat, "owner")
    rooms = [
        (await chat.create_room(CreateRoomDto(name=f"room {n}", created_by=owner))).id
        for n in range(6)
    ]
    async with await chat.subscribe(*rooms) as sub:
        sent = {room: await chat.send_message(room, owner, f"hello {room}") for room in rooms}
        received: dict[uuid.UUID, MessageCreated] = {}
        async with asyncio.timeout(10):
            while len(received) < len(rooms):
                item = await sub.get()
                if isinstance(item, MessageCreated):
                    received[item.room_id] = item
        # Sharded: each room's channel is carried by the link to its own shard, one per node.
        links = chat.redis._hub.links  # type: ignore[union-attr]
        assert 1 <= len(links) <= 3
        assert sum(len(channels) for channels in links.values()) == len(rooms)
    assert {room: event.message_id for room, event in received.items()} == {
        room: message.id for room, message in sent.items()
    }


async def test_membership_flows_do_their_redis_work_in_one_pipeline_on_the_cluster(
    cluster_system: tuple[ChatKeep, str],
) -> None:
    # join/leave/change_role queue the member-cache deletion, leave's presence and typing
    # clean-up and the event (published mark, SPUBLISH) on one cluster pipeline: the
    # keys of one room share a slot, so it goes to one node.
    chat, _ = cluster_system
    owner, guest = await register(chat, "mowner"), await register(chat, "mguest")
    room = (await chat.create_room(CreateRoomDto(name="members", created_by=owner))).id
    operations: list[str] = []

    def timer(operation: str) -> contextlib.AbstractContextManager[object]:
        operations.append(operation)
        return contextlib.nullcontext()

    async with await chat.subscribe(room) as sub:

        async def next_event() -> object:
            async with asyncio.timeout(10):
                return await sub.get()

        chat.redis.command_timer = timer
        try:
            await chat.join(room, guest)
            await chat.change_role(room, guest, "admin", by=owner)
            assert operations == ["facade.after_commit"] * 2
        finally:
            chat.redis.command_timer = None
        assert isinstance(await next_event(), MemberJoined)
        assert isinstance(await next_event(), MemberRoleChanged)
        assert await chat.members.is_member(room, guest)  # cached now
        await chat.connect_socket(guest, "guest-1", rooms=[room])
        await chat.set_typing(room, guest)
        assert await chat.leave(room, guest)
        assert guest not in await chat.presence.in_room(room)
        assert guest not in await chat.typing.typers(room)
        assert not await chat.members.is_member(room, guest)
        kinds = [type(await next_event()) for _ in range(3)]
        assert kinds == [PresenceChanged, TypingChanged, MemberLeft]
        assert await chat.events.published(room) == await chat.room_position(room, owner)


async def test_clients_converge_under_churn_on_the_cluster(
    cluster_system: tuple[ChatKeep, str], cluster_url: str
) -> None:
    chat, relay_url = cluster_system
    clients: list[RedisClient] = []
    writers = []
    try:
        for n in range(2):
            client = RedisClient(cluster_url, **FAST)
            clients.append(client)
            writers.append(ChatKeep(chat.db, client, node_id=f"w{n}", bcrypt_rounds=ROUNDS))
        await run_scenario(chat, relay_url, writer_facades=writers, writers=8, readers=4)
    finally:
        for client in clients:
            await client.aclose()


class Follower:
    """Follows rooms with one long stream, recording every message it is handed."""

    def __init__(self, user: uuid.UUID, rooms: list[uuid.UUID]) -> None:
        self.user = user
        self.rooms = rooms
        self.messages: dict[uuid.UUID, set[uuid.UUID]] = {room: set() for room in rooms}
        self.positions: dict[uuid.UUID, int] = dict.fromkeys(rooms, 0)

    def take(self, item: Change | RoomReset | RoomClosed) -> None:
        assert isinstance(item, Change), f"{self.user} got {item!r}"
        self.positions[item.room_id] = item.position
        if item.kind == "message.created" and item.message_id is not None:
            self.messages[item.room_id].add(item.message_id)

    async def follow(self, chat: ChatKeep, ready: asyncio.Event, stop: asyncio.Event) -> None:
        async with chat.stream(self.rooms, self.user) as stream:
            ready.set()
            while not stop.is_set():
                try:
                    async with asyncio.timeout(0.2):
                        self.take(await anext(stream))
                except TimeoutError:
                    continue


async def sender(
    chat: ChatKeep, user: uuid.UUID, rooms: list[uuid.UUID], stop: asyncio.Event, seed: int
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Send round-robin until told to stop; return what was acknowledged (room, id)."""
    acknowledged: list[tuple[uuid.UUID, uuid.UUID]] = []
    n = 0
    while not stop.is_set():
        room = rooms[(seed + n) % len(rooms)]
        n += 1
        try:
            message = await chat.send_message(
                room, user, f"{seed}/{n}", client_msg_id=f"{seed}-{n}"
            )
        except ChatkeepError:  # pragma: no cover - PostgreSQL is up; Redis fails open
            continue
        acknowledged.append((room, message.id))
        await asyncio.sleep(0.01)
    return acknowledged


async def test_killing_a_master_during_a_send_load_loses_nothing(
    cluster_system: tuple[ChatKeep, str], redis_cluster: RedisClusterServers, database_url: str
) -> None:
    chat, relay_url = cluster_system
    owner = await register(chat, "owner")
    rooms = [
        (await chat.create_room(CreateRoomDto(name=f"room {n}", created_by=owner))).id
        for n in range(9)
    ]
    senders = [await register(chat, f"sender{n}") for n in range(4)]
    readers = [await register(chat, f"reader{n}") for n in range(3)]
    for room in rooms:
        for user in senders + readers:
            await chat.join(room, user)
    # The master that owns the most of these rooms is the one to die.
    owners: dict[int, int] = {}
    for room in rooms:
        port = redis_cluster.master_of(chat.redis.keys.room_events(room))
        owners[port] = owners.get(port, 0) + 1
    victim = max(owners, key=lambda port: owners[port])

    followers = [Follower(user, rooms) for user in readers]
    stop_following, stop_sending = asyncio.Event(), asyncio.Event()
    ready = [asyncio.Event() for _ in followers]
    relay = asyncio.create_task(chat.run_relay(database_url=relay_url))
    following = [
        asyncio.create_task(f.follow(chat, r, stop_following))
        for f, r in zip(followers, ready, strict=True)
    ]
    gaps_before = chat.redis.pubsub_reconnects
    try:
        async with asyncio.timeout(20):
            await asyncio.gather(*(r.wait() for r in ready))
        sending = [
            asyncio.create_task(sender(chat, user, rooms, stop_sending, seed))
            for seed, user in enumerate(senders)
        ]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_cluster.kill, victim)
        await asyncio.to_thread(redis_cluster.wait_taken_over, victim)
        await asyncio.sleep(1.0)  # sends on the new topology too
        stop_sending.set()
        acknowledged = [pair for batch in await asyncio.gather(*sending) for pair in batch]

        # Nothing acknowledged is lost: every id is in PostgreSQL, in its room.
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT id, room_id FROM messages WHERE room_id = ANY($1)", rooms
            )
        finally:
            await conn.close()
        stored = {(row["room_id"], row["id"]) for row in rows}
        assert set(acknowledged) <= stored
        assert len(acknowledged) >= 20

        # Every follower ends with every stored message (gap + catch-up, relay nudges).
        targets = {room: await chat.room_position(room, owner) for room in rooms}
        await wait_until(
            lambda: all(f.positions[r] >= targets[r] for f in followers for r in rooms), 30
        )
        expected: dict[uuid.UUID, set[uuid.UUID]] = {room: set() for room in rooms}
        for room, message in stored:
            expected[room].add(message)
        for follower in followers:
            assert follower.messages == expected
        # The killed shard carried some of the rooms: the hub reported a gap for them.
        assert chat.redis.pubsub_reconnects > gaps_before
    finally:
        stop_sending.set()
        stop_following.set()
        relay.cancel()
        await asyncio.gather(relay, *following, return_exceptions=True)
        await asyncio.to_thread(redis_cluster.restore)
