"""The migration runner, against a real PostgreSQL (synthetic migrations in tmp folders)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import (
    ChecksumMismatch,
    InvalidInput,
    MigrationError,
    MigrationFailed,
    MigrationLockTimeout,
    MigrationOrderError,
    PermissionDenied,
)
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.migrate import (
    DEFAULT_MIGRATIONS_DIR,
    HISTORY_TABLE,
    LOCK_KEY,
    Migrator,
    _error_line,
    checksum,
    load_migrations,
    migrate_up,
    normalise,
)
from chatkeep.storage.sqltext import Statement
from tests.migration_files import table_migration, write

# The foundation's files; later issues append more, so tests use ALL for "every file".
FOUNDATION = [
    "001_create_users",
    "002_create_rooms",
    "003_create_messages",
    "004_create_room_users",
    "005_create_message_read_status",
    "006_create_indexes",
    "007_create_triggers",
]
ALL = [m.label for m in load_migrations()]


@pytest.fixture
def foundation(mdir: Path) -> Path:
    """A copy of the foundation's files (001-007), which need nothing of the server."""
    for label in FOUNDATION:
        source = DEFAULT_MIGRATIONS_DIR / f"{label}.sql"
        write(mdir, source.name, source.read_text(encoding="utf-8"))
    return mdir


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> $1",
        HISTORY_TABLE,
    )
    return {r[0] for r in rows}


async def history(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT version, name, direction, outcome, error, transactional, checksum,"
        f" db_user, started_at, finished_at, duration_ms FROM {HISTORY_TABLE} ORDER BY id"
    )


def states(entries: list[Any]) -> dict[int, str]:
    return {e.version: e.state for e in entries}


# -- loading files ------------------------------------------------------------------------


def test_shipped_migrations_load_in_order_with_up_and_down() -> None:
    migrations = load_migrations()
    assert [m.label for m in migrations[:7]] == FOUNDATION
    versions = [m.version for m in migrations]
    # Numbered in order with no gap but one: 019 was assigned to work that needed no
    # migration in the end (the runner orders by number; a gap changes nothing).
    assert versions == [v for v in range(1, versions[-1] + 1) if v != 19]
    # 016 builds its search index concurrently, which no transaction may hold; so does
    # 021 (the collapsed view's roots index).
    assert [m.version for m in migrations if not m.transactional] == [16, 21]
    for m in migrations:
        assert m.up
        assert m.down
        assert m.path.parent == DEFAULT_MIGRATIONS_DIR
        assert m.checksum == checksum(m.path.read_text(encoding="utf-8"))


def test_non_sql_files_are_ignored(three: Path) -> None:
    write(three, "README.md", "notes")
    write(three, "004_later.sql.bak", "junk")
    assert [m.version for m in load_migrations(three)] == [1, 2, 3]


@pytest.mark.parametrize("name", ["1-create.sql", "001_Create.sql", "create.sql", "001_.sql"])
def test_badly_named_files_are_refused(mdir: Path, name: str) -> None:
    write(mdir, name, table_migration("a"))
    with pytest.raises(MigrationError, match=name.replace(".", r"\.")):
        load_migrations(mdir)


def test_duplicate_versions_are_an_order_error_naming_both(mdir: Path) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(mdir, "1_b.sql", table_migration("b"))
    with pytest.raises(MigrationOrderError, match="duplicate version 1") as info:
        load_migrations(mdir)
    assert "001_a.sql" in str(info.value)
    assert "1_b.sql" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CREATE TABLE a (id int);\n", "exactly one '-- chatkeep:up'"),
        ("-- chatkeep:up\nSELECT 1;\n-- chatkeep:up\nSELECT 2;\n", "exactly one"),
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:down\nSELECT 2;\n-- chatkeep:down\n",
            "more than one '-- chatkeep:down'",
        ),
        ("-- chatkeep:down\nSELECT 2;\n-- chatkeep:up\nSELECT 1;\n", "down part must follow"),
        ("-- chatkeep:up\n-- nothing here\n-- chatkeep:down\nSELECT 1;\n", "no statements"),
        (
            "-- chatkeep:up\n-- chatkeep:no-transaction\nCREATE INDEX CONCURRENTLY i ON a (id);\n",
            "must come before",
        ),
    ],
)
def test_malformed_files_are_refused_with_the_file_named(
    mdir: Path, text: str, message: str
) -> None:
    write(mdir, "001_bad.sql", text)
    with pytest.raises(MigrationError, match=message) as info:
        load_migrations(mdir)
    assert "001_bad.sql" in str(info.value)


def test_unreadable_files_are_refused_with_the_file_named(mdir: Path) -> None:
    (mdir / "001_binary.sql").write_bytes(b"-- chatkeep:up\nSELECT '\xff\xfe';\n")
    with pytest.raises(MigrationError, match=r"001_binary\.sql: cannot be read as UTF-8"):
        load_migrations(mdir)
    (mdir / "001_binary.sql").unlink()
    (mdir / "002_folder.sql").mkdir()
    with pytest.raises(MigrationError, match=r"002_folder\.sql: cannot be read"):
        load_migrations(mdir)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="does not exist"):
        load_migrations(tmp_path / "nope")


