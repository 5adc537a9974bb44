"""chatkeep.testing, the pytest plugin applications use (and this suite's own harness).

The plugin is run as an application runs it: pytester writes a tiny app's conftest and
tests (pytest-asyncio in its default strict mode, a loop per test) and runs pytest on
them in a subprocess, against this session's servers.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from chatkeep import ChatKeep, CreateUserDto
from chatkeep.embedded import Endpoints
from chatkeep.testing import ChatkeepTestSettings, redis_test_url

APP_CONFTEST = """
pytest_plugins = ["chatkeep.testing"]
"""
APP_TESTS = Path(__file__).resolve().parent / "docs" / "example_app_tests.py"
# Not in the how-to: writes down the databases each test used, to check they were dropped.
RECORDER = """
from pathlib import Path

import pytest

from chatkeep import urls


@pytest.fixture(autouse=True)
def record_databases(chatkeep_database_url: str, chatkeep_template_database: str) -> None:
    with Path("databases.txt").open("a") as names:
        names.write(urls.database_name(chatkeep_database_url) + "\\n")
        names.write(chatkeep_template_database + "\\n")
"""


async def test_an_app_gets_a_fresh_chatkeep_per_test(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    servers: Endpoints,
    redis_url: str,
    admin_url: str,
) -> None:
    pytester.makeini(
        """
        [pytest]
        asyncio_default_fixture_loop_scope = function
        filterwarnings =
            error
            ignore::UserWarning:platformdirs.*
        """
    )
    pytester.makeconftest(APP_CONFTEST + RECORDER)
    pytester.makepyfile(test_app=APP_TESTS.read_text(encoding="utf-8"))
    monkeypatch.setenv("CHATKEEP_TEST_DATABASE_URL", servers.admin_database_url)
    monkeypatch.setenv("CHATKEEP_TEST_REDIS_URL", redis_url)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3)
    # Each test's database and the session's template are gone afterwards.
    made = set((pytester.path / "databases.txt").read_text().split())
    assert len(made) == 4  # three tests' databases and the template
    admin = await asyncpg.connect(admin_url)
    try:
        left = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname = ANY($1)", sorted(made)
        )
    finally:
        await admin.close()
    assert left == []


async def test_the_fixture_is_the_app_role_on_a_fresh_database(chatkeep: ChatKeep) -> None:
    assert await chatkeep.db.fetchval("t", "SELECT current_user") == "chatapp_app"
    assert await chatkeep.db.fetchval("t", "SELECT count(*) FROM users") == 0
    user = await chatkeep.register(
        CreateUserDto(email="bob@example.org", username="bob", password="correct horse")
    )
    assert isinstance(user.id, uuid.UUID)


async def test_the_redis_database_is_flushed(chatkeep_redis_url: str) -> None:
    client = aioredis.from_url(chatkeep_redis_url)
    try:
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


def test_servers_come_from_the_chatkeep_test_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHATKEEP_TEST_DATABASE_URL", "postgresql://u@db.example/x")
    monkeypatch.setenv("CHATKEEP_TEST_REDIS_URL", "redis://cache.example:6379/7")
    monkeypatch.setenv("CHATKEEP_TEST_DATA_DIR", str(tmp_path))
    settings = ChatkeepTestSettings().server_settings()
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://u@db.example/x"
    assert settings.redis_url is not None
    assert settings.data_dir == tmp_path


def test_without_variables_the_embedded_servers_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "DATA_DIR"):
        monkeypatch.delenv(f"CHATKEEP_TEST_{name}", raising=False)
    settings = ChatkeepTestSettings().server_settings()
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.data_dir == Path(".chatkeep")


@pytest.mark.parametrize(
    ("base", "explicit", "expected"),
    [
        ("redis://h:6379/7", True, "redis://h:6379/7"),
        ("redis://h:6379", True, "redis://h:6379/13"),
        ("redis://h:6379/0", False, "redis://h:6379/13"),
    ],
)
def test_the_redis_database_tests_flush(base: str, explicit: bool, expected: str) -> None:
    assert redis_test_url(base, explicit=explicit) == expected


def test_the_app_conftest_in_the_howto_is_the_one_tested() -> None:
    howto = (Path(__file__).resolve().parents[1] / "docs" / "howto" / "testing.md").read_text(
        encoding="utf-8"
    )
    assert textwrap.dedent(APP_CONFTEST).strip() in howto
