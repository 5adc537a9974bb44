"""``chatkeep migrate ...``: the migration runner on the command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from rich.table import Table

from chatkeep.cli._common import (
    EXIT_USAGE,
    DatabaseUrlOption,
    LocationOption,
    MigrationsDirOption,
    console,
    endpoints,
    fail,
    load_settings,
    run,
    show_table,
)
from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, InvalidInput, MigrationError
from chatkeep.storage.migrate import (
    Migration,
    MigrationLocation,
    Migrator,
    StatusEntry,
    load_locations,
    resolve_target,
)

T = TypeVar("T")

app = typer.Typer(
    name="migrate",
    help="Apply, revert and check the schema migrations.",
    no_args_is_help=True,
)

AllowOutOfOrder = Annotated[
    bool, typer.Option("--allow-out-of-order", help="Apply files older than the newest applied.")
]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="Carry on when an applied file is gone.")
]

# Exit codes of `status --exit-code`.
EXIT_PENDING: Final = 1
EXIT_PROBLEM: Final = 3

# Squawk rules we turn off, and why (docs/design.md repeats this):
#  - require-lock-timeout / require-statement-timeout: the runner sets both for every file.
#  - prefer-robust-stmts: a transactional file is all-or-nothing, so IF NOT EXISTS would only
#    hide drift; it stays on for no-transaction files, which can stop half-way.
_SQUAWK_EXCLUDE_UP: Final = ("require-lock-timeout", "require-statement-timeout")
_SQUAWK_EXCLUDE_DOWN: Final = (
    *_SQUAWK_EXCLUDE_UP,
    "prefer-robust-stmts",
    "ban-drop-table",
    "ban-drop-column",
    "ban-drop-function",
    "ban-drop-type",
    "ban-drop-view",
    "require-concurrent-index-deletion",
)


# A version on the command line: N for chatkeep's, NAME:N for a location's.
TargetOption = Annotated[
    str | None,
    typer.Option(
        "--to",
        help="Stop after this version: N (chatkeep's) or NAME:N (a location's; chatkeep's "
        "and earlier locations' come first).",
        show_default=False,
    ),
]


def _locations(settings: Settings, location: list[str] | None) -> tuple[MigrationLocation, ...]:
    """--location if given, else CHATKEEP_MIGRATION_LOCATIONS; a bad one is a usage error."""
    try:
        return tuple(
            MigrationLocation.parse(spec) for spec in location or settings.migration_locations
        )
    except InvalidInput as exc:
        fail(str(exc), code=EXIT_USAGE)


def _load(
    settings: Settings, migrations_dir: Path | None, location: list[str] | None
) -> tuple[tuple[MigrationLocation, ...], list[Migration]]:
    """The locations and every migration file, read and checked before any server starts."""
    locations = _locations(settings, location)
    try:
        return locations, load_locations(locations, migrations_dir)
    except ChatkeepError as exc:
        fail(str(exc))


def _with_migrator(
    database_url: str | None,
    migrations_dir: Path | None,
    action: Callable[[Migrator], Awaitable[T]],
    *,
    location: list[str] | None = None,
    admin: bool = False,
    to: str | None = None,
    **options: Any,
) -> T:
    settings = load_settings(database_url)
    locations, migrations = _load(settings, migrations_dir, location)
    if to is not None:
        # A --to version is checked against the files before a server starts.
        try:
            resolve_target(migrations, to)
        except MigrationError as exc:
            fail(str(exc), code=EXIT_USAGE)
    with endpoints(settings, redis=False, migrate_only=True) as found:
        url = found.admin_database_url if admin else found.migrate_database_url

        async def go() -> T:
            async with Migrator.connect(
                settings,
                database_url=url,
                directory=migrations_dir,
                locations=locations,
                **options,
            ) as migrator:
                return await action(migrator)

        return run(go())


def _report(done: list[Migration], verb: str, past: str) -> None:
    if not done:
        console.print(f"nothing to {verb}: the database is up to date")
        return
    for m in done:
        console.print(f"[green]{verb}[/] {m.display}")
    console.print(f"{len(done)} migration(s) {past}")


@app.command()
def up(
    to: TargetOption = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Apply pending migrations, in order, each in its own transaction.

    chatkeep's come first, then each location's. With --to, every pending migration at or
    below the target is applied (an earlier one left pending by a `down` included), and
    any still pending above it are listed.
    """

    async def apply(m: Migrator) -> tuple[list[Migration], list[StatusEntry]]:
        done = await m.up(to)
        left = [e for e in await m.status() if e.state in ("pending", "out-of-order")]
        return done, left

    done, left = _with_migrator(
        database_url,
        migrations_dir,
        apply,
        location=location,
        to=to,
        allow_out_of_order=allow_out_of_order,
        allow_missing=allow_missing,
    )
    for m in done:
        console.print(f"[green]apply[/] {m.display}")
    if done:
        console.print(f"{len(done)} migration(s) applied")
    if not left:
        if not done:
            console.print("nothing to apply: the database is up to date")
        return
    names = ", ".join(e.label for e in left)
    if not done:
        console.print(
            f"nothing to apply up to version {to}: every migration at or below it is applied"
        )
    above = f" above version {to}" if to is not None else ""
    console.print(
        f"[yellow]still pending{above}:[/] {names} (run `chatkeep migrate up` to apply them)"
    )


