"""chatkeep's errors as HTTP answers, for any web framework.

Every :class:`~chatkeep.errors.ChatkeepError` has a status and a stable ``code``
(:data:`ERROR_STATUS`; any other chatkeep error is 500 ``internal``), and one JSON body::

    {"error": {"code": "invalid_input", "message": "content: ...", "field": "content",
               "errors": [{"field": "content", "rule": "..."}]}}

``field`` and ``errors`` are there for invalid input only (every problem found);
``message`` is for people, never parse it, and a 500's is just ``internal`` (its details
are for the logs). Bad input is 422, as FastAPI answers a body that fails validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from chatkeep.errors import (
    ChatkeepError,
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

__all__ = ["ERROR_STATUS", "error_body", "error_headers"]

ERROR_STATUS: Final[Mapping[type[ChatkeepError], tuple[int, str]]] = {
    InvalidInput: (422, "invalid_input"),
    Unauthenticated: (401, "unauthenticated"),
    PermissionDenied: (403, "permission_denied"),
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    RateLimited: (429, "rate_limited"),
    Unavailable: (503, "unavailable"),
}
"""HTTP status and error ``code`` of each error class (subclasses too); others: 500,
``internal``."""


def _status_of(exc: ChatkeepError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        found = ERROR_STATUS.get(cls)
        if found is not None:
            return found
    return 500, "internal"


def error_body(exc: ChatkeepError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body answering ``exc`` (see the module docstring).

    A 500's message is generic: an unexpected error's text is for the logs only.
    """
    status, code = _status_of(exc)
    detail: dict[str, Any] = {"code": code, "message": str(exc) if status != 500 else code}
    if isinstance(exc, InvalidInput):
        detail["field"] = exc.field
        detail["errors"] = [{"field": e.field, "rule": e.rule} for e in exc.errors]
    return status, {"error": detail}


def error_headers(exc: ChatkeepError) -> dict[str, str] | None:
    """The headers answering ``exc``: ``WWW-Authenticate`` for 401, ``Retry-After`` for 429."""
    if isinstance(exc, Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        # Whole seconds, rounded up: Retry-After takes no fractions.
        return {"Retry-After": str(max(1, int(-(-exc.retry_after // 1))))}
    return None
