"""Every benchmark script runs once at its tiny size, so none of them rots (issue 12, item 6).

Numbers only: these tests check that each script runs to the end against the real servers
and prints its table, never how fast anything was. Each works in a database of its own
(named after this process) that it drops, and in the tests' Redis logical database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# Scripts whose tiny run is tested in another module (beside the feature they measure).
TESTED_ELSEWHERE = {
    "bench_members.py": "tests/test_facade_members.py",
    "bench_security.py": "tests/security/test_bench_security.py",
    "bench_replica.py": "tests/storage/test_replicas.py",
    "bench_search.py": "tests/test_facade_search.py",
    "bench_unread.py": "tests/test_bench_unread.py",
    # It needs the session's Redis Cluster, a fixture of the cluster tests.
    "bench_cluster_pubsub.py": "tests/realtime/test_shards.py",
    "bench_send.py": "tests/test_groupcommit.py",
    "bench_citus.py": "tests/citus/test_bench_citus.py",
}

# script -> (its arguments beyond --tiny, lines its output must contain). ``{db}`` is a
# database name of this run's own, ``{admin}`` a superuser URL, ``{redis}`` the tests' Redis.
CASES: dict[str, tuple[list[str], list[str]]] = {
    "bench_facade.py": (
        ["--database-url", "{admin}", "--redis-url", "{redis}", "--database-name", "{db}"],
        [
            "facade/raw",
            "send, 100 rooms",
            "send, one hot room",
            "history page of 50 + authors",
            "catch_up after seq k",
            "unread counts, 10 rooms",
            "mark_read",
        ],
    ),
    "bench_write_flows.py": (
        ["--database-url", "{admin}", "--redis-url", "{redis}", "--database-name", "{db}"],
        [
            "facade/before",
            "edit_message",
            "delete_message",
            "react / unreact",
            "mark_thread_read",
            "follow / unfollow_thread",
            "the statements alone",
            "before/function",
        ],
    ),
    "bench_storage.py": (
        ["--database-url", "{admin}", "--database-name", "{db}"],
        ["send ", "history ", "unread ", "mark_read "],
    ),
    "bench_changes.py": (
        ["--database-url", "{admin}", "--database-name", "{db}"],
        ["send/s: with the log", "catch-up of 100", "history(after_seq), pages of 200"],
    ),
    "bench_collapsed.py": (
        ["--database-url", "{admin}", "--database-name", "{db}"],
        [
            "index build (CREATE INDEX CONCURRENTLY)",
            "page of 50 roots",
            "behind a 2,000-reply thread, page before",
        ],
    ),
    "bench_stream.py": (
        ["--database-url", "{admin}", "--redis-url", "{redis}", "--database-name", "{db}"],
        ["20 resumes (stream, shared reads)", "herd/one database time"],
    ),
    "bench_membership.py": (
        ["--database-url", "{admin}", "--redis-url", "{redis}", "--database-name", "{db}"],
        ["load average:", "facade/raw", "join + leave", "promote + demote"],
    ),
    "bench_sizing.py": (
        ["--database-url", "{admin}", "--redis-url", "{redis}", "--database-name", "{db}"],
        [
            "PostgreSQL bytes per row",
            "messages.messages_content_search_idx",
            "membership  room_users ",
            "Redis bytes per online user",
            "session:*",
            "send, one hot room",
            "history page of 50",
            "one server",
            "load average at the end",
        ],
    ),
    "bench_realtime.py": (
        ["--url", "{redis}"],
        ["geometric mean", "heartbeat_many: 500 users", "cleaned up"],
    ),
}


def run_tiny(
    script: str, args: list[str], *, drop: bool = True, **values: str
) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> --tiny <args>`` with this checkout's sources.

    A script given a database of its own (``{db}``) drops it at the end unless ``drop`` is
    False.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{BENCHMARKS}"}
    command = [sys.executable, str(BENCHMARKS / script), "--tiny"]
    command += [arg.format(**values) for arg in args]
    if drop and "{db}" in args:
        command.append("--drop")
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=BENCHMARKS,
        check=False,
    )


def test_every_benchmark_script_has_a_tiny_run_under_test() -> None:
    scripts = {path.name for path in BENCHMARKS.glob("bench_*.py")}
    assert scripts == set(CASES) | set(TESTED_ELSEWHERE)
    for script in scripts:
        assert "--tiny" in (BENCHMARKS / script).read_text(), script
    for script, module in TESTED_ELSEWHERE.items():
        assert script in (ROOT / module).read_text(), module


@pytest.mark.parametrize("script", sorted(CASES))
def test_the_benchmark_runs_in_its_tiny_mode(script: str, admin_url: str, redis_url: str) -> None:
    args, expected = CASES[script]
    db = f"chatkeep_{script.removesuffix('.py')}_t{os.getpid()}"
    done = run_tiny(script, args, admin=admin_url, redis=redis_url, db=db)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in expected:
        assert line in done.stdout, (line, done.stdout)
