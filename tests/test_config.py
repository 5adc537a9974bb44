"""Settings: environment parsing, defaults, production safety, and secrets kept secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatkeep.config import DEFAULT_DATABASE_NAME, Settings, redact_url
from chatkeep.embedded import Endpoints
from chatkeep.errors import ConfigurationError

SECRET = "hunter2-s3cret"
PG = f"postgresql://app:{SECRET}@db.internal:5432/chatapp_db"
PG_TLS = PG + "?sslmode=verify-full"
REDIS_TLS = f"rediss://:{SECRET}@cache.internal:6380/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DATABASE_URL, REDIS_URL or CHATKEEP_* from the caller's shell leaks in."""
    for key in list(os.environ):
        if key.upper() in ("DATABASE_URL", "REDIS_URL") or key.upper().startswith("CHATKEEP_"):
            monkeypatch.delenv(key)


def production(**values: object) -> Settings:
    return Settings(env="production", **values)  # type: ignore[arg-type]


# -- defaults and the environment ---------------------------------------------------------


def test_defaults() -> None:
    settings = Settings()
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.embedded_database
    assert settings.embedded_redis
    assert settings.env == "development"
    assert settings.pool_max_size == 20
    assert settings.pool_min_size == 2
    assert settings.statement_timeout == 30.0
    assert settings.connect_timeout == 10.0
    assert settings.pool_idle_timeout == 300.0
    assert settings.ssl_mode is None
    assert settings.redis_key_prefix == ""
    assert settings.data_dir == Path(".chatkeep")
    assert settings.migrate_lock_timeout == 60.0
    assert settings.migrate_statement_lock_timeout == 10.0
    assert settings.migrate_statement_timeout == 600.0


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", PG)
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("CHATKEEP_MIGRATE_DATABASE_URL", "postgresql://owner@db/chatapp_db")
    monkeypatch.setenv("CHATKEEP_POOL_MIN_SIZE", "1")
    monkeypatch.setenv("CHATKEEP_POOL_MAX_SIZE", "7")
    monkeypatch.setenv("CHATKEEP_STATEMENT_TIMEOUT", "2.5")
    monkeypatch.setenv("CHATKEEP_CONNECT_TIMEOUT", "3")
    monkeypatch.setenv("CHATKEEP_POOL_IDLE_TIMEOUT", "60")
    monkeypatch.setenv("CHATKEEP_SSL_MODE", "require")
    monkeypatch.setenv("CHATKEEP_REDIS_KEY_PREFIX", "chat:")
    monkeypatch.setenv("CHATKEEP_REDIS_CLUSTER_MODE", "true")
    monkeypatch.setenv("CHATKEEP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHATKEEP_MIGRATE_LOCK_TIMEOUT", "5")
    settings = Settings.load()
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == PG
    assert settings.redis_url is not None
    assert settings.redis_url.get_secret_value() == "redis://cache:6379/2"
    assert settings.migrate_database_url is not None
    assert settings.migrate_database_url.get_secret_value() == "postgresql://owner@db/chatapp_db"
    assert (settings.pool_min_size, settings.pool_max_size) == (1, 7)
    assert settings.statement_timeout == 2.5
    assert settings.connect_timeout == 3.0
    assert settings.pool_idle_timeout == 60.0
    assert settings.ssl_mode == "require"
    assert settings.redis_key_prefix == "chat:"
    assert settings.redis_cluster_mode is True
    assert settings.data_dir == tmp_path
    assert settings.migrate_lock_timeout == 5.0
    assert not settings.embedded_database
    assert not settings.embedded_redis


def test_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env@h/from_env")
    monkeypatch.setenv("CHATKEEP_POOL_MAX_SIZE", "5")
    settings = Settings(database_url="postgresql://arg@h/from_arg", pool_max_size=9)
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://arg@h/from_arg"
    assert settings.pool_max_size == 9


def test_empty_urls_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("REDIS_URL", "")
    settings = Settings()
    assert settings.embedded_database
    assert settings.embedded_redis


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h", f"postgresql://u@h/{DEFAULT_DATABASE_NAME}"),
        ("postgresql://u@h/", f"postgresql://u@h/{DEFAULT_DATABASE_NAME}"),
        (
            "postgresql://u@h:5433?sslmode=require",
            "postgresql://u@h:5433/chatapp_db?sslmode=require",
        ),
        ("postgresql:///?host=/run/pg", "postgresql:///chatapp_db?host=/run/pg"),
        ("postgresql://u@h/other", "postgresql://u@h/other"),
        ("postgresql://u@h?dbname=other", "postgresql://u@h?dbname=other"),
    ],
)
def test_a_url_without_a_database_means_chatapp_db(given: str, expected: str) -> None:
    # Otherwise the driver would pick the database named like the user, and `setup` (which
    # creates chatapp_db) and `migrate` would quietly work on different databases.
    settings = Settings(database_url=given, migrate_database_url=given)
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == expected
    assert settings.migrate_database_url is not None
    assert settings.migrate_database_url.get_secret_value() == expected


