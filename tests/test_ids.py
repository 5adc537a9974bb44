from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from chatkeep import ids
from chatkeep.errors import InvalidInput
from chatkeep.ids import uuid7, uuid7_datetime


def test_layout_is_rfc9562_version_7() -> None:
    value = uuid7()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    made = uuid7_datetime(value)
    assert abs(made - datetime.now(UTC)) < timedelta(seconds=2)


def test_strictly_increasing_within_a_millisecond() -> None:
    values = [uuid7() for _ in range(20_000)]
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    # Many share a millisecond, so the counter path really ran.
    stamps = [v.int >> 80 for v in values]
    assert len(set(stamps)) < len(stamps)


def test_monotonic_when_the_clock_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    first = uuid7()
    monkeypatch.setattr(time, "time_ns", lambda: 1_000_000_000_000)  # the year 1970 + 1000 s
    later = [uuid7() for _ in range(100)]
    assert all(first < value for value in later)
    assert later == sorted(later)


def test_counter_overflow_moves_to_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: frozen)
    before = uuid7()
    monkeypatch.setattr(ids, "_last_rand", (1 << 74) - 1)
    after = uuid7()
    assert after > before
    assert (after.int >> 80) == (before.int >> 80) + 1


def test_threads_never_collide() -> None:
    out: list[uuid.UUID] = []
    lock = threading.Lock()

    def work() -> None:
        made = [uuid7() for _ in range(2_000)]
        with lock:
            out.extend(made)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(out)) == 8_000


def test_datetime_refuses_other_versions() -> None:
    with pytest.raises(InvalidInput) as info:
        uuid7_datetime(uuid.uuid4())
    assert info.value.field == "id"
