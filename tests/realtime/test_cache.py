from __future__ import annotations

import asyncio
import logging
from uuid import UUID, uuid4

import pytest
from pydantic import BaseModel

from chatkeep.errors import InvalidInput, Unavailable
from chatkeep.realtime import (
    JsonSerializer,
    ReadThroughCache,
    RedisClient,
    RoomMembersCache,
    Unshared,
    UserProfileCache,
)
from tests.realtime.conftest import ClientFactory, wait_until


class Profile(BaseModel):
    id: UUID
    display_name: str


class FakeTable:
    """Stands in for PostgreSQL: rows by id, and a count of reads."""

    def __init__(self) -> None:
        self.rows: dict[UUID, Profile] = {}
        self.reads = 0

    async def load(self, ident: UUID) -> Profile | None:
        self.reads += 1
        return self.rows.get(ident)

    def add(self, name: str) -> Profile:
        profile = Profile(id=uuid4(), display_name=name)
        self.rows[profile.id] = profile
        return profile


def profile_cache(
    client: RedisClient, table: FakeTable, **options: float
) -> UserProfileCache[Profile]:
    return UserProfileCache(client, table.load, JsonSerializer(Profile), **options)


async def test_read_through_hits_after_the_first_miss(client: RedisClient) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(client, table)
    assert await cache.get(alice.id) == alice
    assert await cache.get(alice.id) == alice
    assert table.reads == 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.fills) == (1, 1, 1)
    assert cache.namespace == "user"
    assert 0 < await client.redis.pttl(cache.key(alice.id)) <= 300_000


async def test_entries_expire(client: RedisClient) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(client, table, ttl=0.1)
    await cache.get(alice.id)
    await asyncio.sleep(0.15)
    await cache.get(alice.id)
    assert table.reads == 2


async def test_invalidation_makes_the_next_read_fresh(client: RedisClient) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(client, table)
    await cache.get(alice.id)
    renamed = alice.model_copy(update={"display_name": "Alicia"})
    table.rows[alice.id] = renamed
    assert await cache.get(alice.id) == alice  # stale until invalidated
    assert await cache.invalidate(alice.id)
    assert await cache.get(alice.id) == renamed
    assert await cache.invalidate() is True


async def test_an_invalidation_during_a_slow_load_is_not_undone(client: RedisClient) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    loading, release = asyncio.Event(), asyncio.Event()

    async def slow_loader(ident: UUID) -> Profile | None:
        old = table.rows.get(ident)
        loading.set()
        await release.wait()
        return old  # read before the write below committed

    cache = UserProfileCache(client, slow_loader, JsonSerializer(Profile))
    reader = asyncio.create_task(cache.get(alice.id))
    await loading.wait()
    table.rows[alice.id] = alice.model_copy(update={"display_name": "Alicia"})
    await cache.invalidate(alice.id)  # the writer's invalidation
    release.set()
    got = await reader
    assert got is not None
    assert got.display_name == "Alice"  # the reader got what it read...
    assert not await client.redis.exists(cache.key(alice.id))  # ...but did not cache it
    fresh = profile_cache(client, table)
    assert (await fresh.get(alice.id)) == table.rows[alice.id]


async def test_a_reader_behind_someone_elses_lease_loads_without_filling(
    client: RedisClient,
) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(client, table)
    await client.redis.set(cache.key(alice.id), b"\x00lease:someone", px=5000)
    assert await cache.get(alice.id) == alice
    assert await client.redis.get(cache.key(alice.id)) == b"\x00lease:someone"
    assert cache.stats.fills == 0


async def test_missing_rows_are_not_cached_unless_asked(client: RedisClient) -> None:
    table = FakeTable()
    nobody = uuid4()
    plain = profile_cache(client, table)
    assert await plain.get(nobody) is None
    assert not await client.redis.exists(plain.key(nobody))
    negative = profile_cache(client, table, negative_ttl=5)
    assert await negative.get(nobody) is None
    assert await negative.get(nobody) is None
    assert table.reads == 2  # one for plain, one for negative; the last was a hit
    assert negative.stats.hits == 1


