"""The fault proxy itself: it forwards, swallows and cuts as the fault tests rely on."""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.proxy import FaultProxy


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_forwards_blackholes_heals_and_cuts() -> None:
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"

        proxy.blackhole()
        assert proxy.blackholed
        writer.write(b"lost")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)

        proxy.heal()
        writer.write(b"back")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"back"

        proxy.cut()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(4), 2)
        writer.close()

        # New connections are accepted after a cut.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"anew")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"anew"
        assert proxy.accepted == 2
        writer.close()
    server.close()
    await server.wait_closed()
