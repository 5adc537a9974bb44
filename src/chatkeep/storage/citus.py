"""Citus mode: chatkeep's database on a Citus coordinator and its workers.

``chatkeep setup --citus`` (:func:`prepare_citus`, after the plain setup) turns a database
of a Citus cluster into one the migrations can distribute:

* the database is made on every worker the coordinator's ``postgres`` database lists in
  ``pg_dist_node``, with the ``citus`` extension and the same lock-down as the
  coordinator's (schema ``public`` owned by ``chatapp_owner``, ``CONNECT`` for the
  chatkeep roles only);
* the coordinator's database gets the extension and the same nodes (Citus keeps its node
  list per database);
* ``chatapp_owner`` and ``chatapp_rls`` may log in: Citus opens its connections to the
  workers as the current user, and a migration runs as the owner (the owner's members and
  the membership functions' owner, too). They have no password: the nodes must let them in
  from the coordinator only (``pg_hba.conf`` / ``pg_dist_authinfo``, docs/operations.md);
* every chatkeep role starts its sessions with ``citus.propagate_set_commands = local``
  (the acting user, set with ``SET LOCAL app.user_id``, reaches the workers, where row
  security runs) and ``citus.allow_nested_distributed_execution = on`` (a policy or trigger
  on a shard looks up the row's own room in a colocated shard of the same node: see
  migrations/citus/012_distribute.sql for the rule that keeps every such query local).

The migration runner knows a Citus database by its extension: there, after a migration it
applies that migration's Citus part (:mod:`chatkeep.storage.migrate`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Final

import asyncpg

from chatkeep import urls
from chatkeep.config import Settings
from chatkeep.errors import InvalidInput
from chatkeep.storage.bootstrap import (
    APP_ROLE,
    MIGRATOR_ROLE,
    OWNER_ROLE,
    READONLY_ROLE,
    RLS_ROLE,
    ROLES,
    RoleSpec,
    database_name,
    ensure_database,
    maintenance_url,
    prepare_database,
)
from chatkeep.storage.database import connect
from chatkeep.storage.errors import translate_errors

__all__ = ["CITUS_ROLES", "ROLE_SETTINGS", "CitusReport", "is_citus", "prepare_citus"]

logger = logging.getLogger("chatkeep.setup")

CITUS_ROLES: Final[tuple[RoleSpec, ...]] = tuple(
    dataclasses.replace(spec, login=True) if spec.name in (OWNER_ROLE, RLS_ROLE) else spec
    for spec in ROLES
)
"""The roles of :data:`~chatkeep.storage.bootstrap.ROLES`, with the owner and
``chatapp_rls`` allowed to log in (Citus connects to the workers as them)."""

ROLE_SETTINGS: Final[tuple[tuple[str, str], ...]] = (
    ("citus.propagate_set_commands", "local"),
    ("citus.allow_nested_distributed_execution", "on"),
)
"""Session defaults every chatkeep role gets on a Citus cluster."""

_CHATKEEP_ROLES: Final = (RLS_ROLE, OWNER_ROLE, MIGRATOR_ROLE, APP_ROLE, READONLY_ROLE)
_NODES: Final = """
SELECT nodename, nodeport, groupid FROM pg_dist_node
 WHERE noderole = 'primary' AND isactive
 ORDER BY groupid, nodeid
"""


@dataclass(frozen=True, slots=True)
class CitusReport:
    """What :func:`prepare_citus` did."""

    coordinator: tuple[str, int]
    workers: tuple[tuple[str, int], ...]
    databases_created: tuple[tuple[str, int], ...]


async def is_citus(conn: asyncpg.Connection) -> bool:
    """Whether the connected database has the ``citus`` extension."""
    found = await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'citus'")
    return found is not None


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _cluster_nodes(
    dsn: str, settings: Settings
) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    admin = await connect(maintenance_url(dsn), settings, operation="setup")
    try:
        with translate_errors("setup citus"):
            if not await is_citus(admin):
                raise InvalidInput(
                    "database_url",
                    "must be a Citus coordinator",
                    "--citus: the server's postgres database has no citus extension; point "
                    "the URL at a Citus coordinator (its workers registered there)",
                )
            rows = await admin.fetch(_NODES)
    finally:
        await asyncio.shield(admin.close())
    coordinator = next(((r["nodename"], r["nodeport"]) for r in rows if r["groupid"] == 0), None)
    workers = [(r["nodename"], r["nodeport"]) for r in rows if r["groupid"] != 0]
    if coordinator is None or not workers:
        raise InvalidInput(
            "database_url",
            "must be a Citus coordinator with workers",
            "--citus: the coordinator's postgres database lists no coordinator host or no "
            "worker (citus_set_coordinator_host / citus_add_node there first)",
        )
    return coordinator, workers


async def _prepare_node(conn: asyncpg.Connection) -> None:
    with translate_errors("setup citus"):
        await conn.execute("CREATE EXTENSION IF NOT EXISTS citus")
    await prepare_database(conn)
    with translate_errors("setup citus"):
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(
            f"GRANT CONNECT ON DATABASE {_ident(name)} TO {_ident(OWNER_ROLE)}, {_ident(RLS_ROLE)}"
        )


async def prepare_citus(dsn: str, settings: Settings) -> CitusReport:
    """Make the database ``dsn`` names a Citus database on every node (see the module).

    Run after :func:`~chatkeep.storage.bootstrap.bootstrap` with :data:`CITUS_ROLES`, as a
    superuser of the coordinator whose credentials every worker accepts. Safe to rerun.

    Raises:
        InvalidInput: the server is not a Citus coordinator with workers.
        Unavailable: a node cannot be reached.
        PermissionDenied: the role is not a superuser.
    """
    coordinator, workers = await _cluster_nodes(dsn, settings)
    created: list[tuple[str, int]] = []
    for host, port in workers:
        worker_dsn = urls.with_host(dsn, host, port)
        if await ensure_database(worker_dsn, settings):
            created.append((host, port))
        conn = await connect(worker_dsn, settings, operation="setup")
        try:
            await _prepare_node(conn)
        finally:
            await asyncio.shield(conn.close())
    conn = await connect(dsn, settings, operation="setup")
    try:
        await _prepare_node(conn)
        with translate_errors("setup citus"):
            known = {(r["nodename"], r["nodeport"]) for r in await conn.fetch(_NODES)}
            if coordinator not in known:
                await conn.execute("SELECT citus_set_coordinator_host($1, $2)", *coordinator)
            for host, port in workers:
                if (host, port) not in known:
                    await conn.execute("SELECT citus_add_node($1, $2)", host, port)
            # From the coordinator's Citus database, so Citus gives them to the workers too.
            for role in _CHATKEEP_ROLES:
                for name, value in ROLE_SETTINGS:
                    await conn.execute(f"ALTER ROLE {_ident(role)} SET {name} = {value}")
    finally:
        await asyncio.shield(conn.close())
    logger.info(
        "citus: database %s on the coordinator and %d worker(s)",
        database_name(dsn),
        len(workers),
        extra={"workers": len(workers)},
    )
    return CitusReport(coordinator, tuple(workers), tuple(created))
