"""Backup and restore against the real server: round trips, refusals, damaged archives."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.embedded import embedded_postgres_bin_dir
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
)
from chatkeep.ops import backup as ops
from chatkeep.storage.bootstrap import database_name
from chatkeep.storage.migrate import Migrator, load_migrations
from tests.conftest import url_for
from tests.ops.cli import invoke
from tests.ops.conftest import MakeDatabase
from tests.ops.seed import fingerprints, object_count, seed, server_major

NEWEST = max(m.version for m in load_migrations())


def settings() -> Settings:
    return Settings(data_dir=Path(".chatkeep"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def embedded_bin() -> Path:
    found = embedded_postgres_bin_dir()
    assert found is not None, "the dev extra installs embedded-postgres"
    return found


async def seeded_backup(
    database_url: str,
    folder: Path,
    *,
    pg_bin_dirs: Sequence[Path] = (),
    progress: ops.ProgressCallback | None = None,
) -> ops.BackupResult:
    await seed(database_url)
    return await ops.backup(
        settings(), folder, database_url=database_url, pg_bin_dirs=pg_bin_dirs, progress=progress
    )


CliEnv = Callable[..., dict[str, str]]


# -- round trips -----------------------------------------------------------------------------


async def test_round_trip_restores_every_row(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    seen: list[ops.Progress] = []
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
    steps: list[ops.Progress] = []
    restored = await ops.restore(
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
    restored = await ops.restore(settings(), result.path, database_url=target, pg_bin_dirs=tools)

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
    result = await ops.backup(settings(), tmp_path, database_url=database_url)
    assert result.schema_version == NEWEST - 1

    target = await make_database()
    restored = await ops.restore(settings(), result.path, database_url=target)
    assert [e.version for e in restored.pending] == [NEWEST]
    assert restored.problems == ()
    assert restored.schema_version == NEWEST - 1


# -- refusals ------------------------------------------------------------------------------


async def test_restore_refuses_a_non_empty_database(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    result = await seeded_backup(database_url, tmp_path)
    target = await make_database(migrated=True)
    before = await fingerprints(target)

    with pytest.raises(InvalidInput, match="is not empty") as caught:
        await ops.restore(settings(), result.path, database_url=target)

    assert caught.value.field == "database_url"
    assert "--force" in str(caught.value)
    assert await fingerprints(target) == before


async def test_force_replaces_what_the_backup_holds(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    result = await seeded_backup(database_url, tmp_path)
    target = await make_database(migrated=True)
    await seed(target)  # different ids, same shape: every row must be replaced
    assert await fingerprints(target) != await fingerprints(database_url)

    await ops.restore(settings(), result.path, database_url=target, allow_non_empty=True)

    assert await fingerprints(target) == await fingerprints(database_url)


@pytest.mark.parametrize("keep", [0.5, 0.97])
async def test_truncated_archive_fails_and_leaves_the_target_untouched(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, keep: float
) -> None:
    result = await seeded_backup(database_url, tmp_path)
    data = result.path.read_bytes()
    truncated = tmp_path / "truncated.dump"
    truncated.write_bytes(data[: int(len(data) * keep)])

    empty = await make_database()
    with pytest.raises(InvalidInput, match="truncated or damaged") as caught:
        await ops.restore(settings(), truncated, database_url=empty)
    assert caught.value.field == "file"
    assert await object_count(empty) == 0

    # Even when told to replace a database's contents, a bad archive changes nothing.
    full = await make_database(migrated=True)
    await seed(full)
    before = await fingerprints(full)
    with pytest.raises(InvalidInput, match="truncated or damaged"):
        await ops.restore(settings(), truncated, database_url=full, allow_non_empty=True)
    assert await fingerprints(full) == before


@pytest.mark.parametrize("embedded_tools", [False, True])
async def test_failed_restore_rolls_back_everything(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, embedded_tools: bool
) -> None:
    """A restore that fails part-way (both modes) leaves the target exactly as it was."""
    tools = [embedded_bin()] if embedded_tools else []
    result = await seeded_backup(database_url, tmp_path, pg_bin_dirs=tools)
    target = await make_database(migrated=True)
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(
            "INSERT INTO users (email, password_hash, username)"
            " VALUES ('keep@example.com', '$2b$12$' || repeat('k', 53), 'keeper')"
        )
        # A view on users: --clean cannot drop users, so the restore fails part-way.
        await conn.execute("CREATE VIEW user_names AS SELECT username FROM users")
    finally:
        await conn.close()
    before = await fingerprints(target)

    with pytest.raises(ChatkeepError, match="rolled back") as caught:
        await ops.restore(
            settings(), result.path, database_url=target, allow_non_empty=True, pg_bin_dirs=tools
        )

    assert "user_names" in str(caught.value) or "depend" in str(caught.value)
    assert await fingerprints(target) == before


async def test_script_restore_commits_nothing_when_pg_restore_stops_part_way(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """The second line of defence: a stream that ends early is never committed.

    (restore() reads the whole archive before touching a database, so this calls the
    pg_restore-to-psql pipe directly with an archive cut inside its data.)
    """
    result = await seeded_backup(database_url, tmp_path, pg_bin_dirs=[embedded_bin()])
    data = result.path.read_bytes()
    truncated = tmp_path / "cut.dump"
    truncated.write_bytes(data[: len(data) - 200])
    info = await ops.read_archive(truncated)  # the table of contents is still whole
    target = await make_database()
    (tool,) = ops.find_pg_tools("pg_restore", [embedded_bin()])
    entries = [e for e in info.entries if not ops._PUBLIC_SCHEMA_ENTRY.match(e)]
    use_list = tmp_path / "toc.list"
    use_list.write_text("\n".join(entries) + "\n", encoding="utf-8")
    lines: deque[str] = deque()

    code = await ops._restore_script(
        tool,
        tool.path.with_name("psql"),
        ["--no-password", f"--use-list={use_list}"],
        truncated,
        ops._libpq(target, settings(), "restore"),
        lines,
        lambda _line: None,
    )

    assert code != 0
    assert any("could not read" in line or "end of file" in line for line in lines), lines
    assert await object_count(target) == 0


async def test_restore_refuses_files_that_are_not_chatkeep_backups(
    empty_database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    target = await make_database()
    missing = tmp_path / "missing.dump"
    with pytest.raises(InvalidInput, match="is not a file"):
        await ops.restore(settings(), missing, database_url=target)

    text = tmp_path / "notes.sql"
    text.write_text("SELECT 1;\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="not a pg_dump custom-format archive"):
        await ops.restore(settings(), text, database_url=target)

    # A real archive of some other database.
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("CREATE TABLE unrelated (id int)")
    finally:
        await conn.close()
    tool = ops.choose_tool("pg_dump", ops.find_pg_tools("pg_dump"), minimum=18)
    other = tmp_path / "other.dump"
    code, lines = await ops._run_tool(
        [str(tool.path), "--format=custom", f"--file={other}", f"--dbname={empty_database_url}"],
        ops._tool_env(),
    )
    assert code == 0, lines
    with pytest.raises(InvalidInput, match="not a chatkeep backup"):
        await ops.restore(settings(), other, database_url=target)
    assert await object_count(target) == 0


async def test_backup_refuses_a_database_without_the_schema(
    empty_database_url: str, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="holds no chatkeep schema"):
        await ops.backup(settings(), tmp_path, database_url=empty_database_url)
    assert names(tmp_path) == []


async def test_backup_output_rules(database_url: str, tmp_path: Path) -> None:
    target = tmp_path / "nightly.dump"
    first = await ops.backup(settings(), target, database_url=database_url)
    assert first.path == target

    with pytest.raises(InvalidInput, match="already exists") as caught:
        await ops.backup(settings(), target, database_url=database_url)
    assert caught.value.field == "output"

    again = await ops.backup(settings(), target, database_url=database_url, overwrite=True)
    assert again.path == target
    assert target.stat().st_size == again.size

    with pytest.raises(InvalidInput, match="does not exist"):
        await ops.backup(settings(), tmp_path / "no" / "such.dump", database_url=database_url)
    with pytest.raises(InvalidInput, match="lock_wait_timeout"):
        await ops.backup(settings(), tmp_path, database_url=database_url, lock_wait_timeout=0)
    with pytest.raises(ConfigurationError, match="no database given"):
        await ops.backup(Settings(data_dir=tmp_path), tmp_path)


async def test_backup_that_fails_leaves_no_file(database_url: str, tmp_path: Path) -> None:
    """A migration holding a table lock makes pg_dump give up after lock_wait_timeout."""
    blocker = await asyncpg.connect(database_url)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(Unavailable, match=r"stayed locked for over 0\.2s"):
                await ops.backup(
                    settings(),
                    tmp_path / "x.dump",
                    database_url=database_url,
                    lock_wait_timeout=0.2,
                )
    finally:
        await blocker.close()
    assert names(tmp_path) == []


# -- choosing the programs -----------------------------------------------------------------


def tool(major: int, where: str = "/opt/pg") -> ops.PgTool:
    return ops.PgTool("pg_dump", Path(f"{where}/{major}/pg_dump"), major, f"{major}.1")


def test_choose_tool_prefers_the_servers_own_version_then_the_newest() -> None:
    tools = [tool(15), tool(16), tool(18)]
    assert ops.choose_tool("pg_dump", tools, minimum=15, prefer=15).major == 15
    assert ops.choose_tool("pg_dump", tools, minimum=17, prefer=17).major == 18
    assert ops.choose_tool("pg_dump", tools, minimum=14).major == 18


def test_no_tool_new_enough_says_what_to_install() -> None:
    found = ops.find_pg_tools("pg_dump", [embedded_bin()])
    assert [t.major for t in found] == [18]
    with pytest.raises(ConfigurationError) as caught:
        ops.choose_tool("pg_dump", found, minimum=19, why="to dump PostgreSQL 19")
    message = str(caught.value)
    assert "pg_dump 19 or newer is needed to dump PostgreSQL 19" in message
    assert "postgresql-client-19" in message
    assert "chatkeep[embedded]" in message
    assert str(found[0].path) in message
    assert caught.value.field == "pg_bin_dir"


def test_find_pg_tools_searches_only_the_folders_given(tmp_path: Path) -> None:
    assert ops.find_pg_tools("pg_restore", [tmp_path]) == []
    broken = tmp_path / "pg_dump"
    broken.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    broken.chmod(0o755)
    assert ops.find_pg_tools("pg_dump", [tmp_path]) == []  # runs, but reports no version
    everywhere = ops.find_pg_tools("psql")
    assert any(t.path.parent == embedded_bin() for t in everywhere)
    with pytest.raises(InvalidInput):
        ops.find_pg_tools("rm")


def test_plan_restore() -> None:
    tools = [tool(15), tool(18)]
    assert ops.plan_restore(tools, dumped_from_major=15, dumped_by_major=15, target_major=15) == (
        tools[0],
        "direct",
    )
    # Only pg_restore 18 reads an archive pg_dump 18 wrote; a 15 server needs script mode.
    assert ops.plan_restore(tools, dumped_from_major=15, dumped_by_major=18, target_major=15) == (
        tools[1],
        "script",
    )
    assert ops.plan_restore(tools, dumped_from_major=15, dumped_by_major=18, target_major=18) == (
        tools[1],
        "direct",
    )
    with pytest.raises(InvalidInput, match="downgrade"):
        ops.plan_restore(tools, dumped_from_major=18, dumped_by_major=18, target_major=15)
    with pytest.raises(ConfigurationError, match="pg_restore 19 or newer"):
        ops.plan_restore(tools, dumped_from_major=16, dumped_by_major=19, target_major=18)


def test_script_filter_drops_the_setting_only_outside_copy_data() -> None:
    state = {"copy": False}
    script = b"\n".join(
        [
            b"SET statement_timeout = 0;",
            b"SET transaction_timeout = 0;",
            b"COPY public.notes (body) FROM stdin;",
            b"SET transaction_timeout = 0;",
            b"\\.",
            b"SET transaction_timeout = 0;",
        ]
    )
    kept = ops._filter_script(script, state).split(b"\n")
    assert kept == [
        b"SET statement_timeout = 0;",
        b"COPY public.notes (body) FROM stdin;",
        b"SET transaction_timeout = 0;",  # a row of data, kept as is
        b"\\.",
    ]
    assert state == {"copy": False}


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ('pg_dump: error: FATAL:  password authentication failed for user "x"', ConfigurationError),
        ('pg_dump: error: FATAL:  database "nope" does not exist', ConfigurationError),
        ("pg_dump: error: connection to server at 10.0.0.1 failed: timeout expired", ChatkeepError),
        ("pg_dump: error: query failed: ERROR:  permission denied for table users", ChatkeepError),
        ("pg_dump: error: something else", ChatkeepError),
    ],
)
def test_tool_errors_become_chatkeep_errors(line: str, kind: type[ChatkeepError]) -> None:
    error = ops._tool_failure("pg_dump", ["pg_dump: reading schemas", line], "backup")
    assert isinstance(error, kind)
    assert line.split("error: ", 1)[1] in str(error)


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
            await ops.backup(settings(), tmp_path, database_url=limited)
        assert names(tmp_path) == []
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()


def test_tool_error_classes() -> None:
    lines = ["pg_dump: error: connection to server on socket failed: No such file"]
    assert type(ops._tool_failure("pg_dump", lines, "backup")) is Unavailable
    lines = ["pg_dump: error: query failed: ERROR:  permission denied for table users"]
    assert type(ops._tool_failure("pg_dump", lines, "backup")) is PermissionDenied
    assert "no message" in str(ops._tool_failure("pg_dump", [], "backup"))


def test_libpq_url_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-", encoding="utf-8")
    target = ops._libpq(
        "postgresql://app:s%40cret@db.internal:5433/chat?sslmode=require",
        Settings(ssl_mode="verify-full", ssl_ca_file=ca, connect_timeout=3.4),
        "backup",
    )
    assert "s%40cret" not in target.url
    assert "cret" not in target.url
    assert target.url.startswith("postgresql://app@db.internal:5433/chat?")
    assert "sslmode=verify-full" in target.url
    assert "sslrootcert=" in target.url
    assert target.env["PGPASSWORD"] == "s@cret"
    assert target.env["PGCONNECT_TIMEOUT"] == "3"
    assert target.env["LC_MESSAGES"] == "C"
    plain = ops._libpq("postgresql:///chat?host=/run/pg", Settings(), "restore")
    assert "PGPASSWORD" not in plain.env
    assert "host=%2Frun%2Fpg" in plain.url


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

    target = await make_database()
    restored_code, restored_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], env
    )
    assert restored_code == 0, restored_out
    assert f"schema version {NEWEST:03d}: current" in restored_out
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
    archive = (await ops.backup(settings(), tmp_path, database_url=database_url)).path
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
    archive = (await ops.backup(settings(), tmp_path, database_url=database_url)).path
    target = await make_database()
    result_code, result_out, _ = await invoke(
        ["restore", str(archive), "--database-url", target], cli_env()
    )
    assert result_code == 3, result_out
    assert "001 (changed)" in result_out
