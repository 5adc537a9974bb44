"""One-time bootstrap (``chatkeep setup``): the database, its roles, and their grants.

Runs as a superuser (or the embedded server's owner). Every step checks before it acts, runs
under an advisory lock, and tolerates a concurrent run doing the same step, so running it
again is always safe.

The role model (docs/security.md explains it for operators)::

    chatapp_owner     NOLOGIN   owns the schema and every object in it
    chatapp_migrator  LOGIN     member of chatapp_owner: runs migrations (as the owner)
    chatapp_app       LOGIN     DML only where the application needs it, bound by row security
    chatapp_readonly  LOGIN     SELECT only (reporting, replicas), password hashes excluded
    chatapp_rls       NOLOGIN   BYPASSRLS; owns the row-security membership functions alone

None of the four ``chatapp_*`` roles besides ``chatapp_rls`` may bypass row security, and
none is a superuser. ``chatapp_rls`` cannot log in and no login role but the owner's members
can become it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import asyncpg
from pydantic import SecretStr

from chatkeep import urls
from chatkeep.config import DEFAULT_DATABASE_NAME, Settings
from chatkeep.errors import InvalidInput
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors

__all__ = [
    "APP_ROLE",
    "MIGRATOR_ROLE",
    "OWNER_ROLE",
    "READONLY_ROLE",
    "RLS_ROLE",
    "ROLES",
    "RoleSpec",
    "RolesReport",
    "SetupReport",
    "bootstrap",
    "database_name",
    "ensure_database",
    "ensure_roles",
    "maintenance_url",
    "prepare_database",
    "scram_verifier",
]

logger = logging.getLogger("chatkeep.setup")

OWNER_ROLE: Final = "chatapp_owner"
MIGRATOR_ROLE: Final = "chatapp_migrator"
APP_ROLE: Final = "chatapp_app"
READONLY_ROLE: Final = "chatapp_readonly"
RLS_ROLE: Final = "chatapp_rls"

# Advisory lock keys (first 8 bytes of sha256 of a name, as signed bigints). Roles are
# cluster-wide, so their lock is taken in the maintenance database every setup connects to.
_ROLES_LOCK: Final = int.from_bytes(
    hashlib.sha256(b"chatkeep.roles").digest()[:8], "big", signed=True
)
_DATABASE_LOCK: Final = int.from_bytes(
    hashlib.sha256(b"chatkeep.prepare").digest()[:8], "big", signed=True
)
_SCRAM_ITERATIONS: Final = 4096  # PostgreSQL's own default (scram_iterations)


@dataclass(frozen=True, slots=True)
class RoleSpec:
    """One role ``chatkeep setup`` creates, and the attributes it keeps it at."""

    name: str
    login: bool
    bypass_rls: bool
    member_of: tuple[str, ...]
    credential_field: str | None  # the Settings field holding its password, for login roles

    def attributes(self) -> str:
        """The attribute list of CREATE/ALTER ROLE that states every attribute explicitly."""
        return " ".join(
            (
                "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION INHERIT",
                "LOGIN" if self.login else "NOLOGIN",
                "BYPASSRLS" if self.bypass_rls else "NOBYPASSRLS",
            )
        )


ROLES: Final[tuple[RoleSpec, ...]] = (
    RoleSpec(RLS_ROLE, login=False, bypass_rls=True, member_of=(), credential_field=None),
    # The owner is a member of chatapp_rls only so migrations it runs may hand the membership
    # functions to chatapp_rls (ALTER FUNCTION ... OWNER needs membership of the new owner).
    RoleSpec(
        OWNER_ROLE, login=False, bypass_rls=False, member_of=(RLS_ROLE,), credential_field=None
    ),
    RoleSpec(
        MIGRATOR_ROLE,
        login=True,
        bypass_rls=False,
        member_of=(OWNER_ROLE,),
        credential_field="migrator_password",
    ),
    RoleSpec(APP_ROLE, login=True, bypass_rls=False, member_of=(), credential_field="app_password"),
    RoleSpec(
        READONLY_ROLE,
        login=True,
        bypass_rls=False,
        member_of=(),
        credential_field="readonly_password",
    ),
)

# Login roles that may connect to the application's database.
_CONNECT_ROLES: Final = (APP_ROLE, MIGRATOR_ROLE, READONLY_ROLE)
# Roles that reach objects in schema public (the owner owns it; the migrator inherits).
_USAGE_ROLES: Final = (APP_ROLE, READONLY_ROLE, RLS_ROLE)

_ROLE_STATE: Final = """
SELECT r.rolsuper, r.rolcanlogin, r.rolbypassrls, r.rolcreatedb, r.rolcreaterole,
       r.rolreplication, r.rolinherit
  FROM pg_roles r
 WHERE r.rolname = $1
