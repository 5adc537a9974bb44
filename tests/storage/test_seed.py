from __future__ import annotations

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import ConfigurationError, InvalidInput
from chatkeep.storage import Database, UserRepository
from chatkeep.storage.seed import SEED_PASSWORD, seed


async def test_seed_writes_a_consistent_realistic_database(
    db: Database, conn: asyncpg.Connection
) -> None:
    stages: list[str] = []
    report = await seed(
        db,
        users=60,
        rooms=15,
        messages=3_000,
        rng_seed=11,
        progress=lambda stage, done, total: stages.append(stage),
    )
    assert {
        "users",
        "rooms",
        "memberships",
        "messages",
        "receipts",
        "reactions",
        "analyze",
    } <= set(stages)
    assert (report.users, report.rooms, report.messages) == (60, 15, 3_000)
    assert report.direct_rooms == 3
    assert await conn.fetchval("SELECT count(*) FROM users") == 60
    assert await conn.fetchval("SELECT count(*) FROM rooms") == 15
    assert await conn.fetchval("SELECT count(*) FROM room_users") == report.memberships
    assert await conn.fetchval("SELECT count(*) FROM messages") == 3_000
    assert await conn.fetchval("SELECT count(*) FROM message_read_status") == report.receipts

    # Threads, mentions and reactions, in realistic proportions, built by the triggers.
    replies = await conn.fetchval("SELECT count(*) FROM messages WHERE reply_to IS NOT NULL")
    assert replies == report.replies
    assert 0.05 * 3_000 < replies < 0.2 * 3_000
    assert await conn.fetchval("SELECT sum(reply_count) FROM threads") == replies
    longest = await conn.fetchval("SELECT max(reply_count) FROM threads")
    threads = await conn.fetchval("SELECT count(*) FROM threads")
    assert longest >= 3 * replies / threads  # a few long threads, many short ones
    assert threads < replies / 2
    # Every reply's root is in its room and is not itself a reply.
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM messages r JOIN messages t ON t.id = r.reply_to"
            " WHERE t.room_id <> r.room_id OR t.reply_to IS NOT NULL"
        )
        == 0
    )
    mentioned = await conn.fetchval("SELECT count(DISTINCT message_id) FROM message_mentions")
    assert 0 < mentioned <= report.mentions
    assert report.mentions < 0.06 * 3_000
    reactions = await conn.fetchval("SELECT count(*) FROM message_reactions")
    assert reactions == report.reactions > 0

    # seq is 1..last_seq in every room, and in time order.
    bad_rooms = await conn.fetchval(
        """
        SELECT count(*) FROM rooms r
         WHERE r.last_seq <> (SELECT count(*) FROM messages m WHERE m.room_id = r.id)
            OR r.last_seq <> coalesce((SELECT max(seq) FROM messages m WHERE m.room_id = r.id), 0)
        """
    )
    assert bad_rooms == 0
    out_of_order = await conn.fetchval(
        """
        SELECT count(*) FROM (
            SELECT created_at < lag(created_at) OVER (PARTITION BY room_id ORDER BY seq) AS back
              FROM messages) t
         WHERE back
        """
    )
    assert out_of_order == 0
    # Authors are members; watermarks never pass the room's counter.
    assert (
        await conn.fetchval(
            """
        SELECT count(*) FROM messages m
         WHERE NOT EXISTS (SELECT 1 FROM room_users ru
                            WHERE ru.room_id = m.room_id AND ru.user_id = m.user_id)
        """
        )
        == 0
    )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM room_users ru JOIN rooms r ON r.id = ru.room_id"
            " WHERE ru.last_read_seq > r.last_seq"
        )
        == 0
    )
    # Skewed: the biggest room is much bigger than the smallest group room.
    sizes = await conn.fetch(
        "SELECT r.type, count(*) AS n FROM room_users ru JOIN rooms r ON r.id = ru.room_id"
        " GROUP BY r.id, r.type"
    )
    group = [row["n"] for row in sizes if row["type"] != "direct"]
    assert max(group) >= 4 * min(group)
    assert all(row["n"] == 2 for row in sizes if row["type"] == "direct")
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM room_users ru JOIN rooms r ON r.id = ru.room_id"
            " WHERE r.type <> 'direct' AND ru.role = 'owner'"
        )
        == 12
    )
    # Read states: caught up, behind and never read all occur.
    states = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE ru.last_read_seq = r.last_seq) AS caught_up,
               count(*) FILTER (WHERE ru.last_read_seq BETWEEN 1 AND r.last_seq - 1) AS behind,
               count(*) FILTER (WHERE ru.last_read_seq = 0 AND r.last_seq > 0) AS never
          FROM room_users ru JOIN rooms r ON r.id = ru.room_id
        """
    )
    assert states is not None
    assert min(states["caught_up"], states["behind"], states["never"]) > 0
    # Receipts only ahead of the reader's watermark, never on their own messages.
    assert (
        await conn.fetchval(
            """
        SELECT count(*) FROM message_read_status s
          JOIN messages m ON m.id = s.message_id
          JOIN room_users ru ON ru.room_id = m.room_id AND ru.user_id = s.user_id
         WHERE m.seq > ru.last_read_seq AND m.user_id <> s.user_id
        """
        )
        == report.receipts
    )
    # Many short messages, some long ones.
    lengths = await conn.fetchrow(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY char_length(content)) AS median,"
        " max(char_length(content)) AS longest FROM messages"
    )
    assert lengths is not None
    assert lengths["median"] < 80
    assert lengths["longest"] > 1_000


async def test_seeded_users_can_log_in_and_runs_add_up(db: Database) -> None:
    await seed(db, users=5, rooms=2, messages=10)
    await seed(db, users=5, rooms=2, messages=0)
    assert await db.fetchval("t.count", "SELECT count(*) FROM users") == 10
    email = await db.fetchval("t.email", "SELECT email FROM users ORDER BY email LIMIT 1")
    user = await UserRepository(db, bcrypt_rounds=10).authenticate(email, SEED_PASSWORD)
    assert user is None or user.email == email  # 2% of seeded users are inactive
    assert await db.fetchval("t.active", "SELECT count(*) FROM users WHERE is_active") > 0


async def test_seed_checks_its_input(db: Database) -> None:
    for field, (users, rooms, messages) in (
        ("users", (1, 1, 0)),
        ("rooms", (2, 0, 0)),
        ("messages", (2, 1, -1)),
    ):
        with pytest.raises(InvalidInput) as info:
            await seed(db, users=users, rooms=rooms, messages=messages)
        assert info.value.field == field


async def test_a_failed_seed_leaves_nothing(db: Database) -> None:
    def explode(stage: str, done: int, total: int) -> None:
        if stage == "messages" and done:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        await seed(db, users=10, rooms=3, messages=100, progress=explode)
    assert await db.fetchval("t.count", "SELECT count(*) FROM users") == 0
    assert await db.fetchval("t.count", "SELECT count(*) FROM rooms") == 0


async def test_seed_needs_the_schema(empty_database_url: str) -> None:
    async with Database(Settings(database_url=empty_database_url), min_size=1) as db:
        with pytest.raises(ConfigurationError, match="migrate up"):
            await seed(db, users=2, rooms=1, messages=1)
