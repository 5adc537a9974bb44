"""Realistic test data, fast: ``chatkeep seed --users N --rooms N --messages N``.

Everything goes in through binary COPY in one transaction (a failed run leaves nothing
behind). The shape follows real chat systems rather than uniform noise:

* room sizes are Zipf-like: a few huge rooms, a long tail of small ones, and a fifth of
  the rooms are direct conversations between two people;
* traffic is Zipf-like too (busy rooms get most messages), and within a room a few members
  do most of the talking;
* most messages are short, some are paragraphs, a few are long (up to the 10,000-character
  limit), with the odd image, file, system notice and edit;
* ``seq`` is assigned per room in time order and ``rooms.last_seq`` matches it;
* read state is real: most members are caught up, many are somewhat behind, some never
  read; a few explicit receipts sit ahead of a watermark, as out-of-order reads leave them;
* conversations have threads, mentions and reactions: in group rooms about one message in
  eight replies to one of the room's recent messages (so a few threads grow long and most
  stay short), about one in thirty names another member (`@name`; an owner now and then
  says `@room`), and about one in twelve gets reactions. The database's own triggers
  (migration 015) build the thread summaries, followers and mention rows from them, as
  they do for live traffic.

Every seeded user has the same password (:data:`SEED_PASSWORD`), hashed once with bcrypt.
"""

from __future__ import annotations

import bisect
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import bcrypt

from chatkeep.errors import ConfigurationError, InvalidInput
from chatkeep.storage.database import Database

__all__ = ["SEED_PASSWORD", "SeedReport", "seed"]

SEED_PASSWORD: Final = "chatkeep-seed"  # noqa: S105 - documented, for test data only
MAX_USERS: Final = 10_000_000
MAX_ROOMS: Final = 1_000_000
MAX_MESSAGES: Final = 200_000_000
_CHUNK: Final = 50_000
_DAY: Final = 86_400.0

Progress = Callable[[str, int, int], None]

USER_COLUMNS: Final = (
    "id", "email", "password_hash", "username", "avatar_url", "is_active", "last_seen",
    "created_at", "updated_at",
)  # fmt: skip
ROOM_COLUMNS: Final = (
    "id", "name", "description", "type", "created_by", "last_seq", "direct_user_low",
    "direct_user_high", "created_at", "updated_at",
)  # fmt: skip
MEMBER_COLUMNS: Final = (
    "room_id", "user_id", "role", "joined_at", "last_read_at", "last_read_seq",
)  # fmt: skip
MESSAGE_COLUMNS: Final = (
    "id", "room_id", "user_id", "seq", "client_msg_id", "content", "type", "is_edited",
    "edited_at", "created_at", "reply_to",
)  # fmt: skip
REACTION_COLUMNS: Final = ("message_id", "emoji", "user_id", "created_at")
REPLY_SHARE: Final = 0.15
MENTION_SHARE: Final = 0.035
REACTION_SHARE: Final = 0.08

RECEIPT_COLUMNS: Final = ("message_id", "user_id", "read_at")
SCHEMA_READY: Final = "SELECT to_regclass('messages') IS NOT NULL"

_WORDS_TEXT: Final = (
    "the a to and of I you it is that in we for on this be with are have just was what "
    "can do so not all will but my at if me like get no yes ok okay lol thanks meeting "
    "today tomorrow deploy build release fix bug review merge branch test coffee lunch "
    "call later sure great nice sounds good agreed why how when where who ticket prod "
    "staging database query index latency cache redis postgres cursor page message room "
    "link docs draft update issue done working on it brb back here there see now soon"
)
_WORDS: Final = tuple(_WORDS_TEXT.split())
_EMOJI: Final = ("🙂", "👍", "🎉", "🚀", "😂", "🙏", "👀", "✅", "🔥", "☕")


@dataclass(frozen=True, slots=True)
class SeedReport:
    """What a seed run wrote, and how long it took."""

    users: int
    rooms: int
    direct_rooms: int
    memberships: int
    messages: int
    receipts: int
    seconds: float
    password: str = SEED_PASSWORD
    replies: int = 0
    mentions: int = 0
    reactions: int = 0


