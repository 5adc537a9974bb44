"""The fault suite: concurrent sends with retries under real faults, checked Jepsen-style.

For each scenario of :data:`~tests.faults.nemesis.SCENARIOS`: N senders, each a user in a
room of its own, send through ``ChatKeep.send_message`` as ``chatapp_app`` (retrying a
failed send with the same ``client_msg_id``), while a subscriber per room listens on
another node; the scenario's fault is injected through the run, then healed. Once the
senders are done, each sends one last message (the next event is how a subscriber learns
of a publish that failed without its own connection failing), the store is read, and
:func:`~tests.faults.history.check` compares it with what the clients saw.

Run at full size (20 senders, minutes per scenario) with
``CHATKEEP_FAULTS=full pytest tests/faults -s``; docs/operations.md says how to read the
table.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg
import pytest

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings
from chatkeep.realtime import RateLimit
from chatkeep.storage.bootstrap import APP_ROLE
from tests.conftest import drop_database
from tests.faults.conftest import FaultStores
from tests.faults.history import (
    History,
    ScenarioResult,
    StoredMessage,
    check,
    render_table,
    send_bound,
)
from tests.faults.nemesis import SCENARIOS, Cluster, Size
from tests.faults.proxy import FaultProxy
from tests.faults.workload import Sender, Subscriber

pytestmark = pytest.mark.slow

# Short timeouts, so a fault costs the run seconds rather than minutes; the bound scales
# with them (send_bound).
STATEMENT_TIMEOUT: Final = 2.0
STATEMENT_TIMEOUT_GRACE: Final = 1.0
CONNECT_TIMEOUT: Final = 1.0
# The limiter's Redis work runs on every send, but no sender here is fast enough to hit it:
# a RateLimited would be a correct answer that says nothing about the fault.
SEND_LIMIT: Final = RateLimit(limit=100_000, period=1.0)
# Seconds the subscribers get, after the last send, to reach every room's last seq.
CONVERGE_WITHIN: Final = 15.0
PASSWORD: Final = "correct horse battery"

STORED_MESSAGES: Final = """
SELECT room_id, seq, id, client_msg_id FROM messages WHERE room_id = ANY($1::uuid[])
"""
ROOM_COUNTERS: Final = "SELECT id, last_seq FROM rooms WHERE id = ANY($1::uuid[])"


@contextlib.asynccontextmanager
async def scenario_database(stores: FaultStores) -> AsyncIterator[str]:
    """A copy of the migrated template for one scenario, dropped after it."""
    name = f"chatkeep_faults_{uuid.uuid4().hex[:8]}"
    admin_url = stores.postgres.url()
    admin = await asyncpg.connect(admin_url)
    try:
        # FILE_COPY: on a server without fsync, copying the files beats writing every block
        # of the template to the WAL (the default), by about a second per scenario.
        await admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE "{stores.template}" STRATEGY FILE_COPY'
        )
    finally:
        await admin.close()
    try:
        yield name
    finally:
        await drop_database(admin_url, name)


async def read_store(
    stores: FaultStores, database: str, rooms: list[uuid.UUID]
) -> tuple[list[StoredMessage], dict[uuid.UUID, int]]:
    """Every message of ``rooms`` and each room's counter, read as the superuser directly
    (no proxy, no row security): the truth the clients' views are compared with."""
    conn = await asyncpg.connect(stores.postgres.url(database))
    try:
        rows = await conn.fetch(STORED_MESSAGES, rooms)
        counters = await conn.fetch(ROOM_COUNTERS, rooms)
    finally:
        await conn.close()
    stored = [StoredMessage(r["room_id"], r["seq"], r["id"], r["client_msg_id"]) for r in rows]
    return stored, {r["id"]: r["last_seq"] for r in counters}


async def converge(subscribers: list[Subscriber], counters: dict[uuid.UUID, int]) -> None:
    """Wait (a while) until every subscriber has seen its room up to the room's counter."""
    deadline = time.monotonic() + CONVERGE_WITHIN
    while time.monotonic() < deadline:
        if all(sub.last >= counters.get(sub.room, 0) for sub in subscribers):
            return
        await asyncio.sleep(0.05)


