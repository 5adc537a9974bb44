"""What the fault suite's clients did, what the store holds, and the checks between them.

A Jepsen-style checker: the workload records every call (who, which ``client_msg_id``,
how long, what came back or what was raised), the scenario reads the store once the
faults are healed, and :func:`check` compares the two:

* every acknowledged message is stored exactly once, with the id and ``seq`` it was
  acknowledged with (``lost``), and nothing is stored that no one sent;
* no ``client_msg_id`` is stored twice (``dup``);
* ``seq`` runs 1..n in every room with no hole, and n is the room's counter (``seq gaps``);
* every error is a ``chatkeep.errors`` type (``untyped errors``);
* every send attempt returned within :func:`send_bound` (``max call s (bound)``);
* every subscriber's final view, the (room, seq, message id) it saw through events and
  catch-ups, equals the store's (``subscriber diff``).

A message whose every attempt failed is *indeterminate*: the store may or may not hold
it (a commit whose answer was lost), and either is correct.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError

__all__ = [
    "SEND_BOUND_MARGIN",
    "Call",
    "History",
    "Outcome",
    "ScenarioResult",
    "StoredMessage",
    "check",
    "render_table",
    "send_bound",
]

SEND_BOUND_MARGIN: Final = 1.0
"""Seconds a send attempt may take beyond what docs/troubleshooting.md promises.

The bound every ``ChatKeep.send_message`` call must keep, fault or no fault, is
:func:`send_bound`: the table "How long a call can wait" in docs/troubleshooting.md, plus
this margin for scheduling on a loaded machine. docs/operations.md (Fault suite) states
it; a change here belongs there too.
"""

HUNG_CALL: Final = 60.0
"""A call still running after this long is abandoned and recorded as hung (far past any
bound): the suite must end even when the code under test never returns."""


def send_bound(settings: Settings) -> float:
    """The longest a ``send_message`` attempt may take under ``settings``, in seconds.

    As docs/troubleshooting.md states it: the rate-limit check and the publish each get
    ``redis_best_effort_timeout``; PostgreSQL may take ``connect_timeout`` to open a
    connection and ``statement_timeout + statement_timeout_grace`` for the statement that
    goes unanswered (the statements answered before it take milliseconds here).
    """
    return (
        2 * settings.redis_best_effort_timeout
        + settings.connect_timeout
        + settings.statement_timeout
        + settings.statement_timeout_grace
        + SEND_BOUND_MARGIN
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one call ended: acknowledged, a typed error, an untyped one, or hung."""

    error: str | None = None  # the exception's class name, None when acknowledged
    typed: bool = True  # the error is a chatkeep.errors type
    hung: bool = False  # abandoned after HUNG_CALL seconds
    detail: str = ""  # the start of the error's message, to tell untyped ones apart

    @classmethod
    def of(cls, exc: BaseException) -> Outcome:
        """The outcome of a call that raised ``exc``."""
        return cls(
            error=type(exc).__qualname__,
            typed=isinstance(exc, ChatkeepError),
            detail=str(exc)[:160],
        )


@dataclass(frozen=True, slots=True)
class Call:
    """One call the workload made, and how it ended.

    Attributes:
        kind: ``"send"`` (the checked operation) or what a reader called
            (``"subscribe"``, ``"catch_up"``).
        client_msg_id: the message a send was for.
        seconds: wall-clock duration.
        outcome: what came back.
        message_id, seq: the acknowledged message (sends that succeeded).
    """

    kind: str
    client_msg_id: str | None
    seconds: float
    outcome: Outcome
    message_id: uuid.UUID | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A row of ``messages`` as the store holds it after the run."""

    room_id: uuid.UUID
    seq: int
    message_id: uuid.UUID
    client_msg_id: str | None


@dataclass(slots=True)
class History:
    """Everything a scenario's clients did, and what its subscribers saw."""

    calls: list[Call] = field(default_factory=list)
    #: client_msg_id -> room, for every message a sender tried.
    intended: dict[str, uuid.UUID] = field(default_factory=dict)
    #: (room, seq, message id) each room's subscriber saw, by room.
    seen: dict[uuid.UUID, set[tuple[uuid.UUID, int, uuid.UUID]]] = field(default_factory=dict)
    #: How subscribers learned they had missed events: ``RoomGap`` reasons and seq jumps.
    catch_ups: Counter[str] = field(default_factory=Counter)

    def record(self, call: Call) -> None:
        """Add a call."""
        self.calls.append(call)

    @property
    def sends(self) -> list[Call]:
        """The send attempts, in the order they ended."""
        return [call for call in self.calls if call.kind == "send"]


