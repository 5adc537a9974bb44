"""Full-text search at scale: latency through row security, index build, write-path cost.

Issue 14 item 4 asks for 5,000,000 messages, a user in 200 rooms and a two-word query at
p50 < 50 ms and p99 < 200 ms, through row security as ``chatapp_app``; the time to build
the index; and sends with the index at >= 0.85x of sends without it.

The script works in its own database (``--database-name``, by default
``chatkeep_bench_search_h5``), built once with ``generate_series`` from a made-up word list
(4,000 words; each message 6-14 words drawn with a skew, so a few words are common and most
are rare) and kept for the next run. 2,000 private rooms hold the messages; the searching
user is a member of 200 of them. Each run:

1. **Sends without the index** (the GIN index dropped): ``MessageRepository.send`` acting as
   a member, as ``chatapp_app``, from ``--tasks`` tasks in rooms of their own, for
   ``--seconds`` per round; sends/s.
2. **Index build**: ``CREATE INDEX CONCURRENTLY`` of migration 016's index, timed.
3. **Sends with the index**, as in 1; the ratio with/without (target >= 0.85).
4. **Search latency**: ``SearchRepository.search`` acting as the user (the facade's
   statement without Redis), two-word queries of middling words, newest-first and ranked;
   p50 and p99. The baseline, measured in the same run, is the same search as a superuser
   written as one plain statement (the GIN index, no row security, no function): the ratio
   baseline/ours says what the function and the policies cost.
5. **The plain statement as ``chatapp_app``**: what the search costs without the server
   function, when row security keeps the text match out of the index (three calls).

Run (PostgreSQL on this machine; the chatapp_* roles must exist, or the script makes them)::

    python benchmarks/bench_search.py --database-url postgresql://root@127.0.0.1:5432/postgres

``--tiny`` (5,000 messages, 20 rooms, 5 of them the user's, rounds of 0.3 s) runs the whole
script in seconds; ``tests/test_facade_search_bench.py`` runs it. Figures only: no timed
assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

import asyncpg
from bench_storage import bench_database

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.models import CreateMessageDto
from chatkeep.storage import Database, MessageRepository
from chatkeep.storage.bootstrap import ensure_roles, maintenance_url, prepare_database
from chatkeep.storage.migrate import Migrator
from chatkeep.storage.search import SearchOrder, SearchRepository

BENCH_DB = "chatkeep_bench_search_h5"
INDEX = "messages_content_search_idx"
CREATE_INDEX = (
    f"CREATE INDEX CONCURRENTLY {INDEX} ON messages"
    " USING gin (to_tsvector('simple'::regconfig, content))"
)
WORDS = 4000
SYLLABLES = "ka lo mi nu re sa ti po ve du ga hi jo be fe zu wa xi qo ye"
ENDINGS = ["n", "r", "s", "t", "l", "m", "k", "d", "", "x"]


@dataclass(frozen=True)
class Size:
    messages: int
    rooms: int
    my_rooms: int
    seconds: float
    rounds: int
    queries: int


FULL = Size(messages=5_000_000, rooms=2000, my_rooms=200, seconds=3.0, rounds=3, queries=200)
TINY = Size(messages=5000, rooms=20, my_rooms=5, seconds=0.3, rounds=1, queries=10)


def words() -> list[str]:
    """The word list: 4,000 made-up words, in a fixed order (word i is i-th most common)."""
    made = [a + b + c for a in SYLLABLES.split() for b in SYLLABLES.split() for c in ENDINGS]
    random.Random(14).shuffle(made)
    return made[:WORDS]


# Word i (1-based) of a message is word floor(4000 * random()^2) + 1: about 1 token in 120
# is word 1, 1 in 2,500 is word 400, 1 in 8,000 is word 4,000.
SEED_MESSAGES = """
INSERT INTO messages (id, room_id, user_id, seq, content, created_at)
SELECT chatkeep_uuidv7(), r.id, $2::uuid, t.g / $3 + 1, t.content,
       now() - interval '1 second' * ($1 - t.g)
  FROM (SELECT x.g, string_agg(w.word, ' ') AS content
          FROM (SELECT g, 1 + floor($4 * random() ^ 2)::int AS i
                  FROM generate_series($5::int, $5 + $6 - 1) g, generate_series(1, 6 + g % 9)) x
          JOIN bench_words w ON w.i = x.i
         GROUP BY x.g) t
  JOIN bench_rooms r ON r.n = t.g % $3
