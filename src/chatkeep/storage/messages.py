"""Messages and read state: send, edit, delete, history by cursor, watermarks, receipts.

``seq`` is allocated by the insert of the message itself (the ``messages_assign_seq``
trigger moves ``rooms.last_seq`` under the room row lock): that lock orders concurrent
senders, so within a room ``seq`` is gapless and in commit order. Read state is a
per-member watermark (``room_users.last_read_seq``) that only moves forward; unread counts
are a subtraction.
``docs/design.md`` (Storage) says why each query has the shape it has.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Final, Literal, NoReturn

from chatkeep.errors import (
    ChatkeepError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from chatkeep.ids import uuid7
from chatkeep.models import (
    CreateMessageDto,
    CursorPage,
    Message,
    MessageReadStatus,
    MessageWithUser,
    ReactionCount,
    UnreadCounts,
    UserProfile,
    _dict_setter,
    check_content,
)
from chatkeep.storage.base import BaseRepository, check_id, not_found, refuse_on_citus

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "MAX_SEND_BATCH",
    "MessageRepository",
    "SendResult",
    "decode_cursor",
]

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
_MAX_SEQ: Final = 2**63 - 1

MESSAGE_COLUMNS: Final = (
    "id, room_id, user_id, seq, client_msg_id, content, type, is_edited, edited_at, created_at,"
    " reply_to"
)
_M_COLUMNS: Final = ", ".join(f"m.{c.strip()}" for c in MESSAGE_COLUMNS.split(","))
_MESSAGE_KEYS: Final = tuple(c.strip() for c in MESSAGE_COLUMNS.split(","))

# One statement, so one round trip and atomic without BEGIN/COMMIT, for one message or a
# batch (the group commit of ChatKeep.send_message): chatkeep_send_messages (migration 014,
# SECURITY INVOKER) sets each row's sender as the acting user, so row security judges every
# row as it judges a hand-written INSERT, and stores it with the statement of this module's
# earlier versions:
#  - a retried send (same client_msg_id) finds the first message and inserts nothing;
#  - only a member of an active room inserts; the seq comes from the messages_assign_seq
#    trigger (migration 011), which moves rooms.last_seq under the room row lock, the lock
#    that orders concurrent senders and keeps seq gapless. Rows are taken in room id order,
#    so concurrent batches take room locks in one order and never deadlock;
#  - the sender's own watermark follows their message (your own message is not unread);
#  - the trigger logs message.created at the room's next position, returned as position
#    (NULL for a retry);
#  - a row refused by the rules comes back with its outcome, and its neighbours are stored.
#  - reply_to is checked and attached to its thread's root by the messages_thread_root
#    trigger (migration 015, which gave the function its reply_tos argument); the thread
#    summary and mentions are kept by triggers too.
# This is the one place listing the columns a send writes: SEND_ARRAYS and the function's
# arguments follow it.
SEND_MANY: Final = f"""
SELECT idx, outcome, {MESSAGE_COLUMNS}, position
  FROM chatkeep_send_messages($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                              $6::message_type[], $7::uuid[])
"""
# On Citus, SEND's data-modifying CTEs are planned as several distributed steps (not one
# shard), and a RETURNING clause may not call current_setting(). A send there is four
# single-shard statements in one transaction: the checks, the insert, the sender's own
# watermark, and the position, read from the room whose row the insert's trigger locked
# (so it is this send's). The retry of a client_msg_id is looked up first.
SEND_INSERT_CITUS: Final = f"""
INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type, reply_to)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {MESSAGE_COLUMNS}
"""
SEND_SEEN_CITUS: Final = """
UPDATE room_users SET last_read_seq = $3, last_read_at = $4
 WHERE room_id = $1 AND user_id = $2 AND last_read_seq < $3
"""
ROOM_POSITION: Final = "SELECT position FROM rooms WHERE id = $1"
FIND_BY_CLIENT_ID: Final = f"""
SELECT {MESSAGE_COLUMNS} FROM messages
 WHERE room_id = $1 AND user_id = $2 AND client_msg_id = $3
"""
WHY_NOT_SENT: Final = """
SELECT r.is_active,
       EXISTS (SELECT 1 FROM room_users WHERE room_id = $1 AND user_id = $2) AS member
  FROM rooms r WHERE r.id = $1
"""
MAX_SEND_BATCH: Final = 1000
"""The most messages :meth:`MessageRepository.send_many` takes in one call."""

SendResult = tuple[Message, int | None] | ChatkeepError
"""One message of :meth:`MessageRepository.send_many`: (message, position) or its error."""


def _send_arrays(dtos: Sequence[CreateMessageDto]) -> tuple[list[Any], ...]:
    """The statement's arguments: one array per written column, in the batch's order."""
    return (
        [uuid7() for _ in dtos],
        [d.room_id for d in dtos],
        [d.user_id for d in dtos],
        [d.client_msg_id for d in dtos],
        [d.content for d in dtos],
        [d.type for d in dtos],
        [d.reply_to for d in dtos],
    )


def _refusal(outcome: str, room: uuid.UUID) -> ChatkeepError:
    if outcome == "no_room":
        return not_found("room", room)
    if outcome == "not_member":
        return PermissionDenied("only members may send to this room")
    if outcome == "archived":
        return PermissionDenied("the room is archived")
    return ChatkeepError(f"messages.send: unknown outcome {outcome!r}")  # pragma: no cover


EDIT: Final = f"""
UPDATE messages SET content = $3, is_edited = true, edited_at = now()
 WHERE id = $1 AND user_id = $2
