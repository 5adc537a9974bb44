"""Catalog snapshots (what `migrate verify` compares) and the Mermaid diagram in docs/schema.md."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from chatkeep.cli.admin import DIAGRAM_END, DIAGRAM_START, replace_diagram
from chatkeep.storage.catalog import diff_snapshots, mermaid_diagram, snapshot
from chatkeep.storage.migrate import Migrator

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DOC = ROOT / "docs" / "schema.md"

KINDS = {
    "tables",
    "columns",
    "constraints",
    "indexes",
    "triggers",
    "functions",
    "types",
    "policies",
}


async def test_snapshot_describes_the_migrated_schema(conn: asyncpg.Connection) -> None:
    snap = await snapshot(conn)
    assert set(snap) == KINDS
    tables = {line.split(" | ")[0] for line in snap["tables"]}
    assert {"users", "rooms", "messages", "room_users", "message_read_status"} <= tables
    assert any(line.startswith("users | 2 | email | text | True") for line in snap["columns"])
    assert any("messages_room_seq_key" in line for line in snap["indexes"])
    assert any(line.startswith("room_type | e | public,private,direct") for line in snap["types"])
    assert any("messages_assign_seq" in line for line in snap["triggers"])
    assert any(line.startswith("chatkeep_uuidv7()") for line in snap["functions"])
    # The runner's own bookkeeping is not part of the application schema.
    everything = "\n".join(line for lines in snap.values() for line in lines)
    assert "chatkeep_schema_history" not in everything
    # Reading twice gives the same answer: nothing in it depends on time or order of reads.
    assert await snapshot(conn) == snap


async def test_diff_names_what_changed(conn: asyncpg.Connection) -> None:
    before = await snapshot(conn)
    assert diff_snapshots(before, before) == []
    async with conn.transaction():
        await conn.execute("ALTER TABLE users ADD COLUMN nickname text")
        await conn.execute("ALTER TABLE users DROP COLUMN avatar_url")
        await conn.execute("CREATE INDEX users_nickname_idx ON users (nickname)")
        await conn.execute("COMMENT ON TABLE rooms IS 'changed'")
        await conn.execute("ALTER TYPE room_role ADD VALUE 'guest'")
        await conn.execute("ALTER TABLE rooms ENABLE ROW LEVEL SECURITY")
        await conn.execute(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1';"
            "CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW"
            " EXECUTE FUNCTION chatkeep_set_updated_at()"
        )
        after = await snapshot(conn)
        changes = diff_snapshots(before, after)
        await conn.execute("ROLLBACK; BEGIN")  # undo, and let the block's COMMIT end cleanly
    joined = "\n".join(changes)
    # Places are among live columns: dropping avatar_url moves the later ones up one.
    assert "+ columns: users | 9 | nickname | text | False" in joined
    assert "- columns: users | 5 | avatar_url | text | False" in joined
    assert "+ indexes: users | users_nickname_idx" in joined
    assert "+ types: room_role | e | owner,admin,member,guest" in joined
    assert "+ triggers: users | t |" in joined
    assert "+ functions: f()" in joined
    assert any(c.startswith("+ tables: rooms | r | True") for c in changes)
    assert any(c.startswith("+ tables: rooms") and c.endswith("| changed") for c in changes)
    # Removed lines come before added ones within a kind, kinds in name order.
    kinds = [c.split(":")[0][2:] for c in changes]
    assert kinds == sorted(kinds)
    assert await snapshot(conn) == before


async def test_constraint_and_policy_changes_show(econn: asyncpg.Connection) -> None:
    await econn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    before = await snapshot(econn)
    await econn.execute("ALTER TABLE t ADD CONSTRAINT t_n_check CHECK (n > 0)")
    await econn.execute("CREATE POLICY t_all ON t USING (n > 1)")
    changes = diff_snapshots(before, await snapshot(econn))
    assert "+ constraints: t | t_n_check | c | CHECK (n > 0)" in changes
    assert any(c.startswith("+ policies: t | t_all | PERMISSIVE") for c in changes)


async def test_a_grant_and_its_revoke_leave_no_difference(econn: asyncpg.Connection) -> None:
    await econn.execute(
        "CREATE TABLE t (id int); CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"
    )
    before = await snapshot(econn)
    await econn.execute("GRANT SELECT ON t TO PUBLIC; REVOKE EXECUTE ON FUNCTION f() FROM PUBLIC")
    granted = diff_snapshots(before, await snapshot(econn))
    assert any(c.startswith("+ tables: t") for c in granted)
    assert any(c.startswith("+ functions: f()") for c in granted)
    # Undone, the privileges are spelled out instead of NULL, but they are the same ones.
    await econn.execute("REVOKE SELECT ON t FROM PUBLIC; GRANT EXECUTE ON FUNCTION f() TO PUBLIC")
    assert await econn.fetchval("SELECT relacl IS NOT NULL FROM pg_class WHERE relname = 't'")
    assert diff_snapshots(before, await snapshot(econn)) == []


async def test_diagram_of_a_small_schema(econn: asyncpg.Connection) -> None:
    await econn.execute(
        """
        CREATE TABLE people (
            id int PRIMARY KEY,
            email text NOT NULL,
            code text UNIQUE,
            born timestamptz
        );
        CREATE UNIQUE INDEX people_email_key ON people (lower(email));
        CREATE TABLE pets (
            id int PRIMARY KEY,
            owner_id int NOT NULL REFERENCES people ON DELETE CASCADE,
            sitter_id int REFERENCES people ON DELETE CASCADE,
            weight double precision
        );
        """
    )
    assert await mermaid_diagram(econn) == (
        "erDiagram\n"
        "    people {\n"
        "        integer id PK\n"
        "        text email UK\n"
        '        text code UK "nullable"\n'
        '        timestamptz born "nullable"\n'
        "    }\n"
        "    pets {\n"
        "        integer id PK\n"
        "        integer owner_id FK\n"
        '        integer sitter_id FK "nullable"\n'
        '        float8 weight "nullable"\n'
        "    }\n"
        '    people ||--o{ pets : "owner_id (pets_owner_id_fkey)"\n'
        '    people |o--o{ pets : "sitter_id (pets_sitter_id_fkey)"\n'
    )


async def test_diagram_leaves_out_the_migration_history(
    econn: asyncpg.Connection, tmp_path: Path
) -> None:
    (tmp_path / "001_t.sql").write_text("-- chatkeep:up\nCREATE TABLE t (id int);\n")
    await Migrator(econn, directory=tmp_path).up()
    assert (
        await mermaid_diagram(econn) == 'erDiagram\n    t {\n        integer id "nullable"\n    }\n'
    )


async def test_committed_schema_diagram_is_current(conn: asyncpg.Connection) -> None:
    # docs/schema.md must show the schema the migrations really build. If this fails, run
    # `chatkeep migrate up && chatkeep schema diagram --output docs/schema.md`.
    document = SCHEMA_DOC.read_text(encoding="utf-8")
    assert replace_diagram(document, await mermaid_diagram(conn)) == document


def test_replace_diagram_rewrites_only_the_marked_block() -> None:
    document = f"# Title\n\n{DIAGRAM_START}\nold\n{DIAGRAM_END}\n\nprose stays\n"
    updated = replace_diagram(document, "erDiagram\n    a {\n    }\n")
    assert updated == (
        f"# Title\n\n{DIAGRAM_START}\n```mermaid\nerDiagram\n    a {{\n    }}\n```\n"
        f"{DIAGRAM_END}\n\nprose stays\n"
    )
    # Idempotent: the same diagram again changes nothing.
    assert replace_diagram(updated, "erDiagram\n    a {\n    }\n") == updated
    with pytest.raises(ValueError, match="no diagram markers"):
        replace_diagram("# no markers\n", "erDiagram\n")
