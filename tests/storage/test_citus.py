"""chatkeep.storage.citus on plain PostgreSQL: what it refuses, and the roles it asks for.

`chatkeep setup --citus` on a real cluster is tested by tests/citus/.
"""

from __future__ import annotations

import asyncpg
import pytest

from chatkeep.config import Settings
from chatkeep.errors import InvalidInput
from chatkeep.storage.bootstrap import OWNER_ROLE, RLS_ROLE, ROLES
from chatkeep.storage.citus import CITUS_ROLES, is_citus, prepare_citus


def test_citus_roles_let_the_owner_and_the_rls_role_log_in_and_change_nothing_else() -> None:
    plain = {r.name: r for r in ROLES}
    for spec in CITUS_ROLES:
        if spec.name in (OWNER_ROLE, RLS_ROLE):
            assert spec.login
            assert not plain[spec.name].login
            assert spec.bypass_rls == plain[spec.name].bypass_rls
        else:
            assert spec == plain[spec.name]
    assert [r.name for r in CITUS_ROLES] == [r.name for r in ROLES]


async def test_a_plain_server_is_not_a_citus_coordinator(
    admin_url: str, conn: asyncpg.Connection
) -> None:
    assert await is_citus(conn) is False
    with pytest.raises(InvalidInput, match="has no citus extension") as info:
        await prepare_citus(admin_url, Settings(database_url=admin_url))
    assert info.value.field == "database_url"
    assert info.value.rule == "must be a Citus coordinator"
