"""The options every server benchmark shares (a module, not a script).

Each script measures in its own database on the server it is given and FLUSHes the Redis
logical database it is given; only the defaults differ (its database's name, a Redis
database of its own so two benchmarks can run side by side).
"""

from __future__ import annotations

import argparse
import os


def server_parser(
    doc: str | None, *, database_name: str, redis_db: int, app_password: bool = True
) -> argparse.ArgumentParser:
    """A parser with ``--database-url``, ``--redis-url``, ``--database-name`` (and
    ``--app-password``), described by the first paragraph of the script's ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres"),
        help="a superuser URL of the server; the benchmark uses its own database there",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}"),
        help="a Redis logical database of the benchmark's own (it is flushed)",
    )
    parser.add_argument(
        "--database-name",
        default=database_name,
        help="the benchmark's own database on the server",
    )
    if app_password:
        parser.add_argument("--app-password", default=None, help="chatapp_app's password, if any")
    return parser
