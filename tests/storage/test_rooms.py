from __future__ import annotations

import asyncio
import uuid

import pytest

from chatkeep.errors import InvalidInput, NotFound, PermissionDenied, Unavailable
from chatkeep.models import CreateMessageDto, CreateRoomDto, UpdateRoomDto
from chatkeep.storage import Database, MessageRepository, RoomRepository

from .conftest import MakeRoom, MakeUser


async def test_create_makes_the_creator_owner(rooms: RoomRepository, make_user: MakeUser) -> None:
    owner = await make_user()
    room = await rooms.create(
        CreateRoomDto(name="general", description="all of us", type="private", created_by=owner.id)
    )
    assert room.type == "private"
    assert room.last_seq == 0
    assert room.id.version == 7
    listing = await rooms.members(room.id)
    assert [(m.user.id, m.role) for m in listing.members] == [(owner.id, "owner")]
    with pytest.raises(NotFound):
        await rooms.create(CreateRoomDto(name="orphan", created_by=uuid.uuid4()))
    with pytest.raises(InvalidInput):
        await rooms.create({"name": "x"})  # type: ignore[arg-type]


async def test_update_and_delete(rooms: RoomRepository, make_user: MakeUser) -> None:
    owner = await make_user()
    room = await rooms.create(CreateRoomDto(name="old", created_by=owner.id))
    renamed = await rooms.update(room.id, UpdateRoomDto(name="new", description="desc"))
    assert (renamed.name, renamed.description) == ("new", "desc")
    assert (await rooms.update(room.id, UpdateRoomDto(description=None))).description is None
    assert await rooms.delete(room.id) is True
    assert await rooms.find_by_id(room.id) is None
    with pytest.raises(NotFound):
        await rooms.update(room.id, UpdateRoomDto(name="gone"))


async def test_open_direct_is_get_or_create(rooms: RoomRepository, make_user: MakeUser) -> None:
    a, b = await make_user(), await make_user()
    room = await rooms.open_direct(a.id, b.id)
    assert room.type == "direct"
    assert (await rooms.open_direct(b.id, a.id)).id == room.id
    members = await rooms.members(room.id)
    assert {m.user.id for m in members.members} == {a.id, b.id}
    notes = await rooms.open_direct(a.id, a.id)
    assert notes.id != room.id
    assert [m.user.id for m in (await rooms.members(notes.id)).members] == [a.id]
    with pytest.raises(NotFound):
        await rooms.open_direct(a.id, uuid.uuid4())
    with pytest.raises(InvalidInput):
        await rooms.open_direct(a.id, "nope")  # type: ignore[arg-type]


async def test_fifty_concurrent_open_direct_give_one_room(
    rooms: RoomRepository, make_user: MakeUser, db: Database
) -> None:
    a, b = await make_user(), await make_user()
    results = await asyncio.gather(
        *(rooms.open_direct(*((a.id, b.id) if i % 2 else (b.id, a.id))) for i in range(50))
    )
    assert len({room.id for room in results}) == 1
    assert await db.fetchval("t.count", "SELECT count(*) FROM rooms WHERE type = 'direct'") == 1
    assert await db.fetchval("t.count", "SELECT count(*) FROM room_users") == 2


async def test_join_rules(rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom) -> None:
    owner, admin, joiner, outsider = [await make_user() for _ in range(4)]
    public = await make_room(owner)
    private = await make_room(owner, type="private", name="secret")
    await rooms.add_member(public.id, admin.id, role="admin", by=owner.id)

    joined = await rooms.add_member(public.id, joiner.id, by=joiner.id)
    assert (joined.role, joined.last_read_seq) == ("member", 0)
    # Idempotent: the same membership comes back unchanged.
    assert await rooms.add_member(public.id, joiner.id, by=joiner.id) == joined
    with pytest.raises(PermissionDenied):
        await rooms.add_member(private.id, outsider.id, by=outsider.id)
    with pytest.raises(PermissionDenied):
        await rooms.add_member(public.id, outsider.id, role="admin", by=outsider.id)
    with pytest.raises(PermissionDenied):
        await rooms.add_member(public.id, outsider.id, by=joiner.id)  # a plain member
    with pytest.raises(PermissionDenied):
        await rooms.add_member(public.id, outsider.id, role="admin", by=admin.id)
    added = await rooms.add_member(public.id, outsider.id, by=admin.id)
    assert added.role == "member"
    assert (await rooms.add_member(private.id, outsider.id)).role == "member"  # the system
    with pytest.raises(NotFound):
        await rooms.add_member(uuid.uuid4(), outsider.id)
    with pytest.raises(NotFound):
        await rooms.add_member(public.id, uuid.uuid4())
    with pytest.raises(InvalidInput):
        await rooms.add_member(public.id, outsider.id, role="king")  # type: ignore[arg-type]
    direct = await rooms.open_direct(owner.id, joiner.id)
    with pytest.raises(InvalidInput):
        await rooms.add_member(direct.id, outsider.id)


