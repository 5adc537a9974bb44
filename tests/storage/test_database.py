from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import (
    ChatkeepError,
    ConfigurationError,
    Conflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from chatkeep.storage import Database
from chatkeep.storage.database import connect_options

from .conftest import MakeUser


async def test_pool_options_come_from_settings(database_url: str) -> None:
    settings = Settings(
        database_url=database_url,
        pool_min_size=1,
        pool_max_size=7,
        pool_idle_timeout=42,
        statement_timeout=3,
        statement_cache_size=0,
        application_name="ck-test",
    )
    db = Database(settings)
    options = db.pool_options()
    assert options["min_size"] == 1
    assert options["max_size"] == 7
    assert options["max_inactive_connection_lifetime"] == 42
    assert options["statement_cache_size"] == 0
    assert options["command_timeout"] > 3
    assert options["server_settings"]["statement_timeout"] == "3000"
    assert options["server_settings"]["application_name"] == "ck-test"
    assert options["server_settings"]["jit"] == "off"
    # The migrator's single connections keep their own options.
    assert "statement_timeout" not in connect_options(settings)["server_settings"]
    async with db:
        assert "open" in repr(db)
        assert await db.fetchval("t.show", "SHOW statement_timeout") == "3s"
        assert await db.fetchval("t.jit", "SHOW jit") == "off"
        assert await db.fetchval("t.app", "SELECT current_setting('application_name')") == (
            "ck-test"
        )
    assert not db.is_open
    assert "closed" in repr(db)


def test_needs_a_url_and_sane_sizes() -> None:
    with pytest.raises(ConfigurationError):
        Database(Settings(database_url=None))
    settings = Settings(database_url="postgresql://u:secret@h/d")
    with pytest.raises(InvalidInput):
        Database(settings, min_size=5, max_size=2)
    assert "secret" not in repr(Database(settings))


async def test_closed_database_is_unavailable(database_url: str) -> None:
    db = Database(Settings(database_url=database_url))
    with pytest.raises(Unavailable):
        await db.fetch("t.closed", "SELECT 1")
    with pytest.raises(Unavailable):
        _ = db.pool
    await db.close()  # closing twice is harmless


async def test_unreachable_server_is_unavailable() -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/nothing", connect_timeout=2)
    with pytest.raises(Unavailable) as info:
        await Database(settings, min_size=1).open()
    assert isinstance(info.value.__cause__, OSError)


async def test_health(db: Database) -> None:
    health = await db.health()
    assert health.latency_ms > 0
    assert health.server_version[:2].isdigit()
    assert health.pool_max_size == 20
    assert health.pool_size >= 1
    assert health.idle + health.busy == health.pool_size


async def test_every_operation_is_named_counted_and_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    db.reset_stats()
    with caplog.at_level(logging.DEBUG, logger="chatkeep.storage"):
        await db.fetch("t.fetch", "SELECT 1")
        await db.fetchrow("t.fetchrow", "SELECT 1")
        await db.fetchval("t.fetchval", "SELECT 1")
        await db.execute("t.execute", "SELECT 1")
        with pytest.raises(ChatkeepError):
            await db.execute("t.broken", "SELEKT 1")
    stats = db.stats
    assert {"t.fetch", "t.fetchrow", "t.fetchval", "t.execute", "t.broken"} <= set(stats)
    assert stats["t.broken"].errors == 1
    assert stats["t.fetch"].calls == 1
    assert stats["t.fetch"].mean_seconds > 0
    assert stats["t.fetch"].max_seconds >= stats["t.fetch"].mean_seconds
    assert any("t.fetchrow" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError):
        stats["x"] = stats["t.fetch"]  # type: ignore[index]


async def test_slow_operations_warn_with_the_name_never_the_parameters(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=database_url, slow_query_threshold=0.05)
    async with Database(settings, min_size=1) as db:
        with caplog.at_level(logging.WARNING, logger="chatkeep.storage"):
            await db.fetchval("t.sleepy", "SELECT pg_sleep(0.06)::text || $1", "sekrit-param")
            await db.fetchval("t.quick", "SELECT 1")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "t.sleepy" in warnings[0]
        assert "sekrit" not in warnings[0]
        assert db.stats["t.sleepy"].slow == 1


async def test_a_wait_for_a_free_connection_is_not_a_slow_statement(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=database_url, slow_query_threshold=0.1)
    async with Database(settings, min_size=1, max_size=1) as db:
        held = asyncio.Event()

        async def hold() -> None:
            async with db.transaction("t.holder"):
                held.set()
                await asyncio.sleep(0.3)

        holder = asyncio.create_task(hold())
        await held.wait()
        with caplog.at_level(logging.WARNING, logger="chatkeep.storage"):
            assert await db.fetchval("t.quick", "SELECT 1") == 1
        await holder
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # The quick statement waited ~0.3 s for the only connection: that is logged as a
        # wait, and the statement's own time stays a few milliseconds.
        assert any("waited" in w and "free database connection" in w for w in warnings)
        assert not any("t.quick" in w for w in warnings)
        assert db.stats["t.quick"].slow == 0
        assert db.stats["t.quick"].max_seconds < 0.1


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_crowd_on_a_small_pool_waits_but_raises_no_slow_statement_warning(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """200 tasks on 2 connections: the waits are measured apart, and warned about once."""
    from prometheus_client.parser import text_string_to_metric_families

    from chatkeep.ops.metrics import ChatkeepMetrics

    settings = Settings(database_url=database_url, slow_query_threshold=0.25)
    async with Database(settings, min_size=2, max_size=2) as db:
        metrics = ChatkeepMetrics()
        metrics.attach(database=db)
        with caplog.at_level(logging.WARNING, logger="chatkeep.storage"):
            # 200 statements of ~5 ms on 2 connections: the last ones wait about half a
            # second for a connection, and none takes long itself.
            results = await asyncio.gather(
                *(db.fetchval("t.fast", "SELECT pg_sleep(0.005)::text") for _ in range(200))
            )
        assert len(results) == 200
        warnings = _warnings(caplog)
        assert not [w for w in warnings if "slow database operation" in w.getMessage()]
        assert db.stats["t.fast"].slow == 0
        assert db.stats["t.fast"].calls == 200
        waits = db.pool_wait_stats
        assert waits.calls == 200
        assert waits.errors == 0
        assert waits.max_seconds >= 0.25
        assert waits.total_seconds > waits.max_seconds
        # Many long waits, one pool warning for them (rate-limited), naming the pool size.
        assert waits.slow > 1
        pool_lines = [w for w in warnings if "free database connection" in w.getMessage()]
        assert len(pool_lines) == 1
        assert "pool_max_size=2" in pool_lines[0].getMessage()
        assert pool_lines[0].__dict__["long_waits"] == 1  # the first long wait warns at once
        await metrics.sample()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
        }
        assert found[("chatkeep_db_pool_acquire_seconds_count", ())] >= 200
        assert found[("chatkeep_db_pool_acquire_seconds_sum", ())] >= waits.max_seconds
        assert found[("chatkeep_db_pool_long_waits_total", ())] == waits.slow
        assert found[("chatkeep_db_slow_statements_total", (("operation", "t.fast"),))] == 0

        # Past the interval, the next long wait warns again and counts the ones held back.
        held_back = waits.slow - 1
        caplog.clear()
        db.pool_warning_interval = 0.0
        with caplog.at_level(logging.WARNING, logger="chatkeep.storage"):
            await asyncio.gather(
                *(db.fetchval("t.fast", "SELECT pg_sleep(0.005)::text") for _ in range(200))
            )
        pool_lines = [r for r in _warnings(caplog) if "free database connection" in r.getMessage()]
        assert pool_lines
        assert pool_lines[0].__dict__["long_waits"] == held_back + 1
        assert f"; {held_back + 1} wait(s) of 250 ms or more" in pool_lines[0].getMessage()


async def test_a_slow_statement_warns_with_its_own_time_and_its_wait_apart(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=database_url, slow_query_threshold=0.1)
    async with Database(settings, min_size=1, max_size=1) as db:
        with caplog.at_level(logging.WARNING, logger="chatkeep.storage"):
            await db.fetchval("t.sleepy", "SELECT pg_sleep(0.15)::text")
        (line,) = _warnings(caplog)
        assert line.getMessage().startswith("slow database operation t.sleepy: ")
        assert "waiting for a connection" in line.getMessage()
        assert line.__dict__["duration_ms"] >= 150
        assert 0 <= line.__dict__["pool_wait_ms"] < 100
        assert db.stats["t.sleepy"].slow == 1
        assert db.pool_wait_stats.slow == 0
        db.reset_stats()
        assert db.pool_wait_stats.calls == 0


async def test_an_exhausted_pool_counts_the_acquire_that_gave_up(database_url: str) -> None:
    settings = Settings(database_url=database_url, connect_timeout=0.2)
    async with Database(settings, min_size=1, max_size=1) as db:
        held = asyncio.Event()
        release = asyncio.Event()

        async def hold() -> None:
            async with db.transaction("t.holder"):
                held.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await held.wait()
        with pytest.raises(Unavailable, match="database pool exhausted"):
            await db.fetchval("t.starved", "SELECT 1")
        release.set()
        await holder
        assert db.pool_wait_stats.errors == 1
        assert db.pool_wait_stats.calls == 1  # the holder's acquire; the starved one failed


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        (
            "INSERT INTO users (id, email, username, password_hash) VALUES "
            "(gen_random_uuid(), 'x', 'abc', 'nope')",
            InvalidInput,
        ),
        (
            "INSERT INTO rooms (name, type, created_by) VALUES ('r', 'public', gen_random_uuid())",
            NotFound,
        ),
        ("SELECT 1/0", InvalidInput),
        ("SELECT * FROM no_such_table", ChatkeepError),
    ],
)
async def test_driver_errors_are_translated(db: Database, sql: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        await db.execute("t.bad", sql)
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)


