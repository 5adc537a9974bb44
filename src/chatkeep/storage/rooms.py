"""Rooms and memberships: create, direct rooms, members, roles, a user's room list.

Races are settled by the database: a room and its owner are one transaction; direct rooms
are get-or-create on the unique pair; joins are ``ON CONFLICT DO NOTHING``; role changes
and departures lock the room row, then its owner rows (and the actor's and target's), in one
transaction before deciding, so two owners leaving at once cannot leave a room ownerless.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any, ClassVar, Final, get_args

from chatkeep.errors import ChatkeepError, InvalidInput, NotFound, PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.models import (
    CreateRoomDto,
    MessageWithUser,
    Room,
    RoomMember,
    RoomRole,
    RoomSummary,
    RoomUser,
    RoomWithUsers,
    UpdateRoomDto,
    UserProfile,
)
from chatkeep.storage.base import BaseRepository, check_id, not_found

__all__ = ["RoomRepository"]

_ROLES: Final = frozenset(get_args(RoomRole))
_MANAGERS: Final = frozenset({"owner", "admin"})

ROOM_COLUMNS: Final = (
    "id, name, description, type, created_by, is_active, last_seq, created_at, updated_at"
)
_R_COLUMNS: Final = ", ".join(f"r.{c.strip()}" for c in ROOM_COLUMNS.split(","))
MEMBER_COLUMNS: Final = "room_id, user_id, role, joined_at, last_read_at, last_read_seq"
_MEMBER_KEYS: Final = tuple(c.strip() for c in MEMBER_COLUMNS.split(","))

# A room and its first members are two statements in one transaction, not one statement:
# row security decides each membership by looking at the room, and a policy cannot see a
# row inserted by the same statement.
CREATE_ROOM: Final = f"""
INSERT INTO rooms (id, name, description, type, created_by)
VALUES ($1, $2, $3, $4, $5)
RETURNING {ROOM_COLUMNS}
"""
ADD_OWNER: Final = "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'owner')"

# Get-or-create on the unique pair. When another transaction inserted the pair first,
# ON CONFLICT waits for it and returns nothing; FIND_DIRECT (a new snapshot) then sees it.
OPEN_DIRECT: Final = f"""
INSERT INTO rooms (id, name, type, created_by, direct_user_low, direct_user_high)
VALUES ($1, 'direct', 'direct', $2, $3, $4)
ON CONFLICT (direct_user_low, direct_user_high) DO NOTHING
RETURNING {ROOM_COLUMNS}
"""
# On Citus the pair's unique key cannot hold (it lacks the room id, the distribution
# column): a direct room's id is made from its pair instead, so the primary key is the pair
# rule (and a CHECK of migrations/citus/012 holds every direct room to it).
OPEN_DIRECT_CITUS: Final = OPEN_DIRECT.replace(
    "ON CONFLICT (direct_user_low, direct_user_high)", "ON CONFLICT (id)"
)
FIND_DIRECT_CITUS: Final = f"SELECT {ROOM_COLUMNS} FROM rooms WHERE id = $1"
ADD_PAIR: Final = """
INSERT INTO room_users (room_id, user_id, role)
SELECT $1, pair.user_id, 'member'
  FROM (SELECT DISTINCT unnest(ARRAY[$2::uuid, $3::uuid]) AS user_id) AS pair
