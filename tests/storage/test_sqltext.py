"""The SQL lexer the migration runner splits files with (pure logic, no server needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatkeep.storage.sqltext import Statement, code_only, split_statements


def sqls(text: str) -> list[str]:
    return [s.sql for s in split_statements(text)]


# -- splitting ----------------------------------------------------------------------------


def test_splits_at_top_level_semicolons_and_strips() -> None:
    assert sqls("SELECT 1;  SELECT 2 ;\nSELECT 3") == ["SELECT 1", "SELECT 2", "SELECT 3"]


def test_empty_and_semicolon_only_input_gives_nothing() -> None:
    assert split_statements("") == []
    assert split_statements(" ;; ;\n") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT 'a;b'; SELECT 2", ["SELECT 'a;b'", "SELECT 2"]),
        ("SELECT 'it''s; fine'; SELECT 2", ["SELECT 'it''s; fine'", "SELECT 2"]),
        # E'' strings: a backslash escapes the quote, so the ; stays inside.
        ("SELECT E'it\\'s;x'; SELECT 2", ["SELECT E'it\\'s;x'", "SELECT 2"]),
        ("SELECT e'\\\\'; SELECT 2", ["SELECT e'\\\\'", "SELECT 2"]),
        # In a standard string a backslash is an ordinary character.
        ("SELECT '\\'; SELECT 2", ["SELECT '\\'", "SELECT 2"]),
        # An identifier ending in e is not an E'' prefix.
        ("SELECT type'\\'; SELECT 2", ["SELECT type'\\'", "SELECT 2"]),
        ('SELECT "a;""b"; SELECT 2', ['SELECT "a;""b"', "SELECT 2"]),
        ("SELECT $$a;b$$; SELECT 2", ["SELECT $$a;b$$", "SELECT 2"]),
        # A tagged body may contain $$ and ; freely; only its own tag closes it.
        ("SELECT $t$ $$ ; $u$ ; $t$; SELECT 2", ["SELECT $t$ $$ ; $u$ ; $t$", "SELECT 2"]),
        # $1 parameters and x$y identifiers are not dollar quotes.
        ("SELECT $1; SELECT x$y; SELECT 3", ["SELECT $1", "SELECT x$y", "SELECT 3"]),
        (
            "SELECT 1 /* a; /* nested; */ still; */; SELECT 2",
            ["SELECT 1 /* a; /* nested; */ still; */", "SELECT 2"],
        ),
        (
            "SELECT 1 -- not the end;\n + 1; SELECT 2",
            ["SELECT 1 -- not the end;\n + 1", "SELECT 2"],
        ),
    ],
)
def test_semicolons_inside_quotes_and_comments_do_not_split(text: str, expected: list[str]) -> None:
    assert sqls(text) == expected


def test_function_body_with_semicolons_is_one_statement() -> None:
    text = """
CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
    NEW.x := 1;
    RETURN NEW;
