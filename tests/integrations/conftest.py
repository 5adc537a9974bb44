from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from chatkeep import ChatKeep, Settings


@pytest.fixture
def settings(make_settings: Callable[..., Settings], app_url: str, redis_url: str) -> Settings:
    """This test's database (as chatapp_app, the role production uses) and Redis."""
    return make_settings(database_url=app_url)


@pytest_asyncio.fixture(loop_scope="session")
async def chat(settings: Settings) -> AsyncIterator[ChatKeep]:
    async with ChatKeep.connect(settings, node_id="test", bcrypt_rounds=10) as facade:
        yield facade
