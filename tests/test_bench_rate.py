"""The benchmarks' rate() ends with a worker's error instead of waiting for ever.

A worker that failed in the warm-up set the "progress" event before rate() cleared it,
so rate() waited for a call that no worker would ever finish (bench_storage had it first).
"""

from __future__ import annotations

import asyncio
import importlib
import random
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


class Boom(Exception):
    pass


def bench(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


async def fail_at_first_call(index: int, rng: random.Random) -> None:
    del index, rng
    await asyncio.sleep(0)
    raise Boom("the op failed")


@pytest.mark.asyncio(loop_scope="session")
async def test_bench_facade_rate_raises_a_warm_up_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    rate = bench("bench_facade", monkeypatch).rate
    with pytest.raises(Boom, match="the op failed"):
        await asyncio.wait_for(rate(fail_at_first_call, 2, 0.2, []), timeout=20)


@pytest.mark.asyncio(loop_scope="session")
async def test_bench_storage_rate_raises_a_warm_up_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rate = bench("bench_storage", monkeypatch).rate
    with pytest.raises(Boom, match="the op failed"):
        await asyncio.wait_for(rate(fail_at_first_call, 2, 0.2), timeout=20)


@pytest.mark.asyncio(loop_scope="session")
async def test_bench_facade_rate_raises_a_failure_in_the_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rate = bench("bench_facade", monkeypatch).rate
    loop = asyncio.get_running_loop()
    late = loop.time() + 0.1  # after the warm-up (0.05 s for a 0.2 s round)

    async def fail_late(index: int, rng: random.Random) -> None:
        del index, rng
        await asyncio.sleep(0.01)
        if loop.time() > late:
            raise Boom("late")

    with pytest.raises(Boom, match="late"):
        await asyncio.wait_for(rate(fail_late, 2, 0.2, []), timeout=20)
