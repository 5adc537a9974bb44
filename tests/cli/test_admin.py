"""``chatkeep setup``, ``chatkeep doctor`` and ``chatkeep schema diagram`` in-process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from chatkeep.cli import app
from chatkeep.cli.admin import DIAGRAM_END, DIAGRAM_START
from chatkeep.storage.bootstrap import database_name, maintenance_url
from tests.conftest import database_exists

Env = Callable[..., dict[str, str]]
ROOT = Path(__file__).resolve().parents[2]


def invoke(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# -- setup --------------------------------------------------------------------------------


def test_setup_creates_the_database_once(cli_env: Env, fresh_url: str, admin_url: str) -> None:
    env = cli_env()
    name = database_name(fresh_url)
    first = invoke(env, "setup", "--database-url", fresh_url)
    assert first.exit_code == 0, first.output
    assert f"database created {name}" in first.stdout
    assert "next: chatkeep migrate up" in first.stdout
    assert asyncio.run(database_exists(admin_url, name))
    second = invoke(env, "setup", "--database-url", fresh_url)
    assert second.exit_code == 0, second.output
    assert f"already exists: {name}" in second.stdout


async def test_concurrent_setup_processes_all_succeed(
    fresh_url: str, admin_url: str, tmp_path: Path
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("CHATKEEP_")
    }
    env["CHATKEEP_DATA_DIR"] = str(tmp_path)
    chatkeep = str(Path(sys.executable).with_name("chatkeep"))
    procs = [
        await asyncio.create_subprocess_exec(
            chatkeep,
            "setup",
            "--database-url",
            fresh_url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [await p.communicate() for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out + err).decode()
    assert await database_exists(admin_url, database_name(fresh_url))


def test_setup_refuses_an_unsafe_database_name(cli_env: Env, admin_url: str) -> None:
    result = invoke(cli_env(), "setup", "--database-url", maintenance_url(admin_url, "bad-name"))
    assert result.exit_code == 1
    assert "database_url" in result.stderr


# -- doctor -------------------------------------------------------------------------------


def test_doctor_passes_on_a_migrated_database(
    cli_env: Env, database_url: str, redis_url: str
) -> None:
    result = invoke(cli_env(REDIS_URL=redis_url), "doctor", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "verdict: OK" in result.stdout
    assert "schema is current" in result.stdout


def test_doctor_json(cli_env: Env, database_url: str, redis_url: str) -> None:
    result = invoke(
        cli_env(REDIS_URL=redis_url), "doctor", "--json", "--database-url", database_url
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "ok"
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) >= {"settings", "postgresql", "role", "migrations", "redis"}
    assert checks["postgresql"]["status"] == "ok"
    assert "PostgreSQL" in checks["postgresql"]["detail"]
    assert checks["migrations"]["status"] == "ok"
    assert checks["redis"]["status"] == "ok"
    assert "ping" in checks["redis"]["detail"]
    assert all(c["status"] in ("ok", "warn") for c in report["checks"])


def test_doctor_warns_about_a_superuser(cli_env: Env, database_url: str, redis_url: str) -> None:
    result = invoke(
        cli_env(REDIS_URL=redis_url), "doctor", "--json", "--database-url", database_url
    )
    role = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "role")
    # The suite connects as a superuser (or the embedded server's owner, also one).
    assert role["status"] == "warn"
    assert "row-level security does not bind it" in role["detail"]


def test_doctor_fails_when_migrations_are_pending(
    cli_env: Env, empty_database_url: str, redis_url: str
) -> None:
    result = invoke(cli_env(REDIS_URL=redis_url), "doctor", "--database-url", empty_database_url)
    assert result.exit_code == 1
    assert "verdict: FAIL" in result.stdout
    assert "chatkeep migrate up" in result.stdout


async def test_doctor_fails_when_history_and_files_disagree(
    cli_env: Env, database_url: str, redis_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO chatkeep_schema_history (version, name, checksum, direction,"
            " transactional, started_at, finished_at, duration_ms, outcome)"
            " VALUES (999, 'from_the_future', 'x', 'up', true, now(), now(), 0, 'success')"
        )
    finally:
        await conn.close()
    # The CLI runs its own event loop: run it in a thread, away from the test's loop.
    result = await asyncio.to_thread(
        invoke, cli_env(REDIS_URL=redis_url), "doctor", "--json", "--database-url", database_url
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail"
    migrations = next(c for c in report["checks"] if c["name"] == "migrations")
    assert migrations["status"] == "fail"
    assert "1 missing" in migrations["detail"]


def test_doctor_fails_when_redis_is_unreachable(cli_env: Env, database_url: str) -> None:
    env = cli_env(REDIS_URL="redis://:pw@127.0.0.1:1/0", CHATKEEP_CONNECT_TIMEOUT="2")
    result = invoke(env, "doctor", "--json", "--database-url", database_url)
    assert result.exit_code == 1
    redis = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "redis")
    assert redis["status"] == "fail"
    assert ":***@127.0.0.1:1" in redis["detail"]
    assert ":pw@" not in result.output
    # The table keeps brackets in details (an IPv6 host) instead of reading them as markup.
    env["REDIS_URL"] = "redis://:pw@[::1]:1/0"
    text = invoke(env, "doctor", "--database-url", database_url)
    assert text.exit_code == 1
    assert "redis://:***@[::1]:1/0" in text.stdout


def test_doctor_fails_when_postgres_is_unreachable(cli_env: Env, redis_url: str) -> None:
    env = cli_env(REDIS_URL=redis_url, CHATKEEP_CONNECT_TIMEOUT="2")
    result = invoke(env, "doctor", "--database-url", "postgresql://u:pw@127.0.0.1:1/db")
    assert result.exit_code == 1
    assert "verdict: FAIL" in result.stdout
    assert "unreachable" in result.stdout
    assert "u:pw@" not in result.output


# -- schema diagram -----------------------------------------------------------------------


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "schema.md"
    path.write_text(f"# Schema\n\n{DIAGRAM_START}\nstale\n{DIAGRAM_END}\n\nprose\n")
    return path


def test_diagram_to_stdout(cli_env: Env, database_url: str) -> None:
    result = invoke(cli_env(), "schema", "diagram", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("erDiagram\n")
    assert "    users {\n" in result.stdout
    assert 'rooms ||--o{ messages : "room_id (messages_room_id_fkey)"' in result.stdout


def test_diagram_output_and_check(cli_env: Env, database_url: str, doc: Path) -> None:
    env = cli_env()
    stale = invoke(
        env, "schema", "diagram", "--output", str(doc), "--check", "--database-url", database_url
    )
    assert stale.exit_code == 1
    assert "out of date" in stale.stderr
    assert "stale" in doc.read_text()  # --check writes nothing
    wrote = invoke(env, "schema", "diagram", "--output", str(doc), "--database-url", database_url)
    assert wrote.exit_code == 0
    text = doc.read_text()
    assert "stale" not in text
    assert text.startswith(f"# Schema\n\n{DIAGRAM_START}\n```mermaid\nerDiagram\n")
    assert text.endswith(f"```\n{DIAGRAM_END}\n\nprose\n")
    current = invoke(
        env, "schema", "diagram", "-o", str(doc), "--check", "--database-url", database_url
    )
    assert current.exit_code == 0
    assert "is current" in current.stdout


def test_committed_schema_doc_passes_the_check(cli_env: Env, database_url: str) -> None:
    result = invoke(
        cli_env(),
        "schema",
        "diagram",
        "--output",
        str(ROOT / "docs" / "schema.md"),
        "--check",
        "--database-url",
        database_url,
    )
    assert result.exit_code == 0, result.output


def test_diagram_output_needs_markers(cli_env: Env, database_url: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain.md"
    plain.write_text("# nothing to replace\n")
    result = invoke(
        cli_env(), "schema", "diagram", "-o", str(plain), "--database-url", database_url
    )
    assert result.exit_code == 1
    assert "no diagram markers" in result.stderr
    missing = invoke(
        cli_env(),
        "schema",
        "diagram",
        "-o",
        str(tmp_path / "none.md"),
        "--database-url",
        database_url,
    )
    assert missing.exit_code == 1


def test_version(cli_env: Env) -> None:
    from chatkeep import __version__

    result = invoke(cli_env(), "--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"chatkeep {__version__}"


async def test_prune_changes_applies_the_retention(
    cli_env: Env, database_url: str, conn: asyncpg.Connection
) -> None:
    user = await conn.fetchval(
        "INSERT INTO users (email, username, password_hash)"
        " VALUES ('p@example.org', 'pruner', $1) RETURNING id",
        "$2b$10$" + "b" * 53,
    )
    room = await conn.fetchval(
        "INSERT INTO rooms (name, type, created_by) VALUES ('r', 'public', $1) RETURNING id", user
    )
    await conn.execute("INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)", room, user)
    for n in range(3):
        await conn.execute(
            "INSERT INTO messages (room_id, user_id, content) VALUES ($1, $2, $3)",
            room,
            user,
            str(n),
        )
    assert await conn.fetchval("SELECT count(*) FROM room_changes") == 4
    result = await asyncio.to_thread(
        invoke, cli_env(), "prune-changes", "--keep", "1", "--database-url", database_url
    )
    assert result.exit_code == 0, result.output
    assert "pruned 3 change(s)" in result.stdout
    assert await conn.fetchval("SELECT array_agg(position) FROM room_changes") == [4]
    result = await asyncio.to_thread(
        invoke, cli_env(), "prune-changes", "--max-age-days", "0", "--database-url", database_url
    )
    assert result.exit_code == 2