async def test_unique_violation_is_conflict_and_statement_timeout_unavailable(
    db: Database, make_user: MakeUser, database_url: str
) -> None:
    user = await make_user("dupe")
    with pytest.raises(Conflict) as info:
        await make_user("DUPE", email="other@example.org")
    assert info.value.constraint == "users_username_lower_key"
    assert user.username == "dupe"
    settings = Settings(database_url=database_url, statement_timeout=0.1)
    async with Database(settings, min_size=1) as quick:
        with pytest.raises(Unavailable):
            await quick.execute("t.too_slow", "SELECT pg_sleep(2)")
        assert await quick.fetchval("t.after", "SELECT 1") == 1


async def test_transaction_commits_and_rolls_back(db: Database, make_user: MakeUser) -> None:
    user = await make_user()
    async with db.transaction("t.commit") as tx:
        assert db.in_transaction()
        await db.execute(
            "t.rename", "UPDATE users SET avatar_url = 'https://a.b/c' WHERE id = $1", user.id
        )
        assert "t.commit" in repr(tx)
    assert not db.in_transaction()
    assert await db.fetchval("t.read", "SELECT avatar_url FROM users WHERE id = $1", user.id)

    async def failing() -> None:
        async with db.transaction("t.rollback"):
            await db.execute("t.clear", "UPDATE users SET avatar_url = NULL WHERE id = $1", user.id)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await failing()
    assert await db.fetchval("t.read", "SELECT avatar_url FROM users WHERE id = $1", user.id)
    assert db.stats["t.rollback"].errors == 1


