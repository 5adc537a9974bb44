"""The example chat application (examples/chat), end to end in headless Chromium.

The app is served by uvicorn on this test's database and Redis; two browser sessions
register, chat in one room, and one of them drops off the network (Chrome DevTools'
offline emulation, then a page reload) while the other sends, edits and deletes. When it
comes back its screen must match the other's: the same messages in the same order, no
deleted ones, edited contents shown.

Where no Chromium and chromedriver are installed the test is skipped, unless ``CI`` is
set: there it fails, so a CI machine without a browser cannot pass it silently. Set
``CHATKEEP_EXAMPLE_SCREENSHOT`` to a path to save a screenshot of the app there (that is
how ``docs/img/example-chat.png`` is made).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from starlette.websockets import WebSocketDisconnect

from chatkeep import Settings
from chatkeep.storage.users import MIN_BCRYPT_ROUNDS
from examples.chat.app import create_app
from tests.integrations.serving import uvicorn_server

WAIT = 15.0  # seconds for the page to show what the test waits for

# Each shown message as "author: content", with " (edited)" when it was edited.
MESSAGES_JS = """
return [...document.querySelectorAll('#messages li')].map(
    (li) => li.dataset.author + ': ' + li.querySelector('.content').textContent
        + (li.querySelector('.edited') ? ' (edited)' : ''));
"""
CLICK_ITEM_JS = """
const item = [...document.querySelectorAll(arguments[0])].find(
    (li) => (li.querySelector('.name') || li).textContent === arguments[1]);
if (item) item.click();
return Boolean(item);
"""
CLICK_OWN_JS = """
const item = [...document.querySelectorAll('#messages li.mine')].find(
    (li) => li.querySelector('.content').textContent === arguments[0]);
if (item) item.querySelector('button.' + arguments[1]).click();
return Boolean(item);
"""
BADGE_JS = """
const item = [...document.querySelectorAll('#rooms li')].find(
    (li) => li.querySelector('.name').textContent === arguments[0]);
return item ? item.querySelector('.badge').textContent : null;
"""


def find_browser() -> tuple[str, str]:
    """Chromium's binary and its driver, or a skip (a failure under CI) naming what's missing."""
    binary = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", binary), ("chromedriver", driver)) if not path
        )
        reason = f"{missing} not found (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the browser test: {reason}")
        pytest.skip(reason)
    return binary, driver


class ChatPage:
    """One browser session on the example app, driven the way a person uses it."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def wait(self, condition: Callable[[Any], object], what: str) -> Any:
        return WebDriverWait(self.driver, WAIT, poll_frequency=0.05).until(
            condition, message=f"timed out waiting for {what}"
        )

    def element(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def messages(self) -> list[str]:
        shown: list[str] = self.driver.execute_script(MESSAGES_JS)
        return shown

    def wait_messages(self, expected: list[str]) -> None:
        self.wait(lambda _: self.messages() == expected, f"messages {expected}")

    def register(self, name: str) -> None:
        self.driver.get(self.base_url)
        self.element("email").send_keys(f"{name}@example.org")
        self.element("username").send_keys(name)
        self.element("password").send_keys("correct horse battery")
        self.element("register").click()
        self.wait(lambda _: self.element("chat").is_displayed(), "the chat screen")

    def create_room(self, name: str) -> None:
        self.element("new-room-name").send_keys(name + Keys.ENTER)
        self.wait_room(name)

    def click_item(self, selector: str, text: str) -> bool:
        """Click the item of a list whose text (or ``.name``) is ``text``, if it is there.

        In the page, as a script: the lists are re-drawn whenever they change, which
        would leave a WebElement found a moment earlier stale.
        """
        clicked: bool = self.driver.execute_script(CLICK_ITEM_JS, selector, text)
        return clicked

    def join_public_room(self, name: str) -> None:
        self.element("refresh-public").click()
        self.wait(lambda _: self.click_item("#public-rooms li", f"# {name}"), f"room {name}")
        self.wait_room(name)

    def wait_room(self, name: str) -> None:
        """Wait until room ``name`` is open and its messages are shown."""
        self.wait(
            lambda _: (
                self.element("room-name").text == f"# {name}"
                and self.driver.execute_script("return document.body.dataset.loaded")
            ),
            f"room {name} open",
        )

    def open_room(self, name: str) -> None:
        self.wait(lambda _: self.click_item("#rooms li", f"# {name}"), f"room {name} listed")
        self.wait_room(name)

    def connected(self) -> bool:
        return self.element("connection").text == "connected"

    def send(self, text: str) -> None:
        before = len(self.messages())
        self.element("message-input").send_keys(text + Keys.ENTER)
        self.wait(lambda _: len(self.messages()) == before + 1, f"{text!r} sent")

    def _click_own(self, content: str, action: str) -> None:
        # The actions show on hover: a script click is what a pointer over them does.
        self.wait(
            lambda _: self.driver.execute_script(CLICK_OWN_JS, content, action),
            f"{action} of {content!r}",
        )

    def edit(self, content: str, new_content: str) -> None:
        self._click_own(content, "edit")
        field = self.element("message-input")
        field.clear()
        field.send_keys(new_content + Keys.ENTER)
        self.wait(lambda _: self.element("send").text == "Send", "the edit saved")

    def delete(self, content: str) -> None:
        self._click_own(content, "delete")
        self.wait(lambda _: all(content not in m for m in self.messages()), "the deletion")

    def badge(self, room: str) -> str:
        text: str = self.driver.execute_script(BADGE_JS, f"# {room}")
        return text

    def member_online(self, name: str) -> bool | None:
        """Whether the open room's member list shows ``name`` online (``None``: not listed)."""
        online: bool | None = self.driver.execute_script(
            "const li = [...document.querySelectorAll('#members li')].find("
            "(li) => li.textContent === arguments[0]);"
            "return li ? li.dataset.online === 'true' : null;",
            name,
        )
        return online

    def set_offline(self, offline: bool) -> None:
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )


