"""benchmarks/bench_citus.py runs in its tiny mode (a test that it works, not of its speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_in_its_tiny_mode(
    citus_coordinator: str, admin_url: str, redis_url: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_citus.py"),
            "--tiny",
            "--drop",
            "--database-url",
            admin_url,
            "--citus-url",
            citus_coordinator,
            "--database-name",
            f"chatkeep_h8_bench_citus_t{os.getpid()}",
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT / "benchmarks",
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "single node:" in done.stdout
    assert "ratio citus/single node: sends " in done.stdout
    assert " thread pages " in done.stdout  # threads on Citus (migration 023)
    assert " with the room cache" in done.stdout  # the message-room cache (issue 17)