async def test_nested_blocks_are_savepoints(db: Database, make_user: MakeUser) -> None:
    user = await make_user()
    set_url = "UPDATE users SET avatar_url = $2 WHERE id = $1"
    async with db.transaction():
        await db.execute("t.set", set_url, user.id, "https://a.b/outer")

        async def inner() -> None:
            async with db.transaction():
                await db.execute("t.set", set_url, user.id, "https://a.b/inner")
                await db.execute(
                    "t.dupe", "INSERT INTO users SELECT * FROM users WHERE id = $1", user.id
                )

        with pytest.raises(Conflict):
            await inner()
        # The outer transaction is still usable and keeps its own change.
        assert (
            await db.fetchval("t.get", "SELECT avatar_url FROM users WHERE id = $1", user.id)
            == "https://a.b/outer"
        )
        async with db.transaction():
            await db.execute("t.set", set_url, user.id, "https://a.b/inner-kept")
    assert (
        await db.fetchval("t.get", "SELECT avatar_url FROM users WHERE id = $1", user.id)
        == "https://a.b/inner-kept"
    )


async def test_calls_in_the_block_join_the_transaction(db: Database) -> None:
    async with db.transaction() as tx:
        pid = await db.fetchval("t.pid", "SELECT pg_backend_pid()")
        assert pid == await tx.connection.fetchval("SELECT pg_backend_pid()")
        async with db.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid

        # A task started inside the block does not share the connection.
        async def other() -> int:
            value: int = await db.fetchval("t.pid", "SELECT pg_backend_pid()")
            return value

        assert await asyncio.create_task(other()) != pid


async def test_readonly_and_isolation(db: Database) -> None:
    async with db.transaction(readonly=True, isolation="serializable"):
        level = await db.fetchval("t.iso", "SHOW transaction_isolation")
        assert level == "serializable"
        with pytest.raises(ChatkeepError):
            await db.execute("t.write", "CREATE TABLE nope (x int)")


