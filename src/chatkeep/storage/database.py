"""PostgreSQL connections: options shared by the pool and by single connections.

The pooled :class:`Database` (storage issue) and the migration runner both open
connections through :func:`connect_options`, so TLS, timeouts and ``application_name`` are
set the same way everywhere.
"""

from __future__ import annotations

import ssl
from typing import Any

import asyncpg

from chatkeep.config import Settings, redact_url
from chatkeep.storage.errors import translate_errors

__all__ = ["connect", "connect_options", "ssl_option"]


def ssl_option(settings: Settings) -> ssl.SSLContext | str | None:
    """The ``ssl=`` argument for asyncpg from ``ssl_mode`` and ``ssl_ca_file``.

    ``None`` leaves the choice to the URL's own ``sslmode`` (or asyncpg's default).
    """
    mode = settings.ssl_mode
    if mode is None:
        return None
    if mode in ("verify-full", "verify-ca"):
        cafile = str(settings.ssl_ca_file) if settings.ssl_ca_file else None
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = mode == "verify-full"
        return context
    return mode


def connect_options(settings: Settings, *, application_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` / ``asyncpg.create_pool``."""
    options: dict[str, Any] = {
        "timeout": settings.connect_timeout,
        "statement_cache_size": settings.statement_cache_size,
        "server_settings": {
            "application_name": application_name or settings.application_name,
        },
    }
    ssl_arg = ssl_option(settings)
    if ssl_arg is not None:
        options["ssl"] = ssl_arg
    return options


async def connect(
    dsn: str,
    settings: Settings,
    *,
    application_name: str | None = None,
    operation: str = "connect",
) -> asyncpg.Connection:
    """Open one connection (for migrations and maintenance; the app uses the pool).

    Raises:
        Unavailable: the server cannot be reached in ``connect_timeout``.
        ConfigurationError: the credentials or database name are wrong.
    """
    with translate_errors(f"{operation} to {redact_url(dsn)}"):
        conn: asyncpg.Connection = await asyncpg.connect(
            dsn, **connect_options(settings, application_name=application_name)
        )
    return conn