"""
# On Citus an INSERT ... SELECT goes through COPY, which row security refuses: VALUES.
ADD_PAIR_CITUS: Final = (
    "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'member'), ($1, $3, 'member')"
)
ADD_SELF_CITUS: Final = "INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, 'member')"
FIND_DIRECT: Final = f"""
SELECT {ROOM_COLUMNS} FROM rooms WHERE direct_user_low = $1 AND direct_user_high = $2
"""

ROOM_FOR_MEMBERSHIP: Final = "SELECT type, is_active FROM rooms WHERE id = $1"
# Every membership change takes the room row's lock before any membership row's: a send
# locks the room row (its seq trigger) and then the sender's membership row (its
# watermark), and a change's own log entry locks the room row after its membership rows,
# so without this a member sending while being removed or demoted (or an owner sending
# while someone else is) could deadlock. FOR NO KEY UPDATE is the lock the send and the
# change log's UPDATE take (foreign key checks, FOR KEY SHARE, do not wait for it). Row
# security filters it by rooms' update policy too (public rooms and the user's rooms):
# where that hides a visible room, the actor is not a member and the change is refused
# before anything is written, so nothing is left unordered.
LOCK_ROOM: Final = "SELECT 1 FROM rooms WHERE id = $1 FOR NO KEY UPDATE"
JOIN: Final = f"""
INSERT INTO room_users (room_id, user_id, role) VALUES ($1, $2, $3)
ON CONFLICT (room_id, user_id) DO NOTHING
RETURNING {MEMBER_COLUMNS}
"""
FIND_MEMBER: Final = f"SELECT {MEMBER_COLUMNS} FROM room_users WHERE room_id = $1 AND user_id = $2"
# Lock every owner row plus the actor's and the target's, in a fixed order (no deadlock
# between two callers), before deciding anything that depends on who owns the room.
LOCK_ROLES: Final = """
SELECT user_id, role FROM room_users
 WHERE room_id = $1 AND (role = 'owner' OR user_id = ANY($2::uuid[]))
 ORDER BY user_id
   FOR UPDATE
"""
ACTOR_ROLE: Final = """
SELECT role FROM room_users WHERE room_id = $1 AND user_id = $2 FOR SHARE
"""
REMOVE_MEMBER: Final = "DELETE FROM room_users WHERE room_id = $1 AND user_id = $2"
SET_ROLE: Final = f"""
UPDATE room_users SET role = $3 WHERE room_id = $1 AND user_id = $2
RETURNING {MEMBER_COLUMNS}
"""

# The membership flows as the acting user in one round trip, the room row locked first
# (migration 022): each makes the decisions of the method it stands for and answers a
# refusal as an outcome (_REFUSALS), not an error.
JOIN_AS: Final = "SELECT * FROM chatkeep_join($1, $2, $3, $4)"
REMOVE_MEMBER_AS: Final = "SELECT * FROM chatkeep_remove_member($1, $2, $3)"
CHANGE_ROLE_AS: Final = "SELECT * FROM chatkeep_change_role($1, $2, $3, $4)"
LAST_POSITION: Final = "SELECT nullif(current_setting('chatkeep.position', true), '')::bigint"
DIRECT_ROOM: Final = "direct rooms have fixed members"
# What each flow said for each refusal before it was one function (the same text).
_REFUSALS: Final[dict[str, dict[str, str]]] = {
    "join": {
        "archived": "the room is archived",
        "self_join": "only public rooms can be joined, as a member",
        "not_manager": "only owners and admins may add members",
        "owner_only": "only owners may add admins or owners",
    },
    "remove": {
        "not_manager": "only owners and admins may remove members",
        "rank": "only owners may remove admins or owners; admins remove members",
        "last_owner": "the last owner cannot leave; make another owner first",
    },
    "change_role": {
        "not_manager": "only owners and admins may change roles",
        "owner_only": "only owners may grant or revoke ownership",
        "last_owner": "the last owner cannot be demoted; make another first",
    },
}

MEMBERS: Final = f"""
SELECT {_R_COLUMNS},
       u.id AS member_id, u.username, u.avatar_url,
       ru.role, ru.joined_at, ru.last_read_seq, ru.last_read_at
  FROM rooms r
  LEFT JOIN room_users ru ON ru.room_id = r.id
  LEFT JOIN users u ON u.id = ru.user_id
 WHERE r.id = $1
 ORDER BY ru.joined_at, ru.user_id