# -- refusals name the field and the rule -------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "rule"),
    [
        ({"database_url": f"mysql://u:{SECRET}@h/db"}, "database_url", "postgresql://"),
        ({"database_url": f"postgresql://u:{SECRET}@h:99999/db"}, "database_url", "port"),
        ({"database_url": f"postgresql://u:{SECRET}@h:abc/db"}, "database_url", "port"),
        ({"migrate_database_url": f"http://u:{SECRET}@h/db"}, "migrate_database_url", "postgres"),
        ({"redis_url": f"memcached://:{SECRET}@h"}, "redis_url", "redis://"),
        ({"redis_url": f"redis://:{SECRET}@h:0"}, "redis_url", "port"),
        ({"pool_max_size": 0}, "pool_max_size", "greater than or equal to 1"),
        ({"pool_max_size": "many"}, "pool_max_size", "valid integer"),
        ({"pool_min_size": 30}, "pool_min_size", "must not exceed pool_max_size"),
        ({"statement_timeout": 0}, "statement_timeout", "greater than 0"),
        ({"connect_timeout": -1}, "connect_timeout", "greater than 0"),
        ({"env": "staging"}, "env", "'development' or 'production'"),
        ({"ssl_mode": "sometimes"}, "ssl_mode", "verify-full"),
        ({"redis_key_prefix": "has space"}, "redis_key_prefix", "pattern"),
        ({"application_name": ""}, "application_name", "at least 1"),
        ({"unknown_knob": 1}, "unknown_knob", "not permitted"),
    ],
)
def test_bad_values_raise_configuration_error_naming_the_field(
    values: dict[str, object], field: str, rule: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(**values)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert rule in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    # from None: the pydantic error (which would carry the input) is not chained.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_load_raises_the_same_errors() -> None:
    with pytest.raises(ConfigurationError, match="pool_max_size"):
        Settings.load(pool_max_size=0)


def test_errors_from_environment_variables_name_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"ftp://u:{SECRET}@h/db")
    with pytest.raises(ConfigurationError) as info:
        Settings()
    assert info.value.field == "database_url"
    assert SECRET not in str(info.value)
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("CHATKEEP_POOL_MAX_SIZE", "lots")
    with pytest.raises(ConfigurationError, match=r"^pool_max_size: "):
        Settings()


def test_several_problems_are_all_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(pool_max_size=0, statement_timeout=0, database_url=f"ftp://u:{SECRET}@h/db")
    message = str(info.value)
    assert message.startswith("database_url: must start with postgresql://")
    assert "; pool_max_size: " in message
    assert "; statement_timeout: " in message
    assert "more problem" not in message
    assert SECRET not in message
    assert info.value.field == "database_url"


def test_migration_locations_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATKEEP_MIGRATION_LOCATIONS", "app/migrations, billing=/srv/b ,")
    assert Settings().migration_locations == ("app/migrations", "billing=/srv/b")
    assert Settings(migration_locations=["x"]).migration_locations == ("x",)


def test_replica_urls_are_comma_separated_checked_and_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATKEEP_REPLICA_URLS", f"{PG}, postgresql://app@replica-2/ ,")
    urls = [url.get_secret_value() for url in Settings().replica_urls]
    assert urls == [PG, "postgresql://app@replica-2/chatapp_db"]  # a database, as for the rest
    assert SECRET not in repr(Settings())
    assert "postgresql://app:***@db.internal:5432/chatapp_db" in repr(Settings())
    monkeypatch.delenv("CHATKEEP_REPLICA_URLS")
    assert Settings().replica_urls == ()
    assert Settings(replica_urls="").replica_urls == ()
    for bad in ("mysql://x/db", ",".join([PG] * 17)):
        with pytest.raises(ConfigurationError) as info:
            Settings(replica_urls=bad)
        assert info.value.field == "replica_urls"
        assert SECRET not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        Settings(replica_max_lag=0)
    assert info.value.field == "replica_max_lag"
    with pytest.raises(ConfigurationError) as info:
        Settings(replica_fence="memcached")
    assert info.value.field == "replica_fence"


def test_ssl_ca_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(ssl_ca_file=tmp_path / "missing.pem")
    assert info.value.field == "ssl_ca_file"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings(ssl_ca_file=ca).ssl_ca_file == ca


# -- production ---------------------------------------------------------------------------


def test_production_accepts_verified_tls_everywhere() -> None:
    settings = production(database_url=PG_TLS, redis_url=REDIS_TLS)
    assert settings.env == "production"
    production(database_url=PG.replace("chatapp_db", "x?sslmode=verify-ca"), redis_url=REDIS_TLS)
    # ssl_mode overrides the URL's own sslmode.
    production(database_url=PG, ssl_mode="verify-full", redis_url=REDIS_TLS)


