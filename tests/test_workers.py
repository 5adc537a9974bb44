"""``uvicorn --workers 2`` with no URLs set: both workers share the embedded servers.

Issue 15.6: each worker started a Valkey of its own, so a session made by one worker was
unknown to the other (8 of 20 authenticated requests got 401), and the embedded
PostgreSQL outlived a SIGTERM or a Ctrl-C of uvicorn.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.embedded_processes import ROOT, clean_env, servers, wait_gone


def request(port: int, method: str, path: str, token: str = "") -> tuple[int, str, str]:
    """(status, body, worker pid) of one request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read().decode(), response.getheader("x-worker", "")
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def started(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90  # two workers start, bootstrap and migrate
    while time.monotonic() < deadline:
        assert server.poll() is None, "uvicorn exited"
        try:
            request(port, "GET", "/me")
        except OSError:
            time.sleep(0.2)
        else:
            return
    raise AssertionError("uvicorn did not answer in time")  # pragma: no cover


def test_sessions_are_shared_by_the_workers_and_sigterm_stops_the_servers(
    project_dir: Path,
) -> None:
    port = free_port()
    command = ["uvicorn", "tests.asgi_app:app", "--workers", "2", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", *command, "--log-level", "warning"],
        cwd=ROOT,
        env=clean_env(project_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started(port, server)
        # Logins until both workers have made one (connections are spread by the kernel).
        tokens: dict[str, str] = {}
        for _ in range(200):
            status, token, worker = request(port, "POST", "/login")
            assert status == 200
            tokens.setdefault(worker, token)
            if len(tokens) == 2:
                break
        assert len(tokens) == 2, "one worker took every connection"
        # At least 20 authenticated requests, until each session has also been validated
        # by the worker that did not make it: every one must succeed.
        made_by = {token: worker for worker, token in tokens.items()}
        statuses: list[int] = []
        crossed: set[str] = set()
        for n in range(200):
            token = list(made_by)[n % 2]
            status, _, worker = request(port, "GET", "/me", token)
            statuses.append(status)
            if worker != made_by[token]:
                crossed.add(token)
            if n >= 19 and len(crossed) == 2:
                break
        assert set(statuses) == {200}
        assert crossed == set(made_by), "no request reached the other worker"
        state = servers(project_dir)
        assert sorted(u["pid"] for u in state["users"]) == sorted(int(w) for w in tokens)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])
    assert servers(project_dir) == {}
