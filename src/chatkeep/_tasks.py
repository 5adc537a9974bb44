"""Long-running loops that stop when asked, even when a call below swallowed the request."""

from __future__ import annotations

import asyncio

__all__ = ["stop_if_asked"]


def stop_if_asked() -> None:
    """Raise :class:`asyncio.CancelledError` if the running task was asked to stop.

    ``task.cancel()`` delivers one ``CancelledError``. A call that catches it and answers
    with an error of its own (a timeout, ``Unavailable``) or with nothing at all leaves the
    task running with the request still pending; a loop that logs and retries would then
    sleep on forever, and whoever cancelled it (a web app's shutdown) would wait forever.
    Background loops call this before each pause and in their error handlers.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from None
