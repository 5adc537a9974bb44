"""The command line's manners: usage errors, piped output, help, entry points, `wait`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner, Result

from chatkeep import __version__
from chatkeep.cli import app
from chatkeep.storage.bootstrap import database_name

Env = Callable[..., dict[str, str]]
ROOT = Path(__file__).resolve().parents[2]
# A server nobody listens on: a command that contacted it would fail with exit 1.
NOWHERE_PG = "postgresql://u:pw@127.0.0.1:1/db"
NOWHERE_REDIS = "redis://127.0.0.1:1/0"


def invoke(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# -- usage errors: exit 2, before any server ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["audit", "tail", "--action", "bogus"], "'bogus' is not one of member.remove"),
        (["audit", "tail", "-n", "5000"], "'--limit': Input should be less than or equal to 1000"),
        (["audit", "tail", "-n", "0"], "'--limit': Input should be greater than or equal to 1"),
        (["audit", "tail", "--actor", "nobody"], "--actor must be a UUID"),
        (["migrate", "down", "-n", "-1"], "'--steps': Input should be greater than or equal to 0"),
        (["migrate", "up", "--to", "999"], "no migration has version 999"),
        (["migrate", "up", "--to", "shop:1"], "no migration location has namespace 'shop'"),
        (["migrate", "status", "--location", "chatkeep=/tmp"], "'chatkeep' is chatkeep's own"),
        (
            ["metrics", "--port", "70000"],
            "'--port' / '-p': Input should be less than or equal to 65535",
        ),
        (["wait", "--timeout", "-1"], "'--timeout': Input should be greater than or equal to 0"),
    ],
)
def test_usage_errors_exit_2_before_any_server_is_contacted(
    cli_env: Env, tmp_path: Path, args: list[str], says: str
) -> None:
    # Reachable nowhere: contacting a server would be exit 1, not 2.
    remote = invoke(cli_env(DATABASE_URL=NOWHERE_PG, REDIS_URL=NOWHERE_REDIS, COLUMNS="300"), *args)
    assert remote.exit_code == 2, remote.output
    assert says in " ".join(remote.output.split())
    # Nothing configured: no embedded server may start (it would make its data folder).
    data = tmp_path / "data"
    embedded = invoke(cli_env(CHATKEEP_DATA_DIR=str(data), COLUMNS="300"), *args)
    assert embedded.exit_code == 2, embedded.output
    assert not data.exists()


def test_a_bad_url_names_every_problem(cli_env: Env, tmp_path: Path) -> None:
    result = invoke(
        cli_env(CHATKEEP_POOL_MAX_SIZE="0", CHATKEEP_DATA_DIR=str(tmp_path / "data")),
        "doctor",
        "--database-url",
        "mysql://u:topsecret@h/db",
        "--redis-url",
        "http://cache",
    )
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "database_url: must start with postgresql://" in message
    assert "redis_url: must start with redis://" in message
    assert "pool_max_size: " in message
    assert "more problem" not in message
    assert "topsecret" not in result.output
    assert not (tmp_path / "data").exists()


# -- output -------------------------------------------------------------------------------


def test_piped_tables_are_plain_and_never_cut(
    cli_env: Env, emptied_database_url: str, mdir: Path
) -> None:
    long_name = "create_a_table_with_a_name_far_longer_than_any_narrow_terminal_is_wide"
    (mdir / f"001_{long_name}.sql").write_text(
        "-- chatkeep:up\nCREATE TABLE t (id int);\n-- chatkeep:down\nDROP TABLE t;\n"
    )
    env = cli_env(COLUMNS="40")  # a narrow terminal's width must not matter to a pipe
    args = ["--database-url", emptied_database_url, "--migrations-dir", str(mdir)]
    up = invoke(env, "migrate", "up", *args)
    assert up.exit_code == 0, up.output
    assert f"apply 001_{long_name}.sql\n" in up.stdout
    status = invoke(env, "migrate", "status", *args)
    lines = status.stdout.splitlines()
    assert lines[0] == "namespace\tversion\tname\tstate\tapplied at\tby"
    assert lines[1].startswith(f"chatkeep\t001\t{long_name}\tapplied\t")
    assert "─" not in status.stdout
    assert "│" not in status.stdout


def test_help_is_reflowed_and_h_is_help(cli_env: Env) -> None:
    env = cli_env(COLUMNS="200")
    result = invoke(env, "seed", "-h")
    assert result.exit_code == 0
    text = result.stdout
    # The docstring breaks its lines after "failed run"; the help reflows the paragraph.
    assert "one transaction, so a failed run leaves nothing." in text
    assert invoke(env, "migrate", "up", "-h").exit_code == 0
    root = invoke(env, "--help").stdout
    assert "--install-completion" in root
    assert "Exit codes" in root


def test_python_dash_m_chatkeep() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatkeep", "--version"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"chatkeep {__version__}"


def test_every_command_that_uses_redis_takes_redis_url() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("doctor", "demo", "metrics", "wait"):
        options = {o for p in commands[name].params for o in p.opts}
        assert "--redis-url" in options, name


# -- wait -----------------------------------------------------------------------------------


def wait(env: dict[str, str], database_url: str, redis_url: str, *extra: str) -> Result:
    return invoke(env, "wait", "--database-url", database_url, "--redis-url", redis_url, *extra)


def test_wait_returns_once_both_answer(cli_env: Env, database_url: str, redis_url: str) -> None:
    result = wait(cli_env(COLUMNS="300"), database_url, redis_url, "--timeout", "10")
    assert result.exit_code == 0, result.output
    assert "ready postgresql" in result.stdout
    assert "ready redis" in result.stdout


def test_wait_gives_up_at_the_timeout_naming_what_did_not_answer(
    cli_env: Env, database_url: str
) -> None:
    env = cli_env(COLUMNS="300")
    result = wait(env, database_url, NOWHERE_REDIS, "--timeout", "0.6", "--interval", "0.1")
    assert result.exit_code == 1
    assert "ready postgresql" in result.stdout
    message = " ".join(result.stderr.split())
    assert "not ready after 0.6 s: redis redis://127.0.0.1:1/0: ConnectionError" in message


# -- setup --json -------------------------------------------------------------------------------


def test_setup_json(cli_env: Env, fresh_url: str) -> None:
    result = invoke(cli_env(), "setup", "--json", "--database-url", fresh_url)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["database"] == database_name(fresh_url)
    assert report["database_created"] is True
    assert set(report) == {
        "database",
        "database_created",
        "roles_created",
        "roles_corrected",
        "passwords_set",
        "adopted",
        "citus_workers",
        "generated_passwords",
    }
    assert report["citus_workers"] is None  # not --citus
    # Every role made now without a password from the environment has one, shown here.
    assert set(report["generated_passwords"]) == {
        r
        for r in report["roles_created"]
        if r in ("chatapp_app", "chatapp_migrator", "chatapp_readonly")
    }