def test_statements_keep_their_file_line_numbers(mdir: Path) -> None:
    write(
        mdir,
        "001_lines.sql",
        "-- header\n\n-- chatkeep:up\nCREATE TABLE a (id int);\n\nCREATE TABLE b (\n  id int\n);\n"
        "-- chatkeep:down\nDROP TABLE b;\nDROP TABLE a;\n",
    )
    (m,) = load_migrations(mdir)
    assert [(s.line, s.sql.split()[2]) for s in m.up] == [(4, "a"), (6, "b")]
    assert m.down is not None
    assert [s.line for s in m.down] == [10, 11]


def test_a_file_without_a_down_part_loads(mdir: Path) -> None:
    write(mdir, "001_a.sql", table_migration("a", down=False))
    (m,) = load_migrations(mdir)
    assert m.down is None


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE INDEX CONCURRENTLY a_id ON a (id)",
        "create unique index\n  concurrently a_id on a (id)",
        "DROP INDEX CONCURRENTLY a_id",
        "REINDEX TABLE CONCURRENTLY a",
        "VACUUM a",
        "CREATE DATABASE other",
        "ALTER SYSTEM SET work_mem = '8MB'",
    ],
)
def test_non_transactional_statement_in_unmarked_file_is_refused(
    mdir: Path, statement: str
) -> None:
    write(
        mdir,
        "002_index.sql",
        f"-- an index\n-- chatkeep:up\nSELECT 1;\n\n{statement};\n-- chatkeep:down\nSELECT 1;\n",
    )
    with pytest.raises(MigrationError, match=r"002_index\.sql, line 5") as info:
        load_migrations(mdir)
    assert "no-transaction" in str(info.value)


def test_non_transactional_statement_in_unmarked_down_part_is_refused(mdir: Path) -> None:
    write(
        mdir,
        "001_a.sql",
        "-- chatkeep:up\nSELECT 1;\n-- chatkeep:down\nDROP INDEX CONCURRENTLY a_id;\n",
    )
    with pytest.raises(MigrationError, match=r"001_a\.sql, line 4"):
        load_migrations(mdir)


def test_keywords_in_comments_and_strings_are_not_refused(mdir: Path) -> None:
    write(
        mdir,
        "001_a.sql",
        "-- chatkeep:up\n-- later: CREATE INDEX CONCURRENTLY\n"
        "COMMENT ON SCHEMA public IS 'VACUUM nightly; CREATE INDEX CONCURRENTLY';\n",
    )
    (m,) = load_migrations(mdir)
    assert m.transactional


def test_marked_file_is_not_transactional(mdir: Path) -> None:
    write(
        mdir,
        "002_idx.sql",
        "-- chatkeep:no-transaction\n-- chatkeep:up\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n"
        "-- chatkeep:down\nDROP INDEX CONCURRENTLY a_id;\n",
    )
    (m,) = load_migrations(mdir)
    assert not m.transactional


# -- checksums ----------------------------------------------------------------------------


def test_checksum_ignores_line_endings_and_trailing_whitespace() -> None:
    text = "-- chatkeep:up\nCREATE TABLE a (id int);\n"
    assert checksum(text) == checksum("-- chatkeep:up  \r\nCREATE TABLE a (id int);\t\r\n\r\n")
    assert checksum(text) == checksum("-- chatkeep:up\rCREATE TABLE a (id int);")
    assert normalise("a \r\nb\t\n\n\n") == "a\nb\n"


def test_checksum_sees_real_edits() -> None:
    text = "-- chatkeep:up\nCREATE TABLE a (id int);\n"
    assert checksum(text) != checksum(text.replace("int", "bigint"))
    # Leading whitespace inside a line is content (it can be inside a string literal).
    assert checksum(text) != checksum(text.replace("CREATE", "  CREATE"))
    assert len(checksum(text)) == 64


def test_error_line_uses_the_server_position_only_when_it_makes_sense() -> None:
    statement = Statement("SELECT\n  1,\n  x", 10)

    class Positioned(Exception):
        def __init__(self, position: object) -> None:
            super().__init__("boom")
            self.position = position

    assert _error_line(statement, Positioned("14")) == 12  # the "x" on the third line
    assert _error_line(statement, Positioned("1")) == 10
    assert _error_line(statement, Positioned(None)) == 10
    assert _error_line(statement, Positioned("not a number")) == 10
    assert _error_line(statement, Positioned("999")) == 10  # past the end: not ours
    assert _error_line(statement, ValueError("no position")) == 10


# -- applying -----------------------------------------------------------------------------


