"""Accounts: registration, authentication, look-ups, profile and password changes.

Passwords are hashed with bcrypt (12 rounds by default, never fewer than 10) in a worker
thread, at most ``max_concurrent_hashes`` at a time, so a burst of logins neither blocks
the event loop nor starves it of threads. ``password_hash`` is read only inside this
module and never leaves it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from typing import Any, ClassVar, Final

import bcrypt

from chatkeep.errors import Conflict, InvalidInput, PermissionDenied
from chatkeep.ids import uuid7
from chatkeep.models import (
    PASSWORD_MAX_BYTES,
    CreateUserDto,
    UpdateUserDto,
    User,
    canonical_email,
    canonical_username,
    check_password,
)
from chatkeep.storage.base import BaseRepository, check_id, not_found
from chatkeep.storage.database import Database

__all__ = ["DEFAULT_BCRYPT_ROUNDS", "MIN_BCRYPT_ROUNDS", "UserRepository"]

DEFAULT_BCRYPT_ROUNDS: Final = 12
MIN_BCRYPT_ROUNDS: Final = 10
MAX_BCRYPT_ROUNDS: Final = 31
_MAX_MIN_INTERVAL: Final = 366 * 86_400.0

_USER_COLUMNS: Final = (
    "id, email, username, avatar_url, is_active, last_seen, created_at, updated_at"
)

FIND_BY_EMAIL: Final = f"SELECT {_USER_COLUMNS} FROM users WHERE lower(email) = $1"
FIND_BY_USERNAME: Final = f"SELECT {_USER_COLUMNS} FROM users WHERE lower(username) = $1"
# Authentication reads the hash too; it is the only query that does, with password changes.
FIND_FOR_LOGIN: Final = f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE lower(email) = $1"
FIND_HASH: Final = "SELECT password_hash FROM users WHERE id = $1"
# Compare-and-swap on the old hash: a concurrent change is never silently overwritten.
REPLACE_HASH: Final = """
UPDATE users SET password_hash = $3
 WHERE id = $1 AND password_hash = $2
"""
TOUCH_LAST_SEEN: Final = """
UPDATE users SET last_seen = now()
 WHERE id = $1
   AND (last_seen IS NULL OR last_seen < now() - make_interval(secs => $2))
