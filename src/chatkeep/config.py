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
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatkeep.errors import ConfigurationError

__all__ = ["DEFAULT_DATABASE_NAME", "Settings", "redact_url"]

DEFAULT_DATABASE_NAME: Final = "chatapp_db"

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
_VERIFYING_MODES: Final = frozenset({"verify-ca", "verify-full"})

PositiveSeconds = Annotated[float, Field(gt=0, le=86_400)]


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _url_ssl_mode(url: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get("sslmode")
    return values[-1] if values else None


def _is_unix_socket_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    host_param = parse_qs(parts.query).get("host")
    return not parts.hostname and bool(host_param and host_param[-1].startswith("/"))


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
    redis_url: SecretStr | None = Field(
        default=None,
        validation_alias="REDIS_URL",
        description="Redis URL (redis://, rediss:// or unix://); unset means embedded Valkey.",
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
    connect_timeout: PositiveSeconds = Field(
        default=10.0, description="Seconds to wait for a new connection to either store."
    )
    slow_query_threshold: PositiveSeconds = Field(
        default=0.5, description="Operations slower than this are logged at WARNING."
    )
    statement_cache_size: int = Field(
        default=100,
        ge=0,
        description="asyncpg prepared-statement cache; set 0 behind PgBouncer transaction mode.",
    )
    ssl_mode: SslMode | None = Field(
        default=None, description="PostgreSQL sslmode; overrides sslmode in the URL."
    )
    ssl_ca_file: Path | None = Field(
        default=None, description="CA bundle that verifies the PostgreSQL server certificate."
    )
    redis_key_prefix: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    redis_cluster_mode: bool = False
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

    @field_validator("database_url", "migrate_database_url")
    @classmethod
    def _check_postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        scheme = urlsplit(url).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError("must start with postgresql:// or postgres://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size must not exceed pool_max_size")
        if self.ssl_ca_file is not None and not self.ssl_ca_file.is_file():
            raise ValueError(f"ssl_ca_file {self.ssl_ca_file} is not a readable file")
        if self.env == "production":
            self._check_production_tls()
        return self

    def _check_production_tls(self) -> None:
        for name in ("database_url", "migrate_database_url"):
            secret: SecretStr | None = getattr(self, name)
            if secret is None:
                if name == "database_url":
                    raise ValueError(
                        "production needs DATABASE_URL: the embedded server is for development"
                    )
                continue
            url = secret.get_secret_value()
            if _is_unix_socket_url(url):
                continue  # a local socket never crosses a network
            mode = self.ssl_mode or _url_ssl_mode(url)
            if mode not in _VERIFYING_MODES:
                raise ValueError(
                    f"{name} must use TLS with certificate verification in production "
                    "(sslmode=verify-full or verify-ca); "
                    f"got sslmode={mode or 'unset'} for {redact_url(url)}"
                )
        if self.redis_url is None:
            raise ValueError("production needs REDIS_URL: embedded Valkey is for development")
        redis = self.redis_url.get_secret_value()
        if urlsplit(redis).scheme not in ("rediss", "valkeys", "unix"):
            raise ValueError(
                f"REDIS_URL must use rediss:// (TLS) in production; got {redact_url(redis)}"
            )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Read settings from the environment and ``overrides``.

        Raises:
            ConfigurationError: a value is missing, malformed or unsafe. The message names
                the field and the rule, never the value (it may hold a password).
        """
        try:
            return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors(include_input=False, include_url=False)[0]
            field = ".".join(str(part) for part in first["loc"]) or "settings"
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigurationError(f"{field}: {message}", field=field) from None

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
            if isinstance(value, SecretStr):
                yield name, redact_url(value.get_secret_value())
            else:
                yield name, value
