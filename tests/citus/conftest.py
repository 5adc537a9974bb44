"""A real Citus cluster for the Citus suite: a coordinator and two workers on loopback.

The cluster comes from ``../shared/citus/cluster.sh`` (``CHATKEEP_CITUS_CLUSTER_SH`` names
another copy): started here when its coordinator does not answer, and stopped at the end
of the session; a cluster already running (another session's, or a developer's) is used
and left running. Without cluster.sh the suite is skipped, except under ``CI=true``, where
it fails: CI must run it.

Each test module gets a fresh database on the cluster, made as ``chatkeep setup --citus``
makes it and migrated in Citus mode, dropped on every node at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from chatkeep import urls
from chatkeep.cli import app
from chatkeep.storage.migrate import CITUS_BASELINE, Migration, load_migrations

ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("CITUS_PORT_BASE", "9700"))
WORKERS = (PORT + 1, PORT + 2)


def _cluster_script() -> Path:
    named = os.environ.get("CHATKEEP_CITUS_CLUSTER_SH")
    return Path(named) if named else ROOT.parent / "shared" / "citus" / "cluster.sh"


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@pytest.fixture(scope="session")
def citus_coordinator() -> Iterator[str]:
    """The coordinator's maintenance URL, the cluster started if it was not running."""
    script = _cluster_script()
    started = False
    if not _answers(PORT):
        if not script.is_file():
            reason = f"no Citus cluster: {script} is missing"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI must run the Citus suite)")
            pytest.skip(reason)
        subprocess.run([str(script), "start"], check=True, capture_output=True, timeout=300)
        started = True
    user = os.environ.get("USER") or "root"
    try:
        yield f"postgresql://{user}@127.0.0.1:{PORT}/postgres"
    finally:
        if started:
            subprocess.run([str(script), "stop"], check=False, capture_output=True, timeout=120)


async def _drop_everywhere(admin_url: str, name: str) -> None:
    for port in (PORT, *WORKERS):
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(urls.with_host(admin_url, "127.0.0.1", port))
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


def citus_unready() -> Migration | None:
    """The first of chatkeep's migrations that has no Citus part (``None``: all have one)."""
    return next(
        (m for m in load_migrations() if m.version > CITUS_BASELINE and not m.citus_ready), None
    )


def citus_supported() -> int:
    """The newest version ``migrate up`` reaches on Citus."""
    unready = citus_unready()
    shipped = [m.version for m in load_migrations()]
    return max(v for v in shipped if unready is None or v < unready.version)


@pytest.fixture(scope="module")
def citus_database(citus_coordinator: str) -> Iterator[str]:
    """A superuser URL of a fresh database on the cluster, made as the docs say.

    ``chatkeep setup --citus`` then ``chatkeep migrate up``, both through the command line.
    """
    name = f"chatkeep_h8_citus_{uuid.uuid4().hex[:8]}"
    url = urls.with_database(citus_coordinator, name)
    # Only what is passed: the caller's DATABASE_URL / CHATKEEP_* must not leak in.
    env: dict[str, str | None] = {
        key: None for key in os.environ if key == "DATABASE_URL" or key.startswith("CHATKEEP_")
    }
    try:
        setup = CliRunner().invoke(
            app, ["setup", "--citus", "--database-url", url], env={"COLUMNS": "200", **env}
        )
        assert setup.exit_code == 0, (setup.output, setup.exception)
        workers = ", ".join(f"127.0.0.1:{port}" for port in WORKERS)
        assert f"citus: database on the coordinator and workers {workers}" in setup.stdout
        up = ["migrate", "up", "--database-url", url]
        unready = citus_unready()
        if unready is not None:
            # A chatkeep migration without a Citus part: refused before anything runs, the
            # error naming it and what to run instead; then up to what Citus supports.
            refused = CliRunner().invoke(app, up, env={"COLUMNS": "200", **env})
            assert refused.exit_code != 0, refused.output
            said = " ".join(refused.output.split())
            assert f"{unready.path.name} has no '-- chatkeep:citus' part" in said, said
            assert f"migrate up --to {citus_supported()} applies" in said, said
            assert "nothing was applied" in said, said
            up += ["--to", str(citus_supported())]
        migrate = CliRunner().invoke(app, up, env={"COLUMNS": "200", **env})
        assert migrate.exit_code == 0, (migrate.output, migrate.exception)
        yield url
    finally:
        asyncio.run(_drop_everywhere(citus_coordinator, name))
