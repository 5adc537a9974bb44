"""Backup of the chatkeep schema with ``pg_dump``.

A backup is one ``pg_dump`` custom-format archive of the ``public`` schema — every table,
its data, and ``chatkeep_schema_history``, so a restored database knows its schema version
— taken in one snapshot (``pg_dump`` reads everything in a single repeatable-read
transaction), so it is consistent even while the application writes.
:mod:`chatkeep.ops.restore` restores it; :mod:`chatkeep.ops.pgtools` finds and runs the
PostgreSQL programs for both.

What :func:`backup` guarantees:

* **Nothing half-written under the final name.** The archive is written to a hidden
  ``.NAME.partial`` file beside the target, fsynced, then renamed; a failed or cancelled
  dump leaves no file behind (nor a ``pg_dump`` running). The file is created ``0600``:
  it holds password hashes.
* **The right tools.** ``pg_dump`` refuses to dump a server newer than itself, so one at
  least as new as the server is found (:func:`chatkeep.ops.pgtools.find_pg_tools`), or
  the error says what to install.

Passwords never reach a command line (where ``ps`` would show them): they travel to the
tools in ``PGPASSWORD``, and every message shows URLs without them.

The restore side (:func:`restore`, :func:`read_archive`...) and the tool finders
(:func:`find_pg_tools`, :class:`Progress`...) are importable from here too, where they
lived before they had modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from chatkeep.config import Settings, redact_url
from chatkeep.errors import InvalidInput, PermissionDenied, Unavailable
from chatkeep.ops.pgtools import (
    SCHEMA,
    PgTool,
    Progress,
    ProgressCallback,
    ToolProgress,
    choose_tool,
    find_pg_tools,
    libpq_target,
    run_tool,
    server_major,
    source_url,
    tool_failure,
)
from chatkeep.ops.restore import (
    ARCHIVE_MAGIC,
    ArchiveInfo,
    RestoreMode,
    RestoreResult,
    plan_restore,
    read_archive,
    restore,
)
from chatkeep.storage.bootstrap import database_name
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.migrate import CHATKEEP_NAMESPACE, HISTORY_TABLE, Migrator

__all__ = [
    "ARCHIVE_MAGIC",
    "SCHEMA",
    "ArchiveInfo",
    "BackupResult",
    "PgTool",
    "Progress",
    "ProgressCallback",
    "RestoreMode",
    "RestoreResult",
    "backup",
    "choose_tool",
    "default_backup_name",
    "find_pg_tools",
    "plan_restore",
    "read_archive",
    "restore",
]

logger = logging.getLogger("chatkeep.ops.backup")

# From the catalog's page counts (as of the last VACUUM/ANALYZE), not pg_table_size(), which
# would wait behind any lock a migration holds: these only weight the progress display.
_TABLE_SIZES: Final = """
SELECT c.relname, (c.relpages::bigint + 1) * current_setting('block_size')::bigint
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
 ORDER BY c.relname
"""

# -- backup --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What :func:`backup` wrote.

    Attributes:
        path: the archive.
        database: the database it was taken from.
        size: the archive's size in bytes.
        sha256: hex SHA-256 of the archive, to check copies against.
        schema_version: the newest applied migration version in the archive.
        server_version: the PostgreSQL version dumped.
        pg_dump: the program that wrote it.
        tables: how many tables it holds.
        duration: seconds taken.
    """

    path: Path
    database: str
    size: int
    sha256: str
    schema_version: int
    server_version: str
    pg_dump: PgTool
    tables: int
    duration: float


def default_backup_name(database: str, schema_version: int, when: datetime) -> str:
    """``chatkeep-<database>-<UTC time>-v<schema version>.dump``, which sorts by time."""
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"chatkeep-{database}-{stamp}-v{schema_version:03d}.dump"


def _resolve_output(output: Path | None, name: str, overwrite: bool) -> Path:
    if output is None:
        path = Path(name)
    elif output.is_dir():
        path = output / name
    else:
        path = output
    if not path.parent.is_dir():
        raise InvalidInput("output", f"folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise InvalidInput(
            "output", f"{path} already exists; choose another name or pass --overwrite"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_and_rename(partial: Path, final: Path) -> None:
    with partial.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)
    with contextlib.suppress(OSError):  # not every platform can fsync a folder
        folder = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


