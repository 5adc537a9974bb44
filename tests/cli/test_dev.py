"""``chatkeep dev`` and ``chatkeep dev shell``, run as real processes with no URLs set."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from typer.testing import CliRunner

from chatkeep.cli import app
from tests.embedded_processes import ROOT, User, alive, clean_env, servers, wait_gone

CHATKEEP = [sys.executable, "-c", "from chatkeep.cli import main; main()"]


def test_dev_serves_until_ctrl_c_and_leaves_them_to_other_users(project_dir: Path) -> None:
    dev = subprocess.Popen(
        [*CHATKEEP, "dev"],
        cwd=ROOT,
        env=clean_env(project_dir) | {"COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert dev.stdout is not None
    printed = []
    for line in dev.stdout:
        printed.append(line.strip())
        if "Ctrl-C to stop" in line:
            break
    urls = dict(line.split("=", 1) for line in printed if "_URL=" in line)
    assert urls["DATABASE_URL"].startswith("postgresql://chatapp_app@/chatapp_db?host=")
    assert any(line.startswith('psql "postgresql://postgres@/chatapp_db') for line in printed)
    assert f"redis-cli -u {urls['REDIS_URL']}" in printed
    # Another process with no URLs set uses the same servers.
    user = User(project_dir)
    assert user.found == {"database_url": urls["DATABASE_URL"], "redis_url": urls["REDIS_URL"]}
    state = servers(project_dir)

    dev.send_signal(signal.SIGINT)  # Ctrl-C
    rest, _ = dev.communicate(timeout=30)
    assert dev.returncode == 0
    assert f"still used by 1 other process(es) (pid {user.proc.pid})" in rest
    assert alive(state["postgres"]["pid"])
    assert user.ask("query") == "1"
    assert user.exit() == 0
    assert wait_gone(state["postgres"]["pid"])
    assert wait_gone(state["valkey"]["pid"])


def test_dev_shell_runs_psql_on_the_embedded_database(project_dir: Path) -> None:
    def shell(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CHATKEEP, "dev", "shell", *args],
            cwd=ROOT,
            env=clean_env(project_dir),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    superuser = shell("--", "-Atc", "SELECT current_database(), current_user")
    assert superuser.returncode == 0, superuser.stderr
    assert superuser.stdout.strip() == "chatapp_db|postgres"
    assert shell("--app", "--", "-Atc", "SELECT current_user").stdout.strip() == "chatapp_app"
    failing = shell("--", "-c", "SELECT no_such_column")
    assert failing.returncode == 1  # psql's exit code is the command's
    assert servers(project_dir) == {}  # the shell's servers stopped with it


def test_dev_with_real_urls_has_nothing_to_run(cli_env: Callable[..., dict[str, str]]) -> None:
    env = cli_env(
        DATABASE_URL="postgresql://u@db/x", REDIS_URL="redis://cache:6379/0", COLUMNS="200"
    )
    result = CliRunner().invoke(app, ["dev"], env=env)
    assert result.exit_code == 1
    assert "no embedded server to run" in result.stderr