RETURNING {MESSAGE_COLUMNS}
"""
# The author, or an owner/admin of the message's room.
DELETE_AS: Final = """
DELETE FROM messages m
 WHERE m.id = $1
   AND (m.user_id = $2
        OR EXISTS (SELECT 1 FROM room_users ru
                    WHERE ru.room_id = m.room_id AND ru.user_id = $2
                      AND ru.role IN ('owner', 'admin')))
RETURNING m.id
"""
# The same two writes as their flows' one round trip (migration 018): the statement as the
# acting user, the change-log position it took, and why nothing was written, in one call.
EDIT_AS: Final = (
    f"SELECT outcome, {MESSAGE_COLUMNS}, position FROM chatkeep_edit_message($1, $2, $3)"
)
DELETE_LOGGED_AS: Final = (
    "SELECT outcome, room_id, seq, position FROM chatkeep_delete_message($1, $2)"
)


# History: keyset over messages (room_id, seq), one index range scan in either direction.
# The LIMIT sits inside, on messages alone, and the authors are joined to those rows only:
# with the join outside the LIMIT, a room that is a sliver of a table dominated by big rooms
# (the planner then expects a dozen rows) got a hash join over all of the room's older
# messages and a sort, 50 times slower than the page. The cost of a page does not depend
# on its depth, nor on the table's statistics.
def _page(where: str, order: str) -> str:
    return (
        f"SELECT {MESSAGE_COLUMNS} FROM messages"
        f" WHERE room_id = $1 AND {where} ORDER BY seq {order}"
    )


# Reaction counts come in the same statement: one probe of message_reactions' primary key
# per message of the page (no N+1 round trips; the room named too, which changes nothing
# here and lets Citus keep the page on the room's shard), one entry per emoji in the order it was
# first used, ``me`` for the acting user's own.
def _with_authors(rows: str, order: str) -> str:
    return f"""
SELECT {_M_COLUMNS}, u.username, u.avatar_url, rx.emoji, rx.n, rx.me
  FROM ({rows}) AS m
  JOIN users u ON u.id = m.user_id
  LEFT JOIN LATERAL (
        SELECT array_agg(x.emoji ORDER BY x.first, x.emoji) AS emoji,
               array_agg(x.n ORDER BY x.first, x.emoji) AS n,
               array_agg(x.me ORDER BY x.first, x.emoji) AS me
          FROM (SELECT r.emoji, count(*) AS n, min(r.created_at) AS first,
                       coalesce(bool_or(r.user_id = (SELECT chatkeep_acting_user_id())),
                                false) AS me
                  FROM message_reactions r
                 WHERE r.room_id = $1 AND r.message_id = m.id
                 GROUP BY r.emoji) AS x
       ) AS rx ON true
 ORDER BY m.seq {order}
"""


HISTORY_BEFORE: Final = _with_authors(f"{_page('seq < $2', 'DESC')} LIMIT $3", "DESC")
HISTORY_AFTER: Final = _with_authors(f"{_page('seq > $2', 'ASC')} LIMIT $3", "ASC")
HISTORY_AROUND: Final = _with_authors(
    f"({_page('seq < $2', 'DESC')} LIMIT $3) UNION ALL ({_page('seq >= $2', 'ASC')} LIMIT $4)",
    "ASC",
)
SEQ_OF: Final = "SELECT room_id, seq FROM messages WHERE id = $1"
# The same pages in one round trip as a user (Database.fetch_as): migration 013's
# chatkeep_history(acting, room, pivot, older, newer) runs HISTORY_AROUND's shape with the
# acting user set for its own statement, ascending seq. before: (seq, n, 0); after:
# (seq + 1, 0, n); around: (seq, n, n).
HISTORY_AS: Final = "SELECT * FROM chatkeep_history($1, $2, $3, $4, $5)"
# On PostgreSQL (not Citus), migration 017's forms of it: the same page planned once per
# session (015's replanned every call), rows only for a member of the room; and the page
# around a message id, its seq read in the same call. No row from either: an empty page, a
# non-member, or (around) a message not in the room.
HISTORY_PAGE_AS: Final = "SELECT * FROM chatkeep_history_page($1, $2, $3, $4, $5)"
HISTORY_AROUND_ID_AS: Final = "SELECT * FROM chatkeep_history_around($1, $2, $3, $4, $5)"

# The watermark moves forward only (GREATEST), never past the room's newest message, and
# last_read_at changes only when it moves. rooms is read, not locked: marking read never
# waits for a sender.
MARK_READ: Final = """
UPDATE room_users ru
   SET last_read_seq = GREATEST(ru.last_read_seq, target.seq),
       last_read_at = CASE WHEN target.seq > ru.last_read_seq THEN now()
                           ELSE ru.last_read_at END
  FROM rooms r,
       LATERAL (SELECT LEAST(COALESCE($3::bigint, r.last_seq), r.last_seq) AS seq) AS target
 WHERE ru.room_id = $1 AND ru.user_id = $2 AND r.id = ru.room_id
