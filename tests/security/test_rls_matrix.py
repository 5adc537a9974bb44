"""The row-security matrix: every table x operation x relation, as chatapp_app, for real.

For every table in schema ``public`` (read from the catalog, so a new table shows up here by
failing :func:`test_every_table_and_case_has_an_expectation` until someone writes down what
the application role may do with it), every operation and every relation of the acting user
to the row, :data:`EXPECTED` says what happens:

* ``OK``: the statement reads or changes the row;
* ``HIDDEN``: no error, and zero rows visible or affected (the row is not there for them);
* ``DENIED``: refused with ``PermissionDenied`` (a policy's WITH CHECK, a guard trigger or a
  missing privilege: ``insufficient_privilege`` in every case);
* ``NOT_FOUND``: refused with ``NotFound``: writing into a room you cannot see, which to you
  does not exist.

A pair ``(private, public)`` gives the answers for a row in the private room and in the
public room; one outcome holds for both. The relations, for a row of each room:

* ``author``: whose row it is: the user themself (users), the room's creator (rooms), the
  member (room_users), the message's author (messages), the reader (message_read_status);
* ``member``, ``admin``, ``owner``: another member of the row's room with that role;
* ``outsider``: a user with no tie to the room; ``removed``: a former member (who wrote a
  message there before being removed); ``nobody``: no acting user at all.

Each case runs in its own transaction, rolled back, so no case sees another's writes. The
writes are the ones the flows make: a user updates their username, an admin renames a room,
a member is promoted to admin, an author edits a message; inserts add a new row as the
actor (a sign-up, a room of their own, ``frank`` added to the room, a message, a receipt).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from chatkeep.errors import NotFound, PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.storage.errors import translate_error
from tests.security.conftest import HASH, World, insert_user, set_acting_user


class Outcome(enum.Enum):
    OK = "allowed"
    HIDDEN = "zero rows"
    DENIED = "PermissionDenied"
    NOT_FOUND = "NotFound"


OK, HIDDEN, DENIED, NOT_FOUND = Outcome.OK, Outcome.HIDDEN, Outcome.DENIED, Outcome.NOT_FOUND
Expect = Outcome | tuple[Outcome, Outcome]  # one for both rooms, or (private, public)

OPERATIONS = ("select", "insert", "update", "delete")
RELATIONS = ("author", "member", "admin", "owner", "outsider", "removed", "nobody")
ROOMS = ("private", "public")

# Tables without row-security policies, and why that is safe. They are still in EXPECTED.
EXEMPT = {
    "chatkeep_schema_history": "the migration runner's history: chatapp_app may read it "
    "(chatkeep doctor) and nothing else, and a trigger refuses updates and deletes",
    "audit_log": "chatapp_app holds no privilege on it at all: rows arrive only through the "
    "SECURITY DEFINER audit trigger (migration 010)",
}


def row(*outcomes: Expect) -> tuple[Expect, ...]:
    return outcomes


# Where the private and the public room differ, as (private, public):
H_OK = (HIDDEN, OK)  # the private room's row is not there; the public room's is
H_DENY = (HIDDEN, DENIED)  # not there; there, but not theirs to change
NF_DENY = (NOT_FOUND, DENIED)  # no such room, to them; a room they may see but not write in

# fmt: off
EXPECTED_BY_TABLE: dict[str, dict[str, tuple[Expect, ...]]] = {
    #                     author  member  admin   owner   outsider removed  nobody
    "users": {
        "select":     row(OK,     OK,     OK,     OK,     OK,      OK,      OK),
        "insert":     row(OK,     OK,     OK,     OK,     OK,      OK,      OK),
        "update":     row(OK,     DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(OK,     DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "rooms": {
        "select":     row(OK,     OK,     OK,     OK,     H_OK,    H_OK,    H_OK),
        "insert":     row(OK,     OK,     OK,     OK,     OK,      OK,      DENIED),
        "update":     row(OK,     DENIED, OK,     OK,     H_DENY,  H_DENY,  H_DENY),
        "delete":     row(OK,     DENIED, DENIED, OK,     H_DENY,  H_DENY,  H_DENY),
    },
    "room_users": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(DENIED, DENIED, OK,     OK,     DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "delete":     row(OK,     DENIED, OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
    },
    "messages": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(OK,     OK,     OK,     OK,     NF_DENY, NF_DENY, NF_DENY),
        "update":     row(OK,     DENIED, DENIED, DENIED, HIDDEN,  HIDDEN,  HIDDEN),
        "delete":     row(OK,     DENIED, OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
    },
    "message_read_status": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(OK,     OK,     OK,     OK,     DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "room_changes": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "message_reactions": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(OK,     OK,     OK,     OK,     DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(OK,     HIDDEN, HIDDEN, HIDDEN, HIDDEN,  HIDDEN,  HIDDEN),
    },
    # The author's message is a thread root: alice replied, mentioning the author, so the
    # author follows it (their follower row) and is mentioned (their mention row).
    "threads": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "thread_followers": {
        "select":     row(OK,     HIDDEN, HIDDEN, HIDDEN, HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(OK,     OK,     OK,     OK,     DENIED,  DENIED,  DENIED),
        "update":     row(OK,     HIDDEN, HIDDEN, HIDDEN, HIDDEN,  HIDDEN,  HIDDEN),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "message_mentions": {
        "select":     row(OK,     OK,     OK,     OK,     HIDDEN,  HIDDEN,  HIDDEN),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    # Migration 020: written by the mention trigger only, read by chatkeep_unread as the
    # definer; chatapp_app holds no privilege on it.
    "room_mention_heads": {
        "select":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "audit_log": {
        "select":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
    "chatkeep_schema_history": {
        "select":     row(OK,     OK,     OK,     OK,     OK,      OK,      OK),
        "insert":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "update":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
        "delete":     row(DENIED, DENIED, DENIED, DENIED, DENIED,  DENIED,  DENIED),
    },
}
# fmt: on
EXPECTED_ROWS: dict[tuple[str, str], tuple[Expect, ...]] = {
    (table, op): outcomes
    for table, by_op in EXPECTED_BY_TABLE.items()
    for op, outcomes in by_op.items()
}

EXPECTED: dict[tuple[str, str, str], Expect] = {
    (table, op, relation): outcome
    for (table, op), outcomes in EXPECTED_ROWS.items()
    for relation, outcome in zip(RELATIONS, outcomes, strict=False)
}


# -- the dataset -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """One room and who is who in it."""

    room: uuid.UUID
    kind: str  # the room's type
    actors: dict[str, uuid.UUID]  # relation -> user ("nobody" has none)
    creator: uuid.UUID
    message: uuid.UUID  # the author's message
    receipt_of: uuid.UUID  # the message the author has a receipt for
    fresh: uuid.UUID  # a message nobody has a receipt for
    frank: uuid.UUID  # a user in no room, for "add a member"


@pytest_asyncio.fixture(loop_scope="session")
async def contexts(conn: asyncpg.Connection, world: World) -> dict[str, Context]:
    """The security tests' world, plus a plain member of both rooms (mia), an admin of the
    public room (carol), a removed member of both (erin, who wrote in each first), the
    authors' receipts and reactions to their own messages, and a fresh message in each
    room."""
    mia = await insert_user(conn, "mia")
    erin = await insert_user(conn, "erin")
    frank = await insert_user(conn, "frank")
    add = "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, $3)"
    post = "INSERT INTO messages (room_id, user_id, content) VALUES ($1, $2, 'm') RETURNING id"
    receipt = "INSERT INTO message_read_status (message_id, user_id) VALUES ($1, $2)"
    await conn.execute(add, world.public, world.carol, "admin")
    fresh: dict[str, uuid.UUID] = {}
    for room in (world.private, world.public):
        await conn.execute(add, room, mia, "member")
        await conn.execute(add, room, erin, "member")
        await conn.fetchval(post, room, erin)
        await conn.execute("DELETE FROM room_users WHERE room_id = $1 AND user_id = $2", room, erin)
    for name, room in (("private", world.private), ("public", world.public)):
        fresh[name] = await conn.fetchval(post, room, world.alice)
    await conn.execute(receipt, world.msg[("private", "alice")], world.carol)
    await conn.execute(receipt, world.msg[("public", "alice")], world.bob)
    others = {"member": mia, "owner": world.alice, "outsider": world.dave, "removed": erin}
    react = "INSERT INTO message_reactions (message_id, emoji, user_id) VALUES ($1, '👍', $2)"
    await conn.execute(react, world.msg[("private", "carol")], world.carol)
    await conn.execute(react, world.msg[("public", "bob")], world.bob)
    reply = "INSERT INTO messages (room_id, user_id, content, reply_to) VALUES ($1, $2, $3, $4)"
    await conn.execute(
        reply, world.private, world.alice, "@carol yes", world.msg[("private", "carol")]
    )
    await conn.execute(reply, world.public, world.alice, "@bob yes", world.msg[("public", "bob")])
    return {
        "private": Context(
            room=world.private,
            kind="private",
            actors={"author": world.carol, "admin": world.bob, **others},
            creator=world.alice,
            message=world.msg[("private", "carol")],
            receipt_of=world.msg[("private", "alice")],
            fresh=fresh["private"],
            frank=frank,
        ),
        "public": Context(
            room=world.public,
            kind="public",
            actors={"author": world.bob, "admin": world.carol, **others},
            creator=world.alice,
            message=world.msg[("public", "bob")],
            receipt_of=world.msg[("public", "alice")],
            fresh=fresh["public"],
            frank=frank,
        ),
    }


# -- the statements ----------------------------------------------------------------------------

# (context, actor, author) -> (sql, args); the actor is None for "nobody".
Statement = Callable[[Context, uuid.UUID | None, uuid.UUID], tuple[str, tuple[Any, ...]]]


def _as(actor: uuid.UUID | None, author: uuid.UUID) -> uuid.UUID:
    # With nobody acting, a write names the row's author: someone must be impersonated.
    return actor if actor is not None else author


STATEMENTS: dict[tuple[str, str], Statement] = {
    ("users", "select"): lambda c, a, who: ("SELECT count(*) FROM users WHERE id = $1", (who,)),
    ("users", "insert"): lambda c, a, who: (
        "INSERT INTO users (id, email, username, password_hash)"
        " VALUES ($1, 'new@example.org', 'newcomer', $2)",
        (uuid7(), HASH),
    ),
    ("users", "update"): lambda c, a, who: (
        "UPDATE users SET username = username || '2' WHERE id = $1",
        (who,),
    ),
    ("users", "delete"): lambda c, a, who: ("DELETE FROM users WHERE id = $1", (who,)),
    ("rooms", "select"): lambda c, a, who: ("SELECT count(*) FROM rooms WHERE id = $1", (c.room,)),
    ("rooms", "insert"): lambda c, a, who: (
        "INSERT INTO rooms (id, name, type, created_by) VALUES ($1, 'new', $2, $3)",
        (uuid7(), c.kind, _as(a, who)),
    ),
    ("rooms", "update"): lambda c, a, who: (
        "UPDATE rooms SET name = 'renamed' WHERE id = $1",
        (c.room,),
    ),
    ("rooms", "delete"): lambda c, a, who: ("DELETE FROM rooms WHERE id = $1", (c.room,)),
    ("room_users", "select"): lambda c, a, who: (
        "SELECT count(*) FROM room_users WHERE room_id = $1 AND user_id = $2",
        (c.room, who),
    ),
    ("room_users", "insert"): lambda c, a, who: (
        "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'member')",
        (c.room, c.frank),
    ),
    ("room_users", "update"): lambda c, a, who: (
        "UPDATE room_users SET role = 'admin' WHERE room_id = $1 AND user_id = $2",
        (c.room, who),
    ),
    ("room_users", "delete"): lambda c, a, who: (
        "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2",
        (c.room, who),
    ),
    ("messages", "select"): lambda c, a, who: (
        "SELECT count(*) FROM messages WHERE id = $1",
        (c.message,),
    ),
    ("messages", "insert"): lambda c, a, who: (
        "INSERT INTO messages (id, room_id, user_id, content) VALUES ($1, $2, $3, 'hi')",
        (uuid7(), c.room, _as(a, who)),
    ),
    ("messages", "update"): lambda c, a, who: (
        "UPDATE messages SET content = 'edited', is_edited = true, edited_at = now() WHERE id = $1",
        (c.message,),
    ),
    ("messages", "delete"): lambda c, a, who: ("DELETE FROM messages WHERE id = $1", (c.message,)),
    ("message_read_status", "select"): lambda c, a, who: (
        "SELECT count(*) FROM message_read_status WHERE message_id = $1 AND user_id = $2",
        (c.receipt_of, who),
    ),
    ("message_read_status", "insert"): lambda c, a, who: (
        "INSERT INTO message_read_status (message_id, user_id) VALUES ($1, $2)",
        (c.fresh, _as(a, who)),
    ),
    ("message_read_status", "update"): lambda c, a, who: (
        "UPDATE message_read_status SET read_at = now() WHERE message_id = $1 AND user_id = $2",
        (c.receipt_of, who),
    ),
    ("message_read_status", "delete"): lambda c, a, who: (
        "DELETE FROM message_read_status WHERE message_id = $1 AND user_id = $2",
        (c.receipt_of, who),
    ),
    ("room_changes", "select"): lambda c, a, who: (
        "SELECT count(*) FROM room_changes WHERE room_id = $1",
        (c.room,),
    ),
    ("room_changes", "insert"): lambda c, a, who: (
        "INSERT INTO room_changes (room_id, position, kind) VALUES ($1, 1000, 'room.updated')",
        (c.room,),
    ),
    ("room_changes", "update"): lambda c, a, who: (
        "UPDATE room_changes SET data = data WHERE room_id = $1",
        (c.room,),
    ),
    ("room_changes", "delete"): lambda c, a, who: (
        "DELETE FROM room_changes WHERE room_id = $1",
        (c.room,),
    ),
    # The author's reaction to their own message (added by the system with the dataset).
    ("message_reactions", "select"): lambda c, a, who: (
        "SELECT count(*) FROM message_reactions WHERE message_id = $1 AND user_id = $2",
        (c.message, who),
    ),
    ("message_reactions", "insert"): lambda c, a, who: (
        "INSERT INTO message_reactions (message_id, emoji, user_id) VALUES ($1, '🎉', $2)",
        (c.message, _as(a, who)),
    ),
    ("message_reactions", "update"): lambda c, a, who: (
        "UPDATE message_reactions SET emoji = emoji WHERE message_id = $1",
        (c.message,),
    ),
    ("message_reactions", "delete"): lambda c, a, who: (
        "DELETE FROM message_reactions WHERE message_id = $1 AND user_id = $2",
        (c.message, who),
    ),
    ("threads", "select"): lambda c, a, who: (
        "SELECT count(*) FROM threads WHERE root_id = $1",
        (c.message,),
    ),
    ("threads", "insert"): lambda c, a, who: (
        "INSERT INTO threads (root_id, room_id, root_seq, last_reply_seq, last_reply_at)"
        " VALUES ($1, $2, 1, 1, now())",
        (c.fresh, c.room),
    ),
    ("threads", "update"): lambda c, a, who: (
        "UPDATE threads SET reply_count = 99 WHERE root_id = $1",
        (c.message,),
    ),
    ("threads", "delete"): lambda c, a, who: (
        "DELETE FROM threads WHERE root_id = $1",
        (c.message,),
    ),
    ("thread_followers", "select"): lambda c, a, who: (
        "SELECT count(*) FROM thread_followers WHERE root_id = $1 AND user_id = $2",
        (c.message, who),
    ),
    # Following another thread (of the fresh message) as oneself.
    ("thread_followers", "insert"): lambda c, a, who: (
        "INSERT INTO thread_followers (root_id, user_id) VALUES ($1, $2)",
        (c.fresh, _as(a, who)),
    ),
    ("thread_followers", "update"): lambda c, a, who: (
        "UPDATE thread_followers SET following = false WHERE root_id = $1 AND user_id = $2",
        (c.message, who),
    ),
    ("thread_followers", "delete"): lambda c, a, who: (
        "DELETE FROM thread_followers WHERE root_id = $1 AND user_id = $2",
        (c.message, who),
    ),
    ("message_mentions", "select"): lambda c, a, who: (
        "SELECT count(*) FROM message_mentions WHERE user_id = $1 AND room_id = $2",
        (who, c.room),
    ),
    ("message_mentions", "insert"): lambda c, a, who: (
        "INSERT INTO message_mentions (message_id, user_id, room_id, seq, author_id)"
        " VALUES ($1, $2, $3, 1, $2)",
        (c.fresh, who, c.room),
    ),
    ("message_mentions", "update"): lambda c, a, who: (
        "UPDATE message_mentions SET seq = seq WHERE room_id = $1",
        (c.room,),
    ),
    ("message_mentions", "delete"): lambda c, a, who: (
        "DELETE FROM message_mentions WHERE room_id = $1",
        (c.room,),
    ),
    ("room_mention_heads", "select"): lambda c, a, who: (
        "SELECT count(*) FROM room_mention_heads WHERE room_id = $1",
        (c.room,),
    ),
    ("room_mention_heads", "insert"): lambda c, a, who: (
        "INSERT INTO room_mention_heads (room_id, last_seq) VALUES ($1, 1)",
        (c.room,),
    ),
    ("room_mention_heads", "update"): lambda c, a, who: (
        "UPDATE room_mention_heads SET last_seq = 99 WHERE room_id = $1",
        (c.room,),
    ),
    ("room_mention_heads", "delete"): lambda c, a, who: (
        "DELETE FROM room_mention_heads WHERE room_id = $1",
        (c.room,),
    ),
    ("audit_log", "select"): lambda c, a, who: ("SELECT count(*) FROM audit_log", ()),
    ("audit_log", "insert"): lambda c, a, who: (
        "INSERT INTO audit_log (action, table_name, row_id) VALUES ('user.delete', 'users', $1)",
        (who,),
    ),
    ("audit_log", "update"): lambda c, a, who: ("UPDATE audit_log SET action = action", ()),
    ("audit_log", "delete"): lambda c, a, who: ("DELETE FROM audit_log", ()),
    ("chatkeep_schema_history", "select"): lambda c, a, who: (
        "SELECT count(*) FROM chatkeep_schema_history",
        (),
    ),
    ("chatkeep_schema_history", "insert"): lambda c, a, who: (
        "INSERT INTO chatkeep_schema_history DEFAULT VALUES",
        (),
    ),
    ("chatkeep_schema_history", "update"): lambda c, a, who: (
        "UPDATE chatkeep_schema_history SET name = name",
        (),
    ),
    ("chatkeep_schema_history", "delete"): lambda c, a, who: (
        "DELETE FROM chatkeep_schema_history",
        (),
    ),
}


def _author(table: str, context: Context) -> uuid.UUID:
    return context.creator if table == "rooms" else context.actors["author"]


async def _run(
    app: asyncpg.Connection, actor: uuid.UUID | None, sql: str, args: tuple[Any, ...]
) -> Outcome:
    transaction = app.transaction()
    await transaction.start()
    try:
        if actor is not None:
            await set_acting_user(app, actor)
        if sql.startswith("SELECT"):
            found = await app.fetchval(sql, *args)
            return OK if found else HIDDEN
        status = await app.execute(sql, *args)
        return HIDDEN if status.split()[-1] == "0" else OK
    except asyncpg.PostgresError as exc:
        error = translate_error(exc, "matrix")
        if isinstance(error, PermissionDenied):
            return DENIED
        if isinstance(error, NotFound):
            return NOT_FOUND
        raise
    finally:
        await transaction.rollback()


# -- the tests -----------------------------------------------------------------------------------


async def _tables(conn: asyncpg.Connection) -> dict[str, tuple[bool, bool, int]]:
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
          FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
        """
    )
    return {
        r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"], r["policies"]) for r in rows
    }


