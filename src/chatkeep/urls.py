"""The stores' URLs, read and rewritten in one place: PostgreSQL (libpq) and Redis.

The standard library parses most of these, but not all the way: ``SplitResult.port``
fails on a multi-host authority (``h1:5432,h2:5433``), and ``urlunsplit`` turns the empty
host of a socket URL (``postgresql:///db?host=/run/pg``) into ``postgresql:/db``, which
libpq does not read as a URL at all. So the functions here split a URL with ``urlsplit``
and read the authority (``user:password@host:port,...``) and rebuild URLs by hand.

PostgreSQL URLs are read as libpq and asyncpg read them:

* the user and password are percent-decoded (``p%40ss`` is ``p@ss``); ``?user=`` and
  ``?password=`` are the same settings given in the query;
* the hosts are a comma-separated list (``[::1]`` for IPv6), each with an optional port;
  a host that is a path (``/run/pg``, or ``%2Frun%2Fpg`` in the authority) is a Unix
  socket folder; ``?host=``/``?port=`` are the same settings in the query;
* the database is the path, else ``?dbname=`` (or asyncpg's ``?database=``).

Redis URLs (``redis://``, ``rediss://``, ``valkey://``, ``valkeys://``, ``unix://``) pick
their logical database by the path (``/2``) or, as ``unix://`` URLs must (their path is the
socket), by ``?db=``.

Nothing here logs or shows a URL: :func:`redact` is what makes one safe to show.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from chatkeep.errors import InvalidInput

__all__ = [
    "REDIS_CLUSTER_SCHEMES",
    "REDIS_SCHEMES",
    "database_name",
    "hosts",
    "is_unix_socket",
    "redact",
    "redis_db",
    "split_password",
    "sslmode",
    "user",
    "with_database",
    "with_default_database",
    "with_host",
    "with_redis_db",
    "with_user",
]

REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix", "valkey", "valkeys"})
"""The schemes redis-py reads (``valkey``/``valkeys`` are ``redis``/``rediss``)."""
REDIS_CLUSTER_SCHEMES: Final = frozenset(
    {"redis+cluster", "rediss+cluster", "valkey+cluster", "valkeys+cluster"}
)
"""A Redis Cluster reached through the URL's seed node (database 0 only); see
:class:`~chatkeep.realtime.RedisClient`."""

# Query parameters libpq and asyncpg read a secret from.
_SECRET_PARAMS: Final = frozenset({"password", "sslpassword"})
_DATABASE_PARAMS: Final = ("dbname", "database")
_PORT_RULE: Final = "the port must be a number from 1 to 65535"


@dataclass(frozen=True, slots=True)
class _Parts:
    """A URL cut into its pieces, the authority too, each still percent-encoded."""

    scheme: str
    userinfo: str | None  # None: no '@' at all
    hostport: str
    path: str
    # The query's ``key=value`` pieces as written: decoding and encoding them again would
    # turn a '+' into a space (libpq, unlike HTML forms, reads '+' as itself).
    query: list[str]
    fragment: str

    def param(self, *names: str) -> str | None:
        """The last value, decoded, of the first of ``names`` the query holds."""
        for name in names:
            values = [unquote(v) for k, _, v in map(_pair, self.query) if k == name]
            if values:
                return values[-1]
        return None

    def without(self, *names: str) -> list[str]:
        """The query's pieces but those of ``names``."""
        return [piece for piece in self.query if _pair(piece)[0] not in names]

    def build(self) -> str:
        """The URL these pieces make."""
        # By hand: urlunsplit drops the '//' of an empty authority (postgresql:///db?host=).
        netloc = self.hostport if self.userinfo is None else f"{self.userinfo}@{self.hostport}"
        query = f"?{'&'.join(self.query)}" if self.query else ""
        fragment = f"#{self.fragment}" if self.fragment else ""
        return f"{self.scheme}://{netloc}{self.path}{query}{fragment}"


def _pair(piece: str) -> tuple[str, str, str]:
    return piece.partition("=")


def _piece(key: str, value: str) -> str:
    return f"{key}={quote(value, safe='/')}"


def _split(url: str) -> _Parts:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket
        raise InvalidInput("url", "must be a URL", "the URL cannot be parsed") from exc
    userinfo, at, hostport = parts.netloc.rpartition("@")
    return _Parts(
        scheme=parts.scheme,
        userinfo=userinfo if at else None,
        hostport=hostport,
        path=parts.path,
        query=[piece for piece in parts.query.split("&") if piece],
        fragment=parts.fragment,
    )


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and errors).

    Covers the password in the user part (``user:secret@host``) and in the query
    (``?password=secret``), and works on URLs the standard parser rejects (several hosts,
    a malformed port) because it never parses the host part.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_PARAMS for key, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="/*"
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    # Rebuilt by hand, for the same reason as _Parts.build.
    query = f"?{query}" if query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}{fragment}"


# -- PostgreSQL ------------------------------------------------------------------------------


def user(url: str) -> str:
    """The role a PostgreSQL URL logs in as, decoded; empty when it names none.

    Raises:
        InvalidInput: ``url`` cannot be parsed.
    """
    parts = _split(url)
    name = (parts.userinfo or "").partition(":")[0]
    return unquote(name) or parts.param("user") or ""


