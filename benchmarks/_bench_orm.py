"""bench_facade's SQLAlchemy side: the ORM mapping and the jobs, as an ORM application does them.

A module of its own because SQLAlchemy is the optional ``bench`` extra: bench_facade imports
it only when the SQLAlchemy column is asked for. Not a benchmark script by itself.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, FetchedValue, ForeignKey, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from chatkeep.ids import uuid7

if TYPE_CHECKING:
    from bench_facade import Fixture, Op

PAGE = 50


def _history_position(fx: Fixture, rng: random.Random) -> int:
    return rng.randint(PAGE + 1, fx.history_messages)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    username: Mapped[str]
    avatar_url: Mapped[str | None]


class Room(Base):
    __tablename__ = "rooms"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    is_active: Mapped[bool]
    last_seq: Mapped[int]


class RoomUser(Base):
    __tablename__ = "room_users"
    room_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rooms.id"), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    last_read_seq: Mapped[int]
    last_read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    room: Mapped[Room] = relationship(lazy="joined")


class Message(Base):
    __tablename__ = "messages"
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012 - SQLAlchemy's own
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    room_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("rooms.id"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    # Assigned by the schema's trigger, read back with RETURNING (eager_defaults).
    seq: Mapped[int] = mapped_column(server_default=FetchedValue())
    content: Mapped[str]
    is_edited: Mapped[bool] = mapped_column(server_default=FetchedValue())
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=FetchedValue()
    )


def sqlalchemy_ops(url: str, fx: Fixture, pool_size: int) -> tuple[dict[str, Op], AsyncEngine]:
    """The same jobs through SQLAlchemy 2's async ORM; also returns the engine (to dispose)."""
    engine = create_async_engine(
        "postgresql+asyncpg://" + url.split("://", 1)[1],
        pool_size=pool_size,
        max_overflow=0,
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def send(room: uuid.UUID, user: uuid.UUID) -> Any:
        async with sessions() as session, session.begin():
            member = await session.get(RoomUser, (room, user))
            if member is None or not member.room.is_active:
                raise PermissionError("not a member of an active room")
            message = Message(id=uuid7(), room_id=room, user_id=user, content="hello ORM")
            session.add(message)
        return message

    async def send_100(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        return await send(room, fx.user(index))

    async def send_hot(index: int, rng: random.Random) -> Any:
        return await send(fx.hot_room, fx.user(index))

    async def page(where: Any, order: Any) -> Any:
        # What an ORM application writes: the message entities with their authors' rows.
        async with sessions() as session:
            result = await session.execute(
                select(Message, User)
                .join(User, Message.user_id == User.id)
                .where(Message.room_id == fx.history_room, where)
                .order_by(order)
                .limit(PAGE)
            )
            return result.all()

    async def history(index: int, rng: random.Random) -> Any:
        seq = _history_position(fx, rng)
        return await page(Message.seq < seq, Message.seq.desc())

    async def catch_up(index: int, rng: random.Random) -> Any:
        seq = _history_position(fx, rng) - PAGE
        return await page(Message.seq > seq, Message.seq)

    async def unread(index: int, rng: random.Random) -> Any:
        async with sessions() as session:
            result = await session.execute(
                select(RoomUser.room_id, func.greatest(Room.last_seq - RoomUser.last_read_seq, 0))
                .join(Room, Room.id == RoomUser.room_id)
                .where(RoomUser.user_id == fx.user(index))
            )
            return result.all()

    async def mark_read(index: int, rng: random.Random) -> Any:
        room = fx.send_rooms[rng.randrange(len(fx.send_rooms))]
        async with sessions() as session, session.begin():
            member = await session.get(RoomUser, (room, fx.user(index)))
            if member is None:
                raise PermissionError("not a member")
            if member.room.last_seq > member.last_read_seq:
                member.last_read_seq = member.room.last_seq
                member.last_read_at = datetime.now(UTC)
            return member.last_read_seq

    ops: dict[str, Op] = {
        "send_100": send_100,
        "send_hot": send_hot,
        "history": history,
        "catch_up": catch_up,
        "unread": unread,
        "mark_read": mark_read,
    }
    return ops, engine
