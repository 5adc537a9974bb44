"""The migration runner: numbered ``.sql`` files applied once, in order, with a history.

A migration is a file ``NNN_name.sql`` holding an up part and (optionally) a down part::

    -- chatkeep:up
    CREATE TABLE ...;
    -- chatkeep:down
    DROP TABLE ...;

A ``-- chatkeep:no-transaction`` line before the up part runs the file's statements one by
one outside a transaction, for statements PostgreSQL refuses inside one (``CREATE INDEX
CONCURRENTLY``); such a statement in an unmarked file is refused before anything runs.

A ``-- chatkeep:citus`` part, between the up and the down parts, runs right after the up
part, in its transaction, only on a database with the ``citus`` extension (``chatkeep setup
--citus``): there a migration distributes what it created (``create_distributed_table(...,
'room_id', colocate_with => 'rooms')``) and replaces what Citus cannot take. The released
files 001-012 cannot be edited: their Citus part is ``migrations/citus/012_distribute.sql``,
attached to 012 (a file ``citus/NNN_name.sql`` is the Citus part of version NNN). A Citus
part is not in the file's checksum, and a migration that has one is not reverted on Citus.
Statements of the up part that Citus cannot take at all (a policy with a subquery on a
distributed table) sit between ``-- chatkeep:plain-only`` and ``-- chatkeep:end-plain-only``
lines: plain PostgreSQL runs them, Citus skips them and runs the Citus part instead.

What the runner guarantees:

* **Exactly once.** Runners take a session advisory lock, polled with backoff up to
  ``lock_timeout``, and re-read the history once they hold it; five processes migrating at
  once apply each file once and all succeed.
* **All or nothing per file.** Each file runs in one transaction with its history row
  written inside it; a failing file leaves nothing behind, and the error names the file,
  the line and the statement. ``lock_timeout`` and ``statement_timeout`` bound each
  statement, so a migration queued behind a long lock fails fast instead of stalling the
  application's queries behind it.
* **Nothing edited silently.** Each file's SHA-256 (over its normalised text) is stored;
  an applied file whose text changed stops the run and is named. ``repair`` accepts a
  deliberate change.
* **Strict order.** An unapplied file older than the newest applied one, or an applied
  file that has gone missing, is an error unless explicitly allowed; duplicate versions
  are always an error.
* **Applications' migrations beside chatkeep's.** An application registers folders of its
  own (:class:`MigrationLocation`: ``CHATKEEP_MIGRATION_LOCATIONS``, ``--location``, or
  ``Migrator(locations=...)``); each is a namespace of its own in the history, numbered from
  1, applied after chatkeep's and after the locations registered before it, under the same
  lock and with the same checks.
* **An append-only history.** ``chatkeep_schema_history`` gets one row per attempt (up,
  down, repair; success or failure) with times, duration, database user and error; a
  trigger refuses updates and deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg

from chatkeep.config import Settings
from chatkeep.errors import (
    ChecksumMismatch,
    InvalidInput,
    MigrationError,
    MigrationFailed,
    MigrationLockTimeout,
    MigrationOrderError,
)
from chatkeep.storage import catalog
from chatkeep.storage.bootstrap import OWNER_ROLE, maintenance_url
from chatkeep.storage.citus import is_citus
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors
from chatkeep.storage.sqltext import Statement, code_only, split_statements

__all__ = [
    "AUTO_ROLE",
    "CHATKEEP_NAMESPACE",
    "DEFAULT_MIGRATIONS_DIR",
    "AppliedMigration",
    "Migration",
    "MigrationLocation",
    "MigrationPlan",
    "MigrationState",
    "Migrator",
    "StatusEntry",
    "checksum",
    "load_locations",
    "load_migrations",
    "migrate_up",
    "normalise",
    "resolve_target",
]

logger = logging.getLogger("chatkeep.migrate")

DEFAULT_MIGRATIONS_DIR: Final = Path(str(resources.files("chatkeep.storage") / "migrations"))
HISTORY_TABLE: Final = "chatkeep_schema_history"
# pg_advisory_lock key: the first 8 bytes of sha256("chatkeep.migrate"), as a signed bigint.
LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"chatkeep.migrate").digest()[:8], "big", signed=True
)

# The history namespace of the shipped migrations; an application's folder has its own.
CHATKEEP_NAMESPACE: Final = "chatkeep"
_NAMESPACE: Final = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

_FILE_NAME: Final = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")
_MARKER: Final = re.compile(r"^--\s*chatkeep:(up|down|no-transaction|citus)\s*$", re.MULTILINE)
# A region of the up part that plain PostgreSQL runs and Citus skips (its Citus part says
# what Citus does instead): from a `-- chatkeep:plain-only` line to `-- chatkeep:end-plain-only`.
_PLAIN_ONLY: Final = re.compile(r"^--\s*chatkeep:(plain-only|end-plain-only)\s*$", re.MULTILINE)
# Statements PostgreSQL will not run inside a transaction block.
_NEEDS_NO_TRANSACTION: Final = re.compile(
    r"\b(?:CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY"
    r"|DROP\s+INDEX\s+CONCURRENTLY"
    r"|REINDEX\b.*\bCONCURRENTLY"
    r"|DETACH\s+PARTITION\b.*\bCONCURRENTLY"
    r"|VACUUM\b|CREATE\s+DATABASE|DROP\s+DATABASE|ALTER\s+SYSTEM|CREATE\s+TABLESPACE)\b",
    re.IGNORECASE | re.DOTALL,
)

_HISTORY_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {HISTORY_TABLE} (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version       integer     NOT NULL,
    name          text        NOT NULL,
    checksum      text        NOT NULL,
    direction     text        NOT NULL CHECK (direction IN ('up', 'down', 'repair')),
    transactional boolean     NOT NULL,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    duration_ms   double precision NOT NULL,
    db_user       text        NOT NULL DEFAULT current_user,
    outcome       text        NOT NULL CHECK (outcome IN ('success', 'failed')),
    error         text,
    namespace     text        NOT NULL DEFAULT 'chatkeep'
);
CREATE OR REPLACE FUNCTION {HISTORY_TABLE}_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '{HISTORY_TABLE} is append-only'
        USING ERRCODE = 'insufficient_privilege';
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgname = '{HISTORY_TABLE}_append_only'
                      AND tgrelid = '{HISTORY_TABLE}'::regclass) THEN
        CREATE TRIGGER {HISTORY_TABLE}_append_only
            BEFORE UPDATE OR DELETE OR TRUNCATE ON {HISTORY_TABLE}
            FOR EACH STATEMENT EXECUTE FUNCTION {HISTORY_TABLE}_append_only();
    END IF;
END
$$;
"""

