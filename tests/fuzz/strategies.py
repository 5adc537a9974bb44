"""Values no public method should take: wrong types, huge values, malformed text, bad cursors.

Every strategy here draws from what broke (or could break) an entry point before: the
values of issue 11, Redis key metacharacters (``{`` ``}`` hash tags, ``*`` globs), SQL that
looks like an injection, lone surrogates and NUL (which PostgreSQL text refuses), and cursors
edited in each way :func:`chatkeep.storage.messages.decode_cursor` must notice.
"""

from __future__ import annotations

import base64
import math
import struct
import uuid
from typing import Any

from hypothesis import strategies as st

from chatkeep.storage.messages import _CURSOR_FORMAT, _tag, encode_cursor


def deep_list(depth: int) -> list[Any]:
    """``[[[...]]]`` nested ``depth`` times (deeper than the recursion limit, if asked)."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


WRONG_TYPES: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        0,
        -1,
        1.5,
        math.nan,
        math.inf,
        True,
        False,
        b"",
        b"\x00\xff",
        bytearray(b"x"),
        {},
        {"k": "v"},
        [],
        [1],
        set(),
        {1},
        frozenset(),
        (),
        object(),
    ]
) | st.builds(object)

HUGE: st.SearchStrategy[Any] = st.sampled_from(
    [
        "x" * 100_000,
        "{" * 10_000,
        10**100,
        -(10**100),
        2**63,
        2**64,
        1e308,
        deep_list(50),
        deep_list(5_000),
        list(range(10_000)),
    ]
)

MALFORMED: st.SearchStrategy[Any] = st.sampled_from(
    [
        "",
        " ",
        " \t\n ",
        "\x00",
        "a\x00b",
        "\ud800",
        "x\udfffy",
        "not-a-uuid",
        "00000000-0000-0000-0000-00000000000g",
        "0" * 33,
        "'; DROP TABLE users; --",
        "' OR 1=1 --",
        "$1",
        "{room}",
        "{",
        "}",
        "a{b}c",
        "*",
        "user:*",
        "[a-z]?",
        "é",
        "🙂",
        "a b",
        "\n",
    ]
)

ANY_TEXT: st.SearchStrategy[Any] = st.text(max_size=300) | st.binary(max_size=40)
NUMBERS: st.SearchStrategy[Any] = st.integers() | st.floats()
IDS: st.SearchStrategy[Any] = st.uuids() | st.uuids().map(str) | st.uuids().map(lambda u: u.hex)
CONTAINERS: st.SearchStrategy[Any] = st.lists(
    st.none() | st.integers() | st.text(max_size=5) | st.uuids(), max_size=5
) | st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4)


def _pack(room: uuid.UUID, seq: int, *, version: int = 1, direction: bytes = b"a") -> str:
    payload = _CURSOR_FORMAT.pack(version, direction, room.bytes, seq)
    return base64.urlsafe_b64encode(payload + _tag(payload)).rstrip(b"=").decode("ascii")


def tampered_cursors(valid: str, room: uuid.UUID, other_room: uuid.UUID) -> list[str]:
    """Cursors a client could send back instead of ``valid`` (a cursor of ``room``)."""
    raw = base64.urlsafe_b64decode(valid + "=" * (-len(valid) % 4))
    payload = bytearray(raw[: _CURSOR_FORMAT.size])
    payload[-1] ^= 1  # seq changed, tag kept: tampered
    edited = base64.urlsafe_b64encode(bytes(payload) + raw[_CURSOR_FORMAT.size :]).decode()
    return [
        "!!!not base64!!!",
        base64.urlsafe_b64encode(b"garbage that is no cursor").decode(),
        valid[:-3],  # truncated
        valid + "AAAA",  # too long
        valid.rstrip("=") + "=",
        edited,
        encode_cursor(other_room, 1, "after"),  # a valid cursor of another room
        _pack(room, 1, version=2),  # re-encoded with a future version
        _pack(room, 1, direction=b"x"),  # an unknown direction
        _pack(room, -5),  # a negative seq
        _pack(room, 2**63 - 1),  # the largest seq
        "A" * 64,
        "A" * 65,
        struct.pack(">q", 1).hex(),
    ]


def bad_values(cursors: list[str]) -> st.SearchStrategy[Any]:
    """Every kind of bad value, plus the given tampered cursors."""
    return st.one_of(
        WRONG_TYPES,
        HUGE,
        MALFORMED,
        ANY_TEXT,
        NUMBERS,
        IDS,
        CONTAINERS,
        st.sampled_from(cursors),
    )
