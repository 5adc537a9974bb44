"""The fault suite's clients: senders that retry until acknowledged, and subscribers.

A sender is one user in one room sending numbered messages through
``ChatKeep.send_message``. A failed send is retried with the same ``client_msg_id`` (as a
real client does after a lost answer) until it is acknowledged or its deadline passes.

A subscriber is a member of a room listening on another node (its own ``ChatKeep``)
through ``chat.subscribe(room)``. It keeps what it saw as (room, seq, message id) and
catches up from PostgreSQL with ``chat.catch_up(room, user, after_seq=last)`` when it
learns it missed something: on a ``RoomGap`` (its pub/sub connection was lost), and on an
event whose ``seq`` jumps past the next one (a publish that failed while its own
connection stayed up tells it nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from chatkeep import ChatKeep, ChatkeepError, RateLimited
from chatkeep.models import CursorPage, MessageWithUser
from chatkeep.realtime import EventSubscription, MessageCreated, RoomGap
from tests.faults.history import HUNG_CALL, Call, History, Outcome

__all__ = ["Sender", "Subscriber"]

T = TypeVar("T")

RETRY_PAUSE: Final = 0.1
"""Seconds between two attempts at one message (a client's minimal backoff)."""
_POLL: Final = 0.2


@dataclass(slots=True)
class Sender:
    """One user sending numbered messages to one room, retrying each until acknowledged.

    Attributes:
        name: prefix of its ``client_msg_id`` values (``s3-17``: sender 3, message 17).
        deadline: seconds one message is retried before the sender gives up on it.
        interval: pause between two messages.
    """

    chat: ChatKeep
    room: uuid.UUID
    user: uuid.UUID
    name: str
    history: History
    deadline: float
    interval: float
    sent: int = 0

    async def run(self, until: float) -> None:
        """Send message after message until the monotonic clock passes ``until``."""
        while time.monotonic() < until:
            await self.send_one()
            await asyncio.sleep(self.interval)

    async def send_one(self) -> bool:
        """Send the next message, retrying it; True once acknowledged."""
        client_msg_id = f"{self.name}-{self.sent}"
        self.sent += 1
        self.history.intended[client_msg_id] = self.room
        give_up = time.monotonic() + self.deadline
        while True:
            pause = RETRY_PAUSE
            start = time.monotonic()
            try:
                async with asyncio.timeout(HUNG_CALL) as limit:
                    message = await self.chat.send_message(
                        self.room,
                        self.user,
                        f"message {client_msg_id}",
                        client_msg_id=client_msg_id,
                    )
            except TimeoutError as exc:
                hung = limit.expired()
                outcome = Outcome(error="hung", hung=True) if hung else Outcome.of(exc)
            except RateLimited as exc:
                outcome = Outcome.of(exc)
                pause = max(pause, min(exc.retry_after, 1.0))
            except Exception as exc:  # recorded and checked: every one must be typed
                outcome = Outcome.of(exc)
            else:
                self.history.record(
                    Call(
                        "send",
                        client_msg_id,
                        time.monotonic() - start,
                        Outcome(),
                        message.id,
                        message.seq,
                    )
                )
                return True
            self.history.record(Call("send", client_msg_id, time.monotonic() - start, outcome))
            if time.monotonic() >= give_up:
                return False
            await asyncio.sleep(pause)


@dataclass(slots=True)
class Subscriber:
    """A member of ``room`` on another node, keeping the view events and catch-ups give it."""

    chat: ChatKeep
    room: uuid.UUID
    user: uuid.UUID
    history: History
    last: int = 0  # every seq up to here is in the view

    def __post_init__(self) -> None:
        self.history.seen.setdefault(self.room, set())

    @property
    def view(self) -> set[tuple[uuid.UUID, int, uuid.UUID]]:
        """(room, seq, message id) of every message seen so far."""
        return self.history.seen[self.room]

    async def _attempt(self, kind: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``call()``, recorded as ``kind`` when it fails (``None`` then)."""
        start = time.monotonic()
        try:
            async with asyncio.timeout(HUNG_CALL) as limit:
                return await call()
        except Exception as exc:
            hung = isinstance(exc, TimeoutError) and limit.expired()
            outcome = Outcome(error="hung", hung=True) if hung else Outcome.of(exc)
            self.history.record(Call(kind, None, time.monotonic() - start, outcome))
            return None

    async def subscribe(self, stop: asyncio.Event) -> EventSubscription | None:
        """Subscribe (retrying while Redis is away), then catch up on what came before."""
        while not stop.is_set():
            sub = await self._attempt("subscribe", lambda: self.chat.subscribe(self.room))
            if sub is None:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            await self.catch_up(stop)
            return sub
        return None

    async def catch_up(self, stop: asyncio.Event) -> None:
        """Read every message after ``last`` from PostgreSQL (retrying while it is away)."""
        cursor: str | None = None
        while not stop.is_set():
            page = await self._attempt("catch_up", functools.partial(self._page, cursor))
            if page is None:
                cursor = None  # start again from the last seq kept
                await asyncio.sleep(RETRY_PAUSE)
                continue
            for message in page.items:
                self._saw(message.seq, message.id)
            if page.after is None:
                return
            cursor = page.after

    async def _page(self, cursor: str | None) -> CursorPage[MessageWithUser]:
        if cursor is None:
            return await self.chat.catch_up(self.room, self.user, after_seq=self.last)
        return await self.chat.catch_up(self.room, self.user, cursor=cursor)

    def _saw(self, seq: int, message_id: uuid.UUID) -> None:
        self.view.add((self.room, seq, message_id))
        if seq == self.last + 1:
            self.last = seq

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set, catching up on every gap."""
        sub = await self.subscribe(stop)
        if sub is None:
            return
        try:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(_POLL):
                        item = await sub.get()
                except TimeoutError:
                    continue
                if item is None:
                    return
                if isinstance(item, RoomGap):
                    self.history.catch_ups[f"gap:{item.reason}"] += 1
                    await self.catch_up(stop)
                elif isinstance(item, MessageCreated) and item.room_id == self.room:
                    if item.seq > self.last + 1:
                        # Events between were not delivered: read them (and this one).
                        self.history.catch_ups["seq jump"] += 1
                        await self.catch_up(stop)
                    else:
                        self._saw(item.seq, item.message_id)
        finally:
            with contextlib.suppress(ChatkeepError):
                await sub.aclose()