# A history written before namespaces existed gains the column, its rows all
# chatkeep's: a constant default, so no table rewrite and no UPDATE (the table is append-only).
_ADD_NAMESPACE: Final = f"""
ALTER TABLE {HISTORY_TABLE} ADD COLUMN IF NOT EXISTS namespace text NOT NULL DEFAULT 'chatkeep'
"""
_HISTORY_SHAPE: Final = f"""
SELECT to_regclass('{HISTORY_TABLE}') IS NOT NULL AS present,
       EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = to_regclass('{HISTORY_TABLE}')
                  AND attname = 'namespace' AND NOT attisdropped) AS namespaced
"""

_INSERT_HISTORY: Final = f"""
INSERT INTO {HISTORY_TABLE}
    (version, name, checksum, direction, transactional, started_at, finished_at,
     duration_ms, outcome, error, db_user, namespace)
VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp(),
        extract(epoch FROM clock_timestamp() - $6) * 1000, $7, $8, session_user, $9)
"""

_READ_HISTORY: Final = f"""
SELECT id, version, name, checksum, direction, finished_at, db_user, namespace
  FROM {HISTORY_TABLE}
 WHERE outcome = 'success'
 ORDER BY id
"""
# The same, from a history that has no namespace column yet (read without the lock).
_READ_OLD_HISTORY: Final = _READ_HISTORY.replace(", namespace\n", ", 'chatkeep' AS namespace\n")

MigrationState = Literal["applied", "pending", "changed", "missing", "out-of-order"]


class _AutoRole(enum.Enum):
    AUTO = "auto"


AUTO_ROLE: Final = _AutoRole.AUTO
"""``Migrator(role=AUTO_ROLE)``: run as chatapp_owner when this login may and it may create."""

# Which role to become: the owner role, when it exists, the connected user may become it,
# and it may create objects in the schema migrations create them in (`chatkeep setup` ran).
_OWNER_ROLE_USABLE: Final = """
SELECT r.rolname
  FROM pg_roles r
 WHERE r.rolname = $1
   AND pg_has_role(current_user, r.oid, 'MEMBER')
   AND has_schema_privilege(r.oid, current_schema(), 'CREATE')
"""


def normalise(text: str) -> str:
    """The text a checksum is taken over: LF line ends, no trailing blanks or blank lines.

    Line-ending and trailing-whitespace changes (an editor's, a checkout's) do not count as
    edits; anything else does.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def checksum(text: str) -> str:
    """SHA-256 (hex) of the normalised text of a migration file."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file, parsed."""

    version: int
    name: str
    path: Path
    up: tuple[Statement, ...]
    down: tuple[Statement, ...] | None
    transactional: bool
    checksum: str
    namespace: str = CHATKEEP_NAMESPACE
    citus: tuple[Statement, ...] = ()  # run after ``up`` on Citus only
    citus_up: tuple[Statement, ...] | None = None  # ``up`` without its plain-only regions
    citus_ready: bool = False  # has a Citus part (inline, possibly empty, or attached)

    def up_on(self, citus: bool) -> tuple[Statement, ...]:
        """The up statements to run on plain PostgreSQL or on Citus.

        On Citus: without the plain-only regions, then the Citus part.
        """
        if not citus:
            return self.up
        return (self.up if self.citus_up is None else self.citus_up) + self.citus

    @property
    def label(self) -> str:
        """``NNN_name``, as the file is called without ``.sql``."""
        return self.path.stem

    @property
    def display(self) -> str:
        """The file name, after ``namespace:`` for an application's migration."""
        return _qualified(self.namespace, self.path.name)


def _qualified(namespace: str, text: str) -> str:
    return text if namespace == CHATKEEP_NAMESPACE else f"{namespace}:{text}"


@dataclass(frozen=True, slots=True)
class MigrationLocation:
    """An application's folder of migrations and the history namespace they are kept under.

    Its files are numbered from 1 on their own (``001_create_orders.sql``) and applied after
    chatkeep's, so they may reference chatkeep's tables.
    """

    namespace: str
    path: Path

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise InvalidInput(
                "namespace",
                "must be lower-case letters, digits and _, starting with a letter",
                f"migration namespace {self.namespace!r} must be lower-case letters, digits "
                "and _, starting with a letter",
            )
        if self.namespace == CHATKEEP_NAMESPACE:
            raise InvalidInput(
                "namespace",
                "is reserved for chatkeep's own migrations",
                "migration namespace 'chatkeep' is chatkeep's own: name the location NAME=DIR",
            )

    @classmethod
    def parse(cls, spec: str | Path | MigrationLocation) -> MigrationLocation:
        """A location from ``NAME=DIR``, or from ``DIR`` and named after its folder.

        A folder called ``migrations`` is named after its parent: ``myapp/migrations`` is
        namespace ``myapp``.
        """
        if isinstance(spec, MigrationLocation):
            return spec
        text = str(spec)
        name, sep, folder = text.partition("=")
        if sep and _NAMESPACE.match(name):
            return cls(name, Path(folder))
        path = Path(text)
        resolved = path.resolve()
        name = resolved.parent.name if resolved.name == "migrations" else resolved.name
        return cls(name.lower().replace("-", "_"), path)


