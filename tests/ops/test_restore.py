"""Restore against the real server: refusals, damaged archives, rollbacks, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput
from chatkeep.ops import pgtools, restore
from chatkeep.ops.backup import backup
from tests.conftest import database_exists, drop_database, url_for
from tests.ops.conftest import MakeDatabase, embedded_bin, seeded_backup, settings, tool
from tests.ops.seed import fingerprints, object_count, seed, server_major


def hanging_pg_restore(folder: Path, hang_on: str, pid_file: Path) -> Path:
    """A ``pg_restore`` that is the real one, except that the call naming ``hang_on`` hangs.

    The hanging call records its process id and sleeps: a stand-in for a slow restore of a
    large archive, which a real server cannot be made to produce on demand. The real
    ``psql`` sits beside it, for script mode.
    """
    real = embedded_bin()
    folder.mkdir()
    (folder / "psql").symlink_to(real / "psql")
    script = folder / "pg_restore"
    script.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" {hang_on} "*) echo $$ > "{pid_file}"; exec sleep 60;; esac\n'
        f'exec "{real / "pg_restore"}" "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    return folder


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def recorded_pid(pid_file: Path) -> int | None:
    text = pid_file.read_text(encoding="utf-8").strip() if pid_file.exists() else ""
    return int(text) if text else None


async def wait_for_pid(pid_file: Path, task: asyncio.Task[object]) -> int:
    for _ in range(400):
        pid = recorded_pid(pid_file)
        if pid is not None:
            return pid
        assert not task.done(), task
        await asyncio.sleep(0.05)
    raise AssertionError("the stand-in pg_restore never started")


@pytest.mark.parametrize(
    "hang_on",
    [
        "--list",  # read_archive: the table of contents
        f"--file={os.devnull}",  # the end-to-end read before the target is touched
        "--file=-",  # the restore itself, piped to psql (pg_restore 18, server older than 17)
        "--single-transaction",  # the restore itself, direct (a server of 17 or newer)
    ],
)
async def test_cancelled_restore_leaves_no_pg_restore_running(
    database_url: str, make_database: MakeDatabase, tmp_path: Path, hang_on: str
) -> None:
    script_mode = await server_major(database_url) < 17
    if hang_on == ("--single-transaction" if script_mode else "--file=-"):
        pytest.skip("pg_restore 18 restores into this server in the other mode")
    archive = (await backup(settings(), tmp_path, database_url=database_url)).path
    pid_file = tmp_path / "pg_restore.pid"
    tools = hanging_pg_restore(tmp_path / "bin", hang_on, pid_file)
    target = await make_database()

    task = asyncio.create_task(
        restore.restore(settings(), archive, database_url=target, pg_bin_dirs=[tools])
    )
    pid = await wait_for_pid(pid_file, task)
    try:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Killed and reaped by the time the cancellation arrives: not even a zombie is left.
        assert not running(pid)
        assert await object_count(target) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- refusals ------------------------------------------------------------------------------


async def test_restore_refuses_a_non_empty_database(
    database_url: str, make_database: MakeDatabase, tmp_path: Path
) -> None:
    result = await seeded_backup(database_url, tmp_path)
    target = await make_database(migrated=True)
    before = await fingerprints(target)

    with pytest.raises(InvalidInput, match="is not empty") as caught:
        await restore.restore(settings(), result.path, database_url=target)

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

    await restore.restore(settings(), result.path, database_url=target, allow_non_empty=True)

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
        await restore.restore(settings(), truncated, database_url=empty)
    assert caught.value.field == "file"
    assert await object_count(empty) == 0

    # Even when told to replace a database's contents, a bad archive changes nothing.
    full = await make_database(migrated=True)
    await seed(full)
    before = await fingerprints(full)
    with pytest.raises(InvalidInput, match="truncated or damaged"):
        await restore.restore(settings(), truncated, database_url=full, allow_non_empty=True)
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
        await restore.restore(
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
    info = await restore.read_archive(truncated)  # the table of contents is still whole
    target = await make_database()
    (tool,) = pgtools.find_pg_tools("pg_restore", [embedded_bin()])
    entries = [e for e in info.entries if not restore._PUBLIC_SCHEMA_ENTRY.match(e)]
    use_list = tmp_path / "toc.list"
    use_list.write_text("\n".join(entries) + "\n", encoding="utf-8")
    lines: deque[str] = deque()

    code = await restore._restore_script(
        tool,
        tool.path.with_name("psql"),
        ["--no-password", f"--use-list={use_list}"],
        truncated,
        pgtools.libpq_target(target, settings(), "restore"),
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
        await restore.restore(settings(), missing, database_url=target)

    text = tmp_path / "notes.sql"
    text.write_text("SELECT 1;\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="not a pg_dump custom-format archive"):
        await restore.restore(settings(), text, database_url=target)

    # A real archive of some other database.
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("CREATE TABLE unrelated (id int)")
    finally:
        await conn.close()
    tool = pgtools.choose_tool("pg_dump", pgtools.find_pg_tools("pg_dump"), minimum=18)
    other = tmp_path / "other.dump"
    code, lines = await pgtools.run_tool(
        [str(tool.path), "--format=custom", f"--file={other}", f"--dbname={empty_database_url}"],
        pgtools.tool_env(),
    )
    assert code == 0, lines
    with pytest.raises(InvalidInput, match="not a chatkeep backup"):
        await restore.restore(settings(), other, database_url=target)
    assert await object_count(target) == 0


def test_plan_restore() -> None:
    tools = [tool(15), tool(18)]
    assert restore.plan_restore(
        tools, dumped_from_major=15, dumped_by_major=15, target_major=15
    ) == (
        tools[0],
        "direct",
    )
    # Only pg_restore 18 reads an archive pg_dump 18 wrote; a 15 server needs script mode.
    assert restore.plan_restore(
        tools, dumped_from_major=15, dumped_by_major=18, target_major=15
    ) == (
        tools[1],
        "script",
    )
    assert restore.plan_restore(
        tools, dumped_from_major=15, dumped_by_major=18, target_major=18
    ) == (
        tools[1],
        "direct",
    )
    with pytest.raises(InvalidInput, match="downgrade"):
        restore.plan_restore(tools, dumped_from_major=18, dumped_by_major=18, target_major=15)
    with pytest.raises(ConfigurationError, match="pg_restore 19 or newer"):
        restore.plan_restore(tools, dumped_from_major=16, dumped_by_major=19, target_major=18)


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
    kept = restore._filter_script(script, state).split(b"\n")
    assert kept == [
        b"SET statement_timeout = 0;",
        b"COPY public.notes (body) FROM stdin;",
        b"SET transaction_timeout = 0;",  # a row of data, kept as is
        b"\\.",
    ]
    assert state == {"copy": False}


# -- --create -------------------------------------------------------------------------------


async def test_create_refuses_an_incompatible_archive_before_making_the_database(
    database_url: str, admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 16: --create made the database, then refused the archive, leaving it behind."""
    result = await seeded_backup(database_url, tmp_path)
    real = restore.read_archive

    async def from_a_newer_server(*args: Any, **kwargs: Any) -> restore.ArchiveInfo:
        # A backup of a newer major version than the server: a real one needs that server.
        return dataclasses.replace(await real(*args, **kwargs), dumped_from="99.0")

    monkeypatch.setattr(restore, "read_archive", from_a_newer_server)
    name = f"chatkeep_created_{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(InvalidInput, match="is a downgrade"):
            await restore.restore(
                settings(), result.path, database_url=url_for(admin_url, name), create=True
            )
        assert not await database_exists(admin_url, name)
    finally:
        await drop_database(admin_url, name)


async def test_create_drops_the_database_it_made_when_the_restore_fails(
    database_url: str, admin_url: str, tmp_path: Path
) -> None:
    result = await seeded_backup(database_url, tmp_path)
    real = embedded_bin()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "psql").symlink_to(real / "psql")
    script = folder / "pg_restore"
    # The real pg_restore, except the restore itself (either mode), which fails.
    script.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --single-transaction "*|*" --file=- "*)'
        ' echo "pg_restore: error: simulated failure" >&2; exit 1;; esac\n'
        f'exec "{real / "pg_restore"}" "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    name = f"chatkeep_created_{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(ChatkeepError, match="simulated failure"):
            await restore.restore(
                settings(),
                result.path,
                database_url=url_for(admin_url, name),
                create=True,
                pg_bin_dirs=[folder],
            )
        assert not await database_exists(admin_url, name)
    finally:
        await drop_database(admin_url, name)
