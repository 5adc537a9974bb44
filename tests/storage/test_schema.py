"""The schema of migrations 001-007, read from the catalog of a migrated database.

Every test here asks PostgreSQL, not the migration files: what the tables, types,
constraints, indexes and triggers really are, and that the rules are enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import scratch_database, url_for

# A syntactically valid bcrypt hash ($2b$, cost 12, 53 characters of salt and hash).
BCRYPT = "$2b$12$" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0"
TIMESTAMPTZ = "timestamp with time zone"

# (column, type, NOT NULL, default) per table, in column order.
EXPECTED_COLUMNS: dict[str, list[tuple[str, str, bool, str]]] = {
    "users": [
        ("id", "uuid", True, "chatkeep_uuidv7()"),
        ("email", "text", True, ""),
        ("password_hash", "text", True, ""),
        ("username", "text", True, ""),
        ("avatar_url", "text", False, ""),
        ("is_active", "boolean", True, "true"),
        ("last_seen", TIMESTAMPTZ, False, ""),
        ("created_at", TIMESTAMPTZ, True, "now()"),
        ("updated_at", TIMESTAMPTZ, True, "now()"),
    ],
    "rooms": [
        ("id", "uuid", True, "chatkeep_uuidv7()"),
        ("name", "text", True, ""),
        ("description", "text", False, ""),
        ("type", "room_type", True, ""),
        ("created_by", "uuid", True, ""),
        ("is_active", "boolean", True, "true"),
        ("last_seq", "bigint", True, "0"),
        ("direct_user_low", "uuid", False, ""),
        ("direct_user_high", "uuid", False, ""),
        ("created_at", TIMESTAMPTZ, True, "now()"),
        ("updated_at", TIMESTAMPTZ, True, "now()"),
        ("position", "bigint", True, "0"),
    ],
    "messages": [
        ("id", "uuid", True, "chatkeep_uuidv7()"),
        ("room_id", "uuid", True, ""),
        ("user_id", "uuid", True, ""),
        ("seq", "bigint", True, ""),
        ("client_msg_id", "text", False, ""),
        ("content", "text", True, ""),
        ("type", "message_type", True, "'text'::message_type"),
        ("is_edited", "boolean", True, "false"),
        ("edited_at", TIMESTAMPTZ, False, ""),
        ("created_at", TIMESTAMPTZ, True, "now()"),
        ("reply_to", "uuid", False, ""),
    ],
    "room_users": [
        ("room_id", "uuid", True, ""),
        ("user_id", "uuid", True, ""),
        ("role", "room_role", True, "'member'::room_role"),
        ("joined_at", TIMESTAMPTZ, True, "now()"),
        ("last_read_at", TIMESTAMPTZ, False, ""),
        ("last_read_seq", "bigint", True, "0"),
        ("unread_mentions", "bigint", True, "0"),
    ],
    "message_read_status": [
        ("message_id", "uuid", True, ""),
        ("user_id", "uuid", True, ""),
        ("read_at", TIMESTAMPTZ, True, "now()"),
    ],
}

COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       coalesce(pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""

FOREIGN_KEYS = """
SELECT k.conname, k.conrelid::regclass::text AS tbl, k.confrelid::regclass::text AS ref,
       k.confdeltype::text AS confdeltype, k.conrelid, k.conkey
  FROM pg_constraint k
  JOIN pg_namespace n ON n.oid = k.connamespace
 WHERE k.contype = 'f' AND n.nspname = 'public'
 ORDER BY 1
"""

# An index serves a foreign key when the key's columns lead it. A partial index still
# serves it if its predicate is "column IS NOT NULL": the referencing query compares the
# column with =, which PostgreSQL proves implies IS NOT NULL.
FK_INDEXES = """
SELECT i.indexrelid::regclass::text, pg_get_expr(i.indpred, i.indrelid)
  FROM pg_index i
 WHERE i.indrelid = $1
   AND (i.indkey::int2[])[0:cardinality($2::int2[]) - 1] = $2::int2[]
