"""The public API: every ``__all__`` is complete, importable and free of strays."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

import chatkeep
import chatkeep.errors

# Modules with a public API of their own; each __all__ must be exact.
PUBLIC_MODULES = [
    "chatkeep",
    "chatkeep.config",
    "chatkeep.urls",
    "chatkeep.errors",
    "chatkeep.embedded",
    "chatkeep.storage.migrate",
    "chatkeep.storage.sqltext",
    "chatkeep.storage.catalog",
    "chatkeep.storage.bootstrap",
    "chatkeep.storage.errors",
]


def public_names(module: types.ModuleType) -> set[str]:
    """What a module defines or re-exports on purpose: public, not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        # names imported for the module's own use (typing helpers, stdlib) are not its API
        and getattr(value, "__module__", module.__name__).startswith("chatkeep")
    }


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_importable_and_sorted_without_duplicates(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    for member in exported:
        assert hasattr(module, member), f"{name}.__all__ names missing {member}"
    namespace: dict[str, object] = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the star import is the point
    assert set(exported) <= set(namespace)


def test_chatkeep_exports_everything_public_it_holds() -> None:
    exported = set(chatkeep.__all__)
    held = public_names(chatkeep) | {"__version__"}
    assert exported == held


def test_errors_exports_every_error_class() -> None:
    classes = {
        name
        for name, value in vars(chatkeep.errors).items()
        if inspect.isclass(value) and value.__module__ == "chatkeep.errors"
    }
    assert classes == set(chatkeep.errors.__all__)
    # The common ones are also at the top level, and are the same objects.
    for name in ("ChatkeepError", "NotFound", "Conflict", "InvalidInput", "Unavailable"):
        assert getattr(chatkeep, name) is getattr(chatkeep.errors, name)


@pytest.mark.parametrize(
    "name",
    [
        "chatkeep.config",
        "chatkeep.urls",
        "chatkeep.embedded",
        "chatkeep.storage.migrate",
        "chatkeep.storage.sqltext",
        "chatkeep.storage.catalog",
    ],
)
def test_module_all_covers_its_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    defined = {
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert defined <= set(module.__all__), defined - set(module.__all__)


def test_every_module_imports() -> None:
    # A fresh interpreter: no import only works because a test imported something first.
    modules = [m.name for m in pkgutil.walk_packages(chatkeep.__path__, "chatkeep.")]
    assert "chatkeep.storage.migrate" in modules
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code, *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_version_is_a_string() -> None:
    assert isinstance(chatkeep.__version__, str)
    assert chatkeep.__version__.count(".") >= 2