"""

# A user's rooms with the newest message and the unread count, in one query: the
# watermark comes from room_users' covering index, the last message is one backward
# probe of messages (room_id, seq) per room (robust to a deleted last message).
ROOMS_OF: Final = f"""
SELECT {_R_COLUMNS},
       ru.role, ru.last_read_seq,
       GREATEST(r.last_seq - ru.last_read_seq, 0) AS unread_count,
       m.id AS m_id, m.user_id AS m_user_id, m.seq AS m_seq,
       m.client_msg_id AS m_client_msg_id, m.content AS m_content, m.type AS m_type,
       m.is_edited AS m_is_edited, m.edited_at AS m_edited_at, m.created_at AS m_created_at,
       m.reply_to AS m_reply_to, u.username AS m_username, u.avatar_url AS m_avatar_url
  FROM room_users ru
  JOIN rooms r ON r.id = ru.room_id
  LEFT JOIN LATERAL (
        SELECT mm.id, mm.user_id, mm.seq, mm.client_msg_id, mm.content, mm.type,
               mm.is_edited, mm.edited_at, mm.created_at, mm.reply_to
          FROM messages mm
         WHERE mm.room_id = r.id
         ORDER BY mm.seq DESC
         LIMIT 1
       ) m ON true
  LEFT JOIN users u ON u.id = m.user_id
 WHERE ru.user_id = $1 AND (r.is_active OR $2)
 ORDER BY COALESCE(m.created_at, r.created_at) DESC, r.id
