"""Threads, mentions and unread badges (migration 015): read them, follow, mark read.

The database keeps all of it: triggers on ``messages`` attach a reply to its thread's root,
keep the thread's summary (``threads``), make repliers and mentioned members followers
(``thread_followers``) and resolve ``@username`` / ``@room`` mentions to members
(``message_mentions``). This module only reads that state and writes a member's own
follow flag and thread watermark. Call it acting as the member: row security confines
every statement to their rooms. ``docs/design.md`` ("Threads, mentions and badges") says
why the tables have this shape.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from chatkeep.errors import InvalidInput
from chatkeep.models import (
    CursorPage,
    FollowedThread,
    Mention,
    MessageWithUser,
    RoomBadges,
    ThreadSummary,
)
from chatkeep.storage.base import check_id, not_found, refuse_on_citus
from chatkeep.storage.database import Database
from chatkeep.storage.messages import (
    _MAX_SEQ,
    DEFAULT_PAGE_SIZE,
    MESSAGE_COLUMNS,
    Direction,
    _messages,
    _page_size,
    _seq,
    _with_authors,
    decode_cursor,
    encode_cursor,
)

__all__ = [
    "DEFAULT_LIST_SIZE",
    "MAX_LIST_SIZE",
    "UNREAD_CAP",
    "RoomHints",
    "ThreadRepository",
]

#: A followed thread's ``unread`` counts at most this many replies ("99+" on a badge).
UNREAD_CAP: Final = 100
DEFAULT_LIST_SIZE: Final = 50
MAX_LIST_SIZE: Final = 200

# The root a message id names: itself, or its root when it is a reply. Through row
# security: a message the user cannot see (or a deleted one) is not found.
ROOT_OF: Final = """
SELECT coalesce(m.reply_to, m.id) AS root_id, m.room_id FROM messages m WHERE m.id = $1
"""

# Citus: ROOT_OF names no room, so Citus reads every shard of messages (32 by default) to
# find the one row. Given the room (a hint, RoomHints), the same look-up names it: one
# shard, the (room_id, id) key. Still through row security: a hint that is wrong, or a
# message the user cannot see, finds no row, and root_of then asks ROOT_OF as before.
ROOT_OF_IN_ROOM: Final = """
SELECT coalesce(m.reply_to, m.id) AS root_id, m.room_id FROM messages m
WHERE m.room_id = $1 AND m.id = $2
"""


# Thread pages: keyset over the (reply_to, seq) index, like room history over (room_id,
# seq): the cost of a page does not depend on its depth. A page names its room as $1, the
# first parameter as in room history (the authors' reactions read `r.room_id = $1`: with
# the root's id there, a thread page showed no reactions), and the root after the limits;
# on Citus (migration 023) every table of the statement is then on the room's shard, a
# single-shard router query. The room comes from the root's look-up
# (ThreadRepository.root_of).
def _thread_page(where: str, order: str, root: str) -> str:
    return (
        f"SELECT {MESSAGE_COLUMNS} FROM messages"
        f" WHERE room_id = $1 AND reply_to = {root} AND {where} ORDER BY seq {order}"
    )


THREAD_BEFORE: Final = _with_authors(f"{_thread_page('seq < $2', 'DESC', '$4')} LIMIT $3", "DESC")
THREAD_AFTER: Final = _with_authors(f"{_thread_page('seq > $2', 'ASC', '$4')} LIMIT $3", "ASC")
THREAD_AROUND: Final = _with_authors(
    f"({_thread_page('seq < $2', 'DESC', '$5')} LIMIT $3)"
    f" UNION ALL ({_thread_page('seq >= $2', 'ASC', '$5')} LIMIT $4)",
    "ASC",
)


# The collapsed view: the room's messages that are not replies, each root with its thread
# summary (a primary-key probe of threads per row of the page). It walks the room's
# (room_id, seq) index and skips replies, so a page costs the replies between its roots
# too: flat in the depth, not in how chatty the threads around it are.
def _collapsed_page(where: str, order: str) -> str:
    return (
        f"SELECT {MESSAGE_COLUMNS} FROM messages"
        f" WHERE room_id = $1 AND reply_to IS NULL AND {where} ORDER BY seq {order}"
    )


def _with_summaries(rows: str, order: str, *, citus: bool = False) -> str:
    # On Citus the join names the room as the parameter too (docs/design.md, "Citus mode",
    # rule 5), so the page stays on one shard.
    room = "t.room_id = $1 AND " if citus else ""
    return f"""
