"""Reading the live schema from the system catalog.

Two uses: ``chatkeep migrate verify`` compares snapshots before and after each migration's
round trip, and ``chatkeep schema diagram`` draws the entity-relationship diagram in
``docs/schema.md`` from what the database really holds, not from what we think it holds.
"""

from __future__ import annotations

import re
from typing import Final

import asyncpg

__all__ = ["HISTORY_OBJECT_PREFIX", "diff_snapshots", "mermaid_diagram", "snapshot"]

# The migration runner's own objects are not part of the application schema.
HISTORY_OBJECT_PREFIX: Final = "chatkeep_schema_history"

_TABLES: Final = """
SELECT c.relname,
       c.relkind::text,
       c.relrowsecurity,
       c.relforcerowsecurity,
       -- NULL means "the owner's default privileges"; after a GRANT and a REVOKE the same
       -- privileges are spelled out, maybe in another order: compare the effective set.
       (SELECT string_agg(a::text, ',' ORDER BY a::text)
          FROM unnest(coalesce(c.relacl, acldefault(
                   CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) a),
       coalesce(obj_description(c.oid, 'pg_class'), '')
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
   AND c.relname NOT LIKE $2
 ORDER BY c.relname
"""

# A column's place among the table's live columns, not its attnum: a migration that adds a
# column and whose down part drops it leaves a dropped attnum behind, so the column comes
# back one number higher, in the same place (the round trip check compares these).
_COLUMNS: Final = """
SELECT c.relname,
       row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
       a.attname,
       format_type(a.atttypid, a.atttypmod),
       a.attnotnull,
       coalesce(pg_get_expr(d.adbin, d.adrelid), ''),
       coalesce(col_description(c.oid, a.attnum), '')
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
   AND c.relname NOT LIKE $2
 ORDER BY c.relname, a.attnum
"""

_CONSTRAINTS: Final = """
SELECT c.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid, true)
  FROM pg_constraint k
  JOIN pg_class c ON c.oid = k.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname NOT LIKE $2 AND k.contype <> 'n'
 ORDER BY c.relname, k.conname
"""

_INDEXES: Final = """
SELECT i.tablename, i.indexname, i.indexdef
  FROM pg_indexes i
 WHERE i.schemaname = $1 AND i.tablename NOT LIKE $2
 ORDER BY i.tablename, i.indexname
"""

_TRIGGERS: Final = """
SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid, true), t.tgenabled::text
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND NOT t.tgisinternal AND c.relname NOT LIKE $2
 ORDER BY c.relname, t.tgname
"""

_FUNCTIONS: Final = """
SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       p.prosecdef,
       coalesce(p.proconfig::text, ''),
       (SELECT string_agg(a::text, ',' ORDER BY a::text)
          FROM unnest(coalesce(p.proacl, acldefault('f'::"char", p.proowner))) a),
       pg_get_userbyid(p.proowner),
       md5(p.prosrc)
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = $1 AND p.proname NOT LIKE $2
 ORDER BY 1
"""

_TYPES: Final = """
SELECT t.typname,
       t.typtype::text,
       coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                   FROM pg_enum e WHERE e.enumtypid = t.oid), '')
  FROM pg_type t
  JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = $1 AND t.typtype IN ('e', 'd', 'c') AND t.typname NOT LIKE $2
   AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
 ORDER BY t.typname
"""

_POLICIES: Final = """
SELECT p.tablename, p.policyname, p.permissive, p.roles::text, p.cmd,
       coalesce(p.qual, ''), coalesce(p.with_check, '')
  FROM pg_policies p
 WHERE p.schemaname = $1
 ORDER BY p.tablename, p.policyname
"""

_FOREIGN_KEYS: Final = """
SELECT src.relname, dst.relname, k.conname,
       (SELECT string_agg(a.attname, ',' ORDER BY a.attnum)
          FROM pg_attribute a
         WHERE a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey))
  FROM pg_constraint k
  JOIN pg_class src ON src.oid = k.conrelid
  JOIN pg_class dst ON dst.oid = k.confrelid
  JOIN pg_namespace n ON n.oid = src.relnamespace
 WHERE n.nspname = $1 AND k.contype = 'f' AND src.relname NOT LIKE $2
 ORDER BY src.relname, k.conname
"""


# Columns under a primary key, unique constraint or unique index (expression indexes such as
# lower(email) list their columns through pg_depend, plain ones through indkey).
_UNIQUE_COLUMNS: Final = """
SELECT c.relname,
       i.indisprimary,
       array(SELECT DISTINCT a.attname::text
               FROM pg_attribute a
              WHERE a.attrelid = i.indrelid
                AND (a.attnum = ANY (i.indkey::int2[])
                     OR a.attnum IN (SELECT d.refobjsubid FROM pg_depend d
                                      WHERE d.classid = 'pg_class'::regclass
                                        AND d.objid = i.indexrelid
                                        AND d.refclassid = 'pg_class'::regclass
                                        AND d.refobjid = i.indrelid))
                AND a.attnum > 0
              ORDER BY 1)
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND i.indisunique AND c.relname NOT LIKE $2
 ORDER BY 1, 2
"""