def _parse(path: Path, version: int, name: str, namespace: str) -> Migration:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MigrationError(f"{path.name}: cannot be read as UTF-8 text ({exc})") from exc
    markers = list(_MARKER.finditer(text))
    kinds = [m.group(1) for m in markers]
    if kinds.count("up") != 1:
        raise MigrationError(f"{path.name}: needs exactly one '-- chatkeep:up' line")
    if kinds.count("down") > 1:
        raise MigrationError(f"{path.name}: has more than one '-- chatkeep:down' line")
    if kinds.count("citus") > 1:
        raise MigrationError(f"{path.name}: has more than one '-- chatkeep:citus' line")
    up_marker = next(m for m in markers if m.group(1) == "up")
    down_marker = next((m for m in markers if m.group(1) == "down"), None)
    no_tx = [m for m in markers if m.group(1) == "no-transaction"]
    if any(m.start() > up_marker.start() for m in no_tx):
        raise MigrationError(
            f"{path.name}: '-- chatkeep:no-transaction' must come before '-- chatkeep:up'"
        )
    if down_marker is not None and down_marker.start() < up_marker.start():
        raise MigrationError(f"{path.name}: the down part must follow the up part")
    citus_marker = next((m for m in markers if m.group(1) == "citus"), None)
    if citus_marker is not None and not (
        up_marker.start() < citus_marker.start()
        and (down_marker is None or citus_marker.start() < down_marker.start())
    ):
        raise MigrationError(f"{path.name}: the citus part must come between up and down")

    def statements(start: int, end: int) -> tuple[Statement, ...]:
        # Keep line numbers relative to the whole file: pad with the newlines before start.
        padding = "\n" * text.count("\n", 0, start)
        return tuple(split_statements(padding + text[start:end]))

    up_end = down_marker.start() if down_marker else len(text)
    citus: tuple[Statement, ...] = ()
    if citus_marker is not None:
        citus = statements(citus_marker.end(), up_end)
        up_end = citus_marker.start()
    up = statements(up_marker.end(), up_end)
    down = statements(down_marker.end(), len(text)) if down_marker else None
    if not up:
        raise MigrationError(f"{path.name}: the up part has no statements")
    citus_up = _without_plain_only(path, text, up, up_marker.end(), up_end)
    transactional = not no_tx
    if transactional:
        for part in (up, down or ()):
            for stmt in part:
                if _NEEDS_NO_TRANSACTION.search(code_only(stmt.sql)):
                    raise MigrationError(
                        f"{path.name}, line {stmt.line}: this statement cannot run inside a "
                        "transaction; put it in its own file marked "
                        f"'-- chatkeep:no-transaction': {stmt.summary(80)}"
                    )
    return Migration(
        version,
        name,
        path,
        up,
        down,
        transactional,
        checksum(text),
        namespace,
        citus,
        citus_up,
        citus_marker is not None,
    )


CITUS_BASELINE: Final = 12
"""chatkeep's migrations up to this version run on Citus through 012's attached Citus part;
each later one must carry a ``-- chatkeep:citus`` part of its own (empty when it runs on
Citus unchanged), or ``migrate up`` refuses it on Citus."""


def _refuse_without_citus_part(plan: Sequence[Migration], shipped: Sequence[Migration]) -> None:
    """Refuse, before anything runs, a chatkeep migration without a Citus part.

    Only on Citus, and only after :data:`CITUS_BASELINE`.
    """
    missing = [
        m
        for m in plan
        if m.namespace == CHATKEEP_NAMESPACE and m.version > CITUS_BASELINE and not m.citus_ready
    ]
    if not missing:
        return
    first = missing[0]
    ready = [
        m.version
        for m in shipped
        if m.namespace == CHATKEEP_NAMESPACE and m.version < first.version
    ]
    last = max(ready, default=0)
    raise MigrationError(
        f"{first.display} has no '-- chatkeep:citus' part, so it cannot run on Citus "
        f"(docs/scaling.md lists what is left); migrate up --to {last} applies what Citus "
        "supports; nothing was applied"
    )


def _without_plain_only(
    path: Path, text: str, up: tuple[Statement, ...], start: int, end: int
) -> tuple[Statement, ...] | None:
    """``up`` without the statements of its plain-only regions (``None``: it has none)."""
    regions: list[tuple[int, int]] = []
    opened: int | None = None
    for found in _PLAIN_ONLY.finditer(text):
        line = text.count("\n", 0, found.start()) + 1
        if not start <= found.start() < end:
            raise MigrationError(
                f"{path.name}, line {line}: a plain-only region must lie inside the up part"
            )
        if found.group(1) == "plain-only":
            if opened is not None:
                raise MigrationError(f"{path.name}, line {line}: plain-only regions do not nest")
            opened = line
        else:
            if opened is None:
                raise MigrationError(
                    f"{path.name}, line {line}: '-- chatkeep:end-plain-only' without a "
                    "'-- chatkeep:plain-only' before it"
                )
            regions.append((opened, line))
            opened = None
    if opened is not None:
        raise MigrationError(
            f"{path.name}, line {opened}: '-- chatkeep:plain-only' is never ended "
            "('-- chatkeep:end-plain-only')"
        )
    if not regions:
        return None
    return tuple(s for s in up if not any(a < s.line < b for a, b in regions))