async def test_every_table_and_case_has_an_expectation(conn: asyncpg.Connection) -> None:
    tables = await _tables(conn)
    wanted = {(t, op, rel) for t in tables for op in OPERATIONS for rel in RELATIONS}
    assert sorted(wanted - set(EXPECTED)) == [], "cases without an expectation"
    assert sorted(set(EXPECTED) - wanted) == [], "expectations for tables that do not exist"
    assert all(len(outcomes) == len(RELATIONS) for outcomes in EXPECTED_ROWS.values())
    assert set(STATEMENTS) == set(EXPECTED_ROWS)


async def test_every_table_has_forced_row_security_unless_exempt(conn: asyncpg.Connection) -> None:
    tables = await _tables(conn)
    assert set(EXEMPT) <= set(tables), "exempt tables that do not exist"
    unguarded = {
        name: {"enabled": enabled, "forced": forced, "policies": policies}
        for name, (enabled, forced, policies) in tables.items()
        if name not in EXEMPT and not (enabled and forced and policies > 0)
    }
    assert unguarded == {}


@pytest.mark.parametrize("table", sorted({table for table, _op in EXPECTED_ROWS}))
async def test_matrix(
    app_conn: asyncpg.Connection, contexts: dict[str, Context], table: str
) -> None:
    wrong: list[str] = []
    for op in OPERATIONS:
        for relation in RELATIONS:
            expect = EXPECTED[(table, op, relation)]
            for index, name in enumerate(ROOMS):
                context = contexts[name]
                wanted = expect[index] if isinstance(expect, tuple) else expect
                author = _author(table, context)
                if relation == "nobody":
                    actor = None
                elif relation == "author":
                    actor = author
                else:
                    actor = context.actors[relation]
                sql, args = STATEMENTS[(table, op)](context, actor, author)
                got = await _run(app_conn, actor, sql, args)
                if got is not wanted:
                    wrong.append(
                        f"{table} {op} as {relation} ({name} room): {got.value}, "
                        f"expected {wanted.value}"
                    )
    assert wrong == []