@app.command()
def down(
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Revert everything applied above this version: N or NAME:N (later "
            "locations' migrations applied after it are reverted first).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("-n", "--steps", min=0, help="How many to revert (default 1)."),
    ] = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Revert applied migrations, newest-applied first (refuses if a down part is missing)."""
    if to is not None and steps is not None:
        fail("give --to or -n, not both", code=EXIT_USAGE)
    done = _with_migrator(
        database_url,
        migrations_dir,
        lambda m: m.down(to=to, steps=steps),
        location=location,
        to=to,
        allow_out_of_order=allow_out_of_order,
        allow_missing=allow_missing,
    )
    _report(done, "revert", "reverted")


_STATE_STYLE: Final = {
    "applied": "green",
    "pending": "yellow",
    "changed": "bold red",
    "missing": "bold red",
    "out-of-order": "bold red",
}


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    exit_code: Annotated[
        bool,
        typer.Option(
            "--exit-code",
            help=f"Exit {EXIT_PENDING} if migrations are pending, {EXIT_PROBLEM} if the "
            "history and the files disagree (changed, missing, out of order).",
        ),
    ] = False,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
) -> None:
    """Show every migration and whether it is applied, pending, changed or missing."""
    entries: list[StatusEntry] = _with_migrator(
        database_url, migrations_dir, lambda m: m.status(), location=location
    )
    if as_json:
        sys.stdout.write(json.dumps([e.as_json() for e in entries], indent=2) + "\n")
    else:
        table = Table("namespace", "version", "name", "state", "applied at", "by")
        for e in entries:
            style = _STATE_STYLE[e.state]
            table.add_row(
                e.namespace,
                f"{e.version:03d}",
                e.name,
                f"[{style}]{e.state}[/]",
                e.applied_at.strftime("%Y-%m-%d %H:%M:%S %Z") if e.applied_at else "",
                e.applied_by or "",
            )
        show_table(table)
    if exit_code:
        states = {e.state for e in entries}
        if states & {"changed", "missing", "out-of-order"}:
            raise typer.Exit(EXIT_PROBLEM)
        if "pending" in states:
            raise typer.Exit(EXIT_PENDING)


@app.command()
def plan(
    to: TargetOption = None,
    revert: Annotated[
        bool, typer.Option("--down", help="Plan a revert instead (with -n or --down-to).")
    ] = False,
    steps: Annotated[
        int | None, typer.Option("-n", "--steps", min=0, help="Revert this many.")
    ] = None,
    down_to: Annotated[
        str | None,
        typer.Option(
            "--down-to",
            help="Revert everything above this version (N or NAME:N).",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Print the exact SQL and transaction mode that up (or down) would run; runs nothing."""
    flags: dict[str, Any] = {
        "allow_out_of_order": allow_out_of_order,
        "allow_missing": allow_missing,
        "location": location,
    }
    if not revert and (steps is not None or down_to is not None):
        fail("-n and --down-to plan a revert: add --down", code=EXIT_USAGE)
    if revert and to is not None:
        fail("--to plans an up: with --down, use --down-to or -n", code=EXIT_USAGE)
    if revert and down_to is not None and steps is not None:
        fail("give --down-to or -n, not both", code=EXIT_USAGE)
    if revert:
        result = _with_migrator(
            database_url,
            migrations_dir,
            lambda m: m.plan_down(to=down_to, steps=steps),
            to=down_to,
            **flags,
        )
    else:
        result = _with_migrator(
            database_url, migrations_dir, lambda m: m.plan_up(to), to=to, **flags
        )
    if not result.migrations:
        console.print("-- nothing to do")
        return
    sys.stdout.write(result.render())


@app.command()
def verify(
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
) -> None:
    """Round-trip every migration (up, down, up) in a scratch database and compare schemas.

    chatkeep's first, then each location's, as `up` applies them.
    """
    # A scratch database is created and dropped: on the embedded default that takes its
    # superuser (the migrator may not create databases).
    lines = _with_migrator(
        database_url, migrations_dir, lambda m: m.verify(), location=location, admin=True
    )
    for line in lines:
        console.print(f"[green]ok[/] {line}")
    console.print(f"{len(lines)} migration(s) verified")


@app.command()
def repair(
    version: Annotated[
        str,
        typer.Argument(help="The applied version whose file was changed: N or NAME:N."),
    ],
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
) -> None:
    """Accept a deliberate change to an applied file (records its new checksum)."""
    _with_migrator(
        database_url,
        migrations_dir,
        lambda m: m.repair(version),
        location=location,
        to=version,
        validate_checksums=False,
    )
    console.print(f"[green]repaired[/] version {version}: its current text is accepted")


_NEW_NAME: Final = re.compile(r"^[a-z0-9_]+$")
_TEMPLATE: Final = """\
-- {label}: {title}
-- chatkeep:up
-- Runs in one transaction, with lock_timeout and statement_timeout set by the runner;
-- chatkeep's tables (users, rooms, ...) exist already: reference them freely.

-- chatkeep:down
-- Undo the up part exactly: `chatkeep migrate verify` checks that it does.
"""


@app.command("new")
def new_migration(
    name: Annotated[
        str, typer.Argument(help="What it does, in lower_snake_case (e.g. create_orders).")
    ],
    location: Annotated[
        str | None,
        typer.Option(
            "--location",
            help="The folder to write into, DIR or NAME=DIR (default: the one location in "
            "CHATKEEP_MIGRATION_LOCATIONS); made if missing.",
            show_default=False,
        ),
    ] = None,
    migrations_dir: MigrationsDirOption = None,
) -> None:
    """Write the next numbered migration file, with empty up and down parts, and print its path.

    The runner refuses a file whose up part is empty: fill it in before the next `up`.
    """
    if not _NEW_NAME.match(name):
        fail(f"{name!r}: a migration name is lower-case letters, digits and _", code=EXIT_USAGE)
    folder: Path
    if migrations_dir is not None:
        folder = migrations_dir
    else:
        specs = [location] if location else list(load_settings().migration_locations)
        if len(specs) != 1:
            fail(
                "which folder? give --location DIR"
                + (" (CHATKEEP_MIGRATION_LOCATIONS names several)" if specs else ""),
                code=EXIT_USAGE,
            )
        try:
            folder = MigrationLocation.parse(specs[0]).path
        except InvalidInput as exc:
            fail(str(exc), code=EXIT_USAGE)
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m[1]) for p in folder.glob("*.sql") if (m := _FILE_NUMBER.match(p.name))]
    path = folder / f"{max(numbers, default=0) + 1:03d}_{name}.sql"
    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(_TEMPLATE.format(label=path.stem, title=name.replace("_", " ")))
    except FileExistsError:
        fail(f"{path} exists already")
    sys.stdout.write(f"{path}\n")