async def test_an_unreadable_entry_is_replaced(
    client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(client, table)
    await client.redis.set(cache.key(alice.id), b'{"old": "format"}')
    with caplog.at_level(logging.WARNING, logger="chatkeep.realtime.cache"):
        assert await cache.get(alice.id) == alice
    assert "unreadable" in caplog.text
    assert await cache.get(alice.id) == alice
    assert table.reads == 1


async def test_a_failing_loader_propagates_and_gives_the_lease_back(client: RedisClient) -> None:
    async def broken(ident: UUID) -> Profile | None:
        raise RuntimeError("postgres down")

    cache = UserProfileCache(client, broken, JsonSerializer(Profile))
    ident = uuid4()
    with pytest.raises(RuntimeError):
        await cache.get(ident)
    assert not await client.redis.exists(cache.key(ident))


async def test_get_many_mixes_hits_and_loads(client: RedisClient) -> None:
    table = FakeTable()
    people = [table.add(name) for name in ("a", "b", "c")]
    cache = profile_cache(client, table, negative_ttl=5)
    await cache.get(people[0].id)
    nobody = uuid4()
    await cache.get(nobody)
    found = await cache.get_many([p.id for p in people] + [nobody, people[0].id])
    assert found == {p.id: p for p in people}
    assert table.reads == 4  # a and nobody once each before, b and c now
    assert await cache.get_many([]) == {}


async def test_redis_down_degrades_to_the_loader(
    make_client: ClientFactory, dead_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(await make_client(dead_url), table)
    with caplog.at_level(logging.WARNING, logger="chatkeep.realtime.cache"):
        assert await cache.get(alice.id) == alice
        assert await cache.get(alice.id) == alice
        assert await cache.get_many([alice.id]) == {alice.id: alice}
    assert table.reads == 3
    assert caplog.text.count("degraded") == 1  # once per outage, not per call
    assert await cache.invalidate(alice.id) is False
    assert cache.stats.errors >= 4


async def test_the_cache_recovers_when_redis_returns(
    make_client: ClientFactory, throwaway_redis: object, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.servers import RedisServer

    assert isinstance(throwaway_redis, RedisServer)
    table = FakeTable()
    alice = table.add("Alice")
    cache = profile_cache(await make_client(throwaway_redis.url), table)
    await asyncio.to_thread(throwaway_redis.stop)
    assert await cache.get(alice.id) == alice
    await asyncio.to_thread(throwaway_redis.start)
    with caplog.at_level(logging.INFO, logger="chatkeep.realtime.cache"):
        assert await cache.get(alice.id) == alice
        assert await cache.get(alice.id) == alice
    assert "served by redis again" in caplog.text
    assert cache.stats.hits == 1


async def test_room_members_cache(client: RedisClient) -> None:
    members: dict[UUID, frozenset[UUID]] = {}
    loads: list[tuple[UUID, UUID | None]] = []

    async def load(
        room: UUID, asking: UUID | None
    ) -> frozenset[UUID] | Unshared[frozenset[UUID]] | None:
        # Like row security: a member sees the whole list, anyone else sees nothing.
        loads.append((room, asking))
        found = members.get(room)
        if found is None or asking is None or asking in found:
            return found
        return Unshared(frozenset())

    cache = RoomMembersCache(client, load)
    room, alice, bob = uuid4(), uuid4(), uuid4()
    members[room] = frozenset({alice})
    assert not await cache.is_member(room, bob)  # bob's view: loaded, not cached
    assert not await cache.is_member(room, bob)
    assert loads == [(room, bob), (room, bob)]
    assert await cache.is_member(room, alice)  # alice's view is the list: cached
    assert await cache.members(room) == {alice}
    # alice's cached list answers alice only: bob is answered by his own view, so he
    # learns neither the list nor that it is cached.
    assert not await cache.is_member(room, bob)
    assert await cache.members(room, asking=bob) == frozenset()
    assert loads[2:] == [(room, alice), (room, bob), (room, bob)]
    members[room] = frozenset({alice, bob})
    assert await cache.invalidate(room)
    assert await cache.is_member(room, bob)
    assert await cache.members(room, asking=alice) == {alice, bob}
    assert await cache.members(uuid4()) == frozenset()
    assert cache.cache.stats.hits == 4
    assert len(loads) == 7
    with pytest.raises(InvalidInput):
        RoomMembersCache(client, "not a loader")  # type: ignore[arg-type]


class FakeRoster:
    """Stands in for PostgreSQL's room_users under row security, with a gate on loads.

    A member sees the whole list; anyone else sees an :class:`Unshared` empty view; a
    user in ``refused`` makes the load raise. While ``gate`` is clear, loads wait on it.
    """

    def __init__(self) -> None:
        self.members: dict[UUID, frozenset[UUID]] = {}
        self.loads: list[tuple[UUID, UUID | None]] = []
        self.refused: set[UUID] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

    async def load(
        self, room: UUID, asking: UUID | None
    ) -> frozenset[UUID] | Unshared[frozenset[UUID]] | None:
        self.loads.append((room, asking))
        found = self.members.get(room)  # read before waiting: the load's snapshot
        self.entered.set()
        await self.gate.wait()
        if asking in self.refused:
            raise Unavailable("the load failed")
        if found is None or asking is None or asking in found:
            return found
        return Unshared(frozenset())


async def settle() -> None:
    """Let every ready task run up to its next real wait."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_room_members_are_a_set_that_answers_with_one_sismember(
    client: RedisClient,
) -> None:
    roster = FakeRoster()
    room = uuid4()
    people = [uuid4() for _ in range(2_500)]  # more than one SADD chunk of the fill
    roster.members[room] = frozenset(people)
    cache = RoomMembersCache(client, roster.load)
    assert await cache.is_member(room, people[0])
    key = cache.key(room)
    # A set, not a serialized list: a check reads one member, never the whole room.
    assert await client.redis.type(key) == b"set"
    assert await client.redis.scard(key) == len(people)
    assert 0 < await client.redis.pttl(key) <= 60_000
    assert all([await cache.is_member(room, p) for p in people[1:50]])
    assert await cache.members(room, asking=people[-1]) == frozenset(people)
    assert len(roster.loads) == 1
    assert (cache.stats.hits, cache.stats.loads, cache.stats.fills) == (50, 1, 1)


async def test_an_older_format_entry_is_replaced_by_a_set(client: RedisClient) -> None:
    roster = FakeRoster()
    room, alice = uuid4(), uuid4()
    roster.members[room] = frozenset({alice})
    cache = RoomMembersCache(client, roster.load)
    # What an earlier version stored there during a rolling upgrade: a JSON list.
    await client.redis.set(cache.key(room), f'["{alice}"]'.encode())
    assert await cache.is_member(room, alice)
    assert await client.redis.type(cache.key(room)) == b"set"
    assert await cache.is_member(room, alice)
    assert len(roster.loads) == 1


async def test_concurrent_misses_share_one_load(client: RedisClient) -> None:
    roster = FakeRoster()
    room = uuid4()
    people = [uuid4() for _ in range(50)]
    outsiders = [uuid4() for _ in range(3)]
    roster.members[room] = frozenset(people)
    cache = RoomMembersCache(client, roster.load)
    roster.gate.clear()
    calls = [asyncio.create_task(cache.is_member(room, p)) for p in people + outsiders]
    await wait_until(lambda: cache.stats.misses == len(calls))  # every one found no set
    await roster.entered.wait()
    await settle()
    roster.gate.set()
    assert await asyncio.gather(*calls) == [True] * 50 + [False] * 3
    # One load for the members; each outsider was read as themselves, not told the list.
    member_loads = [who for _, who in roster.loads if who in people]
    assert len(member_loads) == 1
    assert {who for _, who in roster.loads if who not in people} == set(outsiders)
    assert cache.stats.shared == 49
    # The leader took the fill lease before it loaded: its list is cached.
    assert cache.stats.fills == 1
    assert await client.redis.scard(cache.key(room)) == len(people)
    assert await cache.is_member(room, people[7])
    assert len(roster.loads) == 4


async def test_a_miss_answered_before_a_fill_asks_again_instead_of_loading(
    client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    roster = FakeRoster()
    room, alice = uuid4(), uuid4()
    roster.members[room] = frozenset({alice})
    other_node = RoomMembersCache(client, roster.load)
    assert await other_node.is_member(room, alice)  # filled the set
    cache = RoomMembersCache(client, roster.load)
    real_probe = cache._probe
    answers = [2]  # "no set": an answer Redis gave just before the other node's fill

    async def late_probe(*args: object) -> object:
        return answers.pop() if answers else await real_probe(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "_probe", late_probe)
    assert await cache.is_member(room, alice)
    assert cache.stats.loads == 0  # the lease script saw the set: asked again, a hit
    assert len(roster.loads) == 1


async def test_a_lead_that_is_not_a_members_view_is_not_shared(client: RedisClient) -> None:
    roster = FakeRoster()
    room, alice, bob, otto, ivan = uuid4(), uuid4(), uuid4(), uuid4(), uuid4()
    roster.members[room] = frozenset({alice, bob, ivan})
    roster.refused.add(ivan)
    cache = RoomMembersCache(client, roster.load)
    for leader, fails in ((otto, False), (ivan, True)):
        roster.loads.clear()
        roster.gate.clear()
        roster.entered.clear()
        lead = asyncio.create_task(cache.is_member(room, leader))
        await roster.entered.wait()
        waiters = [asyncio.create_task(cache.is_member(room, u)) for u in (alice, bob)]
        await settle()
        roster.gate.set()
        if fails:
            with pytest.raises(Unavailable):  # the leader's error is its own
                await lead
        else:
            assert not await lead  # an outsider's view: answered, neither shared nor cached
        assert await asyncio.gather(*waiters) == [True, True]
        assert [who for _, who in roster.loads] == [leader, alice, bob]
        assert await cache.invalidate(room)


async def test_a_cancelled_waiter_leaves_the_load_to_the_others(client: RedisClient) -> None:
    roster = FakeRoster()
    room, alice, bob = uuid4(), uuid4(), uuid4()
    roster.members[room] = frozenset({alice, bob})
    cache = RoomMembersCache(client, roster.load)
    roster.gate.clear()
    lead = asyncio.create_task(cache.is_member(room, alice))
    await roster.entered.wait()
    quitter = asyncio.create_task(cache.is_member(room, bob))
    stayer = asyncio.create_task(cache.is_member(room, bob))
    await settle()
    quitter.cancel()
    await settle()
    roster.gate.set()
    assert await lead
    assert await stayer
    assert quitter.cancelled()
    assert len(roster.loads) == 1


async def test_an_invalidation_during_a_load_keeps_its_list_out(client: RedisClient) -> None:
    roster = FakeRoster()
    room, alice, bob = uuid4(), uuid4(), uuid4()
    roster.members[room] = frozenset({alice, bob})
    cache = RoomMembersCache(client, roster.load)
    roster.gate.clear()
    stale = asyncio.create_task(cache.is_member(room, alice))  # reads {alice, bob}
    await roster.entered.wait()
    roster.members[room] = frozenset({alice})  # bob removed, committed...
    assert await cache.invalidate(room)  # ...and invalidated while the load runs
    roster.entered.clear()
    # A call after the invalidation does not wait for the load that began before it.
    bob_now = asyncio.create_task(cache.is_member(room, bob))
    await roster.entered.wait()
    assert [who for _, who in roster.loads] == [alice, bob]
    roster.gate.set()
    assert await stale
    assert not await bob_now
    # The list read before the invalidation was not stored: bob is not a cached member.
    assert not await client.redis.exists(cache.key(room))
    assert not await cache.is_member(room, bob)
    assert await cache.is_member(room, alice)
    assert await cache.members(room) == {alice}


async def test_room_members_degrade_to_one_load_when_redis_is_down(
    make_client: ClientFactory, dead_url: str
) -> None:
    roster = FakeRoster()
    room, alice, bob = uuid4(), uuid4(), uuid4()
    roster.members[room] = frozenset({alice, bob})
    cache = RoomMembersCache(await make_client(dead_url), roster.load)
    roster.gate.clear()
    calls = [asyncio.create_task(cache.is_member(room, u)) for u in (alice, bob, alice)]
    await wait_until(lambda: cache.stats.misses == len(calls))  # every probe failed
    await roster.entered.wait()
    await settle()
    roster.gate.set()
    assert await asyncio.gather(*calls) == [True, True, True]
    assert len(roster.loads) == 1
    assert cache.stats.errors >= 3
    assert not await cache.invalidate(room)
    assert await cache.members(room, asking=bob) == {alice, bob}


async def test_room_members_refuse_ids_that_are_not_uuids(client: RedisClient) -> None:
    cache = RoomMembersCache(client, FakeRoster().load)
    for call in (
        cache.is_member("r", uuid4()),  # type: ignore[arg-type]
        cache.is_member(uuid4(), "u"),  # type: ignore[arg-type]
        cache.members(uuid4(), asking="u"),  # type: ignore[arg-type]
        cache.invalidate("r"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidInput) as caught:
            await call
        assert caught.value.field in ("room_id", "room_ids", "user_id", "asking")


def test_bad_options_are_refused(client: RedisClient) -> None:
    table = FakeTable()
    with pytest.raises(InvalidInput) as caught:
        ReadThroughCache(client, "Bad Name", loader=table.load, serializer=JsonSerializer(Profile))
    assert caught.value.field == "namespace"
    with pytest.raises(InvalidInput) as caught:
        ReadThroughCache(client, "user", loader="x", serializer=JsonSerializer(Profile))  # type: ignore[arg-type]
    assert caught.value.field == "loader"
    with pytest.raises(InvalidInput) as caught:
        profile_cache(client, table, ttl=0)
    assert caught.value.field == "ttl"


async def test_ids_must_be_uuids(client: RedisClient) -> None:
    cache = profile_cache(client, FakeTable())
    with pytest.raises(InvalidInput) as caught:
        await cache.get("x")  # type: ignore[arg-type]
    assert caught.value.field == "id"


def test_json_serializer_reports_bad_data_as_value_error() -> None:
    serializer: JsonSerializer[Profile] = JsonSerializer(Profile)
    with pytest.raises(ValueError, match="validation"):
        serializer.loads(b'{"id": "nope"}')
    profile = Profile(id=uuid4(), display_name="x")
    assert serializer.loads(serializer.dumps(profile)) == profile


async def test_unavailable_is_never_raised_by_the_cache(
    make_client: ClientFactory, dead_url: str
) -> None:
    table = FakeTable()
    cache = profile_cache(await make_client(dead_url), table)
    try:
        await cache.get(uuid4())
        await cache.invalidate(uuid4())
    except Unavailable:  # pragma: no cover - the assertion below is the point
        pytest.fail("the cache raised Unavailable")
    assert table.reads == 1