END
$body$;
SELECT 1;
"""
    statements = split_statements(text)
    assert len(statements) == 2
    assert statements[0].sql.startswith("CREATE FUNCTION")
    assert statements[0].sql.endswith("$body$")
    assert statements[0].line == 2
    assert statements[1] == Statement("SELECT 1", 8)


def test_comment_only_statements_are_dropped() -> None:
    assert sqls("-- a;\n/* b; */;\nSELECT 1;\n-- trailing") == ["SELECT 1"]


def test_leading_comments_are_not_part_of_the_statement() -> None:
    statements = split_statements("-- header\n/* block */\n  SELECT 1;")
    assert statements == [Statement("SELECT 1", 3)]


def test_line_numbers_are_where_each_statement_starts() -> None:
    text = "\n\nSELECT 1;\n\n-- note\nSELECT\n  2;  SELECT 'x\ny';\n\n\nSELECT 4"
    assert [(s.sql, s.line) for s in split_statements(text)] == [
        ("SELECT 1", 3),
        ("SELECT\n  2", 6),
        ("SELECT 'x\ny'", 7),
        ("SELECT 4", 11),
    ]


def test_unterminated_constructs_run_to_the_end() -> None:
    assert sqls("SELECT 'open; SELECT 2") == ["SELECT 'open; SELECT 2"]
    assert sqls("SELECT $$open; SELECT 2") == ["SELECT $$open; SELECT 2"]
    assert sqls('SELECT "open; SELECT 2') == ['SELECT "open; SELECT 2']
    assert sqls("SELECT 1 /* open; SELECT 2") == ["SELECT 1 /* open; SELECT 2"]


def test_summary_folds_whitespace_and_cuts() -> None:
    stmt = Statement("SELECT  1,\n\t 2,   3", 1)
    assert stmt.summary() == "SELECT 1, 2, 3"
    long = Statement("SELECT " + "x, " * 100 + "1", 1)
    assert len(long.summary(40)) == 40
    assert long.summary(40).endswith("...")


# -- code_only ----------------------------------------------------------------------------


def test_code_only_removes_comments_and_literal_bodies() -> None:
    text = "CREATE INDEX i -- CONCURRENTLY\n ON t /* CONCURRENTLY */ (x) WHERE y = 'CONCURRENTLY'"
    code = code_only(text)
    assert "CONCURRENTLY" not in code
    assert code.startswith("CREATE INDEX i")
    assert "ON t" in code
    assert "''" in code


def test_code_only_keeps_keywords_in_code() -> None:
    assert "CONCURRENTLY" in code_only("CREATE INDEX CONCURRENTLY i ON t (x); -- done")


def test_code_only_hides_dollar_bodies_and_identifiers() -> None:
    code = code_only('SELECT $f$ VACUUM $f$, "VACUUM"')
    assert "VACUUM" not in code


# -- properties ---------------------------------------------------------------------------

_WORD = st.sampled_from(["SELECT", "1", "x", "foo_bar", "(a, b)", "+", "=", "t.c", "$1"])
_STRING_BODY = st.text(alphabet="ab;' \n\\$-/*", max_size=12)
_COMMENT_BODY = st.text(alphabet="ab; '\"$*/-", max_size=12).filter(
    lambda s: "*/" not in s and "/*" not in s and not s.endswith("/") and not s.endswith("*")
)


@st.composite
def _tokens(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["word", "string", "estring", "ident", "dollar", "block", "line"]))
    body = draw(_STRING_BODY)
    if kind == "word":
        return draw(_WORD)
    if kind == "string":
        return "'" + body.replace("'", "''") + "'"
    if kind == "estring":
        return "E'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind == "ident":
        return '"' + body.replace('"', '""') + '"'
    if kind == "dollar":
        tag = draw(st.sampled_from(["", "fn", "body_1"]))
        delimiter = f"${tag}$"
        return delimiter + body.replace("$", "") + delimiter
    comment = draw(_COMMENT_BODY)
    if kind == "block":
        return "/*" + comment + "*/"
    return "--" + comment.replace("\n", " ") + "\n"


@st.composite
def _statement(draw: st.DrawFn) -> str:
    # Statements start and end with a word so they survive strip() and never end inside
    # a line comment (which would swallow the joining semicolon).
    middle = draw(st.lists(_tokens(), max_size=6))
    return " ".join([draw(_WORD), *middle, draw(_WORD)])


@given(st.lists(_statement(), min_size=1, max_size=6))
def test_statements_joined_with_semicolons_round_trip(statements: list[str]) -> None:
    text = ";\n".join(statements) + ";"
    assert sqls(text) == statements


@given(st.lists(_statement(), min_size=1, max_size=6))
def test_line_numbers_match_the_text(statements: list[str]) -> None:
    text = "\n-- header\n" + ";\n\n".join(statements)
    for stmt in split_statements(text):
        lines = text.split("\n")
        # The statement's first line of text is on the reported line.
        assert lines[stmt.line - 1].startswith(stmt.sql.split("\n")[0])


@given(st.lists(_tokens(), max_size=10), _COMMENT_BODY.filter(lambda s: s.strip() != ""))
def test_code_only_never_contains_comment_text(tokens: list[str], secret: str) -> None:
    marker = "ZZ" + "".join(c for c in secret if c.isalpha()) + "QQ"
    text = " ".join(tokens) + f" /* {marker} */ " + " ".join(tokens) + f" -- {marker}\n"
    assert marker not in code_only(text)


@given(st.text(max_size=60))
def test_lexer_is_total(text: str) -> None:
    # Any input splits without error, and every statement is non-empty, stripped text of
    # the input starting on a real line.
    line_count = text.count("\n") + 1
    for stmt in split_statements(text):
        assert stmt.sql
        assert stmt.sql == stmt.sql.strip()
        assert stmt.sql in text
        assert 1 <= stmt.line <= line_count
    code_only(text)