_FILE_NUMBER: Final = re.compile(r"^(\d+)_")


def _renumber(report: str, path: Path, label: str) -> str:
    """Name the migration file, and count from 1: squawk's gcc reporter counts from 0."""
    position = re.compile(rf"^{re.escape(str(path))}:(\d+):(\d+): ", re.MULTILINE)
    return position.sub(lambda m: f"{label}:{int(m[1]) + 1}:{int(m[2]) + 1}: ", report)


def _squawk() -> str:
    candidate = Path(sys.executable).with_name("squawk")
    found = str(candidate) if candidate.exists() else shutil.which("squawk")
    if found is None:
        fail("squawk is not installed: pip install 'chatkeep[dev]' (or squawk-cli)")
    return found


def lint_files(migrations: list[Migration]) -> tuple[int, str]:
    """Run squawk over each file's up and down parts; returns (exit code, report)."""
    squawk = _squawk()
    reports: list[str] = []
    worst = 0
    with tempfile.TemporaryDirectory(prefix="chatkeep-lint-") as tmp:
        for m in migrations:
            text = m.path.read_text(encoding="utf-8")
            for part, stmts, exclude in (
                ("up", m.up, _SQUAWK_EXCLUDE_UP),
                ("down", m.down or (), _SQUAWK_EXCLUDE_DOWN),
            ):
                if not stmts:
                    continue
                # Keep the file's line numbers: blank lines stand in for the other part.
                lines = [""] * (text.count("\n") + 1)
                for s in stmts:
                    first = s.line - 1
                    for offset, line in enumerate(s.sql.split("\n")):
                        lines[first + offset] = line
                    lines[first + s.sql.count("\n")] += ";"
                if part == "up":  # squawk-ignore comments in the file govern its up part
                    for number, line in enumerate(text.split("\n")):
                        if line.startswith("-- squawk-") and not lines[number]:
                            lines[number] = line
                path = Path(tmp) / f"{m.path.stem}.{part}.sql"
                path.write_text("\n".join(lines), encoding="utf-8")
                args = [squawk, "--reporter", "gcc", "--exclude", ",".join(exclude)]
                if m.transactional:
                    args.append("--assume-in-transaction")
                proc = subprocess.run(  # noqa: S603 - fixed executable, our own files
                    [*args, str(path)], capture_output=True, text=True, check=False
                )
                worst = max(worst, proc.returncode)
                out = _renumber(proc.stdout, path, f"{m.display} ({part})")
                if out.strip():
                    reports.append(out.strip())
    return worst, "\n".join(reports)


@app.command()
def lint(
    migrations_dir: MigrationsDirOption = None,
    location: LocationOption = None,
) -> None:
    """Lint the migration files with squawk (dangerous locks, unsafe changes).

    chatkeep's and each location's.
    """
    _, migrations = _load(load_settings(), migrations_dir, location)
    code, report = lint_files(migrations)
    if report:
        console.print(report, highlight=False, markup=False)
    if code:
        fail(f"squawk found problems in the migrations (exit {code})")
    console.print(f"[green]ok[/] {len(migrations)} migration file(s) pass squawk")
