"""Full-text search over the messages a user may see: newest first or ranked, by cursor.

The text match runs in ``chatkeep_search_messages()`` (migration 016), a server function
that can use the GIN index on ``to_tsvector('simple', content)`` where the application
role's own statement cannot (``@@`` is not LEAKPROOF, so under row security PostgreSQL
applies it only after the policy's test, row by row). It returns ids and sort keys of the
acting user's rooms only; the statement here reads those messages back through
``messages``' row security, which decides what the user sees, and makes the snippets.
``docs/design.md`` ("Search") says why, and what each configuration gives each language.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import asyncpg

from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput
from chatkeep.models import SNIPPET_START, SNIPPET_STOP, SearchHit, SearchPage
from chatkeep.storage.base import check_id
from chatkeep.storage.database import Database

__all__ = [
    "DEFAULT_SEARCH_LIMIT",
    "MAX_QUERY_LENGTH",
    "MAX_QUERY_TERMS",
    "MAX_SEARCH_LIMIT",
    "SearchOrder",
    "SearchRepository",
]

SearchOrder = Literal["newest", "rank"]

DEFAULT_SEARCH_LIMIT: Final = 20
MAX_SEARCH_LIMIT: Final = 100
#: Longest query accepted, in characters (after trimming).
MAX_QUERY_LENGTH: Final = 256
#: Most whitespace-separated terms accepted in one query.
MAX_QUERY_TERMS: Final = 32

# ts_headline's options: one extract of 15-35 words around the best match (a short message
# whole), matches between the two private-use markers (removed from the content first, so
# a marker always means a match).
_HEADLINE_OPTIONS: Final = (
    f'StartSel="{SNIPPET_START}", StopSel="{SNIPPET_STOP}", MaxWords=35, MinWords=15'
)

# The function's page (one more row than asked, to know whether another page follows),
# read back through messages' row security. The snippet is made here, for the page only.
# Every field of SearchHit is named: one left out would read as its default (reply_to was,
# until issue 14). reply_to comes from here, not from the function, which returns only
# ids and sort keys: what the user sees of a message stays row security's to decide.
SEARCH: Final = """
SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type, m.is_edited,
       m.edited_at, m.created_at, m.reply_to, s.rank,
       ts_headline($1::regconfig, translate(m.content, $12, ''),
                   websearch_to_tsquery($1::regconfig, $2), $13) AS snippet
  FROM chatkeep_search_messages($1::regconfig, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) AS s
  JOIN messages m ON m.id = s.id
 ORDER BY s.rank DESC NULLS LAST, s.created_at DESC, s.id DESC
