"""Several processes on one data folder share one embedded PostgreSQL and one Valkey.

Each test drives real processes (tests/embedded_user.py) with no URLs set, in a data folder
of its own, and checks the servers through their recorded pids and ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatkeep.embedded import STATE_FILE
from tests.test_embedded import listening

ROOT = Path(__file__).resolve().parent.parent


class User:
    """One process using the embedded servers, answering commands on its stdin."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("CHATKEEP_")
        }
        env.update(CHATKEEP_DATA_DIR=str(data_dir), PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.embedded_user", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.found: dict[str, str] = json.loads(self.read())

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the process exited with {self.proc.wait()}"
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def exit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("exit\n")
        self.proc.stdin.flush()
        return self.close()

    def signal(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.close()

    def close(self) -> int:
        code = self.proc.wait(30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        return code


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under the project (not pytest's 0700 tmp folder): when the suite runs as root the
    # embedded PostgreSQL runs as another user that must reach its data folder.
    parent = ROOT / ".chatkeep"
    parent.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="test-sharing-", dir=parent)).resolve()
    path.chmod(0o755)
    yield path
    # After a failed test only: nothing of it may outlive the test.
    state = servers(path)
    pids = [u["pid"] for u in state.get("users", [])]
    pids += [state[name]["pid"] for name in ("valkey", "postgres") if name in state]
    for pid in pids:
        if alive(pid):  # pragma: no cover
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def servers(data_dir: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((data_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return {}
    return state


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # pragma: no cover - a server exits as the signal is handled
    return not alive(pid)


def test_processes_share_the_servers_and_the_last_one_stops_them(data_dir: Path) -> None:
    first = User(data_dir)
    second = User(data_dir)
    assert second.found == first.found
    token = second.ask(f"create {uuid.uuid4()}")
    state = servers(data_dir)
    assert {u["pid"] for u in state["users"]} == {first.proc.pid, second.proc.pid}
    postgres, valkey = state["postgres"]["pid"], state["valkey"]["pid"]
    # A session made by one process is known to the other: the same Valkey.
    user_id = uuid.uuid4()
    token = first.ask(f"create {user_id}")
    assert second.ask(f"validate {token}") == str(user_id)
    assert second.ask(f"validate {token[:-6]}AAAAAA") == "none"

    assert first.exit() == 0
    assert second.ask("query") == "1"  # the first leaving stops nothing
    assert second.ask(f"validate {token}") == str(user_id)
    assert [u["pid"] for u in servers(data_dir)["users"]] == [second.proc.pid]

    assert second.exit() == 0
    assert wait_gone(postgres)
    assert wait_gone(valkey)
    assert not listening(first.found["redis_url"])
    assert not (data_dir / STATE_FILE).exists()
    assert not (data_dir / "valkey").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_last_process_stops_the_servers(
    data_dir: Path, sig: signal.Signals
) -> None:
    user = User(data_dir)
    state = servers(data_dir)
    assert user.ask("query") == "1"
    user.signal(sig)
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])
    assert not (data_dir / STATE_FILE).exists()


def test_the_servers_outlive_a_killed_owner(data_dir: Path) -> None:
    owner = User(data_dir)
    other = User(data_dir, "--no-postgres")  # Valkey alone; PostgreSQL stays the owner's
    state = servers(data_dir)
    token = owner.ask(f"create {uuid.uuid4()}")
    assert owner.signal(signal.SIGKILL) == -signal.SIGKILL
    assert other.ask(f"validate {token}") != "none"  # Valkey still serves
    assert alive(state["postgres"]["pid"])
    assert other.exit() == 0
    # The last live user pruned the dead owner's lease and stopped both servers.
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])


def test_after_all_are_killed_the_next_start_reuses_or_cleans_up(data_dir: Path) -> None:
    first = User(data_dir)
    state = servers(data_dir)
    first.signal(signal.SIGKILL)
    # Orphaned but healthy: the next process attaches to the same servers.
    second = User(data_dir)
    assert second.found == first.found
    token = second.ask(f"create {uuid.uuid4()}")
    assert servers(data_dir)["postgres"]["pid"] == state["postgres"]["pid"]
    assert second.ask("query") == "1"
    second.signal(signal.SIGKILL)
    # Now the servers die too, leaving a stale postmaster.pid, state and Valkey pidfile.
    for name in ("valkey", "postgres"):
        os.kill(state[name]["pid"], signal.SIGKILL)
        assert wait_gone(state[name]["pid"])
    assert (data_dir / "postgres" / "postmaster.pid").exists()
    third = User(data_dir)
    fresh = servers(data_dir)
    assert fresh["postgres"]["pid"] != state["postgres"]["pid"]
    assert fresh["valkey"]["pid"] != state["valkey"]["pid"]
    assert [u["pid"] for u in fresh["users"]] == [third.proc.pid]
    assert third.ask("query") == "1"
    # A fresh Valkey: the sessions of the killed one are gone with it.
    assert third.ask(f"validate {token}") == "none"
    assert third.exit() == 0
    assert wait_gone(fresh["postgres"]["pid"])