def load_migrations(
    directory: Path | None = None, *, namespace: str = CHATKEEP_NAMESPACE
) -> list[Migration]:
    """Read and check every migration file in ``directory`` (default: the shipped ones).

    Raises:
        MigrationError: a file is malformed or a statement needs a no-transaction file.
        MigrationOrderError: two files share a version.
    """
    directory = directory or DEFAULT_MIGRATIONS_DIR
    if not directory.is_dir():
        raise MigrationError(
            _qualified(namespace, f"migrations directory {directory} does not exist")
        )
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNN_lower_snake_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationOrderError(
                f"duplicate version {version}: {found[version].path.name} and {path.name}"
            )
        found[version] = _parse(path, version, match.group(2), namespace)
    _attach_citus_parts(directory / "citus", found)
    return [found[v] for v in sorted(found)]


def _attach_citus_parts(directory: Path, found: dict[int, Migration]) -> None:
    """Give each migration its Citus part from ``citus/NNN_name.sql`` (its up part)."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        match = _FILE_NAME.match(path.name)
        if path.suffix != ".sql" or not match:
            continue
        version = int(match.group(1))
        migration = found.get(version)
        if migration is None:
            raise MigrationError(f"citus/{path.name}: no migration has version {version}")
        if migration.citus:
            raise MigrationError(
                f"citus/{path.name}: {migration.path.name} has a citus part of its own"
            )
        part = _parse(path, version, match.group(2), migration.namespace)
        found[version] = replace(migration, citus=part.up, citus_ready=True)


def load_locations(
    locations: Sequence[MigrationLocation | str | Path] = (),
    directory: Path | None = None,
) -> list[Migration]:
    """Every migration ``up`` knows of, in the order it applies them.

    chatkeep's (from ``directory``, default the shipped ones) first, then each location's
    in the order given.

    Raises:
        MigrationError: as :func:`load_migrations`, or two locations share a namespace.
        InvalidInput: a namespace is malformed or ``chatkeep``.
    """
    migrations = load_migrations(directory)
    seen: dict[str, Path] = {}
    for spec in locations:
        location = MigrationLocation.parse(spec)
        if location.namespace in seen:
            raise MigrationError(
                f"two migration locations are both namespace {location.namespace!r}: "
                f"{seen[location.namespace]} and {location.path} (name one NAME=DIR)"
            )
        seen[location.namespace] = location.path
        migrations += load_migrations(location.path, namespace=location.namespace)
    return migrations


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """What the history says of one applied version."""

    version: int
    name: str
    checksum: str
    applied_at: datetime
    applied_by: str
    order: int  # history id of the up row: the order versions were applied in
    namespace: str = CHATKEEP_NAMESPACE


@dataclass(frozen=True, slots=True)
class StatusEntry:
    """One line of ``chatkeep migrate status``."""

    version: int
    name: str
    state: MigrationState
    applied_at: datetime | None = None
    applied_by: str | None = None
    namespace: str = CHATKEEP_NAMESPACE

    @property
    def label(self) -> str:
        """``NNN_name``, after ``namespace:`` for an application's migration."""
        return _qualified(self.namespace, f"{self.version:03d}_{self.name}")

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this entry."""
        return {
            "namespace": self.namespace,
            "version": self.version,
            "name": self.name,
            "state": self.state,
            "applied_at": self.applied_at.isoformat() if self.applied_at else None,
            "applied_by": self.applied_by,
        }


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What ``up`` or ``down`` would run, in order, without running it."""

    direction: Literal["up", "down"]
    migrations: tuple[Migration, ...]
    lock_timeout: float
    statement_timeout: float

    def render(self) -> str:
        """The exact SQL the runner would send, file by file, with transaction mode."""
        out: list[str] = []
        for m in self.migrations:
            mode = "transaction" if m.transactional else "no-transaction"
            out.append(f"-- {m.display} ({self.direction}, {mode})")
            stmts = m.up if self.direction == "up" else (m.down or ())
            if m.transactional:
                out.append("BEGIN;")
                out.append(f"SET LOCAL lock_timeout = '{_ms(self.lock_timeout)}';")
                out.append(f"SET LOCAL statement_timeout = '{_ms(self.statement_timeout)}';")
            else:
                out.append(f"SET lock_timeout = '{_ms(self.lock_timeout)}';")
                out.append(f"SET statement_timeout = '{_ms(self.statement_timeout)}';")
            out.extend(f"{s.sql};" for s in stmts)
            out.append(f"-- then: a row in {HISTORY_TABLE} (version {m.version}, {self.direction})")
            out.append(
                "COMMIT;" if m.transactional else "RESET lock_timeout; RESET statement_timeout;"
            )
            out.append("")
        return "\n".join(out)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ms(seconds: float) -> str:
    # At least 1 ms: "0ms" would switch the timeout off.
    return f"{max(1, round(seconds * 1000))}ms"


def _error_line(statement: Statement, exc: BaseException) -> int:
    """The file line an error points at: the server's error position, else the statement's."""
    position = getattr(exc, "position", None)
    try:
        offset = int(position) - 1 if position else -1
    except ValueError:
        offset = -1
    if not 0 <= offset < len(statement.sql):
        return statement.line
    return statement.line + statement.sql.count("\n", 0, offset)


Target = int | str
"""A version to migrate to: ``N`` (chatkeep's), ``"N"`` or ``"namespace:N"``."""


def resolve_target(
    migrations: Sequence[Migration], to: Target, *, what: str = "migration"
) -> tuple[str, int]:
    """``to`` (``N``, ``"N"`` or ``"namespace:N"``) as (namespace, version), checked.

    Version 0 means "before the first" and is always accepted.

    Raises:
        MigrationError: not a version, no such namespace, or no such version in it.
    """
    namespace, version = CHATKEEP_NAMESPACE, to
    if isinstance(to, str):
        ns, sep, number = to.rpartition(":")
        if sep:
            namespace = ns
        try:
            version = int(number)
        except ValueError:
            raise MigrationError(
                f"{to!r} is not a version: give N or namespace:N (e.g. 9 or myapp:2)"
            ) from None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise MigrationError(f"{to!r} is not a version: give N or namespace:N (e.g. 9 or myapp:2)")
    namespaces = list(dict.fromkeys([CHATKEEP_NAMESPACE, *(m.namespace for m in migrations)]))
    if namespace not in namespaces:
        raise MigrationError(
            f"no migration location has namespace {namespace!r} "
            f"(registered: {', '.join(namespaces)})"
        )
    known = {m.version for m in migrations if m.namespace == namespace}
    if version != 0 and version not in known:
        raise MigrationError(f"no {what} has version {_qualified(namespace, str(version))}")
    return namespace, version