RETURNING ru.last_read_seq
"""
# On Citus an UPDATE may not call now() inside a CASE: the row is updated only when the
# watermark moves, and the watermark is read back when it does not.
MARK_READ_CITUS: Final = """
UPDATE room_users ru
   SET last_read_seq = target.seq, last_read_at = now()
  FROM rooms r,
       LATERAL (SELECT LEAST(COALESCE($3::bigint, r.last_seq), r.last_seq) AS seq) AS target
 WHERE ru.room_id = $1 AND ru.user_id = $2 AND r.id = $1
   AND target.seq > ru.last_read_seq
RETURNING ru.last_read_seq
"""
READ_WATERMARK: Final = "SELECT last_read_seq FROM room_users WHERE room_id = $1 AND user_id = $2"
# A receipt is written only when the watermark does not already say it: the table grows
# with out-of-order reads, not with members x messages.
# MARK_READ as the user in one round trip (013); room_visible tells NotFound from
# PermissionDenied when no row moved, in the same statement.
MARK_READ_AS: Final = "SELECT watermark, room_visible FROM chatkeep_mark_read($1, $2, $3)"
MARK_MESSAGE_READ: Final = """
WITH m AS (
    SELECT id, room_id, seq FROM messages WHERE id = $1
), member AS (
    SELECT ru.last_read_seq FROM room_users ru, m
     WHERE ru.room_id = m.room_id AND ru.user_id = $2
), receipt AS (
    INSERT INTO message_read_status (message_id, user_id)
    SELECT m.id, $2 FROM m, member WHERE member.last_read_seq < m.seq
    ON CONFLICT (message_id, user_id) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM m) AS found,
       EXISTS (SELECT 1 FROM member) AS is_member,
       EXISTS (SELECT 1 FROM receipt) AS written
"""
# On Citus the receipt names its room (the distribution column, migrations/citus).
MARK_MESSAGE_READ_CITUS: Final = MARK_MESSAGE_READ.replace(
    "INSERT INTO message_read_status (message_id, user_id)\n    SELECT m.id, $2",
    "INSERT INTO message_read_status (room_id, message_id, user_id)\n"
    "    SELECT m.room_id, m.id, $2",
).replace("ON CONFLICT (message_id, user_id)", "ON CONFLICT (room_id, message_id, user_id)")
# Readers of a message: every other member whose watermark covers it, plus explicit
# receipts ahead of the watermark. The receipt's time wins when both exist.
READ_BY: Final = """
SELECT m.id AS message_id, ru.user_id, COALESCE(s.read_at, ru.last_read_at) AS read_at
  FROM messages m
  JOIN room_users ru ON ru.room_id = m.room_id AND ru.user_id <> m.user_id
  LEFT JOIN message_read_status s ON s.message_id = m.id AND s.user_id = ru.user_id
 WHERE m.id = $1 AND (ru.last_read_seq >= m.seq OR s.user_id IS NOT NULL)
 ORDER BY read_at, ru.user_id
"""
# All of a user's unread counts in one round trip: a subtraction per room, no COUNT.
UNREAD_COUNTS: Final = """
SELECT ru.room_id, GREATEST(r.last_seq - ru.last_read_seq, 0) AS unread
  FROM room_users ru
  JOIN rooms r ON r.id = ru.room_id
 WHERE ru.user_id = $1