async def test_up_applies_everything_in_order_and_records_history(
    econn: asyncpg.Connection, three: Path
) -> None:
    runner = Migrator(econn, directory=three)
    assert states(await runner.status()) == {1: "pending", 2: "pending", 3: "pending"}
    done = await runner.up()
    assert [m.version for m in done] == [1, 2, 3]
    assert await tables(econn) == {"a", "b", "c"}
    rows = await history(econn)
    user = await econn.fetchval("SELECT current_user")
    assert [(r["version"], r["name"], r["direction"], r["outcome"]) for r in rows] == [
        (1, "create_a", "up", "success"),
        (2, "create_b", "up", "success"),
        (3, "create_c", "up", "success"),
    ]
    for row, migration in zip(rows, runner.migrations, strict=True):
        assert row["checksum"] == migration.checksum
        assert row["db_user"] == user
        assert row["transactional"] is True
        assert row["error"] is None
        assert row["started_at"] <= row["finished_at"]
        assert row["duration_ms"] >= 0
    entries = await runner.status()
    assert states(entries) == {1: "applied", 2: "applied", 3: "applied"}
    assert all(e.applied_by == user and e.applied_at is not None for e in entries)
    assert entries[0].as_json()["state"] == "applied"
    # Nothing left: a second run applies nothing and writes no rows.
    assert await runner.up() == []
    assert len(await history(econn)) == 3


async def test_up_to_stops_at_the_version(econn: asyncpg.Connection, three: Path) -> None:
    runner = Migrator(econn, directory=three)
    assert [m.version for m in await runner.up(to=2)] == [1, 2]
    assert states(await runner.status()) == {1: "applied", 2: "applied", 3: "pending"}
    assert await tables(econn) == {"a", "b"}
    assert [m.version for m in await runner.up()] == [3]


async def test_up_to_an_unknown_version_is_refused(econn: asyncpg.Connection, three: Path) -> None:
    with pytest.raises(MigrationError, match="no migration has version 9"):
        await Migrator(econn, directory=three).up(to=9)
    assert await tables(econn) == set()


@pytest.mark.parametrize("option", ["lock_timeout", "statement_lock_timeout", "statement_timeout"])
@pytest.mark.parametrize("value", [0, -1.0])
async def test_timeouts_must_be_positive(
    econn: asyncpg.Connection, three: Path, option: str, value: float
) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(InvalidInput) as info:
        Migrator(econn, directory=three, **options)
    assert info.value.field == option


async def test_a_tiny_timeout_is_still_a_timeout(econn: asyncpg.Connection, mdir: Path) -> None:
    # 0.1 ms rounds to 0 ms, which PostgreSQL would read as "no timeout at all".
    write(mdir, "001_seen.sql", "-- chatkeep:up\nCREATE TABLE seen AS SELECT 1 AS one;\n")
    plan = await Migrator(econn, directory=mdir, statement_lock_timeout=0.0001).plan_up()
    assert "SET LOCAL lock_timeout = '1ms';" in plan.render()


async def test_status_without_history_table_takes_no_lock_and_writes_nothing(
    econn: asyncpg.Connection, three: Path
) -> None:
    await Migrator(econn, directory=three).status()
    assert await econn.fetchval("SELECT to_regclass($1)", HISTORY_TABLE) is None


async def test_shipped_migrations_apply_to_an_empty_database(
    econn: asyncpg.Connection, template_database: str
) -> None:
    # template_database: the session's one-time server preparation (what `chatkeep setup`
    # does) has run, which later migrations need.
    done = await Migrator(econn).up()
    assert [m.label for m in done] == ALL
    assert {"users", "rooms", "messages", "room_users", "message_read_status"} <= await tables(
        econn
    )


async def test_the_test_template_is_fully_migrated(conn: asyncpg.Connection) -> None:
    entries = await Migrator(conn).status()
    assert [e.state for e in entries] == ["applied"] * len(ALL)


# -- status states and the allow_* flags --------------------------------------------------


