"""The small shared core of the repositories: find, create, update and delete by id.

Column names come from the read model's fields (an allow-list fixed by code, quoted as
identifiers); values are always bound parameters. Anything beyond these four operations is
SQL written by hand in the entity's own repository. These methods do no permission checks:
they are the system's view of a table, used by the entity repositories and by tools.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

import asyncpg
from pydantic import BaseModel

from chatkeep.errors import InvalidInput, NotFound
from chatkeep.ids import check_id
from chatkeep.models import _Row
from chatkeep.storage.database import Database

__all__ = ["BaseRepository", "check_id"]

ModelT = TypeVar("ModelT", bound=_Row)
CreateT = TypeVar("CreateT", bound=BaseModel)
UpdateT = TypeVar("UpdateT", bound=BaseModel)


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (only ever called on allow-listed names)."""
    return '"' + name.replace('"', '""') + '"'


def _check_dto(dto: object, expected: type[BaseModel]) -> None:
    if not isinstance(dto, expected):
        raise InvalidInput("dto", f"must be a {expected.__name__}")


class BaseRepository(Generic[ModelT, CreateT, UpdateT]):
    """find_by_id / create / update / delete over one table, from a read model.

    Subclasses set :attr:`table` and :attr:`model`, and may widen :attr:`extra_writable`
    for columns that are written but never read back (``password_hash``). They turn a DTO
    into column values in :meth:`_insert_values` / :meth:`_update_values`.
    """

    table: ClassVar[str]
    model: ClassVar[type[_Row]]
    entity: ClassVar[str]
    #: The DTO classes :meth:`create` and :meth:`update` take (anything else is refused
    #: before it is read: a dict has no ``model_dump``).
    create_dto: ClassVar[type[BaseModel]]
    update_dto: ClassVar[type[BaseModel]]
    #: Columns of the table that are written but are not fields of the read model.
    extra_writable: ClassVar[frozenset[str]] = frozenset()
    #: Columns a caller may never set through create/update.
    read_only: ClassVar[frozenset[str]] = frozenset({"created_at", "updated_at"})

    def __init__(self, db: Database) -> None:
        self.db = db
        fields = tuple(field.name for field in dataclasses.fields(self.model))
        self._columns = fields
        self._writable = (frozenset(fields) | self.extra_writable) - self.read_only
        self._select_list = ", ".join(quote_ident(c) for c in fields)
        self._sql_cache: dict[tuple[str, tuple[str, ...]], str] = {}
        table = quote_ident(self.table)
        self._find_sql = f"SELECT {self._select_list} FROM {table} WHERE id = $1"
        self._delete_sql = f"DELETE FROM {table} WHERE id = $1"

    def _row(self, record: Mapping[str, Any] | asyncpg.Record) -> ModelT:
        return self.model._from_row(record)  # type: ignore[return-value]

    def _checked_columns(self, values: Mapping[str, Any]) -> tuple[str, ...]:
        for name in values:
            if name not in self._writable:
                raise InvalidInput(name, f"not a writable column of {self.table}")
        return tuple(values)

    async def find_by_id(self, id: uuid.UUID) -> ModelT | None:
        """The row with this id, or ``None``.

        Raises:
            InvalidInput: ``id`` is not a UUID.
        """
        row = await self.db.fetchrow(f"{self.table}.find_by_id", self._find_sql, check_id("id", id))
        return None if row is None else self._row(row)

    async def get(self, id: uuid.UUID) -> ModelT:
        """The row with this id.

        Raises:
            NotFound: no such row.
            InvalidInput: ``id`` is not a UUID.
        """
        found = await self.find_by_id(id)
        if found is None:
            raise NotFound(f"{self.entity} {id} does not exist", entity=self.entity)
        return found

    async def create(self, dto: CreateT) -> ModelT:
        """Insert a row from ``dto``; returns it as stored.

        Raises:
            Conflict: a unique rule is broken (``constraint`` names it).
            NotFound: a referenced row does not exist.
            InvalidInput: a value breaks a rule, or ``dto`` is not a :attr:`create_dto`.
        """
        _check_dto(dto, self.create_dto)
        values = await self._insert_values(dto)
        return await self._insert(values)

    async def update(self, id: uuid.UUID, dto: UpdateT) -> ModelT:
        """Change the columns ``dto`` sets (fields left out keep their values).

        Raises:
            NotFound: no row has this id.
            Conflict: a unique rule is broken.
            InvalidInput: a value breaks a rule, or ``dto`` is not an :attr:`update_dto`.
        """
        key = check_id("id", id)
        _check_dto(dto, self.update_dto)
        values = await self._update_values(dto)
        if not values:
            return await self.get(key)
        columns = self._checked_columns(values)
        sql = self._sql("update", columns)
        row = await self.db.fetchrow(f"{self.table}.update", sql, key, *values.values())
        if row is None:
            raise NotFound(f"{self.entity} {key} does not exist", entity=self.entity)
        return self._row(row)

    async def delete(self, id: uuid.UUID) -> bool:
        """Delete the row; True if it existed (dependent rows go with it by cascade).

        Raises:
            InvalidInput: ``id`` is not a UUID.
        """
        status = await self.db.execute(f"{self.table}.delete", self._delete_sql, check_id("id", id))
        return status != "DELETE 0"

    # -- for subclasses -----------------------------------------------------------------

    async def _insert_values(self, dto: CreateT) -> dict[str, Any]:
        return dto.model_dump()

    async def _update_values(self, dto: UpdateT) -> dict[str, Any]:
        return dto.model_dump(exclude_unset=True)

    async def _insert(self, values: Mapping[str, Any]) -> ModelT:
        columns = self._checked_columns(values)
        sql = self._sql("insert", columns)
        row = await self.db.fetchrow(f"{self.table}.create", sql, *values.values())
        if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
            raise NotFound(f"{self.entity} was not created", entity=self.entity)
        return self._row(row)

    def _sql(self, kind: str, columns: tuple[str, ...]) -> str:
        # Built once per column set and cached: the same text each time also keeps
        # asyncpg's prepared-statement cache hitting.
        key = (kind, columns)
        sql = self._sql_cache.get(key)
        if sql is not None:
            return sql
        table = quote_ident(self.table)
        if kind == "insert":
            names = ", ".join(quote_ident(c) for c in columns)
            params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
            sql = f"INSERT INTO {table} ({names}) VALUES ({params}) RETURNING {self._select_list}"
        else:
            sets = ", ".join(f"{quote_ident(c)} = ${i}" for i, c in enumerate(columns, start=2))
            sql = f"UPDATE {table} SET {sets} WHERE id = $1 RETURNING {self._select_list}"
        self._sql_cache[key] = sql
        return sql
