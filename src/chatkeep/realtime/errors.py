"""Translation of redis-py errors into ``chatkeep.errors`` at the Redis boundary.

Callers never see a redis-py exception: :meth:`~chatkeep.realtime.client.RedisClient.guard`
and the pub/sub hub (:mod:`chatkeep.realtime.pubsub`) raise what :func:`translate_error`
returns ``from`` the original, so the driver's detail is still on ``__cause__``.
"""

from __future__ import annotations

from typing import Final

from redis import exceptions as rex

from chatkeep.errors import ChatkeepError, ConfigurationError, Unavailable

__all__ = ["translate_error"]

DRIVER_ERRORS: Final = (rex.RedisError, rex.RedisClusterException, OSError)
"""What redis-py (and the socket layer) raise; its cluster client's own errors
(``RedisClusterException``: no node reachable, a slot not covered, keys of two slots) do
not derive from ``RedisError``."""

# Errors that mean "the store cannot serve now": worth an Unavailable, not a bug report.
_UNAVAILABLE_RESPONSES: Final = (
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.SlotNotCoveredError,
)
_CREDENTIAL_ERRORS: Final = (
    rex.AuthenticationError,
    rex.AuthorizationError,
    rex.NoPermissionError,
)


def translate_error(exc: BaseException, operation: str) -> ChatkeepError:
    """Map a redis-py (or socket) error to the chatkeep exception callers see.

    Args:
        exc: the error raised by redis-py or the socket layer.
        operation: what was being done (``"sessions.create"``), for the message.

    Returns:
        ``ConfigurationError`` for rejected credentials, ``Unavailable`` for connection,
        timeout, loading, read-only and out-of-memory conditions, ``ChatkeepError`` for
        anything else (a bug or a misconfigured server). The caller raises it ``from exc``.
    """
    kind = type(exc).__name__
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return ConfigurationError(
            f"redis refused the credentials during {operation} ({kind}); check REDIS_URL",
            field="redis_url",
        )
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError | OSError):
        return Unavailable(f"redis unavailable during {operation}: {kind}: {exc}")
    if isinstance(exc, _UNAVAILABLE_RESPONSES):
        return Unavailable(f"redis cannot serve {operation}: {kind}: {exc}")
    if type(exc) is rex.RedisClusterException:
        # Raised by itself when no node of the cluster answers (slot-map refreshes).
        return Unavailable(f"redis cluster unreachable during {operation}: {exc}")
    return ChatkeepError(f"redis failed {operation}: {kind}: {exc}")
