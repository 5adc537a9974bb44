from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import chatkeep.realtime as realtime


def test_every_public_name_of_every_module_is_exported() -> None:
    exported = set(realtime.__all__)
    for module_info in pkgutil.iter_modules(realtime.__path__):
        module = importlib.import_module(f"chatkeep.realtime.{module_info.name}")
        for name in getattr(module, "__all__", []):
            if module_info.name in {"keys", "clock"} and name != "KeySpace":
                continue  # helpers for the services, not the application's API
            if name in {"ReuseHandler", "SocketTouch"}:
                continue
            assert name in exported, f"{module_info.name}.{name} is not exported"


def test_exports_resolve() -> None:
    for name in realtime.__all__:
        assert getattr(realtime, name) is not None
    assert sorted(realtime.__all__) == sorted(set(realtime.__all__))


def test_realtime_never_imports_postgres() -> None:
    for module_info in pkgutil.iter_modules(realtime.__path__):
        module = importlib.import_module(f"chatkeep.realtime.{module_info.name}")
        source = Path(module.__file__ or "").read_text()
        assert "asyncpg" not in source
        assert "chatkeep.storage" not in source
