"""Time-ordered ids: UUIDv7 (RFC 9562) made in Python.

Ids are made before the insert so a client knows a message's id before it is stored (a
retried send carries the same id) and so bulk loads need no round trip per row. Version 7
puts 48 bits of Unix milliseconds first, so new keys land at the right edge of the B-tree
instead of scattering writes as random v4 keys do.

Within one process the ids are strictly increasing, even when many are made in the same
millisecond or the clock steps back: the 74 bits after the timestamp act as a counter that
is advanced by a random step (RFC 9562 section 6.2, method 2), so successive ids stay hard
to guess while sorting in creation order.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Final

from chatkeep.errors import InvalidInput

__all__ = ["check_id", "uuid7", "uuid7_datetime"]

_RAND_BITS: Final = 74
_RAND_MASK: Final = (1 << _RAND_BITS) - 1
# A fresh millisecond starts the counter in the lower half, leaving room for about 2**41
# random steps of up to 2**32 before it overflows into the next millisecond.
_FRESH_MASK: Final = (1 << (_RAND_BITS - 1)) - 1
_STEP_BITS: Final = 32

_lock = threading.Lock()
_last_ms = -1
_last_rand = 0


def _next_fields() -> tuple[int, int]:
    global _last_ms, _last_rand
    now_ms = time.time_ns() // 1_000_000
    noise = int.from_bytes(os.urandom(10), "big")
    with _lock:
        if now_ms > _last_ms:
            _last_ms = now_ms
            _last_rand = noise & _FRESH_MASK
        else:
            # Same millisecond (or the clock went back): step forward from the last id.
            _last_rand += (noise >> (80 - _STEP_BITS)) + 1
            if _last_rand > _RAND_MASK:
                _last_ms += 1
                _last_rand = noise & _FRESH_MASK
        return _last_ms, _last_rand


def uuid7() -> uuid.UUID:
    """A new UUIDv7, greater than every id this process made before.

    Example:
        >>> a, b = uuid7(), uuid7()
        >>> a < b and a.version == 7
        True
    """
    ms, rand = _next_fields()
    rand_a = rand >> 62  # 12 bits
    rand_b = rand & ((1 << 62) - 1)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)


def uuid7_datetime(value: uuid.UUID) -> datetime:
    """The creation time a UUIDv7 carries (millisecond precision, UTC).

    Raises:
        InvalidInput: ``value`` is not a version 7 UUID.
    """
    if value.version != 7:
        from chatkeep.errors import InvalidInput

        raise InvalidInput("id", "must be a UUIDv7")
    return datetime.fromtimestamp((value.int >> 80) / 1000, tz=UTC)


def check_id(field: str, value: object) -> uuid.UUID:
    """``value`` as a UUID (or its string form), or InvalidInput naming ``field``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise InvalidInput(field, "must be a UUID")
