"""Named parameters of ``sql/queries.sql``, compiled once by ``analysisq.db.sql``."""

from __future__ import annotations

import re
from typing import Any

import pytest

from analysisq.db import sql
from analysisq.db.sql import SQL_DIR, Query, compile_block, queries, query

pytestmark = pytest.mark.unit


def test_a_name_becomes_one_bind_parameter_in_order_of_appearance() -> None:
    q = compile_block("x", "SELECT :b, :a, :b + 1 FROM t WHERE id = :a")
    assert q.text == "SELECT $1, $2, $1 + 1 FROM t WHERE id = $2"
    assert q.params == ("b", "a")
    assert q.args(a=10, b=20) == (20, 10)


def test_casts_literals_identifiers_and_comments_are_not_parameters() -> None:
    body = (
        "SELECT :id::bigint, '{}'::int[], 'a:b '' :no', E'it\\'s :no', \"col:no\",\n"
        "       $$ :no $$, $tag$ :no $$ $tag$, arr[lo:hi], x:: text, date'\\' -- :no\n"
        "/* :no\n :no */ FROM t WHERE run = :run_id"
    )
    q = compile_block("x", body)
    assert q.params == ("id", "run_id")
    assert q.text == body.replace(":id::", "$1::").replace(":run_id", "$2")


def test_array_slices_are_sql_and_subscript_parameters_are_parenthesised() -> None:
    body = (
        "SELECT arr[lo:hi], arr[1:n], arr[(a):hi], arr[:(n)], arr[(:i)], arr[1:(:top)],\n"
        "       ARRAY[:x, :y], Array [:x][1], a.b[ARRAY[:i][1]:2], :ids::text[] FROM t"
    )
    q = compile_block("x", body)
    assert q.params == ("i", "top", "x", "y", "ids")
    assert q.text == (
        "SELECT arr[lo:hi], arr[1:n], arr[(a):hi], arr[:(n)], arr[($1)], arr[1:($2)],\n"
        "       ARRAY[$3, $4], Array [$3][1], a.b[ARRAY[$1][1]:2], $5::text[] FROM t"
    )


@pytest.mark.parametrize(
    "expr", ["arr[:n]", "arr[1 :n]", "t.myarray[ :n ]", '"quoted"[:n]', "(f(x))[2:3][:n]"]
)
def test_a_bare_parameter_in_a_subscript_is_refused_naming_the_block(expr: str) -> None:
    with pytest.raises(ValueError) as refused:
        compile_block("slice_block", f"SELECT {expr} FROM t WHERE id = :id")
    assert str(refused.value) == (
        "queries.sql block 'slice_block': :n in an array subscript is a slice bound to "
        "PostgreSQL; write arr[(:n)] for the parameter, or arr[:(n)] for a slice up to the "
        "column n"
    )


def test_a_positional_parameter_in_a_block_is_refused() -> None:
    with pytest.raises(ValueError, match=r"block 'x': positional \$2, name the parameter"):
        compile_block("x", "SELECT :a, $2")
    # ... but a $ inside a literal or comment is text
    assert compile_block("x", "SELECT '$1' -- $2\n").params == ()


def test_a_missing_name_is_named_with_the_block() -> None:
    q = compile_block("release", "UPDATE t SET a = :token WHERE id = :item_id")
    with pytest.raises(TypeError, match="query 'release' takes token, item_id: missing token"):
        q.args(item_id=1)


def test_an_unexpected_name_is_named_with_the_block() -> None:
    q = compile_block("release", "UPDATE t SET a = :token WHERE id = :item_id")
    with pytest.raises(
        TypeError, match="query 'release' takes token, item_id: missing token; unexpected tokn"
    ):
        q.args(item_id=1, tokn="x")
    with pytest.raises(TypeError, match="query 'release' takes token, item_id: unexpected run"):
        q.args(item_id=1, token="x", run="r")
    with pytest.raises(TypeError, match="query 'y' takes no parameters: unexpected run_id"):
        compile_block("y", "SELECT 1").args(run_id="r")


def test_positional_values_cannot_be_passed() -> None:
    q = query("mark_finished")
    with pytest.raises(TypeError):
        q.args("run-1")

    class Conn:
        def execute(self, text: str, *args: object) -> Any:
            raise AssertionError("never reached")

    with pytest.raises(TypeError):
        sql.execute(Conn(), "mark_finished", "run-1")
    with pytest.raises(TypeError, match="query 'mark_finished' takes run_id: missing run_id"):
        sql.execute(Conn(), "mark_finished", id="run-1")


def test_a_call_sends_the_compiled_text_and_the_values_by_name() -> None:
    sent: list[tuple[str, tuple[object, ...]]] = []

    class Conn:
        def fetch(self, text: str, *args: object) -> Any:
            sent.append((text, args))
            return None

        fetchrow = fetchval = execute = fetch

    conn = Conn()
    for run in (sql.fetch, sql.fetchrow, sql.fetchval, sql.execute):
        run(conn, "pool_users", run_id="r", pool="p")
    # the same text every call (asyncpg's statement cache), values in its $N order
    q = query("pool_users")
    assert q.params == ("pool", "run_id")
    assert sent == [(q.text, ("p", "r"))] * 4
    assert query("pool_users") is q


def test_no_block_of_queries_sql_is_positional() -> None:
    text = (SQL_DIR / "queries.sql").read_text(encoding="utf-8")
    assert not re.findall(r"\$\d", text), "queries.sql: name every parameter (:name)"
    assert all(isinstance(q, Query) and "$" not in q.name for q in queries().values())
    # every block takes what its text names, and nothing else is a parameter
    for name, q in queries().items():
        assert len(q.params) == len(set(re.findall(r"\$(\d+)", q.text))), name
