"""The unread-badge benchmark keeps working: its --tiny mode runs in seconds and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_unread_runs_in_tiny_mode(admin_url: str) -> None:
    name = f"chatkeep_bench_h4_unread_t{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_unread.py"),
            "--tiny",
            "--drop",
            "--database-url",
            admin_url,
            "--database-name",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The script checked its badges against a direct count before timing them.
    assert "20 rooms, " in done.stdout
    assert "ratio badges/baseline" in done.stdout
    assert "WRONG" not in done.stdout + done.stderr