class Migrator:
    """Applies, reverts and checks migrations over one connection.

    Use :meth:`connect` (it owns the connection) or pass a connection you own::

        async with Migrator.connect(settings) as migrator:
            await migrator.up()

    Args:
        conn: an open connection, as a role that may change the schema.
        migrations: the parsed files (default: ``load_locations(locations, directory)``).
        directory: a folder to use instead of chatkeep's shipped migrations.
        locations: an application's folders of migrations (:class:`MigrationLocation`, or
            ``"NAME=DIR"`` / a path), applied after chatkeep's in the order given, each
            under its own history namespace.
        lock_timeout: seconds to wait for another migrator before giving up.
        statement_lock_timeout: ``lock_timeout`` for each migration statement.
        statement_timeout: ``statement_timeout`` for each migration statement.
        allow_out_of_order: apply an unapplied file older than the newest applied one.
        allow_missing: carry on when an applied file is no longer on disk.
        validate_checksums: refuse to run when an applied file has changed.
        role: the role migrations run as (``SET ROLE`` while the lock is held), so every
            object they create is owned by it; ``None`` runs as the connected user, and
            ``AUTO_ROLE`` (the default) picks ``chatapp_owner`` when ``chatkeep setup`` made
            it and the connected user is a member, else the connected user.
    """

    def __init__(
        self,
        conn: asyncpg.Connection,
        migrations: Sequence[Migration] | None = None,
        *,
        directory: Path | None = None,
        locations: Sequence[MigrationLocation | str | Path] = (),
        lock_timeout: float = 60.0,
        statement_lock_timeout: float = 10.0,
        statement_timeout: float = 600.0,
        allow_out_of_order: bool = False,
        allow_missing: bool = False,
        validate_checksums: bool = True,
        role: str | _AutoRole | None = AUTO_ROLE,
    ) -> None:
        for field_name, seconds in (
            ("lock_timeout", lock_timeout),
            ("statement_lock_timeout", statement_lock_timeout),
            ("statement_timeout", statement_timeout),
        ):
            # Zero would mean "wait forever" to PostgreSQL: the opposite of what is asked.
            if not seconds > 0:
                raise InvalidInput(field_name, "must be greater than 0 seconds")
        self._conn = conn
        self.role = role
        found = migrations if migrations is not None else load_locations(locations, directory)
        # chatkeep's first, then each namespace in the order it first appears.
        self.namespaces: tuple[str, ...] = tuple(
            dict.fromkeys([CHATKEEP_NAMESPACE, *(m.namespace for m in found)])
        )
        rank = {ns: i for i, ns in enumerate(self.namespaces)}
        self.migrations: tuple[Migration, ...] = tuple(
            sorted(found, key=lambda m: (rank[m.namespace], m.version))
        )
        self.directory = directory or DEFAULT_MIGRATIONS_DIR
        self.lock_timeout = lock_timeout
        self.statement_lock_timeout = statement_lock_timeout
        self.statement_timeout = statement_timeout
        self.allow_out_of_order = allow_out_of_order
        self.allow_missing = allow_missing
        self.validate_checksums = validate_checksums
        self._dsn: str | None = None
        self._settings: Settings | None = None
        self.citus = False  # known once the lock is held: the database has citus

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        settings: Settings,
        *,
        database_url: str | None = None,
        directory: Path | None = None,
        locations: Sequence[MigrationLocation | str | Path] | None = None,
        **options: Any,
    ) -> AsyncIterator[Migrator]:
        """Open a connection (``database_url``, else the migrate URL) and yield a runner.

        ``locations`` defaults to the settings' ``migration_locations``.
        """
        dsn = database_url or _settings_migrate_url(settings)
        if locations is None:
            locations = settings.migration_locations
        migrations = load_locations(locations, directory)
        conn = await connect(
            dsn, settings, application_name="chatkeep-migrate", operation="migrate"
        )
        try:
            options.setdefault("lock_timeout", settings.migrate_lock_timeout)
            options.setdefault("statement_lock_timeout", settings.migrate_statement_lock_timeout)
            options.setdefault("statement_timeout", settings.migrate_statement_timeout)
            migrator = cls(conn, migrations, directory=directory, **options)
            migrator._dsn, migrator._settings = dsn, settings
            yield migrator
        finally:
            await asyncio.shield(conn.close())

    # -- reading state -------------------------------------------------------------------

    async def _history_exists(self) -> bool:
        found = await self._conn.fetchval("SELECT to_regclass($1) IS NOT NULL", HISTORY_TABLE)
        return bool(found)

    async def _read_history(self) -> dict[tuple[str, int], AppliedMigration]:
        """The applied migrations by (namespace, version), replaying ups, downs, repairs."""
        applied: dict[tuple[str, int], AppliedMigration] = {}
        (shape,) = await self._conn.fetch(_HISTORY_SHAPE)
        if not shape["present"]:
            return applied
        query = _READ_HISTORY if shape["namespaced"] else _READ_OLD_HISTORY
        for row in await self._conn.fetch(query):
            key = (row["namespace"], row["version"])
            if row["direction"] == "up":
                applied[key] = AppliedMigration(
                    row["version"],
                    row["name"],
                    row["checksum"],
                    row["finished_at"],
                    row["db_user"],
                    row["id"],
                    row["namespace"],
                )
            elif row["direction"] == "down":
                applied.pop(key, None)
            elif key in applied:  # repair: the file's new text is accepted
                old = applied[key]
                applied[key] = AppliedMigration(
                    old.version,
                    old.name,
                    row["checksum"],
                    old.applied_at,
                    old.applied_by,
                    old.order,
                    old.namespace,
                )
        return applied

    def _classify(
        self, applied_by_key: dict[tuple[str, int], AppliedMigration]
    ) -> list[StatusEntry]:
        by_key = {(m.namespace, m.version): m for m in self.migrations}
        newest_applied: dict[str, int] = {}
        for ns, version in applied_by_key:
            newest_applied[ns] = max(version, newest_applied.get(ns, 0))
        # Namespaces registered here first, in their order; then any only the history knows
        # (an application's whose location was not given: listed, never judged).
        namespaces = list(dict.fromkeys([*self.namespaces, *sorted(newest_applied)]))
        entries: list[StatusEntry] = []
        for ns in namespaces:
            registered = ns in self.namespaces
            versions = {v for n, v in by_key if n == ns} | {v for n, v in applied_by_key if n == ns}
            for version in sorted(versions):
                applied = applied_by_key.get((ns, version))
                migration = by_key.get((ns, version))
                name = migration.name if migration else applied.name if applied else "?"
                state: MigrationState
                if applied is None:
                    state = "out-of-order" if version < newest_applied.get(ns, 0) else "pending"
                elif not registered:
                    state = "applied"
                elif migration is None:
                    state = "missing"
                elif applied.checksum != migration.checksum:
                    state = "changed"
                else:
                    state = "applied"
                entries.append(
                    StatusEntry(
                        version,
                        name,
                        state,
                        applied.applied_at if applied else None,
                        applied.applied_by if applied else None,
                        ns,
                    )
                )
        return entries

    async def status(self) -> list[StatusEntry]:
        """Every known version with its state; reads only, takes no lock.

        chatkeep's come first, then each registered location's; a namespace only the
        history knows (its location was not registered) is listed as applied, unchecked.
        """
        with translate_errors("migrate status"):
            return self._classify(await self._read_history())

    def _check(self, entries: list[StatusEntry]) -> None:
        changed = [e for e in entries if e.state == "changed"]
        if changed and self.validate_checksums:
            first = changed[0]
            repair = _qualified(first.namespace, str(first.version))
            raise ChecksumMismatch(
                f"{first.label}.sql was edited after it was applied "
                "(its checksum differs from the history). Restore the file, or run "
                f"`chatkeep migrate repair {repair}` if the change is deliberate",
                version=first.version,
            )
        missing = [e for e in entries if e.state == "missing"]
        if missing and not self.allow_missing:
            names = ", ".join(e.label for e in missing)
            raise MigrationOrderError(
                f"applied migrations missing from {self.directory}: {names} "
                "(pass allow_missing / --allow-missing to carry on)"
                if all(e.namespace == CHATKEEP_NAMESPACE for e in missing)
                else f"applied migrations missing from their folders: {names} "
                "(pass allow_missing / --allow-missing to carry on)"
            )
        late = [e for e in entries if e.state == "out-of-order"]
        if late and not self.allow_out_of_order:
            names = ", ".join(e.label for e in late)
            raise MigrationOrderError(
                f"unapplied migrations older than the newest applied one: {names} "
                "(pass allow_out_of_order / --allow-out-of-order to apply them)"
            )

    def target(self, to: Target, *, what: str = "migration") -> tuple[str, int]:
        """``to`` as (namespace, version): :func:`resolve_target` over these migrations."""
        return resolve_target(self.migrations, to, what=what)

    async def plan_up(self, to: Target | None = None) -> MigrationPlan:
        """The migrations ``up(to)`` would apply now, in order.

        Up to ``namespace:N``: every pending migration of the namespaces before it (they
        come first), and its own pending ones numbered N or below.
        """
        target = self.target(to) if to is not None else None
        with translate_errors("migrate plan"):
            entries = self._classify(await self._read_history())
        self._check(entries)
        pending = {
            (e.namespace, e.version) for e in entries if e.state in ("pending", "out-of-order")
        }
        rank = {ns: i for i, ns in enumerate(self.namespaces)}

        def wanted(m: Migration) -> bool:
            if target is None:
                return True
            ns, version = target
            return rank[m.namespace] < rank[ns] or (m.namespace == ns and m.version <= version)

        chosen = tuple(
            m for m in self.migrations if (m.namespace, m.version) in pending and wanted(m)
        )
        return MigrationPlan("up", chosen, self.statement_lock_timeout, self.statement_timeout)

    async def plan_down(
        self, *, to: Target | None = None, steps: int | None = None
    ) -> MigrationPlan:
        """The migrations ``down`` would revert now, newest-applied first.

        Down to ``namespace:N`` reverts its versions above N and, first, whatever later
        locations applied after the earliest of them (they may depend on it).
        """
        if to is not None and steps is not None:
            raise MigrationError("give either a target version or a number of steps, not both")
        if steps is not None and steps < 0:
            raise MigrationError("steps must be zero or more")
        target = self.target(to) if to is not None else None
        with translate_errors("migrate plan"):
            applied_by_key = await self._read_history()
        entries = self._classify(applied_by_key)
        self._check(entries)
        by_key = {(m.namespace, m.version): m for m in self.migrations}
        applied = sorted(applied_by_key.values(), key=lambda a: a.order, reverse=True)
        if target is not None:
            ns, version = target
            rank = {n: i for i, n in enumerate(self.namespaces)}
            own = [a for a in applied if a.namespace == ns and a.version > version]
            first = min((a.order for a in own), default=None)
            targets = [
                a
                for a in applied
                if a in own
                or (
                    first is not None
                    and a.order > first
                    and rank.get(a.namespace, len(rank)) > rank[ns]
                )
            ]
        else:
            targets = applied[: 1 if steps is None else steps]
        chosen: list[Migration] = []
        for found in targets:
            migration = by_key.get((found.namespace, found.version))
            if migration is None:
                label = _qualified(found.namespace, f"{found.version:03d}_{found.name}")
                raise MigrationError(f"cannot revert {label}: its file is missing")
            if migration.down is None or not migration.down:
                raise MigrationError(
                    f"cannot revert {migration.display}: it has no down part; nothing was reverted"
                )
            chosen.append(migration)
        return MigrationPlan(
            "down", tuple(chosen), self.statement_lock_timeout, self.statement_timeout
        )

    # -- running -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the migration advisory lock, polling for it with jittered backoff."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        with translate_errors("migrate lock"):
            while not await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
                if time.monotonic() >= deadline:
                    raise MigrationLockTimeout(
                        f"another migrator held the migration lock for over {self.lock_timeout:g}s"
                        " (see pg_locks for locktype 'advisory'); nothing was applied"
                    )
                logger.info(
                    "migration lock busy; waiting %.2fs",
                    delay,
                    extra={"operation": "migrate.lock", "wait_ms": round(delay * 1000)},
                )
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311
                delay = min(delay * 2, 1.0)
        try:
            with translate_errors("migrate"):
                role = await self._resolve_role()
                if role is not None:
                    # Session-wide, not per file: the history table and its rows belong to
                    # the owner too, so any of its members can migrate next time.
                    await self._conn.execute(f"SET ROLE {_quote_ident(role)}")
                # Only when missing (safe: the lock is held): CREATE OR REPLACE on every run
                # would rewrite the catalog each time and need ownership of the function.
                self.citus = await is_citus(self._conn)
                (shape,) = await self._conn.fetch(_HISTORY_SHAPE)
                if not shape["present"]:
                    await self._conn.execute(_HISTORY_DDL)
                elif not shape["namespaced"]:
                    await self._conn.execute(_ADD_NAMESPACE)
            yield
        finally:
            if not self._conn.is_closed():
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await asyncio.shield(self._conn.execute("RESET ROLE"))
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await asyncio.shield(
                        self._conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
                    )

    async def _resolve_role(self) -> str | None:
        if self.role is AUTO_ROLE:
            found: str | None = await self._conn.fetchval(_OWNER_ROLE_USABLE, OWNER_ROLE)
            return found
        return self.role

    async def up(self, to: Target | None = None) -> list[Migration]:
        """Apply pending migrations (up to and including ``to``); returns what was applied.

        Raises:
            ChecksumMismatch, MigrationOrderError: the history and the files disagree.
            MigrationLockTimeout: another migrator held the lock too long.
            MigrationFailed: a statement failed; its file left nothing behind.
        """
        async with self._locked():
            plan = await self.plan_up(to)  # re-read after the lock: another may have run
            if self.citus:
                _refuse_without_citus_part(plan.migrations, self.migrations)
            for migration in plan.migrations:
                await self._run(migration, "up")
            return list(plan.migrations)

    async def down(self, *, to: Target | None = None, steps: int | None = None) -> list[Migration]:
        """Revert applied migrations, newest-applied first.

        Reverts ``steps`` of them (default 1) or all above version ``to``. Refuses, before
        reverting anything, if one lacks a down part.
        """
        async with self._locked():
            plan = await self.plan_down(to=to, steps=steps)
            distributed = [m.display for m in plan.migrations if m.citus and self.citus]
            if distributed:
                raise MigrationError(
                    f"cannot revert {distributed[0]} on Citus: its tables are distributed "
                    "(restore a backup instead); nothing was reverted"
                )
            for migration in plan.migrations:
                await self._run(migration, "down")
            return list(plan.migrations)

    async def repair(self, version: Target) -> None:
        """Accept the current text of applied migration ``version`` (record its new checksum)."""
        key = self.target(version, what="migration file")
        # target() found the version: 0 is the one it lets through, and no file has it.
        migration = next((m for m in self.migrations if (m.namespace, m.version) == key), None)
        if migration is None:
            raise MigrationError(f"no migration file has version {_qualified(*map(str, key))}")
        async with self._locked():
            if key not in await self._read_history():
                raise MigrationError(f"{migration.display} is not applied; nothing to repair")
            with translate_errors("migrate repair"):
                started = await self._conn.fetchval("SELECT clock_timestamp()")
                await self._conn.execute(
                    _INSERT_HISTORY,
                    migration.version,
                    migration.name,
                    migration.checksum,
                    "repair",
                    migration.transactional,
                    started,
                    "success",
                    None,
                    migration.namespace,
                )
            logger.info(
                "repaired %s: checksum %s accepted", migration.label, migration.checksum[:12]
            )

    async def _run(self, migration: Migration, direction: Literal["up", "down"]) -> None:
        up = direction == "up"
        statements = migration.up_on(self.citus) if up else (migration.down or ())
        conn = self._conn
        started = time.monotonic()
        with translate_errors("migrate"):
            started_at = await conn.fetchval("SELECT clock_timestamp()")
        logger.debug(
            "migrate %s %s (%s)",
            direction,
            migration.label,
            "transaction" if migration.transactional else "no-transaction",
        )
        current: Statement | None = None

        async def apply() -> None:
            # The statements, then their success in the history: inside the file's
            # transaction when it has one, so the record and the change commit together.
            nonlocal current
            for current in statements:
                await conn.execute(current.sql)
            current = None
            await conn.execute(
                _INSERT_HISTORY,
                migration.version,
                migration.name,
                migration.checksum,
                direction,
                migration.transactional,
                started_at,
                "success",
                None,
                migration.namespace,
            )

        timeouts = (
            f"lock_timeout = '{_ms(self.statement_lock_timeout)}';"
            f"SET {'LOCAL ' if migration.transactional else ''}"
            f"statement_timeout = '{_ms(self.statement_timeout)}'"
        )
        try:
            if migration.transactional:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL {timeouts}")
                    if self.citus:
                        # One connection per worker for the whole file: Citus refuses a
                        # function's DDL after a parallel change to a distributed table in
                        # the same transaction (015 adds a column, then replaces functions).
                        await conn.execute("SET LOCAL citus.multi_shard_modify_mode = sequential")
                    await apply()
            else:
                await conn.execute(f"SET {timeouts}")
                try:
                    await apply()
                finally:
                    await conn.execute("RESET lock_timeout; RESET statement_timeout")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            where = f", line {_error_line(current, exc)}" if current else ""
            what = f": {current.summary(200)}" if current else ""
            detail = f"{exc.__class__.__name__}: {exc}"
            kept = (
                ""
                if migration.transactional
                else (" (no-transaction file: statements before this one stay applied)")
            )
            await self._record_failure(migration, direction, started_at, detail)
            raise MigrationFailed(
                f"{migration.display}{where} failed ({direction}): {detail}{what}{kept}",
                version=migration.version,
                statement=current.sql if current else None,
            ) from exc
        took = (time.monotonic() - started) * 1000
        logger.info(
            "migrated %s %s in %.1f ms",
            direction,
            migration.label,
            took,
            extra={
                "operation": f"migrate.{direction}",
                "duration_ms": round(took, 3),
                "version": migration.version,
            },
        )

    async def _record_failure(
        self, migration: Migration, direction: str, started_at: datetime, detail: str
    ) -> None:
        # The file's transaction is gone; the failure is recorded on its own.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await self._conn.execute(
                _INSERT_HISTORY,
                migration.version,
                migration.name,
                migration.checksum,
                direction,
                migration.transactional,
                started_at,
                "failed",
                detail[:2000],
                migration.namespace,
            )

    async def verify(self) -> list[str]:
        """Round-trip every migration in a scratch copy: up, snapshot, down, compare, up.

        Works in a new, empty database on the same server (so the target is never touched)
        that is dropped afterwards; needs the CREATEDB privilege.

        Returns:
            One line per migration checked.

        Raises:
            MigrationError: a migration's down part does not restore the schema before it,
                or its up part does not apply the same way twice.
        """
        if self._dsn is None or self._settings is None:
            raise MigrationError("verify needs a Migrator opened with Migrator.connect()")
        scratch = f"chatkeep_verify_{int(time.time() * 1000)}_{random.randrange(10**6)}"  # noqa: S311
        with translate_errors("migrate verify"):
            await self._conn.execute(f'CREATE DATABASE "{scratch}"')
        report: list[str] = []
        try:
            scratch_conn = await connect(
                maintenance_url(self._dsn, scratch),
                self._settings,
                application_name="chatkeep-verify",
                operation="migrate verify",
            )
            try:
                runner = Migrator(
                    scratch_conn,
                    self.migrations,
                    directory=self.directory,
                    statement_lock_timeout=self.statement_lock_timeout,
                    statement_timeout=self.statement_timeout,
                )
                async with runner._locked():
                    for migration in self.migrations:
                        label = _qualified(migration.namespace, migration.label)
                        before = await catalog.snapshot(scratch_conn)
                        await runner._run(migration, "up")
                        after_up = await catalog.snapshot(scratch_conn)
                        if migration.down is None:
                            report.append(f"{label}: up ok (no down part)")
                            continue
                        await runner._run(migration, "down")
                        diff = catalog.diff_snapshots(before, await catalog.snapshot(scratch_conn))
                        if diff:
                            raise MigrationError(
                                f"{migration.display}: down does not restore the schema:\n"
                                + "\n".join(diff[:40])
                            )
                        await runner._run(migration, "up")
                        diff = catalog.diff_snapshots(
                            after_up, await catalog.snapshot(scratch_conn)
                        )
                        if diff:
                            raise MigrationError(
                                f"{migration.display}: up gives a different schema the "
                                "second time:\n" + "\n".join(diff[:40])
                            )
                        report.append(f"{label}: up, down, up ok")
            finally:
                await scratch_conn.close()
        finally:
            # A cancelled verify must not leave its scratch database behind: the DROP
            # runs to its end before the cancellation goes on.
            drop = asyncio.ensure_future(
                self._conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            )
            with translate_errors("migrate verify"):
                try:
                    await asyncio.shield(drop)
                except asyncio.CancelledError:
                    await asyncio.wait([drop])
                    raise
        return report


