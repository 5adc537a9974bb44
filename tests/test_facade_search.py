"""Full-text search (``ChatKeep.search``) against real PostgreSQL, as ``chatapp_app``."""

from __future__ import annotations

import asyncio
import html
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from chatkeep import (
    ChatKeep,
    ConfigurationError,
    CreateRoomDto,
    CreateUserDto,
    InvalidInput,
    Room,
    SearchHit,
    SearchPage,
    Settings,
    User,
)
from chatkeep.models import SNIPPET_START, SNIPPET_STOP
from chatkeep.realtime import RateLimit
from chatkeep.storage.search import MAX_QUERY_LENGTH, MAX_QUERY_TERMS, check_query

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 10
# Tests send dozens of messages in a burst: the default send limit would stop them.
UNLIMITED = RateLimit(limit=10_000, period=1.0)
OPTIONS = {"bcrypt_rounds": ROUNDS, "send_limit": UNLIMITED}


@pytest_asyncio.fixture(loop_scope="session")
async def chat(
    make_settings: Callable[..., Settings], app_url: str, redis_url: str
) -> AsyncIterator[ChatKeep]:
    """A facade connected as ``chatapp_app``: row security binds every search."""
    settings = make_settings(database_url=app_url)
    async with ChatKeep.connect(
        settings, node_id="node-a", bcrypt_rounds=ROUNDS, send_limit=UNLIMITED
    ) as facade:
        yield facade


@dataclass(frozen=True)
class World:
    """alice owns public ``general`` and private ``secret``; bob is in general only;
    carol is in no room."""

    alice: User
    bob: User
    carol: User
    general: Room
    secret: Room


async def register(chat: ChatKeep, name: str) -> User:
    return await chat.register(
        CreateUserDto(email=f"{name}@example.org", username=name, password="correct horse")
    )


@pytest_asyncio.fixture(loop_scope="session")
async def world(chat: ChatKeep) -> World:
    alice, bob, carol = [await register(chat, n) for n in ("alice", "bob", "carol")]
    general = await chat.create_room(CreateRoomDto(name="general", created_by=alice.id))
    secret = await chat.create_room(
        CreateRoomDto(name="secret", type="private", created_by=alice.id)
    )
    await chat.join(general.id, bob.id)
    return World(alice, bob, carol, general, secret)


async def all_pages(
    chat: ChatKeep, user: uuid.UUID, query: str, *, limit: int, **options: object
) -> list[SearchPage]:
    pages = [await chat.search(user, query, limit=limit, **options)]  # type: ignore[arg-type]
    while pages[-1].next is not None:
        pages.append(
            await chat.search(user, query, limit=limit, cursor=pages[-1].next, **options)  # type: ignore[arg-type]
        )
        assert len(pages) < 100
    return pages


async def test_finds_matching_messages_newest_first_with_snippets(
    chat: ChatKeep, world: World
) -> None:
    a = await chat.send_message(world.general.id, world.alice.id, "the quarterly report is late")
    await chat.send_message(world.general.id, world.bob.id, "lunch at noon?")
    b = await chat.send_message(world.general.id, world.bob.id, "Report: quarterly numbers up")
    page = await chat.search(world.bob.id, "quarterly report")
    assert [h.id for h in page.items] == [b.id, a.id]
    assert page.next is None
    assert page.items[0].rank is None
    assert page.items[0].content == "Report: quarterly numbers up"
    snippet = page.items[0].snippet
    assert f"{SNIPPET_START}Report{SNIPPET_STOP}" in snippet
    assert f"{SNIPPET_START}quarterly{SNIPPET_STOP}" in snippet
    assert f"{SNIPPET_START}numbers" not in snippet
    # Words are matched whole and case-insensitively; no stemming with 'simple'.
    assert [h.id for h in (await chat.search(world.alice.id, "REPORT")).items] == [b.id, a.id]
    assert (await chat.search(world.alice.id, "reports")).items == ()
    # websearch syntax: quotes for phrases, "or", a leading minus.
    assert [h.id for h in (await chat.search(world.alice.id, '"quarterly report"')).items] == [a.id]
    assert [h.id for h in (await chat.search(world.alice.id, "report -late")).items] == [b.id]
    found = await chat.search(world.alice.id, "lunch or late")
    assert len(found.items) == 2