SELECT p.*, t.root_seq AS t_root_seq, t.reply_count AS t_reply_count,
       t.last_reply_seq AS t_last_reply_seq, t.last_reply_at AS t_last_reply_at,
       t.participants AS t_participants
  FROM ({rows}) AS p
  LEFT JOIN threads t ON {room}t.root_id = p.id
 ORDER BY p.seq {order}
"""


COLLAPSED_BEFORE: Final = _with_summaries(
    _with_authors(f"{_collapsed_page('seq < $2', 'DESC')} LIMIT $3", "DESC"), "DESC"
)
COLLAPSED_AFTER: Final = _with_summaries(
    _with_authors(f"{_collapsed_page('seq > $2', 'ASC')} LIMIT $3", "ASC"), "ASC"
)
COLLAPSED_AROUND: Final = _with_summaries(
    _with_authors(
        f"({_collapsed_page('seq < $2', 'DESC')} LIMIT $3)"
        f" UNION ALL ({_collapsed_page('seq >= $2', 'ASC')} LIMIT $4)",
        "ASC",
    ),
    "ASC",
)

COLLAPSED_BEFORE_CITUS: Final = _with_summaries(
    _with_authors(f"{_collapsed_page('seq < $2', 'DESC')} LIMIT $3", "DESC"), "DESC", citus=True
)
COLLAPSED_AFTER_CITUS: Final = _with_summaries(
    _with_authors(f"{_collapsed_page('seq > $2', 'ASC')} LIMIT $3", "ASC"), "ASC", citus=True
)
COLLAPSED_AROUND_CITUS: Final = _with_summaries(
    _with_authors(
        f"({_collapsed_page('seq < $2', 'DESC')} LIMIT $3)"
        f" UNION ALL ({_collapsed_page('seq >= $2', 'ASC')} LIMIT $4)",
        "ASC",
    ),
    "ASC",
    citus=True,
)

_SUMMARY_COLUMNS: Final = (
    "t.root_id, t.room_id, t.root_seq, t.reply_count, t.last_reply_seq, t.last_reply_at,"
    " t.participants"
)
SUMMARY: Final = f"SELECT {_SUMMARY_COLUMNS} FROM threads t WHERE t.root_id = $1"
SUMMARY_CITUS: Final = (
    f"SELECT {_SUMMARY_COLUMNS} FROM threads t WHERE t.room_id = $2 AND t.root_id = $1"
)

# A room's threads, latest reply first; last_reply_seq is unique in a room (it is the seq
# of one message), so it is the whole keyset.
ROOM_THREADS: Final = f"""
SELECT {_SUMMARY_COLUMNS} FROM threads t
 WHERE t.room_id = $1 AND t.last_reply_seq < $2
 ORDER BY t.last_reply_seq DESC
 LIMIT $3
"""

# The user's followed threads, latest reply first, keyset on (last_reply_at, root_id).
# unread is counted on the (reply_to, seq) index and capped; mentions on the sparse
# mentions' (root_id, user_id, seq) index.
FOLLOWED: Final = f"""
SELECT {_SUMMARY_COLUMNS}, f.last_read_seq,
       (SELECT count(*) FROM (SELECT 1 FROM messages m
                               WHERE m.reply_to = t.root_id AND m.seq > f.last_read_seq
                               LIMIT {UNREAD_CAP}) AS x) AS unread,
       (SELECT count(*) FROM message_mentions mm
         WHERE mm.root_id = t.root_id AND mm.user_id = $1
           AND mm.seq > f.last_read_seq) AS mentions
  FROM thread_followers f
  JOIN threads t ON t.root_id = f.root_id
 WHERE f.user_id = $1 AND f.following
   AND ($2::uuid IS NULL OR f.room_id = $2)
   AND ($3::timestamptz IS NULL OR (t.last_reply_at, t.root_id) < ($3, $4::uuid))
 ORDER BY t.last_reply_at DESC, t.root_id DESC
 LIMIT $5
