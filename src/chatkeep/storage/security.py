"""Row security from the Python side: the acting user's setting, and failed connection attempts.

Row-level security (migration 009) confines the application role to the rows of the
*acting user*, which each transaction names with ``set_config('app.user_id', <uuid>,
true)`` (:data:`ACTING_USER_SETTING`). The third argument makes it local to the
transaction: when the transaction ends, commit or rollback, the setting is gone, so a
pooled connection never carries one user's identity into the next borrower's work. The
way to open such a transaction is :meth:`chatkeep.storage.Database.acting_as` (or
:meth:`chatkeep.ChatKeep.acting_as`), which sends ``BEGIN`` and the setting in one round
trip.

Failed connection attempts are counted here (per host, role and reason, never with the
password) and logged at WARNING; ``chatkeep doctor`` shows the counts.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Final

import asyncpg

from chatkeep import urls
from chatkeep.errors import ChatkeepError, ConfigurationError, InvalidInput

__all__ = [
    "ACTING_USER_SETTING",
    "ConnectionFailureCount",
    "connection_failed",
    "connection_failures",
    "reset_connection_failures",
]

logger = logging.getLogger("chatkeep.security")

ACTING_USER_SETTING: Final = "app.user_id"


# -- failed connection attempts ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionFailureCount:
    """How often connecting to ``host`` as ``role`` failed for ``reason``, and when last."""

    host: str
    role: str
    reason: str
    count: int
    last_failed_at: float  # time.time()


_lock = threading.Lock()
_failures: dict[tuple[str, str, str], ConnectionFailureCount] = {}


def _host_and_role(dsn: str) -> tuple[str, str]:
    try:
        hosts = urls.hosts(dsn)
        role = urls.user(dsn) or "(default)"
    except InvalidInput:
        return "<unparseable url>", "?"
    shown = [f"[{h}]:{p}" if p and ":" in h else f"{h}:{p}" if p else h for h, p in hosts]
    return ",".join(shown) or "local socket", role


def _reason(error: ChatkeepError) -> str:
    cause = error.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS error: {getattr(cause, 'reason', None) or cause.__class__.__name__}"
    if isinstance(
        cause, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"authentication failed ({cause.sqlstate})"
    if isinstance(cause, asyncpg.InvalidCatalogNameError):
        return "the database does not exist"
    if isinstance(cause, TimeoutError):
        return "timed out"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, asyncpg.PostgresError):
        return f"server error {cause.sqlstate}"
    if cause is not None:
        return cause.__class__.__name__
    return error.__class__.__name__


def connection_failed(dsn: str, error: ChatkeepError) -> ChatkeepError:
    """Count and log a failed connection attempt; returns the error the caller should raise.

    A certificate that fails verification becomes a :class:`ConfigurationError` naming
    ``ssl_ca_file``: retrying will not help, the CA or the host name is wrong (or someone
    is in the middle). The log line names the host, the role and the reason, never the
    password.
    """
    host, role = _host_and_role(dsn)
    reason = _reason(error)
    key = (host, role, reason)
    with _lock:
        previous = _failures.get(key)
        count = previous.count + 1 if previous else 1
        _failures[key] = ConnectionFailureCount(host, role, reason, count, time.time())
    logger.warning(
        "connection to %s as %s failed: %s (%d time(s) so far)",
        host,
        role,
        reason,
        count,
        extra={"host": host, "role": role, "reason": reason, "failures": count},
    )
    if isinstance(error.__cause__, ssl.SSLCertVerificationError):
        refined = ConfigurationError(
            f"connect to {host}: {reason}; check ssl_ca_file and the host name in the URL",
            field="ssl_ca_file",
        )
        refined.__cause__ = error.__cause__
        return refined
    return error


def connection_failures() -> list[ConnectionFailureCount]:
    """Failed connection attempts of this process, most frequent first."""
    with _lock:
        return sorted(_failures.values(), key=lambda f: (-f.count, f.host, f.role, f.reason))


def reset_connection_failures() -> None:
    """Forget the counted failures (tests, or after an incident is dealt with)."""
    with _lock:
        _failures.clear()
