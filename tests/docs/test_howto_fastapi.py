"""docs/howto/fastapi.md's own code, run: an app written only from that page works.

The page's ``python`` blocks, in order, make one module; the test imports it and calls
the app it builds, on this test's database and Redis.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient

from chatkeep import Settings

PAGE = Path(__file__).resolve().parents[2] / "docs" / "howto" / "fastapi.md"


def page_module(tmp_path: Path) -> ModuleType:
    blocks = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) >= 3
    source = tmp_path / "howto_fastapi_app.py"
    source.write_text("\n\n".join(blocks), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("howto_fastapi_app", source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # FastAPI resolves the page's annotations through it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture
def settings(make_settings: Callable[..., Settings], app_url: str, redis_url: str) -> Settings:
    return make_settings(database_url=app_url)


def test_the_fastapi_howto_page_builds_a_working_app(tmp_path: Path, settings: Settings) -> None:
    module = page_module(tmp_path)
    assert module.app is not None  # the page's module-level app (not started here)
    with TestClient(module.create_app(settings)) as client:
        account = {"email": "ann@example.org", "username": "ann", "password": "correct horse"}
        assert client.post("/api/auth/register", json=account).status_code == 201
        token = client.post(
            "/api/auth/login", json={"email": account["email"], "password": account["password"]}
        ).json()
        auth = {"Authorization": f"Bearer {token['access_token']}"}
        assert client.get("/hello", headers=auth).json() == {"hello": "ann"}
        assert client.get("/hello").status_code == 401
        room = client.post("/team-rooms", headers=auth, json={"name": "team"})
        assert room.status_code == 201
        room_id = room.json()["id"]
        sent = client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": "hi"})
        assert sent.status_code == 201
        assert client.get("/unread-total", headers=auth).json() == {"total": 0}  # one's own
        bob = {"email": "bob@example.org", "username": "bob", "password": "battery staple"}
        client.post("/api/auth/register", json=bob)
        bob_token = client.post(
            "/api/auth/login", json={"email": bob["email"], "password": bob["password"]}
        ).json()["access_token"]
        bob_auth = {"Authorization": f"Bearer {bob_token}"}
        assert client.post(f"/api/rooms/{room_id}/join", headers=bob_auth).status_code == 200
        assert client.get("/unread-total", headers=bob_auth).json() == {"total": 1}
        bad = client.post(f"/api/rooms/{room_id}/messages", headers=auth, json={"content": ""})
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "content"
        with client.websocket_connect(
            f"/api/rooms/{room_id}/events?token={token['access_token']}"
        ) as ws:
            assert ws.receive_json()["message"]["content"] == "hi"
