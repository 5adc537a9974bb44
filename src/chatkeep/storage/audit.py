"""Reading the audit trail (``audit_log``, written by triggers; migration 010).

The application role cannot read it: connect as the migrator (or the read-only role) to
look. Rows are never updated or deleted, so ``id`` orders them as they were written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

import asyncpg

from chatkeep.errors import InvalidInput
from chatkeep.storage.errors import translate_errors

__all__ = ["AUDIT_ACTIONS", "AuditAction", "AuditEntry", "tail"]

AuditAction = Literal[
    "user.update",
    "user.delete",
    "member.role_change",
    "member.remove",
    "room.delete",
    "room.type_change",
    "message.delete",
]
AUDIT_ACTIONS: Final = frozenset(get_args(AuditAction))
MAX_LIMIT: Final = 1000

# Filters are optional: a NULL parameter switches its condition off.
TAIL: Final = """
SELECT id, occurred_at, actor_id, db_role, action, table_name, row_id, room_id, changes,
       application_name, host(client_addr) AS client_addr
  FROM audit_log
 WHERE ($2::text IS NULL OR action = $2)
   AND ($3::uuid IS NULL OR actor_id = $3)
   AND ($4::uuid IS NULL OR room_id = $4)
 ORDER BY id DESC
 LIMIT $1
"""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited change."""

    id: int
    occurred_at: datetime
    actor_id: uuid.UUID | None  # None: system work, no acting user
    db_role: str
    action: AuditAction
    table_name: str
    row_id: uuid.UUID
    room_id: uuid.UUID | None
    changes: dict[str, Any]
    application_name: str
    client_addr: str | None  # None over a Unix socket

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this entry."""
        return {
            "id": self.id,
            "occurred_at": self.occurred_at.isoformat(),
            "actor_id": str(self.actor_id) if self.actor_id else None,
            "db_role": self.db_role,
            "action": self.action,
            "table_name": self.table_name,
            "row_id": str(self.row_id),
            "room_id": str(self.room_id) if self.room_id else None,
            "changes": self.changes,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
        }


async def tail(
    conn: asyncpg.Connection,
    *,
    limit: int = 20,
    action: str | None = None,
    actor_id: uuid.UUID | None = None,
    room_id: uuid.UUID | None = None,
) -> list[AuditEntry]:
    """The newest audit entries first, optionally only one action, actor or room.

    Args:
        conn: a connection as a role that may read ``audit_log`` (the migrator or
            ``chatapp_readonly``; not the application role).
        limit: how many entries, 1 to 1000.
        action: only this action (one of :data:`AUDIT_ACTIONS`).
        actor_id: only what this user did.
        room_id: only what happened in this room.

    Raises:
        InvalidInput: ``limit`` or ``action`` is out of range.
        PermissionDenied: the role may not read the audit trail.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    if action is not None and action not in AUDIT_ACTIONS:
        raise InvalidInput("action", f"must be one of {', '.join(sorted(AUDIT_ACTIONS))}")
    with translate_errors("audit tail"):
        rows = await conn.fetch(TAIL, limit, action, actor_id, room_id)
    return [_entry(row) for row in rows]


def _entry(row: asyncpg.Record) -> AuditEntry:
    changes = row["changes"]
    if isinstance(changes, str):  # asyncpg returns jsonb as text unless a codec is set
        changes = json.loads(changes)
    return AuditEntry(
        id=row["id"],
        occurred_at=row["occurred_at"],
        actor_id=row["actor_id"],
        db_role=row["db_role"],
        action=row["action"],
        table_name=row["table_name"],
        row_id=row["row_id"],
        room_id=row["room_id"],
        changes=changes,
        application_name=row["application_name"],
        client_addr=row["client_addr"],
    )