async def backup(
    settings: Settings,
    output: Path | None = None,
    *,
    database_url: str | None = None,
    overwrite: bool = False,
    pg_bin_dirs: Sequence[Path] = (),
    lock_wait_timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> BackupResult:
    """Write a consistent custom-format archive of the chatkeep schema and its history.

    Connect as a superuser (or a role with BYPASSRLS that may read every table):
    ``pg_dump`` refuses tables that row-level security or column grants would show it only
    in part, which is what the application, migrator and read-only roles see.

    Args:
        settings: connection options (TLS, timeouts, application name).
        output: the archive file, or a folder for the default name
            (:func:`default_backup_name`); default: that name in the current folder.
        database_url: the database to dump (default: the migrate URL, else DATABASE_URL).
        overwrite: replace ``output`` if it exists.
        pg_bin_dirs: look for ``pg_dump`` only in these folders.
        lock_wait_timeout: seconds ``pg_dump`` waits for a table lock (a migration holding
            one) before failing, rather than queueing behind it.
        progress: called as tables are dumped.

    Returns:
        Where the archive is, its size, SHA-256 and schema version.

    Raises:
        InvalidInput: ``output`` exists or its folder does not; the database holds no
            chatkeep schema.
        ConfigurationError: no ``pg_dump`` new enough for the server; bad credentials.
        Unavailable: the server cannot be reached.
        ChatkeepError: ``pg_dump`` failed (the message carries its error).
    """
    if not 0 < lock_wait_timeout <= 86_400:
        raise InvalidInput("lock_wait_timeout", "must be between 0 and 86400 seconds")
    started = time.monotonic()
    url = source_url(settings, database_url)
    database = database_name(url)
    where = redact_url(url)
    conn = await connect(url, settings, application_name="chatkeep-backup", operation="backup")
    try:
        major, server_version = await server_major(conn, "backup")
        with translate_errors("backup"):
            # Never queue behind a migration's lock for longer than pg_dump itself would.
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, false)", f"{lock_wait_timeout * 1000:.0f}"
            )
            has_history = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.{HISTORY_TABLE}"
            )
            if not has_history:
                raise InvalidInput(
                    "database_url",
                    "must hold a chatkeep schema",
                    f"{where} holds no chatkeep schema ({HISTORY_TABLE} is missing): "
                    "run `chatkeep migrate up` first, or point at the right database",
                )
            entries = await Migrator(conn).status()
            sizes = [(r[0], max(int(r[1]), 1)) for r in await conn.fetch(_TABLE_SIZES, SCHEMA)]
    finally:
        await asyncio.shield(conn.close())
    schema_version = max(
        (e.version for e in entries if e.applied_at and e.namespace == CHATKEEP_NAMESPACE),
        default=0,
    )

    tools = await asyncio.to_thread(find_pg_tools, "pg_dump", pg_bin_dirs)
    tool = choose_tool(
        "pg_dump",
        tools,
        minimum=major,
        prefer=major,
        why=f"to dump PostgreSQL {server_version} (pg_dump refuses newer servers)",
    )
    name = default_backup_name(database, schema_version, datetime.now(UTC))
    path = _resolve_output(output, name, overwrite)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))

    target = libpq_target(url, settings, "backup")
    args = [
        str(tool.path),
        "--format=custom",
        f"--schema={SCHEMA}",
        "--verbose",
        "--no-password",
        f"--lock-wait-timeout={round(lock_wait_timeout * 1000)}",
        f"--file={partial}",
        f"--dbname={target.url}",
    ]
    if tool.major >= 18:
        # Statistics restore only into 18+; restore runs ANALYZE instead, on any version.
        args.append("--no-statistics")

    total = sum(size for _table, size in sizes)

    def written() -> int:
        try:
            return partial.stat().st_size
        except OSError:
            return 0

    on_line = ToolProgress("pg_dump", "dump", total, progress, weights=dict(sizes), written=written)

    async def tick() -> None:
        # A large table is one step: show the archive growing meanwhile.
        while True:
            await asyncio.sleep(0.25)
            on_line.report()

    logger.debug(
        "backup of %s with %s started",
        where,
        tool,
        extra={"operation": "backup", "database": database},
    )
    on_line.report("schema")
    ticker = asyncio.create_task(tick()) if progress is not None else None
    try:
        code, lines = await run_tool(args, target.env, on_line)
        if code != 0:
            if any("canceling statement due to statement timeout" in line for line in lines):
                # pg_dump enforces --lock-wait-timeout through statement_timeout.
                raise Unavailable(
                    f"backup of {where}: a table stayed locked for over "
                    f"{lock_wait_timeout:g}s (a migration or VACUUM FULL holding it?); nothing "
                    "was written: retry when it is done"
                )
            error = tool_failure("pg_dump", lines, f"backup of {where}")
            if isinstance(error, PermissionDenied):
                error = PermissionDenied(
                    f"{error}; back up as a superuser (or a role with BYPASSRLS that may read "
                    "every table): row-level security and column grants hide data from the "
                    "application, migrator and read-only roles"
                )
            raise error
        await asyncio.to_thread(_fsync_and_rename, partial, path)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        partial.unlink(missing_ok=True)
    size = path.stat().st_size
    on_line.finish("done", written=size)
    digest = await asyncio.to_thread(_sha256, path)
    duration = time.monotonic() - started
    logger.info(
        "backup of %s written to %s (%d bytes, schema version %d)",
        where,
        path,
        size,
        schema_version,
        extra={
            "operation": "backup",
            "duration_ms": round(duration * 1000, 1),
            "database": database,
            "tables": len(sizes),
            "bytes": size,
        },
    )
    return BackupResult(
        path=path,
        database=database,
        size=size,
        sha256=digest,
        schema_version=schema_version,
        server_version=server_version,
        pg_dump=tool,
        tables=len(sizes),
        duration=duration,
    )