@dataclass(slots=True)
class ScenarioResult:
    """One row of the table, and the checks that failed (empty: all passed)."""

    fault: str
    attempts: int
    acknowledged: int
    typed_errors: Counter[str]
    untyped_errors: Counter[str]
    reader_errors: Counter[str]
    max_send_seconds: float
    bound: float
    over_bound: int
    lost: int
    duplicated: int
    seq_gaps: int
    subscriber_diff: int
    indeterminate: int
    indeterminate_stored: int
    catch_ups: Counter[str]
    failures: list[str]


def _acknowledged(history: History) -> dict[str, Call]:
    acks: dict[str, Call] = {}
    for call in history.sends:
        if call.outcome.error is None and call.client_msg_id is not None:
            acks.setdefault(call.client_msg_id, call)
    return acks


def check(
    fault: str,
    history: History,
    stored: list[StoredMessage],
    counters: dict[uuid.UUID, int],
    bound: float,
) -> ScenarioResult:
    """Compare what the clients saw with what the store holds.

    Args:
        fault: the scenario's name (the table's first column).
        history: the recorded calls and subscriber views.
        stored: every message of the scenario's rooms, read after the faults healed.
        counters: each room's ``rooms.last_seq``.
        bound: the longest a send attempt may take (:func:`send_bound`).
    """
    failures: list[str] = []
    sends = history.sends
    acks = _acknowledged(history)

    # Two acknowledgements of one message must agree (a retry returns the first message).
    for call in sends:
        first = acks.get(call.client_msg_id or "")
        if (
            call.outcome.error is None
            and first is not None
            and (call.message_id, call.seq) != (first.message_id, first.seq)
        ):
            failures.append(
                f"{call.client_msg_id} acknowledged twice as different messages: "
                f"seq {first.seq} and {call.seq}"
            )

    by_client: dict[str, list[StoredMessage]] = {}
    for row in stored:
        if row.client_msg_id is not None:
            by_client.setdefault(row.client_msg_id, []).append(row)

    lost = 0
    for client_msg_id, ack in acks.items():
        rows = by_client.get(client_msg_id, [])
        if not any(r.message_id == ack.message_id and r.seq == ack.seq for r in rows):
            lost += 1
            failures.append(
                f"{client_msg_id} acknowledged as seq {ack.seq} ({ack.message_id}) "
                f"but the store has {[(r.seq, r.message_id) for r in rows]}"
            )

    duplicated = sum(len(rows) - 1 for rows in by_client.values() if len(rows) > 1)
    if duplicated:
        failures.append(f"{duplicated} client_msg_id(s) stored more than once")
    phantoms = [row for row in stored if row.client_msg_id not in history.intended]
    if phantoms:
        failures.append(f"{len(phantoms)} stored message(s) that no sender sent")
    misplaced = [
        row
        for row in stored
        if row.client_msg_id in history.intended
        and history.intended[row.client_msg_id] != row.room_id
    ]
    if misplaced:
        failures.append(f"{len(misplaced)} message(s) stored in another room than sent to")

    seq_gaps = 0
    for room, last_seq in counters.items():
        seqs = Counter(row.seq for row in stored if row.room_id == room)
        top = max([last_seq, *seqs])
        holes = [seq for seq in range(1, top + 1) if seq not in seqs]
        repeated = [seq for seq, n in seqs.items() if n > 1]
        seq_gaps += len(holes) + len(repeated) + (last_seq != max(seqs, default=0))
        if holes or repeated or last_seq != max(seqs, default=0):
            failures.append(
                f"room {room}: seq holes {holes[:10]}, repeated {repeated[:10]}, "
                f"counter {last_seq} vs highest stored {max(seqs, default=0)}"
            )

    subscriber_diff = 0
    for room in counters:
        truth = {(r.room_id, r.seq, r.message_id) for r in stored if r.room_id == room}
        view = history.seen.get(room, set())
        diff = truth ^ view
        subscriber_diff += len(diff)
        if diff:
            failures.append(
                f"room {room}: subscriber missed {len(truth - view)} and saw "
                f"{len(view - truth)} the store does not hold"
            )

    typed = Counter(c.outcome.error for c in sends if c.outcome.error and c.outcome.typed)
    untyped = Counter(
        f"{c.kind}:{c.outcome.error}"
        for c in history.calls
        if c.outcome.error and not c.outcome.typed
    )
    if untyped:
        examples = {
            f"{c.kind}:{c.outcome.error}": c.outcome.detail
            for c in history.calls
            if c.outcome.error and not c.outcome.typed
        }
        failures.append(
            f"untyped errors (not chatkeep.errors): {dict(untyped)}, e.g. "
            + "; ".join(f"{kind}: {text!r}" for kind, text in examples.items())
        )
    readers = Counter(
        f"{c.kind}:{c.outcome.error}" for c in history.calls if c.kind != "send" and c.outcome.error
    )
    stuck = [c for c in history.calls if c.kind != "send" and c.outcome.hung]
    if stuck:
        failures.append(f"{len(stuck)} reader call(s) hung past {HUNG_CALL:g} s")
    max_send = max((c.seconds for c in sends), default=0.0)
    slow = [c for c in sends if c.seconds > bound]
    if slow:
        hung = sum(c.outcome.hung for c in slow)
        worst = max(slow, key=lambda c: c.seconds)
        failures.append(
            f"{len(slow)} send attempt(s) over the {bound:g} s bound ({hung} hung), "
            f"longest {worst.seconds:.2f} s ending in {worst.outcome.error or 'success'}"
        )

    stored_ids = {row.client_msg_id for row in stored}
    indeterminate = [cid for cid in history.intended if cid not in acks]
    return ScenarioResult(
        fault=fault,
        attempts=len(sends),
        acknowledged=len(acks),
        typed_errors=typed,
        untyped_errors=untyped,
        reader_errors=readers,
        max_send_seconds=max_send,
        bound=bound,
        over_bound=len(slow),
        lost=lost,
        duplicated=duplicated,
        seq_gaps=seq_gaps,
        subscriber_diff=subscriber_diff,
        indeterminate=len(indeterminate),
        indeterminate_stored=sum(cid in stored_ids for cid in indeterminate),
        catch_ups=history.catch_ups,
        failures=failures,
    )