def _settings_migrate_url(settings: Settings) -> str:
    secret = settings.migrate_database_url or settings.database_url
    if secret is None:
        raise MigrationError(
            "no database to migrate: set DATABASE_URL (the command-line tool starts the "
            "embedded server itself)"
        )
    return secret.get_secret_value()


async def migrate_up(
    settings: Settings,
    *,
    database_url: str | None = None,
    directory: Path | None = None,
    locations: Sequence[MigrationLocation | str | Path] | None = None,
) -> list[Migration]:
    """Apply every pending migration; for applications that migrate at startup.

    Safe to call from several processes at once: one applies, the others wait and find
    nothing left to do.

    Args:
        settings: the migrate URL (``migrate_database_url``, else ``database_url``) and the
            ``migrate_*`` timeouts.
        database_url: a URL to use instead of the settings' one.
        directory: a folder of migration files instead of the shipped ones.
        locations: the application's own folders of migrations, applied after chatkeep's
            (default: the settings' ``migration_locations``).

    Returns:
        The migrations this call applied (empty when the schema was already current).

    Raises:
        MigrationError: the files and the history disagree, the lock was not free in time,
            or a migration failed (its subclasses say which).
        Unavailable, ConfigurationError: the database cannot be reached or the URL is wrong.
    """
    async with Migrator.connect(
        settings, database_url=database_url, directory=directory, locations=locations
    ) as migrator:
        return await migrator.up()