"""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared(admin_url: str, template_database: str) -> AsyncIterator[asyncpg.Connection]:
    """One migrated database for the whole module (cloning one per test is the slow part)."""
    async with scratch_database(admin_url, "chatkeep_schema", template=template_database) as name:
        connection = await asyncpg.connect(url_for(admin_url, name))
        try:
            yield connection
        finally:
            await connection.close()


@pytest_asyncio.fixture(loop_scope="session")
async def tx(shared: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """The shared database inside a transaction that is rolled back after the test.

    Only for tests that need no commit: now() is fixed inside one transaction, so
    timestamp tests use ``conn`` (a database of their own) instead.
    """
    transaction = shared.transaction()
    await transaction.start()
    try:
        yield shared
    finally:
        await transaction.rollback()


@contextlib.asynccontextmanager
async def refused(
    conn: asyncpg.Connection, error: type[asyncpg.PostgresError]
) -> AsyncIterator[pytest.ExceptionInfo[asyncpg.PostgresError]]:
    """Expect ``error`` from the block, under a savepoint so the transaction lives on."""
    with pytest.raises(error) as info:
        async with conn.transaction():
            yield info


async def make_user(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    user_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO users (email, password_hash, username) VALUES ($1, $2, $3) RETURNING id",
        f"{name}@example.com",
        BCRYPT,
        name,
    )
    return user_id


async def make_room(
    conn: asyncpg.Connection, owner: uuid.UUID, name: str = "general", kind: str = "public"
) -> uuid.UUID:
    room_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO rooms (name, type, created_by) VALUES ($1, $2, $3) RETURNING id",
        name,
        kind,
        owner,
    )
    return room_id


async def make_direct(conn: asyncpg.Connection, a: uuid.UUID, b: uuid.UUID) -> uuid.UUID:
    low, high = sorted((a, b))
    room_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO rooms (name, type, created_by, direct_user_low, direct_user_high)"
        " VALUES ('dm', 'direct', $1, $2, $3) RETURNING id",
        a,
        low,
        high,
    )
    return room_id


async def post(conn: asyncpg.Connection, room: uuid.UUID, user: uuid.UUID, text: str) -> int:
    seq: int = await conn.fetchval(
        "INSERT INTO messages (room_id, user_id, content) VALUES ($1, $2, $3) RETURNING seq",
        room,
        user,
        text,
    )
    return seq


# -- tables and columns -------------------------------------------------------------------


@pytest.mark.parametrize("table", sorted(EXPECTED_COLUMNS))
async def test_columns_types_not_nulls_and_defaults(tx: asyncpg.Connection, table: str) -> None:
    rows = await tx.fetch(COLUMNS, table)
    assert [tuple(r) for r in rows] == EXPECTED_COLUMNS[table]


async def test_every_timestamp_is_timestamptz(tx: asyncpg.Connection) -> None:
    naive = await tx.fetch(
        "SELECT c.relname, a.attname FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND a.atttypid = 'timestamp'::regtype"
    )
    assert naive == []


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("users", ["id"]),
        ("rooms", ["id"]),
        ("messages", ["id"]),
        ("room_users", ["room_id", "user_id"]),
        ("message_read_status", ["message_id", "user_id"]),
        ("room_changes", ["room_id", "position"]),
        ("message_reactions", ["message_id", "emoji", "user_id"]),
    ],
)
async def test_primary_keys(tx: asyncpg.Connection, table: str, columns: list[str]) -> None:
    found = await tx.fetchval(
        "SELECT array_agg(a.attname ORDER BY k.ord)"
        "  FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY k(attnum, ord)"
        "  JOIN pg_attribute a ON a.attnum = k.attnum"
        " WHERE c.conrelid = $1::regclass AND a.attrelid = c.conrelid AND c.contype = 'p'",
        table,
    )
    assert found == columns


@pytest.mark.parametrize(
    ("enum", "labels"),
    [
        ("room_type", ["public", "private", "direct"]),
        ("message_type", ["text", "image", "file", "system"]),
        ("room_role", ["owner", "admin", "member"]),
    ],
)
async def test_enum_labels(tx: asyncpg.Connection, enum: str, labels: list[str]) -> None:
    found = await tx.fetchval(
        "SELECT array_agg(enumlabel ORDER BY enumsortorder) FROM pg_enum"
        " WHERE enumtypid = $1::regtype",
        enum,
    )
    assert found == labels


# -- foreign keys -------------------------------------------------------------------------


async def test_foreign_keys_are_the_expected_ones(tx: asyncpg.Connection) -> None:
    rows = await tx.fetch(FOREIGN_KEYS)
    assert {(r["tbl"], r["conname"], r["ref"]) for r in rows} >= {
        ("rooms", "rooms_created_by_fkey", "users"),
        ("rooms", "rooms_direct_user_low_fkey", "users"),
        ("rooms", "rooms_direct_user_high_fkey", "users"),
        ("messages", "messages_room_id_fkey", "rooms"),
        ("messages", "messages_user_id_fkey", "users"),
        ("room_users", "room_users_room_id_fkey", "rooms"),
        ("room_users", "room_users_user_id_fkey", "users"),
        ("message_read_status", "message_read_status_message_id_fkey", "messages"),
        ("message_read_status", "message_read_status_user_id_fkey", "users"),
        ("room_changes", "room_changes_room_id_fkey", "rooms"),
        ("message_reactions", "message_reactions_message_id_fkey", "messages"),
        ("message_reactions", "message_reactions_user_id_fkey", "users"),
        ("threads", "threads_root_id_fkey", "messages"),
        ("threads", "threads_room_id_fkey", "rooms"),
        ("thread_followers", "thread_followers_root_id_fkey", "messages"),
        ("thread_followers", "thread_followers_user_id_fkey", "users"),
        ("message_mentions", "message_mentions_message_id_fkey", "messages"),
        ("message_mentions", "message_mentions_user_id_fkey", "users"),
    }


async def test_every_foreign_key_cascades_on_delete(tx: asyncpg.Connection) -> None:
    rows = await tx.fetch(FOREIGN_KEYS)
    assert rows
    assert {r["conname"]: r["confdeltype"] for r in rows if r["confdeltype"] != "c"} == {}


async def test_every_foreign_key_is_indexed(tx: asyncpg.Connection) -> None:
    unindexed = []
    for fk in await tx.fetch(FOREIGN_KEYS):
        column_names = await tx.fetchval(
            "SELECT array_agg(attname::text) FROM pg_attribute"
            " WHERE attrelid = $1 AND attnum = ANY ($2::int2[])",
            fk["conrelid"],
            fk["conkey"],
        )
        serving = [
            name
            for name, predicate in await tx.fetch(FK_INDEXES, fk["conrelid"], fk["conkey"])
            if predicate is None or predicate == f"({column_names[0]} IS NOT NULL)"
        ]
        if not serving:
            unindexed.append(fk["conname"])
    assert unindexed == []


async def test_deleting_a_user_cascades_to_everything_of_theirs(tx: asyncpg.Connection) -> None:
    alice, bob = await make_user(tx, "alice"), await make_user(tx, "bobby")
    room = await make_room(tx, alice)
    await tx.execute("INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)", room, bob)
    await post(tx, room, bob, "hello")
    message = await tx.fetchval("SELECT id FROM messages")
    await tx.execute(
        "INSERT INTO message_read_status (message_id, user_id) VALUES ($1, $2)", message, alice
    )
    dm = await make_direct(tx, alice, bob)
    await tx.execute("DELETE FROM users WHERE id = $1", alice)
    # alice's room (and everything in it) and the DM went with her.
    assert await tx.fetchval("SELECT count(*) FROM rooms WHERE id = ANY ($1)", [room, dm]) == 0
    assert await tx.fetchval("SELECT count(*) FROM messages") == 0
    assert await tx.fetchval("SELECT count(*) FROM room_users") == 0
    assert await tx.fetchval("SELECT count(*) FROM message_read_status") == 0
    assert await tx.fetchval("SELECT count(*) FROM users") == 1


# -- indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "table", "fragment"),
    [
        ("users_email_lower_key", "users", "UNIQUE INDEX users_email_lower_key"),
        ("users_username_lower_key", "users", "btree (lower(username))"),
        ("users_active_username_idx", "users", "(lower(username)) WHERE is_active"),
        ("rooms_created_by_idx", "rooms", "btree (created_by)"),
        ("rooms_direct_pair_key", "rooms", "btree (direct_user_low, direct_user_high)"),
        ("rooms_direct_user_high_idx", "rooms", "WHERE (direct_user_high IS NOT NULL)"),
        (
            "rooms_active_public_idx",
            "rooms",
            "(created_at DESC) WHERE (is_active AND (type = 'public'::room_type))",
        ),
        ("messages_room_seq_key", "messages", "UNIQUE INDEX messages_room_seq_key"),
        ("messages_room_seq_key", "messages", "btree (room_id, seq)"),
        ("messages_user_id_idx", "messages", "btree (user_id)"),
        ("messages_created_at_idx", "messages", "USING brin (created_at)"),
        ("messages_client_msg_id_key", "messages", "(room_id, user_id, client_msg_id)"),
        ("room_users_pkey", "room_users", "btree (room_id, user_id)"),
        (
            "room_users_user_id_idx",
            "room_users",
            "btree (user_id, room_id) INCLUDE (role, last_read_seq, unread_mentions)",
        ),
        ("message_read_status_user_id_idx", "message_read_status", "btree (user_id)"),
        ("room_changes_occurred_at_idx", "room_changes", "USING brin (occurred_at)"),
        ("message_reactions_user_id_idx", "message_reactions", "btree (user_id)"),
    ],
)
async def test_expected_indexes_exist(
    tx: asyncpg.Connection, index: str, table: str, fragment: str
) -> None:
    definition = await tx.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND indexname = $1"
        " AND tablename = $2",
        index,
        table,
    )
    assert definition is not None, f"index {index} is missing"
    assert fragment in definition


async def test_history_reads_use_the_room_seq_index(tx: asyncpg.Connection) -> None:
    # With sequential scans off, a keyset page must be answerable from the (room_id, seq)
    # index; if the index were missing or unusable the plan would still say Seq Scan.
    await tx.execute("SET LOCAL enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await tx.fetch(
            "EXPLAIN SELECT * FROM messages WHERE room_id = $1 AND seq < $2"
            " ORDER BY seq DESC LIMIT 50",
            uuid.uuid4(),
            100,
        )
    )
    assert "messages_room_seq_key" in plan


# -- check constraints and uniqueness -----------------------------------------------------

BadRow = Callable[[asyncpg.Connection, dict[str, Any]], Awaitable[object]]


async def _bad_user(conn: asyncpg.Connection, values: dict[str, Any]) -> object:
    row = {"email": "ok@example.com", "password_hash": BCRYPT, "username": "okname"} | values
    return await conn.execute(
        "INSERT INTO users (email, password_hash, username, avatar_url) VALUES ($1, $2, $3, $4)",
        row["email"],
        row["password_hash"],
        row["username"],
        row.get("avatar_url"),
    )


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        ({"email": ""}, "users_email_check"),
        ({"email": "no-at-sign"}, "users_email_check"),
        ({"email": "@example.com"}, "users_email_check"),
        ({"email": "a" * 250 + "@x.io"}, "users_email_check"),
        ({"username": ""}, "users_username_check"),
        ({"username": "ab"}, "users_username_check"),
        ({"username": " padded "}, "users_username_check"),
        ({"username": "x" * 33}, "users_username_check"),
        ({"password_hash": "plaintext"}, "users_password_hash_check"),
        ({"password_hash": BCRYPT[:-1]}, "users_password_hash_check"),
        ({"avatar_url": "javascript:alert(1)"}, "users_avatar_url_check"),
        ({"avatar_url": "https://x.io/" + "a" * 2048}, "users_avatar_url_check"),
    ],
)
async def test_bad_users_are_refused(
    tx: asyncpg.Connection, values: dict[str, Any], constraint: str
) -> None:
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await _bad_user(tx, values)
    assert info.value.constraint_name == constraint


async def test_good_user_with_avatar_is_accepted(tx: asyncpg.Connection) -> None:
    await _bad_user(tx, {"avatar_url": "https://cdn.example.com/a.png"})
    assert await tx.fetchval("SELECT count(*) FROM users") == 1


@pytest.mark.parametrize("column", ["email", "password_hash", "username"])
async def test_required_user_columns_refuse_null(tx: asyncpg.Connection, column: str) -> None:
    async with refused(tx, asyncpg.NotNullViolationError) as info:
        await _bad_user(tx, {column: None})
    assert info.value.column_name == column


async def test_email_and_username_are_unique_case_insensitively(
    tx: asyncpg.Connection,
) -> None:
    await make_user(tx, "alice")
    async with refused(tx, asyncpg.UniqueViolationError) as info:
        await _bad_user(tx, {"email": "ALICE@Example.COM", "username": "other"})
    assert info.value.constraint_name == "users_email_lower_key"
    async with refused(tx, asyncpg.UniqueViolationError) as info:
        await _bad_user(tx, {"email": "other@example.com", "username": "ALICE"})
    assert info.value.constraint_name == "users_username_lower_key"
    # The stored spelling is kept as given.
    await _bad_user(tx, {"email": "Bob@Example.com", "username": "Bobby"})
    assert await tx.fetchval("SELECT email FROM users WHERE username = 'Bobby'") == (
        "Bob@Example.com"
    )


@pytest.mark.parametrize(
    ("name", "description", "constraint"),
    [
        ("", None, "rooms_name_check"),
        ("   ", None, "rooms_name_check"),
        ("x" * 101, None, "rooms_name_check"),
        ("ok", "d" * 1001, "rooms_description_check"),
    ],
)
async def test_bad_rooms_are_refused(
    tx: asyncpg.Connection, name: str, description: str | None, constraint: str
) -> None:
    owner = await make_user(tx, "owner")
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute(
            "INSERT INTO rooms (name, description, type, created_by) VALUES ($1, $2, 'public', $3)",
            name,
            description,
            owner,
        )
    assert info.value.constraint_name == constraint


async def test_room_type_must_be_a_label(tx: asyncpg.Connection) -> None:
    owner = await make_user(tx, "owner")
    async with refused(tx, asyncpg.InvalidTextRepresentationError):
        await make_room(tx, owner, kind="secret")


async def test_negative_last_seq_is_refused(tx: asyncpg.Connection) -> None:
    room = await make_room(tx, await make_user(tx, "owner"))
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute("UPDATE rooms SET last_seq = -1 WHERE id = $1", room)
    assert info.value.constraint_name == "rooms_last_seq_check"


async def test_direct_pairs_are_checked(tx: asyncpg.Connection) -> None:
    a, b = await make_user(tx, "alice"), await make_user(tx, "bobby")
    low, high = sorted((a, b))
    bad = [
        # a direct room needs both users
        ("direct", None, None),
        ("direct", low, None),
        # and them in order, smaller id first
        ("direct", high, low),
        # other rooms have no pair
        ("public", low, high),
        ("private", None, high),
    ]
    for kind, first, second in bad:
        async with refused(tx, asyncpg.CheckViolationError) as info:
            await tx.execute(
                "INSERT INTO rooms (name, type, created_by, direct_user_low, direct_user_high)"
                " VALUES ('dm', $1, $2, $3, $4)",
                kind,
                a,
                first,
                second,
            )
        assert info.value.constraint_name == "rooms_direct_pair_check"
    # A note to self is a direct room with the same user twice.
    await make_direct(tx, a, a)


async def test_direct_room_is_unique_per_unordered_pair(tx: asyncpg.Connection) -> None:
    a, b = await make_user(tx, "alice"), await make_user(tx, "bobby")
    await make_direct(tx, a, b)
    async with refused(tx, asyncpg.UniqueViolationError) as info:
        await make_direct(tx, b, a)
    assert info.value.constraint_name == "rooms_direct_pair_key"
    # Many non-direct rooms (NULL pairs) are fine.
    await make_room(tx, a, "one")
    await make_room(tx, a, "two")


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("content", "", "messages_content_check"),
        ("content", " \t\r\n ", "messages_content_check"),
        ("content", "x" * 10001, "messages_content_check"),
        ("client_msg_id", "", "messages_client_msg_id_check"),
        ("client_msg_id", "c" * 65, "messages_client_msg_id_check"),
    ],
)
async def test_bad_messages_are_refused(
    tx: asyncpg.Connection, column: str, value: str, constraint: str
) -> None:
    user = await make_user(tx, "alice")
    room = await make_room(tx, user)
    row = {"content": "hi", "client_msg_id": None, column: value}
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute(
            "INSERT INTO messages (room_id, user_id, content, client_msg_id)"
            " VALUES ($1, $2, $3, $4)",
            room,
            user,
            row["content"],
            row["client_msg_id"],
        )
    assert info.value.constraint_name == constraint
    # The refused insert allocated no seq: the counter is untouched.
    assert await tx.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room) == 0


async def test_message_seq_and_edit_rules(tx: asyncpg.Connection) -> None:
    user = await make_user(tx, "alice")
    room = await make_room(tx, user)
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute(
            "INSERT INTO messages (room_id, user_id, content, seq) VALUES ($1, $2, 'x', 0)",
            room,
            user,
        )
    assert info.value.constraint_name == "messages_seq_check"
    await post(tx, room, user, "hello")
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute("UPDATE messages SET is_edited = true")
    assert info.value.constraint_name == "messages_edited_check"
    await tx.execute("UPDATE messages SET is_edited = true, edited_at = now(), content = 'hi'")
    async with refused(tx, asyncpg.UniqueViolationError) as unique:
        await tx.execute(
            "INSERT INTO messages (room_id, user_id, content, seq) VALUES ($1, $2, 'x', 1)",
            room,
            user,
        )
    assert unique.value.constraint_name == "messages_room_seq_key"


async def test_client_message_id_is_unique_per_room_and_user(tx: asyncpg.Connection) -> None:
    alice, bob = await make_user(tx, "alice"), await make_user(tx, "bobby")
    room = await make_room(tx, alice)
    insert = (
        "INSERT INTO messages (room_id, user_id, content, client_msg_id) VALUES ($1, $2, 'x', $3)"
    )
    await tx.execute(insert, room, alice, "c-1")
    await tx.execute(insert, room, bob, "c-1")  # another sender may reuse it
    await tx.execute(insert, room, alice, None)
    await tx.execute(insert, room, alice, None)  # no id, no rule
    async with refused(tx, asyncpg.UniqueViolationError) as info:
        await tx.execute(insert, room, alice, "c-1")
    assert info.value.constraint_name == "messages_client_msg_id_key"


async def test_membership_and_receipt_rules(tx: asyncpg.Connection) -> None:
    alice = await make_user(tx, "alice")
    room = await make_room(tx, alice)
    await tx.execute(
        "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'owner')", room, alice
    )
    row = await tx.fetchrow("SELECT role, last_read_seq, last_read_at FROM room_users")
    assert row is not None
    assert tuple(row) == ("owner", 0, None)
    async with refused(tx, asyncpg.UniqueViolationError):
        await tx.execute("INSERT INTO room_users (room_id, user_id) VALUES ($1, $2)", room, alice)
    async with refused(tx, asyncpg.CheckViolationError) as info:
        await tx.execute("UPDATE room_users SET last_read_seq = -1")
    assert info.value.constraint_name == "room_users_last_read_seq_check"
    async with refused(tx, asyncpg.InvalidTextRepresentationError):
        await tx.execute("UPDATE room_users SET role = 'king'")
    await post(tx, room, alice, "hi")
    message = await tx.fetchval("SELECT id FROM messages")
    receipt = "INSERT INTO message_read_status (message_id, user_id) VALUES ($1, $2)"
    await tx.execute(receipt, message, alice)
    async with refused(tx, asyncpg.UniqueViolationError):
        await tx.execute(receipt, message, alice)
    async with refused(tx, asyncpg.ForeignKeyViolationError):
        await tx.execute(receipt, uuid.uuid4(), alice)


# -- triggers -----------------------------------------------------------------------------


async def test_updated_at_moves_on_a_real_change_only(conn: asyncpg.Connection) -> None:
    user = await make_user(conn, "alice")
    created = await conn.fetchval("SELECT updated_at FROM users WHERE id = $1", user)
    await conn.execute("UPDATE users SET username = username WHERE id = $1", user)
    assert await conn.fetchval("SELECT updated_at FROM users WHERE id = $1", user) == created
    await conn.execute("UPDATE users SET avatar_url = 'https://x.io/a.png' WHERE id = $1", user)
    changed = await conn.fetchval("SELECT updated_at FROM users WHERE id = $1", user)
    assert changed > created
    # The trigger wins over a value written by hand.
    await conn.execute(
        "UPDATE users SET is_active = false, updated_at = '2000-01-01' WHERE id = $1", user
    )
    assert await conn.fetchval("SELECT updated_at FROM users WHERE id = $1", user) > changed


async def test_room_updated_at_ignores_the_message_counter(conn: asyncpg.Connection) -> None:
    user = await make_user(conn, "alice")
    room = await make_room(conn, user)
    before = await conn.fetchval("SELECT updated_at FROM rooms WHERE id = $1", room)
    await post(conn, room, user, "one")
    await conn.execute("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1", room)
    assert await conn.fetchval("SELECT updated_at FROM rooms WHERE id = $1", room) == before
    await conn.execute("UPDATE rooms SET name = 'renamed' WHERE id = $1", room)
    assert await conn.fetchval("SELECT updated_at FROM rooms WHERE id = $1", room) > before


async def test_messages_without_seq_take_the_next_one_gaplessly(
    tx: asyncpg.Connection,
) -> None:
    user = await make_user(tx, "alice")
    room, other = await make_room(tx, user, "a"), await make_room(tx, user, "b")
    assert [await post(tx, room, user, f"m{i}") for i in range(5)] == [1, 2, 3, 4, 5]
    assert await post(tx, other, user, "elsewhere") == 1
    assert await tx.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room) == 5
    # A failed insert (check violation) rolls its seq back with it: no gap.
    async with refused(tx, asyncpg.CheckViolationError):
        await post(tx, room, user, " ")
    assert await post(tx, room, user, "next") == 6


async def test_concurrent_senders_get_gapless_commit_ordered_seqs(
    conn: asyncpg.Connection, database_url: str
) -> None:
    user = await make_user(conn, "alice")
    room = await make_room(conn, user)
    senders = [await asyncpg.connect(database_url) for _ in range(4)]
    try:

        async def send(c: asyncpg.Connection, n: int) -> None:
            for i in range(n):
                await post(c, room, user, f"m{i}")

        await asyncio.gather(*(send(c, 10) for c in senders))
    finally:
        for c in senders:
            await c.close()
    seqs = [r[0] for r in await conn.fetch("SELECT seq FROM messages ORDER BY seq")]
    assert seqs == list(range(1, 41))
    assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room) == 40


async def test_message_in_a_missing_room_is_a_foreign_key_violation(
    tx: asyncpg.Connection,
) -> None:
    user = await make_user(tx, "alice")
    async with refused(tx, asyncpg.ForeignKeyViolationError) as info:
        await post(tx, uuid.uuid4(), user, "into the void")
    assert info.value.constraint_name == "messages_room_id_fkey"
    # With a seq given, the trigger stays out of it and the real foreign key refuses it.
    async with refused(tx, asyncpg.ForeignKeyViolationError) as info:
        await tx.execute(
            "INSERT INTO messages (room_id, user_id, content, seq) VALUES ($1, $2, 'x', 1)",
            uuid.uuid4(),
            user,
        )
    assert info.value.constraint_name == "messages_room_id_fkey"


# -- UUIDv7 -------------------------------------------------------------------------------


async def test_uuidv7_default_is_version_7_and_time_ordered(tx: asyncpg.Connection) -> None:
    before_ms = int(time.time() * 1000)
    ids: list[uuid.UUID] = [
        r[0]
        for r in await tx.fetch(
            "SELECT chatkeep_uuidv7() FROM generate_series(1, 200) ORDER BY generate_series"
        )
    ]
    await asyncio.sleep(0.005)
    later: uuid.UUID = await tx.fetchval("SELECT chatkeep_uuidv7()")
    after_ms = int(time.time() * 1000)
    assert len(set(ids)) == 200
    for value in [*ids, later]:
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
    stamps = [value.int >> 80 for value in ids]
    assert stamps == sorted(stamps)
    assert stamps[-1] < later.int >> 80
    # The 48-bit prefix is Unix milliseconds (the server shares this machine's clock).
    assert before_ms - 1000 <= stamps[0] <= after_ms + 1000


async def test_rows_get_uuidv7_ids_by_default(tx: asyncpg.Connection) -> None:
    first = await make_user(tx, "alice")
    await asyncio.sleep(0.005)
    second = await make_user(tx, "bobby")
    assert first.version == second.version == 7
    assert first < second
