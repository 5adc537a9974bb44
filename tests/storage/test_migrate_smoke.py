from __future__ import annotations

import asyncpg

from chatkeep.storage.migrate import Migrator


async def test_template_is_fully_migrated(conn: asyncpg.Connection) -> None:
    entries = await Migrator(conn).status()
    assert [e.state for e in entries] == ["applied"] * 7
    assert await conn.fetchval("SELECT count(*) FROM users") == 0