def node(settings: Settings, name: str) -> contextlib.AbstractAsyncContextManager[ChatKeep]:
    """A facade as a node of the application builds it (``ChatKeep.connect``)."""
    return ChatKeep.connect(settings, node_id=name, send_limit=SEND_LIMIT, bcrypt_rounds=10)


async def run_scenario(
    fault: str, stores: FaultStores, size: Size, data_dir: Path
) -> ScenarioResult:
    """Run ``fault``'s scenario from an empty database to its checked result."""
    nemesis = SCENARIOS[fault]
    await asyncio.to_thread(stores.redis.flush)
    async with (
        scenario_database(stores) as database,
        FaultProxy("127.0.0.1", stores.postgres.port) as pg_proxy,
        FaultProxy("127.0.0.1", stores.redis.port) as redis_proxy,
    ):
        settings = Settings(
            database_url=stores.postgres.url(database, user=APP_ROLE, port=pg_proxy.port),
            redis_url=stores.redis.url_via(redis_proxy.port),
            statement_timeout=STATEMENT_TIMEOUT,
            statement_timeout_grace=STATEMENT_TIMEOUT_GRACE,
            connect_timeout=CONNECT_TIMEOUT,
            data_dir=data_dir,
        )
        bound = send_bound(settings)
        cluster = Cluster(
            stores.postgres, stores.redis, pg_proxy, redis_proxy, database, size, bound
        )
        history = History()
        async with node(settings, "writer") as chat, node(settings, "reader") as reader_node:
            reader, *users = await asyncio.gather(
                *(
                    chat.register(
                        CreateUserDto(email=f"{name}@example.org", username=name, password=PASSWORD)
                    )
                    for name in ["reader", *(f"sender{i}" for i in range(size.senders))]
                )
            )
            senders: list[Sender] = []
            subscribers: list[Subscriber] = []
            for index, user in enumerate(users):
                room = await chat.create_room(
                    CreateRoomDto(name=f"room {index}", created_by=user.id)
                )
                await chat.join(room.id, reader.id)
                senders.append(
                    Sender(
                        chat,
                        room.id,
                        user.id,
                        f"s{index}",
                        history,
                        size.message_deadline,
                        size.interval,
                    )
                )
                subscribers.append(Subscriber(reader_node, room.id, reader.id, history))

            stop = asyncio.Event()
            listening = [asyncio.create_task(sub.run(stop)) for sub in subscribers]
            # Long enough for at least one freeze or black hole of the bound's length.
            until = time.monotonic() + max(size.duration, size.first + cluster.long + 1.0)
            faults = asyncio.create_task(nemesis(cluster, until))
            try:
                await asyncio.gather(*(sender.run(until) for sender in senders))
                assert await faults > 0, f"{fault}: the schedule injected no fault"
                # The faults are healed: one more message each, whose event reaches the
                # subscribers and shows them any seq they missed.
                await asyncio.gather(*(sender.send_one() for sender in senders))
                rooms = [sender.room for sender in senders]
                stored, counters = await read_store(stores, database, rooms)
                await converge(subscribers, counters)
            finally:
                faults.cancel()
                stop.set()
                await asyncio.gather(faults, *listening, return_exceptions=True)
    return check(fault, history, stored, counters, bound)


@pytest.mark.parametrize("fault", list(SCENARIOS))
async def test_acknowledged_sends_survive_the_fault(
    fault: str,
    fault_stores: FaultStores,
    fault_size: Size,
    fault_results: list[ScenarioResult],
    tmp_path: Path,
) -> None:
    result = await run_scenario(fault, fault_stores, fault_size, tmp_path)
    fault_results.append(result)
    table = render_table([result])
    print(f"\n{table}")
    if result.failures:
        pytest.fail(f"{fault}:\n" + "\n".join(result.failures) + f"\n\n{table}", pytrace=False)
