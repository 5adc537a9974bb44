"""The small shared core of the repositories: find, get, delete by id, and declared writes.

Each repository states which columns a caller may write: :attr:`BaseRepository.insertable`
and :attr:`BaseRepository.updatable`. The statements are built from that declaration once
per class (the insert and the look-ups when the class is made, an update per column set on
first use), never from whatever a DTO dumps; a value for any other column is refused before
anything is sent. Public ``create``/``update`` methods are opt-in: an entity that has them
defines them, typed with its own DTO, on top of :meth:`BaseRepository._insert` and
:meth:`BaseRepository._update`, and an entity that must not have them (a message is never
moved between rooms or authors) does not. Anything beyond these operations is SQL written
by hand in the entity's own repository. These methods do no permission checks: they are the
system's view of a table, used by the entity repositories and by tools.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar

import asyncpg

from chatkeep.errors import ChatkeepError, InvalidInput, NotFound
from chatkeep.ids import check_id
from chatkeep.models import _Row
from chatkeep.storage.database import Database

__all__ = ["BaseRepository", "check_id"]

ModelT = TypeVar("ModelT", bound=_Row)

#: Entities whose existence a repository checks after a statement matched no row.
Entity = Literal["user", "room", "message"]

# "No row came back" means either "no such row" or "not allowed / nothing to do"; one
# look-up by id tells them apart. The operation names are the ones the stats always had.
_EXISTS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "user": ("users.exists", "SELECT 1 FROM users WHERE id = $1"),
        "room": ("rooms.exists", "SELECT 1 FROM rooms WHERE id = $1"),
        "message": ("messages.exists", "SELECT 1 FROM messages WHERE id = $1"),
    }
)

_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]*")


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier (only ever called on declared names)."""
    return '"' + name.replace('"', '""') + '"'


def not_found(entity: str, key: object) -> NotFound:
    """The error for a row that does not exist (one wording for every repository)."""
    return NotFound(f"{entity} {key} does not exist", entity=entity)


def refuse_on_citus(db: Database, operation: str, instead: str) -> None:
    """Refuse ``operation``, a call of a plain-only flow function, in Citus mode.

    Those functions set the acting user with ``set_config`` inside the statement, which
    Citus never passes to its workers (only a transaction's ``SET LOCAL``): on Citus the
    flows keep their transaction acting as the user, calling ``instead``.
    """
    if db.settings.citus:
        raise ChatkeepError(
            f"{operation} is not available with Settings.citus: call {instead} in a "
            "transaction acting as the user"
        )