@pytest.fixture
def browsers() -> Iterator[Callable[[], webdriver.Chrome]]:
    """A factory of headless Chromium sessions, all quit at the end."""
    binary, driver_path = find_browser()
    started: list[webdriver.Chrome] = []

    def start() -> webdriver.Chrome:
        options = Options()
        options.binary_location = binary
        for argument in (
            "--headless=new",
            "--no-sandbox",  # CI containers run as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1100,640",
        ):
            options.add_argument(argument)
        try:
            driver = webdriver.Chrome(options=options, service=Service(driver_path))
        except WebDriverException as exc:  # found but unusable: a failure, never a skip
            pytest.fail(f"chromium did not start: {exc.msg}")
        started.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in started:
            driver.quit()


def test_two_people_chat_and_a_dropped_one_catches_up(
    browsers: Callable[[], webdriver.Chrome], settings: Settings
) -> None:
    with uvicorn_server(create_app(settings, bcrypt_rounds=MIN_BCRYPT_ROUNDS)) as address:
        base_url = f"http://{address}/?page=3"
        ann, bob = ChatPage(browsers(), base_url), ChatPage(browsers(), base_url)
        ann.register("ann")
        ann.create_room("lobby")
        ann.create_room("random")
        bob.register("bob")
        bob.join_public_room("random")
        bob.join_public_room("lobby")

        # They chat: each sees the other's messages, live.
        ann.open_room("lobby")
        ann.wait(lambda _: ann.connected(), "ann connected")
        bob.wait(lambda _: bob.connected(), "bob connected")
        ann.send("hello bob")
        bob.wait_messages(["ann: hello bob"])
        bob.send("hi ann")
        ann.wait_messages(["ann: hello bob", "bob: hi ann"])
        # Presence dots and the typing indicator.
        ann.wait(lambda _: ann.member_online("bob") is True, "bob's dot online on ann's screen")
        bob.element("message-input").send_keys("typ")
        ann.wait(lambda _: ann.element("typing").text == "bob is typing…", "bob typing")
        bob.element("message-input").clear()

        # Unread badges: a message in a room bob does not have open.
        ann.open_room("random")
        ann.send("over here")
        bob.wait(lambda _: bob.badge("random") == "1", "bob's unread badge of random")
        assert bob.badge("lobby") == ""
        ann.open_room("lobby")
        ann.wait_messages(["ann: hello bob", "bob: hi ann"])
        ann.wait(lambda _: ann.connected(), "ann connected")

        # Ann's network goes; bob sends, edits and deletes meanwhile.
        ann.set_offline(True)
        ann.wait(lambda _: not ann.connected(), "ann's socket to drop")
        bob.wait(lambda _: bob.member_online("ann") is False, "ann's dot grey for bob")
        bob.send("while you were away")
        bob.send("a typo here")
        bob.send("and one more")
        bob.edit("hi ann", "hi ann, welcome")
        bob.delete("a typo here")
        expected = [
            "ann: hello bob",
            "bob: hi ann, welcome (edited)",
            "bob: while you were away",
            "bob: and one more",
        ]
        bob.wait_messages(expected)
        assert ann.messages() == ["ann: hello bob", "bob: hi ann"]  # nothing came through

        # Back online: ann's screen is brought up to date, in order.
        ann.set_offline(False)
        ann.wait(lambda _: ann.connected(), "ann reconnected")
        ann.wait_messages(expected)
        bob.wait(lambda _: bob.member_online("ann") is True, "ann's dot green again for bob")

        # Ann closes the page; bob edits and deletes again; ann's reloaded page matches.
        ann.driver.get("about:blank")
        bob.delete("while you were away")
        bob.edit("and one more", "and one more!")
        bob.send("bye")
        ann.driver.get(base_url)
        expected = [
            "ann: hello bob",
            "bob: hi ann, welcome (edited)",
            "bob: and one more! (edited)",
            "bob: bye",
        ]
        bob.wait_messages(expected)
        ann.wait_room("lobby")
        ann.wait_messages(expected[-3:])  # the newest page (page=3 in the URL)

        # Scrolling back: the older page comes with the button.
        ann.wait(lambda _: ann.element("load-older").is_displayed(), "the load-older button")
        ann.element("load-older").click()
        ann.wait_messages(expected)
        ann.wait(lambda _: not ann.element("load-older").is_displayed(), "no older page")

        screenshot = os.environ.get("CHATKEEP_EXAMPLE_SCREENSHOT")
        if screenshot:  # bob's screen, ann typing
            ann.element("message-input").send_keys("see you")
            bob.wait(lambda _: bob.element("typing").text == "ann is typing…", "ann typing")
            bob.element("message-input").send_keys("see you too")
            assert bob.driver.get_screenshot_as_file(str(Path(screenshot)))


