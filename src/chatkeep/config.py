"""Settings: the one place chatkeep reads the environment.

Every knob is a field of :class:`Settings`, read from environment variables (``DATABASE_URL``,
``REDIS_URL`` and ``CHATKEEP_*``) or passed as keyword arguments. Nothing else in the library
reads ``os.environ``.

Secrets (the passwords inside the URLs) are kept as :class:`pydantic.SecretStr` and the
``repr`` and every message show URLs with the password replaced by ``***``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from chatkeep import urls
from chatkeep.errors import ConfigurationError, InvalidInput

# Kept importable from here, where it lived before chatkeep.urls: callers use it widely.
from chatkeep.urls import redact as redact_url

__all__ = ["DEFAULT_DATABASE_NAME", "Settings", "redact_url"]

DEFAULT_DATABASE_NAME: Final = "chatapp_db"

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
_VERIFYING_MODES: Final = frozenset({"verify-ca", "verify-full"})

PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


def _check_hosts(url: str) -> None:
    """Refuse a malformed port early, with the field named, instead of deep in the driver."""
    try:
        urls.hosts(url)
    except InvalidInput as exc:  # pydantic turns a ValueError into the field's error
        raise ValueError(exc.rule) from None


class Settings(BaseSettings):
    """How chatkeep reaches its stores and how it behaves there.

    With ``database_url`` and ``redis_url`` unset, the command-line tool and the test suite
    start embedded servers (PostgreSQL 18 and Valkey) with their data in ``data_dir``.

    Example:
        >>> Settings(database_url="postgresql://app@db/chatapp_db").pool_max_size
        20
    """

    model_config = SettingsConfigDict(
        env_prefix="CHATKEEP_",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        validate_default=True,
        # pydantic's own messages would echo the input, URLs with passwords included.
        hide_input_in_errors=True,
    )

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL; unset means the embedded server.",
    )
    migrate_database_url: SecretStr | None = Field(
        default=None,
        validation_alias="CHATKEEP_MIGRATE_DATABASE_URL",
        description="URL migrations and setup connect with (defaults to database_url).",
    )
    relay_database_url: SecretStr | None = Field(
        default=None,
        validation_alias="CHATKEEP_RELAY_DATABASE_URL",
        description=(
            "URL the outbox relay reads every room's change log with: a role row security "
            "does not confine to one user, such as chatapp_readonly (defaults to database_url)."
        ),
    )
    replica_urls: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        validation_alias="CHATKEEP_REPLICA_URLS",
        description=(
            "Streaming replicas of DATABASE_URL's server, comma-separated: reads that may lag "
            "(history pages, room lists, unread counts) go there (docs/operations.md)."
        ),
    )
    replica_max_lag: PositiveSeconds = Field(
        default=2.0,
        description=(
            "A replica further behind the primary than this many seconds is bypassed "
            "(reads go to the primary until it catches up)."
        ),
    )
    replica_check_interval: PositiveSeconds = Field(
        default=0.2,
        description="Seconds between two measurements of each replica's replay position.",
    )
    replica_fence: Literal["redis", "process"] = Field(
        default="redis",
        description=(
            "Where a user's recent writes are remembered for read-your-writes: `redis` (every "
            "process of the deployment sees them) or `process` (this process only)."
        ),
    )
    redis_url: SecretStr | None = Field(
        default=None,
        validation_alias="REDIS_URL",
        description=(
            "Redis URL (redis://, rediss:// or unix://; redis+cluster://host:port or "
            "rediss+cluster:// for a Redis Cluster); unset means embedded Valkey."
        ),
    )
    env: Literal["development", "production"] = Field(
        default="development", validation_alias="CHATKEEP_ENV"
    )
    pool_min_size: int = Field(default=2, ge=0, le=1000)
    pool_max_size: int = Field(default=20, ge=1, le=1000)
    pool_idle_timeout: PositiveSeconds = Field(
        default=300.0, description="Seconds an idle pooled connection lives before closing."
    )
    statement_timeout: PositiveSeconds = Field(
        default=30.0, description="Server-side statement_timeout for application queries."
    )
    statement_timeout_grace: PositiveSeconds = Field(
        default=5.0,
        description=(
            "Seconds past statement_timeout the client waits for a silent server before "
            "it aborts the connection and raises Unavailable."
        ),
    )
    connect_timeout: PositiveSeconds = Field(
        default=10.0, description="Seconds to wait for a new connection to either store."
    )
    redis_timeout: PositiveSeconds = Field(
        default=1.0,
        description=(
            "Seconds one Redis operation may take in all (connecting and retries "
            "included) before Unavailable."
        ),
    )
    redis_best_effort_timeout: PositiveSeconds = Field(
        default=0.5,
        description=(
            "Seconds a write gives Redis work it can do without (the send limit; cache "
            "invalidations and events after the commit) before it goes on without it."
        ),
    )
    send_group_commit: bool = Field(
        default=True,
        description=(
            "Gather concurrent send_message calls of this process into one statement "
            "(group commit); False sends each alone, in its caller's task."
        ),
    )
    send_batch_size: int = Field(
        default=64,
        ge=1,
        le=1000,
        description=(
            "The most sends in one group-commit batch (one statement; 1 writes each "
            "send alone but still gathers nothing)."
        ),
    )
    send_batch_window: float = Field(
        default=0.002,
        ge=0,
        le=10,
        description=(
            "Seconds a send may wait for a busy writer before its batch leaves anyway; "
            "a send that finds a free writer leaves at once."
        ),
    )
    send_batches_in_flight: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Batches written at once before sends start to gather.",
    )
    member_cache_lease_ttl: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description=(
            "Seconds the member cache's fill lease lasts: the load of a room's member list "
            "must finish within it, or its set is not stored (the next call loads again). "
            "Raise it when big rooms load slowly (a busy server, rooms of many thousands)."
        ),
    )
    slow_query_threshold: PositiveSeconds = Field(
        default=0.5, description="Operations slower than this are logged at WARNING."
    )
    statement_cache_size: int = Field(
        default=100,
        ge=0,
        description="asyncpg prepared-statement cache; set 0 behind PgBouncer transaction mode.",
    )
    change_log_keep: int | None = Field(
        default=100_000,
        ge=1,
        description=(
            "Retention of the room change log: each room keeps at most its newest this many "
            "changes (None: no count bound). Applied by `chatkeep prune-changes`."
        ),
    )
    change_log_max_age_days: float | None = Field(
        default=30.0,
        gt=0,
        le=36_500,
        description=(
            "Retention of the room change log: changes older than this many days are pruned "
            "(None: no age bound). Applied by `chatkeep prune-changes`."
        ),
    )
    ssl_mode: SslMode | None = Field(
        default=None, description="PostgreSQL sslmode; overrides sslmode in the URL."
    )
    ssl_ca_file: Path | None = Field(
        default=None, description="CA bundle that verifies the PostgreSQL server certificate."
    )
    redis_key_prefix: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    redis_cluster_mode: bool = False
    search_config: str = Field(
        default="simple",
        pattern=r"^[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?$",
        description=(
            "Text search configuration of ChatKeep.search (a name, optionally schema-"
            "qualified); a GIN index on to_tsvector('<name>', content) must exist for it."
        ),
    )
    citus: bool = Field(
        default=False,
        description="The database is a Citus coordinator set up by `chatkeep setup --citus`.",
    )
    application_name: str = Field(default="chatkeep", min_length=1, max_length=63)
    data_dir: Path = Field(
        default=Path(".chatkeep"),
        description="Where the embedded servers keep their data between runs.",
    )
    migrate_lock_timeout: PositiveSeconds = Field(
        default=60.0, description="Seconds a migrator waits for another to finish."
    )
    migrate_statement_lock_timeout: PositiveSeconds = Field(
        default=10.0, description="lock_timeout for each migration statement."
    )
    migrate_statement_timeout: PositiveSeconds = Field(
        default=600.0, description="statement_timeout for each migration statement."
    )
    migration_locations: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "The application's folders of migrations, applied after chatkeep's, each "
            "DIR or NAME=DIR, comma-separated in CHATKEEP_MIGRATION_LOCATIONS."
        ),
    )
    # Passwords `chatkeep setup` gives the login roles; unset means "generate one when the
    # role is created, print it once, and never change an existing role's password".
    app_password: SecretStr | None = Field(
        default=None, description="Password of chatapp_app (CHATKEEP_APP_PASSWORD)."
    )
    migrator_password: SecretStr | None = Field(
        default=None, description="Password of chatapp_migrator (CHATKEEP_MIGRATOR_PASSWORD)."
    )
    readonly_password: SecretStr | None = Field(
        default=None, description="Password of chatapp_readonly (CHATKEEP_READONLY_PASSWORD)."
    )

    @field_validator("app_password", "migrator_password", "readonly_password")
    @classmethod
    def _check_role_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        secret = value.get_secret_value()
        # Printable ASCII only: PostgreSQL SASLprep-normalises other passwords, and the
        # SCRAM verifier setup computes client-side must hash exactly what clients send.
        if not (12 <= len(secret) <= 256 and secret.isascii() and secret.isprintable()):
            raise ValueError("must be 12 to 256 printable ASCII characters")
        return value

    @field_validator("migration_locations", mode="before")
    @classmethod
    def _split_locations(cls, value: Any) -> Any:
        # Flyway's spelling: one environment variable, comma-separated.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split_replica_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("replica_urls")
    @classmethod
    def _check_replica_urls(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        checked = tuple(cls._check_postgres_url(url) for url in value)
        if len(checked) > 16:
            raise ValueError("at most 16 replicas")
        return tuple(url for url in checked if url is not None)

    @field_validator("database_url", "migrate_database_url", "relay_database_url")
    @classmethod
    def _check_postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        scheme = urlsplit(url).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql:// or postgres://")
        _check_hosts(url)
        # Without a database named, the driver would connect to the one named like the user,
        # and `setup` and `migrate` would quietly work on different databases.
        return SecretStr(urls.with_default_database(url, DEFAULT_DATABASE_NAME))

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in urls.REDIS_SCHEMES | urls.REDIS_CLUSTER_SCHEMES:
            raise ValueError(
                "must start with redis://, rediss://, unix://, "
                "redis+cluster:// or rediss+cluster://"
            )
        if scheme != "unix":
            _check_hosts(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        # ConfigurationError, not ValueError: pydantic lets it through as raised, so the
        # field it names is the one at fault rather than "the settings as a whole".
        if self.pool_min_size > self.pool_max_size:
            raise ConfigurationError(
                "pool_min_size: must not exceed pool_max_size", field="pool_min_size"
            )
        if self.ssl_ca_file is not None and not self.ssl_ca_file.is_file():
            raise ConfigurationError(
                f"ssl_ca_file: {self.ssl_ca_file} is not a readable file", field="ssl_ca_file"
            )
        if self.env == "production":
            self._check_production_tls()
        return self

    def _check_production_tls(self) -> None:
        named: list[tuple[str, SecretStr | None]] = [
            (name, getattr(self, name))
            for name in ("database_url", "migrate_database_url", "relay_database_url")
        ]
        named += [("replica_urls", url) for url in self.replica_urls]
        for name, secret in named:
            if secret is None:
                if name == "database_url":
                    raise ConfigurationError(
                        "database_url: production needs DATABASE_URL; the embedded server "
                        "is for development",
                        field=name,
                    )
                continue
            url = secret.get_secret_value()
            if urls.is_unix_socket(url):
                continue  # a local socket never crosses a network
            mode = self.ssl_mode or urls.sslmode(url)
            if mode not in _VERIFYING_MODES:
                raise ConfigurationError(
                    f"{name}: must use TLS with certificate verification in production "
                    "(sslmode=verify-full or verify-ca); "
                    f"got sslmode={mode or 'unset'} for {redact_url(url)}",
                    field=name,
                )
        if self.redis_url is None:
            raise ConfigurationError(
                "redis_url: production needs REDIS_URL; embedded Valkey is for development",
                field="redis_url",
            )
        redis = self.redis_url.get_secret_value()
        if urlsplit(redis).scheme not in (
            "rediss",
            "valkeys",
            "unix",
            "rediss+cluster",
            "valkeys+cluster",
        ):
            raise ConfigurationError(
                f"redis_url: must use rediss:// (TLS) in production; got {redact_url(redis)}",
                field="redis_url",
            )

    @model_validator(mode="wrap")
    @classmethod
    def _as_configuration_error(
        cls, data: Any, handler: ModelWrapValidatorHandler[Settings]
    ) -> Settings:
        # Callers only ever see chatkeep.errors: a bad value raises ConfigurationError
        # naming the field and the rule, never the value (it may hold a password).
        try:
            return handler(data)
        except ValidationError as exc:
            problems: list[tuple[str, str]] = []
            for error in exc.errors(include_input=False, include_url=False, include_context=False):
                loc = [str(part) for part in error["loc"]]
                if loc:
                    loc[0] = _FIELD_BY_ALIAS.get(loc[0].upper(), loc[0])
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append((".".join(loc) or "settings", message))
            # Every problem, named: one fix at a time would take as many runs.
            text = "; ".join(f"{field}: {message}" for field, message in problems)
            raise ConfigurationError(text, field=problems[0][0]) from None

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read settings from the environment and ``overrides``.

        The same as ``Settings(**overrides)``; kept as the name that says what it does.

        Raises:
            ConfigurationError: a value is missing, malformed or unsafe. The message names
                the field and the rule, never the value (it may hold a password).
        """
        return cls(**overrides)

    @property
    def embedded_database(self) -> bool:
        """True when no DATABASE_URL is set and the embedded PostgreSQL is used."""
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        """True when no REDIS_URL is set and the embedded Valkey is used."""
        return self.redis_url is None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if isinstance(value, SecretStr) and str(name).endswith("_password"):
                yield name, value  # SecretStr's own repr: '**********'
            elif isinstance(value, SecretStr):
                yield name, redact_url(value.get_secret_value())
            elif name == "replica_urls":
                yield name, tuple(redact_url(url.get_secret_value()) for url in value)
            else:
                yield name, value


# Environment variable names (upper-cased) to field names, so errors name the field.
_FIELD_BY_ALIAS: Final = {
    str(info.validation_alias).upper(): name
    for name, info in Settings.model_fields.items()
    if isinstance(info.validation_alias, str)
}