async def test_acquired_connections_are_reset(database_url: str) -> None:
    async with Database(Settings(database_url=database_url), min_size=1, max_size=1) as db:
        async with db.acquire() as conn:
            await conn.execute("SET search_path TO pg_catalog")
        assert await db.fetchval("t.path", "SHOW search_path") == '"$user", public'
        async with db.transaction() as tx:
            await tx.connection.execute("SET work_mem TO '77MB'")
        assert await db.fetchval("t.mem", "SHOW work_mem") != "77MB"


@pytest.mark.parametrize(
    "change", ["SET ROLE chatapp_app", "SET SESSION AUTHORIZATION chatapp_app"]
)
async def test_a_changed_role_does_not_reach_the_next_borrower(
    database_url: str, change: str
) -> None:
    async with Database(Settings(database_url=database_url), min_size=1, max_size=1) as db:
        me = await db.fetchval("t.me", "SELECT current_user")
        await db.execute("t.role", change)
        assert await db.fetchval("t.me", "SELECT current_user") == me
        async with db.transaction():
            await db.execute("t.role", change)
        assert await db.fetchval("t.me", "SELECT current_user") == me
        # asyncpg's full reset (RESET ALL) keeps the role: chatkeep's comes after it.
        async with db.acquire() as conn:
            await conn.execute(change)
        assert await db.fetchval("t.me", "SELECT current_user") == me
        async with db.transaction():
            assert await db.fetchval("t.me", "SELECT current_user") == me


async def test_the_session_reset_is_sent_only_after_a_statement_that_may_need_it(
    database_url: str,
) -> None:
    """The reset rides in queries a transaction sends anyway, and only when needed: a flow
    of plain statements sends exactly BEGIN (with the acting user) and COMMIT."""
    sent: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: sent.append(record.query))

    settings = Settings(database_url=database_url)
    async with Database(settings, init=init, min_size=1, max_size=1) as db:
        user = uuid.uuid4()
        plain = "SELECT count(*) FROM rooms WHERE created_by = $1"
        sent.clear()
        async with db.acting_as(user):
            await db.fetchval("t.plain", plain, user)
        await db.fetchval("t.single", plain, user)
        assert not [q for q in sent if "RESET" in q], sent
        assert len(sent) == 4  # BEGIN + set_config, the statement, COMMIT, the statement
        # A session-level set: the COMMIT carries the reset (no extra round trip)...
        sent.clear()
        async with db.acting_as(user):
            await db.execute("t.leak", "SELECT set_config('app.user_id', $1, false)", str(user))
        assert len(sent) == 3
        assert "RESET ALL" in sent[-1]
        # ...and outside a transaction, the next single statement sends it first.
        await db.execute("t.leak", "SELECT set_config('app.user_id', $1, false)", str(user))
        sent.clear()
        assert await db.fetchval("t.who", "SELECT current_setting('app.user_id', true)") == ""
        assert len(sent) == 2
        assert "RESET ALL" in sent[0]


async def test_exhausted_pool_is_unavailable(database_url: str) -> None:
    settings = Settings(database_url=database_url, connect_timeout=0.3)
    async with Database(settings, min_size=1, max_size=1) as db:
        async with db.acquire():
            with pytest.raises(Unavailable, match="exhausted"):
                await db.fetchval("t.starved", "SELECT 1")
        assert await db.fetchval("t.fed", "SELECT 1") == 1


async def test_cancelled_queries_give_their_connection_back(database_url: str) -> None:
    async with Database(Settings(database_url=database_url), min_size=1, max_size=2) as db:
        tasks = [asyncio.create_task(db.execute("t.sleep", "SELECT pg_sleep(5)")) for _ in range(2)]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.1)
        # Both connections are back and work.
        results = await asyncio.gather(*(db.fetchval("t.ok", "SELECT 1") for _ in range(4)))
        assert results == [1, 1, 1, 1]
        health = await db.health()
        assert health.pool_size <= 2