"""

_IS_MEMBER: Final = """
SELECT EXISTS (
    SELECT 1
      FROM pg_auth_members m
     WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1)
       AND m.member = (SELECT oid FROM pg_roles WHERE rolname = $2)
)
"""

# Objects of schema public not owned by chatapp_owner (nor by chatapp_rls, which owns the
# membership functions on purpose), leaving out extension members and the sequences and
# row types that follow their table.
_FOREIGN_OWNED: Final = """
SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                      WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                      ELSE 'TABLE' END,
       format('%I.%I', n.nspname, c.relname)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public'
   AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
   AND pg_get_userbyid(c.relowner) NOT IN ($1, $2)
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype IN ('e', 'a', 'i'))
UNION ALL
SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE'
                      ELSE 'FUNCTION' END,
       p.oid::regprocedure::text
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public'
   AND pg_get_userbyid(p.proowner) NOT IN ($1, $2)
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                      AND d.deptype = 'e')
UNION ALL
SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
       format('%I.%I', n.nspname, t.typname)
  FROM pg_type t
  JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = 'public'
   AND (t.typtype IN ('e', 'd', 'r')
        OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
   AND pg_get_userbyid(t.typowner) NOT IN ($1, $2)
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
                      AND d.deptype = 'e')
"""


@dataclass(frozen=True, slots=True)
class RolesReport:
    """What :func:`ensure_roles` did.

    ``generated`` holds passwords made for roles created in this run: show them once, to
    the operator, and nowhere else (they are not stored anywhere).
    """

    created: tuple[str, ...] = ()
    corrected: tuple[str, ...] = ()
    passwords_set: tuple[str, ...] = ()
    generated: Mapping[str, SecretStr] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SetupReport:
    """What :func:`bootstrap` did, for ``chatkeep setup`` to print."""

    database: str
    database_created: bool
    roles: RolesReport
    adopted: tuple[str, ...]


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password``.

    Setting a role's password as a verifier computed here means the plaintext never reaches
    the server, so it cannot end up in its statement log or ``pg_stat_statements``.

    Args:
        password: printable ASCII (Settings enforces it: other text would need SASLprep).
        salt: 16 random bytes by default; fixed only in tests.
    """
    if not (password.isascii() and password.isprintable()):
        raise InvalidInput("password", "must be printable ASCII")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    # Only ever used on SCRAM verifiers (base64 and '$:'), which hold no quote; kept general.
    return "'" + text.replace("'", "''") + "'"


def database_name(dsn: str) -> str:
    """The database a URL points at (``chatapp_db`` when it names none)."""
    return urls.database_name(dsn) or DEFAULT_DATABASE_NAME


def maintenance_url(dsn: str, database: str = "postgres") -> str:
    """The same server and credentials, pointed at another database (``postgres``)."""
    return urls.with_database(dsn, database)


async def ensure_database(dsn: str, settings: Settings) -> bool:
    """Create the database ``dsn`` names if it does not exist; True if it was created.

    Raises:
        InvalidInput: the database name is not a plain identifier.
        Unavailable: the server cannot be reached.
        PermissionDenied: the role may not create databases.
    """
    name = database_name(dsn)
    if not name.replace("_", "").isalnum() or len(name) > 63:
        raise InvalidInput("database_url", "the database name must be letters, digits and _")
    conn = await connect(maintenance_url(dsn), settings, operation="setup")
    try:
        with translate_errors("setup"):
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                logger.info("database %s already exists", name)
                return False
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                return False  # a concurrent setup won the race; same outcome
            except asyncpg.UniqueViolationError:
                return False  # the same race, seen through pg_database's unique index
            logger.info("created database %s", name)
            return True
    finally:
        await asyncio.shield(conn.close())