_HEADER: Final = (
    "| fault | attempts | sends ok | failed (typed) | untyped errors | max call s (bound) "
    "| lost | dup | seq gaps | subscriber diff |"
)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.most_common()) or "-"


def render_table(results: list[ScenarioResult]) -> str:
    """The markdown table of ``results``, one row per scenario, with their details."""
    lines = [_HEADER, "|" + "---|" * 10]
    for r in results:
        over = f" !{r.over_bound}" if r.over_bound else ""
        lines.append(
            f"| {r.fault} | {r.attempts} | {r.acknowledged} | {sum(r.typed_errors.values())} "
            f"| {sum(r.untyped_errors.values())} | {r.max_send_seconds:.2f} ({r.bound:g}){over} "
            f"| {r.lost} | {r.duplicated} | {r.seq_gaps} | {r.subscriber_diff} |"
        )
    lines.append("")
    for r in results:
        lines.append(
            f"{r.fault}: typed {_counts(r.typed_errors)}; untyped {_counts(r.untyped_errors)}; "
            f"readers {_counts(r.reader_errors)}; never acknowledged {r.indeterminate} "
            f"({r.indeterminate_stored} stored); catch-ups {_counts(r.catch_ups)}; "
            f"{'PASS' if not r.failures else 'FAIL: ' + '; '.join(r.failures[:5])}"
        )
    return "\n".join(lines)
