"""The base repository: each entity declares the columns callers may write, nothing else is."""

from __future__ import annotations

import dataclasses
import inspect
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from chatkeep.errors import InvalidInput, NotFound
from chatkeep.models import (
    CreateMessageDto,
    CreateRoomDto,
    Message,
    UpdateRoomDto,
    UpdateUserDto,
)
from chatkeep.storage import Database, MessageRepository, RoomRepository, UserRepository
from chatkeep.storage.base import BaseRepository

from .conftest import MakeRoom, MakeUser

# Every write a caller can make through the base, and the DTO that feeds it.
UPDATES: list[tuple[type[BaseRepository[Any]], type[BaseModel]]] = [
    (UserRepository, UpdateUserDto),
    (RoomRepository, UpdateRoomDto),
]


@pytest.mark.parametrize(("repository", "dto"), UPDATES)
def test_every_field_of_an_update_dto_is_a_declared_column(
    repository: type[BaseRepository[Any]], dto: type[BaseModel]
) -> None:
    # A field added to the DTO without a decision about the column fails here, not by
    # being written (or refused) at run time.
    assert set(dto.model_fields) <= repository.updatable


def test_the_declarations_are_what_each_entity_lets_callers_write() -> None:
    assert UserRepository.insertable == {"id", "email", "username", "avatar_url", "password_hash"}
    assert UserRepository.updatable == {"username", "avatar_url"}
    assert RoomRepository.insertable == frozenset()
    assert RoomRepository.updatable == {"name", "description"}
    assert MessageRepository.insertable == frozenset()
    assert MessageRepository.updatable == frozenset()


