"""The ``chatkeep`` command-line tool.

Every command reads its settings from the environment (``DATABASE_URL``, ``REDIS_URL``,
``CHATKEEP_*``); with none set it starts the embedded servers and keeps their data in
``.chatkeep/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any, Final

import typer
from typer.core import TyperGroup

from chatkeep import __version__
from chatkeep.cli import audit as audit_cli
from chatkeep.cli import dev as dev_cli
from chatkeep.cli import migrate as migrate_cli
from chatkeep.cli._common import err_console, setup_logging
from chatkeep.cli.admin import doctor, schema_app, setup, wait
from chatkeep.cli.demo import demo
from chatkeep.cli.ops import backup, metrics, prune_changes, restore
from chatkeep.cli.seed import seed
from chatkeep.ops import logging as ops_logging

__all__ = ["app", "main"]

# The exit codes every command keeps to; shown by `chatkeep --help` and in docs/cli.md.
EXIT_CODES: Final = (
    "**Exit codes** (every command):\n\n"
    "| code | meaning |\n"
    "|------|---------|\n"
    "| 0 | done |\n"
    "| 1 | the command ran and failed: a server unreachable or refusing, a migration failed, "
    "a `doctor` check failed, `wait` timed out, migrations pending "
    "(`migrate status --exit-code`) |\n"
    "| 2 | a usage error, found before any server is started or contacted: an unknown "
    "option, a value out of range or not among the choices, a bad URL or setting (every "
    "problem named), an unknown migration version |\n"
    "| 3 | the migration history and the files disagree (`migrate status --exit-code`, "
    "`restore`) |\n\n"
    "Output: tables are drawn on a terminal and printed as tab-separated lines when piped "
    "or redirected; `status`, `doctor`, `audit tail` and `setup` have `--json` for scripts. "
    "Progress goes to stderr.\n"
)


class _Group(TyperGroup):
    """The root command: usage errors as rich panels on a terminal, plain lines elsewhere.

    typer draws its error panel at 80 columns when stderr is a pipe or a file, cutting the
    message across box lines; click's own plain message keeps it whole.
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode or err_console.is_terminal:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # click's usage errors, as typer vendors them
            show = getattr(exc, "show", None)
            if show is not None:
                show()
            else:  # pragma: no cover - every usage error typer raises has show()
                sys.stderr.write(f"Error: {exc.format_message()}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="chatkeep",
    help="chatkeep: the data layer of a real-time chat backend (PostgreSQL + Redis).",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(migrate_cli.app, name="migrate")
app.add_typer(schema_app, name="schema")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(dev_cli.app, name="dev")
app.command()(setup)
app.command()(doctor)
app.command()(demo)
app.command()(seed)
app.command()(backup)
app.command()(restore)
app.command()(metrics)
app.command("prune-changes")(prune_changes)
app.command()(wait)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"chatkeep {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines to stderr (for log shippers).")
    ] = False,
) -> None:
    setup_logging(verbose)
    if log_json:
        ops_logging.configure(json=True, level="DEBUG" if verbose else "INFO")
    else:
        ops_logging.install_redactor()


def main() -> None:
    """Entry point of the ``chatkeep`` console script."""
    app()