async def test_archived_rooms_cannot_be_joined(
    rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    owner, joiner = await make_user(), await make_user()
    room = await make_room(owner)
    await db.execute("t.archive", "UPDATE rooms SET is_active = false WHERE id = $1", room.id)
    with pytest.raises(PermissionDenied):
        await rooms.add_member(room.id, joiner.id, by=joiner.id)


async def test_two_concurrent_joins_give_one_membership(
    rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    owner, joiner = await make_user(), await make_user()
    room = await make_room(owner)
    first, second = await asyncio.gather(
        rooms.add_member(room.id, joiner.id, by=joiner.id),
        rooms.add_member(room.id, joiner.id, by=joiner.id),
    )
    assert first == second
    count = await db.fetchval(
        "t.count",
        "SELECT count(*) FROM room_users WHERE room_id = $1 AND user_id = $2",
        room.id,
        joiner.id,
    )
    assert count == 1


async def test_leaving_and_removing(
    rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    owner, admin, member, other = [await make_user() for _ in range(4)]
    room = await make_room(owner, member, other)
    await rooms.add_member(room.id, admin.id, role="admin")

    with pytest.raises(PermissionDenied, match="last owner"):
        await rooms.remove_member(room.id, owner.id, by=owner.id)
    with pytest.raises(PermissionDenied):
        await rooms.remove_member(room.id, admin.id, by=member.id)
    with pytest.raises(PermissionDenied):
        await rooms.remove_member(room.id, owner.id, by=admin.id)
    assert await rooms.remove_member(room.id, member.id, by=admin.id) is True
    assert await rooms.remove_member(room.id, member.id, by=admin.id) is False
    assert await rooms.remove_member(room.id, other.id, by=other.id) is True
    assert await rooms.remove_member(room.id, admin.id, by=owner.id) is True
    with pytest.raises(PermissionDenied):
        await rooms.remove_member(room.id, owner.id)  # not even the system
    with pytest.raises(NotFound):
        await rooms.remove_member(uuid.uuid4(), owner.id)
    direct = await rooms.open_direct(owner.id, member.id)
    with pytest.raises(InvalidInput):
        await rooms.remove_member(direct.id, member.id, by=member.id)
    remaining = await rooms.members(room.id)
    assert [m.user.id for m in remaining.members] == [owner.id]


async def test_roles(rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom) -> None:
    owner, admin, member = [await make_user() for _ in range(3)]
    room = await make_room(owner, admin, member)
    promoted = await rooms.change_role(room.id, admin.id, "admin", by=owner.id)
    assert promoted.role == "admin"
    with pytest.raises(PermissionDenied):
        await rooms.change_role(room.id, member.id, "owner", by=admin.id)
    with pytest.raises(PermissionDenied):
        await rooms.change_role(room.id, owner.id, "member", by=admin.id)
    with pytest.raises(PermissionDenied):
        await rooms.change_role(room.id, admin.id, "member", by=member.id)
    assert (await rooms.change_role(room.id, member.id, "admin", by=admin.id)).role == "admin"
    with pytest.raises(PermissionDenied, match="last owner"):
        await rooms.change_role(room.id, owner.id, "admin", by=owner.id)
    await rooms.change_role(room.id, admin.id, "owner", by=owner.id)
    # Two owners now: one may step down.
    assert (await rooms.change_role(room.id, owner.id, "member", by=owner.id)).role == "member"
    with pytest.raises(NotFound):
        await rooms.change_role(room.id, uuid.uuid4(), "admin")
    with pytest.raises(InvalidInput):
        await rooms.change_role(room.id, member.id, "root")  # type: ignore[arg-type]


async def test_two_owners_leaving_at_once_leave_one_owner(
    rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom
) -> None:
    for _ in range(5):
        first, second = await make_user(), await make_user()
        room = await make_room(first)
        await rooms.change_role(room.id, first.id, "owner")
        await rooms.add_member(room.id, second.id, role="owner")
        results = await asyncio.gather(
            rooms.remove_member(room.id, first.id, by=first.id),
            rooms.change_role(room.id, second.id, "member", by=second.id),
            return_exceptions=True,
        )
        assert sum(isinstance(r, PermissionDenied) for r in results) == 1
        owners = [m for m in (await rooms.members(room.id)).members if m.role == "owner"]
        assert len(owners) == 1


async def test_members_and_room_list(
    rooms: RoomRepository,
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
    db: Database,
) -> None:
    alice, bob = await make_user("alice"), await make_user("bob")
    busy = await make_room(alice, bob, name="busy")
    quiet = await make_room(bob, name="quiet")
    await make_room(alice, name="not bob's")
    for i in range(3):
        await messages.send(CreateMessageDto(room_id=busy.id, user_id=alice.id, content=f"m{i}"))
    listing = await rooms.members(busy.id)
    assert listing.name == "busy"
    assert [m.user.username for m in listing.members] == ["alice", "bob"]
    assert listing.members[0].last_read_seq == 3  # a sender has read their own message

    summaries = await rooms.rooms_of(bob.id)
    assert [s.room.name for s in summaries] == ["busy", "quiet"]  # newest activity first
    top = summaries[0]
    assert (top.role, top.unread_count, top.last_read_seq) == ("member", 3, 0)
    assert top.last_message is not None
    assert (top.last_message.content, top.last_message.user.username) == ("m2", "alice")
    assert summaries[1].last_message is None
    assert summaries[1].role == "owner"

    await db.execute("t.archive", "UPDATE rooms SET is_active = false WHERE id = $1", quiet.id)
    assert [s.room.name for s in await rooms.rooms_of(bob.id)] == ["busy"]
    assert len(await rooms.rooms_of(bob.id, include_inactive=True)) == 2
    loner = await make_user()
    assert await rooms.rooms_of(loner.id) == []
    with pytest.raises(NotFound):
        await rooms.rooms_of(uuid.uuid4())
    with pytest.raises(NotFound):
        await rooms.members(uuid.uuid4())


async def test_room_list_is_one_query(
    rooms: RoomRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    user = await make_user()
    for i in range(10):
        await make_room(user, name=f"room {i}")
    db.reset_stats()
    assert len(await rooms.rooms_of(user.id)) == 10
    assert sum(s.calls for s in db.stats.values()) == 1


async def test_sends_racing_membership_changes_in_transactions_never_deadlock(
    rooms: RoomRepository,
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
) -> None:
    # The transaction path (Citus, system work, a caller's own block): it locks the room
    # row before any membership row too, as a send does. Before, a member sending while
    # an owner changed their role or removed them deadlocked (40P01, an Unavailable).
    owner = await make_user()
    members = [await make_user() for _ in range(4)]
    room = await make_room(owner, *members)
    unavailable: list[Unavailable] = []
    sent = 0
    stop = asyncio.Event()

    async def send(user: uuid.UUID) -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                await messages.send(CreateMessageDto(room_id=room.id, user_id=user, content="hi"))
                sent += 1
            except Unavailable as exc:
                unavailable.append(exc)
            except (PermissionDenied, NotFound):
                pass  # removed a moment ago

    async def churn(user: uuid.UUID) -> None:
        for _ in range(4):
            for step in (
                lambda: rooms.change_role(room.id, user, "admin", by=owner.id),
                lambda: rooms.change_role(room.id, user, "member"),
                lambda: rooms.remove_member(room.id, user, by=owner.id),
                lambda: rooms.add_member(room.id, user, by=owner.id),
            ):
                try:
                    await step()
                except Unavailable as exc:
                    unavailable.append(exc)
                except (PermissionDenied, NotFound):
                    pass  # a step after one that failed (not a member any more, say)

    senders = [asyncio.create_task(send(u.id)) for u in [owner, *members]]
    try:
        async with asyncio.timeout(120):
            await asyncio.gather(*(churn(u.id) for u in members))
    finally:
        stop.set()
        await asyncio.gather(*senders)
    assert sent > 0
    assert unavailable == []