def _check_count(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(name, f"an integer from {low} to {high}")
    return value


def _uuid7_at(ms: int, rng: random.Random) -> uuid.UUID:
    """A UUIDv7 for a past moment, so ids sort like the backdated rows they key."""
    rand = rng.getrandbits(74)
    return uuid.UUID(
        int=(ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & (2**62 - 1))
    )


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    if rng.random() < 0.15:
        text += " " + rng.choice(_EMOJI)
    return text[0].upper() + text[1:]


def _content_pool(rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    short = [_sentence(rng, rng.randint(1, 12)) for _ in range(4000)]
    medium = [
        " ".join(_sentence(rng, rng.randint(8, 20)) + "." for _ in range(rng.randint(2, 5)))
        for _ in range(600)
    ]
    long = []
    for _ in range(60):
        paragraphs = [
            " ".join(_sentence(rng, rng.randint(8, 25)) + "." for _ in range(rng.randint(3, 8)))
            for _ in range(rng.randint(3, 20))
        ]
        long.append("\n\n".join(paragraphs)[:10_000])
    return short, medium, long


class _Plan:
    """Everything but the messages themselves, decided up front (all cheap)."""

    def __init__(
        self, users: int, rooms: int, messages: int, rng: random.Random, now: float
    ) -> None:
        self.rng = rng
        self.now = now
        self.start = now - 60 * _DAY  # messages span the last 60 days
        self.user_ids = [
            _uuid7_at(int((self.start - 30 * _DAY) * 1000) + i, rng) for i in range(users)
        ]
        direct = min(rooms // 5, users * (users - 1) // 2) if users >= 2 else 0
        group = rooms - direct
        self.room_ids: list[uuid.UUID] = []
        self.room_types: list[str] = []
        self.members: list[list[int]] = []  # user indexes, the owner first
        self.direct_pairs: list[tuple[int, int] | None] = []
        for rank in range(1, group + 1):
            # Zipf-like sizes: the biggest room holds half the users, then ~1/rank^0.8.
            size = max(2, min(users, round(users * 0.5 / rank**0.8)))
            size = min(size, users)
            self.members.append(rng.sample(range(users), size))
            self.room_types.append("public" if rng.random() < 0.7 else "private")
            self.direct_pairs.append(None)
        pairs: set[tuple[int, int]] = set()
        while len(pairs) < direct:
            a, b = rng.sample(range(users), 2)
            pairs.add((min(a, b), max(a, b)))
        for a, b in sorted(pairs):
            self.members.append([a, b])
            self.room_types.append("direct")
            self.direct_pairs.append((a, b))
        self.room_count = len(self.members)
        self.direct_count = direct
        self.room_ids = [
            _uuid7_at(int((self.start - 20 * _DAY) * 1000) + i, rng) for i in range(self.room_count)
        ]
        # Traffic: Zipf over group rooms; direct rooms are quiet but not silent.
        weights = [1.0 / rank for rank in range(1, group + 1)]
        quiet = (sum(weights) / max(group, 1)) * 0.5 if group else 1.0
        weights += [quiet] * direct
        cumulative: list[float] = []
        total = 0.0
        for weight in weights:
            total += weight
            cumulative.append(total)
        self.cumulative = cumulative
        self.total_weight = total
        self.message_rooms = (
            [bisect.bisect(cumulative, rng.random() * total) for _ in range(messages)]
            if self.room_count
            else []
        )
        for i, room in enumerate(self.message_rooms):
            if room >= self.room_count:  # float edge: the very top of the range
                self.message_rooms[i] = self.room_count - 1
        self.last_seq = [0] * self.room_count
        for room in self.message_rooms:
            self.last_seq[room] += 1
        # (room index, seq) -> users who read that message ahead of their watermark.
        self.receipts_wanted: dict[tuple[int, int], list[int]] = {}
        self.receipts: list[tuple[uuid.UUID, uuid.UUID, datetime]] = []
        self.tag = ""
        self.owners = {index: members[0] for index, members in enumerate(self.members)}
        self.replies = 0
        self.mentions = 0
        self.reactions: list[tuple[uuid.UUID, str, uuid.UUID, datetime]] = []


def _user_records(plan: _Plan, tag: str, password_hash: str) -> Iterator[tuple[Any, ...]]:
    rng = plan.rng
    base = plan.start - 30 * _DAY
    for i, user_id in enumerate(plan.user_ids):
        created = datetime.fromtimestamp(base + rng.random() * 25 * _DAY, UTC)
        seen = datetime.fromtimestamp(plan.now - rng.expovariate(1 / (2 * _DAY)), UTC)
        avatar = f"https://avatars.example.org/{tag}/{i}.png" if rng.random() < 0.4 else None
        yield (
            user_id,
            f"seed.{tag}.{i}@example.org",
            password_hash,
            f"s{tag}_{i}",
            avatar,
            rng.random() > 0.02,
            seen,
            created,
            created,
        )


def _room_records(plan: _Plan, tag: str) -> Iterator[tuple[Any, ...]]:
    rng = plan.rng
    for index, room_id in enumerate(plan.room_ids):
        members = plan.members[index]
        created = datetime.fromtimestamp(plan.start - rng.random() * 5 * _DAY, UTC)
        pair = plan.direct_pairs[index]
        if pair is None:
            name = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)} {tag}.{index}"
            description = _sentence(rng, rng.randint(3, 15)) if rng.random() < 0.5 else None
            low = high = None
        else:
            name = "direct"
            description = None
            low, high = sorted((plan.user_ids[pair[0]], plan.user_ids[pair[1]]))
        yield (
            room_id,
            name[:100],
            description,
            plan.room_types[index],
            plan.user_ids[members[0]],
            plan.last_seq[index],
            low,
            high,
            created,
            created,
        )


def _member_records(plan: _Plan) -> Iterator[tuple[Any, ...]]:
    rng = plan.rng
    joined = datetime.fromtimestamp(plan.start - 4 * _DAY, UTC)
    for index, members in enumerate(plan.members):
        last = plan.last_seq[index]
        direct = plan.direct_pairs[index] is not None
        for position, user in enumerate(members):
            if direct:
                role = "member"
            elif position == 0:
                role = "owner"
            elif position % 25 == 1:
                role = "admin"
            else:
                role = "member"
            draw = rng.random()
            if last == 0 or draw < 0.55:
                read = last  # caught up
            elif draw < 0.9:
                read = max(0, last - int(rng.expovariate(1 / 20)) - 1)  # somewhat behind
            else:
                read = 0  # never opened the room
            read_at = (
                datetime.fromtimestamp(plan.now - rng.random() * 3 * _DAY, UTC) if read else None
            )
            if read < last - 3 and rng.random() < 0.04:
                # Read a message or two past the watermark (opened a notification, say):
                # the receipts the watermark cannot express.
                for seq in (read + 2, read + 3):
                    plan.receipts_wanted.setdefault((index, seq), []).append(user)
            yield (
                plan.room_ids[index],
                plan.user_ids[user],
                role,
                joined,
                read_at,
                read,
            )


def _message_records(plan: _Plan, messages: int) -> Iterator[tuple[Any, ...]]:
    rng = plan.rng
    short, medium, long = _content_pool(rng)
    seqs = [0] * plan.room_count
    step = (plan.now - plan.start) / max(messages, 1)
    room_ids = plan.room_ids
    user_ids = plan.user_ids
    members = plan.members
    random_ = rng.random
    wanted = plan.receipts_wanted
    receipts = plan.receipts
    recent_roots: dict[int, list[uuid.UUID]] = {}
    active_threads: dict[int, uuid.UUID] = {}
    for i, room in enumerate(plan.message_rooms):
        seqs[room] += 1
        at = plan.start + i * step + random_() * step * 0.5
        ms = int(at * 1000)
        created = datetime.fromtimestamp(at, UTC)
        talkers = members[room]
        # A few members do most of the talking.
        author = talkers[int(len(talkers) * random_() ** 3)]
        draw = random_()
        kind = "text"
        if draw < 0.78:
            content = short[int(random_() * len(short))]
        elif draw < 0.95:
            content = medium[int(random_() * len(medium))]
        elif draw < 0.96:
            content = long[int(random_() * len(long))]
        elif draw < 0.985:
            kind = "image"
            content = f"https://files.example.org/img/{i}.jpg"
        elif draw < 0.995:
            kind = "file"
            content = f"https://files.example.org/doc/{i}.pdf"
        else:
            kind = "system"
            content = "joined the room"
        edited = random_() < 0.02 and kind == "text"
        message_id = _uuid7_at(ms, rng)
        reply_to = None
        group = plan.direct_pairs[room] is None
        if kind == "text" and group:
            recent = recent_roots.setdefault(room, [])
            if recent and random_() < REPLY_SHARE:
                # A conversation goes on in the room's active thread two times in three,
                # else one of the latest messages starts (or revives) one: thread lengths
                # come out geometric, a few long and most short.
                active = active_threads.get(room)
                if active is None or random_() < 0.35:
                    active = recent[-1 - int(len(recent) * random_() ** 2)]
                    active_threads[room] = active
                reply_to = active
                plan.replies += 1
            else:
                recent.append(message_id)
                if len(recent) > 8:
                    del recent[0]
            if random_() < MENTION_SHARE and len(talkers) > 1:
                named = talkers[int(random_() * len(talkers))]
                if named != author:
                    content = f"@s{plan.tag}_{named} {content}"[:10_000]
                    plan.mentions += 1
                elif author == plan.owners[room]:
                    content = f"@room {content}"[:10_000]
                    plan.mentions += 1
        if random_() < REACTION_SHARE and len(talkers) > 1:
            for reactor in {talkers[int(random_() * len(talkers))] for _ in range(3)}:
                emoji = _EMOJI[int(random_() * len(_EMOJI))]
                plan.reactions.append(
                    (message_id, emoji, user_ids[reactor], created + timedelta(minutes=1))
                )
        readers = wanted.get((room, seqs[room]))
        if readers is not None:
            read_at = created + timedelta(minutes=3)
            receipts.extend(
                (message_id, user_ids[reader], read_at) for reader in readers if reader != author
            )
        yield (
            message_id,
            room_ids[room],
            user_ids[author],
            seqs[room],
            f"seed-{i}" if random_() < 0.3 else None,
            content,
            kind,
            edited,
            created + timedelta(minutes=2) if edited else None,
            created,
            reply_to,
        )


def _chunks(records: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def seed(
    db: Database,
    *,
    users: int,
    rooms: int,
    messages: int,
    rng_seed: int | None = None,
    progress: Progress | None = None,
) -> SeedReport:
    """Fill the database with realistic users, rooms, memberships, messages and receipts.

    Adds to whatever is there (names carry a per-run tag, so runs never collide). All of
    it is one transaction: an error leaves nothing behind.

    Args:
        db: an open database with the schema migrated.
        users: how many users (at least 2).
        rooms: how many rooms (a fifth of them direct rooms).
        messages: how many messages in total.
        rng_seed: makes the shape reproducible (ids and the run tag stay unique).
        progress: called as ``progress(stage, done, total)`` while loading.

    Raises:
        InvalidInput: a count is out of range.
        ConfigurationError: the schema is not migrated.
    """
    users = _check_count("users", users, 2, MAX_USERS)
    rooms = _check_count("rooms", rooms, 1, MAX_ROOMS)
    messages = _check_count("messages", messages, 0, MAX_MESSAGES)
    started = time.perf_counter()
    if not await db.fetchval("seed.schema_ready", SCHEMA_READY):
        raise ConfigurationError(
            "the database has no chatkeep schema: run `chatkeep migrate up` first",
            field="database_url",
        )
    rng = random.Random(rng_seed)  # noqa: S311 - test data, not secrets
    tag = uuid.uuid4().hex[:6]
    password_hash = bcrypt.hashpw(SEED_PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    plan = _Plan(users, rooms, messages, rng, time.time())
    plan.tag = tag
    memberships = sum(len(m) for m in plan.members)
    report = progress or (lambda stage, done, total: None)

    async def load(
        stage: str,
        table: str,
        columns: Sequence[str],
        records: Iterator[tuple[Any, ...]],
        total: int,
    ) -> None:
        done = 0
        report(stage, 0, total)
        for chunk in _chunks(records, _CHUNK):
            await db.copy_records(f"seed.copy_{table}", table, chunk, columns=columns)
            done += len(chunk)
            report(stage, done, total)

    async with db.transaction("seed"):
        await load("users", "users", USER_COLUMNS, _user_records(plan, tag, password_hash), users)
        await load("rooms", "rooms", ROOM_COLUMNS, _room_records(plan, tag), plan.room_count)
        await load("memberships", "room_users", MEMBER_COLUMNS, _member_records(plan), memberships)
        await load(
            "messages", "messages", MESSAGE_COLUMNS, _message_records(plan, messages), messages
        )
        receipts = len(plan.receipts)
        await load(
            "receipts", "message_read_status", RECEIPT_COLUMNS, iter(plan.receipts), receipts
        )
        reactions = len(plan.reactions)
        await load(
            "reactions", "message_reactions", REACTION_COLUMNS, iter(plan.reactions), reactions
        )
    # Fresh statistics, so the first queries after a seed get good plans.
    report("analyze", 0, 1)
    await db.execute(
        "seed.analyze",
        "ANALYZE users, rooms, room_users, messages, message_read_status, message_reactions,"
        " threads, thread_followers, message_mentions",
    )
    report("analyze", 1, 1)
    return SeedReport(
        users=users,
        rooms=plan.room_count,
        direct_rooms=plan.direct_count,
        memberships=memberships,
        messages=messages,
        receipts=receipts,
        seconds=time.perf_counter() - started,
        replies=plan.replies,
        mentions=plan.mentions,
        reactions=reactions,
    )