"""

# On Citus every correlation names the room too, so the join of the user's followed
# threads is pushed down to each shard (a colocated join); the unread count is capped
# with LEAST, since Citus does not push down a correlated subquery with a LIMIT (the
# count then reads all of a thread's unread replies, on the (reply_to, seq) index).
FOLLOWED_CITUS: Final = f"""
SELECT {_SUMMARY_COLUMNS}, f.last_read_seq,
       LEAST((SELECT count(*) FROM messages m
               WHERE m.room_id = t.room_id AND m.reply_to = t.root_id
                 AND m.seq > f.last_read_seq), {UNREAD_CAP}) AS unread,
       (SELECT count(*) FROM message_mentions mm
         WHERE mm.room_id = t.room_id AND mm.root_id = t.root_id AND mm.user_id = $1
           AND mm.seq > f.last_read_seq) AS mentions
  FROM thread_followers f
  JOIN threads t ON t.room_id = f.room_id AND t.root_id = f.root_id
 WHERE f.user_id = $1 AND f.following
   AND ($2::uuid IS NULL OR f.room_id = $2)
   AND ($3::timestamptz IS NULL OR (t.last_reply_at, t.root_id) < ($3, $4::uuid))
 ORDER BY t.last_reply_at DESC, t.root_id DESC
 LIMIT $5
"""

# The watermark moves forward only (GREATEST) to the thread's last reply; last_read_at
# changes only when it moves. A first read makes a row that does not follow the thread.
MARK_THREAD_READ: Final = """
WITH root AS (
    SELECT coalesce(m.reply_to, m.id) AS id FROM messages m WHERE m.id = $1
), target AS (
    SELECT root.id, coalesce(t.last_reply_seq, 0) AS seq
      FROM root LEFT JOIN threads t ON t.root_id = root.id
), marked AS (
    INSERT INTO thread_followers AS f (root_id, user_id, following, last_read_seq, last_read_at)
    SELECT target.id, $2, false, target.seq, now() FROM target
    ON CONFLICT (root_id, user_id) DO UPDATE
       SET last_read_seq = GREATEST(f.last_read_seq, EXCLUDED.last_read_seq),
           last_read_at = CASE WHEN EXCLUDED.last_read_seq > f.last_read_seq
                               THEN EXCLUDED.last_read_at ELSE f.last_read_at END
    RETURNING f.last_read_seq
)
SELECT (SELECT last_read_seq FROM marked) AS watermark
"""

# Following anew starts from the thread's last reply (what is there is not news);
# following again, or unfollowing, keeps the watermark.
FOLLOW: Final = """
WITH root AS (
    SELECT coalesce(m.reply_to, m.id) AS id FROM messages m WHERE m.id = $1
), target AS (
    SELECT root.id, coalesce(t.last_reply_seq, 0) AS seq
      FROM root LEFT JOIN threads t ON t.root_id = root.id
), changed AS (
    INSERT INTO thread_followers AS f (root_id, user_id, following, last_read_seq, last_read_at)
    SELECT target.id, $2, $3, target.seq, now() FROM target
    ON CONFLICT (root_id, user_id) DO UPDATE SET following = EXCLUDED.following
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM changed) AS found
"""

# Both as the user in one round trip (migration 018's flow functions: the statements above).
MARK_THREAD_READ_AS: Final = "SELECT chatkeep_mark_thread_read($1, $2)"
FOLLOW_AS: Final = "SELECT chatkeep_follow_thread($1, $2, $3)"
# On Citus a data-modifying CTE is planned in several distributed steps, and a follower
# row names its room (written by the application): the root and room are looked up first
# (ROOT_OF), then the thread's last reply (LAST_REPLY_CITUS), then one single-shard upsert.
LAST_REPLY_CITUS: Final = (
    "SELECT t.last_reply_seq FROM threads t WHERE t.room_id = $1 AND t.root_id = $2"
)
MARK_THREAD_READ_CITUS: Final = """
INSERT INTO thread_followers AS f
       (room_id, root_id, user_id, following, last_read_seq, last_read_at)
VALUES ($1, $2, $3, false, $4, now())
ON CONFLICT (room_id, root_id, user_id) DO UPDATE
   SET last_read_seq = GREATEST(f.last_read_seq, EXCLUDED.last_read_seq),
       last_read_at = CASE WHEN EXCLUDED.last_read_seq > f.last_read_seq
                           THEN EXCLUDED.last_read_at ELSE f.last_read_at END
RETURNING f.last_read_seq
"""
FOLLOW_CITUS: Final = """
INSERT INTO thread_followers AS f
       (room_id, root_id, user_id, following, last_read_seq, last_read_at)