"""

# ROOMS_OF as the user in one round trip (migration 013's chatkeep_rooms_of).
ROOMS_OF_AS: Final = "SELECT * FROM chatkeep_rooms_of($1, $2)"

_ROOM_FIELDS: Final = tuple(field.name for field in dataclasses.fields(Room))


def _room(row: Any) -> Room:
    return Room._from_row({name: row[name] for name in _ROOM_FIELDS})


def direct_room_id(low: uuid.UUID, high: uuid.UUID) -> uuid.UUID:
    """The id of the direct room of a pair on Citus (``low <= high``): MD5 of their text.

    The same as ``md5(low::text || high::text)::uuid`` in SQL, which the Citus schema
    checks every direct room against.
    """
    digest = hashlib.md5(f"{low}{high}".encode("ascii"), usedforsecurity=False).hexdigest()
    return uuid.UUID(digest)


class RoomRepository(BaseRepository[Room]):
    """Rooms, direct rooms and memberships.

    Methods that take ``by`` check the acting user's right to do it (``None`` means the
    system, which may do anything the invariants allow).
    """

    table: ClassVar[str] = "rooms"
    model: ClassVar[type[Room]] = Room
    entity: ClassVar[str] = "room"
    # Nothing is insertable through the base: a room is made with its owner (CREATE_ROOM
    # and ADD_OWNER in one transaction) or as a direct pair (OPEN_DIRECT). Its type, creator
    # and counter never change after that.
    updatable: ClassVar[frozenset[str]] = frozenset({"name", "description"})

    async def create(self, dto: CreateRoomDto) -> Room:
        """Create a public or private room; its creator becomes its owner (atomically).

        Raises:
            NotFound: ``created_by`` is not a user.
            InvalidInput: a value breaks a rule.
        """
        if not isinstance(dto, CreateRoomDto):
            raise InvalidInput("dto", "must be a CreateRoomDto")
        async with self.db.transaction("rooms.create"):
            row = await self.db.fetchrow(
                "rooms.create",
                CREATE_ROOM,
                uuid7(),
                dto.name,
                dto.description,
                dto.type,
                dto.created_by,
            )
            if row is None:  # pragma: no cover - INSERT ... RETURNING always returns
                raise NotFound("room was not created", entity="room")
            await self.db.execute("rooms.add_owner", ADD_OWNER, row["id"], dto.created_by)
        return self._row(row)

    async def update(self, id: uuid.UUID, dto: UpdateRoomDto) -> Room:
        """Change the name and/or description; fields left out of ``dto`` are kept.

        Raises:
            NotFound: no such room.
            InvalidInput: ``dto`` is not an UpdateRoomDto, or ``id`` is not a UUID.
        """
        if not isinstance(dto, UpdateRoomDto):
            raise InvalidInput("dto", "must be an UpdateRoomDto")
        # Every field of the DTO is an updatable column (a test holds them together);
        # _update refuses any other before sending anything.
        return await self._update(id, dto.model_dump(exclude_unset=True))

    async def open_direct(self, user_a: uuid.UUID, user_b: uuid.UUID) -> Room:
        """The direct room of two users, created on first use; both become members.

        Concurrent calls for the same pair (in either order) return the same room. A user
        may open a direct room with themself (notes to self).

        Raises:
            NotFound: either user does not exist.
        """
        a = check_id("user_a", user_a)
        b = check_id("user_b", user_b)
        low, high = sorted((a, b))
        citus = self.db.settings.citus
        for _ in range(3):
            async with self.db.transaction("rooms.open_direct"):
                row = await self.db.fetchrow(
                    "rooms.open_direct",
                    OPEN_DIRECT_CITUS if citus else OPEN_DIRECT,
                    direct_room_id(low, high) if citus else uuid7(),
                    a,
                    low,
                    high,
                )
                if row is not None and not citus:
                    await self.db.execute("rooms.add_pair", ADD_PAIR, row["id"], low, high)
                elif row is not None and low == high:
                    await self.db.execute("rooms.add_pair", ADD_SELF_CITUS, row["id"], low)
                elif row is not None:
                    await self.db.execute("rooms.add_pair", ADD_PAIR_CITUS, row["id"], low, high)
            if row is None:
                row = await (
                    self.db.fetchrow(
                        "rooms.find_direct", FIND_DIRECT_CITUS, direct_room_id(low, high)
                    )
                    if citus
                    else self.db.fetchrow("rooms.find_direct", FIND_DIRECT, low, high)
                )
            if row is not None:
                return self._row(row)
        # The winner's room vanished three times in a row (deleted as fast as made).
        raise NotFound("the direct room keeps disappearing; try again", entity="room")

    async def add_member(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        role: RoomRole = "member",
        by: uuid.UUID | None = None,
    ) -> RoomUser:
        """Add ``user_id`` to the room, or return the existing membership unchanged.

        ``by == user_id`` is a self-join: allowed in active public rooms, as a member.
        Otherwise ``by`` must be an owner or admin of the room, and only owners may add
        admins or owners. Two concurrent joins give one membership.

        Raises:
            NotFound: the room or the user does not exist.
            PermissionDenied: ``by`` may not add this member with this role.
            InvalidInput: unknown role, or a direct room (its members are fixed).
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = None if by is None else check_id("by", by)
        _check_role(role)
        async with self.db.transaction("rooms.add_member"):
            found = await self._room_for_membership(room)
            if actor is not None:
                if not found["is_active"]:
                    raise PermissionDenied("the room is archived")
                if actor == user:
                    if found["type"] != "public" or role != "member":
                        raise PermissionDenied("only public rooms can be joined, as a member")
                else:
                    actor_role = await self.db.fetchval("rooms.actor_role", ACTOR_ROLE, room, actor)
                    if actor_role not in _MANAGERS:
                        raise PermissionDenied("only owners and admins may add members")
                    if role != "member" and actor_role != "owner":
                        raise PermissionDenied("only owners may add admins or owners")
            row = await self.db.fetchrow("rooms.join", JOIN, room, user, role)
        if row is None:
            # Already a member (possibly by a concurrent join that won the race).
            row = await self.db.fetchrow("rooms.find_member", FIND_MEMBER, room, user)
            if row is None:  # pragma: no cover - removed again in between
                raise NotFound(f"user {user} is not a member of room {room}", entity="member")
        return RoomUser._from_row(row)

    async def remove_member(
        self, room_id: uuid.UUID, user_id: uuid.UUID, *, by: uuid.UUID | None = None
    ) -> bool:
        """Remove a member (``by == user_id`` is leaving); False if not a member.

        Owners may remove anyone, admins only members. The last owner cannot leave or be
        removed: make someone else owner first. ``by`` must be an owner or admin before
        anything is said about the target (outside the room, ``by`` cannot see members).

        Raises:
            PermissionDenied: ``by`` may not remove this member, or it is the last owner.
            InvalidInput: the room is a direct room.
            NotFound: the room does not exist.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = None if by is None else check_id("by", by)
        async with self.db.transaction("rooms.remove_member"):
            roles, owners = await self._lock_roles(room, user, actor)
            # The actor's right first: row security hides a room's members from someone
            # outside it, to whom every target would otherwise look like a non-member.
            if actor is not None and actor != user and roles.get(actor) not in _MANAGERS:
                raise PermissionDenied("only owners and admins may remove members")
            target = roles.get(user)
            if target is None:
                return False
            if actor is not None and actor != user:
                _check_manager(roles.get(actor), target)
            if target == "owner" and owners <= 1:
                raise PermissionDenied("the last owner cannot leave; make another owner first")
            await self.db.execute("rooms.remove_member", REMOVE_MEMBER, room, user)
        return True

    async def change_role(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        role: RoomRole,
        *,
        by: uuid.UUID | None = None,
    ) -> RoomUser:
        """Give a member another role.

        Owners may set any role; admins may only move non-owners between member and admin.
        The last owner cannot be demoted.

        Raises:
            NotFound: the user is not a member (or the room does not exist).
            PermissionDenied: ``by`` may not make this change, or it would leave no owner.
            InvalidInput: unknown role, or a direct room.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = None if by is None else check_id("by", by)
        _check_role(role)
        async with self.db.transaction("rooms.change_role"):
            roles, owners = await self._lock_roles(room, user, actor)
            actor_role = None if actor is None else roles.get(actor)
            # The actor's right first, as in remove_member: to someone outside the room
            # every target would look like a non-member.
            if actor is not None and actor_role not in _MANAGERS:
                raise PermissionDenied("only owners and admins may change roles")
            target = roles.get(user)
            if target is None:
                raise NotFound(f"user {user} is not a member of room {room}", entity="member")
            if actor is not None and actor_role != "owner" and "owner" in (target, role):
                raise PermissionDenied("only owners may grant or revoke ownership")
            if target == "owner" and role != "owner" and owners <= 1:
                raise PermissionDenied("the last owner cannot be demoted; make another first")
            row = await self.db.fetchrow("rooms.change_role", SET_ROLE, room, user, role)
        if row is None:  # pragma: no cover - the row is locked above
            raise NotFound(f"user {user} is not a member of room {room}", entity="member")
        return RoomUser._from_row(row)

    # -- the membership flows in one round trip (migration 022) -------------------------

    async def join_as(
        self,
        room_id: uuid.UUID,
        user_id: uuid.UUID,
        *,
        role: RoomRole = "member",
        by: uuid.UUID,
    ) -> tuple[RoomUser, int | None]:
        """:meth:`add_member` as ``by``, in one round trip, with its change's position.

        The position of the ``member.joined`` entry it logged (``None`` when ``user_id``
        was a member already). Outside a transaction it commits on its own; inside one,
        that transaction must act as ``by``. On Citus: a transaction acting as ``by``
        around :meth:`add_member` (a function's acting user never reaches the workers).

        Raises:
            NotFound: the room or the user does not exist (as :meth:`add_member`).
            PermissionDenied: ``by`` may not add this member with this role.
            InvalidInput: as :meth:`add_member`, or the task's transaction acts as someone
                else.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = check_id("by", by)
        _check_role(role)
        if self.db.settings.citus:
            async with self.db.acting_as(actor, "rooms.join"):
                member = await self.add_member(room, user, role=role, by=actor)
                return member, await self._last_position()
        row = await self.db.fetchrow_as(actor, "rooms.join", JOIN_AS, room, user, role)
        done = self._refused("join", row, room, user)
        return RoomUser._from_row({k: done[k] for k in _MEMBER_KEYS}), done["position"]

    async def remove_member_as(
        self, room_id: uuid.UUID, user_id: uuid.UUID, *, by: uuid.UUID
    ) -> tuple[bool, int | None]:
        """:meth:`remove_member` as ``by``, in one round trip, with its change's position.

        Returns:
            ``(False, None)`` if ``user_id`` was not a member; else ``True`` and the
            position of the ``member.left``/``member.removed`` entry it logged.

        Raises:
            PermissionDenied: ``by`` may not remove this member, or it is the last owner.
            NotFound: the room does not exist (or ``by`` cannot see it).
            InvalidInput: a direct room, a bad id, or the task's transaction acts as
                someone else.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = check_id("by", by)
        if self.db.settings.citus:
            async with self.db.acting_as(actor, "rooms.remove_member"):
                if not await self.remove_member(room, user, by=actor):
                    return False, None
                return True, await self._last_position()
        row = await self.db.fetchrow_as(actor, "rooms.remove_member", REMOVE_MEMBER_AS, room, user)
        if row is not None and row["outcome"] == "not_member":
            return False, None
        done = self._refused("remove", row, room, user)
        return True, done["position"]

    async def change_role_as(
        self, room_id: uuid.UUID, user_id: uuid.UUID, role: RoomRole, *, by: uuid.UUID
    ) -> tuple[RoomUser, int | None]:
        """:meth:`change_role` as ``by``, in one round trip, with its change's position.

        Raises:
            NotFound: the user is not a member (or the room does not exist).
            PermissionDenied: ``by`` may not make this change, or it would leave no owner.
            InvalidInput: unknown role, a direct room, a bad id, or the task's transaction
                acts as someone else.
        """
        room = check_id("room_id", room_id)
        user = check_id("user_id", user_id)
        actor = check_id("by", by)
        _check_role(role)
        if self.db.settings.citus:
            async with self.db.acting_as(actor, "rooms.change_role"):
                member = await self.change_role(room, user, role, by=actor)
                return member, await self._last_position()
        row = await self.db.fetchrow_as(
            actor, "rooms.change_role", CHANGE_ROLE_AS, room, user, role
        )
        done = self._refused("change_role", row, room, user)
        return RoomUser._from_row({k: done[k] for k in _MEMBER_KEYS}), done["position"]

    @staticmethod
    def _refused(flow: str, row: Any, room: uuid.UUID, user: uuid.UUID) -> Any:
        """``row`` if it was done; else raise what ``flow`` raised before for its refusal."""
        outcome = None if row is None else row["outcome"]
        if outcome in ("done", "existing"):
            return row
        if outcome == "no_room":
            raise not_found("room", room)
        if outcome == "direct":
            raise InvalidInput("room_id", DIRECT_ROOM)
        if outcome == "not_member":
            raise NotFound(f"user {user} is not a member of room {room}", entity="member")
        text = _REFUSALS[flow].get(str(outcome))
        if text is None:  # pragma: no cover - the functions answer only the outcomes above
            raise ChatkeepError(f"rooms.{flow}: unexpected outcome {outcome!r}")
        raise PermissionDenied(text)

    async def _last_position(self) -> int | None:
        value = await self.db.fetchval("changes.last_position", LAST_POSITION)
        return None if value is None else int(value)

    async def _room_for_membership(self, room: uuid.UUID) -> Any:
        """The room's type and state, its row locked first (LOCK_ROOM); in a transaction."""
        found = await self.db.fetchrow("rooms.room_for_membership", ROOM_FOR_MEMBERSHIP, room)
        if found is None:
            raise not_found("room", room)
        if found["type"] == "direct":
            raise InvalidInput("room_id", DIRECT_ROOM)
        await self.db.execute("rooms.lock_room", LOCK_ROOM, room)
        return found

    async def _lock_roles(
        self, room: uuid.UUID, user: uuid.UUID, actor: uuid.UUID | None
    ) -> tuple[dict[uuid.UUID, str], int]:
        await self._room_for_membership(room)
        ids = [user] if actor is None else [user, actor]
        rows = await self.db.fetch("rooms.lock_roles", LOCK_ROLES, room, ids)
        roles = {row["user_id"]: row["role"] for row in rows}
        owners = sum(1 for row in rows if row["role"] == "owner")
        return roles, owners

    async def members(self, room_id: uuid.UUID) -> RoomWithUsers:
        """The room with every member's profile, role and watermark, in one query.

        Raises:
            NotFound: no such room.
        """
        room = check_id("room_id", room_id)
        rows = await self.db.fetch("rooms.members", MEMBERS, room)
        if not rows:
            raise not_found("room", room)
        values: dict[str, Any] = {name: rows[0][name] for name in _ROOM_FIELDS}
        values["members"] = tuple(
            RoomMember._from_row(
                {
                    "user": UserProfile._from_row(
                        {
                            "id": row["member_id"],
                            "username": row["username"],
                            "avatar_url": row["avatar_url"],
                        }
                    ),
                    "role": row["role"],
                    "joined_at": row["joined_at"],
                    "last_read_seq": row["last_read_seq"],
                    "last_read_at": row["last_read_at"],
                }
            )
            for row in rows
            if row["member_id"] is not None
        )
        return RoomWithUsers._from_row(values)

    async def rooms_of(
        self,
        user_id: uuid.UUID,
        *,
        include_inactive: bool = False,
        as_user: uuid.UUID | None = None,
    ) -> list[RoomSummary]:
        """The user's rooms, newest activity first, with last message and unread count.

        One query, whatever the number of rooms. ``as_user`` (it must be ``user_id``):
        as that user in one round trip, outside any transaction (migration 013).

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id, ``include_inactive`` is not a bool, or ``as_user`` is
                someone else.
        """
        user = check_id("user_id", user_id)
        if not isinstance(include_inactive, bool):
            raise InvalidInput("include_inactive", "must be a bool")
        if as_user is not None:
            if check_id("as_user", as_user) != user:
                raise InvalidInput("as_user", "a user lists only their own rooms")
            rows = await self.db.fetch_as(user, "rooms.rooms_of", ROOMS_OF_AS, include_inactive)
        else:
            rows = await self.db.fetch("rooms.rooms_of", ROOMS_OF, user, include_inactive)
        if not rows:
            await self._require("user", user)
        return [_summary(row) for row in rows]


