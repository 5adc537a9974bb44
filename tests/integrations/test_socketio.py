"""The socket.io recipe across two server processes: each client gets each message once.

Two uvicorn processes serve tests/integrations/socketio_app.py on the test's database and
Redis; one client connects to each. Every message sent (by either client, through either
process) must reach both clients exactly once: each process forwards the event bus only
to its own sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings

ROOT = Path(__file__).resolve().parents[2]
PER_CLIENT = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server_process(database_url: str, redis_url: str, node: str) -> Iterator[str]:
    """``uvicorn tests.integrations.socketio_app:app`` in a process of its own."""
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "CHATKEEP_NODE_ID": f"node-{node}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.integrations.socketio_app:app",
        "--host=127.0.0.1",
        f"--port={port}",
        "--log-level=warning",
    ]
    process = subprocess.Popen(command, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {node} did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung server
            process.kill()
            process.wait()


class Listener:
    """A socket.io client that records the message ids it receives."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.received: Counter[str] = Counter()
        self.client.on("message.created", self.on_message)

    async def on_message(self, event: dict[str, Any]) -> None:
        self.received[event["message_id"]] += 1


@pytest.mark.slow
async def test_two_processes_each_client_gets_each_message_once(
    chat: ChatKeep, settings: Settings, app_url: str, redis_url: str
) -> None:
    ann = await chat.register(
        CreateUserDto(email="ann@example.org", username="ann", password="correct horse")
    )
    bob = await chat.register(
        CreateUserDto(email="bob@example.org", username="bob", password="correct horse")
    )
    room = await chat.create_room(CreateRoomDto(name="general", created_by=ann.id))
    await chat.join(room.id, bob.id)
    tokens = [(await chat.sessions.create(user.id)).token for user in (ann, bob)]

    with (
        server_process(app_url, redis_url, "a") as url_a,
        server_process(app_url, redis_url, "b") as url_b,
    ):
        listeners = [Listener(), Listener()]
        for listener, url, token in zip(listeners, (url_a, url_b), tokens, strict=True):
            await listener.client.connect(url, auth={"token": token}, transports=["websocket"])
            joined = await listener.client.call("join", {"room_id": str(room.id)}, timeout=10)
            assert joined == {"ok": True}
        sent: list[str] = []
        for n in range(PER_CLIENT):
            for who, listener in enumerate(listeners):
                ack = await listener.client.call(
                    "send",
                    {
                        "room_id": str(room.id),
                        "content": f"{who}-{n}",
                        "client_msg_id": f"{who}-{n}",
                    },
                    timeout=10,
                )
                assert ack["ok"], ack
                sent.append(ack["id"])
        deadline = time.monotonic() + 20
        while any(set(listener.received) != set(sent) for listener in listeners):
            assert time.monotonic() < deadline, [dict(lst.received) for lst in listeners]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a duplicate would arrive by now
        for listener in listeners:
            assert listener.received == Counter(dict.fromkeys(sent, 1))
        # Refusals: no token, and a room the user is not in.
        stranger = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await stranger.connect(url_a, auth={"token": "nonsense"}, transports=["websocket"])
        other = await chat.create_room(
            CreateRoomDto(name="other", type="private", created_by=ann.id)
        )
        refused = await listeners[1].client.call("join", {"room_id": str(other.id)}, timeout=10)
        assert refused["ok"] is False
        assert refused["error"]["code"] == "not_found"
        bad = await listeners[1].client.call("join", {"room_id": "nope"}, timeout=10)
        assert bad["error"]["code"] == "invalid_input"
        empty = await listeners[0].client.call(
            "send", {"room_id": str(room.id), "content": "", "type": "system"}, timeout=10
        )
        assert [problem["field"] for problem in empty["error"]["errors"]] == ["content", "type"]
        for listener in listeners:
            await listener.client.disconnect()
