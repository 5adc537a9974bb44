"""The room change log (``room_changes``, migration 012): read it, read a room's position, prune.

Triggers write the log: every change a member can see takes the room's next position
(``rooms.position``) under the room row lock, in the transaction that makes it, so a
room's positions are gapless and in commit order. A message's ``seq`` is the message's
own number; ``position`` is the room's version. ``docs/design.md`` ("The room change
log") says why it has this shape.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

from chatkeep.errors import InvalidInput, ResyncRequired
from chatkeep.models import Change, ChangePage
from chatkeep.storage.base import check_id, not_found
from chatkeep.storage.database import Database

__all__ = ["DEFAULT_CHANGES_LIMIT", "MAX_CHANGES_LIMIT", "ChangeRepository"]

DEFAULT_CHANGES_LIMIT: Final = 100
MAX_CHANGES_LIMIT: Final = 1000
_MAX_POSITION: Final = 2**63 - 1
_MESSAGE_KINDS: Final = frozenset({"message.created", "message.edited"})

# One statement, so the room's position, the oldest position still logged and the page
# come from one snapshot. The room's head bounds the page: a change is only ever read
# with every change before it. Every table names the room by $1 (Citus routes the read
# to the room's shard; correlated on r.id, Citus 13.2's planner crashed on it). Messages
# are joined as they are now (the log keeps no content): created/edited changes of a
# message deleted since come back without it and are dropped by the caller, as the
# message's tombstone follows them. {data} is the change's data, with the message's
# mentions (migration 021; on Citus 023 keeps them by room, read on the room's shard).
_CHANGES: Final = """
SELECT h.head, h.oldest,
       c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq, {data} AS data,
       m.id AS m_id, m.user_id AS m_user_id, m.content AS m_content, m.type AS m_type,
       m.client_msg_id AS m_client_msg_id, m.is_edited AS m_is_edited,
       m.edited_at AS m_edited_at, m.created_at AS m_created_at, m.reply_to AS m_reply_to
  FROM (SELECT r.position AS head,
               (SELECT min(x.position) FROM room_changes x WHERE x.room_id = $1) AS oldest
          FROM rooms r WHERE r.id = $1) AS h
  LEFT JOIN LATERAL (
        SELECT * FROM room_changes c
         WHERE c.room_id = $1 AND c.position > $2 AND c.position <= h.head
         ORDER BY c.position
         LIMIT $3
       ) AS c ON true
  LEFT JOIN messages m
         ON m.room_id = $1 AND m.id = c.message_id
        AND c.kind IN ('message.created', 'message.edited')
 ORDER BY c.position
"""
# A message's mentions as it is now (members only: 015 records nobody else), merged into
# the data of its created/edited change as migration 021's chatkeep_changes does. Only a
# message with an '@' can mention anyone, and CASE runs the subquery for those alone (a
# lateral join cost every row of the page its aggregate: 25% more for 1,000 changes).
_MENTIONS_DATA: Final = """CASE WHEN strpos(m.content, '@') > 0 THEN c.data || coalesce(
            (SELECT jsonb_build_object(
                        'mentions', coalesce(jsonb_agg(mm.user_id ORDER BY mm.user_id)
                                             FILTER (WHERE mm.user_id IS NOT NULL), '[]'),
                        'mentions_room', bool_or(mm.user_id IS NULL))
               FROM message_mentions mm WHERE mm.message_id = m.id HAVING count(*) > 0),
            '{}') ELSE c.data END"""
CHANGES: Final = _CHANGES.format(data=_MENTIONS_DATA)
# On Citus the mentions name the room too, so the whole read stays on the room's shard.
CHANGES_CITUS: Final = _CHANGES.format(
    data=_MENTIONS_DATA.replace("WHERE mm.message_id", "WHERE mm.room_id = $1 AND mm.message_id")
)
POSITION: Final = "SELECT position FROM rooms WHERE id = $1"
# The outbox relay's system read of every room's log (012, with reply_to and the mentions
# since 021): refused acting as a user.
RELAY_CHANGES: Final = "SELECT * FROM chatkeep_relay_changes($1, $2)"
# The mentions of messages just sent, each read as its author (021).
SENT_MENTIONS: Final = "SELECT * FROM chatkeep_sent_mentions($1::uuid[], $2::uuid[])"
# On Citus (no 021 there): an author's messages' mention rows, read in a transaction acting
# as the author, so row security shows them only while the author is a member (023's
# policies); a NULL user_id is a mention of the room.
SENT_MENTIONS_CITUS: Final = (
    "SELECT message_id, user_id FROM message_mentions WHERE message_id = ANY($1::uuid[])"
)
# The same as a user in one round trip (migration 013's flow functions).
CHANGES_AS: Final = "SELECT * FROM chatkeep_changes($1, $2, $3, $4)"
POSITION_AS: Final = "SELECT chatkeep_room_position($1, $2)"
# The position the current transaction's last change took (set by the log's triggers).
LAST_POSITION: Final = "SELECT nullif(current_setting('chatkeep.position', true), '')::bigint"
LAST_CHANGE: Final = """
SELECT position, kind, occurred_at, actor_id, message_id, seq, data, room_id
  FROM room_changes
 WHERE room_id = nullif(current_setting('chatkeep.room', true), '')::uuid
   AND position = nullif(current_setting('chatkeep.position', true), '')::bigint