VALUES ($1, $2, $3, $4, $5, now())
ON CONFLICT (room_id, root_id, user_id) DO UPDATE SET following = EXCLUDED.following
"""

# The mentions inbox, newest first by message id (time-ordered), keyset on it: the user's
# own mentions from their index, and room mentions (by someone else) of each of their
# rooms, a short index range per room. Row security drops rooms the user has left.
MENTIONS: Final = """
SELECT message_id, room_id, seq, root_id, author_id, room_wide FROM (
    (SELECT mm.message_id, mm.room_id, mm.seq, mm.root_id, mm.author_id, false AS room_wide
       FROM message_mentions mm
      WHERE mm.user_id = $1 AND ($2::uuid IS NULL OR mm.message_id < $2)
      ORDER BY mm.message_id DESC
      LIMIT $3)
    UNION ALL
    (SELECT x.message_id, x.room_id, x.seq, x.root_id, x.author_id, true
       FROM room_users ru
       CROSS JOIN LATERAL (
             SELECT mm.message_id, mm.room_id, mm.seq, mm.root_id, mm.author_id
               FROM message_mentions mm
              WHERE mm.user_id IS NULL AND mm.room_id = ru.room_id AND mm.author_id <> $1
                AND ($2::uuid IS NULL OR mm.message_id < $2)
              ORDER BY mm.message_id DESC
              LIMIT $3) AS x
      WHERE ru.user_id = $1)
) AS both_kinds
ORDER BY message_id DESC
LIMIT $3
"""

# On Citus the room mentions are a colocated join of the user's memberships with the
# room mentions (pushed down to every shard, each shard's newest first), not a LATERAL
# with a LIMIT per room, which Citus does not push down.
MENTIONS_CITUS: Final = """
SELECT message_id, room_id, seq, root_id, author_id, room_wide FROM (
    (SELECT mm.message_id, mm.room_id, mm.seq, mm.root_id, mm.author_id, false AS room_wide
       FROM message_mentions mm
      WHERE mm.user_id = $1 AND ($2::uuid IS NULL OR mm.message_id < $2)
      ORDER BY mm.message_id DESC
      LIMIT $3)
    UNION ALL
    (SELECT mm.message_id, mm.room_id, mm.seq, mm.root_id, mm.author_id, true
       FROM room_users ru
       JOIN message_mentions mm ON mm.room_id = ru.room_id
      WHERE ru.user_id = $1 AND mm.user_id IS NULL AND mm.author_id <> $1
        AND ($2::uuid IS NULL OR mm.message_id < $2)
      ORDER BY mm.message_id DESC
      LIMIT $3)
) AS both_kinds
ORDER BY message_id DESC
LIMIT $3
"""

BADGES: Final = """
SELECT room_id, unread, mentions, unread_threads, thread_mentions FROM chatkeep_badges($1)
"""
# The same in one round trip, outside any transaction: chatkeep_unread (migration 020)
# acts as $1 for its own statement (MessageRepository.unread_counts reads it too).
BADGES_AS: Final = """
SELECT room_id, unread, mentions, unread_threads, thread_mentions FROM chatkeep_unread($1)
"""


@dataclass(frozen=True)
class _Pages:
    """The three keyset statements of one kind of page, and how to build its items."""

    name: str
    before: str
    after: str
    around: str
    items: Callable[[Any], tuple[MessageWithUser, ...]]


def _with_thread(rows: Any) -> tuple[MessageWithUser, ...]:
    """Collapsed-view rows: the history columns, then the thread summary (or NULLs)."""
    plain = _messages([tuple(row)[:_HISTORY_WIDTH] for row in rows])
    out: list[MessageWithUser] = []
    for message, row in zip(plain, rows, strict=True):
        if row["t_reply_count"] is not None:
            summary = ThreadSummary._adopt(
                {
                    "root_id": message.id,
                    "room_id": message.room_id,
                    "root_seq": row["t_root_seq"],
                    "reply_count": row["t_reply_count"],
                    "last_reply_seq": row["t_last_reply_seq"],
                    "last_reply_at": row["t_last_reply_at"],
                    "participants": tuple(row["t_participants"]),
                }
            )
            message = MessageWithUser._adopt({**vars(message), "thread": summary})
        out.append(message)
    return tuple(out)


# The history statement's columns (_messages unpacks exactly these).
_HISTORY_WIDTH: Final = len(MESSAGE_COLUMNS.split(",")) + 5

_COLLAPSED_PAGES: Final = _Pages(
    "threads.collapsed_history", COLLAPSED_BEFORE, COLLAPSED_AFTER, COLLAPSED_AROUND, _with_thread
)
_THREAD_PAGES: Final = _Pages("threads.page", THREAD_BEFORE, THREAD_AFTER, THREAD_AROUND, _messages)
_COLLAPSED_PAGES_CITUS: Final = _Pages(
    "threads.collapsed_history",
    COLLAPSED_BEFORE_CITUS,
    COLLAPSED_AFTER_CITUS,
    COLLAPSED_AROUND_CITUS,
    _with_thread,
)


async def _paged(
    db: Database,
    pages: _Pages,
    key: uuid.UUID,
    decoded: tuple[uuid.UUID, int, Direction] | None,
    before_seq: int | None,
    after_seq: int | None,
    around: int | None,
    size: int,
    *,
    other: str,
    lead: uuid.UUID | None = None,
    tail: tuple[object, ...] = (),
) -> CursorPage[MessageWithUser]:
    # The statements take `lead` as $1 (the cursor's key unless given: the room of a
    # thread on Citus), then the seq and limits, then `tail`.
    args = _Args(key if lead is None else lead, tail)
    if decoded is not None:
        cursor_key, seq, direction = decoded
        if cursor_key != key:
            raise InvalidInput("cursor", other)
        if direction == "before":
            return await _before(db, pages, key, seq, size, newest=False, args=args)
        return await _after(db, pages, key, seq, size, args=args)
    if before_seq is not None:
        return await _before(
            db, pages, key, _seq("before_seq", before_seq), size, newest=False, args=args
        )
    if after_seq is not None:
        return await _after(db, pages, key, _seq("after_seq", after_seq), size, args=args)
    if around is not None:
        return await _around(db, pages, key, _seq("around", around), size, args=args)
    return await _before(db, pages, key, _MAX_SEQ, size, newest=True, args=args)


@dataclass(frozen=True)
class _Args:
    """A page statement's first parameter and those after its seq and limits."""

    lead: uuid.UUID
    tail: tuple[object, ...]


