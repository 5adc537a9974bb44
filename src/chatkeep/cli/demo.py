"""``chatkeep demo``: a short live chat through the facade, checked step by step.

It migrates, creates three users and three rooms (public, private, direct), and plays a
scene: sockets connect, presence, typing, messages sent and edited, a client that drops
and catches up, read receipts, unread counts and a rate-limited burst. Every step states
what it expects; the command exits 0 only if every expectation held.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

import typer
from pydantic import SecretStr
from rich.table import Table

from chatkeep.cli._common import (
    DatabaseUrlOption,
    RedisUrlOption,
    console,
    endpoints,
    load_settings,
    run,
    show_table,
)
from chatkeep.config import Settings
from chatkeep.errors import ChatkeepError, RateLimited
from chatkeep.facade import ChatKeep
from chatkeep.models import CreateRoomDto, CreateUserDto, Message, User
from chatkeep.realtime import MessageCreated, RateLimit
from chatkeep.storage.database import connect
from chatkeep.storage.migrate import Migrator

T = TypeVar("T")

# The demo's burst: a deliberately tight limit so the burst is refused part-way.
DEMO_SEND_LIMIT = RateLimit(limit=5, period=60.0, burst=5)
_PASSWORD = "demo-password-1"  # noqa: S105 - a throwaway password for demo accounts


@dataclass
class _Scene:
    chat: ChatKeep
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    async def timed(self, name: str, work: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await work
        finally:
            self.timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)

    def check(self, step: str, ok: bool, detail: str) -> None:
        self.steps.append((step, ok, detail))
        mark = "[green]ok  [/]" if ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {step}: {detail}", highlight=False)


async def _users(scene: _Scene, tag: str) -> tuple[User, User, User]:
    made = []
    for name in ("alice", "bob", "carol"):
        dto = CreateUserDto(
            email=f"{name}.{tag}@demo.chatkeep.dev", username=f"{name}_{tag}", password=_PASSWORD
        )
        made.append(await scene.timed("register", scene.chat.register(dto)))
    alice, bob, carol = made
    scene.check("users", True, f"registered {', '.join(u.username for u in made)}")
    return alice, bob, carol


async def _play(chat: ChatKeep) -> _Scene:
    scene = _Scene(chat)
    tag = uuid.uuid4().hex[:6]
    alice, bob, carol = await _users(scene, tag)

    general = await scene.timed(
        "create room",
        chat.create_room(CreateRoomDto(name=f"general {tag}", type="public", created_by=alice.id)),
    )
    plans = await scene.timed(
        "create room",
        chat.create_room(CreateRoomDto(name=f"plans {tag}", type="private", created_by=alice.id)),
    )
    direct = await scene.timed("open direct", chat.open_direct(alice.id, bob.id))
    again = await chat.open_direct(bob.id, alice.id)
    for user in (bob, carol):
        await scene.timed("join", chat.join(general.id, user.id))
    await chat.join(plans.id, bob.id, by=alice.id)
    members = await chat.members.members(general.id, asking=alice.id)
    scene.check(
        "rooms",
        again.id == direct.id and members == {alice.id, bob.id, carol.id},
        f"public, private and direct rooms; direct room unique per pair; "
        f"{len(members)} members in general",
    )

    # Sockets and presence: alice on two devices, bob and carol on one each.
    sockets = {
        "a-phone": alice,
        "a-laptop": alice,
        "b-web": bob,
        "c-web": carol,
    }
    for socket_id, user in sockets.items():
        await scene.timed(
            "connect socket",
            chat.connect_socket(user.id, f"{socket_id}-{tag}", rooms=[general.id]),
        )
    online = await chat.presence.in_room(general.id)
    scene.check(
        "presence",
        set(online) == {alice.id, bob.id, carol.id},
        f"{len(online)} users online in general across {len(sockets)} sockets",
    )

    # carol listens to general as another node would.
    listener = await chat.subscribe(general.id)

    await scene.timed("typing", chat.set_typing(general.id, bob.id))
    typers = await chat.typing.typers(general.id)
    scene.check("typing", typers == [bob.id], "bob is typing in general (expires by itself)")

    sent: list[Message] = []
    for author, text in (
        (alice, "Morning all!"),
        (bob, "Morning! Coffee first."),
        (alice, "The deploy is at noon."),
    ):
        sent.append(
            await scene.timed(
                "send",
                chat.send_message(general.id, author.id, text, client_msg_id=f"{tag}-{len(sent)}"),
            )
        )
    duplicate = await chat.send_message(
        general.id, alice.id, "Morning all!", client_msg_id=f"{tag}-0"
    )
    seqs = [m.seq for m in sent]
    scene.check(
        "messages",
        seqs == list(range(seqs[0], seqs[0] + 3)) and duplicate.id == sent[0].id,
        f"3 messages with seq {seqs}; a retried send returned the first message",
    )
    received: list[int] = []
    while len(received) < 3:
        event = await asyncio.wait_for(listener.get(), timeout=5)
        if isinstance(event, MessageCreated):
            received.append(event.seq)
    scene.check("events", received == seqs, f"the subscriber received seq {received} in order")

    edited = await scene.timed(
        "edit", chat.edit_message(sent[2].id, alice.id, "The deploy moved to 1 pm.")
    )
    scene.check("edit", edited.is_edited and edited.seq == sent[2].seq, "alice edited her message")

    # carol drops off; two messages arrive while she is away; she catches up by seq.
    last_seen_seq = seqs[-1]
    await listener.aclose()
    await chat.disconnect_socket(f"c-web-{tag}", rooms=[general.id])
    missed = [
        await chat.send_message(general.id, bob.id, "Anyone seen carol?"),
        await chat.send_message(general.id, alice.id, "She will catch up."),
    ]
    await chat.connect_socket(carol.id, f"c-web2-{tag}", rooms=[general.id])
    page = await scene.timed(
        "catch up", chat.catch_up(general.id, carol.id, after_seq=last_seen_seq)
    )
    caught = [m.seq for m in page.items]
    scene.check(
        "catch-up",
        caught == [m.seq for m in missed],
        f"carol reconnected and caught up {len(caught)} missed messages (seq {caught})",
    )

    # Read state: a watermark per member, receipts derived from it.
    await scene.timed("mark read", chat.mark_read(general.id, bob.id))
    # Repository calls of your own run acting as a user, like the facade's flows.
    async with chat.acting_as(carol.id):
        await chat.messages.mark_message_read(sent[0].id, carol.id)
    async with chat.acting_as(alice.id):
        readers = {r.user_id for r in await chat.messages.read_by(sent[0].id)}
    unread = await scene.timed("unread counts", chat.unread_counts(carol.id))
    scene.check(
        "read receipts",
        readers == {bob.id, carol.id},
        "bob read everything, carol saw the first message",
    )
    scene.check(
        "unread counts",
        unread.get(general.id) == len(sent) + len(missed) and unread.get(plans.id) is None,
        f"carol has {unread.get(general.id)} unread in general (one query for all rooms)",
    )

    # A burst from carol (who has sent nothing yet): the send limit lets a burst through,
    # then refuses with a retry-after.
    allowed = refused = 0
    retry_after = 0.0
    for n in range(10):
        try:
            await scene.timed("send", chat.send_message(general.id, carol.id, f"ping {n}"))
            allowed += 1
        except RateLimited as exc:
            refused += 1
            retry_after = exc.retry_after
    scene.check(
        "rate limit",
        allowed == DEMO_SEND_LIMIT.effective_burst and refused == 10 - allowed,
        f"burst of 10: {allowed} sent, {refused} refused (retry after {retry_after:.1f} s)",
    )

    for socket_id in ("a-phone", "a-laptop", "b-web"):
        await chat.disconnect_socket(f"{socket_id}-{tag}", rooms=[general.id])
    await chat.disconnect_socket(f"c-web2-{tag}", rooms=[general.id])
    alice_now = await chat.users.find_by_id(alice.id)
    scene.check(
        "last seen",
        alice_now is not None and alice_now.last_seen is not None,
        "last_seen written to PostgreSQL when alice's last socket closed",
    )
    return scene


async def _counts(url: str, settings: Settings) -> list[tuple[str, int]]:
    # Whole-table counts are system work: the application role sees only what its acting
    # user may, so they are read as the migrator.
    conn = await connect(url, settings, operation="demo counts")
    try:
        out = []
        for table in ("users", "rooms", "room_users", "messages", "message_read_status"):
            value = await conn.fetchval(f"SELECT count(*) FROM {table}")
            out.append((table, int(value)))
        return out
    finally:
        await conn.close()


def _summary(scene: _Scene, counts: list[tuple[str, int]]) -> None:
    stored = Table("table", "rows", title="stored in PostgreSQL")
    for table, n in counts:
        stored.add_row(table, str(n))
    latency = Table("operation", "calls", "median ms", "max ms", title="latencies seen")
    for name, values in scene.timings.items():
        latency.add_row(
            name, str(len(values)), f"{statistics.median(values):.2f}", f"{max(values):.2f}"
        )
    show_table(stored)
    show_table(latency)


def demo(
    database_url: DatabaseUrlOption = None,
    redis_url: RedisUrlOption = None,
    node_id: Annotated[str, typer.Option(help="Node id of this demo process.")] = "demo",
) -> None:
    """Migrate, then play a short live chat through the facade and check every step."""
    settings = load_settings(database_url, redis_url)
    with endpoints(settings) as found:

        async def go() -> tuple[_Scene, list[tuple[str, int]]]:
            async with Migrator.connect(
                settings, database_url=found.migrate_database_url
            ) as migrator:
                applied = await migrator.up()
            console.print(f"schema current ({len(applied)} migration(s) applied now)")
            # The embedded servers are already running: hand their URLs on.
            live = settings.model_copy(
                update={
                    "database_url": SecretStr(found.database_url),
                    "redis_url": SecretStr(found.redis_url),
                }
            )
            async with ChatKeep.connect(live, node_id=node_id, send_limit=DEMO_SEND_LIMIT) as chat:
                scene = await _play(chat)
            return scene, await _counts(found.migrate_database_url, settings)

        try:
            scene, counts = run(go())
        except ChatkeepError as exc:  # pragma: no cover - run() already reports these
            console.print(f"[bold red]demo failed:[/] {exc}")
            raise typer.Exit(1) from exc
    _summary(scene, counts)
    failed = [s for s in scene.steps if not s[1]]
    if failed:
        console.print(f"[bold red]{len(failed)} step(s) failed[/]")
        raise typer.Exit(1)
    console.print(f"[bold green]all {len(scene.steps)} steps did what they should[/]")
