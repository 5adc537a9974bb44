"""Seeded data and table fingerprints for the backup and restore tests."""

from __future__ import annotations

import asyncpg

SEED_SQL = r"""
INSERT INTO users (email, password_hash, username, avatar_url, is_active, last_seen)
SELECT 'user' || g || '@example.com',
       '$2b$12$' || rpad(md5(g::text), 53, 'x'),
       'user_' || g,
       CASE WHEN g % 3 = 0 THEN 'https://img.example.com/' || g || '.png' END,
       g % 7 <> 0,
       CASE WHEN g % 2 = 0 THEN timestamptz '2024-01-01 00:00:00+00' + g * interval '1 min' END
  FROM generate_series(1, 40) g;

INSERT INTO rooms (name, description, type, created_by)
SELECT 'room ' || g,
       CASE WHEN g % 2 = 0 THEN 'about ' || g || E' — ünïcödé ☕ "quoted"\ttabbed' END,
       (CASE WHEN g % 2 = 0 THEN 'public' ELSE 'private' END)::room_type,
       (SELECT id FROM users WHERE username = 'user_' || g)
  FROM generate_series(1, 8) g;

INSERT INTO rooms (name, type, created_by, direct_user_low, direct_user_high)
SELECT 'direct', 'direct', a.id, least(a.id, b.id), greatest(a.id, b.id)
  FROM users a JOIN users b ON b.username = 'user_' || (substr(a.username, 6)::int + 1)
 WHERE substr(a.username, 6)::int <= 3;

INSERT INTO room_users (room_id, user_id, role)
SELECT r.id, u.id, CASE WHEN u.id = r.created_by THEN 'owner' ELSE 'member' END::room_role
  FROM rooms r CROSS JOIN users u
 WHERE r.type <> 'direct'
   AND (u.id = r.created_by OR abs(hashtext(r.name || u.username)) % 3 = 0);

INSERT INTO room_users (room_id, user_id, role)
SELECT r.id, u.id, 'member'
  FROM rooms r JOIN users u ON u.id IN (r.direct_user_low, r.direct_user_high)
 WHERE r.type = 'direct';

INSERT INTO messages (room_id, user_id, content, client_msg_id, type)
SELECT ru.room_id, ru.user_id,
       'message ' || g || E' with\ttabs, "quotes", back\\slash,\nnew lines and ünïcode 🎉',
       CASE WHEN g % 2 = 0 THEN 'client-' || g END,
       (CASE WHEN g % 5 = 0 THEN 'image' ELSE 'text' END)::message_type
  FROM room_users ru CROSS JOIN generate_series(1, 4) g
 ORDER BY ru.room_id, ru.user_id, g;

UPDATE messages SET is_edited = true, edited_at = created_at + interval '5 min'
 WHERE seq % 6 = 0;

INSERT INTO message_read_status (message_id, user_id)
SELECT m.id, ru.user_id
  FROM messages m JOIN room_users ru ON ru.room_id = m.room_id
 WHERE m.seq % 4 = 0 AND ru.user_id <> m.user_id;

UPDATE room_users ru
   SET last_read_seq = r.last_seq / 2, last_read_at = now()
  FROM rooms r
 WHERE r.id = ru.room_id AND r.type <> 'direct';
"""


async def seed(url: str) -> None:
    """Fill a migrated database with users, rooms, members, messages and receipts."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SEED_SQL)
    finally:
        await conn.close()


_TABLES = """
SELECT c.relname, c.relkind::text
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'S')
 ORDER BY c.relname
"""


async def fingerprints(url: str) -> dict[str, tuple[int, str]]:
    """Every table's row count and an md5 of its ordered rows; every sequence's position."""
    conn = await asyncpg.connect(url)
    try:
        result: dict[str, tuple[int, str]] = {}
        for name, kind in await conn.fetch(_TABLES):
            if kind == "S":
                row = await conn.fetchrow(f'SELECT last_value, is_called FROM public."{name}"')
                assert row is not None
                result[name] = (int(row["last_value"]), str(row["is_called"]))
                continue
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, "
                f"md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) AS h "
                f'FROM public."{name}" t'
            )
            assert row is not None
            result[name] = (int(row["n"]), str(row["h"]))
        return result
    finally:
        await conn.close()


async def object_count(url: str) -> int:
    """How many tables, views and sequences the public schema holds."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public'"
            )
        )
    finally:
        await conn.close()


async def server_major(url: str) -> int:
    """The server's major version."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT current_setting('server_version_num')")) // 10000
    finally:
        await conn.close()