"""
DEACTIVATE: Final = f"""
UPDATE users SET is_active = false WHERE id = $1
RETURNING {_USER_COLUMNS}
"""


@functools.cache
def _dummy_hash(rounds: int) -> bytes:
    # Verified against when the account does not exist, so that case costs the same
    # bcrypt work as a real one and the response time does not reveal who is registered.
    return bcrypt.hashpw(b"chatkeep-timing-equaliser", bcrypt.gensalt(rounds))


def _check_dummy(secret: bytes, rounds: int) -> None:
    # In the worker thread: the first call per cost also makes the dummy hash (~bcrypt's
    # full cost), which must not block the event loop either.
    bcrypt.checkpw(secret, _dummy_hash(rounds))


def _candidate(field: str, value: object) -> bytes:
    """A password to check against a stored hash, as the bytes bcrypt reads.

    Only what no stored password can be is refused: not a string, lone surrogates (no
    UTF-8 form: ``encode`` raised UnicodeEncodeError) and more than 72 bytes (bcrypt
    raised ValueError). The rules of new passwords do not apply: an old one may predate
    them.

    Raises:
        InvalidInput: ``value`` is none of those things, named ``field``.
    """
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    try:
        secret = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(field, "must be valid Unicode (no lone surrogates)") from None
    if len(secret) > PASSWORD_MAX_BYTES:
        raise InvalidInput(field, f"at most {PASSWORD_MAX_BYTES} bytes in UTF-8 (bcrypt's limit)")
    return secret


class UserRepository(BaseRepository[User]):
    """Users, with bcrypt passwords.

    Args:
        db: the database.
        bcrypt_rounds: the bcrypt cost (log2 of iterations); 12 by default, at least 10.
        max_concurrent_hashes: bcrypt computations allowed at once (default: CPU count).

    Raises:
        InvalidInput: ``bcrypt_rounds`` is below 10 or above 31.
    """

    table: ClassVar[str] = "users"
    model: ClassVar[type[User]] = User
    entity: ClassVar[str] = "user"
    # A sign-up writes these; last_seen, is_active and the timestamps have methods (or
    # triggers) of their own, and email is fixed once registered.
    insertable: ClassVar[frozenset[str]] = frozenset(
        {"id", "email", "username", "avatar_url", "password_hash"}
    )
    updatable: ClassVar[frozenset[str]] = frozenset({"username", "avatar_url"})

    def __init__(
        self,
        db: Database,
        *,
        bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS,
        max_concurrent_hashes: int | None = None,
    ) -> None:
        super().__init__(db)
        if not isinstance(bcrypt_rounds, int) or not (
            MIN_BCRYPT_ROUNDS <= bcrypt_rounds <= MAX_BCRYPT_ROUNDS
        ):
            raise InvalidInput(
                "bcrypt_rounds", f"between {MIN_BCRYPT_ROUNDS} and {MAX_BCRYPT_ROUNDS}"
            )
        limit = (os.cpu_count() or 2) if max_concurrent_hashes is None else max_concurrent_hashes
        if not isinstance(limit, int) or limit < 1:
            raise InvalidInput("max_concurrent_hashes", "at least 1")
        self.bcrypt_rounds = bcrypt_rounds
        self._hash_slots = asyncio.Semaphore(limit)

    # -- bcrypt, off the event loop -------------------------------------------------------

    async def hash_password(self, password: str) -> str:
        """A bcrypt hash of ``password`` at this repository's cost.

        Raises:
            InvalidInput: the password breaks a rule (length in characters and bytes).
        """
        secret = check_password(password).encode("utf-8")
        rounds = self.bcrypt_rounds
        async with self._hash_slots:
            hashed = await asyncio.to_thread(bcrypt.hashpw, secret, bcrypt.gensalt(rounds))
        return hashed.decode("ascii")

    async def _verify(self, secret: bytes, hashed: bytes) -> bool:
        async with self._hash_slots:
            return await asyncio.to_thread(bcrypt.checkpw, secret, hashed)

    # -- public API -----------------------------------------------------------------------

    async def create(self, dto: CreateUserDto) -> User:
        """Same as :meth:`register`."""
        if not isinstance(dto, CreateUserDto):
            raise InvalidInput("dto", "must be a CreateUserDto")
        values = {
            "id": uuid7(),
            "email": dto.email,
            "username": dto.username,
            "avatar_url": dto.avatar_url,
            "password_hash": await self.hash_password(dto.password.get_secret_value()),
        }
        return await self._insert(values)

    async def update(self, id: uuid.UUID, dto: UpdateUserDto) -> User:
        """Same as :meth:`update_profile`."""
        if not isinstance(dto, UpdateUserDto):
            raise InvalidInput("dto", "must be an UpdateUserDto")
        # Every field of the DTO is an updatable column (a test holds them together);
        # _update refuses any other before sending anything.
        return await self._update(id, dto.model_dump(exclude_unset=True))

    async def register(self, dto: CreateUserDto) -> User:
        """Create an account; the password is hashed with bcrypt first.

        Raises:
            Conflict: the email or username is taken (case-insensitively);
                ``constraint`` is ``users_email_lower_key`` or ``users_username_lower_key``.
            InvalidInput: a value breaks a rule.
        """
        return await self.create(dto)

    async def authenticate(self, email: str, password: str) -> User | None:
        """The active user with this email and password, else ``None``.

        Takes the same time whether or not the account exists (a dummy hash is checked
        when it does not), so timing does not reveal registered emails.

        Raises:
            InvalidInput: ``email`` or ``password`` is not even well-formed (``password``:
                not a string, lone surrogates, or over 72 bytes in UTF-8).
        """
        secret = _candidate("password", password)
        key = canonical_email(email)
        row = await self.db.fetchrow("users.authenticate", FIND_FOR_LOGIN, key)
        if row is None:
            async with self._hash_slots:
                await asyncio.to_thread(_check_dummy, secret, self.bcrypt_rounds)
            return None
        try:
            matches = await self._verify(secret, row["password_hash"].encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            matches = False
        if not matches or not row["is_active"]:
            return None
        return self._user(row)

    async def find_by_email(self, email: str) -> User | None:
        """The user with this email (any case), or ``None``.

        Raises:
            InvalidInput: ``email`` is not a valid address.
        """
        row = await self.db.fetchrow("users.find_by_email", FIND_BY_EMAIL, canonical_email(email))
        return None if row is None else self._row(row)

    async def find_by_username(self, username: str) -> User | None:
        """The user with this username (compared in its canonical form), or ``None``.

        Raises:
            InvalidInput: ``username`` breaks the username rules.
        """
        row = await self.db.fetchrow(
            "users.find_by_username", FIND_BY_USERNAME, canonical_username(username)
        )
        return None if row is None else self._row(row)

    async def update_profile(self, user_id: uuid.UUID, dto: UpdateUserDto) -> User:
        """Change the username and/or avatar; fields left out of ``dto`` are kept.

        Raises:
            NotFound: no such user.
            Conflict: the new username is taken.
            InvalidInput: a bad id, or ``dto`` is not an UpdateUserDto.
        """
        key = check_id("user_id", user_id)  # named as the caller named it, not ``id``
        if not isinstance(dto, UpdateUserDto):
            raise InvalidInput("dto", "must be an UpdateUserDto")
        return await self.update(key, dto)

    async def change_password(
        self, user_id: uuid.UUID, current_password: str, new_password: str
    ) -> None:
        """Replace the password after checking the current one.

        Raises:
            NotFound: no such user.
            PermissionDenied: ``current_password`` is wrong.
            InvalidInput: ``new_password`` breaks a rule, or ``current_password`` is no
                password at all (not a string, lone surrogates, over 72 bytes).
            Conflict: the password was changed concurrently; nothing was written.
        """
        key = check_id("user_id", user_id)
        check_password(new_password)
        current = _candidate("current_password", current_password)
        old_hash = await self.db.fetchval("users.find_hash", FIND_HASH, key)
        if old_hash is None:
            raise not_found("user", key)
        if not await self._verify(current, old_hash.encode("ascii")):
            raise PermissionDenied("the current password is wrong")
        new_hash = await self.hash_password(new_password)
        status = await self.db.execute(
            "users.change_password", REPLACE_HASH, key, old_hash, new_hash
        )
        if status == "UPDATE 0":
            raise Conflict("the password was changed concurrently; try again")

    async def touch_last_seen(self, user_id: uuid.UUID, *, min_interval: float = 0.0) -> bool:
        """Set ``last_seen`` to now; True if a row was written.

        Args:
            user_id: the user.
            min_interval: skip the write when ``last_seen`` is younger than this many
                seconds (a busy client calling on every request then costs one write a
                minute, not one per request).

        Raises:
            NotFound: no such user.
            InvalidInput: a bad id, or ``min_interval`` is not a number from 0 to a year.
        """
        key = check_id("user_id", user_id)
        # Bounded (and so finite): NaN or 1e100 seconds overflowed make_interval in SQL.
        if (
            isinstance(min_interval, bool)
            or not isinstance(min_interval, int | float)
            or not 0 <= min_interval <= _MAX_MIN_INTERVAL
        ):
            raise InvalidInput("min_interval", "a number of seconds from 0 to one year")
        status = await self.db.execute(
            "users.touch_last_seen", TOUCH_LAST_SEEN, key, float(min_interval)
        )
        if status != "UPDATE 0":
            return True
        await self._require("user", key)
        return False

    async def deactivate(self, user_id: uuid.UUID) -> User:
        """Mark the account inactive: it can no longer authenticate. Idempotent.

        Raises:
            NotFound: no such user.
        """
        key = check_id("user_id", user_id)
        row = await self.db.fetchrow("users.deactivate", DEACTIVATE, key)
        if row is None:
            raise not_found("user", key)
        return self._row(row)

    def _user(self, row: Any) -> User:
        values = dict(row)
        values.pop("password_hash", None)
        return User._from_row(values)