@pytest.mark.parametrize("url", [PG, PG + "?sslmode=require", PG + "?sslmode=prefer"])
def test_production_refuses_postgres_without_verified_tls(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        production(database_url=url, redis_url=REDIS_TLS)
    assert info.value.field == "database_url"
    assert "verify-full" in str(info.value)
    assert SECRET not in str(info.value)
    assert "app:***@db.internal" in str(info.value)


def test_production_ssl_mode_below_verify_overrides_a_verifying_url() -> None:
    with pytest.raises(ConfigurationError, match="sslmode=require"):
        production(database_url=PG_TLS, ssl_mode="require", redis_url=REDIS_TLS)


def test_production_checks_the_migrate_url_too() -> None:
    with pytest.raises(ConfigurationError) as info:
        production(database_url=PG_TLS, migrate_database_url=PG, redis_url=REDIS_TLS)
    assert info.value.field == "migrate_database_url"


def test_production_checks_the_replica_urls_too() -> None:
    production(database_url=PG_TLS, replica_urls=f"{PG_TLS},{PG_TLS}", redis_url=REDIS_TLS)
    with pytest.raises(ConfigurationError) as info:
        production(database_url=PG_TLS, replica_urls=f"{PG_TLS},{PG}", redis_url=REDIS_TLS)
    assert info.value.field == "replica_urls"
    assert SECRET not in str(info.value)


def test_production_refuses_missing_urls() -> None:
    with pytest.raises(ConfigurationError, match="production needs DATABASE_URL") as info:
        production(redis_url=REDIS_TLS)
    assert info.value.field == "database_url"
    with pytest.raises(ConfigurationError, match="production needs REDIS_URL") as info:
        production(database_url=PG_TLS)
    assert info.value.field == "redis_url"


@pytest.mark.parametrize("redis", ["redis://cache:6379/0", f"redis://:{SECRET}@cache/0"])
def test_production_refuses_plaintext_redis(redis: str) -> None:
    with pytest.raises(ConfigurationError, match="rediss://") as info:
        production(database_url=PG_TLS, redis_url=redis)
    assert info.value.field == "redis_url"
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql:///chatapp_db?host=/var/run/postgresql",
        "postgresql://app@/chatapp_db?host=/var/run/postgresql",
        "postgresql://app@%2Fvar%2Frun%2Fpostgresql/chatapp_db",
    ],
)
def test_production_allows_unix_sockets(url: str) -> None:
    settings = production(database_url=url, redis_url="unix:///run/redis.sock")
    assert settings.database_url is not None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@/chatapp_db?host=/run/pg,db.internal",
        # asyncpg connects to the authority's host, over the network, whatever ?host= says.
        "postgresql://app@db.internal/chatapp_db?host=/run/pg",
    ],
)
def test_production_refuses_a_mix_of_socket_and_network_hosts(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        production(database_url=url, redis_url=REDIS_TLS)
    assert info.value.field == "database_url"


# -- secrets ------------------------------------------------------------------------------


def test_passwords_never_appear_in_repr_or_str() -> None:
    settings = Settings(database_url=PG, redis_url=REDIS_TLS, migrate_database_url=PG)
    for text in (repr(settings), str(settings), f"{settings}", repr(settings.database_url)):
        assert SECRET not in text
    assert "postgresql://app:***@db.internal:5432/chatapp_db" in repr(settings)
    assert "rediss://:***@cache.internal:6380/0" in repr(settings)
    endpoints = Endpoints(
        database_url=PG,
        redis_url=REDIS_TLS,
        migrate_database_url=PG,
        embedded_database=False,
        embedded_redis=False,
        data_dir=None,
    )
    assert SECRET not in repr(endpoints)
    assert "app:***@" in repr(endpoints)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("postgresql://u:p%40ss@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        # The standard parser fails on these; redaction must not.
        ("postgresql://u:pw@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u:pw@h:port/db", "postgresql://u:***@h:port/db"),
        # Passwords in the query, as libpq and asyncpg accept them.
        ("postgresql://u@h/db?password=pw&sslmode=require", None),
        ("postgresql://u@h/db?sslpassword=pw", None),
        ("http://[::1", "<unparseable url>"),
    ],
)
def test_redact_url(url: str, expected: str | None) -> None:
    redacted = redact_url(url)
    if expected is not None:
        assert redacted == expected
    assert "pw" not in redacted.replace("password", "").replace("sslpassword", "")
    if "?" in url:
        assert "sslmode=require" in redacted or "sslmode" not in url
        assert "=***" in redacted


# -- role passwords (for `chatkeep setup`) ------------------------------------------------


@pytest.mark.parametrize("field", ["app_password", "migrator_password", "readonly_password"])
def test_role_passwords_are_checked_and_never_shown(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"CHATKEEP_{field.upper()}", "long-enough-secret-1")
    settings = Settings()
    secret = getattr(settings, field)
    assert secret.get_secret_value() == "long-enough-secret-1"
    assert "long-enough-secret-1" not in repr(settings)
    assert f"{field}=SecretStr('**********')" in repr(settings)
    monkeypatch.setenv(f"CHATKEEP_{field.upper()}", "short")
    with pytest.raises(ConfigurationError) as info:
        Settings()
    assert info.value.field == field
    assert "short" not in str(info.value).replace("12 to 256", "")
    monkeypatch.setenv(f"CHATKEEP_{field.upper()}", "")
    assert getattr(Settings(), field) is None
