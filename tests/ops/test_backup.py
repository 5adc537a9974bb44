"""Backup against the real server: round trips through restore, refusals, the command line."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import (
    ConfigurationError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
)
from chatkeep.ops import backup, pgtools, restore
from chatkeep.storage.bootstrap import database_name
from chatkeep.storage.migrate import Migrator, load_migrations
from tests.conftest import url_for
from tests.ops.cli import invoke
from tests.ops.conftest import MakeDatabase, embedded_bin, names, seeded_backup, settings
from tests.ops.seed import fingerprints, seed, server_major

NEWEST = max(m.version for m in load_migrations())


CliEnv = Callable[..., dict[str, str]]


# -- round trips -----------------------------------------------------------------------------


async def test_round_trip_restores_every_row(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    seen: list[pgtools.Progress] = []
    result = await seeded_backup(database_url, tmp_path, progress=seen.append)

    database = database_name(database_url)
    assert re.fullmatch(
        rf"chatkeep-{database}-\d{{8}}T\d{{6}}Z-v{NEWEST:03d}\.dump", result.path.name
    )
    assert result.path.parent == tmp_path
    assert result.schema_version == NEWEST
    assert result.size == result.path.stat().st_size > 0
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert stat.S_IMODE(result.path.stat().st_mode) == 0o600  # it holds password hashes
    assert names(tmp_path) == [result.path.name]  # no .partial left
    assert result.pg_dump.major >= await server_major(database_url)
    assert seen[0].phase == "dump"
    assert seen[-1].done == seen[-1].total > 0

    source = await fingerprints(database_url)
    assert source["messages"][0] > 50
    assert source["message_read_status"][0] > 0

    target = await make_database()
    steps: list[pgtools.Progress] = []
    restored = await restore.restore(
        settings(), result.path, database_url=target, progress=steps.append
    )

    assert await fingerprints(target) == source
    assert restored.problems == ()
    assert restored.pending == ()
    assert restored.schema_version == NEWEST
    assert [e.state for e in restored.history] == ["applied"] * len(load_migrations())
    assert {p.phase for p in steps} == {"verify", "restore", "check"}
    restore_steps = [p for p in steps if p.phase == "restore"]
    assert restore_steps[-1].done == restore_steps[-1].total


async def test_embedded_tools_dump_and_restore_any_supported_server(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """pg_dump 18 (shipped in the embedded wheel) dumps and restores older servers too."""
    tools = [embedded_bin()]
    result = await seeded_backup(database_url, tmp_path, pg_bin_dirs=tools)
    assert result.pg_dump.major == 18

    target = await make_database()
    restored = await restore.restore(
        settings(), result.path, database_url=target, pg_bin_dirs=tools
    )

    major = await server_major(target)
    # pg_restore 17+ sends SET transaction_timeout, which servers before 17 reject.
    assert restored.mode == ("script" if major < 17 else "direct")
    assert await fingerprints(target) == await fingerprints(database_url)
    assert restored.problems == ()


async def test_restore_of_an_older_schema_reports_pending_migrations(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await Migrator(conn).down(steps=1)
    finally:
        await conn.close()
    result = await backup.backup(settings(), tmp_path, database_url=database_url)
    assert result.schema_version == NEWEST - 1

    target = await make_database()
    restored = await restore.restore(settings(), result.path, database_url=target)
    assert [e.version for e in restored.pending] == [NEWEST]
    assert restored.problems == ()
    assert restored.schema_version == NEWEST - 1


async def test_backup_refuses_a_database_without_the_schema(
    empty_database_url: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="holds no chatkeep schema"):
        await backup.backup(settings(), tmp_path, database_url=empty_database_url)
    assert names(tmp_path) == []


async def test_backup_output_rules(database_url: str, tmp_path: Path) -> None:
    target = tmp_path / "nightly.dump"
    first = await backup.backup(settings(), target, database_url=database_url)
    assert first.path == target

    with pytest.raises(InvalidInput, match="already exists") as caught:
        await backup.backup(settings(), target, database_url=database_url)
    assert caught.value.field == "output"

    again = await backup.backup(settings(), target, database_url=database_url, overwrite=True)
    assert again.path == target
    assert target.stat().st_size == again.size

    with pytest.raises(InvalidInput, match="does not exist"):
        await backup.backup(settings(), tmp_path / "no" / "such.dump", database_url=database_url)
    with pytest.raises(InvalidInput, match="lock_wait_timeout"):
        await backup.backup(settings(), tmp_path, database_url=database_url, lock_wait_timeout=0)
    with pytest.raises(ConfigurationError, match="no database given"):
        await backup.backup(Settings(data_dir=tmp_path), tmp_path)


async def test_backup_that_fails_leaves_no_file(database_url: str, tmp_path: Path) -> None:
    """A migration holding a table lock makes pg_dump give up after lock_wait_timeout."""
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(Unavailable, match=r"stayed locked for over 0\.2s"):
                await backup.backup(
                    settings(),
                    tmp_path / "x.dump",
                    database_url=database_url,
                    lock_wait_timeout=0.2,
                )
    finally:
        await blocker.close()
    assert names(tmp_path) == []


async def test_backup_as_a_role_that_cannot_read_everything_says_how_to_fix_it(
    database_url: str, tmp_path: Path
) -> None:
    """The application and read-only roles see only part of the data: pg_dump refuses."""
    role = f"chatkeep_ops_limited_{os.getpid()}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"CREATE ROLE {role} NOLOGIN")
        await conn.execute(
            f'GRANT CONNECT ON DATABASE "{database_name(database_url)}" TO {role};'
            f"GRANT USAGE ON SCHEMA public TO {role};"
            f"GRANT SELECT ON chatkeep_schema_history TO {role}"
        )
        # Both asyncpg and pg_dump take the role from the URL's startup options.
        joiner = "&" if "?" in database_url else "?"
        limited = f"{database_url}{joiner}options=-crole%3D{role}"
        with pytest.raises(PermissionDenied, match="back up as a superuser"):
            await backup.backup(settings(), tmp_path, database_url=limited)
        assert names(tmp_path) == []
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()


# -- the command line ------------------------------------------------------------------------


async def test_cli_backup_and_restore(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, cli_env: CliEnv
) -> None:
    env = cli_env()
    await seed(database_url)
    made_code, made_out, _ = await invoke(
        ["backup", "--output", str(tmp_path), "--database-url", database_url], env
    )
    assert made_code == 0, made_out
    (archive_name,) = names(tmp_path)
    archive = tmp_path / archive_name
    assert "wrote" in made_out
    assert "sha256" in made_out
    # Piped output is never wrapped (issue 16): a long path is not cut across lines (invoke
    # joins lines with spaces, so a cut would show as a space inside the path).
    assert f"restore with: chatkeep restore {archive} --database-url URL" in made_out

    target = await make_database()
    restored_code, restored_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], env
    )
    assert restored_code == 0, restored_out
    assert f"schema version {NEWEST:03d}: current" in restored_out
    assert "version name state 001 create_users applied" in restored_out  # plain, no box
    assert await fingerprints(target) == await fingerprints(database_url)

    refused_code, refused_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], env
    )
    assert refused_code == 1
    assert "is not empty" in refused_out

    # --create makes the database first.
    name = f"{database_name(target)}_new"
    created_url = url_for(target, name)
    try:
        created_code, created_out, _ = await invoke(
            ["restore", str(archive), "--database-url", created_url, "--create"], env
        )
        assert created_code == 0, created_out
        assert await fingerprints(created_url) == await fingerprints(database_url)
    finally:
        admin = await asyncpg.connect(url_for(target, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_cli_restore_reports_pending_migrations(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, cli_env: CliEnv
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await Migrator(conn).down(steps=1)
    finally:
        await conn.close()
    archive = (await backup.backup(settings(), tmp_path, database_url=database_url)).path
    target = await make_database()
    result_code, result_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], cli_env()
    )
    assert result_code == 0, result_out
    assert "1 newer migration(s) pending" in result_out
    assert "chatkeep migrate up" in result_out


async def test_cli_restore_exits_3_when_the_history_disagrees(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, cli_env: CliEnv
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # A repair that accepted text the files do not hold: the history now disagrees.
        await conn.execute(
            "INSERT INTO chatkeep_schema_history (version, name, checksum, direction,"
            " transactional, started_at, finished_at, duration_ms, outcome)"
            " VALUES (1, 'create_users', 'bogus', 'repair', true, now(), now(), 0, 'success')"
        )
    finally:
        await conn.close()
    archive = (await backup.backup(settings(), tmp_path, database_url=database_url)).path
    target = await make_database()
    result_code, result_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], cli_env()
    )
    assert result_code == 3, result_out
    assert "001 (changed)" in result_out
