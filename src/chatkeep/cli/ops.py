"""``chatkeep backup``, ``chatkeep restore`` and ``chatkeep metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Final

import typer
from pydantic import SecretStr
from rich.progress import TaskID
from rich.table import Table

from chatkeep.cli._common import (
    DatabaseUrlOption,
    RedisUrlOption,
    console,
    endpoints,
    err_console,
    fail,
    human_size,
    load_settings,
    progress_display,
    run,
    show_table,
)
from chatkeep.config import Settings
from chatkeep.ops import backup as ops_backup
from chatkeep.ops import deploy, pgtools
from chatkeep.ops import restore as ops_restore
from chatkeep.storage.changes import ChangeRepository
from chatkeep.storage.database import Database
from chatkeep.storage.migrate import StatusEntry

# Exit code of `restore` when the restored history disagrees with the migration files
# (the same code `chatkeep migrate status --exit-code` uses for that).
EXIT_HISTORY_PROBLEM: Final = 3

PgBinDirOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--pg-bin-dir",
        help="Folder holding pg_dump/pg_restore/psql to use instead of searching "
        "(PATH, /usr/lib/postgresql/*/bin, the embedded package). Repeatable.",
        file_okay=False,
        dir_okay=True,
        exists=True,
        show_default=False,
    ),
]


@contextlib.contextmanager
def _database_only(settings: Settings) -> Iterator[str]:
    """The URL backup and restore connect to; starts the embedded PostgreSQL if needed.

    Only PostgreSQL is involved: a placeholder Redis URL keeps an embedded Valkey from
    starting for nothing (it is never connected to).
    """
    quiet = settings.model_copy(update={"redis_url": SecretStr("redis://unused")})
    with endpoints(quiet) as found:
        yield found.admin_database_url


@contextlib.contextmanager
def _progress_display() -> Iterator[pgtools.ProgressCallback]:
    """The common progress bar on stderr, fed by backup/restore progress callbacks."""
    display = progress_display()
    tasks: dict[str, TaskID] = {}

    def update(progress: pgtools.Progress) -> None:
        if progress.phase not in tasks:
            tasks[progress.phase] = display.add_task(
                progress.phase, total=max(progress.total, 1), detail=""
            )
        detail = progress.item[:60]
        if progress.written:
            detail = f"{human_size(progress.written)} written  {detail}"
        display.update(
            tasks[progress.phase],
            completed=progress.done,
            total=max(progress.total, 1),
            detail=detail,
        )

    with display:
        yield update


def backup(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Archive file, or a folder for the default name "
            "(chatkeep-<db>-<UTC time>-v<schema version>.dump in the current folder).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --output if it exists.")
    ] = False,
    database_url: DatabaseUrlOption = None,
    pg_bin_dir: PgBinDirOption = None,
) -> None:
    """Write a consistent pg_dump archive of the chatkeep schema and its migration history."""
    settings = load_settings(database_url)
    with _database_only(settings) as url, _progress_display() as on_progress:
        result = run(
            ops_backup.backup(
                settings,
                output,
                database_url=url,
                overwrite=overwrite,
                pg_bin_dirs=tuple(pg_bin_dir or ()),
                progress=on_progress,
            )
        )
    console.print(
        f"[green]wrote[/] {result.path} ({human_size(result.size)}, {result.tables} tables, "
        f"schema version {result.schema_version:03d}, PostgreSQL {result.server_version}, "
        f"{result.duration:.1f} s)",
        highlight=False,
    )
    console.print(f"sha256 {result.sha256}", highlight=False)
    console.print(f"restore with: chatkeep restore {result.path} --database-url URL")


def _history_table(entries: tuple[StatusEntry, ...]) -> Table:
    table = Table("version", "name", "state")
    style = {"applied": "green", "pending": "yellow"}
    for e in entries:
        table.add_row(f"{e.version:03d}", e.name, f"[{style.get(e.state, 'bold red')}]{e.state}[/]")
    return table


def restore(
    archive: Annotated[
        Path, typer.Argument(help="The archive written by `chatkeep backup`.", show_default=False)
    ],
    database_url: DatabaseUrlOption = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "--allow-non-empty",
            help="Restore into a database that is not empty, dropping and recreating the "
            "objects the backup holds.",
        ),
    ] = False,
    create: Annotated[
        bool, typer.Option("--create", help="Create the target database if it does not exist.")
    ] = False,
    no_owner: Annotated[
        bool,
        typer.Option(
            "--no-owner",
            help="Skip ownership and grants (the restoring role owns everything); for a "
            "server without the original roles.",
        ),
    ] = False,
    pg_bin_dir: PgBinDirOption = None,
) -> None:
    """Restore a backup into an empty database, all or nothing, then check its history."""
    settings = load_settings(database_url)
    with _database_only(settings) as url, _progress_display() as on_progress:
        result = run(
            ops_restore.restore(
                settings,
                archive,
                database_url=url,
                allow_non_empty=force,
                no_owner=no_owner,
                create=create,
                pg_bin_dirs=tuple(pg_bin_dir or ()),
                progress=on_progress,
            )
        )
    console.print(
        f"[green]restored[/] {archive} into {result.database} "
        f"(from PostgreSQL {result.dumped_from}, {result.mode} mode with "
        f"{result.pg_restore.path.name} {result.pg_restore.version}, {result.duration:.1f} s)",
        highlight=False,
    )
    show_table(_history_table(result.history))
    if result.problems:
        names = ", ".join(f"{e.version:03d} ({e.state})" for e in result.problems)
        fail(
            f"the restored migration history disagrees with the migration files: {names}; "
            "run `chatkeep migrate status` against it before use",
            code=EXIT_HISTORY_PROBLEM,
        )
    if result.pending:
        console.print(
            f"[yellow]schema version {result.schema_version:03d}[/]: "
            f"{len(result.pending)} newer migration(s) pending; run `chatkeep migrate up`"
        )
    else:
        console.print(f"schema version {result.schema_version:03d}: current")


def metrics(
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="Port to serve /metrics on.")
    ] = deploy.DEFAULT_PORT,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    duration: Annotated[
        float | None,
        typer.Option("--for", min=0, help="Stop after this many seconds (default: Ctrl-C)."),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Print one scrape to stdout and exit; serve nothing.")
    ] = False,
    print_dashboard: Annotated[
        bool,
        typer.Option(
            "--print-dashboard",
            help="Print the Grafana dashboard (JSON) and exit; connect nothing.",
        ),
    ] = False,
    print_alerts: Annotated[
        bool,
        typer.Option(
            "--print-alerts",
            help="Print the Prometheus alert rules (YAML) and exit; connect nothing.",
        ),
    ] = False,
    docs_url: Annotated[
        str,
        typer.Option(
            "--docs-url",
            help="With --print-alerts: where your copy of the docs is served, put in front "
            "of each runbook_url (default: relative, troubleshooting/#<alert>).",
        ),
    ] = "",
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
) -> None:
    """Serve chatkeep's Prometheus metrics for a quick look, or print the dashboard and alerts.

    Each scrape probes both stores (cached for a second); applications mount their own
    registry (see docs/operations.md).
    """
    if print_dashboard or print_alerts:
        if print_dashboard and print_alerts:
            fail("--print-dashboard and --print-alerts print one file each: choose one")
        sys.stdout.write(deploy.dashboard() if print_dashboard else deploy.alert_rules(docs_url))
        return
    from chatkeep.ops.metrics import ChatkeepMetrics
    from chatkeep.realtime import RedisClient
    from chatkeep.storage import Database

    settings = load_settings(database_url, redis_url)
    with endpoints(settings) as found:

        async def go() -> bytes:
            async with (
                Database(settings, dsn=found.database_url) as db,
                RedisClient.from_settings(settings, url=found.redis_url) as redis,
            ):
                collected = ChatkeepMetrics(database=db, redis=redis)
                if once:
                    await collected.sample()
                    return collected.exposition()
                # Scrapes arrive on the server's thread and probe the stores on this loop.
                server = collected.serve(port, host)
                shown = f"[{host}]" if ":" in host else host
                err_console.print(
                    f"serving http://{shown}:{server.server_port}/metrics "
                    "(each scrape probes both stores; Ctrl-C stops)",
                    highlight=False,
                )
                try:
                    if duration is None:  # pragma: no cover - interactive: until Ctrl-C
                        await asyncio.Event().wait()
                    else:
                        await asyncio.sleep(duration)
                finally:
                    server.shutdown()
                    server.server_close()
                return b""

        try:
            text = run(go())
        except KeyboardInterrupt:  # pragma: no cover - interactive stop
            return
    if once:
        sys.stdout.write(text.decode())


def prune_changes(
    keep: Annotated[
        int | None,
        typer.Option(
            "--keep", min=1, help="Changes each room keeps at most (default: change_log_keep)."
        ),
    ] = None,
    max_age_days: Annotated[
        float | None,
        typer.Option(
            "--max-age-days",
            min=0.0,
            help="Prune changes older than this (default: change_log_max_age_days).",
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Prune the room change log to its retention (as the migration role).

    A client asking for changes older than what is left is told to reload the room
    (ResyncRequired). Run it from cron or a scheduler, e.g. hourly.
    """
    settings = load_settings(database_url)
    count = settings.change_log_keep if keep is None else keep
    days = settings.change_log_max_age_days if max_age_days is None else max_age_days
    if days is not None and days <= 0:
        fail("--max-age-days must be greater than 0", code=2)
    with endpoints(settings, redis=False) as found:

        async def go() -> int:
            async with Database(
                settings, dsn=found.migrate_database_url, min_size=0, max_size=1
            ) as db:
                return await ChangeRepository(db).prune(
                    keep=count, max_age=None if days is None else timedelta(days=days)
                )

        pruned = run(go())
    console.print(f"pruned {pruned} change(s) (keep {count}, max age {days} days)")
