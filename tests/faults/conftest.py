"""Fixtures of the fault suite: its own PostgreSQL and Redis, and the results table.

The suite never uses the servers the rest of the tests run on (``TEST_DATABASE_URL``, the
embedded ones, the machine's shared ones): it faults its servers, so it starts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import pytest_asyncio

from chatkeep.config import Settings
from chatkeep.storage.bootstrap import ensure_roles, prepare_database
from chatkeep.storage.migrate import Migrator
from tests.faults.history import ScenarioResult, render_table
from tests.faults.nemesis import Size, chosen_size
from tests.servers import PostgresServer, RedisServer, temporary_folder

RESULTS: pytest.StashKey[list[ScenarioResult]] = pytest.StashKey()
TEMPLATE_DATABASE = "chatkeep_faults_template"


@dataclass(frozen=True, slots=True)
class FaultStores:
    """The suite's servers, with a migrated template database to copy per scenario."""

    postgres: PostgresServer
    redis: RedisServer
    template: str


@pytest.fixture(scope="session")
def fault_size() -> Size:
    """The size ``CHATKEEP_FAULTS`` asks for (``small`` by default)."""
    return chosen_size()


@pytest.fixture
def fault_results(request: pytest.FixtureRequest) -> list[ScenarioResult]:
    """Where each scenario leaves its row for the table printed at the end of the run."""
    return request.config.stash.setdefault(RESULTS, [])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fault_stores() -> AsyncIterator[FaultStores]:
    """A PostgreSQL and a Redis of the suite's own, set up as ``chatkeep setup`` does."""
    postgres = PostgresServer(temporary_folder("chatkeep-faults-pg-"))
    redis = RedisServer(temporary_folder("chatkeep-faults-redis-"))
    try:
        postgres.start()
        redis.start()
        admin = await asyncpg.connect(postgres.url())
        try:
            await ensure_roles(admin, Settings(), generate_passwords=False)
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(postgres.url(TEMPLATE_DATABASE))
        try:
            await prepare_database(conn)
            await Migrator(conn).up()
        finally:
            await conn.close()
        yield FaultStores(postgres, redis, TEMPLATE_DATABASE)
    finally:
        redis.close()
        postgres.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print every scenario's row in one table after the run."""
    results = terminalreporter.config.stash.get(RESULTS, [])
    if results:
        terminalreporter.write_sep("=", "fault suite")
        terminalreporter.write_line(render_table(results))