async def test_hits_carry_their_thread_root(chat: ChatKeep, world: World) -> None:
    """A reply found by search names its thread's root (so a client can open the thread);
    a root, or a message outside any thread, carries ``None``. Both orders."""
    root = await chat.send_message(world.general.id, world.alice.id, "the otter thread")
    reply = await chat.send_message(
        world.general.id, world.bob.id, "an otter reply", reply_to=root.id
    )
    # A reply to a reply belongs to the root's thread (threads are one level deep).
    nested = await chat.send_message(
        world.general.id, world.alice.id, "otter again", reply_to=reply.id
    )
    for order in ("newest", "rank"):
        page = await chat.search(world.bob.id, "otter", order=order)
        found = {h.id: h.reply_to for h in page.items}
        assert found == {root.id: None, reply.id: root.id, nested.id: root.id}


async def test_hits_carry_every_field_of_their_model(chat: ChatKeep, world: World) -> None:
    """The search statement names every field of ``SearchHit``: a field it left out would
    silently read as its default (``reply_to`` did, before it was selected)."""
    await chat.send_message(world.general.id, world.alice.id, "every field of a walrus")
    (hit,) = (await chat.search(world.alice.id, "walrus", order="rank")).items
    assert set(vars(hit)) == {f.name for f in fields(SearchHit)}


async def test_snippet_markers_in_the_content_are_never_taken_for_matches(
    chat: ChatKeep, world: World
) -> None:
    text = f"fake {SNIPPET_START}mark{SNIPPET_STOP} and a real needle"
    await chat.send_message(world.general.id, world.alice.id, text)
    (hit,) = (await chat.search(world.alice.id, "needle")).items
    assert hit.content == text
    assert hit.snippet.count(SNIPPET_START) == 1
    assert f"{SNIPPET_START}needle{SNIPPET_STOP}" in hit.snippet


async def test_outsiders_and_non_members_see_nothing(chat: ChatKeep, world: World) -> None:
    await chat.send_message(world.secret.id, world.alice.id, "launch codes zebra")
    await chat.send_message(world.general.id, world.alice.id, "public zebra")
    assert len((await chat.search(world.alice.id, "zebra")).items) == 2
    bob_sees = await chat.search(world.bob.id, "zebra")
    assert [h.content for h in bob_sees.items] == ["public zebra"]
    assert (await chat.search(world.carol.id, "zebra")).items == ()
    # Asking for a room you are not in is an empty page, as a room with no match is.
    assert (await chat.search(world.bob.id, "zebra", room_id=world.secret.id)).items == ()
    assert (await chat.search(world.bob.id, "zebra", room_id=uuid.uuid4())).items == ()
    # A user id that does not exist finds nothing either.
    assert (await chat.search(uuid.uuid4(), "zebra")).items == ()


