"""What `chatkeep doctor` adds for operators: sizes, top statements, pool and Redis latency."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import asyncpg

from chatkeep.cli._common import human_size
from tests.ops.cli import invoke
from tests.ops.seed import seed

Env = Callable[..., dict[str, str]]


async def doctor(env: dict[str, str], database_url: str) -> tuple[int, dict[str, Any]]:
    code, output, _ = await invoke(["doctor", "--json", "--database-url", database_url], env)
    start = output.index("{")
    report: dict[str, Any] = json.loads(output[start : output.rindex("}") + 1])
    return code, {c["name"]: c for c in report["checks"]} | {"verdict": report["verdict"]}


async def test_doctor_reports_sizes_pool_and_latency(
    cli_env: Env, database_url: str, redis_url: str
) -> None:
    await seed(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ANALYZE")
        users = await conn.fetchval("SELECT count(*) FROM users")
    finally:
        await conn.close()
    code, checks = await doctor(cli_env(REDIS_URL=redis_url), database_url)
    assert code == 0, checks
    sizes = checks["sizes"]
    assert sizes["status"] == "ok"
    assert "messages" in sizes["detail"]
    assert "users " in sizes["detail"]
    assert f"~{users} rows)" in sizes["detail"]  # small tables: ANALYZE counts them exactly
    assert "indexes" in sizes["detail"]
    # Sizes are divided by 1024, so their units are KiB/MiB (a kB would be 1000 bytes).
    assert re.search(r"\d\.\d (KiB|MiB) in \d+ tables", sizes["detail"]), sizes["detail"]
    assert not re.search(r"\d (kB|MB|GB)\b", sizes["detail"]), sizes["detail"]
    assert checks["statements"]["status"] == "ok"
    assert "pg_stat_statements not installed" in checks["statements"]["detail"]
    assert checks["pool"]["status"] == "ok"
    assert "round trip" in checks["pool"]["detail"]
    assert checks["redis latency"]["status"] == "ok"
    assert "median" in checks["redis latency"]["detail"]


async def test_doctor_on_an_empty_database(
    cli_env: Env, empty_database_url: str, redis_url: str
) -> None:
    code, checks = await doctor(cli_env(REDIS_URL=redis_url), empty_database_url)
    assert code == 1  # migrations pending
    assert checks["sizes"]["detail"] == "no tables yet"


async def test_doctor_reads_pg_stat_statements_when_it_can(
    cli_env: Env, database_url: str, redis_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # The servers under test do not preload the module: reading the view fails.
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    code, checks = await doctor(cli_env(REDIS_URL=redis_url), database_url)
    assert code == 0
    assert checks["statements"]["status"] == "warn"
    assert "installed but unreadable" in checks["statements"]["detail"]

    conn = await asyncpg.connect(database_url)
    try:
        # A stand-in with the real view's columns, as a preloaded server would answer.
        await conn.execute(
            "DROP EXTENSION pg_stat_statements;"
            "CREATE VIEW pg_stat_statements AS"
            " SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) AS dbid,"
            "        42::bigint AS calls, 1234.5::float8 AS total_exec_time,"
            "        29.39::float8 AS mean_exec_time,"
            "        E'SELECT *\\n  FROM messages WHERE room_id = $1' AS query"
        )
    finally:
        await conn.close()
    code, checks = await doctor(cli_env(REDIS_URL=redis_url), database_url)
    assert code == 0
    detail = checks["statements"]["detail"]
    assert checks["statements"]["status"] == "ok"
    assert "1234 ms total, 29.39 ms mean, 42 calls: SELECT * FROM messages WHERE room_id = $1" in (
        detail
    )


async def test_no_pool_check_when_postgres_is_down(cli_env: Env, redis_url: str) -> None:
    env = cli_env(REDIS_URL=redis_url, CHATKEEP_CONNECT_TIMEOUT="2")
    code, checks = await doctor(env, "postgresql://nobody@127.0.0.1:1/none")
    assert code == 1
    assert checks["postgresql"]["status"] == "fail"
    assert "pool" not in checks


def test_human_size_uses_iec_units() -> None:
    assert [human_size(n) for n in (0, 1023, 1536, 5 * 1024**2, 3 * 1024**3, 2048 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
        "2048.0 GiB",
    ]