"""


async def build(url: str, size: Size) -> tuple[uuid.UUID, list[uuid.UUID], list[str]]:
    """The fixture (once): users, rooms, memberships, messages. Returns the searching user,
    the rooms senders write to, and the word list."""
    vocabulary = words()
    conn = await asyncpg.connect(url)
    try:
        user = await conn.fetchval("SELECT id FROM users WHERE username = 'searcher'")
        if user is None:
            print(f"building the fixture: {size.messages:,} messages ...", file=sys.stderr)
            started = time.perf_counter()
            hashed = "$2b$04$" + "x" * 53
            async with conn.transaction():
                user, author = uuid.uuid4(), uuid.uuid4()
                await conn.executemany(
                    "INSERT INTO users (id, email, password_hash, username) VALUES ($1,$2,$3,$4)",
                    [
                        (user, "searcher@example.org", hashed, "searcher"),
                        (author, "author@example.org", hashed, "author"),
                    ],
                )
                await conn.execute("CREATE TABLE bench_words (i int PRIMARY KEY, word text)")
                await conn.executemany(
                    "INSERT INTO bench_words VALUES ($1, $2)",
                    list(enumerate(vocabulary, start=1)),
                )
                await conn.execute(
                    "CREATE TABLE bench_rooms AS SELECT g AS n, chatkeep_uuidv7() AS id"
                    " FROM generate_series(0, $1 - 1) g",
                    size.rooms,
                )
                await conn.execute(
                    "INSERT INTO rooms (id, name, type, created_by)"
                    " SELECT id, 'room ' || n, 'private', $1 FROM bench_rooms",
                    author,
                )
                await conn.execute(
                    "INSERT INTO room_users (room_id, user_id, role)"
                    " SELECT id, $1::uuid, 'owner'::room_role FROM bench_rooms"
                    " UNION ALL SELECT id, $2::uuid, 'member'::room_role FROM bench_rooms"
                    " WHERE n < $3",
                    author,
                    user,
                    size.my_rooms,
                )
                await conn.execute(f"DROP INDEX IF EXISTS {INDEX}")
                batch = 250_000
                for start in range(0, size.messages, batch):
                    count = min(batch, size.messages - start)
                    await conn.execute(
                        SEED_MESSAGES, size.messages, author, size.rooms, WORDS, start, count
                    )
                    print(f"  {start + count:,} messages", file=sys.stderr)
                await conn.execute(
                    "UPDATE rooms r SET last_seq = m.seq, position = m.seq FROM"
                    " (SELECT room_id, max(seq) AS seq FROM messages GROUP BY room_id) m"
                    " WHERE m.room_id = r.id"
                )
            await conn.execute("VACUUM ANALYZE")
            print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rooms = [
            r["id"]
            for r in await conn.fetch(
                "SELECT room_id AS id FROM room_users WHERE user_id = $1 ORDER BY room_id", user
            )
        ]
        return user, rooms, vocabulary
    finally:
        await conn.close()


async def sends_per_second(
    db: Database, user: uuid.UUID, rooms: list[uuid.UUID], vocabulary: list[str], args: Size
) -> float:
    """Sends/s of ``MessageRepository.send`` acting as a member, one room per task."""
    repo = MessageRepository(db)
    rng = random.Random(7)
    tasks = min(len(rooms), 8)
    stop = time.perf_counter() + args.seconds
    counts = [0] * tasks

    async def sender(i: int) -> None:
        while time.perf_counter() < stop:
            text = " ".join(rng.choice(vocabulary) for _ in range(10))
            async with db.acting_as(user):
                await repo.send(CreateMessageDto(room_id=rooms[i], user_id=user, content=text))
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(tasks)))
    return sum(counts) / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


PLAIN = """
SELECT id FROM messages
 WHERE to_tsvector('simple'::regconfig, content) @@ websearch_to_tsquery('simple', $1)
   AND room_id = ANY ($2::uuid[])
 ORDER BY created_at DESC, id DESC LIMIT 21
