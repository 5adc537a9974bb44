"""Group commit: the sends of every task of a process, gathered into one statement.

:meth:`chatkeep.ChatKeep.send_message` hands each send to a :class:`SendBatcher`. A send
that finds a free slot (fewer than ``in_flight`` batches being written) leaves at once, in
a batch of its own or with whatever waited: a lone sender waits for no timer. Sends that
arrive while every slot is busy are gathered, and leave together when a slot frees, when
``size`` of them wait, or when the oldest has waited ``window`` seconds, whichever comes
first. A batch is written by the facade's ``write`` callback (rate limits in one Redis
pipeline, one PostgreSQL statement, the publishes in one pipeline), which answers each
caller's future with its own result or its own error, after the commit.

A batch runs in a task of its own, never in a caller's: a caller that is cancelled while
its batch is being written leaves the batch (and its neighbours' messages) alone; one
cancelled while still waiting is taken out before its batch leaves. :meth:`close` sends
what waits and waits for every batch to finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.models import CreateMessageDto, Message

__all__ = ["PendingSend", "SendBatcher"]

logger = logging.getLogger(__name__)

SendAnswer = tuple[Message, int | None]
"""What a caller of :meth:`SendBatcher.submit` gets: its message and its position."""

_MAX_SIZE: Final = 1000


@dataclass(slots=True, eq=False)
class PendingSend:
    """One send waiting for its batch: the message and the future its caller awaits."""

    dto: CreateMessageDto
    future: asyncio.Future[SendAnswer]
    queued_at: float = field(default_factory=time.monotonic)

    def answer(self, result: SendAnswer | BaseException) -> None:
        """Resolve the caller's future (a caller that gave up is left alone)."""
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


class SendBatcher:
    """Gathers concurrent sends into batches and has ``write`` store each batch.

    Args:
        write: writes one batch and answers each of its sends (see :class:`PendingSend`).
            Anything it leaves unanswered gets :class:`~chatkeep.errors.Unavailable`.
        size: the most sends in one batch.
        window: seconds the oldest waiting send may wait for a free slot.
        in_flight: batches written at once before sends start to gather.

    Raises:
        InvalidInput: an option is out of range.
    """

    def __init__(
        self,
        write: Callable[[Sequence[PendingSend]], Awaitable[None]],
        *,
        size: int = 64,
        window: float = 0.002,
        in_flight: int = 4,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_SIZE:
            raise InvalidInput("size", f"an integer from 1 to {_MAX_SIZE}")
        if isinstance(window, bool) or not isinstance(window, int | float) or not 0 <= window <= 10:
            raise InvalidInput("window", "seconds from 0 to 10")
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
            raise InvalidInput("in_flight", "a positive integer")
        self._write = write
        self.size = size
        self.window = float(window)
        self.in_flight = in_flight
        self._queue: deque[PendingSend] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: Batches written so far and the sends they carried (for tests and benchmarks).
        self.batches = 0
        self.sends = 0

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (new sends are refused)."""
        return self._closed

    async def submit(self, dto: CreateMessageDto) -> SendAnswer:
        """Send ``dto`` with the next batch and return its answer once it is committed.

        Raises:
            Unavailable: the batcher is closed, or the batch could not be written.
            ChatkeepError: this send's own error (from ``write``).
        """
        if self._closed:
            raise Unavailable("send_message: chatkeep is closing; the message was not sent")
        loop = asyncio.get_running_loop()
        pending = PendingSend(dto, loop.create_future())
        self._queue.append(pending)
        # Sent from the caller's task: a batch that leaves now runs in a copy of its
        # context (its trace span is the batch's parent).
        self._pump(None)
        return await pending.future

    async def close(self) -> None:
        """Refuse new sends, send what waits, and wait until every batch is answered."""
        self._closed = True
        self._pump(contextvars.Context(), drain=True)
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _pump(self, context: contextvars.Context | None, *, drain: bool = False) -> None:
        """Start every batch that may leave now; arm the window for the rest.

        ``context``: the context the batches run in; ``None``, a copy of the current one
        (made only when a batch leaves).
        """
        queue = self._queue
        while queue and (
            drain
            or len(self._running) < self.in_flight
            or len(queue) >= self.size
            or time.monotonic() - queue[0].queued_at >= self.window
        ):
            batch: list[PendingSend] = []
            while queue and len(batch) < self.size:
                pending = queue.popleft()
                if not pending.future.done():  # its caller gave up while it waited
                    batch.append(pending)
            if not batch:
                break
            if context is None:
                context = contextvars.copy_context()
            task = asyncio.get_running_loop().create_task(self._run(batch), context=context)
            self._running.add(task)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if queue:
            delay = max(0.0, queue[0].queued_at + self.window - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_window)

    def _on_window(self) -> None:
        self._timer = None
        self._pump(contextvars.Context())

    async def _run(self, batch: list[PendingSend]) -> None:
        self.batches += 1
        self.sends += len(batch)
        try:
            await self._write(batch)
        except BaseException as exc:
            failure: BaseException = exc
            if not isinstance(exc, Exception):
                failure = Unavailable("send_message: the batch was cancelled before its answer")
            for pending in batch:
                pending.answer(failure)
            if not isinstance(exc, Exception):
                raise
        finally:
            for pending in batch:
                pending.answer(Unavailable("send_message: the batch gave no answer"))
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            # The next batch belongs to no caller of this one: a fresh context.
            self._pump(contextvars.Context(), drain=self._closed)
