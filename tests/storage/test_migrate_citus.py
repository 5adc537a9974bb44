"""The migration runner's Citus parts, on plain PostgreSQL: parsed, attached, never run.

Their effect on a real Citus cluster is tested by tests/citus/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from chatkeep.errors import MigrationError
from chatkeep.storage.migrate import (
    CITUS_BASELINE,
    DEFAULT_MIGRATIONS_DIR,
    Migrator,
    _refuse_without_citus_part,
    load_migrations,
)
from tests.migration_files import write

# A Citus part that fails on plain PostgreSQL: if the runner ran it, the test would see it.
CITUS_ONLY = "SELECT create_distributed_table('a', 'id');\n"


def test_the_shipped_citus_part_is_attached_to_012_and_not_checksummed() -> None:
    found = {m.version: m for m in load_migrations()}
    assert found[12].citus, "012 carries the Citus part of 001-012"
    assert "create_distributed_table('messages'" in "\n".join(s.sql for s in found[12].citus)
    # Inline Citus parts of migrations after 012 (013 and 015: flow functions in Citus forms).
    assert found[13].citus
    assert found[15].citus
    assert found[16].citus_ready  # an empty part: it runs on Citus unchanged
    assert found[21].citus_ready  # an empty part, its up part all plain-only
    assert found[21].citus_up == ()
    # 023: the thread tables of 015 distributed by room; PostgreSQL keeps 015's shape.
    part = "\n".join(s.sql for s in found[23].citus)
    for table in ("threads", "thread_followers", "message_mentions"):
        assert f"create_distributed_table('{table}', 'room_id', colocate_with => 'rooms')" in part
    assert "CREATE TABLE" not in "\n".join(s.sql for s in found[23].up)
    assert (DEFAULT_MIGRATIONS_DIR / "citus" / "012_distribute.sql").is_file()


def test_an_inline_citus_part_sits_between_up_and_down(mdir: Path) -> None:
    write(
        mdir,
        "001_a.sql",
        f"-- chatkeep:up\nCREATE TABLE a (id int);\n-- chatkeep:citus\n{CITUS_ONLY}"
        "-- chatkeep:down\nDROP TABLE a;\n",
    )
    (migration,) = load_migrations(mdir)
    assert [s.sql for s in migration.up] == ["CREATE TABLE a (id int)"]
    assert [s.sql for s in migration.citus] == [CITUS_ONLY.strip().rstrip(";")]
    assert migration.citus[0].line == 4
    assert migration.down is not None
    assert [s.sql for s in migration.down] == ["DROP TABLE a"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- chatkeep:citus\nSELECT 1;\n-- chatkeep:up\nSELECT 1;\n", "between up and down"),
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:down\nSELECT 1;\n"
            "-- chatkeep:citus\nSELECT 1;\n",
            "between up and down",
        ),
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:citus\nSELECT 1;\n"
            "-- chatkeep:citus\nSELECT 2;\n",
            "more than one '-- chatkeep:citus'",
        ),
    ],
)
def test_misplaced_citus_parts_are_refused(mdir: Path, text: str, message: str) -> None:
    write(mdir, "001_a.sql", text)
    with pytest.raises(MigrationError, match=message):
        load_migrations(mdir)


def test_a_citus_file_must_name_a_migration_without_its_own_part(mdir: Path) -> None:
    write(mdir, "001_a.sql", "-- chatkeep:up\nCREATE TABLE a (id int);\n")
    (mdir / "citus").mkdir()
    write(mdir / "citus", "002_b.sql", f"-- chatkeep:up\n{CITUS_ONLY}")
    with pytest.raises(MigrationError, match="no migration has version 2"):
        load_migrations(mdir)
    (mdir / "citus" / "002_b.sql").unlink()
    write(mdir / "citus", "001_a.sql", f"-- chatkeep:up\n{CITUS_ONLY}")
    (migration,) = load_migrations(mdir)
    assert [s.sql for s in migration.citus] == [CITUS_ONLY.strip().rstrip(";")]
    write(
        mdir,
        "001_a.sql",
        f"-- chatkeep:up\nCREATE TABLE a (id int);\n-- chatkeep:citus\n{CITUS_ONLY}",
    )
    with pytest.raises(MigrationError, match="has a citus part of its own"):
        load_migrations(mdir)


async def test_plain_postgresql_never_runs_a_citus_part(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(
        mdir,
        "001_a.sql",
        f"-- chatkeep:up\nCREATE TABLE a (id int);\n-- chatkeep:citus\n{CITUS_ONLY}"
        "-- chatkeep:down\nDROP TABLE a;\n",
    )
    runner = Migrator(econn, directory=mdir)
    assert [m.version for m in await runner.up()] == [1]
    assert runner.citus is False
    assert await econn.fetchval("SELECT to_regclass('a') IS NOT NULL")
    # On plain PostgreSQL a migration with a Citus part reverts as any other.
    assert [m.version for m in await runner.down()] == [1]
    assert not await econn.fetchval("SELECT to_regclass('a') IS NOT NULL")


PLAIN_REGION = (
    "-- chatkeep:up\nCREATE TABLE a (id int);\n-- chatkeep:plain-only\n"
    "-- a comment in the region\nALTER TABLE a ADD COLUMN b int;\nALTER TABLE a ADD COLUMN c int;\n"
    "-- chatkeep:end-plain-only\nCREATE TABLE d (id int);\n-- chatkeep:citus\n{citus}"
    "-- chatkeep:down\nDROP TABLE d;\nDROP TABLE a;\n"
)


def test_a_plain_only_region_is_skipped_on_citus(mdir: Path) -> None:
    write(mdir, "001_a.sql", PLAIN_REGION.format(citus=CITUS_ONLY))
    (migration,) = load_migrations(mdir)
    plain = [s.sql for s in migration.up_on(citus=False)]
    assert plain == [
        "CREATE TABLE a (id int)",
        "ALTER TABLE a ADD COLUMN b int",
        "ALTER TABLE a ADD COLUMN c int",
        "CREATE TABLE d (id int)",
    ]
    on_citus = [s.sql for s in migration.up_on(citus=True)]
    assert on_citus == ["CREATE TABLE a (id int)", "CREATE TABLE d (id int)", CITUS_ONLY[:-2]]


def test_013_skips_its_policies_on_citus() -> None:
    found = {m.version: m for m in load_migrations()}
    plain = "\n".join(s.sql for s in found[13].up_on(citus=False))
    on_citus = "\n".join(s.sql for s in found[13].up_on(citus=True))
    assert "ALTER POLICY" in plain
    assert "ALTER POLICY" not in on_citus
    assert "CREATE FUNCTION chatkeep_history" in on_citus
    assert "CREATE OR REPLACE FUNCTION chatkeep_history" in on_citus


def test_017_adds_its_history_functions_on_plain_postgresql_only() -> None:
    # Citus keeps 015's chatkeep_history in a transaction acting as the user (fetch_as).
    found = {m.version: m for m in load_migrations()}
    plain = "\n".join(s.sql for s in found[17].up_on(citus=False))
    assert "CREATE FUNCTION chatkeep_history_page" in plain
    assert "CREATE FUNCTION chatkeep_history_around" in plain
    assert found[17].up_on(citus=True) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:plain-only\nSELECT 2;\n",
            "line 3: '-- chatkeep:plain-only' is never ended",
        ),
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:end-plain-only\nSELECT 2;\n",
            "line 3: '-- chatkeep:end-plain-only' without",
        ),
        (
            "-- chatkeep:up\n-- chatkeep:plain-only\n-- chatkeep:plain-only\nSELECT 1;\n"
            "-- chatkeep:end-plain-only\n",
            "line 3: plain-only regions do not nest",
        ),
        (
            "-- chatkeep:up\nSELECT 1;\n-- chatkeep:down\n-- chatkeep:plain-only\nSELECT 2;\n"
            "-- chatkeep:end-plain-only\n",
            "line 4: a plain-only region must lie inside the up part",
        ),
    ],
)
def test_misplaced_plain_only_regions_are_refused(mdir: Path, text: str, message: str) -> None:
    write(mdir, "001_a.sql", text)
    with pytest.raises(MigrationError, match=message):
        load_migrations(mdir)


async def test_plain_postgresql_runs_a_plain_only_region(
    econn: asyncpg.Connection, mdir: Path
) -> None:
    write(mdir, "001_a.sql", PLAIN_REGION.format(citus=CITUS_ONLY))
    runner = Migrator(econn, directory=mdir)
    assert [m.version for m in await runner.up()] == [1]
    columns = await econn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'a'::regclass AND attnum > 0"
        " ORDER BY attnum"
    )
    assert [c["attname"] for c in columns] == ["id", "b", "c"]
    assert [m.version for m in await runner.down()] == [1]


def test_an_empty_citus_part_marks_a_migration_ready(mdir: Path) -> None:
    write(mdir, "001_a.sql", "-- chatkeep:up\nSELECT 1;\n-- chatkeep:citus\n-- nothing\n")
    write(mdir, "002_b.sql", "-- chatkeep:up\nSELECT 2;\n")
    first, second = load_migrations(mdir)
    assert first.citus_ready
    assert first.citus == ()
    assert not second.citus_ready


def test_citus_refuses_a_chatkeep_migration_without_a_citus_part() -> None:
    shipped = load_migrations()
    after = [m for m in shipped if m.version > CITUS_BASELINE]
    assert after, "chatkeep has migrations after the Citus baseline"
    ready = [replace(m, citus_ready=True) for m in shipped]
    _refuse_without_citus_part(ready, ready)  # every one has a part: nothing refused
    # Before the baseline, 012's attached part covers them: never refused.
    _refuse_without_citus_part([m for m in shipped if m.version <= CITUS_BASELINE], shipped)
    unready = replace(after[0], citus_ready=False)
    plan = [m if m.version != unready.version else unready for m in ready]
    with pytest.raises(MigrationError) as caught:
        _refuse_without_citus_part(plan, plan)
    message = str(caught.value)
    assert f"{unready.path.name} has no '-- chatkeep:citus' part" in message
    before = max(m.version for m in shipped if m.version < unready.version)
    assert f"migrate up --to {before} applies" in message
    assert "nothing was applied" in message
