from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import bcrypt
import pytest

from chatkeep.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from chatkeep.models import CreateUserDto, UpdateUserDto
from chatkeep.storage import Database, UserRepository

from .conftest import MakeUser


def dto(name: str = "alice", password: str = "correct horse", **extra: Any) -> CreateUserDto:  # noqa: S107
    return CreateUserDto(email=f"{name}@Example.org", username=name, password=password, **extra)


async def test_register_hashes_with_bcrypt_and_hides_the_hash(
    users: UserRepository, db: Database
) -> None:
    user = await users.register(dto(avatar_url="https://cdn.example.org/a.png"))
    assert user.email == "alice@example.org"
    assert user.username == "alice"
    assert user.avatar_url == "https://cdn.example.org/a.png"
    assert user.id.version == 7
    assert not hasattr(user, "password_hash")
    assert "$2" not in repr(user)
    stored = await db.fetchval("t.hash", "SELECT password_hash FROM users WHERE id = $1", user.id)
    assert stored.startswith("$2b$10$")
    assert bcrypt.checkpw(b"correct horse", stored.encode())
    assert await users.get(user.id) == user


async def test_register_conflicts_on_case_and_lookalike_variants(users: UserRepository) -> None:
    await users.register(dto("alice"))
    with pytest.raises(Conflict) as info:
        await users.register(
            CreateUserDto(email="ALICE@example.ORG", username="other", password="x" * 8)
        )
    assert info.value.constraint == "users_email_lower_key"
    with pytest.raises(Conflict) as info:
        await users.register(
            CreateUserDto(
                email="a2@example.org", username="\uff21\uff2c\uff29\uff23\uff25", password="x" * 8
            )
        )
    assert info.value.constraint == "users_username_lower_key"
    with pytest.raises(InvalidInput):
        await users.register({"email": "x"})  # type: ignore[arg-type]


def test_bcrypt_cost_bounds(db: Database) -> None:
    assert UserRepository(db).bcrypt_rounds == 12
    for rounds in (4, 9, 32):
        with pytest.raises(InvalidInput) as info:
            UserRepository(db, bcrypt_rounds=rounds)
        assert info.value.field == "bcrypt_rounds"
    with pytest.raises(InvalidInput):
        UserRepository(db, max_concurrent_hashes=0)


async def test_hashing_runs_off_the_loop_with_bounded_concurrency(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = UserRepository(db, bcrypt_rounds=10, max_concurrent_hashes=2)
    running = 0
    peak = 0
    lock = threading.Lock()
    loop_threads: set[int] = set()
    real = bcrypt.hashpw

    def counting(secret: bytes, salt: bytes) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        loop_threads.add(threading.get_ident())
        try:
            return real(secret, salt)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(bcrypt, "hashpw", counting)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(users.hash_password("correct horse") for _ in range(6)))
    finally:
        tick_task.cancel()
    assert peak == 2
    assert threading.get_ident() not in loop_threads
    assert ticks > 5  # the event loop kept running while bcrypt worked


async def test_authenticate(users: UserRepository) -> None:
    user = await users.register(dto("bob"))
    assert await users.authenticate("BOB@example.org", "correct horse") == user
    assert await users.authenticate("bob@example.org", "wrong horse") is None
    assert await users.authenticate("nobody@example.org", "correct horse") is None
    await users.deactivate(user.id)
    assert await users.authenticate("bob@example.org", "correct horse") is None
    with pytest.raises(InvalidInput):
        await users.authenticate("bob@example.org", "x" * 73)
    with pytest.raises(InvalidInput):
        await users.authenticate("not an email", "correct horse")
    with pytest.raises(InvalidInput):
        await users.authenticate("bob@example.org", None)  # type: ignore[arg-type]


