"""The fault suite's checker: each check passes a clean history and catches its violation.

The scenarios can only prove a check right when the code under test breaks it; these
histories break each one on purpose, so a checker that stopped looking would fail here.
"""

from __future__ import annotations

import uuid

from chatkeep.config import Settings
from chatkeep.errors import Unavailable
from tests.faults.history import (
    SEND_BOUND_MARGIN,
    Call,
    History,
    Outcome,
    StoredMessage,
    check,
    render_table,
    send_bound,
)

ROOM = uuid.UUID(int=1)
BOUND = 4.0


def ids(n: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=100 + i) for i in range(n)]


def clean(n: int = 3) -> tuple[History, list[StoredMessage], dict[uuid.UUID, int]]:
    """n messages sent, acknowledged, stored in order and seen by the subscriber."""
    history = History()
    stored = []
    for seq, message_id in enumerate(ids(n), start=1):
        cid = f"s0-{seq}"
        history.intended[cid] = ROOM
        history.record(Call("send", cid, 0.01, Outcome(), message_id, seq))
        stored.append(StoredMessage(ROOM, seq, message_id, cid))
    history.seen[ROOM] = {(ROOM, m.seq, m.message_id) for m in stored}
    return history, stored, {ROOM: n}


def test_a_clean_history_passes_every_check() -> None:
    history, stored, counters = clean()
    history.record(Call("send", "s0-1", 3.9, Outcome.of(Unavailable("down"))))
    result = check("none", history, stored, counters, BOUND)
    assert result.failures == []
    assert (result.attempts, result.acknowledged) == (4, 3)
    assert result.typed_errors == {"Unavailable": 1}
    assert "| none | 4 | 3 | 1 | 0 | 3.90 (4) | 0 | 0 | 0 | 0 |" in render_table([result])


def test_an_acknowledged_message_missing_from_the_store_is_lost() -> None:
    history, stored, _counters = clean()
    result = check("lost", history, stored[:2], {ROOM: 2}, BOUND)
    assert result.lost == 1
    assert any("s0-3 acknowledged as seq 3" in f for f in result.failures)


def test_an_acknowledged_message_stored_under_another_seq_is_lost() -> None:
    history, stored, counters = clean()
    stored[2] = StoredMessage(ROOM, 3, uuid.UUID(int=999), "s0-3")
    result = check("moved", history, stored, counters, BOUND)
    assert result.lost == 1


def test_a_client_msg_id_stored_twice_is_a_duplicate() -> None:
    history, stored, _counters = clean()
    stored.append(StoredMessage(ROOM, 4, uuid.UUID(int=998), "s0-3"))
    result = check("dup", history, stored, {ROOM: 4}, BOUND)
    assert result.duplicated == 1
    # The subscriber never saw the duplicate, so its view differs from the store too.
    assert result.subscriber_diff == 1


def test_a_hole_in_seq_or_a_counter_that_disagrees_is_a_gap() -> None:
    history, stored, counters = clean()
    holed = check("hole", history, [stored[0], stored[2]], counters, BOUND)
    assert holed.seq_gaps == 1
    ahead = check("counter", history, stored, {ROOM: 5}, BOUND)
    assert ahead.seq_gaps == 3  # seq 4 and 5 missing, and the counter is not the top seq


def test_a_stored_message_nobody_sent_fails() -> None:
    history, stored, _counters = clean()
    stored.append(StoredMessage(ROOM, 4, uuid.UUID(int=997), "nobody-1"))
    history.seen[ROOM].add((ROOM, 4, uuid.UUID(int=997)))
    result = check("phantom", history, stored, {ROOM: 4}, BOUND)
    assert any("no sender sent" in f for f in result.failures)


def test_a_subscriber_view_that_differs_from_the_store_fails() -> None:
    history, stored, counters = clean()
    history.seen[ROOM].discard((ROOM, 2, stored[1].message_id))
    history.seen[ROOM].add((ROOM, 7, uuid.UUID(int=7)))
    result = check("view", history, stored, counters, BOUND)
    assert result.subscriber_diff == 2


def test_an_untyped_error_fails_wherever_it_was_raised() -> None:
    history, stored, counters = clean()
    history.record(Call("catch_up", None, 0.1, Outcome.of(ConnectionResetError())))
    result = check("untyped", history, stored, counters, BOUND)
    assert result.untyped_errors == {"catch_up:ConnectionResetError": 1}
    assert result.failures


def test_a_send_over_the_bound_fails_even_when_it_succeeded() -> None:
    history, stored, counters = clean()
    history.record(Call("send", "s0-1", BOUND + 0.01, Outcome(), stored[0].message_id, 1))
    result = check("slow", history, stored, counters, BOUND)
    assert result.over_bound == 1
    assert "!1" in render_table([result])


def test_two_acknowledgements_of_one_message_must_agree() -> None:
    history, stored, counters = clean()
    history.record(Call("send", "s0-1", 0.01, Outcome(), uuid.UUID(int=5), 9))
    result = check("twice", history, stored, counters, BOUND)
    assert any("acknowledged twice" in f for f in result.failures)


def test_an_unacknowledged_message_may_be_stored_or_not() -> None:
    history, stored, _counters = clean()
    for cid in ("s0-4", "s0-5"):
        history.intended[cid] = ROOM
        history.record(Call("send", cid, 0.5, Outcome.of(Unavailable("down"))))
    stored.append(StoredMessage(ROOM, 4, uuid.UUID(int=996), "s0-4"))
    history.seen[ROOM].add((ROOM, 4, uuid.UUID(int=996)))
    result = check("indeterminate", history, stored, {ROOM: 4}, BOUND)
    assert result.failures == []
    assert (result.indeterminate, result.indeterminate_stored) == (2, 1)


def test_the_bound_is_the_documented_one_plus_the_margin() -> None:
    settings = Settings(
        statement_timeout=2.0,
        statement_timeout_grace=1.0,
        connect_timeout=1.0,
        redis_best_effort_timeout=0.25,
    )
    assert send_bound(settings) == 0.5 + 1.0 + 2.0 + 1.0 + SEND_BOUND_MARGIN


def test_a_reader_call_abandoned_as_hung_fails_but_is_not_untyped() -> None:
    history, stored, counters = clean()
    history.record(Call("subscribe", None, 60.0, Outcome(error="hung", hung=True)))
    result = check("hung reader", history, stored, counters, BOUND)
    assert result.untyped_errors == {}
    assert any("reader call(s) hung" in f for f in result.failures)
