"""A mkdocs hook: "The facade at a glance" is written from the code at build time.

``docs/reference/glance.md`` holds the prose around a ``<!-- chatkeep:facade-methods -->``
marker; this hook replaces the marker with every public method and property of
``chatkeep.ChatKeep``, in source order, each with its signature and the first paragraph of
its docstring, linked to its full entry on the ChatKeep page. The list is read with griffe
(statically, as mkdocstrings reads it), so a method added, renamed or removed shows here on
the next build and the page cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sphinx_roles import SphinxRoles

__all__ = ["MARKER", "facade_methods", "on_page_markdown"]

MARKER = "<!-- chatkeep:facade-methods -->"
PAGE = "reference/glance.md"
FACADE = "chatkeep.facade.ChatKeep"


def _parameter(parameter: griffe.Parameter) -> str:
    text = parameter.name
    if parameter.kind is griffe.ParameterKind.var_positional:
        text = f"*{text}"
    elif parameter.kind is griffe.ParameterKind.var_keyword:
        text = f"**{text}"
    if parameter.annotation is not None:
        text += f": {parameter.annotation}"
        if parameter.default is not None:
            text += f" = {parameter.default}"
    elif parameter.default is not None:
        text += f"={parameter.default}"
    return text


def signature(function: griffe.Function, width: int = 80) -> str:
    """``name(params) -> returns``, as written in the source, without self or cls.

    Longer than ``width``: one parameter a line, as the formatter writes it.
    """
    parts: list[str] = []
    star_done = False
    previous: griffe.ParameterKind | None = None
    for parameter in function.parameters:
        if parameter.name in ("self", "cls") and previous is None:
            previous = parameter.kind
            continue
        kind = parameter.kind
        if previous is griffe.ParameterKind.positional_only and kind is not previous:
            parts.append("/")
        if kind is griffe.ParameterKind.keyword_only and not star_done:
            parts.append("*")
        if kind in (griffe.ParameterKind.keyword_only, griffe.ParameterKind.var_positional):
            star_done = True
        parts.append(_parameter(parameter))
        previous = kind
    returns = f" -> {function.returns}" if function.returns is not None else ""
    text = f"{function.name}({', '.join(parts)}){returns}"
    if len(text) > width:
        lines = "".join(f"    {part},\n" for part in parts)
        text = f"{function.name}(\n{lines}){returns}"
    return text


def _summary(obj: griffe.Object) -> str:
    if obj.docstring is None:
        return ""
    first = obj.docstring.value.strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines())


def facade_methods(search_paths: list[str]) -> str:
    """The Markdown list that replaces the marker: one entry per public member."""
    loader = griffe.GriffeLoader(
        search_paths=search_paths,
        extensions=griffe.load_extensions(SphinxRoles()),
    )
    module = loader.load("chatkeep.facade")
    loader.resolve_aliases(implicit=False, external=False)
    facade = module["ChatKeep"]
    methods: list[str] = []
    attributes: list[str] = []
    for name, member in facade.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        link = f"[`{name}`][{FACADE}.{name}]"
        if isinstance(member, griffe.Attribute):
            attributes.append(f"- `{name}`{_attribute_type(member, facade)}")
        elif isinstance(member, griffe.Function):
            prefix = "async " if "async" in member.labels else ""
            code = [f"@{decorator.value}" for decorator in member.decorators]
            code.extend(f"{prefix}def {signature(member)}".split("\n"))
            block = "".join(f"    {line}\n" for line in code)
            methods.append(f"- {link} — {_summary(member)}\n\n    ```python\n{block}    ```\n")
    return "\n".join(
        [
            "## Methods",
            "",
            *methods,
            "",
            "## Repositories, services and attributes",
            "",
            "The layers the methods are built on, for calls of your own (each is described"
            f" under *Attributes* on the [ChatKeep page][{FACADE}]):",
            "",
            *attributes,
            "",
        ]
    )


def _attribute_type(attribute: griffe.Attribute, owner: griffe.Object) -> str:
    """``: Type`` from the annotation, the class the value is made with, or the parameter.

    ``self.db = db`` takes the type of ``__init__``'s ``db``.
    """
    if attribute.annotation is not None:
        return f": `{attribute.annotation}`"
    init = owner.members.get("__init__")
    if isinstance(init, griffe.Function) and isinstance(attribute.value, griffe.ExprName):
        for parameter in init.parameters:
            if parameter.name == attribute.value.name and parameter.annotation is not None:
                return f": `{parameter.annotation}`"
    if isinstance(attribute.value, griffe.ExprCall):
        return f": `{attribute.value.function}`"
    return ""


def on_page_markdown(markdown: str, *, page: Any, config: Any, **kwargs: Any) -> str:
    """Fill the marker on the glance page; leave every other page alone."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its {MARKER} marker")
    root = Path(config["config_file_path"]).resolve().parent
    return markdown.replace(MARKER, facade_methods([str(root / "src")]))
