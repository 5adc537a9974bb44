"""``chatkeep seed`` in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from typer.testing import CliRunner, Result

from chatkeep.cli import app

Env = Callable[..., dict[str, str]]


def invoke(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def count(url: str, table: str) -> int:
    async def go() -> int:
        conn = await asyncpg.connect(url)
        try:
            value: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
            return value
        finally:
            await conn.close()

    return asyncio.run(go())


def test_seed_fills_the_database(cli_env: Env, database_url: str) -> None:
    result = invoke(
        cli_env(),
        "seed",
        "--users", "30",
        "--rooms", "6",
        "--messages", "500",
        "--seed", "5",
        "--database-url", database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "# seeded" in result.stdout  # piped: the table is plain lines
    assert "password\tchatkeep-seed" in result.stdout
    # Progress goes to stderr, as backup's does, with a rate and an ETA; stdout is the report.
    assert "users" in result.stderr
    assert "/s" in result.stderr
    assert "eta" in result.stderr
    assert "━" not in result.stdout
    assert count(database_url, "users") == 30
    assert count(database_url, "messages") == 500


def test_seed_refuses_bad_counts(cli_env: Env, database_url: str) -> None:
    result = invoke(cli_env(), "seed", "--users", "1", "--database-url", database_url)
    assert result.exit_code == 2
    assert count(database_url, "users") == 0


def test_seed_needs_a_migrated_database(cli_env: Env, empty_database_url: str) -> None:
    result = invoke(cli_env(), "seed", "--messages", "1", "--database-url", empty_database_url)
    assert result.exit_code == 1
    assert "migrate up" in result.output
