"""``chatkeep seed``: fill a database with realistic chat data, fast (binary COPY)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import TaskID
from rich.table import Table

from chatkeep.cli._common import (
    DatabaseUrlOption,
    endpoints,
    load_settings,
    progress_display,
    run,
    show_table,
)
from chatkeep.config import Settings
from chatkeep.storage.database import Database
from chatkeep.storage.seed import SeedReport
from chatkeep.storage.seed import seed as seed_database

__all__ = ["seed"]


async def _run(
    dsn: str, settings: Settings, users: int, rooms: int, messages: int, rng_seed: int | None
) -> SeedReport:
    async with Database(settings, dsn=dsn, min_size=1, max_size=2) as db:
        with progress_display(transient=False) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=max(total, 1), detail="")
                bar.update(tasks[stage], completed=done if total else 1)

            return await seed_database(
                db,
                users=users,
                rooms=rooms,
                messages=messages,
                rng_seed=rng_seed,
                progress=progress,
            )


def seed(
    users: Annotated[int, typer.Option("--users", min=2, help="How many users.")] = 1_000,
    rooms: Annotated[
        int, typer.Option("--rooms", min=1, help="How many rooms (a fifth are direct rooms).")
    ] = 100,
    messages: Annotated[
        int, typer.Option("--messages", min=0, help="How many messages in total.")
    ] = 100_000,
    rng_seed: Annotated[
        int | None,
        typer.Option("--seed", help="Random seed, for the same shape of data every time."),
    ] = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Fill the database with realistic users, rooms, messages and read state (via COPY).

    Room sizes and traffic are skewed as in real chat; one transaction, so a failed run
    leaves nothing. Every seeded user's password is printed at the end. PostgreSQL does
    not COPY into tables under row security, so on a real server give a superuser (or
    BYPASSRLS) URL; the embedded default uses its superuser.
    """
    # A COPY of 50,000 rows is slow on purpose: do not warn about it.
    settings = load_settings(database_url, slow_query_threshold=86_400.0)
    with endpoints(settings, redis=False) as found:
        report = run(_run(found.admin_database_url, settings, users, rooms, messages, rng_seed))
    table = Table(title="seeded", show_header=False)
    for name, value in (
        ("users", report.users),
        ("rooms", f"{report.rooms} ({report.direct_rooms} direct)"),
        ("memberships", report.memberships),
        ("messages", report.messages),
        ("receipts", report.receipts),
        ("thread replies", report.replies),
        ("mentions", report.mentions),
        ("reactions", report.reactions),
        ("time", f"{report.seconds:.1f} s"),
        ("password", report.password),
    ):
        table.add_row(name, str(value))
    show_table(table)