"""
# The same as the acting user in one round trip, with each room's badge (migration 020:
# chatkeep_unread sets the user for its own statement, then reads chatkeep_badges, which
# reads only that user's memberships and the stored mention counters).
UNREAD_AS: Final = """
SELECT room_id, unread, mentions, unread_threads, thread_mentions FROM chatkeep_unread($1)
"""

# -- cursors ------------------------------------------------------------------------------

_CURSOR_VERSION: Final = 1
_CURSOR_FORMAT: Final = struct.Struct(">Bc16sq")  # version, direction, room id, seq
_CURSOR_TAG_BYTES: Final = 4
Direction = Literal["before", "after"]


def _tag(payload: bytes) -> bytes:
    # Detects edited or truncated cursors. Not a secret: a forged cursor can only name
    # another position in a room the caller asked for anyway.
    return hashlib.blake2b(payload, digest_size=_CURSOR_TAG_BYTES, person=b"chatkeep-cur").digest()


def encode_cursor(room_id: uuid.UUID, seq: int, direction: Direction) -> str:
    """An opaque cursor: the page ``direction`` of ``seq`` in ``room_id``."""
    payload = _CURSOR_FORMAT.pack(
        _CURSOR_VERSION, b"b" if direction == "before" else b"a", room_id.bytes, seq
    )
    return base64.urlsafe_b64encode(payload + _tag(payload)).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[uuid.UUID, int, Direction]:
    """The room, seq and direction inside a cursor.

    Raises:
        InvalidInput: ``cursor`` is malformed, tampered with or of an unknown version.
    """
    if not isinstance(cursor, str) or len(cursor) > 64:
        raise InvalidInput("cursor", "malformed")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput("cursor", "malformed") from None
    size = _CURSOR_FORMAT.size
    if len(raw) != size + _CURSOR_TAG_BYTES:
        raise InvalidInput("cursor", "malformed")
    payload, tag = raw[:size], raw[size:]
    if tag != _tag(payload):
        raise InvalidInput("cursor", "tampered with or corrupted")
    version, direction, room, seq = _CURSOR_FORMAT.unpack(payload)
    if version != _CURSOR_VERSION or direction not in (b"a", b"b") or seq < 0:
        raise InvalidInput("cursor", "unknown version")
    return uuid.UUID(bytes=room), seq, "before" if direction == b"b" else "after"


def _page_size(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInput("limit", f"an integer from 1 to {MAX_PAGE_SIZE}")
    return limit


def _seq(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_SEQ:
        raise InvalidInput(field, "a seq: an integer >= 0")
    return value


class MessageRepository(BaseRepository[Message]):
    """Messages, history and read state.

    No generic ``create`` or ``update``: a message is written only by :meth:`send` (as a
    member, with its seq from the trigger) and changed only by :meth:`edit` (its content,
    by its author). Its room, author and seq never change, so nothing is declared
    insertable or updatable through the base.
    """

    table: ClassVar[str] = "messages"
    model: ClassVar[type[Message]] = Message
    entity: ClassVar[str] = "message"

    # -- writes ---------------------------------------------------------------------------

    async def send(self, dto: CreateMessageDto) -> Message:
        """Store a message from a member; a repeated ``client_msg_id`` returns the first.

        Raises:
            NotFound: the room does not exist.
            PermissionDenied: the sender is not a member, or the room is archived.
            InvalidInput: ``dto`` is not a CreateMessageDto.
        """
        message, _ = await self.send_logged(dto)
        return message

    async def send_logged(self, dto: CreateMessageDto) -> tuple[Message, int | None]:
        """:meth:`send`, with the room position its ``message.created`` took.

        The position is ``None`` when nothing new was stored (a repeated
        ``client_msg_id``). Raises what :meth:`send` raises.
        """
        if not isinstance(dto, CreateMessageDto):
            raise InvalidInput("dto", "must be a CreateMessageDto")
        result = (await self.send_many([dto]))[0]
        if isinstance(result, ChatkeepError):
            raise result
        return result

    async def send_many(self, dtos: Sequence[CreateMessageDto]) -> list[SendResult]:
        """Store a batch of messages, each as its own sender, in one statement.

        Outside a transaction the batch is one round trip and commits on its own; inside
        one, every message must come from the user the transaction acts as. Each message
        gets its own answer, in the order given: ``(message, position)`` as
        :meth:`send_logged` returns it, or the error :meth:`send` would raise for it alone
        (one refused message never fails its neighbours). Messages to one room are stored
        in the order given, with consecutive seqs when nothing else writes there.

        Raises:
            InvalidInput: ``dtos`` is not a list or tuple of CreateMessageDto, or holds more
                than :data:`MAX_SEND_BATCH`.
            Unavailable: PostgreSQL could not be reached; whether the batch was stored
                is unknown (retry with the same ``client_msg_id`` to find out).
        """
        given: object = dtos
        if not isinstance(given, list | tuple) or not all(
            isinstance(d, CreateMessageDto) for d in given
        ):
            raise InvalidInput("dtos", "must be a list or tuple of CreateMessageDto")
        if len(dtos) > MAX_SEND_BATCH:
            raise InvalidInput("dtos", f"at most {MAX_SEND_BATCH} messages")
        if not dtos:
            return []
        if self.db.settings.citus:
            # On Citus each message is its own short transaction acting as its sender
            # (a function's set_config never reaches the workers; SET LOCAL does).
            return [await self._send_citus_alone(d) for d in dtos]
        try:
            rows = await self._send_statement(dtos)
        except Unavailable:
            raise
        except ChatkeepError as exc:
            if len(dtos) > 1:
                # A row raised (a client_msg_id raced by another transaction, say) and the
                # statement stored nothing: each message alone, so it fails only itself.
                return [await self._send_alone(d) for d in dtos]
            if not (isinstance(exc, Conflict) and exc.constraint == "messages_client_msg_id_key"):
                raise
            # Lost a first-send race on its client_msg_id: the retry finds the winner.
            rows = await self._send_statement(dtos)
        results: list[SendResult] = [ChatkeepError("unanswered")] * len(dtos)
        for row in rows:
            i = row["idx"] - 1
            if row["outcome"] in ("sent", "existing"):
                values = {k: row[k] for k in _MESSAGE_KEYS}
                results[i] = (Message._adopt(values), row["position"])
            else:
                results[i] = _refusal(row["outcome"], dtos[i].room_id)
        return results

    async def _send_alone(self, dto: CreateMessageDto) -> SendResult:
        try:
            return (await self.send_many([dto]))[0]
        except Unavailable:
            raise
        except ChatkeepError as exc:
            return exc

    async def _send_statement(self, dtos: Sequence[CreateMessageDto]) -> list[Any]:
        args = _send_arrays(dtos)
        if self.db.in_transaction():
            # A savepoint, so a lost client_msg_id race does not abort the caller's
            # transaction.
            async with self.db.transaction("messages.send_savepoint"):
                return await self.db.fetch("messages.send", SEND_MANY, *args)
        return await self.db.fetch("messages.send", SEND_MANY, *args)

    async def _send_citus_alone(self, dto: CreateMessageDto) -> SendResult:
        args = (
            uuid7(),
            dto.room_id,
            dto.user_id,
            dto.client_msg_id,
            dto.content,
            dto.type,
            dto.reply_to,
        )
        try:
            async with self.db.acting_as(dto.user_id, "messages.send"):
                return await self._send_citus(dto, args)
        except Unavailable:
            raise
        except ChatkeepError as exc:
            return exc

    async def _send_citus(
        self, dto: CreateMessageDto, args: tuple[object, ...]
    ) -> tuple[Message, int | None]:
        async with self.db.transaction("messages.send"):
            if dto.client_msg_id is not None:
                first = await self.db.fetchrow(
                    "messages.find_by_client_id",
                    FIND_BY_CLIENT_ID,
                    dto.room_id,
                    dto.user_id,
                    dto.client_msg_id,
                )
                if first is not None:
                    return Message._adopt(dict(first)), None
            found = await self.db.fetchrow(
                "messages.why_not_sent", WHY_NOT_SENT, dto.room_id, dto.user_id
            )
            if found is None or not found["member"] or not found["is_active"]:
                await self._why_not_sent(dto.room_id, dto.user_id)
            try:
                row = await self.db.fetchrow("messages.send", SEND_INSERT_CITUS, *args)
            except NotFound as exc:
                # Citus relays a worker's error without its constraint name: the reply's
                # check (trigger messages_thread_root, migration 023) is named here again,
                # as PostgreSQL names it, for the facade's reply_to error.
                if dto.reply_to is None or "reply_to:" not in str(exc.__cause__):
                    raise
                raise NotFound(
                    "messages.send: a referenced row does not exist (messages_reply_to_fkey)",
                    entity="messages",
                ) from exc
            assert row is not None  # noqa: S101 - an INSERT ... VALUES returns its row
            await self.db.execute(
                "messages.send_seen",
                SEND_SEEN_CITUS,
                dto.room_id,
                dto.user_id,
                row["seq"],
                row["created_at"],
            )
            position = await self.db.fetchval("messages.send_position", ROOM_POSITION, dto.room_id)
        return Message._adopt(dict(row)), position

    async def _why_not_sent(self, room: uuid.UUID, user: uuid.UUID) -> NoReturn:
        found = await self.db.fetchrow("messages.why_not_sent", WHY_NOT_SENT, room, user)
        if found is None:
            raise not_found("room", room)
        if not found["member"]:
            raise PermissionDenied("only members may send to this room")
        raise PermissionDenied("the room is archived")

    async def edit(self, message_id: uuid.UUID, content: str, *, by: uuid.UUID) -> Message:
        """Replace the content of the author's own message; sets is_edited and edited_at.

        Raises:
            NotFound: no such message.
            PermissionDenied: ``by`` is not the author.
            InvalidInput: ``content`` breaks a rule.
        """
        key = check_id("message_id", message_id)
        actor = check_id("by", by)
        text = check_content(content)
        row = await self.db.fetchrow("messages.edit", EDIT, key, actor, text)
        if row is None:
            await self._require("message", key)
            raise PermissionDenied("only the author may edit a message")
        return Message._from_row(row)

    async def delete(self, id: uuid.UUID, *, by: uuid.UUID | None = None) -> bool:
        """Delete a message; True if it existed.

        With ``by``, only the author or an owner/admin of the room may delete it. Its
        ``seq`` is not reused: history simply skips it.

        Raises:
            PermissionDenied: ``by`` may not delete this message.
        """
        if by is None:
            return await super().delete(id)
        key = check_id("id", id)
        actor = check_id("by", by)
        deleted = await self.db.fetchval("messages.delete", DELETE_AS, key, actor)
        if deleted is not None:
            return True
        if not await self._exists("message", key):
            return False
        raise PermissionDenied("only the author or a room owner/admin may delete a message")

    async def edit_logged(
        self, message_id: uuid.UUID, content: str, *, by: uuid.UUID
    ) -> tuple[Message, int | None]:
        """:meth:`edit` as ``by`` in one round trip, with the position its change took.

        Runs outside any transaction (or in one acting as ``by``): migration 018's
        ``chatkeep_edit_message`` sets ``by`` as the acting user for its own statement, so
        row security binds it as it binds :meth:`edit` in :meth:`Database.acting_as`.
        Not on Citus (the function is plain-only): there, call :meth:`edit` in a
        transaction acting as ``by``.

        Raises:
            NotFound: no such message, or one ``by`` cannot see.
            PermissionDenied: ``by`` is not the author.
            InvalidInput: ``content`` breaks a rule, a bad id, or the task is in a
                transaction acting as someone else.
        """
        key = check_id("message_id", message_id)
        actor = check_id("by", by)
        text = check_content(content)
        refuse_on_citus(self.db, "messages.edit_logged", "messages.edit")
        row = await self.db.fetchrow_as(actor, "messages.edit", EDIT_AS, key, text)
        if row is not None and row["outcome"] == "edited":
            return Message._adopt({k: row[k] for k in _MESSAGE_KEYS}), row["position"]
        if row is not None and row["outcome"] == "not_author":
            raise PermissionDenied("only the author may edit a message")
        raise not_found("message", key)

    async def delete_logged(
        self, message_id: uuid.UUID, *, by: uuid.UUID
    ) -> tuple[uuid.UUID, int, int | None] | None:
        """:meth:`delete` with ``by``, as ``by`` in one round trip (migration 018).

        Returns the deleted message's room, seq and the position of its change, or
        ``None`` when there was no such message for ``by`` (one they cannot see is none).
        Not on Citus, as :meth:`edit_logged`.

        Raises:
            PermissionDenied: ``by`` may not delete this message.
            InvalidInput: a bad id, or the task is in a transaction acting as someone else.
        """
        key = check_id("message_id", message_id)
        actor = check_id("by", by)
        refuse_on_citus(self.db, "messages.delete_logged", "messages.delete")
        row = await self.db.fetchrow_as(actor, "messages.delete", DELETE_LOGGED_AS, key)
        if row is not None and row["outcome"] == "deleted":
            return row["room_id"], int(row["seq"]), row["position"]
        if row is not None and row["outcome"] == "denied":
            raise PermissionDenied("only the author or a room owner/admin may delete a message")
        return None

    # -- history --------------------------------------------------------------------------

    async def history(
        self,
        room_id: uuid.UUID,
        *,
        cursor: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        around: int | uuid.UUID | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        as_user: uuid.UUID | None = None,
    ) -> CursorPage[MessageWithUser]:
        """A page of the room's messages in ascending ``seq``, authors joined.

        With no position, the newest page. Otherwise exactly one of: ``cursor`` (from a
        previous page's ``before``/``after``), ``before_seq`` / ``after_seq`` (strictly
        older / newer than that seq: ``after_seq=N`` is how a reconnecting client catches
        up, ``after_seq=0`` starts from the oldest), or ``around`` (a seq or a message id:
        half the page older than it, the rest from it on).

        ``as_user``: read as that user in one round trip, outside any transaction (the
        flow functions of migrations 013 and 017, :meth:`Database.fetch_as`); ``None``
        reads in the caller's transaction, as whoever it acts as. On PostgreSQL a page read
        ``as_user`` holds rows only if that user is a member of the room (whatever the
        role connected), and an ``around`` message id is one round trip too; on Citus
        (``Settings.citus``) the around case opens a transaction acting as the user.

        Raises:
            InvalidInput: more than one position, a bad cursor (malformed, tampered with,
                or of another room), or ``limit`` outside 1..200.
            NotFound: ``around`` names a message that does not exist in this room.
        """
        room = check_id("room_id", room_id)
        size = _page_size(limit)
        given = sum(p is not None for p in (cursor, before_seq, after_seq, around))
        if given > 1:
            raise InvalidInput(
                "cursor", "give at most one of cursor, before_seq, after_seq, around"
            )
        acting = None if as_user is None else check_id("as_user", as_user)
        if cursor is not None:
            cursor_room, seq, direction = decode_cursor(cursor)
            if cursor_room != room:
                raise InvalidInput("cursor", "belongs to another room")
            if direction == "before":
                return await self._before(room, seq, size, newest=False, acting=acting)
            return await self._after(room, seq, size, acting)
        if before_seq is not None:
            seq = _seq("before_seq", before_seq)
            return await self._before(room, seq, size, newest=False, acting=acting)
        if after_seq is not None:
            return await self._after(room, _seq("after_seq", after_seq), size, acting)
        if around is not None:
            if acting is not None and isinstance(around, uuid.UUID) and self.db.settings.citus:
                async with self.db.acting_as(acting, "messages.history_around"):
                    return await self._around(room, around, size, None)
            return await self._around(room, around, size, acting)
        return await self._before(room, _MAX_SEQ, size, newest=True, acting=acting)

    async def _before(
        self, room: uuid.UUID, seq: int, size: int, *, newest: bool, acting: uuid.UUID | None
    ) -> CursorPage[MessageWithUser]:
        if acting is None:
            rows = await self.db.fetch("messages.history", HISTORY_BEFORE, room, seq, size + 1)
        else:  # ascending from the function: newest first, as HISTORY_BEFORE gives them
            found = await self.db.fetch_as(
                acting, "messages.history", self._history_as, room, seq, size + 1, 0
            )
            rows = found[::-1]
        more = len(rows) > size
        items = _messages(rows[size - 1 :: -1] if more else rows[::-1])
        if not items:
            return CursorPage(
                items=(), newest=None if newest else encode_cursor(room, seq - 1, "after")
            )
        first, last = items[0].seq, items[-1].seq
        tail = encode_cursor(room, last, "after")
        return CursorPage(
            items=items,
            before=encode_cursor(room, first, "before") if more else None,
            after=None if newest else tail,
            newest=tail,
        )

    async def _after(
        self, room: uuid.UUID, seq: int, size: int, acting: uuid.UUID | None
    ) -> CursorPage[MessageWithUser]:
        if acting is None:
            rows = await self.db.fetch("messages.history_after", HISTORY_AFTER, room, seq, size + 1)
        elif seq == _MAX_SEQ:  # nothing comes after the largest seq (and seq + 1 overflows)
            rows = []
        else:
            rows = await self.db.fetch_as(
                acting, "messages.history_after", self._history_as, room, seq + 1, 0, size + 1
            )
        more = len(rows) > size
        items = _messages(rows[:size] if more else rows)
        if not items:
            return CursorPage(items=(), newest=encode_cursor(room, seq, "after"))
        first, last = items[0].seq, items[-1].seq
        tail = encode_cursor(room, last, "after")
        return CursorPage(
            items=items,
            before=encode_cursor(room, first, "before") if seq > 0 else None,
            after=tail if more else None,
            newest=tail,
        )

    async def _around(
        self, room: uuid.UUID, anchor: int | uuid.UUID, size: int, acting: uuid.UUID | None
    ) -> CursorPage[MessageWithUser]:
        if isinstance(anchor, uuid.UUID) and acting is not None:
            # One round trip: the anchor's seq is read in the function (Citus never gets
            # here with a user: history() opened a transaction for it).
            rows = await self.db.fetch_as(
                acting,
                "messages.history_around",
                HISTORY_AROUND_ID_AS,
                room,
                anchor,
                size + 1,
                size + 1,
            )
            at = next((row["seq"] for row in rows if row["id"] == anchor), None)
            if at is None:
                raise NotFound(f"message {anchor} is not in room {room}", entity="message")
            return _around_page(room, at, size, rows)
        if isinstance(anchor, uuid.UUID):
            found = await self.db.fetchrow("messages.seq_of", SEQ_OF, anchor)
            if found is None or found["room_id"] != room:
                raise NotFound(f"message {anchor} is not in room {room}", entity="message")
            seq: int = found["seq"]
        else:
            seq = _seq("around", anchor)
        if acting is None:
            rows = await self.db.fetch(
                "messages.history_around", HISTORY_AROUND, room, seq, size + 1, size + 1
            )
        else:
            rows = await self.db.fetch_as(
                acting, "messages.history_around", self._history_as, room, seq, size + 1, size + 1
            )
        return _around_page(room, seq, size, rows)

    @property
    def _history_as(self) -> str:
        # 017's function on PostgreSQL; 015's on Citus, where 017 made none.
        return HISTORY_AS if self.db.settings.citus else HISTORY_PAGE_AS

    # -- read state -----------------------------------------------------------------------

    async def mark_read(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        seq: int | None = None,
        *,
        as_user: uuid.UUID | None = None,
    ) -> int:
        """Move the member's watermark forward to ``seq`` (default: the newest message).

        Never moves it backward and never past the room's newest message; one row update
        whatever the number of unread messages. Returns the watermark after the call.

        ``as_user`` (it must be ``user_id``): as that user in one round trip, outside any
        transaction (migration 013's ``chatkeep_mark_read``).

        Raises:
            NotFound: the room does not exist.
            PermissionDenied: the user is not a member.
            InvalidInput: a bad id or ``seq``, or ``as_user`` is someone else.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        upto = None if seq is None else _seq("seq", seq)
        if as_user is not None:
            if check_id("as_user", as_user) != user:
                raise InvalidInput("as_user", "a user marks only their own read state")
            row = await self.db.fetchrow_as(user, "messages.mark_read", MARK_READ_AS, room, upto)
            if row is None or row["watermark"] is None:
                if row is None or not row["room_visible"]:
                    raise not_found("room", room)
                raise PermissionDenied("only members have read state in this room")
            return int(row["watermark"])
        if self.db.settings.citus:
            value = await self.db.fetchval("messages.mark_read", MARK_READ_CITUS, room, user, upto)
            if value is None:
                value = await self.db.fetchval(
                    "messages.read_watermark", READ_WATERMARK, room, user
                )
        else:
            value = await self.db.fetchval("messages.mark_read", MARK_READ, room, user, upto)
        if value is None:
            await self._require("room", room)
            raise PermissionDenied("only members have read state in this room")
        return int(value)

    async def mark_message_read(self, message_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Record that the user has seen this message; True if a receipt row was written.

        Nothing is written when the watermark already covers the message (or the receipt
        exists): receipts only record reads ahead of the watermark.

        Raises:
            NotFound: no such message.
            PermissionDenied: the user is not a member of the message's room.
        """
        key = check_id("message_id", message_id)
        user = check_id("user_id", user_id)
        query = MARK_MESSAGE_READ_CITUS if self.db.settings.citus else MARK_MESSAGE_READ
        row = await self.db.fetchrow("messages.mark_message_read", query, key, user)
        if row is None or not row["found"]:
            raise not_found("message", key)
        if not row["is_member"]:
            raise PermissionDenied("only members may mark messages read in this room")
        return bool(row["written"])

    async def read_by(self, message_id: uuid.UUID) -> list[MessageReadStatus]:
        """Members other than the author who have read the message, earliest first.

        Derived from watermarks (``last_read_seq >= seq``) plus explicit receipts;
        ``read_at`` is the receipt's time, else when the watermark last moved.

        Raises:
            NotFound: no such message.
        """
        key = check_id("message_id", message_id)
        rows = await self.db.fetch("messages.read_by", READ_BY, key)
        if not rows:
            await self._require("message", key)
        return [MessageReadStatus._from_row(row) for row in rows]

    async def unread_counts(
        self, user_id: uuid.UUID, *, as_user: uuid.UUID | None = None
    ) -> UnreadCounts:
        """Unread messages per room for every room of the user, in one round trip.

        Returns a read-only ``Mapping[UUID, int]`` over the rows (see
        :class:`~chatkeep.models.UnreadCounts`). ``as_user`` (it must be ``user_id``): as
        that user in one statement outside any transaction, with each room's badge
        (``chatkeep_unread``, migration 020); on Citus the plain subtraction, acting as
        the user.

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id, or ``as_user`` is someone else.
        """
        user = check_id("user_id", user_id)
        if as_user is not None:
            if check_id("as_user", as_user) != user:
                raise InvalidInput("as_user", "a user reads only their own unread counts")
            if self.db.settings.citus:
                async with self.db.acting_as(user, "messages.unread_counts"):
                    rows = await self.db.fetch("messages.unread_counts", UNREAD_COUNTS, user)
            else:
                rows = await self.db.fetch_as(user, "messages.unread_counts", UNREAD_AS)
        else:
            rows = await self.db.fetch("messages.unread_counts", UNREAD_COUNTS, user)
        if not rows:
            await self._require("user", user)
        return UnreadCounts(rows)


def _reactions(emoji: list[str], counts: list[int], mine: list[bool]) -> Iterator[ReactionCount]:
    for e, n, me in zip(emoji, counts, mine, strict=True):
        reaction = object.__new__(ReactionCount)
        _SET_REACTION(reaction, {"emoji": e, "count": n, "me": me})
        yield reaction


# Stores of a row's __dict__, looked up once (see chatkeep.models._dict_setter).
_SET_MESSAGE: Final = _dict_setter(MessageWithUser)
_SET_PROFILE: Final = _dict_setter(UserProfile)
_SET_REACTION: Final = _dict_setter(ReactionCount)


def _around_page(
    room: uuid.UUID, seq: int, size: int, rows: Sequence[Any]
) -> CursorPage[MessageWithUser]:
    """The page around ``seq`` from up to ``size + 1`` rows on each side of it."""
    # UNION ALL keeps branch order in practice; SQL does not promise it, so sort.
    rows = sorted(rows, key=lambda row: row["seq"])
    split = sum(1 for row in rows if row["seq"] < seq)
    found_older, found_newer = split, len(rows) - split
    # Half the page on each side of the anchor; a short side lends its room to the
    # other, so a page near either end of the room is still full.
    take_older = min(found_older, size // 2)
    take_newer = min(found_newer, size - take_older)
    take_older = min(found_older, size - take_newer)
    more_before = found_older > take_older
    more_after = found_newer > take_newer
    kept = rows[split - take_older : split + take_newer]
    items = _messages(kept)
    if not items:
        return CursorPage(items=(), newest=encode_cursor(room, max(seq - 1, 0), "after"))
    first, last = items[0].seq, items[-1].seq
    return CursorPage(
        items=items,
        before=encode_cursor(room, first, "before") if more_before else None,
        after=encode_cursor(room, last, "after") if more_after else None,
        newest=encode_cursor(room, last, "after"),
    )


def _messages(rows: Any) -> tuple[MessageWithUser, ...]:
    """MessageWithUser rows from history rows, without validation.

    The hot loop of a history page: each row is unpacked once and each message is built
    the way :meth:`chatkeep.models._Row._adopt` does it (one store of its ``__dict__``),
    without a call per row (``docs/performance.md`` has what each step costs).

    An author's profile is built once per page and shared by their messages. The page is
    one statement, so one snapshot, in which a username (unique) names one user with one
    avatar: keying by it needs no check.
    """
    message_cls, profile_cls = MessageWithUser, UserProfile
    new = object.__new__
    set_message, set_profile = _SET_MESSAGE, _SET_PROFILE
    profiles: dict[str, UserProfile] = {}
    known = profiles.get
    out: list[MessageWithUser] = []
    append = out.append
    for (
        id_, room_id, user_id, seq, client_msg_id, content, type_, is_edited, edited_at,
        created_at, reply_to, username, avatar_url, r_emoji, r_count, r_me,
    ) in rows:  # fmt: skip
        profile = known(username)
        if profile is None:
            profile = profiles[username] = new(profile_cls)
            set_profile(profile, {"id": user_id, "username": username, "avatar_url": avatar_url})
        message = new(message_cls)
        set_message(
            message,
            {
                "id": id_,
                "room_id": room_id,
                "user_id": user_id,
                "seq": seq,
                "client_msg_id": client_msg_id,
                "content": content,
                "type": type_,
                "is_edited": is_edited,
                "edited_at": edited_at,
                "created_at": created_at,
                "reply_to": reply_to,
                "user": profile,
                "reactions": () if r_emoji is None else tuple(_reactions(r_emoji, r_count, r_me)),
                "thread": None,
            },
        )
        append(message)
    return tuple(out)
