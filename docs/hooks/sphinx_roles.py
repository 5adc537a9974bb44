"""A griffe extension: Sphinx markup in the docstrings becomes Markdown for mkdocstrings.

The docstrings are written for ``help()`` and editors as much as for the site, in the
reStructuredText habits most Python readers know: ``:class:`~chatkeep.errors.Unavailable```,
``:meth:`open```, and literal blocks introduced by ``::``. Rewriting hundreds of them in
every module would churn the whole tree for the site's sake; this extension rewrites them
when mkdocstrings loads the code instead (``extensions:`` in mkdocs.yml), never at run time:

* a role whose target griffe can resolve (a full path, or a short name looked up in the
  docstring's own scope as Python would) becomes an autorefs cross-reference
  ``[`Unavailable`][chatkeep.errors.Unavailable]``, to the object's canonical path. A target
  with a docstring is rendered somewhere in the reference, so its link is required and
  ``mkdocs build --strict`` fails on a typo; one without (a bare attribute) is rendered as an
  optional link, plain code when no page documents it;
* a target that resolves to nothing in chatkeep (``:class:`asyncpg.Pool```) stays code;
* ``text::`` followed by an indented block becomes ``text:`` and a fenced block (Python when
  it parses as Python, else plain text), as Sphinx renders it.

``~`` shortens the shown name to its last part, as in Sphinx; ``:meth:`` and ``:func:`` get
``()`` as Sphinx adds them.
"""

from __future__ import annotations

import ast
import html
import re
import textwrap
from typing import Any

import griffe

__all__ = ["SphinxRoles", "convert"]

ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|exc|data|mod|obj|const):`([^`]+)`")
# "title <target>" inside a role.
TITLED = re.compile(r"^(.*?)\s*<([^>]+)>$", re.DOTALL)
CALLABLE_ROLES = frozenset({"meth", "func"})


def _lookup(obj: griffe.Object, loader: griffe.GriffeLoader, target: str) -> griffe.Object | None:
    """The object ``target`` names from ``obj``'s docstring, or None when it names none."""
    first, _, rest = target.partition(".")
    candidates = [target]
    try:
        resolved = obj.resolve(first)
    except griffe.NameResolutionError:
        pass
    else:
        candidates.insert(0, f"{resolved}.{rest}" if rest else resolved)
    for path in candidates:
        try:
            found: griffe.Object | griffe.Alias | None = loader.modules_collection.get_member(path)
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
        if found is None:
            continue
        if isinstance(found, griffe.Alias):
            try:
                found = found.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
        return found
    return None


def _link(obj: griffe.Object, loader: griffe.GriffeLoader, match: re.Match[str]) -> str:
    role, body = match.group(1), re.sub(r"\s+", " ", match.group(2)).strip()
    titled = TITLED.match(body)
    if titled:
        title, target = titled.group(1), titled.group(2).strip()
    else:
        target = body
        short = target.startswith("~")
        target = target.lstrip("~").replace(" ", "")
        title = target.rsplit(".", 1)[-1] if short else target
        if role in CALLABLE_ROLES:
            title += "()"
    found = _lookup(obj, loader, target.lstrip("~"))
    if found is None or any(part.startswith("_") for part in found.canonical_path.split(".")):
        return f"`{title}`"
    identifier = found.canonical_path
    if found.docstring is None:
        # Not rendered unless a page documents it with its members: an optional link.
        return (
            f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>"
        )
    return f"[`{title}`][{identifier}]"


def _literal_blocks(text: str) -> str:
    """``para::`` + indented block -> ``para:`` + a fenced block, as Sphinx shows it."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::"):
            out.append(line)
            i += 1
            continue
        # The block: blank lines, then lines indented deeper than the introducing line.
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and (
            not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) > indent
        ):
            k += 1
        while k > j and not lines[k - 1].strip():
            k -= 1
        if k == j:  # no block follows: leave the line alone
            out.append(line)
            i += 1
            continue
        intro = stripped[:-2].rstrip()
        # "text::" -> "text:"; "text ::" -> "text"; a lone "::" -> nothing.
        if intro and not stripped[:-2].endswith(" "):
            out.append(intro + ":")
        elif intro:
            out.append(intro)
        block = textwrap.dedent("\n".join(lines[j:k]))
        try:
            ast.parse(block)
        except SyntaxError:
            language = "text"
        else:
            language = "python"
        pad = " " * indent
        out.extend(["", f"{pad}```{language}"])
        out.extend(f"{pad}{b}" if b else "" for b in block.split("\n"))
        out.append(f"{pad}```")
        i = k
    return "\n".join(out)


def convert(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    """``text`` (a docstring of ``obj``) with its Sphinx markup turned into Markdown."""
    return _literal_blocks(ROLE.sub(lambda m: _link(obj, loader, m), text))


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring once the package is loaded (names resolve only then)."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place, before mkdocstrings parses it."""
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, obj, loader)
