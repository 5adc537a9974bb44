"""Applications' migration folders (locations) beside chatkeep's, against a real server."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from chatkeep.cli import app
from chatkeep.errors import InvalidInput, MigrationError, MigrationOrderError
from chatkeep.storage.migrate import (
    _HISTORY_DDL,
    CHATKEEP_NAMESPACE,
    HISTORY_TABLE,
    MigrationLocation,
    Migrator,
    checksum,
    load_locations,
    load_migrations,
)
from tests.migration_files import table_migration, write

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = load_migrations()
NEWEST = SHIPPED[-1].version

Env = Callable[..., dict[str, str]]


def app_folder(root: Path, name: str = "myapp", *tables: str) -> Path:
    folder = root / name / "migrations"
    folder.mkdir(parents=True)
    for number, table in enumerate(tables, start=1):
        write(folder, f"{number:03d}_create_{table}.sql", table_migration(table))
    return folder


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


# -- naming and loading ---------------------------------------------------------------------


def test_a_location_is_named_after_its_folder_or_explicitly(tmp_path: Path) -> None:
    assert MigrationLocation.parse(tmp_path / "shop" / "migrations").namespace == "shop"
    assert MigrationLocation.parse(tmp_path / "Billing-SQL").namespace == "billing_sql"
    named = MigrationLocation.parse(f"orders={tmp_path / 'x'}")
    assert (named.namespace, named.path) == ("orders", tmp_path / "x")
    location = MigrationLocation("shop", tmp_path)
    assert MigrationLocation.parse(location) is location
    with pytest.raises(InvalidInput, match="chatkeep's own"):
        MigrationLocation.parse(f"chatkeep={tmp_path}")
    with pytest.raises(InvalidInput, match="lower-case letters"):
        MigrationLocation("9lives", tmp_path)


def test_locations_load_after_chatkeeps_and_refuse_a_shared_namespace(tmp_path: Path) -> None:
    shop = app_folder(tmp_path, "shop", "carts", "orders")
    found = load_locations([shop])
    assert [m.namespace for m in found] == [CHATKEEP_NAMESPACE] * len(SHIPPED) + ["shop"] * 2
    assert found[-1].display == "shop:002_create_orders.sql"
    other = app_folder(tmp_path / "elsewhere", "shop")
    with pytest.raises(MigrationError, match="both namespace 'shop'"):
        load_locations([shop, other])
    with pytest.raises(MigrationError, match=r"shop:migrations directory .* does not exist"):
        load_locations([f"shop={tmp_path / 'nope'}"])


# -- running ------------------------------------------------------------------------------


async def test_up_down_and_status_with_a_location(database_url: str, tmp_path: Path) -> None:
    shop = app_folder(tmp_path, "shop", "carts", "orders")
    conn = await asyncpg.connect(database_url)
    try:
        runner = Migrator(conn, locations=[shop])
        applied = await runner.up()
        assert [m.display for m in applied] == [
            "shop:001_create_carts.sql",
            "shop:002_create_orders.sql",
        ]
        assert {"carts", "orders", "users"} <= await tables(conn)
        entries = await runner.status()
        assert [(e.namespace, e.version, e.state) for e in entries[-2:]] == [
            ("shop", 1, "applied"),
            ("shop", 2, "applied"),
        ]
        assert entries[-1].as_json()["namespace"] == "shop"
        # chatkeep's version 1 and shop's version 1 are two rows, kept apart.
        rows = await conn.fetch(
            f"SELECT namespace FROM {HISTORY_TABLE} WHERE version = 1 ORDER BY id"
        )
        assert [r[0] for r in rows] == ["chatkeep", "shop"]

        # Without the location the runner leaves the namespace alone, listed as applied.
        plain = Migrator(conn)
        assert [e.label for e in await plain.status()][-2:] == [
            "shop:001_create_carts",
            "shop:002_create_orders",
        ]
        with pytest.raises(MigrationError, match="cannot revert shop:002_create_orders"):
            await plain.down()

        # down -n 1 reverts the newest applied: shop's.
        assert [m.display for m in await runner.down()] == ["shop:002_create_orders.sql"]
        assert "orders" not in await tables(conn)
        # Down to a chatkeep version reverts, first, what shop applied after it.
        plan = await runner.plan_down(to=NEWEST - 1)
        assert [m.display for m in plan.migrations] == [
            "shop:001_create_carts.sql",
            SHIPPED[-1].path.name,
        ]
        # Up to shop:1 applies chatkeep's pending ones first.
        await runner.down(to=NEWEST - 1)
        assert [m.display for m in await runner.up(to="shop:1")] == [
            SHIPPED[-1].path.name,
            "shop:001_create_carts.sql",
        ]
        with pytest.raises(MigrationError, match="no migration has version shop:7"):
            await runner.up(to="shop:7")
        with pytest.raises(MigrationError, match="no migration location has namespace 'x'"):
            await runner.up(to="x:1")
        for wrong in ("shop:two", 1.5, True, -1):
            with pytest.raises(MigrationError, match="is not a version"):
                await runner.up(to=wrong)  # type: ignore[arg-type]

        # Checksums and order are checked per namespace.
        write(shop, "001_create_carts.sql", "-- edited\n" + table_migration("carts"))
        with pytest.raises(MigrationError, match=r"shop:001_create_carts\.sql was edited"):
            await Migrator(conn, locations=[shop]).up()
        await Migrator(conn, locations=[shop], validate_checksums=False).repair("shop:1")
        assert [m.display for m in await Migrator(conn, locations=[shop]).up()] == [
            "shop:002_create_orders.sql"
        ]
    finally:
        await conn.close()


async def test_out_of_order_and_missing_are_per_namespace(
    database_url: str, tmp_path: Path
) -> None:
    shop = app_folder(tmp_path, "shop", "carts")
    conn = await asyncpg.connect(database_url)
    try:
        await Migrator(conn, locations=[shop]).up()
        # shop's 002 is newer than chatkeep's newest but older than nothing in shop: pending.
        write(shop, "002_create_orders.sql", table_migration("orders"))
        runner = Migrator(conn, locations=[shop])
        assert [e.state for e in await runner.status()][-1] == "pending"
        (shop / "001_create_carts.sql").unlink()
        with pytest.raises(MigrationOrderError, match="missing from their folders: shop:001"):
            await Migrator(conn, locations=[shop]).up()
    finally:
        await conn.close()


async def test_a_history_written_before_namespaces_is_upgraded(
    emptied_database_url: str, three: Path
) -> None:
    """A database migrated by an older chatkeep: no namespace column, rows all chatkeep's."""
    old_ddl = _HISTORY_DDL.replace(
        ",\n    namespace     text        NOT NULL DEFAULT 'chatkeep'", ""
    )
    assert "namespace" not in old_ddl
    conn = await asyncpg.connect(emptied_database_url)
    try:
        await conn.execute(old_ddl)
        await conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
        await conn.execute(
            f"INSERT INTO {HISTORY_TABLE} (version, name, checksum, direction, transactional,"
            " started_at, finished_at, duration_ms, outcome)"
            " VALUES (1, 'create_a', $1, 'up', true, now(), now(), 0, 'success')",
            checksum(table_migration("a")),
        )
        runner = Migrator(conn, directory=three)
        # Read as it is (status takes no lock and changes nothing).
        assert [e.state for e in await runner.status()] == ["applied", "pending", "pending"]
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = $1::regclass"
            " AND attname = 'namespace'",
            HISTORY_TABLE,
        )
        assert [m.version for m in await runner.up()] == [2, 3]
        rows = await conn.fetch(f"SELECT version, namespace FROM {HISTORY_TABLE} ORDER BY id")
        assert [tuple(r) for r in rows] == [(1, "chatkeep"), (2, "chatkeep"), (3, "chatkeep")]
    finally:
        await conn.close()


