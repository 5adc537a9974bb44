"""Finding, choosing and running the PostgreSQL client programs; reading their progress."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from pathlib import Path

import pytest

from chatkeep.config import Settings
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
)
from chatkeep.ops import pgtools
from tests.ops.conftest import embedded_bin, tool

# -- choosing the programs -----------------------------------------------------------------


def test_choose_tool_prefers_the_servers_own_version_then_the_newest() -> None:
    tools = [tool(15), tool(16), tool(18)]
    assert pgtools.choose_tool("pg_dump", tools, minimum=15, prefer=15).major == 15
    assert pgtools.choose_tool("pg_dump", tools, minimum=17, prefer=17).major == 18
    assert pgtools.choose_tool("pg_dump", tools, minimum=14).major == 18


def test_no_tool_new_enough_says_what_to_install() -> None:
    found = pgtools.find_pg_tools("pg_dump", [embedded_bin()])
    assert [t.major for t in found] == [18]
    with pytest.raises(ConfigurationError) as caught:
        pgtools.choose_tool("pg_dump", found, minimum=19, why="to dump PostgreSQL 19")
    message = str(caught.value)
    assert "pg_dump 19 or newer is needed to dump PostgreSQL 19" in message
    assert "postgresql-client-19" in message
    assert "chatkeep[embedded]" in message
    assert str(found[0].path) in message
    assert caught.value.field == "pg_bin_dir"


def test_find_pg_tools_searches_only_the_folders_given(tmp_path: Path) -> None:
    assert pgtools.find_pg_tools("pg_restore", [tmp_path]) == []
    broken = tmp_path / "pg_dump"
    broken.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    broken.chmod(0o755)
    assert pgtools.find_pg_tools("pg_dump", [tmp_path]) == []  # runs, but reports no version
    everywhere = pgtools.find_pg_tools("psql")
    assert any(t.path.parent == embedded_bin() for t in everywhere)
    with pytest.raises(InvalidInput):
        pgtools.find_pg_tools("rm")


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
    error = pgtools.tool_failure("pg_dump", ["pg_dump: reading schemas", line], "backup")
    assert isinstance(error, kind)
    assert line.split("error: ", 1)[1] in str(error)


def test_tool_error_classes() -> None:
    lines = ["pg_dump: error: connection to server on socket failed: No such file"]
    assert type(pgtools.tool_failure("pg_dump", lines, "backup")) is Unavailable
    lines = ["pg_dump: error: query failed: ERROR:  permission denied for table users"]
    assert type(pgtools.tool_failure("pg_dump", lines, "backup")) is PermissionDenied
    assert "no message" in str(pgtools.tool_failure("pg_dump", [], "backup"))


def test_libpq_url_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-", encoding="utf-8")
    target = pgtools.libpq_target(
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
    plain = pgtools.libpq_target("postgresql:///chat?host=/run/pg", Settings(), "restore")
    assert "PGPASSWORD" not in plain.env
    # An empty authority keeps its '//': libpq reads 'postgresql:/chat' as no URL at all.
    assert plain.url == "postgresql:///chat?host=/run/pg"


def test_libpq_url_takes_a_password_in_the_query_off_the_command_line_too() -> None:
    target = pgtools.libpq_target(
        "postgresql://app@db/chat?password=s%40cret&sslmode=require", Settings(), "backup"
    )
    assert "cret" not in target.url
    assert target.url == "postgresql://app@db/chat?sslmode=require"
    assert target.env["PGPASSWORD"] == "s@cret"


# -- progress ------------------------------------------------------------------------------


def test_progress_of_a_dump_is_weighted_by_table_size() -> None:
    seen: list[pgtools.Progress] = []
    sizes = {"users": 30, "messages": 70}
    written = iter(range(100, 1000, 100))
    progress = pgtools.ToolProgress(
        "pg_dump", "dump", 100, seen.append, weights=sizes, written=lambda: next(written)
    )
    progress.report("schema")
    progress("pg_dump: reading schemas")  # not a step: nothing reported
    progress('pg_dump: dumping contents of table "public.users"')
    progress('pg_dump: dumping contents of table "public.messages"')
    progress.finish("done", written=4096)
    assert [(p.phase, p.done, p.total, p.item, p.written) for p in seen] == [
        ("dump", 0, 100, "schema", 100),
        ("dump", 0, 100, "users", 200),  # a step counts once the next one starts
        ("dump", 30, 100, "messages", 300),
        ("dump", 100, 100, "done", 4096),
    ]


def test_progress_of_a_restore_counts_entries_and_never_passes_the_total() -> None:
    seen: list[pgtools.Progress] = []
    progress = pgtools.ToolProgress("pg_restore", "restore", 2, seen.append)
    for line in (
        "pg_restore: connecting to database for restore",
        'pg_restore: creating TABLE "public.users"',
        'pg_restore: processing data for table "public.users"',
        "pg_restore: executing SEQUENCE SET users_id_seq",
        'pg_restore: creating INDEX "public.users_email"',
    ):
        progress(line)
    assert [(p.done, p.item) for p in seen] == [
        (0, 'TABLE "public.users"'),
        (1, 'table "public.users"'),
        (2, "SEQUENCE SET users_id_seq"),
        (2, 'INDEX "public.users_email"'),  # more lines than entries: held at the total
    ]
    assert all(p.phase == "restore" and p.written == 0 for p in seen)
    progress.finish("restored")
    assert (seen[-1].done, seen[-1].total, seen[-1].item) == (2, 2, "restored")
    quiet = pgtools.ToolProgress("pg_restore", "verify", 1, None)
    quiet('pg_restore: creating TABLE "public.users"')
    quiet.finish("done")  # no callback: counts, reports nothing
    assert quiet.done == 1


# -- running the programs ------------------------------------------------------------------


async def test_run_tool_returns_the_exit_code_and_the_last_stderr_lines() -> None:
    seen: list[str] = []
    code, lines = await pgtools.run_tool(
        ["/bin/sh", "-c", "echo one >&2; echo two >&2; exit 3"], pgtools.tool_env(), seen.append
    )
    assert code == 3
    assert lines == seen == ["one", "two"]


async def test_a_failing_block_kills_and_reaps_its_program() -> None:
    spawned: list[asyncio.subprocess.Process] = []

    async def fail_while_it_runs() -> None:
        started = asyncio.Event()
        async with pgtools.spawn(
            ["/bin/sh", "-c", "echo started >&2; exec sleep 60"],
            pgtools.tool_env(),
            lines=deque(),
            on_line=lambda _line: started.set(),
            stdout=asyncio.subprocess.PIPE,
        ) as proc:
            spawned.append(proc)
            await started.wait()
            raise RuntimeError("the block failed")

    with pytest.raises(RuntimeError, match="the block failed"):
        await fail_while_it_runs()
    (proc,) = spawned
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)  # reaped: not even a zombie is left
