from __future__ import annotations

from pathlib import Path
from uuid import UUID, uuid4

import pytest
from redis.crc import key_slot

from chatkeep.errors import InvalidInput
from chatkeep.realtime.keys import MAX_ID_LENGTH, KeySpace, validate_id

ROOT = Path(__file__).resolve().parents[2]
USER = UUID("0190c0de-0000-7000-8000-0000000000aa")
ROOM = UUID("0190c0de-0000-7000-8000-0000000000bb")


def test_default_names_follow_the_specification() -> None:
    keys = KeySpace()
    assert keys.session(USER) == f"session:{USER}"
    assert keys.presence(USER) == f"presence:{USER}"
    assert keys.room_presence(ROOM) == f"room:{ROOM}:presence"
    assert keys.typing(ROOM) == f"typing:{ROOM}"
    assert keys.socket("sock-1") == "socket:sock-1"
    assert keys.refresh(ROOM, "abc") == f"refresh:{ROOM}.abc"
    assert keys.room_events(ROOM) == f"room:{ROOM}:events"
    assert keys.rate_limit("send", "user-1") == "ratelimit:send:user-1"
    assert keys.cache("user", str(USER)) == f"cache:user:{USER}"
    assert keys.presence_deadlines() == "presence:deadlines"


def test_prefix_is_applied_everywhere_and_normalised() -> None:
    with_colon = KeySpace("app:")
    without = KeySpace("app")
    assert with_colon.prefix == without.prefix == "app:"
    assert without.typing(ROOM) == f"app:typing:{ROOM}"
    assert without.presence_deadlines() == "app:presence:deadlines"
    assert without.login_lock("bob") == "app:login:bob:lock"
    assert KeySpace().prefix == ""


@pytest.mark.parametrize("prefix", ["has space", "brace{", "x" * 65])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        KeySpace(prefix)
    assert caught.value.field == "redis_key_prefix"


def test_cluster_mode_puts_a_rooms_keys_in_one_slot() -> None:
    keys = KeySpace("chat", cluster_mode=True)
    assert keys.cluster_mode
    assert keys.typing(ROOM) == f"chat:typing:{{{ROOM}}}"
    room_keys = [
        keys.typing(ROOM),
        keys.room_presence(ROOM),
        keys.room_events(ROOM),
        keys.cache("room_members", str(ROOM)),
    ]
    assert len({key_slot(k.encode()) for k in room_keys}) == 1
    user_keys = [
        keys.session(USER),
        keys.presence(USER),
        keys.user_sockets(USER),
        keys.user_refresh_families(USER),
        keys.cache("user", str(USER)),
    ]
    assert len({key_slot(k.encode()) for k in user_keys}) == 1
    family = uuid4()
    family_keys = [
        keys.refresh(family, "h1"),
        keys.refresh_family(family),
        keys.refresh_family_sessions(family),  # revoked with the family in one script
    ]
    assert len({key_slot(k.encode()) for k in family_keys}) == 1
    account = ["login_failures", "login_lock", "login_lockouts"]
    assert len({key_slot(getattr(keys, name)("bob").encode()) for name in account}) == 1


def test_without_cluster_mode_ids_are_not_tagged() -> None:
    assert "{" not in KeySpace().typing(ROOM)


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "non-empty"),
        ("a b", "whitespace"),
        ("a{b}", "'{'"),
        ("é", "printable"),
        ("x" * (MAX_ID_LENGTH + 1), "at most"),
    ],
)
def test_ids_that_could_break_a_key_are_refused(value: str, rule: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_id(value, "socket_id")
    assert caught.value.field == "socket_id"
    assert rule in caught.value.rule


def test_uuid_arguments_must_be_uuids() -> None:
    with pytest.raises(InvalidInput) as caught:
        KeySpace().session("not-a-uuid")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"


def test_cache_namespace_is_checked() -> None:
    with pytest.raises(InvalidInput) as caught:
        KeySpace().cache("Bad-Name", "x")
    assert caught.value.field == "namespace"


@pytest.mark.parametrize("cluster", [False, True])
def test_event_channel_names_parse_back_to_rooms(cluster: bool) -> None:
    keys = KeySpace("p", cluster_mode=cluster)
    assert keys.room_of_events_channel(keys.room_events(ROOM)) == ROOM
    assert keys.room_of_events_channel(keys.room_presence(ROOM)) is None
    assert keys.room_of_events_channel("p:room:not-a-uuid:events") is None
    assert keys.room_of_events_channel(f"other:room:{ROOM}:events") is None


def test_tagged_channel_without_braces_is_not_a_room() -> None:
    assert KeySpace(cluster_mode=True).room_of_events_channel(f"room:{ROOM}:events") is None


def test_repr_shows_prefix_and_mode() -> None:
    assert repr(KeySpace("a", cluster_mode=True)) == "KeySpace(prefix='a:', cluster_mode=True)"


def test_every_key_pattern_is_documented() -> None:
    page = (ROOT / "docs" / "redis-keys.md").read_text()
    for kind, pattern in KeySpace.patterns().items():
        assert f"`{pattern}`" in page, f"{kind} ({pattern}) is missing from docs/redis-keys.md"
