"""chatkeep.urls: the stores' URLs read as libpq, asyncpg and redis-py read them."""

from __future__ import annotations

import pytest

from chatkeep import urls
from chatkeep.config import redact_url
from chatkeep.errors import InvalidInput

# A password holding every character that has a meaning in a URL, percent-encoded.
SECRET = "p@ss:w/rd%?#"
ENCODED = "p%40ss%3Aw%2Frd%25%3F%23"


def test_config_keeps_redact_url() -> None:
    assert redact_url is urls.redact


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://app:{ENCODED}@db:5432/chat", "postgresql://app:***@db:5432/chat"),
        (f"postgresql://app:{ENCODED}@h1:5432,h2:5433/chat", "postgresql://app:***@h1:5432,h2:5433/chat"),
        (f"postgresql://app:{ENCODED}@[::1]:5432/chat", "postgresql://app:***@[::1]:5432/chat"),
        (f"postgresql://app@/chat?host=/run/pg&password={ENCODED}", "postgresql://app@/chat?host=/run/pg&password=***"),
        (f"postgresql:///chat?host=/run/pg&password={ENCODED}", "postgresql:///chat?host=/run/pg&password=***"),
        (f"rediss://:{ENCODED}@cache:6380/2", "rediss://:***@cache:6380/2"),
        (f"unix://:{ENCODED}@/run/redis.sock?db=3", "unix://:***@/run/redis.sock?db=3"),
        ("postgresql://app@db/chat", "postgresql://app@db/chat"),
    ],
)  # fmt: skip
def test_redact(url: str, expected: str) -> None:
    assert urls.redact(url) == expected


@pytest.mark.parametrize(
    ("url", "user", "hosts", "database"),
    [
        (f"postgresql://app:{ENCODED}@db:5432/chat", "app", [("db", 5432)], "chat"),
        ("postgresql://h1:5432,h2,h3:5433/x", "", [("h1", 5432), ("h2", None), ("h3", 5433)], "x"),
        ("postgresql://u@[::1]:5432,[fe80::2]/x", "u", [("::1", 5432), ("fe80::2", None)], "x"),
        ("postgresql:///chat?host=/run/pg", "", [("/run/pg", None)], "chat"),
        ("postgresql://u@/chat?host=/run/pg&port=5433", "u", [("/run/pg", 5433)], "chat"),
        ("postgresql://%2Frun%2Fpg/chat", "", [("/run/pg", None)], "chat"),
        ("postgresql:///chat?host=/a,/b&port=5432,5433", "", [("/a", 5432), ("/b", 5433)], "chat"),
        ("postgresql://db?user=reporter&dbname=stats", "reporter", [("db", None)], "stats"),
        ("postgresql://my%20role@db/my%20db", "my role", [("db", None)], "my db"),
        ("postgresql://u@db", "u", [("db", None)], ""),
        ("postgresql://u@db/", "u", [("db", None)], ""),
        ("postgresql:///", "", [], ""),
    ],
)  # fmt: skip
def test_user_hosts_and_database(
    url: str, user: str, hosts: list[tuple[str, int | None]], database: str
) -> None:
    assert urls.user(url) == user
    assert urls.hosts(url) == hosts
    assert urls.database_name(url) == database


@pytest.mark.parametrize(
    "url", ["postgresql://u@h:0/db", "postgresql://u@h:65536/db", "postgresql://u@h1,h2:x/db"]
)
def test_a_bad_port_is_invalid_input_naming_the_rule(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        urls.hosts(url)
    assert caught.value.rule == "the port must be a number from 1 to 65535"


def test_an_unparseable_url_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        urls.user("postgresql://[::1/db")


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("postgresql:///chat?host=/run/pg", True),
        ("postgresql://u@%2Frun%2Fpg/chat", True),
        ("postgresql:///chat?host=/a,/b", True),
        ("postgresql:///chat?host=/a,db.internal", False),
        ("postgresql://db.internal/chat", False),
        ("postgresql://[::1]/chat", False),
        # asyncpg would use the authority's host, libpq the query's: not local to both.
        ("postgresql://db.internal/chat?host=/run/pg", False),
        ("postgresql:///chat", False),  # no host named: the URL does not say
    ],
)
def test_is_unix_socket(url: str, local: bool) -> None:
    assert urls.is_unix_socket(url) is local


def test_sslmode_is_the_last_one_given() -> None:
    assert urls.sslmode("postgresql://h/db?sslmode=require&sslmode=verify-full") == "verify-full"
    assert urls.sslmode("postgresql://h/db") is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://u:{ENCODED}@h:5/chat?sslmode=require", f"postgresql://u:{ENCODED}@h:5/postgres?sslmode=require"),
        ("postgresql:///chat?host=/run/pg", "postgresql:///postgres?host=/run/pg"),
        ("postgresql://u@/chat?host=/tmp/x%20y", "postgresql://u@/postgres?host=/tmp/x%20y"),
        ("postgresql://u@h1:5432,h2:5433/chat", "postgresql://u@h1:5432,h2:5433/postgres"),
        ("postgresql://u@[::1]:5432", "postgresql://u@[::1]:5432/postgres"),
        # libpq prefers ?dbname= to the path: it must go.
        ("postgresql://u@h?dbname=chat&sslmode=require", "postgresql://u@h/postgres?sslmode=require"),
        # '+' is a plus to libpq: never re-encoded as a space.
        ("postgresql://u@h/chat?options=-c%20x%3Da+b", "postgresql://u@h/postgres?options=-c%20x%3Da+b"),
    ],
)  # fmt: skip
def test_with_database_keeps_the_server_credentials_and_options(url: str, expected: str) -> None:
    assert urls.with_database(url, "postgres") == expected