# The batched send (chatkeep_send_messages, migration 014): each row acts as its own sender,
# so the relation is the sender's; "nobody" does not arise (the function always names the
# row's sender). All the rows of both rooms go in ONE batch: each is judged on its own.
BATCHED_SEND: dict[str, Expect] = {
    "author": OK,
    "member": OK,
    "admin": OK,
    "owner": OK,
    "outsider": NF_DENY,
    "removed": NF_DENY,
}
_SEND_OUTCOME = {"sent": OK, "no_room": NOT_FOUND, "not_member": DENIED, "archived": DENIED}
SEND_BATCH = (
    "SELECT idx, outcome, id FROM chatkeep_send_messages($1::uuid[], $2::uuid[], $3::uuid[],"
    " $4::text[], $5::text[], $6::message_type[], $7::uuid[])"
)


async def test_matrix_of_the_batched_send(
    app_conn: asyncpg.Connection, conn: asyncpg.Connection, contexts: dict[str, Context]
) -> None:
    cases = [
        (relation, name, contexts[name].actors[relation])
        for relation in BATCHED_SEND
        for name in ROOMS
    ]
    rooms = [contexts[name].room for _, name, _ in cases]
    senders = [sender for _, _, sender in cases]
    # Committed (this test's database is its own): the superuser counts what was stored.
    rows = await app_conn.fetch(
        SEND_BATCH,
        [uuid7() for _ in cases],
        rooms,
        senders,
        [None] * len(cases),
        ["hi"] * len(cases),
        ["text"] * len(cases),
        [None] * len(cases),
    )
    stored = await conn.fetchval(
        "SELECT count(*) FROM messages WHERE id = ANY ($1::uuid[])",
        [row["id"] for row in rows if row["outcome"] == "sent"],
    )
    got = {row["idx"]: _SEND_OUTCOME[row["outcome"]] for row in rows}
    wrong = []
    for index, (relation, name, _) in enumerate(cases, start=1):
        expect = BATCHED_SEND[relation]
        wanted = expect[ROOMS.index(name)] if isinstance(expect, tuple) else expect
        if got[index] is not wanted:
            wrong.append(f"batched send as {relation} ({name} room): {got[index].value}")
    assert wrong == []
    assert stored == sum(1 for outcome in got.values() if outcome is OK) == 8
    # The batched path never answers more generously than a plain INSERT as the sender.
    for relation, expect in BATCHED_SEND.items():
        assert EXPECTED[("messages", "insert", relation)] == expect


async def test_a_batched_send_never_widens_the_callers_acting_user(
    app_conn: asyncpg.Connection, contexts: dict[str, Context]
) -> None:
    public = contexts["public"]
    member, author = public.actors["member"], public.actors["author"]
    for sender, wanted in ((member, OK), (author, DENIED)):
        transaction = app_conn.transaction()
        await transaction.start()
        try:
            await set_acting_user(app_conn, member)
            try:
                rows = await app_conn.fetch(
                    SEND_BATCH, [uuid7()], [public.room], [sender], [None], ["hi"], ["text"], [None]
                )
                got = _SEND_OUTCOME[rows[0]["outcome"]]
            except asyncpg.PostgresError as exc:
                got = DENIED if isinstance(translate_error(exc, "m"), PermissionDenied) else OK
            # The caller's acting user is what it was.
            if got is OK:
                who = await app_conn.fetchval("SELECT current_setting('app.user_id')")
                assert who == str(member)
        finally:
            await transaction.rollback()
        assert got is wanted, (sender, got)