async def _before(
    db: Database,
    pages: _Pages,
    key: uuid.UUID,
    seq: int,
    size: int,
    *,
    newest: bool,
    args: _Args,
) -> CursorPage[MessageWithUser]:
    rows = await db.fetch(pages.name, pages.before, args.lead, seq, size + 1, *args.tail)
    more = len(rows) > size
    items = pages.items(rows[size - 1 :: -1] if more else rows[::-1])
    if not items:
        return CursorPage(items=(), newest=None if newest else encode_cursor(key, seq - 1, "after"))
    tail = encode_cursor(key, items[-1].seq, "after")
    return CursorPage(
        items=items,
        before=encode_cursor(key, items[0].seq, "before") if more else None,
        after=None if newest else tail,
        newest=tail,
    )


async def _after(
    db: Database, pages: _Pages, key: uuid.UUID, seq: int, size: int, *, args: _Args
) -> CursorPage[MessageWithUser]:
    rows = await db.fetch(f"{pages.name}_after", pages.after, args.lead, seq, size + 1, *args.tail)
    more = len(rows) > size
    items = pages.items(rows[:size] if more else rows)
    if not items:
        return CursorPage(items=(), newest=encode_cursor(key, seq, "after"))
    tail = encode_cursor(key, items[-1].seq, "after")
    return CursorPage(
        items=items,
        before=encode_cursor(key, items[0].seq, "before") if seq > 0 else None,
        after=tail if more else None,
        newest=tail,
    )


