"""Processes that use the embedded servers, for tests of their sharing (a fixture module).

:class:`User` runs ``tests/embedded_user.py`` with no URLs set in a data folder given by the
``project_dir`` fixture; :func:`servers` reads what the folder's state file records.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatkeep.embedded import STATE_FILE

ROOT = Path(__file__).resolve().parent.parent


def clean_env(data_dir: Path) -> dict[str, str]:
    """This environment without URLs or CHATKEEP_* settings, for ``data_dir``'s servers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("CHATKEEP_")
    }
    env.update(CHATKEEP_DATA_DIR=str(data_dir), PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    return env


class User:
    """One process using the embedded servers, answering commands on its stdin."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = clean_env(data_dir)
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
def project_dir() -> Iterator[Path]:
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
