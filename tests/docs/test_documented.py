"""Everything a user can meet is documented: each error class and each command.

Both lists are read from the code at test time, so an error class or a command added later
fails this test until the docs mention it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import typer.main

import chatkeep
import chatkeep.errors
from chatkeep.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
CLI_REFERENCE = DOCS / "cli.md"
REGENERATE = (
    "typer chatkeep.cli utils docs --name chatkeep --title 'Command-line reference' "
    "--output docs/cli.md"
)


def all_docs() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))


def error_classes() -> list[str]:
    return sorted(
        name
        for name, value in vars(chatkeep.errors).items()
        if inspect.isclass(value) and issubclass(value, chatkeep.errors.ChatkeepError)
    )


def command_paths() -> list[str]:
    """``chatkeep``, ``chatkeep migrate``, ``chatkeep migrate up``... every registered one."""
    paths: list[str] = []

    def walk(command: object, path: str) -> None:
        if getattr(command, "hidden", False):
            return
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "chatkeep")
    return paths


def test_every_error_class_is_in_troubleshooting() -> None:
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,3} (\w+)$", text, re.MULTILINE))
    names = error_classes()
    assert len(names) >= 13  # the tree as of this test; more is fine
    missing = [name for name in names if name not in headings]
    assert not missing, f"docs/troubleshooting.md needs a section for: {', '.join(missing)}"


def test_every_command_is_documented() -> None:
    text = all_docs()
    paths = command_paths()
    assert {"chatkeep backup", "chatkeep restore", "chatkeep migrate up"} <= set(paths)
    missing = [p for p in paths if f"`{p}`" not in text and f"{p} " not in text]
    assert not missing, f"undocumented commands: {', '.join(missing)}; run {REGENERATE}"


def test_the_command_reference_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "cli.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "typer",
            "chatkeep.cli",
            "utils",
            "docs",
            "--name",
            "chatkeep",
            "--title",
            "Command-line reference",
            "--output",
            str(fresh),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    current = CLI_REFERENCE.read_text(encoding="utf-8")
    assert current == fresh.read_text(encoding="utf-8"), f"docs/cli.md is stale: run {REGENERATE}"


def test_every_public_module_is_in_the_api_reference() -> None:
    reference = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)$", reference, re.MULTILINE))
    modules = []
    for info in pkgutil.walk_packages(chatkeep.__path__, "chatkeep."):
        name = info.name
        if info.ispkg or name.startswith("chatkeep.cli") or "._" in name:
            continue
        module = importlib.import_module(name)
        if getattr(module, "__all__", None):
            modules.append(name)
    assert "chatkeep.facade" in modules
    missing = sorted(set(modules) - documented)
    assert not missing, f"add `::: module` lines under docs/reference/ for: {', '.join(missing)}"