async def test_init_hook_and_json_codec(database_url: str) -> None:
    seen: list[Any] = []

    async def init(conn: asyncpg.Connection) -> None:
        seen.append(conn)

    async with Database(Settings(database_url=database_url), init=init, min_size=1) as db:
        assert await db.fetchval("t.json", "SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
    assert seen


async def test_executemany_and_copy(db: Database, make_user: MakeUser) -> None:
    user = await make_user()
    await db.executemany(
        "t.many",
        "INSERT INTO rooms (name, type, created_by) VALUES ($1, 'public', $2)",
        [(f"r{i}", user.id) for i in range(3)],
    )
    assert await db.fetchval("t.count", "SELECT count(*) FROM rooms") == 3
    with pytest.raises(InvalidInput):
        await db.executemany(
            "t.many_bad",
            "INSERT INTO rooms (name, type, created_by) VALUES ($1, 'public', $2)",
            [("ok", user.id), ("   ", user.id)],
        )
    assert await db.fetchval("t.count", "SELECT count(*) FROM rooms") == 3
    count = await db.copy_records(
        "t.copy", "rooms", [("c1", "private", user.id)], columns=("name", "type", "created_by")
    )
    assert count == 1
    with pytest.raises(NotFound):
        await db.copy_records(
            "t.copy_bad",
            "rooms",
            [("c2", "private", user.id), ("c3", "private", uuid.UUID(int=1))],
            columns=("name", "type", "created_by"),
        )
    assert await db.fetchval("t.count", "SELECT count(*) FROM rooms") == 4


# -- acting as a user -----------------------------------------------------------------------


async def test_acting_as_sets_the_user_for_the_transaction_only(database_url: str) -> None:
    user = uuid.uuid4()
    settings = Settings(database_url=database_url, pool_min_size=1, pool_max_size=1)
    async with Database(settings) as db:
        assert db.acting_user() is None
        async with db.acting_as(str(user)) as tx:
            assert tx.acting_user == user == db.acting_user()
            seen = await db.fetchval("t.who", "SELECT current_setting('app.user_id', true)")
            assert seen == str(user)

            async def failing_block() -> None:
                async with db.acting_as(user):
                    await db.execute("t.dup", "SELECT 1")
                    raise Conflict("inner block fails")

            # The same user nests as a savepoint: a failure inside undoes only that block.
            with pytest.raises(Conflict):
                await failing_block()
            assert await db.fetchval("t.still", "SELECT current_setting('app.user_id')") == str(
                user
            )
        assert db.acting_user() is None
        # One connection in the pool: the next borrower does not inherit the user.
        after = await db.fetchval("t.after", "SELECT current_setting('app.user_id', true)")
        assert after in (None, "")


async def test_acting_as_refuses_a_bad_id_and_a_change_of_identity(database_url: str) -> None:
    settings = Settings(database_url=database_url, pool_min_size=1, pool_max_size=2)
    async with Database(settings) as db:
        with pytest.raises(InvalidInput) as bad:
            async with db.acting_as("not-a-uuid"):
                pass  # pragma: no cover
        assert bad.value.field == "user_id"
        async with db.acting_as(uuid.uuid4()):
            with pytest.raises(InvalidInput, match="another user"):
                async with db.acting_as(uuid.uuid4()):
                    pass  # pragma: no cover
        async with db.transaction():
            with pytest.raises(InvalidInput, match="acting as no one"):
                async with db.acting_as(uuid.uuid4()):
                    pass  # pragma: no cover


# -- failed connections of the pool ---------------------------------------------------------


async def test_failed_pool_connections_are_counted(database_url: str) -> None:
    from chatkeep.storage.bootstrap import maintenance_url
    from chatkeep.storage.security import connection_failures, reset_connection_failures

    missing = maintenance_url(database_url, "chatkeep_no_such_database")
    reset_connection_failures()
    # At open: the pool's first connections.
    with pytest.raises(ConfigurationError):
        await Database(Settings(database_url=missing, pool_min_size=1)).open()
    # Later: a pool that opens lazily, failing on its first borrow.
    async with Database(Settings(database_url=missing, pool_min_size=0)) as lazy:
        with pytest.raises(ConfigurationError):
            await lazy.fetchval("t.one", "SELECT 1")
    [failure] = [f for f in connection_failures() if "exist" in f.reason]
    assert failure.count == 2
    assert failure.reason == "the database does not exist"
    reset_connection_failures()


async def test_acting_as_takes_isolation_and_read_only_with_the_user(database_url: str) -> None:
    user = uuid.uuid4()
    async with (
        Database(Settings(database_url=database_url, pool_min_size=1)) as db,
        db.acting_as(user, isolation="serializable", readonly=True),
    ):
        row = await db.fetchrow(
            "t.state",
            "SELECT current_setting('transaction_isolation') AS iso,"
            " current_setting('transaction_read_only') AS ro,"
            " current_setting('app.user_id') AS who",
        )
        assert row is not None
        assert (row["iso"], row["ro"], row["who"]) == ("serializable", "on", str(user))
        with pytest.raises(ChatkeepError):  # read only: the server refuses the write
            await db.execute("t.write", "CREATE TEMP TABLE nope (x int)")
