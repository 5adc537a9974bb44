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
    DatabaseUrlOption,
    MigrationsDirOption,
    console,
    endpoints,
    fail,
    load_settings,
    run,
)
from chatkeep.errors import MigrationError
from chatkeep.storage.migrate import Migration, Migrator, StatusEntry, load_migrations

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
    "require-concurrent-index-deletion",
)


def _with_migrator(
    database_url: str | None,
    migrations_dir: Path | None,
    action: Callable[[Migrator], Awaitable[T]],
    *,
    admin: bool = False,
    **options: Any,
) -> T:
    settings = load_settings(database_url)
    with endpoints(settings, redis=False) as found:
        url = found.admin_database_url if admin else found.migrate_database_url

        async def go() -> T:
            async with Migrator.connect(
                settings,
                database_url=url,
                directory=migrations_dir,
                **options,
            ) as migrator:
                return await action(migrator)

        return run(go())


def _report(done: list[Migration], verb: str, past: str) -> None:
    if not done:
        console.print(f"nothing to {verb}: the database is up to date")
        return
    for m in done:
        console.print(f"[green]{verb}[/] {m.path.name}")
    console.print(f"{len(done)} migration(s) {past}")


@app.command()
def up(
    to: Annotated[int | None, typer.Option("--to", help="Stop after this version.")] = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Apply pending migrations, in version order, each in its own transaction."""
    done = _with_migrator(
        database_url,
        migrations_dir,
        lambda m: m.up(to),
        allow_out_of_order=allow_out_of_order,
        allow_missing=allow_missing,
    )
    _report(done, "apply", "applied")


@app.command()
def down(
    to: Annotated[
        int | None, typer.Option("--to", help="Revert everything applied above this version.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("-n", "--steps", help="How many to revert (default 1).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Revert applied migrations, newest-applied first (refuses if a down part is missing)."""
    if to is not None and steps is not None:
        fail("give --to or -n, not both", code=2)
    done = _with_migrator(
        database_url,
        migrations_dir,
        lambda m: m.down(to=to, steps=steps),
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
) -> None:
    """Show every migration and whether it is applied, pending, changed or missing."""
    entries: list[StatusEntry] = _with_migrator(database_url, migrations_dir, lambda m: m.status())
    if as_json:
        sys.stdout.write(json.dumps([e.as_json() for e in entries], indent=2) + "\n")
    else:
        table = Table("version", "name", "state", "applied at", "by")
        for e in entries:
            style = _STATE_STYLE[e.state]
            table.add_row(
                f"{e.version:03d}",
                e.name,
                f"[{style}]{e.state}[/]",
                e.applied_at.strftime("%Y-%m-%d %H:%M:%S %Z") if e.applied_at else "",
                e.applied_by or "",
            )
        console.print(table)
    if exit_code:
        states = {e.state for e in entries}
        if states & {"changed", "missing", "out-of-order"}:
            raise typer.Exit(EXIT_PROBLEM)
        if "pending" in states:
            raise typer.Exit(EXIT_PENDING)


@app.command()
def plan(
    to: Annotated[int | None, typer.Option("--to", help="Plan up to this version.")] = None,
    revert: Annotated[
        bool, typer.Option("--down", help="Plan a revert instead (with -n or --down-to).")
    ] = False,
    steps: Annotated[int | None, typer.Option("-n", "--steps", help="Revert this many.")] = None,
    down_to: Annotated[
        int | None, typer.Option("--down-to", help="Revert everything above this version.")
    ] = None,
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
    allow_out_of_order: AllowOutOfOrder = False,
    allow_missing: AllowMissing = False,
) -> None:
    """Print the exact SQL and transaction mode that up (or down) would run; runs nothing."""
    flags: dict[str, Any] = {
        "allow_out_of_order": allow_out_of_order,
        "allow_missing": allow_missing,
    }
    if not revert and (steps is not None or down_to is not None):
        fail("-n and --down-to plan a revert: add --down", code=2)
    if revert:
        result = _with_migrator(
            database_url, migrations_dir, lambda m: m.plan_down(to=down_to, steps=steps), **flags
        )
    else:
        result = _with_migrator(database_url, migrations_dir, lambda m: m.plan_up(to), **flags)
    if not result.migrations:
        console.print("-- nothing to do")
        return
    sys.stdout.write(result.render())


@app.command()
def verify(
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
) -> None:
    """Round-trip every migration (up, down, up) in a scratch database and compare schemas."""
    # A scratch database is created and dropped: on the embedded default that takes its
    # superuser (the migrator may not create databases).
    lines = _with_migrator(database_url, migrations_dir, lambda m: m.verify(), admin=True)
    for line in lines:
        console.print(f"[green]ok[/] {line}")
    console.print(f"{len(lines)} migration(s) verified")


@app.command()
def repair(
    version: Annotated[int, typer.Argument(help="The applied version whose file was changed.")],
    database_url: DatabaseUrlOption = None,
    migrations_dir: MigrationsDirOption = None,
) -> None:
    """Accept a deliberate change to an applied file (records its new checksum)."""
    _with_migrator(
        database_url, migrations_dir, lambda m: m.repair(version), validate_checksums=False
    )
    console.print(f"[green]repaired[/] version {version}: its current text is accepted")


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
                out = _renumber(proc.stdout, path, f"{m.path.name} ({part})")
                if out.strip():
                    reports.append(out.strip())
    return worst, "\n".join(reports)


@app.command()
def lint(migrations_dir: MigrationsDirOption = None) -> None:
    """Lint the migration files with squawk (dangerous locks, unsafe changes)."""
    try:
        migrations = load_migrations(migrations_dir)
    except MigrationError as exc:
        fail(str(exc))
    code, report = lint_files(migrations)
    if report:
        console.print(report, highlight=False, markup=False)
    if code:
        fail(f"squawk found problems in the migrations (exit {code})")
    console.print(f"[green]ok[/] {len(migrations)} migration file(s) pass squawk")
