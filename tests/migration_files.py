"""Migration files written by tests: a folder of them, and a one-table migration."""

from __future__ import annotations

from pathlib import Path

import pytest


def write(directory: Path, name: str, text: str) -> Path:
    """Write ``text`` to ``directory/name`` and return the path."""
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def table_migration(table: str, *, down: bool = True) -> str:
    """A migration creating ``table`` (and dropping it in its down part, if ``down``)."""
    text = f"-- chatkeep:up\nCREATE TABLE {table} (id int PRIMARY KEY);\n"
    if down:
        text += f"-- chatkeep:down\nDROP TABLE {table};\n"
    return text


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    """An empty migrations folder."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    return directory


@pytest.fixture
def three(mdir: Path) -> Path:
    """A folder of three simple migrations creating tables a, b, c."""
    for version, table in ((1, "a"), (2, "b"), (3, "c")):
        write(mdir, f"00{version}_create_{table}.sql", table_migration(table))
    return mdir
