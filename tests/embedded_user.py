"""A process that uses the embedded servers, driven by tests/test_embedded_sharing.py.

Run as ``python -m tests.embedded_user [--no-postgres]`` with ``CHATKEEP_DATA_DIR`` set and
no URLs: it opens :func:`chatkeep.embedded.resolve_endpoints`, prints its endpoints as one
JSON line, then answers one command per line on stdin until ``exit`` or end of input:

* ``create <user-uuid>``: start a session in Redis, print its token;
* ``validate <token>``: print the session's user id, or ``none``;
* ``query``: print ``SELECT 1`` run on PostgreSQL as the application role's server.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import asyncpg

from chatkeep.config import Settings
from chatkeep.embedded import Endpoints, resolve_endpoints
from chatkeep.realtime.client import RedisClient
from chatkeep.realtime.sessions import SessionStore


async def answer(settings: Settings, found: Endpoints, line: str) -> str:
    command, _, argument = line.partition(" ")
    if command == "query":
        conn = await asyncpg.connect(found.admin_database_url.replace("chatapp_db", "postgres"))
        try:
            return str(await conn.fetchval("SELECT 1"))
        finally:
            await conn.close()
    async with RedisClient.from_settings(settings, url=found.redis_url) as redis:
        sessions = SessionStore(redis)
        if command == "create":
            return (await sessions.create(uuid.UUID(argument))).token
        session = await sessions.validate(argument)
        return "none" if session is None else str(session.user_id)


def main() -> None:
    postgres = "--no-postgres" not in sys.argv
    overrides: dict[str, Any] = (
        {} if postgres else {"database_url": "postgresql://unused@127.0.0.1:1/x"}
    )
    settings = Settings.load(**overrides)
    with resolve_endpoints(settings) as found:
        print(
            json.dumps({"database_url": found.database_url, "redis_url": found.redis_url}),
            flush=True,
        )
        for line in sys.stdin:
            if line.strip() == "exit":
                break
            print(asyncio.run(answer(settings, found, line.strip())), flush=True)


if __name__ == "__main__":
    main()