async def test_authenticate_costs_the_same_for_unknown_users(
    users: UserRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    await users.register(dto("carol"))
    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(secret: bytes, hashed: bytes) -> bool:
        checks.append(hashed)
        return real(secret, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)

    async def timed(email: str) -> float:
        start = time.perf_counter()
        await users.authenticate(email, "wrong horse")
        return time.perf_counter() - start

    await timed("nobody@example.org")  # makes the dummy hash once
    checks.clear()
    # The fastest of a few runs: robust to other load on the machine.
    known = min([await timed("carol@example.org") for _ in range(4)])
    unknown = min([await timed("nobody@example.org") for _ in range(4)])
    # One bcrypt verification at the same cost either way.
    assert len(checks) == 8
    assert {h[:7] for h in checks} == {b"$2b$10$"}
    # Without the dummy check an unknown email would answer ~50x faster; load on a shared
    # machine moves single runs by far less than that.
    assert 0.33 < unknown / known < 3.0


async def test_find_by_email_and_username(users: UserRepository, make_user: MakeUser) -> None:
    user = await make_user("dave", email="Dave.Lee@example.org".lower())
    assert await users.find_by_email("DAVE.LEE@EXAMPLE.ORG") == user
    assert await users.find_by_username("DAVE") == user
    assert await users.find_by_username("\uff44\uff41\uff56\uff45") == user
    assert await users.find_by_email("else@example.org") is None
    assert await users.find_by_username("else") is None
    with pytest.raises(InvalidInput):
        await users.find_by_username("x")
    with pytest.raises(InvalidInput):
        await users.find_by_id("not-a-uuid")  # type: ignore[arg-type]


async def test_update_profile(users: UserRepository, make_user: MakeUser) -> None:
    user = await make_user("erin")
    other = await make_user("frank")
    changed = await users.update_profile(
        user.id, UpdateUserDto(username="Erin2", avatar_url="https://a.example/e.png")
    )
    assert changed.username == "erin2"
    assert changed.avatar_url == "https://a.example/e.png"
    assert changed.updated_at >= user.updated_at
    cleared = await users.update_profile(user.id, UpdateUserDto(avatar_url=None))
    assert cleared.avatar_url is None
    assert cleared.username == "erin2"
    assert await users.update_profile(user.id, UpdateUserDto()) == cleared
    with pytest.raises(Conflict):
        await users.update_profile(user.id, UpdateUserDto(username=other.username.upper()))
    with pytest.raises(NotFound):
        await users.update_profile(uuid.uuid4(), UpdateUserDto(username="ghost"))
    with pytest.raises(NotFound):
        await users.update_profile(uuid.uuid4(), UpdateUserDto())
    with pytest.raises(InvalidInput):
        await users.update_profile(user.id, {"username": "x"})  # type: ignore[arg-type]


async def test_change_password(users: UserRepository) -> None:
    user = await users.register(dto("gina"))
    with pytest.raises(PermissionDenied):
        await users.change_password(user.id, "wrong horse", "new password")
    with pytest.raises(InvalidInput):
        await users.change_password(user.id, "correct horse", "short")
    with pytest.raises(InvalidInput):
        await users.change_password(user.id, None, "new password")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await users.change_password(uuid.uuid4(), "correct horse", "new password")
    await users.change_password(user.id, "correct horse", "new password")
    assert await users.authenticate("gina@example.org", "correct horse") is None
    assert await users.authenticate("gina@example.org", "new password") == await users.get(user.id)


async def test_concurrent_password_changes_never_overwrite_silently(
    users: UserRepository,
) -> None:
    user = await users.register(dto("hank"))
    results = await asyncio.gather(
        users.change_password(user.id, "correct horse", "first password"),
        users.change_password(user.id, "correct horse", "second password"),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) == 1
    assert isinstance(failures[0], Conflict)
    winner = "first password" if results[0] is None else "second password"
    assert await users.authenticate("hank@example.org", winner) is not None


async def test_touch_last_seen(users: UserRepository, make_user: MakeUser) -> None:
    user = await make_user()
    assert user.last_seen is None
    assert await users.touch_last_seen(user.id) is True
    seen = (await users.get(user.id)).last_seen
    assert seen is not None
    assert await users.touch_last_seen(user.id, min_interval=60) is False
    assert (await users.get(user.id)).last_seen == seen
    assert await users.touch_last_seen(user.id, min_interval=0) is True
    with pytest.raises(NotFound):
        await users.touch_last_seen(uuid.uuid4())
    with pytest.raises(InvalidInput):
        await users.touch_last_seen(user.id, min_interval=-1)


async def test_deactivate_and_delete(users: UserRepository, make_user: MakeUser) -> None:
    user = await make_user()
    inactive = await users.deactivate(user.id)
    assert inactive.is_active is False
    assert (await users.deactivate(user.id)).is_active is False
    with pytest.raises(NotFound):
        await users.deactivate(uuid.uuid4())
    assert await users.delete(user.id) is True
    assert await users.delete(user.id) is False
    assert await users.find_by_id(user.id) is None
    with pytest.raises(NotFound):
        await users.get(user.id)
