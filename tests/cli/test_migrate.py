"""``chatkeep migrate ...`` in-process (typer's CliRunner) against a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from chatkeep.cli import app
from chatkeep.storage.bootstrap import maintenance_url
from chatkeep.storage.migrate import load_migrations
from tests.migration_files import table_migration, write

Env = Callable[..., dict[str, str]]


@pytest.fixture
def chatkeep(
    cli_env: Env, emptied_database_url: str, three: Path, tmp_path: Path
) -> Callable[..., Result]:
    """Run ``chatkeep migrate <args>`` on the empty test database and the three files."""
    env = cli_env(CHATKEEP_DATA_DIR=str(tmp_path / "data"), COLUMNS="200")
    runner = CliRunner()

    def invoke(*args: str, directory: Path | None = three) -> Result:
        argv = ["migrate", *args, "--database-url", emptied_database_url]
        if directory is not None:
            argv += ["--migrations-dir", str(directory)]
        result = runner.invoke(app, argv, env=env)
        # Anything but a clean exit is a bug: errors must be messages with an exit code.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        return result

    return invoke


def tables_in(url: str) -> set[str]:
    import asyncio

    async def read() -> set[str]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename <> 'chatkeep_schema_history'"
            )
            return {r[0] for r in rows}
        finally:
            await conn.close()

    return asyncio.run(read())


def test_up_applies_and_reports(chatkeep: Callable[..., Result], emptied_database_url: str) -> None:
    result = chatkeep("up", "--to", "2")
    assert result.exit_code == 0, result.output
    assert "apply 001_create_a.sql" in result.stdout
    assert "apply 002_create_b.sql" in result.stdout
    assert "2 migration(s) applied" in result.stdout
    assert tables_in(emptied_database_url) == {"a", "b"}
    result = chatkeep("up")
    assert "1 migration(s) applied" in result.stdout
    result = chatkeep("up")
    assert result.exit_code == 0
    assert "nothing to apply: the database is up to date" in result.stdout


def test_status_json_and_exit_codes(chatkeep: Callable[..., Result], three: Path) -> None:
    result = chatkeep("status", "--json", "--exit-code")
    assert result.exit_code == 1  # pending
    entries = json.loads(result.stdout)
    assert [(e["version"], e["name"], e["state"]) for e in entries] == [
        (1, "create_a", "pending"),
        (2, "create_b", "pending"),
        (3, "create_c", "pending"),
    ]
    assert entries[0]["applied_at"] is None
    assert chatkeep("status").exit_code == 0  # without --exit-code, just a report

    chatkeep("up")
    result = chatkeep("status", "--json", "--exit-code")
    assert result.exit_code == 0
    entries = json.loads(result.stdout)
    assert {e["state"] for e in entries} == {"applied"}
    assert all(e["applied_at"] and e["applied_by"] for e in entries)

    table = chatkeep("status")
    assert table.exit_code == 0
    assert "create_b" in table.stdout
    assert "applied" in table.stdout

    (three / "002_create_b.sql").write_text(table_migration("b") + "-- edited\n")
    result = chatkeep("status", "--json", "--exit-code")
    assert result.exit_code == 3  # the history and the files disagree
    assert [e["state"] for e in json.loads(result.stdout)] == ["applied", "changed", "applied"]


def test_status_exit_code_for_missing_and_out_of_order(
    chatkeep: Callable[..., Result], three: Path
) -> None:
    (three / "002_create_b.sql").rename(three / "002_create_b.later")
    chatkeep("up")
    (three / "002_create_b.later").rename(three / "002_create_b.sql")
    result = chatkeep("status", "--exit-code")
    assert result.exit_code == 3
    assert "out-of-order" in result.stdout
    # up refuses, naming the way out; the flag applies it.
    refused = chatkeep("up")
    assert refused.exit_code == 1
    assert "--allow-out-of-order" in refused.stderr
    assert chatkeep("up", "--allow-out-of-order").exit_code == 0
    (three / "003_create_c.sql").unlink()
    result = chatkeep("status", "--exit-code")
    assert result.exit_code == 3
    assert "missing" in result.stdout
    assert chatkeep("down").exit_code == 1
    # 002 went last, so it reverts first; 003 comes next, and its down part is gone with it.
    result = chatkeep("down", "-n", "2", "--allow-missing")
    assert result.exit_code == 1
    assert "003_create_c: its file is missing" in result.stderr
    assert chatkeep("down", "--allow-missing").exit_code == 0


def test_down_by_steps_and_target(
    chatkeep: Callable[..., Result], emptied_database_url: str
) -> None:
    chatkeep("up")
    result = chatkeep("down")
    assert result.exit_code == 0
    assert "revert 003_create_c.sql" in result.stdout
    assert tables_in(emptied_database_url) == {"a", "b"}
    chatkeep("up")
    result = chatkeep("down", "-n", "2")
    assert "2 migration(s) reverted" in result.stdout
    chatkeep("up")
    result = chatkeep("down", "--to", "0")
    assert "3 migration(s) reverted" in result.stdout
    assert tables_in(emptied_database_url) == set()
    assert "nothing to revert" in chatkeep("down").stdout
    both = chatkeep("down", "--to", "1", "-n", "1")
    assert both.exit_code == 2
    assert "not both" in both.stderr


def test_down_refuses_without_a_down_part(
    chatkeep: Callable[..., Result], three: Path, emptied_database_url: str
) -> None:
    (three / "003_create_c.sql").write_text(table_migration("c", down=False))
    chatkeep("up")
    result = chatkeep("down")
    assert result.exit_code == 1
    assert "003_create_c.sql: it has no down part" in result.stderr
    assert tables_in(emptied_database_url) == {"a", "b", "c"}


def test_plan_prints_sql_and_runs_nothing(
    chatkeep: Callable[..., Result], emptied_database_url: str
) -> None:
    result = chatkeep("plan", "--to", "2")
    assert result.exit_code == 0
    assert result.stdout.startswith("-- 001_create_a.sql (up, transaction)\nBEGIN;\n")
    assert "CREATE TABLE b (id int PRIMARY KEY);" in result.stdout
    assert "003_create_c" not in result.stdout
    assert tables_in(emptied_database_url) == set()
    chatkeep("up")
    assert chatkeep("plan").stdout.strip() == "-- nothing to do"
    down = chatkeep("plan", "--down", "-n", "2")
    assert down.stdout.index("DROP TABLE c;") < down.stdout.index("DROP TABLE b;")
    assert "DROP TABLE a;" not in down.stdout
    assert "DROP TABLE a;" in chatkeep("plan", "--down", "--down-to", "0").stdout
    assert tables_in(emptied_database_url) == {"a", "b", "c"}
    wrong = chatkeep("plan", "-n", "1")
    assert wrong.exit_code == 2
    assert "--down" in wrong.stderr


def test_repair_accepts_an_edit(chatkeep: Callable[..., Result], three: Path) -> None:
    chatkeep("up")
    (three / "001_create_a.sql").write_text("-- reviewed\n" + table_migration("a"))
    refused = chatkeep("up")
    assert refused.exit_code == 1
    assert "001_create_a.sql was edited" in refused.stderr
    assert "chatkeep migrate repair 1" in refused.stderr
    result = chatkeep("repair", "1")
    assert result.exit_code == 0
    assert "repaired version 1" in result.stdout
    assert chatkeep("status", "--exit-code").exit_code == 0
    unknown = chatkeep("repair", "9")
    assert unknown.exit_code == 2  # a usage error, found in the files before connecting
    assert "no migration has version 9" in unknown.stderr


def test_failed_migration_is_a_clear_error(
    chatkeep: Callable[..., Result], three: Path, emptied_database_url: str
) -> None:
    (three / "002_create_b.sql").write_text(
        "-- chatkeep:up\nCREATE TABLE b (id int);\nSELECT 1/0;\n"
    )
    result = chatkeep("up")
    assert result.exit_code == 1
    assert "002_create_b.sql, line 3 failed (up): DivisionByZeroError" in result.stderr
    assert tables_in(emptied_database_url) == {"a"}


def test_verify_reports_each_file_and_fails_on_a_bad_down(
    chatkeep: Callable[..., Result], three: Path
) -> None:
    result = chatkeep("verify")
    assert result.exit_code == 0
    assert "001_create_a: up, down, up ok" in result.stdout
    assert "3 migration(s) verified" in result.stdout
    (three / "003_create_c.sql").write_text(
        "-- chatkeep:up\nCREATE TABLE c (id int);\n-- chatkeep:down\nSELECT 1;\n"
    )
    result = chatkeep("verify")
    assert result.exit_code == 1
    assert "003_create_c.sql: down does not restore the schema" in result.stderr


def test_shipped_migrations_apply_and_report_current(
    chatkeep: Callable[..., Result], template_database: str
) -> None:
    # template_database: the server is prepared as `chatkeep setup` prepares it.
    result = chatkeep("up", directory=None)
    assert result.exit_code == 0, result.output
    count = len(load_migrations())
    assert f"{count} migration(s) applied" in result.stdout
    assert chatkeep("status", "--exit-code", directory=None).exit_code == 0


def test_lint_passes_on_the_shipped_files(cli_env: Env) -> None:
    result = CliRunner().invoke(app, ["migrate", "lint"], env=cli_env(COLUMNS="200"))
    assert result.exit_code == 0, result.output
    assert f"ok {len(load_migrations())} migration file(s) pass squawk" in result.stdout


def test_lint_fails_on_a_dangerous_migration(cli_env: Env, three: Path) -> None:
    (three / "004_add_column.sql").write_text(
        "-- chatkeep:up\nALTER TABLE a ADD COLUMN n int NOT NULL;\n"
        "-- chatkeep:down\nALTER TABLE a DROP COLUMN n;\n"
    )
    result = CliRunner().invoke(
        app, ["migrate", "lint", "--migrations-dir", str(three)], env=cli_env(COLUMNS="200")
    )
    assert result.exit_code == 1
    # Positions count from 1 like an editor's: line 2, column 15 is where "ADD COLUMN" is.
    assert "004_add_column.sql (up):2:15: warning: adding-required-field" in result.stdout
    assert "squawk found problems" in result.stderr


def test_lint_refuses_malformed_files(cli_env: Env, three: Path) -> None:
    (three / "004_bad.sql").write_text("CREATE TABLE x (id int);\n")
    result = CliRunner().invoke(
        app, ["migrate", "lint", "--migrations-dir", str(three)], env=cli_env()
    )
    assert result.exit_code == 1
    assert "004_bad.sql: needs exactly one '-- chatkeep:up' line" in result.stderr


def test_bad_urls_and_missing_databases_are_messages(cli_env: Env, admin_url: str) -> None:
    runner = CliRunner()
    env = cli_env(COLUMNS="200")
    result = runner.invoke(
        app, ["migrate", "status", "--database-url", "mysql://u:topsecret@h/db"], env=env
    )
    assert result.exit_code == 2  # a usage error, before any server is contacted
    assert "database_url: must start with postgresql://" in result.stderr
    assert "topsecret" not in result.output
    missing = maintenance_url(admin_url, "chatkeep_no_such_db")
    result = runner.invoke(app, ["migrate", "status", "--database-url", missing], env=env)
    assert result.exit_code == 1
    assert "chatkeep setup" in result.stderr
    result = runner.invoke(
        app, ["migrate", "up", "--database-url", "postgresql://u:pw@127.0.0.1:1/db"], env=env
    )
    assert result.exit_code == 1
    assert "unreachable" in result.stderr
    assert "u:***@127.0.0.1:1" in result.stderr


def test_environment_urls_are_used(cli_env: Env, emptied_database_url: str, three: Path) -> None:
    env = cli_env(DATABASE_URL=emptied_database_url, COLUMNS="200")
    result = CliRunner().invoke(app, ["migrate", "up", "--migrations-dir", str(three)], env=env)
    assert result.exit_code == 0, result.output
    assert "3 migration(s) applied" in result.stdout


def test_up_to_a_version_applies_what_is_pending_below_it_and_says_what_is_left(
    chatkeep: Callable[..., Result], emptied_database_url: str
) -> None:
    """issue 16: after `down -n 1`, `up --to 2` said "up to date" with 003 pending."""
    assert chatkeep("up").exit_code == 0
    assert chatkeep("down", "-n", "1").exit_code == 0
    result = chatkeep("up", "--to", "2")
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.stdout
    assert "nothing to apply up to version 2: every migration at or below it is applied" in (
        result.stdout
    )
    assert "still pending above version 2: 003_create_c (run `chatkeep migrate up`" in (
        result.stdout
    )
    # A pending one at or below the target is applied, whatever reverted it.
    assert chatkeep("down", "--to", "1").exit_code == 0
    result = chatkeep("up", "--to", "2")
    assert "apply 002_create_b.sql" in result.stdout
    assert "still pending above version 2: 003_create_c" in result.stdout
    assert tables_in(emptied_database_url) == {"a", "b"}
    # An unknown target is a usage error, found in the files before any server is asked.
    unknown = chatkeep("up", "--to", "9")
    assert unknown.exit_code == 2
    assert "no migration has version 9" in unknown.stderr
    assert chatkeep("up").stdout.count("apply ") == 1


def test_migrate_new_numbers_the_next_file(cli_env: Env, tmp_path: Path) -> None:
    runner = CliRunner()
    env = cli_env()
    folder = tmp_path / "shop" / "migrations"
    first = runner.invoke(
        app, ["migrate", "new", "create_carts", "--location", str(folder)], env=env
    )
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == str(folder / "001_create_carts.sql")
    text = (folder / "001_create_carts.sql").read_text(encoding="utf-8")
    assert text.index("-- chatkeep:up") < text.index("-- chatkeep:down")
    write(folder, "007_later.sql", table_migration("later"))
    second = runner.invoke(
        app, ["migrate", "new", "create_orders", "--location", f"shop={folder}"], env=env
    )
    assert second.stdout.strip() == str(folder / "008_create_orders.sql")
    # The setting names the folder when --location is not given.
    third = runner.invoke(
        app,
        ["migrate", "new", "add_index"],
        env=cli_env(CHATKEEP_MIGRATION_LOCATIONS=str(folder)),
    )
    assert third.stdout.strip() == str(folder / "009_add_index.sql")
    # Usage errors: a bad name, no folder, several folders.
    bad = runner.invoke(app, ["migrate", "new", "Create Carts", "--location", str(folder)], env=env)
    assert bad.exit_code == 2
    assert "lower-case letters, digits and _" in bad.stderr
    nowhere = runner.invoke(app, ["migrate", "new", "x"], env=cli_env())
    assert nowhere.exit_code == 2
    assert "give --location DIR" in nowhere.stderr
    several = runner.invoke(
        app, ["migrate", "new", "x"], env=cli_env(CHATKEEP_MIGRATION_LOCATIONS="a,b")
    )
    assert several.exit_code == 2
    assert "names several" in several.stderr
    # The runner refuses the scaffold until its up part is written.
    lint = runner.invoke(app, ["migrate", "lint", "--location", str(folder)], env=env)
    assert lint.exit_code == 1
    assert "001_create_carts.sql: the up part has no statements" in lint.stderr


def test_a_migration_url_alone_starts_nothing_embedded(
    cli_env: Env, emptied_database_url: str, three: Path, tmp_path: Path
) -> None:
    # Issue 16.6: with only CHATKEEP_MIGRATE_DATABASE_URL set, `migrate up` migrated that
    # server but also started an embedded PostgreSQL, made chatapp_db and roles in it, and
    # logged that it was running "instead of DATABASE_URL".
    data_dir = tmp_path / "data"
    env = cli_env(
        CHATKEEP_MIGRATE_DATABASE_URL=emptied_database_url,
        CHATKEEP_DATA_DIR=str(data_dir),
        COLUMNS="200",
    )
    runner = CliRunner()
    result = runner.invoke(app, ["migrate", "up", "--migrations-dir", str(three)], env=env)
    assert result.exit_code == 0, result.output
    assert "3 migration(s) applied" in result.stdout
    assert tables_in(emptied_database_url) == {"a", "b", "c"}
    assert "embedded" not in result.output
    assert not data_dir.exists()  # no server, no data folder, no state file
    status = runner.invoke(app, ["migrate", "status", "--migrations-dir", str(three)], env=env)
    assert status.exit_code == 0, status.output
    assert not data_dir.exists()