def test_a_message_repository_has_no_generic_write() -> None:
    # send and edit are the only writes: a generic create would skip the membership check
    # and the seq trigger's ordering, a generic update could move a message.
    assert not hasattr(MessageRepository, "create")
    assert not hasattr(MessageRepository, "update")
    writes = {
        name
        for name, member in inspect.getmembers(MessageRepository, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert {"send", "edit", "delete"} <= writes
    assert not writes & {"create", "update", "insert", "move"}


@pytest.mark.parametrize("column", ["room_id", "user_id", "seq"])
async def test_a_message_is_never_moved_between_rooms_or_authors(
    messages: MessageRepository,
    make_user: MakeUser,
    make_room: MakeRoom,
    db: Database,
    column: str,
) -> None:
    alice, bob = await make_user(), await make_user()
    room = await make_room(alice, bob)
    other = await make_room(bob, name="elsewhere")
    sent = await messages.send(CreateMessageDto(room_id=room.id, user_id=alice.id, content="x"))
    value: object = {"room_id": other.id, "user_id": bob.id, "seq": 99}[column]
    db.reset_stats()
    with pytest.raises(InvalidInput) as info:
        await messages._update(sent.id, {column: value})
    assert info.value.field == column
    with pytest.raises(InvalidInput):
        await messages._insert(dataclasses.asdict(sent))
    assert not {"messages.update", "messages.create"} & set(db.stats)
    assert await messages.get(sent.id) == sent


async def test_an_undeclared_column_is_refused_before_anything_is_sent(
    users: UserRepository, make_user: MakeUser, db: Database
) -> None:
    user = await make_user()
    db.reset_stats()
    for column, value in [("email", "new@example.org"), ("is_active", False), ("id", uuid.uuid4())]:
        with pytest.raises(InvalidInput) as info:
            await users._update(user.id, {column: value})
        assert info.value.field == column
    assert "users.update" not in db.stats
    assert await users.get(user.id) == user


async def test_a_dto_field_outside_the_declaration_is_not_written(
    rooms: RoomRepository, make_user: MakeUser, db: Database
) -> None:
    class WiderRoomDto(UpdateRoomDto):
        type: str | None = None  # a field the entity never agreed to let callers write

    owner = await make_user()
    room = await rooms.create(CreateRoomDto(name="kept", type="private", created_by=owner.id))
    db.reset_stats()
    with pytest.raises(InvalidInput) as info:
        await rooms.update(room.id, WiderRoomDto(name="renamed", type="public"))
    assert info.value.field == "type"
    assert "rooms.update" not in db.stats
    assert await rooms.get(room.id) == room


async def test_an_insert_names_every_declared_column_and_no_other(
    users: UserRepository, rooms: RoomRepository, db: Database
) -> None:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "email": "a@example.org",
        "username": "a_user",
        "avatar_url": None,
        "password_hash": "$2b$10$" + "a" * 53,
    }
    with pytest.raises(InvalidInput) as info:
        await users._insert({**values, "is_admin": True})
    assert info.value.field == "is_admin"
    with pytest.raises(InvalidInput) as info:
        await users._insert({k: v for k, v in values.items() if k != "password_hash"})
    assert info.value.field == "password_hash"
    with pytest.raises(InvalidInput):
        await users._insert({**values, "created_at": None})
    # Rooms are made only with their owner (or as a direct pair): no insert through the base.
    with pytest.raises(InvalidInput):
        await rooms._insert({"name": "no owner", "type": "public"})
    with pytest.raises(InvalidInput):
        await users._update(uuid.uuid4(), [("username", "x")])  # type: ignore[arg-type]
    assert not {"users.create", "rooms.create", "users.update"} & set(db.stats)
    created = await users._insert(values)
    assert (created.id, created.username) == (values["id"], "a_user")


async def test_an_empty_update_reads_the_row_and_a_missing_row_is_not_found(
    rooms: RoomRepository, make_user: MakeUser
) -> None:
    owner = await make_user()
    room = await rooms.create(CreateRoomDto(name="same", created_by=owner.id))
    assert await rooms.update(room.id, UpdateRoomDto()) == room
    with pytest.raises(NotFound):
        await rooms.update(uuid.uuid4(), UpdateRoomDto())
    with pytest.raises(InvalidInput):
        await rooms.update(room.id, {"name": "x"})  # type: ignore[arg-type]


def test_statements_are_built_once_per_class_from_the_declaration() -> None:
    assert UserRepository._insert_sql == (
        'INSERT INTO "users" ("avatar_url", "email", "id", "password_hash", "username")'
        ' VALUES ($1, $2, $3, $4, $5) RETURNING "id", "email", "username", "avatar_url",'
        ' "is_active", "last_seen", "created_at", "updated_at"'
    )
    assert MessageRepository._insert_sql is None
    assert RoomRepository._find_sql.startswith('SELECT "id", "name"')
    # Each class has its own cache of update texts.
    assert RoomRepository._update_sql is not UserRepository._update_sql


@pytest.mark.parametrize(
    ("attribute", "declared", "rule"),
    [
        ("updatable", frozenset({"id"}), "never changes"),
        ("insertable", frozenset({'name" = 1; --'}), "not a column name"),
        ("updatable", frozenset({"Name"}), "not a column name"),
        ("insertable", {"name"}, "must be a frozenset"),
    ],
)
def test_a_bad_declaration_fails_when_the_class_is_made(
    attribute: str, declared: object, rule: str
) -> None:
    with pytest.raises(TypeError, match=rule):
        type(
            "BadRepository",
            (BaseRepository,),
            {"table": "messages", "model": Message, "entity": "message", attribute: declared},
        )


async def test_existence_checks_tell_missing_rows_from_refusals(
    messages: MessageRepository, make_user: MakeUser, make_room: MakeRoom, db: Database
) -> None:
    alice, outsider = await make_user(), await make_user()
    room = await make_room(alice)
    sent = await messages.send(CreateMessageDto(room_id=room.id, user_id=alice.id, content="x"))
    assert await messages._exists("message", sent.id) is True
    assert await messages._exists("user", uuid.uuid4()) is False
    with pytest.raises(NotFound, match="does not exist") as info:
        await messages._require("room", uuid.uuid4())
    assert info.value.entity == "room"
    db.reset_stats()
    with pytest.raises(NotFound):
        await messages.read_by(uuid.uuid4())
    assert db.stats["messages.exists"].calls == 1
    assert await messages.delete(uuid.uuid4(), by=outsider.id) is False
    assert await messages.read_by(sent.id) == []
