"""Fixtures for the operations tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest_asyncio

from tests.conftest import url_for

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