async def ensure_roles(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    generate_passwords: bool = True,
    roles: Sequence[RoleSpec] = ROLES,
) -> RolesReport:
    """Create the ``chatapp_*`` roles, or bring existing ones back to their attributes.

    Runs in one transaction under an advisory lock, so concurrent setups queue instead of
    racing, and a failure leaves no role half-made. A password from the settings is set on
    every run (that is how to rotate one); without one, a role created now gets a generated
    password when ``generate_passwords`` is true (returned in the report, shown once), and
    an existing role's password is never touched.

    Args:
        conn: a superuser connection (any database of the cluster: roles are cluster-wide).
        settings: where the passwords come from (``CHATKEEP_*_PASSWORD``).
        generate_passwords: make passwords for new login roles (false for the embedded
            server, which trusts its private Unix socket).
        roles: the roles to ensure, parents before members (default: :data:`ROLES`).

    Raises:
        PermissionDenied: the connected role may not create roles or grant BYPASSRLS.
    """
    created: list[str] = []
    corrected: list[str] = []
    passwords_set: list[str] = []
    generated: dict[str, SecretStr] = {}
    with translate_errors("setup roles"):
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '60s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _ROLES_LOCK)
            for spec in roles:
                secret: SecretStr | None = (
                    getattr(settings, spec.credential_field) if spec.credential_field else None
                )
                password = secret.get_secret_value() if secret is not None else None
                state = await conn.fetchrow(_ROLE_STATE, spec.name)
                if state is None:
                    if password is None and spec.login and generate_passwords:
                        password = secrets.token_urlsafe(24)
                        generated[spec.name] = SecretStr(password)
                    clause = (
                        f" PASSWORD {_quote_literal(scram_verifier(password))}"
                        if password is not None
                        else ""
                    )
                    await conn.execute(
                        f"CREATE ROLE {_quote_ident(spec.name)} WITH {spec.attributes()}{clause}"
                    )
                    created.append(spec.name)
                    logger.info("created role %s", spec.name)
                else:
                    wanted = (False, spec.login, spec.bypass_rls, False, False, False, True)
                    if tuple(state.values()) != wanted:
                        await conn.execute(
                            f"ALTER ROLE {_quote_ident(spec.name)} WITH {spec.attributes()}"
                        )
                        corrected.append(spec.name)
                        logger.warning("role %s had other attributes; reset them", spec.name)
                    if password is not None:
                        await conn.execute(
                            f"ALTER ROLE {_quote_ident(spec.name)} "
                            f"PASSWORD {_quote_literal(scram_verifier(password))}"
                        )
                if secret is not None:
                    passwords_set.append(spec.name)
                for parent in spec.member_of:
                    if not await conn.fetchval(_IS_MEMBER, parent, spec.name):
                        await conn.execute(
                            f"GRANT {_quote_ident(parent)} TO {_quote_ident(spec.name)}"
                        )
    return RolesReport(tuple(created), tuple(corrected), tuple(passwords_set), generated)


async def prepare_database(conn: asyncpg.Connection) -> tuple[str, ...]:
    """Give the connected database to ``chatapp_owner`` and lock down its defaults.

    * schema ``public`` is owned by ``chatapp_owner``; nobody else may create in it, and
      only the chatkeep roles may use it;
    * only the three login roles may connect (``CONNECT`` revoked from PUBLIC);
    * objects already in ``public`` owned by someone else (a database migrated before
      these roles existed) are handed to ``chatapp_owner``.

    Returns:
        The objects whose owner changed, as ``KIND name``.

    Raises:
        PermissionDenied: the connected role is not a superuser (or the database owner).
    """
    adopted: list[str] = []
    with translate_errors("setup database"):
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '60s'")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _DATABASE_LOCK)
            name = await conn.fetchval("SELECT current_database()")
            owner = _quote_ident(OWNER_ROLE)
            schema_owner = await conn.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
            )
            if schema_owner != OWNER_ROLE:
                await conn.execute(f"ALTER SCHEMA public OWNER TO {owner}")
                adopted.append("SCHEMA public")
            usage = ", ".join(_quote_ident(r) for r in _USAGE_ROLES)
            login = ", ".join(_quote_ident(r) for r in _CONNECT_ROLES)
            await conn.execute(
                f"REVOKE ALL ON SCHEMA public FROM PUBLIC;"
                f"GRANT USAGE ON SCHEMA public TO {usage};"
                f"REVOKE ALL ON DATABASE {_quote_ident(name)} FROM PUBLIC;"
                f"GRANT CONNECT ON DATABASE {_quote_ident(name)} TO {login}"
            )
            for kind, object_name in await conn.fetch(_FOREIGN_OWNED, OWNER_ROLE, RLS_ROLE):
                await conn.execute(f"ALTER {kind} {object_name} OWNER TO {owner}")
                adopted.append(f"{kind} {object_name}")
    if adopted:
        logger.info(
            "gave %d object(s) to %s: %s",
            len(adopted),
            OWNER_ROLE,
            ", ".join(adopted),
            extra={"objects": len(adopted)},
        )
    return tuple(adopted)


async def bootstrap(
    dsn: str,
    settings: Settings,
    *,
    generate_passwords: bool = True,
    roles: Sequence[RoleSpec] = ROLES,
) -> SetupReport:
    """Everything ``chatkeep setup`` does: the database, the roles, the database's grants.

    Args:
        dsn: a superuser URL naming the application's database (created if missing).
        settings: connection options and the roles' passwords.
        generate_passwords: make passwords for login roles created now (see
            :func:`ensure_roles`).
        roles: the roles to ensure (Citus mode passes
            :data:`chatkeep.storage.citus.CITUS_ROLES`).

    Raises:
        InvalidInput: the database name is not a plain identifier.
        PermissionDenied: the role is not a superuser.
        Unavailable: the server cannot be reached.
    """
    created = await ensure_database(dsn, settings)
    admin = await connect(maintenance_url(dsn), settings, operation="setup")
    try:
        report = await ensure_roles(
            admin, settings, generate_passwords=generate_passwords, roles=roles
        )
    finally:
        await asyncio.shield(admin.close())
    target = await connect(dsn, settings, operation="setup")
    try:
        adopted = await prepare_database(target)
    finally:
        await asyncio.shield(target.close())
    return SetupReport(database_name(dsn), created, report, adopted)
