"""Reading SQL text: splitting it into statements, and its code apart from comments.

PostgreSQL's own lexer is the reference. The cases that matter for migration files are
handled: ``--`` and nested ``/* */`` comments, ``'...'`` strings (with ``''`` and, for
``E'...'``, backslash escapes), ``"..."`` identifiers, and ``$tag$...$tag$`` bodies, so a
semicolon inside a function body or a string never splits a statement.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Statement", "code_only", "split_statements"]

_DOLLAR_TAG: Final = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_IDENT_CHAR: Final = re.compile(r"[A-Za-z0-9_\x80-\uffff$]")

SegmentKind = Literal["code", "comment", "literal", "semicolon"]


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and the 1-based line it starts on in its file."""

    sql: str
    line: int

    def summary(self, width: int = 120) -> str:
        """The statement folded to one line, cut to ``width`` characters."""
        folded = " ".join(self.sql.split())
        return folded if len(folded) <= width else folded[: width - 3] + "..."


def _segments(sql: str) -> Iterator[tuple[SegmentKind, int, int]]:
    """Yield (kind, start, end) spans that cover ``sql`` from end to end."""
    i = 0
    n = len(sql)
    code_start = 0

    def flush(upto: int) -> Iterator[tuple[SegmentKind, int, int]]:
        if upto > code_start:
            yield ("code", code_start, upto)

    while i < n:
        ch = sql[i]
        end: int | None = None
        kind: SegmentKind = "literal"
        if ch == "-" and sql.startswith("--", i):
            newline = sql.find("\n", i)
            end = n if newline == -1 else newline
            kind = "comment"
        elif ch == "/" and sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            end, kind = j, "comment"
        elif ch == "'":
            escapes = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _IDENT_CHAR.match(sql[i - 2]))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if sql.startswith("''", j):
                        j += 2
                        continue
                    j += 1
                    break
                j += 1
            end = min(j, n)
        elif ch == '"':
            close = sql.find('"', i + 1)
            while close != -1 and sql.startswith('""', close):
                close = sql.find('"', close + 2)
            end = n if close == -1 else close + 1
        elif ch == "$" and (i == 0 or not _IDENT_CHAR.match(sql[i - 1])):
            match = _DOLLAR_TAG.match(sql, i)
            if match:
                tag = match.group(0)
                close = sql.find(tag, match.end())
                end = n if close == -1 else close + len(tag)
        elif ch == ";":
            yield from flush(i)
            yield ("semicolon", i, i + 1)
            i += 1
            code_start = i
            continue
        if end is None:
            i += 1
            continue
        yield from flush(i)
        yield (kind, i, end)
        i = end
        code_start = i
    yield from flush(n)


def code_only(sql: str) -> str:
    """``sql`` with comments removed and every literal body replaced by ``''``.

    Used to look for keywords (``CONCURRENTLY``) without being fooled by a comment or a
    string that mentions them.
    """
    parts: list[str] = []
    for kind, start, end in _segments(sql):
        if kind == "code" or kind == "semicolon":
            parts.append(sql[start:end])
        elif kind == "literal":
            parts.append("''")
        else:
            parts.append(" ")
    return "".join(parts)


def split_statements(sql: str) -> list[Statement]:
    """Split ``sql`` at top-level semicolons; statements made only of comments are dropped."""
    statements: list[Statement] = []
    stmt_start: int | None = None  # offset of the first code or literal of this statement
    last_end = 0
    for kind, start, end in _segments(sql):
        if kind == "semicolon":
            if stmt_start is not None:
                statements.append(
                    Statement(sql[stmt_start:start].strip(), sql.count("\n", 0, stmt_start) + 1)
                )
            stmt_start = None
        elif kind != "comment" and stmt_start is None and sql[start:end].strip():
            stmt_start = start + (len(sql[start:end]) - len(sql[start:end].lstrip()))
        last_end = end
    if stmt_start is not None:
        statements.append(
            Statement(sql[stmt_start:last_end].strip(), sql.count("\n", 0, stmt_start) + 1)
        )
    return statements