def _summary(row: Any) -> RoomSummary:
    room = _room(row)
    last: MessageWithUser | None = None
    if row["m_id"] is not None:
        last = MessageWithUser._from_row(
            {
                "id": row["m_id"],
                "room_id": room.id,
                "user_id": row["m_user_id"],
                "seq": row["m_seq"],
                "client_msg_id": row["m_client_msg_id"],
                "content": row["m_content"],
                "type": row["m_type"],
                "is_edited": row["m_is_edited"],
                "edited_at": row["m_edited_at"],
                "created_at": row["m_created_at"],
                "reply_to": row["m_reply_to"],
                "user": UserProfile._from_row(
                    {
                        "id": row["m_user_id"],
                        "username": row["m_username"],
                        "avatar_url": row["m_avatar_url"],
                    }
                ),
            }
        )
    return RoomSummary._from_row(
        {
            "room": room,
            "role": row["role"],
            "last_read_seq": row["last_read_seq"],
            "unread_count": row["unread_count"],
            "last_message": last,
        }
    )


def _check_role(role: object) -> None:
    # A str first: ``{} in frozenset`` raises TypeError (unhashable) instead of answering.
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidInput("role", "one of owner, admin, member")


def _check_manager(actor_role: str | None, target_role: str) -> None:
    if actor_role == "owner":
        return
    if actor_role == "admin" and target_role == "member":
        return
    raise PermissionDenied("only owners may remove admins or owners; admins remove members")