async def _around(
    db: Database, pages: _Pages, key: uuid.UUID, seq: int, size: int, *, args: _Args
) -> CursorPage[MessageWithUser]:
    rows = await db.fetch(
        f"{pages.name}_around", pages.around, args.lead, seq, size + 1, size + 1, *args.tail
    )
    rows = sorted(rows, key=lambda row: row["seq"])
    split = sum(1 for row in rows if row["seq"] < seq)
    found_older, found_newer = split, len(rows) - split
    take_older = min(found_older, size // 2)
    take_newer = min(found_newer, size - take_older)
    take_older = min(found_older, size - take_newer)
    items = pages.items(rows[split - take_older : split + take_newer])
    if not items:
        return CursorPage(items=(), newest=encode_cursor(key, max(seq - 1, 0), "after"))
    first, last = items[0].seq, items[-1].seq
    return CursorPage(
        items=items,
        before=encode_cursor(key, first, "before") if found_older > take_older else None,
        after=encode_cursor(key, last, "after") if found_newer > take_newer else None,
        newest=encode_cursor(key, last, "after"),
    )


def _list_size(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_SIZE:
        raise InvalidInput("limit", f"an integer from 1 to {MAX_LIST_SIZE}")
    return limit


def _summary(row: Any) -> ThreadSummary:
    return ThreadSummary._adopt(
        {
            "root_id": row["root_id"],
            "room_id": row["room_id"],
            "root_seq": row["root_seq"],
            "reply_count": row["reply_count"],
            "last_reply_seq": row["last_reply_seq"],
            "last_reply_at": row["last_reply_at"],
            "participants": tuple(row["participants"]),
        }
    )


def _only_self(as_user: uuid.UUID, user: uuid.UUID) -> None:
    if check_id("as_user", as_user) != user:
        raise InvalidInput("as_user", "a user marks and follows only their own threads")


class RoomHints(Protocol):
    """Where a message id's room may be remembered (Citus: ``MessageRoomCache``).

    A hint only: :meth:`ThreadRepository.root_of` checks it with a statement under row
    security, so a wrong or stale hint costs a look-up, never an answer. Neither method
    raises (a store that is down answers ``None`` and forgets).
    """

    async def room_of(self, message_id: uuid.UUID) -> uuid.UUID | None:
        """The room remembered for the message, or ``None``."""
        ...

    async def remember(self, room_id: uuid.UUID, *message_ids: uuid.UUID) -> None:
        """Remember that the messages are in the room (a message never changes room)."""
        ...


class ThreadRepository:
    """A member's view of threads and mentions (call it acting as the member).

    Args:
        db: the database.
        hints: on Citus, where message ids' rooms are remembered, so that a thread call
            reads one shard instead of all of them (:meth:`root_of`). Ignored on plain
            PostgreSQL, where the look-up by the primary key is one index probe already.
    """

    def __init__(self, db: Database, *, hints: RoomHints | None = None) -> None:
        self.db = db
        self.hints = hints

    async def root_of(self, message_id: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID]:
        """The thread root a message id names (itself, or its root) and its room.

        On Citus with :attr:`hints`: a remembered room is checked by one single-shard
        look-up (ROOT_OF_IN_ROOM, under row security); without one, or when that finds
        nothing, the look-up of every shard (ROOT_OF) answers, and the room it finds is
        remembered. Either way the answer is the database's, never the hint's.

        Raises:
            NotFound: no such message, a deleted one, or one the user cannot see.
        """
        key = check_id("root_message_id", message_id)
        hints = self.hints if self.db.settings.citus else None
        if hints is not None:
            room = await hints.room_of(key)
            if room is not None:
                row = await self.db.fetchrow("threads.root_in_room", ROOT_OF_IN_ROOM, room, key)
                if row is not None:
                    return row["root_id"], row["room_id"]
        row = await self.db.fetchrow("threads.root_of", ROOT_OF, key)
        if row is None:
            raise not_found("message", key)
        root, room = row["root_id"], row["room_id"]
        if hints is not None:
            await hints.remember(room, *((key,) if key == root else (key, root)))
        return root, room

    async def _last_reply(self, key: uuid.UUID) -> tuple[uuid.UUID, uuid.UUID, int]:
        # Citus: the thread's root, its room and its last reply seq (0 with no replies),
        # for an upsert that names the room (FOLLOW_CITUS, MARK_THREAD_READ_CITUS).
        root, room = await self.root_of(key)
        seq = await self.db.fetchval("threads.last_reply", LAST_REPLY_CITUS, room, root)
        return root, room, 0 if seq is None else int(seq)

    async def summary(self, root_message_id: uuid.UUID) -> ThreadSummary | None:
        """The thread's summary, or ``None`` while it has never had a reply.

        Raises:
            NotFound: no such message, or one the user cannot see.
        """
        root, room = await self.root_of(root_message_id)
        if self.db.settings.citus:
            row = await self.db.fetchrow("threads.summary", SUMMARY_CITUS, root, room)
        else:
            row = await self.db.fetchrow("threads.summary", SUMMARY, root)
        return None if row is None else _summary(row)

    async def page(
        self,
        root_message_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """A page of the thread's replies in ascending ``seq`` (room seqs), authors joined.

        With no position, the newest page; otherwise exactly one of ``cursor``,
        ``before_seq``, ``after_seq`` or ``around`` (a seq), as room history takes them.
        A reply's id pages its root's thread.

        Raises:
            NotFound: no such message, or one the user cannot see.
            InvalidInput: more than one position, a bad cursor (or one of another
                thread), or ``limit`` outside 1..200.
        """
        size = _page_size(limit)
        given = sum(p is not None for p in (cursor, before_seq, after_seq, around))
        if given > 1:
            raise InvalidInput(
                "cursor", "give at most one of cursor, before_seq, after_seq, around"
            )
        decoded = None if cursor is None else decode_cursor(cursor)
        root, room = await self.root_of(root_message_id)
        return await _paged(
            self.db,
            _THREAD_PAGES,
            root,
            decoded,
            before_seq,
            after_seq,
            around,
            size,
            other="belongs to another thread",
            lead=room,
            tail=(root,),
        )

    async def collapsed_history(
        self,
        room_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
    ) -> CursorPage[MessageWithUser]:
        """The room's history without replies; each root carries its ``thread`` summary.

        Positions as :meth:`page` takes them (cursors name the room).

        Raises:
            InvalidInput: more than one position, a bad cursor (or one of another room),
                or ``limit`` outside 1..200.
        """
        room = check_id("room_id", room_id)
        size = _page_size(limit)
        given = sum(p is not None for p in (cursor, before_seq, after_seq, around))
        if given > 1:
            raise InvalidInput(
                "cursor", "give at most one of cursor, before_seq, after_seq, around"
            )
        decoded = None if cursor is None else decode_cursor(cursor)
        return await _paged(
            self.db,
            _COLLAPSED_PAGES_CITUS if self.db.settings.citus else _COLLAPSED_PAGES,
            room,
            decoded,
            before_seq,
            after_seq,
            around,
            size,
            other="belongs to another room",
        )

    async def room_threads(
        self,
        room_id: uuid.UUID,
        *,
        before_seq: int | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[ThreadSummary]:
        """The room's threads, latest reply first; reads ``threads``, never the replies.

        Pass the last one's ``last_reply_seq`` as ``before_seq`` for the next page.

        Raises:
            InvalidInput: a bad id, ``before_seq`` or ``limit``.
        """
        room = check_id("room_id", room_id)
        upto = _MAX_SEQ if before_seq is None else _seq("before_seq", before_seq)
        size = _list_size(limit)
        rows = await self.db.fetch("threads.room_threads", ROOM_THREADS, room, upto, size)
        return [_summary(row) for row in rows]

    async def followed(
        self,
        user_id: uuid.UUID,
        *,
        room_id: uuid.UUID | None = None,
        before: ThreadSummary | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[FollowedThread]:
        """The threads the user follows (optionally in one room), latest reply first.

        Pass the last item's ``thread`` as ``before`` for the next page.

        Raises:
            InvalidInput: a bad id, ``before`` or ``limit``.
        """
        user = check_id("user_id", user_id)
        room = None if room_id is None else check_id("room_id", room_id)
        if before is not None and not isinstance(before, ThreadSummary):
            raise InvalidInput("before", "must be a ThreadSummary of a previous page")
        size = _list_size(limit)
        at: datetime | None = None if before is None else before.last_reply_at
        after_root = None if before is None else before.root_id
        query = FOLLOWED_CITUS if self.db.settings.citus else FOLLOWED
        rows = await self.db.fetch("threads.followed", query, user, room, at, after_root, size)
        return [
            FollowedThread._adopt(
                {
                    "thread": _summary(row),
                    "last_read_seq": row["last_read_seq"],
                    "unread": row["unread"],
                    "mentions": row["mentions"],
                }
            )
            for row in rows
        ]

    async def mark_read(
        self, root_message_id: uuid.UUID, user_id: uuid.UUID, *, as_user: uuid.UUID | None = None
    ) -> int:
        """Move the user's watermark in the thread to its last reply; never backward.

        Returns the watermark after the call (a room seq; 0 for a thread without
        replies). ``as_user`` (it must be ``user_id``): as that user in one round trip,
        outside any transaction (migration 018's ``chatkeep_mark_thread_read``; not on
        Citus).

        Raises:
            NotFound: no such message, or one the user cannot see.
            InvalidInput: a bad id, or ``as_user`` is someone else.
        """
        key = check_id("root_message_id", root_message_id)
        user = check_id("user_id", user_id)
        if as_user is not None:
            _only_self(as_user, user)
            refuse_on_citus(self.db, "threads.mark_read(as_user=)", "threads.mark_read")
            row = await self.db.fetchrow_as(user, "threads.mark_read", MARK_THREAD_READ_AS, key)
            value = None if row is None else row[0]
        elif self.db.settings.citus:
            root, room, seq = await self._last_reply(key)
            value = await self.db.fetchval(
                "threads.mark_read", MARK_THREAD_READ_CITUS, room, root, user, seq
            )
            return int(value)
        else:
            value = await self.db.fetchval("threads.mark_read", MARK_THREAD_READ, key, user)
        if value is None:
            raise not_found("message", key)
        return int(value)

    async def follow(
        self,
        root_message_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        following: bool = True,
        as_user: uuid.UUID | None = None,
    ) -> None:
        """Follow (or stop following) the thread of ``root_message_id``.

        ``as_user`` (it must be ``user_id``): as that user in one round trip, outside any
        transaction (migration 018's ``chatkeep_follow_thread``; not on Citus).

        Raises:
            NotFound: no such message, or one the user cannot see.
            InvalidInput: a bad id or ``following``, or ``as_user`` is someone else.
        """
        key = check_id("root_message_id", root_message_id)
        user = check_id("user_id", user_id)
        if not isinstance(following, bool):
            raise InvalidInput("following", "must be a bool")
        if as_user is not None:
            _only_self(as_user, user)
            refuse_on_citus(self.db, "threads.follow(as_user=)", "threads.follow")
            row = await self.db.fetchrow_as(user, "threads.follow", FOLLOW_AS, key, following)
            found = None if row is None else row[0]
        elif self.db.settings.citus:
            root, room, seq = await self._last_reply(key)
            await self.db.execute("threads.follow", FOLLOW_CITUS, room, root, user, following, seq)
            return
        else:
            found = await self.db.fetchval("threads.follow", FOLLOW, key, user, following)
        if not found:
            raise not_found("message", key)

    async def mentions(
        self,
        user_id: uuid.UUID,
        *,
        before: uuid.UUID | None = None,
        limit: int = DEFAULT_LIST_SIZE,
    ) -> list[Mention]:
        """The user's mentions inbox, newest first: messages naming them or their rooms.

        Pass the last item's ``message_id`` as ``before`` for the next page.

        Raises:
            InvalidInput: a bad id or ``limit``.
        """
        user = check_id("user_id", user_id)
        older = None if before is None else check_id("before", before)
        size = _list_size(limit)
        query = MENTIONS_CITUS if self.db.settings.citus else MENTIONS
        rows = await self.db.fetch("threads.mentions", query, user, older, size)
        return [Mention._from_row(row) for row in rows]

    async def badges(
        self, user_id: uuid.UUID, *, as_user: uuid.UUID | None = None
    ) -> dict[uuid.UUID, RoomBadges]:
        """Per room of the acting user: unread, mentions, unread threads, thread mentions.

        One statement (``chatkeep_badges``), for the acting user, who must be
        ``user_id``. Empty for a user in no room (or no such user). ``as_user`` (it must
        be ``user_id``): as that user in one round trip, outside any transaction
        (``chatkeep_unread``, migration 020; on Citus, which has no 020, in a transaction
        acting as the user).

        Raises:
            InvalidInput: a bad id, or ``as_user`` is someone else.
            PermissionDenied: ``user_id`` is not the acting user.
        """
        user = check_id("user_id", user_id)
        if as_user is not None:
            if check_id("as_user", as_user) != user:
                raise InvalidInput("as_user", "a user reads only their own badges")
            if self.db.settings.citus:
                # No chatkeep_unread on Citus (020 is plain-only): 023's chatkeep_badges,
                # in a transaction acting as the user.
                async with self.db.acting_as(user, "threads.badges"):
                    rows = await self.db.fetch("threads.badges", BADGES, user)
            else:
                rows = await self.db.fetch_as(user, "threads.badges", BADGES_AS)
        else:
            rows = await self.db.fetch("threads.badges", BADGES, user)
        return {row["room_id"]: RoomBadges._from_row(row) for row in rows}
