"""One-time bootstrap (``chatkeep setup``): the database, and later its roles and grants.

Runs as a superuser (or the embedded server's owner). Every step checks before it acts and
tolerates a concurrent run doing the same step, so running it again is always safe.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import asyncpg

from chatkeep.config import DEFAULT_DATABASE_NAME, Settings
from chatkeep.errors import InvalidInput
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors

__all__ = ["database_name", "ensure_database", "maintenance_url"]

logger = logging.getLogger("chatkeep.setup")


def database_name(dsn: str) -> str:
    """The database a URL points at (``chatapp_db`` when it names none)."""
    return urlsplit(dsn).path.lstrip("/") or DEFAULT_DATABASE_NAME


def maintenance_url(dsn: str, database: str = "postgres") -> str:
    """The same server and credentials, pointed at another database (``postgres``)."""
    parts = urlsplit(dsn)
    # Built by hand: urlunsplit drops the empty host of a socket URL (postgresql:///db?host=).
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}/{database}{query}{fragment}"


async def ensure_database(dsn: str, settings: Settings) -> bool:
    """Create the database ``dsn`` names if it does not exist; True if it was created.

    Raises:
        InvalidInput: the database name is not a plain identifier.
        Unavailable: the server cannot be reached.
        PermissionDenied: the role may not create databases.
    """
    name = database_name(dsn)
    if not name.replace("_", "").isalnum() or len(name) > 63:
        raise InvalidInput("database_url", "the database name must be letters, digits and _")
    conn = await connect(maintenance_url(dsn), settings, operation="setup")
    try:
        with translate_errors("setup"):
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                logger.info("database %s already exists", name)
                return False
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                return False  # a concurrent setup won the race; same outcome
            except asyncpg.UniqueViolationError:
                return False  # the same race, seen through pg_database's unique index
            logger.info("created database %s", name)
            return True
    finally:
        await asyncio.shield(conn.close())
