"""Search cursors and query rules (``chatkeep.storage.search``), without a database.

The searches themselves run against PostgreSQL in ``tests/test_facade_search.py``.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from chatkeep.errors import InvalidInput
from chatkeep.storage import search

AT = datetime(2026, 12, 1, 23, 0, 0, 123456, tzinfo=UTC)
MARK = search._fingerprint("simple", "two words", None, None, None, None)


def forge(version: int, kind: bytes, micros: int) -> str:
    payload = search._CURSOR_FORMAT.pack(version, kind, MARK, 0.5, micros, uuid.uuid4().bytes)
    raw = payload + search._tag(payload)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_cursor_round_trips_exactly() -> None:
    key = uuid.uuid4()
    cursor = search._encode_cursor("rank", MARK, 0.0607927, AT, key)
    rank, at, found = search._decode_cursor(cursor, "rank", MARK)
    assert (at, found) == (AT, key)
    assert rank == pytest.approx(0.0607927)
    # float4 on both sides: the decoded value is the one PostgreSQL compares with.
    again = search._encode_cursor("rank", MARK, rank, at, key)
    assert again == cursor


@pytest.mark.parametrize(
    ("cursor", "rule"),
    [
        (forge(2, b"n", 0), "unknown version"),
        (forge(1, b"r", 0), "belongs to another search (query, filters or order)"),
        (forge(1, b"n", 2**62), "malformed"),
        ("!!!!", "malformed"),
        ("A" * 81, "malformed"),
        ("A" * 5, "malformed"),
        (7, "malformed"),
    ],
)
def test_bad_cursors_are_refused(cursor: object, rule: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        search._decode_cursor(cursor, "newest", MARK)
    assert (caught.value.field, caught.value.rule) == ("cursor", rule)


def test_another_search_is_another_fingerprint() -> None:
    other = search._fingerprint("simple", "two words", uuid.uuid4(), None, None, None)
    cursor = search._encode_cursor("newest", MARK, None, AT, uuid.uuid4())
    with pytest.raises(InvalidInput, match="another search"):
        search._decode_cursor(cursor, "newest", other)


def test_query_rules() -> None:
    assert search.check_query(" a  b ") == "a  b"
    assert search.check_query("x" * search.MAX_QUERY_LENGTH) == "x" * 256
    assert search.check_query(" ".join(["w"] * search.MAX_QUERY_TERMS))
    for bad in ("", " ", "x" * 257, "w " * 33, "\x00", None, b"bytes"):
        with pytest.raises(InvalidInput) as caught:
            search.check_query(bad)
        assert caught.value.field == "query"
