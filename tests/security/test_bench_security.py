"""benchmarks/bench_security.py runs in its tiny mode, so it keeps working (no timings)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_benchmark_runs_in_its_tiny_mode(admin_url: str) -> None:
    name = f"chatkeep_bench_rls_t{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_security.py"),
            "--tiny",
            "--drop",
            "--database-url",
            admin_url,
            "--database-name",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "5 private       history" in out
    assert re.search(r"fixture, schema \d+: server ms per statement", out)
    assert "2,000 rooms: server ms per statement" in out
    # The policies' plans start from the user's memberships: never a scan of all rooms.
    app_lines = [line for line in out.splitlines() if "private" in line and "ms" in line]
    assert app_lines
    assert not any(line.rstrip().endswith("(seq scan of rooms)") for line in app_lines)


def test_the_benchmark_refuses_a_schema_its_statements_cannot_run_on(admin_url: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_security.py"),
            "--to",
            "11",
            "--database-url",
            admin_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    assert done.returncode == 2
    assert "--to: the benchmark's statements need schema 12 or later" in done.stderr