"""


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True, help="a superuser URL to the server")
    parser.add_argument("--database-name", default=BENCH_DB)
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--drop", action="store_true", help="drop the database at the end")
    parser.add_argument("--app-password", default=None, help="chatapp_app's password, if any")
    args = parser.parse_args()
    size = TINY if args.tiny else FULL

    admin = await asyncpg.connect(maintenance_url(args.database_url))
    try:
        await ensure_roles(admin, Settings(), generate_passwords=False)
    finally:
        await admin.close()
    url = await bench_database(args.database_url, args.database_name, False)
    try:
        conn = await asyncpg.connect(url)
        try:
            await prepare_database(conn)
            await Migrator(conn).up()
        finally:
            await conn.close()
        user, rooms, vocabulary = await build(url, size)
        app_url = urls.with_user(url, "chatapp_app", args.app_password or None)
        await run(url, app_url, user, rooms, vocabulary, size)
    finally:
        if args.drop:
            admin = await asyncpg.connect(maintenance_url(args.database_url))
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{args.database_name}" WITH (FORCE)')
            finally:
                await admin.close()
    return 0


async def run(
    url: str,
    app_url: str,
    user: uuid.UUID,
    rooms: list[uuid.UUID],
    vocabulary: list[str],
    size: Size,
) -> None:
    owner = await asyncpg.connect(url)
    settings = Settings(database_url=app_url, pool_min_size=1, pool_max_size=10)
    try:
        total = await owner.fetchval("SELECT count(*) FROM messages")
        print(f"messages: {total:,}; rooms of the user: {len(rooms)} of {size.rooms}")
        async with Database(settings) as db:
            # 1-3: sends without the index, its build, sends with it.
            await owner.execute(f"DROP INDEX IF EXISTS {INDEX}")
            without = [
                await sends_per_second(db, user, rooms, vocabulary, size)
                for _ in range(size.rounds)
            ]
            started = time.perf_counter()
            await owner.execute(CREATE_INDEX)
            build_s = time.perf_counter() - started
            await owner.execute("ANALYZE messages")
            with_index = [
                await sends_per_second(db, user, rooms, vocabulary, size)
                for _ in range(size.rounds)
            ]
            print(f"index build (CREATE INDEX CONCURRENTLY): {build_s:.1f} s")
            ratio = statistics.median(with_index) / statistics.median(without)
            print(
                "sends/s without index: "
                + ", ".join(f"{v:.0f}" for v in without)
                + "; with index: "
                + ", ".join(f"{v:.0f}" for v in with_index)
                + f"; ratio with/without: {ratio:.2f} (target >= 0.85)"
            )

            # 4: search latency through row security, against the superuser's plain statement.
            repo = SearchRepository(db)
            rng = random.Random(4)
            queries = [
                f"{vocabulary[rng.randrange(50, 400)]} {vocabulary[rng.randrange(50, 400)]}"
                for _ in range(size.queries)
            ]
            orders: tuple[SearchOrder, ...] = ("newest", "rank")
            for order in orders:
                ours: list[float] = []
                base: list[float] = []
                hits: list[int] = []
                for q in queries:
                    started = time.perf_counter()
                    await owner.fetch(PLAIN, q, rooms)
                    base.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    async with db.acting_as(user):
                        page = await repo.search(user, q, order=order)
                    ours.append((time.perf_counter() - started) * 1000)
                    hits.append(len(page.items))
                print(
                    f"search ({order}, two words, {len(queries)} queries,"
                    f" median {statistics.median(hits):.0f} hits/page):"
                    + f" p50 {pct(ours, 0.5):.1f} ms, p99 {pct(ours, 0.99):.1f} ms"
                    " (target p50 < 50, p99 < 200); superuser plain statement:"
                    f" p50 {pct(base, 0.5):.1f} ms, p99 {pct(base, 0.99):.1f} ms;"
                    f" ratio p50 baseline/ours: {pct(base, 0.5) / pct(ours, 0.5):.2f}"
                )

            # 5: the plain statement as chatapp_app: row security keeps @@ out of the index.
            slow: list[float] = []
            for q in queries[:3]:
                async with db.acting_as(user):
                    started = time.perf_counter()
                    await db.fetch("bench.plain_search", PLAIN, q, rooms)
                    slow.append((time.perf_counter() - started) * 1000)
            print(
                "plain statement as chatapp_app (no server function): "
                + ", ".join(f"{v:.0f} ms" for v in slow)
            )
    finally:
        await owner.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