# -- what docs/operations.md shows ------------------------------------------------------------


def documented_app_migration() -> tuple[str, list[list[str]]]:
    """The SQL and the `chatkeep migrate` commands of the app-migration example, as written."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("<!-- docs-test: app-migration", 1)[1].split("\n- **Registering", 1)[0]
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    commands = [
        line.split("#", 1)[0].split()
        for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
        for line in block.splitlines()
        if line.startswith("chatkeep ")
    ]
    return sql, commands


def test_the_documented_app_migration_works(
    cli_env: Env, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql, commands = documented_app_migration()
    assert [c[:3] for c in commands] == [
        ["chatkeep", "migrate", "new"],
        ["chatkeep", "migrate", "up"],
        ["chatkeep", "migrate", "status"],
        ["chatkeep", "migrate", "verify"],
        ["chatkeep", "migrate", "down"],
    ]
    monkeypatch.chdir(tmp_path)
    env = cli_env(CHATKEEP_DATA_DIR=str(tmp_path / "data"))
    runner = CliRunner()

    def chatkeep(argv: list[str]) -> Result:
        extra = [] if argv[2] == "new" else ["--database-url", database_url]
        result = runner.invoke(app, argv[1:] + extra, env=env)
        assert result.exit_code == 0, result.output
        return result

    created = chatkeep(commands[0])
    path = Path(created.stdout.strip())
    assert path == Path("myapp/migrations/001_create_bookmarks.sql")
    assert "-- chatkeep:up" in path.read_text(encoding="utf-8")
    path.write_text(sql, encoding="utf-8")

    up = chatkeep(commands[1])
    assert "apply myapp:001_create_bookmarks.sql" in up.stdout
    status = chatkeep(commands[2])
    assert "myapp\t001\tcreate_bookmarks\tapplied" in status.stdout
    assert f"chatkeep\t{NEWEST:03d}\t" in status.stdout
    verify = chatkeep(commands[3])
    assert "ok myapp:001_create_bookmarks: up, down, up ok" in verify.stdout
    assert f"{len(SHIPPED) + 1} migration(s) verified" in verify.stdout
    down = chatkeep(commands[4])
    assert "revert myapp:001_create_bookmarks.sql" in down.stdout

    # The next `new` numbers on; a second location's NAME=DIR works the same way.
    again = chatkeep(["chatkeep", "migrate", "new", "add_title", "--location", "myapp/migrations"])
    assert again.stdout.strip().endswith("002_add_title.sql")