async def test_out_of_order_file_is_refused_unless_allowed(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(mdir, "003_c.sql", table_migration("c"))
    await Migrator(econn, directory=mdir).up()
    write(mdir, "002_b.sql", table_migration("b"))  # a late merge from another branch
    runner = Migrator(econn, directory=mdir)
    assert states(await runner.status()) == {1: "applied", 2: "out-of-order", 3: "applied"}
    with pytest.raises(MigrationOrderError, match=r"002_b.*allow_out_of_order"):
        await runner.up()
    assert "b" not in await tables(econn)
    with pytest.raises(MigrationOrderError):
        await runner.plan_up()
    allowed = Migrator(econn, directory=mdir, allow_out_of_order=True)
    assert [m.version for m in await allowed.up()] == [2]
    assert states(await allowed.status()) == {1: "applied", 2: "applied", 3: "applied"}


async def test_missing_applied_file_is_refused_unless_allowed(
    econn: asyncpg.Connection, three: Path
) -> None:
    await Migrator(econn, directory=three).up(to=2)
    (three / "002_create_b.sql").unlink()
    runner = Migrator(econn, directory=three)
    assert states(await runner.status()) == {1: "applied", 2: "missing", 3: "pending"}
    with pytest.raises(MigrationOrderError, match=r"002_create_b.*allow_missing"):
        await runner.up()
    assert "c" not in await tables(econn)
    done = await Migrator(econn, directory=three, allow_missing=True).up()
    assert [m.version for m in done] == [3]
    # A missing file cannot be reverted: its down part is gone with it.
    runner = Migrator(econn, directory=three, allow_missing=True)
    with pytest.raises(MigrationError, match="002_create_b: its file is missing"):
        await runner.down(steps=2)
    assert await tables(econn) == {"a", "b", "c"}


async def test_edited_file_stops_the_run_and_is_named(
    econn: asyncpg.Connection, three: Path
) -> None:
    await Migrator(econn, directory=three).up(to=2)
    path = three / "002_create_b.sql"
    path.write_text(table_migration("b").replace("int", "bigint"), encoding="utf-8")
    runner = Migrator(econn, directory=three)
    assert states(await runner.status())[2] == "changed"
    with pytest.raises(ChecksumMismatch, match=r"002_create_b\.sql was edited") as info:
        await runner.up()
    assert info.value.version == 2
    assert "chatkeep migrate repair 2" in str(info.value)
    assert "c" not in await tables(econn)
    # validate_checksums=False carries on regardless.
    done = await Migrator(econn, directory=three, validate_checksums=False).up()
    assert [m.version for m in done] == [3]


async def test_line_ending_and_trailing_space_changes_are_not_edits(
    econn: asyncpg.Connection, three: Path
) -> None:
    await Migrator(econn, directory=three).up()
    path = three / "001_create_a.sql"
    crlf = "\r\n".join(line + "   " for line in path.read_text(encoding="utf-8").split("\n"))
    path.write_bytes(crlf.encode("utf-8") + b"\r\n\r\n")
    runner = Migrator(econn, directory=three)
    assert states(await runner.status()) == {1: "applied", 2: "applied", 3: "applied"}
    assert await runner.up() == []


async def test_repair_accepts_a_deliberate_change(econn: asyncpg.Connection, three: Path) -> None:
    await Migrator(econn, directory=three).up()
    path = three / "002_create_b.sql"
    path.write_text("-- reviewed\n" + table_migration("b"), encoding="utf-8")
    runner = Migrator(econn, directory=three)
    await runner.repair(2)
    assert states(await runner.status()) == {1: "applied", 2: "applied", 3: "applied"}
    rows = await history(econn)
    assert (rows[-1]["version"], rows[-1]["direction"], rows[-1]["outcome"]) == (
        2,
        "repair",
        "success",
    )
    assert rows[-1]["checksum"] == runner.migrations[1].checksum
    # The repaired version keeps its place: down still reverts it with the new text.
    assert [m.version for m in await runner.down(steps=2)] == [3, 2]


async def test_repair_refuses_unknown_and_unapplied_versions(
    econn: asyncpg.Connection, three: Path
) -> None:
    runner = Migrator(econn, directory=three)
    await runner.up(to=1)
    with pytest.raises(MigrationError, match="no migration file has version 7"):
        await runner.repair(7)
    with pytest.raises(MigrationError, match=r"002_create_b\.sql is not applied"):
        await runner.repair(2)


# -- failures -----------------------------------------------------------------------------


async def test_failing_file_leaves_nothing_behind_and_names_file_line_statement(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(
        mdir,
        "002_bad.sql",
        "-- chatkeep:up\nCREATE TABLE b1 (id int);\nCREATE INDEX b1_id ON b1 (id);\n\n"
        "INSERT INTO b1\n  VALUES ('not a number');\n-- chatkeep:down\nDROP TABLE b1;\n",
    )
    write(mdir, "003_c.sql", table_migration("c"))
    runner = Migrator(econn, directory=mdir)
    with pytest.raises(MigrationFailed) as info:
        await runner.up()
    error = info.value
    message = str(error)
    # The server points at the bad literal, on the statement's second line.
    assert message.startswith("002_bad.sql, line 6 failed (up): InvalidTextRepresentationError")
    assert "INSERT INTO b1 VALUES ('not a number')" in message
    assert error.version == 2
    assert error.statement == "INSERT INTO b1\n  VALUES ('not a number')"
    assert isinstance(error.__cause__, asyncpg.InvalidTextRepresentationError)
    # 001 stays applied; nothing of 002 (table, index) exists; 003 never ran.
    assert await tables(econn) == {"a"}
    assert await econn.fetchval("SELECT to_regclass('b1_id')") is None
    rows = await history(econn)
    assert [(r["version"], r["direction"], r["outcome"]) for r in rows] == [
        (1, "up", "success"),
        (2, "up", "failed"),
    ]
    assert "invalid input syntax" in rows[1]["error"]
    assert states(await runner.status()) == {1: "applied", 2: "pending", 3: "pending"}


async def test_syntax_error_names_the_statement_line(econn: asyncpg.Connection, mdir: Path) -> None:
    write(mdir, "001_typo.sql", "-- chatkeep:up\nSELECT 1;\nCREATE TABLEE t (id int);\n")
    with pytest.raises(MigrationFailed, match=r"001_typo\.sql, line 3 failed.*CREATE TABLEE"):
        await Migrator(econn, directory=mdir).up()


async def test_failure_after_a_down_reverts_nothing_of_that_file(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(
        mdir,
        "001_a.sql",
        "-- chatkeep:up\nCREATE TABLE a (id int);\nCREATE TABLE a2 (id int);\n"
        "-- chatkeep:down\nDROP TABLE a2;\nDROP TABLE nonexistent;\n",
    )
    runner = Migrator(econn, directory=mdir)
    await runner.up()
    with pytest.raises(MigrationFailed, match=r"001_a\.sql, line 6 failed \(down\)"):
        await runner.down()
    assert await tables(econn) == {"a", "a2"}
    assert states(await runner.status()) == {1: "applied"}
    rows = await history(econn)
    assert (rows[-1]["direction"], rows[-1]["outcome"]) == ("down", "failed")


# -- down ---------------------------------------------------------------------------------


async def test_down_reverts_newest_first_by_steps_and_to(
    econn: asyncpg.Connection, three: Path
) -> None:
    runner = Migrator(econn, directory=three)
    await runner.up()
    assert [m.version for m in await runner.down()] == [3]
    assert await tables(econn) == {"a", "b"}
    await runner.up()
    assert [m.version for m in await runner.down(steps=2)] == [3, 2]
    assert await tables(econn) == {"a"}
    await runner.up()
    assert [m.version for m in await runner.down(to=1)] == [3, 2]
    assert await runner.down(steps=0) == []
    assert [m.version for m in await runner.down(to=0)] == [1]
    assert await tables(econn) == set()
    assert await runner.down() == []
    assert states(await runner.status()) == {1: "pending", 2: "pending", 3: "pending"}
    directions = [r["direction"] for r in await history(econn)]
    assert directions.count("down") == 6


async def test_down_follows_applied_order_not_version_order(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(mdir, "003_c.sql", table_migration("c"))
    await Migrator(econn, directory=mdir).up()
    write(mdir, "002_b.sql", table_migration("b"))
    runner = Migrator(econn, directory=mdir, allow_out_of_order=True)
    await runner.up()  # applies 2 after 3
    plan = await runner.plan_down(to=0)
    assert [m.version for m in plan.migrations] == [2, 3, 1]
    assert [m.version for m in await runner.down(to=0)] == [2, 3, 1]


async def test_down_refuses_before_reverting_anything_when_a_down_part_is_missing(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(mdir, "002_b.sql", table_migration("b", down=False))
    write(mdir, "003_c.sql", table_migration("c"))
    runner = Migrator(econn, directory=mdir)
    await runner.up()
    with pytest.raises(MigrationError, match=r"cannot revert 002_b\.sql: it has no down part"):
        await runner.down(steps=2)
    # 003, which could have been reverted, was not: nothing was reverted at all.
    assert await tables(econn) == {"a", "b", "c"}
    assert [r["direction"] for r in await history(econn)] == ["up", "up", "up"]
    assert [m.version for m in await runner.down(steps=1)] == [3]


async def test_down_arguments_are_checked(econn: asyncpg.Connection, three: Path) -> None:
    runner = Migrator(econn, directory=three)
    await runner.up()
    with pytest.raises(MigrationError, match="not both"):
        await runner.down(to=1, steps=1)
    with pytest.raises(MigrationError, match="zero or more"):
        await runner.down(steps=-1)
    with pytest.raises(MigrationError, match="no migration has version 42"):
        await runner.down(to=42)
    assert await tables(econn) == {"a", "b", "c"}


# -- the history table --------------------------------------------------------------------


async def test_history_is_append_only(econn: asyncpg.Connection, three: Path) -> None:
    await Migrator(econn, directory=three).up()
    for statement in (
        f"UPDATE {HISTORY_TABLE} SET outcome = 'failed'",
        f"DELETE FROM {HISTORY_TABLE}",
        f"TRUNCATE {HISTORY_TABLE}",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await econn.execute(statement)
        # Through the storage boundary the same refusal is a PermissionDenied.
        with pytest.raises(PermissionDenied), translate_errors("history"):
            await econn.execute(statement)
    assert len(await history(econn)) == 3
    # The history table and its trigger survive a second run unchanged (created once).
    await Migrator(econn, directory=three).up()
    assert (
        await econn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
            HISTORY_TABLE,
        )
        == 1
    )


# -- locking ------------------------------------------------------------------------------


async def test_lock_timeout_when_another_migrator_holds_the_lock(
    econn: asyncpg.Connection, emptied_database_url: str, three: Path
) -> None:
    holder = await asyncpg.connect(emptied_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        runner = Migrator(econn, directory=three, lock_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(MigrationLockTimeout, match="nothing was applied"):
            await runner.up()
        assert 0.3 <= time.monotonic() - started < 3
        with pytest.raises(MigrationLockTimeout):
            await runner.down()
        with pytest.raises(MigrationLockTimeout):
            await runner.repair(1)
        assert await tables(econn) == set()
    finally:
        await holder.close()
    assert len(await Migrator(econn, directory=three).up()) == 3


async def test_a_waiting_migrator_proceeds_once_the_lock_is_free(
    econn: asyncpg.Connection, emptied_database_url: str, three: Path
) -> None:
    holder = await asyncpg.connect(emptied_database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        task = asyncio.create_task(Migrator(econn, directory=three, lock_timeout=10).up())
        await asyncio.sleep(0.3)
        assert not task.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        assert len(await asyncio.wait_for(task, 10)) == 3
    finally:
        await holder.close()
    # The runner let go of the lock when it finished.
    other = await asyncpg.connect(emptied_database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
    finally:
        await other.close()


async def test_concurrent_runners_in_one_process_apply_each_file_once(
    emptied_database_url: str, three: Path
) -> None:
    conns = [await asyncpg.connect(emptied_database_url) for _ in range(5)]
    try:
        results = await asyncio.gather(
            *(Migrator(c, directory=three, lock_timeout=30).up() for c in conns)
        )
        assert sorted(len(r) for r in results) == [0, 0, 0, 0, 3]
        rows = await history(conns[0])
        assert sorted(r["version"] for r in rows if r["direction"] == "up") == [1, 2, 3]
    finally:
        for c in conns:
            await c.close()


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("CHATKEEP_")
    }
    env["CHATKEEP_DATA_DIR"] = str(tmp_path / "data")
    return env


async def test_five_migrator_processes_apply_each_file_exactly_once(
    emptied_database_url: str, tmp_path: Path, foundation: Path
) -> None:
    chatkeep = str(Path(sys.executable).with_name("chatkeep"))
    procs = [
        await asyncio.create_subprocess_exec(
            chatkeep,
            "migrate",
            "up",
            "--database-url",
            emptied_database_url,
            "--migrations-dir",
            str(foundation),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_cli_env(tmp_path),
        )
        for _ in range(5)
    ]
    outputs = [await p.communicate() for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out + err).decode()
    reports = [out.decode() for out, _ in outputs]
    assert sum("7 migration(s) applied" in r for r in reports) == 1
    assert sum("up to date" in r for r in reports) == 4
    conn = await asyncpg.connect(emptied_database_url)
    try:
        rows = await history(conn)
        ups = sorted(r["version"] for r in rows if r["direction"] == "up")
        assert ups == list(range(1, 8))
        assert all(r["outcome"] == "success" for r in rows)
        states_now = await Migrator(conn, directory=foundation).status()
        assert [e.state for e in states_now] == ["applied"] * 7
    finally:
        await conn.close()


# -- per-statement timeouts ---------------------------------------------------------------


async def test_lock_and_statement_timeouts_are_set_for_migration_statements(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(
        mdir,
        "001_seen.sql",
        "-- chatkeep:up\nCREATE TABLE seen AS SELECT current_setting('lock_timeout') AS lt,"
        " current_setting('statement_timeout') AS st;\n",
    )
    write(
        mdir,
        "002_seen_no_tx.sql",
        "-- chatkeep:no-transaction\n-- chatkeep:up\nINSERT INTO seen"
        " SELECT current_setting('lock_timeout'), current_setting('statement_timeout');\n",
    )
    before = (
        await econn.fetchval("SHOW lock_timeout"),
        await econn.fetchval("SHOW statement_timeout"),
    )
    runner = Migrator(econn, directory=mdir, statement_lock_timeout=1.5, statement_timeout=42)
    await runner.up()
    rows = await econn.fetch("SELECT lt, st FROM seen")
    assert [tuple(r) for r in rows] == [("1500ms", "42s"), ("1500ms", "42s")]
    # Both are scoped to the migration: the session is back to what it was.
    after = (
        await econn.fetchval("SHOW lock_timeout"),
        await econn.fetchval("SHOW statement_timeout"),
    )
    assert after == before


async def test_statement_blocked_by_a_held_lock_fails_fast(
    econn: asyncpg.Connection, emptied_database_url: str, mdir: Path
) -> None:
    await econn.execute("CREATE TABLE busy (id int)")
    write(mdir, "001_alter.sql", "-- chatkeep:up\nALTER TABLE busy ADD COLUMN note text;\n")
    holder = await asyncpg.connect(emptied_database_url)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE busy IN ACCESS SHARE MODE")
            runner = Migrator(econn, directory=mdir, statement_lock_timeout=0.2)
            started = time.monotonic()
            with pytest.raises(MigrationFailed, match="LockNotAvailableError") as info:
                await runner.up()
            assert time.monotonic() - started < 3
            assert isinstance(info.value.__cause__, asyncpg.LockNotAvailableError)
    finally:
        await holder.close()
    assert await econn.fetchval("SELECT count(*) FROM pg_attribute WHERE attname = 'note'") == 0


async def test_statement_timeout_cancels_a_slow_statement(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_slow.sql", "-- chatkeep:up\nSELECT pg_sleep(10);\n")
    started = time.monotonic()
    with pytest.raises(MigrationFailed, match="QueryCanceledError"):
        await Migrator(econn, directory=mdir, statement_timeout=0.2).up()
    assert time.monotonic() - started < 3


# -- no-transaction files -----------------------------------------------------------------


async def test_no_transaction_file_runs_create_index_concurrently(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(
        mdir,
        "002_a_index.sql",
        "-- chatkeep:no-transaction\n-- chatkeep:up\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_id_desc ON a (id DESC);\n"
        "-- chatkeep:down\nDROP INDEX CONCURRENTLY IF EXISTS a_id_desc;\n",
    )
    runner = Migrator(econn, directory=mdir)
    await runner.up()
    valid = await econn.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'a_id_desc'::regclass"
    )
    assert valid is True
    rows = await history(econn)
    assert [(r["version"], r["transactional"]) for r in rows] == [(1, True), (2, False)]
    await runner.down()
    assert await econn.fetchval("SELECT to_regclass('a_id_desc')") is None


async def test_no_transaction_failure_keeps_earlier_statements_and_says_so(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(
        mdir,
        "001_steps.sql",
        "-- chatkeep:no-transaction\n-- chatkeep:up\nCREATE TABLE first (id int);\n"
        "CREATE TABLE first (id int);\n",
    )
    with pytest.raises(MigrationFailed, match="statements before this one stay applied") as info:
        await Migrator(econn, directory=mdir).up()
    assert "001_steps.sql, line 4" in str(info.value)
    assert await tables(econn) == {"first"}
    assert await econn.fetchval("SHOW lock_timeout") == "0"
    rows = await history(econn)
    assert [(r["outcome"], r["transactional"]) for r in rows] == [("failed", False)]


# -- plan ---------------------------------------------------------------------------------


async def test_plan_shows_the_exact_sql_and_runs_nothing(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(
        mdir,
        "002_idx.sql",
        "-- chatkeep:no-transaction\n-- chatkeep:up\nCREATE INDEX CONCURRENTLY a_i ON a (id);\n"
        "-- chatkeep:down\nDROP INDEX CONCURRENTLY a_i;\n",
    )
    runner = Migrator(econn, directory=mdir, statement_lock_timeout=2, statement_timeout=60)
    plan = await runner.plan_up()
    assert plan.direction == "up"
    assert plan.render() == (
        "-- 001_a.sql (up, transaction)\n"
        "BEGIN;\n"
        "SET LOCAL lock_timeout = '2000ms';\n"
        "SET LOCAL statement_timeout = '60000ms';\n"
        "CREATE TABLE a (id int PRIMARY KEY);\n"
        f"-- then: a row in {HISTORY_TABLE} (version 1, up)\n"
        "COMMIT;\n"
        "\n"
        "-- 002_idx.sql (up, no-transaction)\n"
        "SET lock_timeout = '2000ms';\n"
        "SET statement_timeout = '60000ms';\n"
        "CREATE INDEX CONCURRENTLY a_i ON a (id);\n"
        f"-- then: a row in {HISTORY_TABLE} (version 2, up)\n"
        "RESET lock_timeout; RESET statement_timeout;\n"
    )
    assert [m.version for m in (await runner.plan_up(to=1)).migrations] == [1]
    # Nothing ran: no tables, not even the history table.
    assert await tables(econn) == set()
    assert await econn.fetchval("SELECT to_regclass($1)", HISTORY_TABLE) is None
    await runner.up()
    down = await runner.plan_down(steps=2)
    assert [m.version for m in down.migrations] == [2, 1]
    text = down.render()
    assert text.index("DROP INDEX CONCURRENTLY a_i;") < text.index("DROP TABLE a;")
    assert "-- 002_idx.sql (down, no-transaction)" in text
    assert (await runner.plan_up()).migrations == ()


# -- verify -------------------------------------------------------------------------------


async def test_verify_round_trips_every_shipped_migration(
    emptied_database_url: str, make_settings: Callable[..., Settings], template_database: str
) -> None:
    settings = make_settings(database_url=emptied_database_url)
    async with Migrator.connect(settings) as runner:
        report = await runner.verify()
        assert report == [f"{label}: up, down, up ok" for label in ALL]
        # The target database was not touched, and the scratch database is gone.
        assert [e.state for e in await runner.status()] == ["pending"] * len(ALL)
        left = await runner._conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'chatkeep_verify_%'"
        )
    assert left == 0


async def test_verify_fails_when_a_down_part_does_not_restore_the_schema(
    emptied_database_url: str, make_settings: Callable[..., Settings], mdir: Path
) -> None:
    write(mdir, "001_a.sql", table_migration("a"))
    write(
        mdir,
        "002_b.sql",
        "-- chatkeep:up\nCREATE TABLE b (id int);\nCREATE INDEX b_id ON b (id);\n"
        "ALTER TABLE a ADD COLUMN note text;\n"
        "-- chatkeep:down\nDROP TABLE b;\n",
    )
    write(mdir, "003_c.sql", table_migration("c", down=False))
    settings = make_settings(database_url=emptied_database_url)
    async with Migrator.connect(settings, directory=mdir) as runner:
        with pytest.raises(MigrationError, match=r"002_b\.sql: down does not restore") as info:
            await runner.verify()
    assert "+ columns: a | 2 | note | text" in str(info.value)
    write(mdir, "002_b.sql", table_migration("b"))
    async with Migrator.connect(settings, directory=mdir) as runner:
        assert await runner.verify() == [
            "001_a: up, down, up ok",
            "002_b: up, down, up ok",
            "003_c: up ok (no down part)",
        ]


async def test_verify_fails_when_up_is_not_repeatable(
    emptied_database_url: str, make_settings: Callable[..., Settings], mdir: Path
) -> None:
    # 002's down part restores the schema but keeps a row that changes what its up part
    # does the second time: the round trip must catch that too.
    write(mdir, "001_keep.sql", table_migration("keep"))
    write(
        mdir,
        "002_once.sql",
        "-- chatkeep:up\n"
        "DO $$ BEGIN\n"
        "  IF NOT EXISTS (SELECT FROM keep) THEN\n"
        "    INSERT INTO keep VALUES (1); CREATE TABLE once (id int);\n"
        "  ELSE CREATE TABLE twice (id int); END IF;\n"
        "END $$;\n"
        "-- chatkeep:down\nDROP TABLE IF EXISTS once;\nDROP TABLE IF EXISTS twice;\n",
    )
    settings = make_settings(database_url=emptied_database_url)
    async with Migrator.connect(settings, directory=mdir) as runner:
        with pytest.raises(MigrationError, match=r"002_once\.sql: up gives a different") as info:
            await runner.verify()
    assert "+ tables: twice" in str(info.value)


async def test_verify_needs_a_connected_migrator(econn: asyncpg.Connection, three: Path) -> None:
    with pytest.raises(MigrationError, match=r"Migrator\.connect"):
        await Migrator(econn, directory=three).verify()


# -- library API --------------------------------------------------------------------------


async def test_migrate_up_applies_everything_and_is_idempotent(
    emptied_database_url: str, make_settings: Callable[..., Settings], foundation: Path
) -> None:
    settings = make_settings(database_url=emptied_database_url)
    assert [m.label for m in await migrate_up(settings, directory=foundation)] == FOUNDATION
    assert await migrate_up(settings, directory=foundation) == []
    conn = await asyncpg.connect(emptied_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await conn.close()


async def test_migrate_up_runs_concurrently_from_many_tasks(
    emptied_database_url: str, make_settings: Callable[..., Settings], foundation: Path
) -> None:
    settings = make_settings(database_url=emptied_database_url)
    results = await asyncio.gather(*(migrate_up(settings, directory=foundation) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, 7]


async def test_connect_uses_the_migrate_url_and_settings_timeouts(
    emptied_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        migrate_database_url=emptied_database_url,
        migrate_lock_timeout=3,
        migrate_statement_lock_timeout=4,
        migrate_statement_timeout=5,
    )
    async with Migrator.connect(settings) as runner:
        assert (runner.lock_timeout, runner.statement_lock_timeout) == (3, 4)
        assert runner.statement_timeout == 5
        assert await runner._conn.fetchval("SHOW application_name") == "chatkeep-migrate"
    # The runner closed its connection.
    assert runner._conn.is_closed()


async def test_connect_without_any_database_url_is_refused(
    make_settings: Callable[..., Settings],
) -> None:
    with pytest.raises(MigrationError, match="no database to migrate"):
        async with Migrator.connect(make_settings()):
            pass  # pragma: no cover


async def test_a_run_with_nothing_to_do_changes_no_catalog_row(
    econn: asyncpg.Connection, three: Path
) -> None:
    runner = Migrator(econn, directory=three)
    await runner.up()
    fingerprint = (
        "SELECT xmin::text FROM pg_proc WHERE proname = 'chatkeep_schema_history_append_only'"
    )
    before = await econn.fetchval(fingerprint)
    assert await runner.up() == []
    assert await econn.fetchval(fingerprint) == before


async def test_a_cancelled_verify_drops_its_scratch_database(
    emptied_database_url: str, make_settings: Callable[..., Settings], mdir: Path
) -> None:
    write(mdir, "001_slow.sql", "-- chatkeep:up\nSELECT pg_sleep(30);\n-- chatkeep:down\n")
    settings = make_settings(database_url=emptied_database_url)
    watcher = await asyncpg.connect(emptied_database_url)
    try:
        async with Migrator.connect(settings, directory=mdir) as runner:
            verify = asyncio.ensure_future(runner.verify())
            sleeping = (
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname LIKE 'chatkeep_verify_%' AND query LIKE '%pg_sleep(30)%'"
            )
            for _ in range(200):
                if await watcher.fetchval(sleeping):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("verify never reached its slow migration")
            # Cancelled twice: the second lands in the clean-up, as a timeout around a
            # cancelled task's clean-up would.
            verify.cancel()
            await asyncio.sleep(0.01)
            verify.cancel()
            with pytest.raises(asyncio.CancelledError):
                await verify
        left = await watcher.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'chatkeep_verify_%'"
        )
    finally:
        await watcher.close()
    assert left == 0