def test_without_a_browser_it_skips_and_under_ci_it_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium and chromedriver not found"):
        find_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI needs the browser test"):
        find_browser()


# -- what the example adds to the router, through its HTTP API ------------------------------


def login(client: TestClient, name: str) -> dict[str, str]:
    account = {"email": f"{name}@example.org", "username": name, "password": "correct horse"}
    assert client.post("/api/auth/register", json=account).status_code == 201
    found = client.post(
        "/api/auth/login", json={"email": account["email"], "password": account["password"]}
    )
    return {"Authorization": f"Bearer {found.json()['access_token']}"}


def test_public_rooms_members_and_the_live_socket(settings: Settings) -> None:
    with TestClient(create_app(settings, bcrypt_rounds=MIN_BCRYPT_ROUNDS)) as client:
        ann, bob = login(client, "ann"), login(client, "bob")
        lobby = client.post("/api/rooms", headers=ann, json={"name": "lobby"}).json()["id"]
        hidden = client.post(
            "/api/rooms", headers=ann, json={"name": "hidden", "type": "private"}
        ).json()["id"]

        # Public rooms only, for anyone logged in.
        listed = client.get("/api/public-rooms", headers=bob).json()
        assert [(room["id"], room["name"]) for room in listed] == [(lobby, "lobby")]
        assert client.get("/api/public-rooms").status_code == 401

        # Members, for members only; online while a live socket is open.
        assert client.get(f"/api/rooms/{lobby}/members", headers=bob).status_code == 403
        assert client.get(f"/api/rooms/{hidden}/members", headers=bob).status_code == 404
        client.post(f"/api/rooms/{lobby}/join", headers=bob)
        members = client.get(f"/api/rooms/{lobby}/members", headers=bob).json()
        assert {(m["username"], m["role"], m["online"]) for m in members} == {
            ("ann", "owner", False),
            ("bob", "member", False),
        }
        client.post(f"/api/rooms/{lobby}/messages", headers=ann, json={"content": "hi"})
        token = ann["Authorization"].removeprefix("Bearer ")
        with client.websocket_connect(f"/api/rooms/{lobby}/live?token={token}") as ws:
            assert ws.receive_json()["message"]["content"] == "hi"  # the router's stream
            online = client.get(f"/api/rooms/{lobby}/members", headers=bob).json()
            assert {m["username"]: m["online"] for m in online} == {"ann": True, "bob": False}
        # Closed: ann goes offline with her last socket (once the server has seen it go).
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            offline = client.get(f"/api/rooms/{lobby}/members", headers=bob).json()
            if not any(m["online"] for m in offline):
                break
            time.sleep(0.05)
        assert {m["username"]: m["online"] for m in offline} == {"ann": False, "bob": False}

        # Refused sockets close as the router's do: 4000 + the HTTP status.
        bob_token = bob["Authorization"].removeprefix("Bearer ")
        for path, code in (
            (f"/api/rooms/{lobby}/live", 4401),
            (f"/api/rooms/{hidden}/live?token={bob_token}", 4404),
        ):
            with (
                pytest.raises(WebSocketDisconnect) as refused,
                client.websocket_connect(path) as ws,
            ):
                ws.receive_json()
            assert refused.value.code == code