def test_with_default_database_only_fills_in_a_missing_one() -> None:
    assert urls.with_default_database("postgresql://u@h", "app") == "postgresql://u@h/app"
    assert (
        urls.with_default_database("postgresql:///?host=/s", "app") == "postgresql:///app?host=/s"
    )
    for named in ("postgresql://u@h/chat", "postgresql://u@h?dbname=chat"):
        assert urls.with_default_database(named, "app") == named


def test_with_user_replaces_the_role_and_its_password() -> None:
    url = f"postgresql://admin:{ENCODED}@db:5432/chat?user=x&password=y&sslmode=require"
    assert (
        urls.with_user(url, "chatapp_app")
        == "postgresql://chatapp_app@db:5432/chat?sslmode=require"
    )
    with_password = urls.with_user(url, "chatapp_app", SECRET)
    assert with_password == f"postgresql://chatapp_app:{ENCODED}@db:5432/chat?sslmode=require"
    socket = urls.with_user("postgresql:///chat?host=/run/pg", "a b")
    assert socket == "postgresql://a%20b@/chat?host=/run/pg"


@pytest.mark.parametrize(
    ("url", "clean", "password"),
    [
        (f"postgresql://app:{ENCODED}@db/chat", "postgresql://app@db/chat", SECRET),
        (
            f"postgresql://app@db/x?password={ENCODED}&sslmode=require",
            "postgresql://app@db/x?sslmode=require",
            SECRET,
        ),
        ("postgresql:///chat?host=/run/pg", "postgresql:///chat?host=/run/pg", None),
        ("postgresql://app@h1,h2:5433/chat", "postgresql://app@h1,h2:5433/chat", None),
    ],
)  # fmt: skip
def test_split_password_takes_every_password_off_the_url(
    url: str, clean: str, password: str | None
) -> None:
    assert urls.split_password(url) == (clean, password)


def test_split_password_options_replace_the_urls_own() -> None:
    clean, _ = urls.split_password(
        "postgresql://u:pw@h/chat?sslmode=disable&application_name=x",
        {"sslmode": "verify-full", "sslrootcert": "/etc/ca dir/ca.pem"},
    )
    assert clean == (
        "postgresql://u@h/chat?application_name=x&sslmode=verify-full"
        "&sslrootcert=/etc/ca%20dir/ca.pem"
    )


@pytest.mark.parametrize(
    ("url", "db", "moved"),
    [
        ("redis://cache:6379/2", 2, "redis://cache:6379/8"),
        ("redis://cache:6379", None, "redis://cache:6379/8"),
        (f"rediss://:{ENCODED}@cache:6380/0?ssl_cert_reqs=required", 0, f"rediss://:{ENCODED}@cache:6380/8?ssl_cert_reqs=required"),
        ("redis://cache?db=5", 5, "redis://cache/8"),
        ("valkey://[::1]:6379/1", 1, "valkey://[::1]:6379/8"),
        ("valkeys://cache/3", 3, "valkeys://cache/8"),
        ("unix:///run/redis.sock?db=4", 4, "unix:///run/redis.sock?db=8"),
        ("unix:///run/redis.sock", None, "unix:///run/redis.sock?db=8"),
    ],
)  # fmt: skip
def test_redis_database_selection(url: str, db: int | None, moved: str) -> None:
    assert urls.redis_db(url) == db
    assert urls.with_redis_db(url, 8) == moved


def test_a_redis_database_that_is_not_a_number_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="must be a number"):
        urls.redis_db("redis://cache/zero")


def test_redis_schemes() -> None:
    assert {"redis", "rediss", "unix", "valkey", "valkeys"} == urls.REDIS_SCHEMES


@pytest.mark.parametrize(
    ("url", "host", "port", "expected"),
    [
        (
            "postgresql://root:pw@coordinator:5432/chat?sslmode=require&port=1",
            "10.0.0.2",
            6432,
            "postgresql://root:pw@10.0.0.2:6432/chat?sslmode=require",
        ),
        ("postgresql://root@127.0.0.1:9700/db", "::1", 9701, "postgresql://root@[::1]:9701/db"),
        ("postgresql:///db?host=/tmp", "worker-1", 5432, "postgresql://worker-1:5432/db"),
    ],
)
def test_with_host_keeps_credentials_and_options(
    url: str, host: str, port: int, expected: str
) -> None:
    assert urls.with_host(url, host, port) == expected
