"""Sends racing membership changes never deadlock (docs/design.md, "Membership flows").

A send locks the room row (its seq trigger) and then the sender's membership row (its
watermark); every membership change (join, leave, remove, role change) locks the room row
before any membership row, so the two orders agree. Before that, a member sending while
being demoted or removed (or an owner sending while someone else was) could deadlock, and
PostgreSQL broke it by failing one side (40P01, an ``Unavailable`` to the caller).

The churn here runs as ``chatapp_app`` through the facade, with group commit on (sends of
many members in one statement) and off (each send alone), and counts every
``Unavailable``: none may happen, deadlock or otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from chatkeep import ChatKeep, CreateRoomDto, CreateUserDto, Settings
from chatkeep.errors import ChatkeepError, PermissionDenied, Unavailable
from chatkeep.realtime.ratelimit import RateLimit

MEMBERS = 6
ROUNDS = 6


def _is_deadlock(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, asyncpg.DeadlockDetectedError):
            return True
        cause = cause.__cause__
    return False


async def _user(chat: ChatKeep, name: str) -> uuid.UUID:
    user = await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password="correct horse")
    )
    return user.id


class Tally:
    """What the racing calls answered, by kind (the test asserts on it)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.unavailable: list[Unavailable] = []

    async def run(self, what: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            await call()
        except Unavailable as exc:
            self.counts["deadlock" if _is_deadlock(exc) else "unavailable"] += 1
            self.unavailable.append(exc)
        except PermissionDenied:
            # Expected: a send by someone removed a moment ago, a leave of the last owner.
            self.counts[f"{what}.denied"] += 1
        except ChatkeepError as exc:
            self.counts[f"{what}.{type(exc).__name__}"] += 1
        else:
            self.counts[f"{what}.ok"] += 1


async def _churn(group_commit: bool, make_settings: Callable[..., Settings], app_url: str) -> Tally:
    settings = make_settings(
        database_url=app_url, send_group_commit=group_commit, pool_min_size=1, pool_max_size=6
    )
    tally = Tally()
    limit = RateLimit(limit=1_000_000, period=1.0)
    async with ChatKeep.connect(
        settings, node_id="locks", bcrypt_rounds=10, send_limit=limit
    ) as chat:
        tag = uuid.uuid4().hex[:6]
        owner = await _user(chat, f"owner{tag}")
        members = [await _user(chat, f"m{i}{tag}") for i in range(MEMBERS)]
        room = (
            await chat.create_room(CreateRoomDto(name="churn", type="public", created_by=owner))
        ).id
        for member in members:
            await chat.join(room, member)
        stop = asyncio.Event()

        async def send(user: uuid.UUID) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await tally.run("send", functools.partial(chat.send_message, room, user, f"hi {n}"))

        async def churn(user: uuid.UUID) -> None:
            steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("promote", lambda: chat.change_role(room, user, "admin", by=owner)),
                ("demote", lambda: chat.change_role(room, user, "member", by=owner)),
                ("remove", lambda: chat.remove_member(room, user, by=owner)),
                ("add", lambda: chat.join(room, user, by=owner)),
                ("leave", lambda: chat.leave(room, user)),
                ("rejoin", lambda: chat.join(room, user)),
            ]
            for _ in range(ROUNDS):
                for what, step in steps:
                    await tally.run(what, step)

        senders = [asyncio.create_task(send(u)) for u in [owner, *members, *members]]
        await asyncio.gather(*(churn(u) for u in members))
        stop.set()
        await asyncio.gather(*senders)
    return tally


@pytest.mark.parametrize("group_commit", [True, False], ids=["group-commit", "alone"])
async def test_sends_racing_membership_changes_never_deadlock(
    group_commit: bool, make_settings: Callable[..., Settings], app_url: str
) -> None:
    tally = await _churn(group_commit, make_settings, app_url)
    counts = tally.counts
    # The race really ran: sends were stored and every kind of change happened.
    assert counts["send.ok"] > 0, counts
    for what in ("promote", "demote", "remove", "add", "leave", "rejoin"):
        assert counts[f"{what}.ok"] > 0, counts
    assert counts["deadlock"] == 0, (counts, tally.unavailable[:3])
    assert counts["unavailable"] == 0, (counts, tally.unavailable[:3])