_SHORT_TYPES: Final = {
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "time with time zone": "timetz",
    "time without time zone": "time",
    "double precision": "float8",
    "character varying": "varchar",
}


def _rows(records: list[asyncpg.Record]) -> list[str]:
    return [" | ".join(str(value) for value in record.values()) for record in records]


async def snapshot(conn: asyncpg.Connection, schema: str = "public") -> dict[str, list[str]]:
    """Describe every object of ``schema`` as sorted text lines, grouped by kind.

    Two snapshots are equal exactly when tables, columns, defaults, constraints, indexes,
    triggers, functions, types, row-security flags, policies, grants and comments agree.
    """
    like = HISTORY_OBJECT_PREFIX + "%"
    result: dict[str, list[str]] = {}
    for kind, query in (
        ("tables", _TABLES),
        ("columns", _COLUMNS),
        ("constraints", _CONSTRAINTS),
        ("indexes", _INDEXES),
        ("triggers", _TRIGGERS),
        ("functions", _FUNCTIONS),
        ("types", _TYPES),
    ):
        result[kind] = _rows(await conn.fetch(query, schema, like))
    result["policies"] = _rows(await conn.fetch(_POLICIES, schema))
    return result


def diff_snapshots(before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    """Lines that differ between two snapshots, as ``-`` (only before) and ``+`` (only after)."""
    changes: list[str] = []
    for kind in sorted(set(before) | set(after)):
        old, new = set(before.get(kind, [])), set(after.get(kind, []))
        changes.extend(f"- {kind}: {line}" for line in sorted(old - new))
        changes.extend(f"+ {kind}: {line}" for line in sorted(new - old))
    return changes


def _mermaid_type(type_name: str) -> str:
    """A catalog type name as one Mermaid word: ``timestamp with time zone`` -> ``timestamptz``."""
    short = _SHORT_TYPES.get(type_name, type_name)
    return re.sub(r"[^A-Za-z0-9_\[\]]+", "_", short).strip("_")


async def mermaid_diagram(conn: asyncpg.Connection, schema: str = "public") -> str:
    """An entity-relationship diagram of ``schema`` in Mermaid syntax, read from the catalog.

    Tables in name order with their columns in table order; keys marked ``PK``, ``FK`` and
    ``UK`` (unique constraints and unique indexes, expression ones like ``lower(email)``
    included); nullable columns say so. Each foreign key is one relationship line, ``|o``
    on the referenced side when the referencing columns may be NULL. The output depends only
    on the schema, so it is the same on every supported PostgreSQL version.
    """
    like = HISTORY_OBJECT_PREFIX + "%"
    columns = await conn.fetch(_COLUMNS, schema, like)
    foreign_keys = await conn.fetch(_FOREIGN_KEYS, schema, like)
    tables = [r[0] for r in await conn.fetch(_TABLES, schema, like) if r[1] in ("r", "p")]

    primary: dict[str, set[str]] = {}
    unique: dict[str, set[str]] = {}
    for table, is_primary, cols in await conn.fetch(_UNIQUE_COLUMNS, schema, like):
        (primary if is_primary else unique).setdefault(table, set()).update(cols)
    referencing: dict[str, set[str]] = {}
    for src, _dst, _name, cols in foreign_keys:
        referencing.setdefault(src, set()).update(cols.split(","))
    nullable = {(r[0], r[2]) for r in columns if not r[4]}

    lines = ["erDiagram"]
    for table in tables:
        lines.append(f"    {table} {{")
        for record in columns:
            if record[0] != table:
                continue
            name = record[2]
            keys = []
            if name in primary.get(table, set()):
                keys.append("PK")
            if name in referencing.get(table, set()):
                keys.append("FK")
            if name in unique.get(table, set()) and "PK" not in keys:
                keys.append("UK")
            suffix = f" {','.join(keys)}" if keys else ""
            null = ' "nullable"' if (table, name) in nullable else ""
            lines.append(f"        {_mermaid_type(record[3])} {name}{suffix}{null}")
        lines.append("    }")
    for src, dst, name, cols in foreign_keys:
        # Mermaid: the referencing side is zero or more; the referenced side exactly one,
        # or zero or one when the referencing columns may be NULL.
        optional = any((src, col) in nullable for col in cols.split(","))
        left = "|o" if optional else "||"
        lines.append(f'    {dst} {left}--o{{ {src} : "{cols} ({name})"')
    return "\n".join(lines) + "\n"