async def test_the_server_function_returns_nothing_without_an_acting_user(
    app_url: str, chat: ChatKeep, world: World
) -> None:
    await chat.send_message(world.general.id, world.alice.id, "orphan walrus")
    conn = await asyncpg.connect(app_url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM chatkeep_search_messages('simple', 'walrus', NULL, NULL, NULL,"
            " NULL, false, NULL, NULL, NULL, 10)"
        )
        assert rows == []
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.user_id', $1, true)", str(world.carol.id))
            assert (
                await conn.fetch(
                    "SELECT * FROM chatkeep_search_messages('simple', 'walrus', NULL, NULL,"
                    " NULL, NULL, false, NULL, NULL, NULL, 10)"
                )
                == []
            )
    finally:
        await conn.close()


async def test_filters_by_room_author_and_dates(
    chat: ChatKeep, world: World, conn: asyncpg.Connection
) -> None:
    m1 = await chat.send_message(world.general.id, world.alice.id, "otter one")
    m2 = await chat.send_message(world.general.id, world.bob.id, "otter two")
    m3 = await chat.send_message(world.secret.id, world.alice.id, "otter three")
    # Spread the messages over three days (as the owner: the app may not move created_at).
    day = datetime(2026, 1, 10, tzinfo=UTC)
    for offset, m in enumerate((m1, m2, m3)):
        await conn.execute(
            "UPDATE messages SET created_at = $2 WHERE id = $1", m.id, day + timedelta(days=offset)
        )

    async def ids(**options: object) -> list[uuid.UUID]:
        page = await chat.search(world.alice.id, "otter", **options)  # type: ignore[arg-type]
        return [h.id for h in page.items]

    assert await ids() == [m3.id, m2.id, m1.id]
    assert await ids(room_id=world.general.id) == [m2.id, m1.id]
    assert await ids(author_id=world.alice.id) == [m3.id, m1.id]
    assert await ids(room_id=world.general.id, author_id=world.alice.id) == [m1.id]
    assert await ids(since=day + timedelta(days=1)) == [m3.id, m2.id]
    assert await ids(until=day + timedelta(days=1)) == [m1.id]
    assert await ids(since=day + timedelta(days=1), until=day + timedelta(days=2)) == [m2.id]


async def test_pages_have_no_duplicates_and_no_gaps(chat: ChatKeep, world: World) -> None:
    sent = [
        await chat.send_message(world.general.id, world.alice.id, f"heron number {i}")
        for i in range(23)
    ]
    await chat.send_message(world.general.id, world.alice.id, "unrelated")
    for order in ("newest", "rank"):
        pages = await all_pages(chat, world.bob.id, "heron", limit=5, order=order)
        assert [len(p.items) for p in pages] == [5, 5, 5, 5, 3]
        ids = [h.id for p in pages for h in p.items]
        assert sorted(ids) == sorted(m.id for m in sent)
        assert len(set(ids)) == len(ids)
        if order == "newest":
            assert ids == [m.id for m in reversed(sent)]
    # A message sent while paging newest-first is not in the older pages.
    first = await chat.search(world.bob.id, "heron", limit=5)
    await chat.send_message(world.general.id, world.alice.id, "heron late")
    second = await chat.search(world.bob.id, "heron", limit=5, cursor=first.next)
    assert "heron late" not in [h.content for h in second.items]
    assert second.items[0].id == sent[-6].id


async def test_rank_order_puts_better_matches_first(chat: ChatKeep, world: World) -> None:
    weak = await chat.send_message(
        world.general.id, world.alice.id, "a long message about many things and one falcon"
    )
    strong = await chat.send_message(world.general.id, world.alice.id, "falcon falcon falcon")
    mid = await chat.send_message(world.general.id, world.alice.id, "falcon and falcon")
    page = await chat.search(world.alice.id, "falcon", order="rank")
    assert [h.id for h in page.items] == [strong.id, mid.id, weak.id]
    ranks = [h.rank for h in page.items]
    assert all(r is not None for r in ranks)
    assert ranks == sorted(ranks, reverse=True)  # type: ignore[type-var]
    # Ranked pages continue from the cursor, ties included.
    one = await chat.search(world.alice.id, "falcon", order="rank", limit=1)
    two = await chat.search(world.alice.id, "falcon", order="rank", limit=2, cursor=one.next)
    assert [h.id for h in one.items + two.items] == [strong.id, mid.id, weak.id]


async def test_deleted_messages_are_never_found(chat: ChatKeep, world: World) -> None:
    m = await chat.send_message(world.general.id, world.bob.id, "ephemeral platypus")
    assert [h.id for h in (await chat.search(world.alice.id, "platypus")).items] == [m.id]
    assert await chat.delete_message(m.id, world.bob.id)
    assert (await chat.search(world.alice.id, "platypus")).items == ()
    assert (await chat.search(world.alice.id, "platypus", order="rank")).items == ()


async def test_edited_messages_are_found_by_their_new_words_only(
    chat: ChatKeep, world: World
) -> None:
    m = await chat.send_message(world.general.id, world.bob.id, "meet at the badger")
    await chat.edit_message(m.id, world.bob.id, "meet at the lighthouse")
    assert (await chat.search(world.alice.id, "badger")).items == ()
    (hit,) = (await chat.search(world.alice.id, "lighthouse")).items
    assert hit.id == m.id
    assert hit.is_edited


@pytest.mark.parametrize(
    "query",
    [
        "a & b | !c",
        "(((",
        "foo:* <-> bar",
        "!!!",
        "'unterminated",
        '"',
        "-",
        "or or and",
        "\\ ' : * & | ! ( ) < - >",
        "a <2> b",
        "😀 🎉",
    ],
)
async def test_queries_full_of_operators_never_raise(
    chat: ChatKeep, world: World, query: str
) -> None:
    await chat.send_message(world.general.id, world.alice.id, "a b c foo bar or and")
    page = await chat.search(world.alice.id, query)
    assert isinstance(page, SearchPage)
    ranked = await chat.search(world.alice.id, query, order="rank")
    assert isinstance(ranked, SearchPage)


async def test_operator_characters_are_read_as_punctuation(chat: ChatKeep, world: World) -> None:
    m = await chat.send_message(world.general.id, world.alice.id, "alpha beta gamma")
    assert [h.id for h in (await chat.search(world.alice.id, "alpha & beta")).items] == [m.id]
    assert [h.id for h in (await chat.search(world.alice.id, "!alpha")).items] == [m.id]
    assert (await chat.search(world.alice.id, "!!! ((( &&&")).items == ()


async def test_cjk_runs_are_single_tokens_with_the_simple_configuration(
    chat: ChatKeep, world: World
) -> None:
    # 'simple' splits on spaces and punctuation only: an unspaced CJK run is one token, so
    # it is found by the whole run, or by a part set off with spaces or punctuation, never
    # by a word inside the run (docs/design.md, "Search": what to use instead).
    m = await chat.send_message(world.general.id, world.alice.id, "東京都の天気は晴れ、明日は雨")
    assert [h.id for h in (await chat.search(world.alice.id, "東京都の天気は晴れ")).items] == [m.id]
    assert [h.id for h in (await chat.search(world.alice.id, "明日は雨")).items] == [m.id]
    assert (await chat.search(world.alice.id, "東京")).items == ()
    assert (await chat.search(world.alice.id, "天気")).items == ()
    spaced = await chat.send_message(world.general.id, world.alice.id, "東京 天気")
    assert [h.id for h in (await chat.search(world.alice.id, "天気")).items] == [spaced.id]
    # Other scripts with spaces work as words, without stemming.
    ru = await chat.send_message(world.general.id, world.alice.id, "Привет, мир!")
    assert [h.id for h in (await chat.search(world.alice.id, "мир")).items] == [ru.id]


@pytest.mark.parametrize(
    ("call", "field", "rule"),
    [
        ({"query": ""}, "query", "must not be empty"),
        ({"query": "  \t\n "}, "query", "must not be empty"),
        ({"query": "x" * (MAX_QUERY_LENGTH + 1)}, "query", "at most 256 characters"),
        ({"query": " ".join(["w"] * (MAX_QUERY_TERMS + 1))}, "query", "at most 32 terms"),
        ({"query": "a\x00b"}, "query", "must not contain NUL characters"),
        ({"query": 42}, "query", "must be a string"),
        ({"room_id": "nope"}, "room_id", None),
        ({"author_id": 7}, "author_id", None),
        ({"since": datetime(2026, 1, 1)}, "since", "a timezone-aware datetime"),
        ({"until": "2026-01-01"}, "until", "a timezone-aware datetime"),
        (
            {"since": datetime(2026, 1, 2, tzinfo=UTC), "until": datetime(2026, 1, 1, tzinfo=UTC)},
            "until",
            "must be later than since",
        ),
        ({"order": "oldest"}, "order", "'newest' or 'rank'"),
        ({"limit": 0}, "limit", "an integer from 1 to 100"),
        ({"limit": 101}, "limit", "an integer from 1 to 100"),
        ({"limit": True}, "limit", "an integer from 1 to 100"),
        ({"cursor": "garbage!"}, "cursor", None),
        ({"cursor": "A" * 200}, "cursor", "malformed"),
    ],
)
async def test_bad_input_is_refused_with_the_field_and_rule(
    chat: ChatKeep, world: World, call: dict[str, object], field: str, rule: str | None
) -> None:
    options = dict(call)
    query = options.pop("query", "hello")
    with pytest.raises(InvalidInput) as caught:
        await chat.search(world.alice.id, query, **options)  # type: ignore[arg-type]
    assert caught.value.field == field
    if rule is not None:
        assert caught.value.rule == rule
    with pytest.raises(InvalidInput) as bad_user:
        await chat.search("nobody", "hello")  # type: ignore[arg-type]
    assert bad_user.value.field == "user_id"


async def test_cursors_are_checked(chat: ChatKeep, world: World) -> None:
    for i in range(3):
        await chat.send_message(world.general.id, world.alice.id, f"lynx {i}")
    first = await chat.search(world.alice.id, "lynx", limit=1)
    assert first.next is not None
    # Another query, filter or order: refused, not silently mixed.
    with pytest.raises(InvalidInput, match="another search") as other:
        await chat.search(world.alice.id, "other", limit=1, cursor=first.next)
    assert other.value.field == "cursor"
    with pytest.raises(InvalidInput, match="another search"):
        await chat.search(world.alice.id, "lynx", order="rank", cursor=first.next)
    with pytest.raises(InvalidInput, match="another search"):
        await chat.search(world.alice.id, "lynx", room_id=world.general.id, cursor=first.next)
    # An edited cursor fails its tag.
    tampered = first.next[:-3] + ("A" if first.next[-3] != "A" else "B") + first.next[-2:]
    with pytest.raises(InvalidInput, match=r"tampered|malformed"):
        await chat.search(world.alice.id, "lynx", cursor=tampered)
    # The same search with surrounding spaces is the same search.
    again = await chat.search(world.alice.id, "  lynx ", limit=1, cursor=first.next)
    assert len(again.items) == 1


async def test_check_query_trims() -> None:
    assert check_query("  two words ") == "two words"


async def test_an_unknown_search_configuration_is_a_configuration_error(
    make_settings: Callable[..., Settings], app_url: str, world: World, chat: ChatKeep
) -> None:
    settings = make_settings(database_url=app_url, search_config="klingon")
    async with ChatKeep.connect(
        settings, node_id="node-b", bcrypt_rounds=ROUNDS, send_limit=UNLIMITED
    ) as other:
        with pytest.raises(ConfigurationError) as caught:
            await other.search(world.alice.id, "hello")
    assert caught.value.field == "search_config"
    with pytest.raises(ConfigurationError, match="search_config"):
        make_settings(database_url=app_url, search_config="simple; drop table x")


async def test_another_configuration_works_once_it_has_its_index(
    make_settings: Callable[..., Settings],
    app_url: str,
    world: World,
    chat: ChatKeep,
    conn: asyncpg.Connection,
) -> None:
    # The documented switch: an index on the new configuration, then the setting.
    await conn.execute(
        "CREATE INDEX messages_content_english_idx ON messages"
        " USING gin (to_tsvector('english'::regconfig, content))"
    )
    m = await chat.send_message(world.general.id, world.alice.id, "the ponies were running")
    settings = make_settings(database_url=app_url, search_config="english")
    async with ChatKeep.connect(
        settings, node_id="node-c", bcrypt_rounds=ROUNDS, send_limit=UNLIMITED
    ) as english:
        (hit,) = (await english.search(world.bob.id, "pony runs")).items
        assert hit.id == m.id
        plan = await conn.fetch(
            "EXPLAIN SELECT 1 FROM messages"
            " WHERE to_tsvector('english'::regconfig, content) @@ 'pony'::tsquery"
        )
        assert "messages_content_english_idx" in "\n".join(r[0] for r in plan)
    assert (await chat.search(world.bob.id, "pony runs")).items == ()


async def test_searches_run_concurrently(chat: ChatKeep, world: World) -> None:
    await chat.send_message(world.general.id, world.alice.id, "concurrent ibis")
    pages = await asyncio.gather(*(chat.search(world.bob.id, "ibis") for _ in range(10)))
    assert all(len(p.items) == 1 for p in pages)


def test_the_benchmark_runs_in_its_tiny_mode(admin_url: str) -> None:
    name = f"chatkeep_bench_search_h5_t{os.getpid()}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'benchmarks'}"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_search.py"),
            "--tiny",
            "--drop",
            "--database-url",
            admin_url,
            "--database-name",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "messages: 5,000; rooms of the user: 5 of 20" in done.stdout
    assert "index build (CREATE INDEX CONCURRENTLY)" in done.stdout
    assert "ratio with/without" in done.stdout
    assert done.stdout.count("p50") >= 2


async def test_the_tutorial_example(chat: ChatKeep, world: World) -> None:
    alice, room = world.alice, world.general
    await chat.send_message(room.id, alice.id, "the blue heron is back")
    await chat.send_message(room.id, alice.id, "a grey heron today")
    # --8<-- [start:search]
    page = await chat.search(alice.id, "heron -grey", room_id=room.id, limit=20)
    for hit in page.items:
        shown = html.escape(hit.snippet)  # plain text: escape it like any content
        shown = shown.replace(SNIPPET_START, "<mark>").replace(SNIPPET_STOP, "</mark>")
        print(hit.created_at, shown)  # ... the blue <mark>heron</mark> is back
    if page.next is not None:  # the same search, next page
        page = await chat.search(alice.id, "heron -grey", room_id=room.id, cursor=page.next)
    # --8<-- [end:search]
    first = await chat.search(alice.id, "heron -grey", room_id=room.id)
    assert [h.content for h in first.items] == ["the blue heron is back"]
    assert shown == "the blue <mark>heron</mark> is back"
