"""The one exception tree chatkeep callers see.

Driver errors (asyncpg, redis-py) never escape the library: they are translated at the
storage and realtime boundaries and chained with ``raise ... from exc``, so the original is
still on ``__cause__`` for logs and debuggers.

::

    ChatkeepError                      root: ``except ChatkeepError`` catches everything
    ├── ConfigurationError             settings are missing, malformed or unsafe
    ├── InvalidInput                   a value broke a rule (``.field`` and ``.rule`` say which)
    ├── NotFound                       the row (or a row it refers to) does not exist
    ├── Conflict                       a unique rule was broken (``.constraint`` names it)
    ├── Unauthenticated                no valid session: log in (again)
    ├── PermissionDenied               the acting user may not do this
    ├── RateLimited                    too many attempts (``.retry_after`` in seconds)
    ├── Unavailable                    a store is down, timed out or the pool is exhausted
    ├── ResyncRequired                 a room's change log no longer reaches back that far
    └── MigrationError                 the migration runner refused or failed
        ├── ChecksumMismatch           an applied file was edited (``.version``)
        ├── MigrationOrderError        out-of-order, missing or duplicate versions
        ├── MigrationLockTimeout       another migrator held the lock too long
        └── MigrationFailed            a statement failed (``.version``, ``.statement``)

Every class is importable from ``chatkeep.errors`` (and the common ones from ``chatkeep``).
Messages never contain passwords, tokens or message contents.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ChatkeepError",
    "ChecksumMismatch",
    "ConfigurationError",
    "Conflict",
    "InvalidInput",
    "MigrationError",
    "MigrationFailed",
    "MigrationLockTimeout",
    "MigrationOrderError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResyncRequired",
    "Unauthenticated",
    "Unavailable",
]


class ChatkeepError(Exception):
    """Root of every error chatkeep raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigurationError(ChatkeepError):
    """Settings are missing, malformed or unsafe (for example plaintext in production)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidInput(ChatkeepError):
    """A value broke a rule; ``field`` names the value and ``rule`` the rule broken.

    Attributes:
        field: the (first) field at fault; a dotted path for a nested value.
        rule: the rule it broke, in words (never the value itself).
        errors: every problem found, each an ``InvalidInput`` of one field and rule, the
            first being this one's ``field`` and ``rule``. Validating a DTO reports all of
            its fields at once; other checks stop at the first problem.
    """

    def __init__(
        self,
        field: str,
        rule: str,
        message: str | None = None,
        *,
        errors: tuple[InvalidInput, ...] = (),
    ) -> None:
        super().__init__(message or f"{field}: {rule}")
        self.field = field
        self.rule = rule
        self.errors = errors or (self,)

    @classmethod
    def of_all(cls, problems: Iterable[tuple[str, str]]) -> InvalidInput:
        """One error for several ``(field, rule)`` problems (at least one).

        Its ``field`` and ``rule`` are the first problem's, ``errors`` holds them all, and
        the message joins them with ``; ``.
        """
        found = tuple(cls(field, rule) for field, rule in problems)
        first = found[0]
        return cls(first.field, first.rule, "; ".join(map(str, found)), errors=found)


class NotFound(ChatkeepError):
    """The row asked for, or a row it refers to, does not exist (or is not visible)."""

    def __init__(self, message: str, *, entity: str | None = None) -> None:
        super().__init__(message)
        self.entity = entity


class Conflict(ChatkeepError):
    """A uniqueness rule was broken; ``constraint`` names the database constraint if known."""

    def __init__(self, message: str, *, constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class Unauthenticated(ChatkeepError):
    """The caller is not logged in: no session token, or one unknown, expired or revoked.

    Web integrations answer it with 401 (``chatkeep.integrations.fastapi``); the library's
    own flows report a refused token as :class:`PermissionDenied` or ``None``.
    """


class PermissionDenied(ChatkeepError):
    """The acting user may not perform this operation."""


class RateLimited(ChatkeepError):
    """Too many attempts; ``retry_after`` says how many seconds to wait.

    Attributes:
        retry_after: seconds until the next attempt may be allowed.
        action: what was limited (``"send"``, ``"login"``...), for metrics and logs;
            ``None`` when the raiser did not say.
    """

    def __init__(self, message: str, *, retry_after: float, action: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.action = action


class Unavailable(ChatkeepError):
    """A store could not be reached, timed out, or the connection pool is exhausted."""


class ResyncRequired(ChatkeepError):
    """The room's change log no longer holds the changes after the position asked for.

    Pruning (retention) removed them: reload the room (history, read after
    :meth:`~chatkeep.ChatKeep.room_position`) and resume from ``position``.

    Attributes:
        room_id: the room.
        oldest_position: the oldest position the log still holds (``after`` must be at
            least ``oldest_position - 1``).
        position: the room's current position.
    """

    def __init__(
        self, message: str, *, room_id: object, oldest_position: int, position: int
    ) -> None:
        super().__init__(message)
        self.room_id = room_id
        self.oldest_position = oldest_position
        self.position = position


class MigrationError(ChatkeepError):
    """The migration runner refused to run or a migration failed."""


class ChecksumMismatch(MigrationError):
    """An applied migration file was edited after it was applied."""

    def __init__(self, message: str, *, version: int) -> None:
        super().__init__(message)
        self.version = version


class MigrationOrderError(MigrationError):
    """Versions are out of order, missing, or duplicated."""


class MigrationLockTimeout(MigrationError):
    """Another migrator held the migration lock for longer than the timeout."""


class MigrationFailed(MigrationError):
    """A migration statement failed; nothing of the file is left behind (unless marked)."""

    def __init__(self, message: str, *, version: int, statement: str | None = None) -> None:
        super().__init__(message)
        self.version = version
        self.statement = statement


for _name in __all__:
    # Show the public path in tracebacks and reprs, as psycopg_pool does.
    globals()[_name].__module__ = "chatkeep.errors"