def _host_and_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = entry.partition(":")
    if not port:
        return unquote(host), None
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidInput("url", _PORT_RULE)
    return unquote(host), int(port)


def hosts(url: str) -> list[tuple[str, int | None]]:
    """The ``(host, port)`` pairs a URL names, in order; empty for the default (a socket).

    The hosts in the authority (``h1:5432,h2:5433``, ``[::1]:5432``) come first, then
    those of ``?host=`` (with ``?port=``). A host that is a path is a socket folder. A
    missing port is ``None``.

    Raises:
        InvalidInput: a port is not a number from 1 to 65535, or ``url`` cannot be parsed.
    """
    parts = _split(url)
    found = [_host_and_port(entry) for entry in parts.hostport.split(",") if entry]
    query_hosts = [h for h in (parts.param("host") or "").split(",") if h]
    query_ports = (parts.param("port") or "").split(",")
    for index, host in enumerate(query_hosts):
        port = query_ports[min(index, len(query_ports) - 1)]
        found.append(_host_and_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return found


def is_unix_socket(url: str) -> bool:
    """True when every host the URL names is a Unix socket folder (and it names one).

    Both the authority's hosts and ``?host=`` count: asyncpg prefers the first, libpq the
    second, so a URL is only local when both are.

    Raises:
        InvalidInput: a port is malformed, or ``url`` cannot be parsed.
    """
    named = hosts(url)
    return bool(named) and all(host.startswith("/") for host, _ in named)


def sslmode(url: str) -> str | None:
    """The URL's ``?sslmode=`` (the last one, as libpq reads it), or ``None``."""
    return _split(url).param("sslmode")


def database_name(url: str) -> str:
    """The database a PostgreSQL URL names (path, else ``?dbname=``); empty when none."""
    parts = _split(url)
    return unquote(parts.path.lstrip("/")) or parts.param(*_DATABASE_PARAMS) or ""


def with_database(url: str, database: str) -> str:
    """The same server, credentials and options, pointed at ``database``.

    A ``?dbname=``/``?database=`` in the query is dropped: libpq would prefer it.
    """
    parts = _split(url)
    return replace(
        parts, path=f"/{quote(database)}", query=parts.without(*_DATABASE_PARAMS)
    ).build()


def with_default_database(url: str, database: str) -> str:
    """``url`` unchanged if it names a database, else naming ``database``."""
    parts = _split(url)
    if parts.path.strip("/") or parts.param(*_DATABASE_PARAMS) is not None:
        return url
    return with_database(url, database)


def with_host(url: str, host: str, port: int) -> str:
    """The same credentials, database and options on another server (a Citus worker).

    ``?host=``/``?port=`` in the query are dropped: libpq would prefer them.
    """
    parts = _split(url)
    where = f"[{host}]" if ":" in host else quote(host, safe=".-_~")
    return replace(
        parts, hostport=f"{where}:{int(port)}", query=parts.without("host", "port")
    ).build()


def with_user(url: str, role: str, password: str | None = None) -> str:
    """``url`` logging in as ``role``, with ``password`` or none (the URL's own is dropped)."""
    parts = _split(url)
    userinfo = quote(role, safe="")
    if password is not None:
        userinfo += f":{quote(password, safe='')}"
    return replace(parts, userinfo=userinfo, query=parts.without("user", "password")).build()


def split_password(url: str, options: dict[str, str] | None = None) -> tuple[str, str | None]:
    """``url`` without its password, and the password (decoded), for a program's command line.

    The password may be in the user part or in ``?password=``; either way it leaves the URL
    (a command line is visible to every user of the machine through ``ps``) and comes back
    separately, for ``PGPASSWORD``.

    Args:
        url: a PostgreSQL URL.
        options: query parameters to set, replacing the URL's own (``sslmode``...).
    """
    parts = _split(url)
    name, colon, secret = (parts.userinfo or "").partition(":")
    # libpq reads a password in the query after the one in the user part: it wins.
    password = parts.param("password") or (unquote(secret) if colon else None)
    options = options or {}
    query = parts.without("password", *options)
    query += [_piece(key, value) for key, value in options.items()]
    userinfo = None if parts.userinfo is None else name
    return replace(parts, userinfo=userinfo, query=query).build(), password


# -- Redis -----------------------------------------------------------------------------------


def redis_db(url: str) -> int | None:
    """The logical database a Redis URL selects (path, else ``?db=``); ``None`` when none.

    Raises:
        InvalidInput: the database is not a number, or ``url`` cannot be parsed.
    """
    parts = _split(url)
    text = "" if parts.scheme == "unix" else parts.path.strip("/")
    text = text or parts.param("db") or ""
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput("url", "the Redis database must be a number")
    return int(text)


def with_redis_db(url: str, db: int) -> str:
    """``url`` selecting logical database ``db`` (``?db=`` for a ``unix://`` socket URL)."""
    parts = _split(url)
    if parts.scheme == "unix":
        return replace(parts, query=[*parts.without("db"), f"db={db}"]).build()
    return replace(parts, path=f"/{db}", query=parts.without("db")).build()
