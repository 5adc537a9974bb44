"""Reactions (``message_reactions``, migration 012): add and remove a member's emoji.

One row per (message, emoji, user): reacting twice is a no-op. The row takes its room from
its message (a trigger), row security lets a member react only in their rooms and remove
only their own reactions, and the log's trigger records ``reaction.added`` /
``reaction.removed`` with the emoji's resulting count. History pages carry the counts
(:attr:`chatkeep.models.MessageWithUser.reactions`), read in the page's own statement.
"""

from __future__ import annotations

import uuid
from typing import Final

from chatkeep.models import Change, check_emoji
from chatkeep.storage.base import check_id, not_found, refuse_on_citus
from chatkeep.storage.changes import _change, _data
from chatkeep.storage.database import Database

__all__ = ["ReactionRepository"]

# The message is looked up through row security: one the user cannot see (or a deleted
# one) is not found, and nothing is written.
REACT: Final = """
WITH m AS (
    SELECT id FROM messages WHERE id = $1
), added AS (
    INSERT INTO message_reactions (message_id, emoji, user_id)
    SELECT m.id, $3, $2 FROM m
    ON CONFLICT (message_id, emoji, user_id) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM m) AS found, EXISTS (SELECT 1 FROM added) AS changed
"""
# On Citus the reaction names its room (the distribution column, migrations/citus): the
# message's, which the trigger checks.
REACT_CITUS: Final = (
    REACT.replace("SELECT id FROM messages", "SELECT id, room_id FROM messages")
    .replace(
        "INSERT INTO message_reactions (message_id, emoji, user_id)\n    SELECT m.id, $3, $2",
        "INSERT INTO message_reactions (room_id, message_id, emoji, user_id)\n"
        "    SELECT m.room_id, m.id, $3, $2",
    )
    .replace(
        "ON CONFLICT (message_id, emoji, user_id)",
        "ON CONFLICT (room_id, message_id, emoji, user_id)",
    )
)
UNREACT: Final = """
WITH m AS (
    SELECT id FROM messages WHERE id = $1
), removed AS (
    DELETE FROM message_reactions r
     USING m
     WHERE r.message_id = m.id AND r.emoji = $3 AND r.user_id = $2
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM m) AS found, EXISTS (SELECT 1 FROM removed) AS changed
"""

# Either, as the reacting user in one round trip, with the change the log's trigger
# recorded (migration 018's chatkeep_react: the statements above, then changes.py's
# LAST_CHANGE).
REACT_AS: Final = """
SELECT visible, changed, position, kind, occurred_at, actor_id, message_id, seq, data, room_id
  FROM chatkeep_react($1, $2, $3, $4)
"""


class ReactionRepository:
    """A member's reactions to messages of their rooms (call it acting as the member)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def react(self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str) -> bool:
        """Add the user's ``emoji`` to the message; False if it was already there.

        Raises:
            NotFound: no such message, a deleted one, or one the user cannot see.
            PermissionDenied: row security refused the row (acting as someone else).
            InvalidInput: a bad id, or ``emoji`` breaks the emoji rule.
        """
        query = REACT_CITUS if self.db.settings.citus else REACT
        return await self._change("reactions.add", query, message_id, user_id, emoji)

    async def unreact(self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str) -> bool:
        """Remove the user's ``emoji`` from the message; False if it was not there.

        Raises:
            NotFound: no such message, a deleted one, or one the user cannot see.
            InvalidInput: a bad id, or ``emoji`` breaks the emoji rule.
        """
        return await self._change("reactions.remove", UNREACT, message_id, user_id, emoji)

    async def _change(
        self, name: str, sql: str, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str
    ) -> bool:
        key = check_id("message_id", message_id)
        user = check_id("user_id", user_id)
        text = check_emoji(emoji)
        row = await self.db.fetchrow(name, sql, key, user, text)
        if row is None or not row["found"]:
            raise not_found("message", key)
        return bool(row["changed"])

    async def react_logged(
        self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str
    ) -> Change | None:
        """:meth:`react` as ``user_id`` in one round trip; the ``reaction.added`` change.

        ``None`` if the user had already reacted with it (nothing changed). Runs outside
        any transaction (or in one acting as ``user_id``); not on Citus (migration 018's
        function is plain-only): there, call :meth:`react` in a transaction acting as
        the user.

        Raises:
            NotFound: no such message, a deleted one, or one the user cannot see.
            InvalidInput: a bad id, ``emoji`` breaks the emoji rule, or the task is in a
                transaction acting as someone else.
        """
        refuse_on_citus(self.db, "reactions.react_logged", "reactions.react")
        return await self._change_as("reactions.add", message_id, user_id, emoji, adding=True)

    async def unreact_logged(
        self, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str
    ) -> Change | None:
        """:meth:`unreact` as ``user_id`` in one round trip; the ``reaction.removed`` change.

        ``None`` if the user had not reacted with it. As :meth:`react_logged` otherwise.
        """
        refuse_on_citus(self.db, "reactions.unreact_logged", "reactions.unreact")
        return await self._change_as("reactions.remove", message_id, user_id, emoji, adding=False)

    async def _change_as(
        self, name: str, message_id: uuid.UUID, user_id: uuid.UUID, emoji: str, *, adding: bool
    ) -> Change | None:
        key = check_id("message_id", message_id)
        user = check_id("user_id", user_id)
        text = check_emoji(emoji)
        row = await self.db.fetchrow_as(user, name, REACT_AS, key, text, adding)
        if row is None or not row["visible"]:
            raise not_found("message", key)
        if not row["changed"]:
            return None
        return _change(row["room_id"], row, _data(row, joined=False))
