"""A small TCP proxy for fault tests: pass traffic, black-hole it, or cut connections.

A real network fault cannot be made on demand on loopback without root tricks that would
also hit the machine's shared servers, so the tests put this proxy between chatkeep and
a store and make the fault here::

    async with FaultProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://root@127.0.0.1:{proxy.port}/db"
        ...
        proxy.blackhole()  # bytes in both directions are swallowed; sockets stay open
        ...
        proxy.heal()       # traffic flows again (on connections opened after, and the
                           # open ones: nothing held back is replayed, as on a real network)
        proxy.cut()        # every open connection is reset; new ones are accepted

A black hole is what a partition looks like to a client: no RST, no FIN, just silence,
so only the client's own timeouts end the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self

__all__ = ["FaultProxy"]

_CHUNK = 65536


class FaultProxy:
    """Forward connections on a loopback port to ``host:port``, with faults on demand.

    A ``host`` that is a path is a Unix socket (``port`` is then ignored): the embedded
    PostgreSQL listens on one only.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        #: Connections accepted since start (for tests that expect reconnects).
        self.accepted = 0

    async def start(self) -> Self:
        """Listen on a free loopback port (``self.port``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def blackholed(self) -> bool:
        """True while traffic is being swallowed."""
        return not self._flowing.is_set()

    def blackhole(self) -> None:
        """Swallow every byte in both directions, on open and new connections alike."""
        self._flowing.clear()

    def heal(self) -> None:
        """Let traffic flow again."""
        self._flowing.set()

    def cut(self) -> None:
        """Reset every open connection (RST, as a crashed peer or middlebox would)."""
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # SO_LINGER 0: close sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        host, port = self._target
        try:
            if host.startswith("/"):
                server_r, server_w = await asyncio.open_unix_connection(host)
            else:
                server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        pipes = [
            asyncio.ensure_future(self._pipe(client_r, server_w)),
            asyncio.ensure_future(self._pipe(server_r, client_w)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            for writer in (client_w, server_w):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if not self._flowing.is_set():
                    continue  # swallowed: the sender thinks it went out
                writer.write(data)
                await writer.drain()
