"""``chatkeep audit ...``: the audit trail on the command line."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Annotated

import typer
from rich.table import Table

from chatkeep.cli._common import (
    DatabaseUrlOption,
    console,
    endpoints,
    fail,
    load_settings,
    run,
    show_table,
)
from chatkeep.storage.audit import AUDIT_ACTIONS, MAX_LIMIT, AuditEntry, tail
from chatkeep.storage.database import connect

app = typer.Typer(name="audit", help="Read the audit trail.", no_args_is_help=True)


def _uuid(value: str | None, name: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{name} must be a UUID", code=2)


def _check_action(value: str | None) -> str | None:
    # A usage error (exit 2), found while parsing: before any server is started.
    if value is not None and value not in AUDIT_ACTIONS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(sorted(AUDIT_ACTIONS))}")
    return value


@app.command("tail")
def tail_command(
    limit: Annotated[
        int, typer.Option("-n", "--limit", min=1, max=MAX_LIMIT, help="How many entries.")
    ] = 20,
    action: Annotated[
        str | None,
        typer.Option(
            "--action",
            callback=_check_action,
            help=f"Only this action: {', '.join(sorted(AUDIT_ACTIONS))}.",
            show_default=False,
        ),
    ] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Only this user's acts.")] = None,
    room: Annotated[str | None, typer.Option("--room", help="Only this room.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines for scripts.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Show the newest audit entries, newest first (reads as the migration role)."""
    actor_id = _uuid(actor, "--actor")
    room_id = _uuid(room, "--room")
    settings = load_settings(database_url)
    with endpoints(settings, redis=False) as found:

        async def read() -> list[AuditEntry]:
            conn = await connect(
                found.migrate_database_url, settings, application_name="chatkeep-audit"
            )
            try:
                return await tail(
                    conn, limit=limit, action=action, actor_id=actor_id, room_id=room_id
                )
            finally:
                await asyncio.shield(conn.close())

        entries = run(read())
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry.as_json()) + "\n")
        return
    if not entries:
        console.print("no audit entries")
        return
    table = Table("id", "when", "action", "actor", "row", "changes", "role", "from")
    for e in entries:
        table.add_row(
            str(e.id),
            e.occurred_at.strftime("%Y-%m-%d %H:%M:%S %Z"),
            e.action,
            str(e.actor_id) if e.actor_id else "(system)",
            f"{e.table_name} {e.row_id}",
            json.dumps(e.changes, sort_keys=True),
            e.db_role,
            f"{e.application_name} {e.client_addr or 'local'}",
        )
    show_table(table)