"""
# Retention: a room keeps at most its newest `keep` changes, none older than `max_age`
# (either bound may be off). Run as the owner (maintenance).
PRUNE: Final = """
DELETE FROM room_changes c
 USING rooms r
 WHERE r.id = c.room_id
   AND (c.position <= r.position - $1::bigint
        OR c.occurred_at < now() - $2::interval)
   -- (a NULL bound is off: its comparison is NULL, not true)
"""


def check_position(field: str, value: object) -> int:
    """``value`` if it is a position (an integer >= 0).

    Raises:
        InvalidInput: it is not.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_POSITION:
        raise InvalidInput(field, "a position: an integer >= 0")
    return value


def _limit(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHANGES_LIMIT:
        raise InvalidInput("limit", f"an integer from 1 to {MAX_CHANGES_LIMIT}")
    return value


def mentions_of(data: Mapping[str, Any]) -> tuple[tuple[uuid.UUID, ...], bool]:
    """The mentioned members (sorted) and the room mention flag in a log row's ``data``.

    Migration 021's reads merge them into the data of message rows that mention anyone;
    a row without them (no mention, Citus, an older read) mentions nobody.
    """
    users = data.get("mentions") or ()
    return tuple(sorted(uuid.UUID(str(u)) for u in users)), bool(data.get("mentions_room"))


def _data(row: Any, *, joined: bool = True) -> dict[str, Any]:
    # `joined`: the row carries the message as it is now (m_* columns).
    if joined and row["kind"] in _MESSAGE_KINDS:
        mentions, room_wide = mentions_of(row["data"])
        return {
            "user_id": row["m_user_id"],
            "content": row["m_content"],
            "type": row["m_type"],
            "client_msg_id": row["m_client_msg_id"],
            "is_edited": row["m_is_edited"],
            "edited_at": row["m_edited_at"],
            "created_at": row["m_created_at"],
            "reply_to": row["m_reply_to"],
            "mentions": mentions,
            "mentions_room": room_wide,
        }
    data: dict[str, Any] = dict(row["data"])
    if "user_id" in data:
        data["user_id"] = uuid.UUID(data["user_id"])
    return data


def _change(room: uuid.UUID, row: Any, data: dict[str, Any]) -> Change:
    return Change._adopt(
        {
            "room_id": room,
            "position": row["position"],
            "kind": row["kind"],
            "occurred_at": row["occurred_at"],
            "actor_id": row["actor_id"],
            "message_id": row["message_id"],
            "seq": row["seq"],
            "data": data,
        }
    )


class ChangeRepository:
    """A room's change log: pages of changes after a position, the room's position."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def changes(
        self,
        room_id: uuid.UUID,
        *,
        after: int,
        limit: int = DEFAULT_CHANGES_LIMIT,
        as_user: uuid.UUID | None = None,
    ) -> ChangePage:
        """The room's changes after position ``after``, ascending, at most ``limit``.

        Row security shows a member only their rooms' changes: call it acting as one, or
        pass ``as_user`` to read as that user in one round trip outside any transaction.

        Raises:
            NotFound: no such room (or one the acting user cannot see).
            InvalidInput: a bad id, a negative or future ``after`` (past the room's
                position), or ``limit`` outside 1..1000.
            ResyncRequired: the changes after ``after`` were pruned: reload the room.
        """
        room = check_id("room_id", room_id)
        start = check_position("after", after)
        size = _limit(limit)
        if as_user is None:
            statement = CHANGES_CITUS if self.db.settings.citus else CHANGES
            rows = await self.db.fetch("changes.after", statement, room, start, size)
        elif self.db.settings.citus:
            # 013's function on Citus predates the mentions (021 is plain-only): the
            # statement, with them, in a transaction acting as the user.
            async with self.db.acting_as(check_id("as_user", as_user), "changes.after"):
                rows = await self.db.fetch("changes.after", CHANGES_CITUS, room, start, size)
        else:
            rows = await self.db.fetch_as(
                check_id("as_user", as_user), "changes.after", CHANGES_AS, room, start, size
            )
        if not rows:
            raise not_found("room", room)
        head: int = rows[0]["head"]
        oldest: int | None = rows[0]["oldest"]
        if start > head:
            raise InvalidInput("after", f"a future position: the room is at {head}")
        # The log holds (oldest - 1, head]; with nothing held, only `head` itself resumes.
        floor = head if oldest is None else oldest - 1
        if start < floor:
            raise ResyncRequired(
                f"room {room}: changes after {start} are no longer kept; reload the room",
                room_id=room,
                oldest_position=floor + 1,
                position=head,
            )
        items: list[Change] = []
        last = start
        for row in rows:
            position = row["position"]
            if position is None:  # the room had nothing after `start`
                break
            last = position
            if row["kind"] in _MESSAGE_KINDS and row["m_id"] is None:
                continue  # deleted since: its tombstone comes later in the log
            items.append(_change(room, row, _data(row)))
        return ChangePage(
            room_id=room, items=items, position=head, next_after=last if last < head else None
        )

    async def relay_changes(
        self, since: datetime, *, limit: int = DEFAULT_CHANGES_LIMIT
    ) -> list[Change]:
        """Every room's changes logged since ``since``, oldest first: the relay's system read.

        The changes are those :meth:`changes` returns (messages as they are now, with
        ``reply_to`` and mentions; a created or edited change of a message deleted since
        is left out), across rooms, ordered by ``occurred_at`` (the transaction's start,
        not its commit: read with a margin). System work: call it outside any transaction
        acting as a user, with a role that sees every room.

        Raises:
            InvalidInput: ``since`` is not an aware datetime, or ``limit`` is outside
                1..1000.
            PermissionDenied: called acting as a user.
        """
        if not isinstance(since, datetime) or since.utcoffset() is None:
            raise InvalidInput("since", "a timezone-aware datetime")
        size = _limit(limit)
        rows = await self.db.fetch("changes.relay", RELAY_CHANGES, since, size)
        found: list[Change] = []
        for row in rows:
            if row["kind"] in _MESSAGE_KINDS and row["m_id"] is None:
                continue  # deleted since: its tombstone comes later in the log
            # Citus keeps 012's form of the read, without reply_to.
            values = {**dict(row), "m_reply_to": row.get("m_reply_to")}
            found.append(_change(row["room_id"], values, _data(values)))
        return found

    async def sent_mentions(
        self, sent: Sequence[tuple[uuid.UUID, uuid.UUID]]
    ) -> dict[uuid.UUID, tuple[tuple[uuid.UUID, ...], bool]]:
        """The mentions of messages just sent, for their ``message.created`` events.

        ``sent`` holds ``(message_id, author_id)`` pairs; each message is read only as its
        author, who must still be a member of its room. Returns, per message that
        mentions anyone, the mentioned members (sorted) and whether it mentions the room
        (on Citus, read in a transaction acting as each author).

        Raises:
            InvalidInput: ``sent`` is not a list or tuple of pairs (at most 1000), or holds
                a bad id.
            PermissionDenied: called acting as a user who is not every message's author.
        """
        given: object = sent
        if not isinstance(given, list | tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 for pair in given
        ):
            raise InvalidInput("sent", "must be a list of (message_id, author_id) pairs")
        if len(sent) > MAX_CHANGES_LIMIT:
            raise InvalidInput("sent", f"at most {MAX_CHANGES_LIMIT} messages")
        ids = [check_id("message_id", m) for m, _ in sent]
        authors = [check_id("author_id", a) for _, a in sent]
        if not sent:
            return {}
        if self.db.settings.citus:
            return await self._sent_mentions_citus(ids, authors)
        rows = await self.db.fetch("changes.sent_mentions", SENT_MENTIONS, ids, authors)
        return {
            row["message_id"]: (tuple(sorted(row["mentions"])), bool(row["mentions_room"]))
            for row in rows
        }

    async def _sent_mentions_citus(
        self, ids: list[uuid.UUID], authors: list[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[tuple[uuid.UUID, ...], bool]]:
        by_author: dict[uuid.UUID, list[uuid.UUID]] = {}
        for message, author in zip(ids, authors, strict=True):
            by_author.setdefault(author, []).append(message)
        users: dict[uuid.UUID, list[uuid.UUID]] = {}
        room_wide: set[uuid.UUID] = set()
        for author, messages in by_author.items():
            async with self.db.acting_as(author, "changes.sent_mentions"):
                rows = await self.db.fetch("changes.sent_mentions", SENT_MENTIONS_CITUS, messages)
            for row in rows:
                users.setdefault(row["message_id"], [])
                if row["user_id"] is None:
                    room_wide.add(row["message_id"])
                else:
                    users[row["message_id"]].append(row["user_id"])
        return {m: (tuple(sorted(found)), m in room_wide) for m, found in users.items()}

    async def position(self, room_id: uuid.UUID, *, as_user: uuid.UUID | None = None) -> int:
        """The room's current position (0 for a room that never changed).

        ``as_user``: as that user in one round trip, outside any transaction.

        Raises:
            NotFound: no such room (or one the acting user cannot see).
            InvalidInput: a bad id.
        """
        room = check_id("room_id", room_id)
        if as_user is None:
            value = await self.db.fetchval("changes.position", POSITION, room)
        else:
            found = await self.db.fetchrow_as(
                check_id("as_user", as_user), "changes.position", POSITION_AS, room
            )
            value = None if found is None else found[0]
        if value is None:
            raise not_found("room", room)
        return int(value)

    async def last_position(self) -> int | None:
        """The position the current transaction's newest change took, if it made one.

        For a flow that stamps its event: call it in the transaction that made the change.
        """
        value = await self.db.fetchval("changes.last_position", LAST_POSITION)
        return None if value is None else int(value)

    async def last_change(self) -> Change | None:
        """The current transaction's newest change, if it made one (and may read it)."""
        row = await self.db.fetchrow("changes.last_change", LAST_CHANGE)
        if row is None:
            return None
        return _change(row["room_id"], row, _data(row, joined=False))

    async def prune(self, *, keep: int | None = None, max_age: timedelta | None = None) -> int:
        """Delete changes past retention; returns how many went.

        A room keeps at most its newest ``keep`` changes, none older than ``max_age``;
        ``None`` turns that bound off (both ``None``: nothing is pruned).
        A client behind what is left gets :class:`~chatkeep.errors.ResyncRequired`.
        Maintenance: run it as the migrator's role (the application role may not delete
        from the log).

        Raises:
            InvalidInput: ``keep`` is not an integer >= 1 or ``max_age`` not a positive
                timedelta.
        """
        if keep is not None and (
            not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= _MAX_POSITION
        ):
            raise InvalidInput("keep", "an integer >= 1, or None")
        if max_age is not None and (not isinstance(max_age, timedelta) or max_age <= timedelta(0)):
            raise InvalidInput("max_age", "a positive timedelta, or None")
        if keep is None and max_age is None:
            return 0
        status = await self.db.execute(
            "changes.prune",
            PRUNE,
            keep,
            max_age,
        )
        return int(status.split()[-1])