"""

# -- cursors ------------------------------------------------------------------------------

_CURSOR_VERSION: Final = 1
# version, order ('n'/'r'), fingerprint of the search, rank (float4), microseconds, id
_CURSOR_FORMAT: Final = struct.Struct(">Bc4sfq16s")
_CURSOR_TAG_BYTES: Final = 4
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _tag(payload: bytes) -> bytes:
    # Detects edited or truncated cursors. Not a secret: a forged cursor only moves the
    # caller's own search to another position among results it may see anyway.
    return hashlib.blake2b(payload, digest_size=_CURSOR_TAG_BYTES, person=b"chatkeep-srch").digest()


def _fingerprint(*parts: object) -> bytes:
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()


def _encode_cursor(
    order: SearchOrder, fingerprint: bytes, rank: float | None, at: datetime, key: uuid.UUID
) -> str:
    micros = (at - _EPOCH) // timedelta(microseconds=1)
    payload = _CURSOR_FORMAT.pack(
        _CURSOR_VERSION, order[0].encode(), fingerprint, rank or 0.0, micros, key.bytes
    )
    return base64.urlsafe_b64encode(payload + _tag(payload)).rstrip(b"=").decode("ascii")


def _decode_cursor(
    cursor: object, order: SearchOrder, fingerprint: bytes
) -> tuple[float, datetime, uuid.UUID]:
    if not isinstance(cursor, str) or len(cursor) > 80:
        raise InvalidInput("cursor", "malformed")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput("cursor", "malformed") from None
    size = _CURSOR_FORMAT.size
    if len(raw) != size + _CURSOR_TAG_BYTES:
        raise InvalidInput("cursor", "malformed")
    payload, tag = raw[:size], raw[size:]
    if tag != _tag(payload):
        raise InvalidInput("cursor", "tampered with or corrupted")
    version, kind, mark, rank, micros, key = _CURSOR_FORMAT.unpack(payload)
    if version != _CURSOR_VERSION:
        raise InvalidInput("cursor", "unknown version")
    if kind != order[0].encode() or mark != fingerprint:
        raise InvalidInput("cursor", "belongs to another search (query, filters or order)")
    try:
        at = _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise InvalidInput("cursor", "malformed") from None
    return rank, at, uuid.UUID(bytes=key)


# -- input --------------------------------------------------------------------------------


def check_query(query: object) -> str:
    """The query, trimmed, if it is one chatkeep searches for.

    Any text is safe to search for: it is parsed by ``websearch_to_tsquery``, which reads
    quotes, ``or`` and a leading ``-`` and never fails on other operators (``&``, ``|``,
    ``!``, ``<->``, ``:*``, parentheses are treated as punctuation).

    Raises:
        InvalidInput: not a string, empty or only whitespace, longer than
            :data:`MAX_QUERY_LENGTH` characters or with more than :data:`MAX_QUERY_TERMS`
            terms, or holding a NUL character.
    """
    if not isinstance(query, str):
        raise InvalidInput("query", "must be a string")
    text = query.strip()
    if not text:
        raise InvalidInput("query", "must not be empty")
    if len(text) > MAX_QUERY_LENGTH:
        raise InvalidInput("query", f"at most {MAX_QUERY_LENGTH} characters")
    if len(text.split()) > MAX_QUERY_TERMS:
        raise InvalidInput("query", f"at most {MAX_QUERY_TERMS} terms")
    if "\x00" in text:
        raise InvalidInput("query", "must not contain NUL characters")
    return text


def _instant(field: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInput(field, "a timezone-aware datetime")
    return value


class SearchRepository:
    """Full-text search over messages, for the acting user (call it acting as them)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def search(
        self,
        user_id: uuid.UUID,
        query: str,
        *,
        room_id: uuid.UUID | None = None,
        author_id: uuid.UUID | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        order: SearchOrder = "newest",
        limit: int = DEFAULT_SEARCH_LIMIT,
        cursor: str | None = None,
    ) -> SearchPage:
        """One page of the messages matching ``query`` that the acting user may see.

        Run it acting as ``user_id`` (``db.acting_as``): the acting user's rooms bound the
        search and row security filters what is returned. ``order="newest"`` pages by
        ``(created_at, id)`` descending; ``order="rank"`` by ``(ts_rank, id)`` descending.
        ``since`` is inclusive, ``until`` exclusive. A room the user is not in gives an
        empty page (as one with no match: nothing tells them apart), and so does a query
        with no words in it (only punctuation or operators).

        Raises:
            InvalidInput: a bad id, query (:func:`check_query`), date, order, ``limit``
                (1 to :data:`MAX_SEARCH_LIMIT`) or cursor (malformed, or from another
                search); ``since`` not before ``until``.
            ConfigurationError: ``search_config`` names no text search configuration.
        """
        check_id("user_id", user_id)
        text = check_query(query)
        room = None if room_id is None else check_id("room_id", room_id)
        author = None if author_id is None else check_id("author_id", author_id)
        start = _instant("since", since)
        end = _instant("until", until)
        if start is not None and end is not None and start >= end:
            raise InvalidInput("until", "must be later than since")
        if order not in ("newest", "rank"):
            raise InvalidInput("order", "'newest' or 'rank'")
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise InvalidInput("limit", f"an integer from 1 to {MAX_SEARCH_LIMIT}")
        if not 1 <= limit <= MAX_SEARCH_LIMIT:
            raise InvalidInput("limit", f"an integer from 1 to {MAX_SEARCH_LIMIT}")
        config = self.db.settings.search_config
        fingerprint = _fingerprint(config, text, room, author, start, end)
        after_rank: float | None = None
        after_at: datetime | None = None
        after_id: uuid.UUID | None = None
        if cursor is not None:
            after_rank, after_at, after_id = _decode_cursor(cursor, order, fingerprint)
            if order == "newest":
                after_rank = None
        try:
            rows = await self.db.fetch(
                "search.messages",
                SEARCH,
                config,
                text,
                room,
                author,
                start,
                end,
                order == "rank",
                after_at,
                after_rank,
                after_id,
                limit + 1,
                SNIPPET_START + SNIPPET_STOP,
                _HEADLINE_OPTIONS,
            )
        except ChatkeepError as exc:
            if not isinstance(exc.__cause__, asyncpg.UndefinedObjectError):
                raise
            raise ConfigurationError(
                f"search_config {config!r} names no text search configuration in the database",
                field="search_config",
            ) from exc
        hits = tuple(SearchHit._from_row(row) for row in rows[:limit])
        following = None
        if len(rows) > limit:
            last = hits[-1]
            following = _encode_cursor(order, fingerprint, last.rank, last.created_at, last.id)
        return SearchPage(items=hits, next=following)
