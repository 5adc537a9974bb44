"""Several processes on one data folder share one embedded PostgreSQL and one Valkey.

Each test drives real processes (tests/embedded_user.py) with no URLs set, in a data folder
of its own, and checks the servers through their recorded pids and ports.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from chatkeep.embedded import STATE_FILE
from tests.embedded_processes import User, alive, servers, wait_gone
from tests.test_embedded import listening


def test_processes_share_the_servers_and_the_last_one_stops_them(project_dir: Path) -> None:
    first = User(project_dir)
    second = User(project_dir)
    assert second.found == first.found
    token = second.ask(f"create {uuid.uuid4()}")
    state = servers(project_dir)
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
    assert [u["pid"] for u in servers(project_dir)["users"]] == [second.proc.pid]

    assert second.exit() == 0
    assert wait_gone(postgres)
    assert wait_gone(valkey)
    assert not listening(first.found["redis_url"])
    assert not (project_dir / STATE_FILE).exists()
    assert not (project_dir / "valkey").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_last_process_stops_the_servers(
    project_dir: Path, sig: signal.Signals
) -> None:
    user = User(project_dir)
    state = servers(project_dir)
    assert user.ask("query") == "1"
    user.signal(sig)
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])
    assert not (project_dir / STATE_FILE).exists()


def test_the_servers_outlive_a_killed_owner(project_dir: Path) -> None:
    owner = User(project_dir)
    other = User(project_dir, "--no-postgres")  # Valkey alone; PostgreSQL stays the owner's
    state = servers(project_dir)
    token = owner.ask(f"create {uuid.uuid4()}")
    assert owner.signal(signal.SIGKILL) == -signal.SIGKILL
    assert other.ask(f"validate {token}") != "none"  # Valkey still serves
    assert alive(state["postgres"]["pid"])
    assert other.exit() == 0
    # The last live user pruned the dead owner's lease and stopped both servers.
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])


def test_after_all_are_killed_the_next_start_reuses_or_cleans_up(project_dir: Path) -> None:
    first = User(project_dir)
    state = servers(project_dir)
    first.signal(signal.SIGKILL)
    # Orphaned but healthy: the next process attaches to the same servers.
    second = User(project_dir)
    assert second.found == first.found
    token = second.ask(f"create {uuid.uuid4()}")
    assert servers(project_dir)["postgres"]["pid"] == state["postgres"]["pid"]
    assert second.ask("query") == "1"
    second.signal(signal.SIGKILL)
    # Now the servers die too, leaving a stale postmaster.pid, state and Valkey pidfile.
    for name in ("valkey", "postgres"):
        os.kill(state[name]["pid"], signal.SIGKILL)
        assert wait_gone(state[name]["pid"])
    assert (project_dir / "postgres" / "postmaster.pid").exists()
    third = User(project_dir)
    fresh = servers(project_dir)
    assert fresh["postgres"]["pid"] != state["postgres"]["pid"]
    assert fresh["valkey"]["pid"] != state["valkey"]["pid"]
    assert [u["pid"] for u in fresh["users"]] == [third.proc.pid]
    assert third.ask("query") == "1"
    # A fresh Valkey: the sessions of the killed one are gone with it.
    assert third.ask(f"validate {token}") == "none"
    assert third.exit() == 0
    assert wait_gone(fresh["postgres"]["pid"])