class BaseRepository(Generic[ModelT]):
    """find_by_id / get / delete over one table, and the writes its entity declares.

    Subclasses set :attr:`table`, :attr:`model` and :attr:`entity`, and state the columns
    callers may write in :attr:`insertable` and :attr:`updatable` (both empty by default:
    nothing is writable unless declared). Declared names must be plain lower-case
    identifiers; a bad declaration fails when the class is made.
    """

    table: ClassVar[str]
    model: ClassVar[type[_Row]]
    entity: ClassVar[str]
    #: Columns :meth:`_insert` writes, all of them in every insert.
    insertable: ClassVar[frozenset[str]] = frozenset()
    #: Columns :meth:`_update` may change (any non-empty subset at a time).
    updatable: ClassVar[frozenset[str]] = frozenset()

    # Built once per class by __init_subclass__ from the declaration above.
    _select_list: ClassVar[str]
    _find_sql: ClassVar[str]
    _delete_sql: ClassVar[str]
    _insert_columns: ClassVar[tuple[str, ...]]
    _insert_sql: ClassVar[str | None]
    _update_sql: ClassVar[dict[tuple[str, ...], str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attribute in ("insertable", "updatable"):
            declared = getattr(cls, attribute)
            if not isinstance(declared, frozenset):
                raise TypeError(f"{cls.__name__}.{attribute} must be a frozenset of column names")
            for name in declared:
                if not isinstance(name, str) or _IDENTIFIER.fullmatch(name) is None:
                    raise TypeError(f"{cls.__name__}.{attribute}: {name!r} is not a column name")
        if "id" in cls.updatable:
            raise TypeError(f"{cls.__name__}.updatable: a row's id never changes")
        table = quote_ident(cls.table)
        cls._select_list = ", ".join(quote_ident(f.name) for f in dataclasses.fields(cls.model))
        cls._find_sql = f"SELECT {cls._select_list} FROM {table} WHERE id = $1"
        cls._delete_sql = f"DELETE FROM {table} WHERE id = $1"
        cls._insert_columns = tuple(sorted(cls.insertable))
        cls._insert_sql = None
        if cls._insert_columns:
            names = ", ".join(quote_ident(c) for c in cls._insert_columns)
            params = ", ".join(f"${i}" for i in range(1, len(cls._insert_columns) + 1))
            cls._insert_sql = (
                f"INSERT INTO {table} ({names}) VALUES ({params}) RETURNING {cls._select_list}"
            )
        cls._update_sql = {}

    def __init__(self, db: Database) -> None:
        self.db = db

    def _row(self, record: Mapping[str, Any] | asyncpg.Record) -> ModelT:
        return self.model._from_row(record)  # type: ignore[return-value]

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
            raise not_found(self.entity, id)
        return found

    async def delete(self, id: uuid.UUID) -> bool:
        """Delete the row; True if it existed (dependent rows go with it by cascade).

        Raises:
            InvalidInput: ``id`` is not a UUID.
        """
        status = await self.db.execute(f"{self.table}.delete", self._delete_sql, check_id("id", id))
        return status != "DELETE 0"

    # -- for subclasses -----------------------------------------------------------------

    async def _insert(self, values: Mapping[str, Any]) -> ModelT:
        """Insert a row from ``values``, which names every :attr:`insertable` column.

        Raises:
            InvalidInput: a column outside the declaration, or a declared one left out
                (both a bug in the caller: nothing is sent); a value breaks a rule.
            Conflict: a unique rule is broken (``constraint`` names it).
            NotFound: a referenced row does not exist.
        """
        sql = self._insert_sql
        if sql is None:
            raise InvalidInput("values", f"{self.table} declares no insertable column")
        _check_columns(values, self.insertable, "an insertable", self.table)
        for name in self._insert_columns:
            if name not in values:
                raise InvalidInput(name, f"needs a value: an insertable column of {self.table}")
        args = [values[name] for name in self._insert_columns]
        row = await self.db.fetchrow(f"{self.table}.create", sql, *args)
        if row is None:  # pragma: no cover - INSERT ... RETURNING always returns the row
            raise NotFound(f"{self.entity} was not created", entity=self.entity)
        return self._row(row)

    async def _update(self, id: uuid.UUID, values: Mapping[str, Any]) -> ModelT:
        """Change the columns ``values`` names (others keep theirs); returns the row.

        Raises:
            NotFound: no row has this id.
            InvalidInput: ``id`` is not a UUID; a column outside :attr:`updatable` (a bug
                in the caller: nothing is sent); a value breaks a rule.
            Conflict: a unique rule is broken.
        """
        key = check_id("id", id)
        _check_columns(values, self.updatable, "an updatable", self.table)
        if not values:
            return await self.get(key)
        columns = tuple(sorted(values))
        sql = self._update_sql.get(columns)
        if sql is None:
            # One text per column set, built on first use: the same text each time keeps
            # asyncpg's prepared-statement cache hitting.
            sets = ", ".join(f"{quote_ident(c)} = ${i}" for i, c in enumerate(columns, start=2))
            sql = self._update_sql[columns] = (
                f"UPDATE {quote_ident(self.table)} SET {sets} WHERE id = $1"
                f" RETURNING {self._select_list}"
            )
        args = [values[name] for name in columns]
        row = await self.db.fetchrow(f"{self.table}.update", sql, key, *args)
        if row is None:
            raise not_found(self.entity, key)
        return self._row(row)

    async def _exists(self, entity: Entity, key: uuid.UUID) -> bool:
        """Whether the ``entity`` row with id ``key`` exists (as this transaction sees it)."""
        name, sql = _EXISTS[entity]
        return await self.db.fetchval(name, sql, key) is not None

    async def _require(self, entity: Entity, key: uuid.UUID) -> None:
        """Raise :class:`NotFound` unless the ``entity`` row with id ``key`` exists.

        For a statement that matched no row: an empty answer then means "no such row"
        only when the row is really missing.
        """
        if not await self._exists(entity, key):
            raise not_found(entity, key)


def _check_columns(
    values: Mapping[str, Any], allowed: frozenset[str], kind: str, table: str
) -> None:
    if not isinstance(values, Mapping):
        raise InvalidInput("values", "must be a mapping of column names to values")
    for name in values:
        if name not in allowed:
            raise InvalidInput(name, f"not {kind} column of {table}")
