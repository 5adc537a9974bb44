"""The documentation site as a reader sees it: built for real, then read as HTML.

One ``mkdocs build --strict`` per module (about 10 s): no raw Sphinx role survives in any
page, the cross-references between pages are links, "The facade at a glance" lists every
public method of ``ChatKeep``, the schema diagram is a Mermaid block and code is
highlighted. The griffe extension that turns the roles into links is also tested on its own.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import griffe
import pytest

from chatkeep import ChatKeep

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "hooks"
RAW_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|exc|data|mod|obj|const):(?:`|<code>)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def roles() -> Iterator[ModuleType]:
    sys.path.insert(0, str(HOOKS))
    try:
        yield importlib.import_module("sphinx_roles")
    finally:
        sys.path.remove(str(HOOKS))


@pytest.mark.slow
def test_no_page_shows_a_raw_sphinx_role(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 20
    found = {
        str(p.relative_to(site)): RAW_ROLE.findall(p.read_text(encoding="utf-8")) for p in pages
    }
    assert not {name: hits for name, hits in found.items() if hits}
    # The search index holds the pages' text too.
    assert not RAW_ROLE.search((site / "search" / "search_index.json").read_text("utf-8"))


@pytest.mark.slow
def test_cross_references_link_between_pages(site: Path) -> None:
    chatkeep = page(site, "reference/chatkeep")
    # Raises sections and converted roles both point at the error's anchor on its page.
    assert 'href="../errors/#chatkeep.errors.InvalidInput"' in chatkeep
    # A role in a docstring (":class:`Database`" in ChatKeep's) became a link to its page
    # (the signature's links to it carry no <code>).
    assert 'href="../database/#chatkeep.storage.database.Database"><code>Database</code>' in (
        chatkeep
    )
    # Signatures link their types.
    assert 'href="../models/#chatkeep.models.CreateUserDto"' in chatkeep


@pytest.mark.slow
def test_every_facade_method_is_at_a_glance(site: Path) -> None:
    glance = page(site, "reference/glance")
    public = [
        name
        for name, value in vars(ChatKeep).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))
    ]
    assert {"connect", "send_message", "history", "subscribe"} <= set(public)
    missing = [
        name
        for name in public
        if f'href="../chatkeep/#chatkeep.facade.ChatKeep.{name}"' not in glance
        or f'<span class="nf">{name}</span><span class="p">(' not in glance
    ]
    assert not missing, f"missing from the facade at a glance: {missing}"


@pytest.mark.slow
def test_diagrams_and_code_are_rendered(site: Path) -> None:
    schema = page(site, "schema")
    assert '<pre class="mermaid"><code>erDiagram' in schema
    tutorial = page(site, "tutorial")
    # Pygments spans (keywords, names), styled by the theme.
    assert '<div class="language-python highlight">' in tutorial
    assert '<span class="k">async</span>' in tutorial
    # Snippet includes were made (not shown as the include line, nor mangled by a formatter).
    howto = page(site, "howto/testing")
    assert "test_a_message_is_in_the_history" in howto
    assert not [p for p in site.rglob("*.html") if "--8" in p.read_text(encoding="utf-8")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":class:`Database`", "[`Database`][chatkeep.storage.database.Database]"),
        (
            ":class:`~chatkeep.errors.Unavailable`",
            "[`Unavailable`][chatkeep.errors.Unavailable]",
        ),
        (":meth:`send_message`", "[`send_message()`][chatkeep.facade.ChatKeep.send_message]"),
        (
            ":meth:`MessageRepository.history\n"
            "        <chatkeep.storage.messages.MessageRepository.history>`",
            "[`MessageRepository.history`][chatkeep.storage.messages.MessageRepository.history]",
        ),
        # A role split over two lines by the docstring's wrapping.
        (
            ":meth:`chatkeep.storage.Database\n    .acting_as`",
            "[`chatkeep.storage.Database.acting_as()`][chatkeep.storage.database.Database.acting_as]",
        ),
        # Outside chatkeep, or nothing at all: code, never a dead link.
        (":class:`uuid.UUID`", "`uuid.UUID`"),
        (":func:`no_such_thing`", "`no_such_thing()`"),
        (":class:`~chatkeep.facade._Flow`", "`_Flow`"),
    ],
)
def test_roles_become_links_to_canonical_paths(roles: ModuleType, text: str, expected: str) -> None:
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")])
    module = loader.load("chatkeep.facade")
    loader.resolve_aliases(implicit=False, external=False)
    facade = module["ChatKeep"]
    assert roles.convert(text, facade, loader) == expected


def test_literal_blocks_become_fences(roles: ModuleType) -> None:
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")])
    module = loader.load("chatkeep.errors")
    text = "Use it so::\n\n    async with x:\n        pass\n\nThe tree:\n\n::\n\n    A\n    └── B\n"
    assert roles.convert(text, module, loader) == (
        "Use it so:\n\n```python\nasync with x:\n    pass\n```\n\n"
        "The tree:\n\n\n```text\nA\n└── B\n```\n"
    )
    # A "::" with no block after it is left alone.
    assert roles.convert("ratio::", module, loader) == "ratio::"


def test_the_extension_rewrites_what_mkdocstrings_loads(roles: ModuleType) -> None:
    module = griffe.load(
        "chatkeep.facade",
        search_paths=[str(ROOT / "src")],
        extensions=griffe.load_extensions(roles.SphinxRoles()),
    )
    docstring = module["ChatKeep"].docstring
    assert docstring is not None
    assert "[`Database`][chatkeep.storage.database.Database]" in docstring.value
    assert not RAW_ROLE.search(docstring.value)
    source = inspect.getdoc(ChatKeep)
    assert source is not None
    assert ":meth:`connect`" in source  # the source keeps its markup
