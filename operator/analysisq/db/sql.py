"""Named SQL blocks from ``sql/queries.sql``, loaded and compiled once.

A block starts with ``-- name: NAME``; the comment lines right after it document the query.
Nothing else in analysisq holds SQL text, and nothing formats values into it.

Blocks take named parameters, ``:run_id``; a call passes them by keyword::

    rows = await sql.fetch(conn, "failed_items", run_id=run_id, limit=20)

or, when asyncpg needs more than the values (a ``timeout``, an ``EXPLAIN`` prefix)::

    q = sql.query("heartbeat")
    await conn.fetch(q.text, *q.args(ids=..., tokens=..., lease_seconds=...), timeout=5)

Each block is compiled once, when the file is loaded, to the ``$1..$N`` text asyncpg
prepares (numbered by first appearance; a name used twice is one ``$N``) and the tuple of
names in that order, so every call sends the same text (asyncpg's statement cache keeps
working) and binding is one dict lookup per parameter. The compiler reads the text as
PostgreSQL does: casts (``::int``), string literals (``'a:b'``, ``E'..'``), quoted
identifiers, dollar quotes and comments are left alone. ``$N`` in a block is refused, so a
block is never half named.

Array slices are SQL, not parameters: in a subscript, a ``:`` after a name, ``)`` or ``]``
separates the bounds (``arr[lo:hi]``, ``arr[1:n]``). ``arr[:n]`` is ambiguous to a reader
(a slice up to the column ``n`` for PostgreSQL, the element ``:n`` at a glance), so a bare
``:name`` in a subscript is refused, naming the block; the parameter is written
``arr[(:n)]`` (or ``arr[1:(:n)]``), the slice ``arr[:(n)]``. ``ARRAY[:a, :b]`` is a
constructor, not a subscript: its parameters are plain.

A call that misses a name or passes one the block does not take raises ``TypeError`` naming
the block and the names, before anything reaches the database.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import asyncpg

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)

# One token at a time, left to right: everything that may hold a ':' or a '$' that is not a
# parameter comes first and is kept as it is.
_TOKEN = re.compile(
    r"""
      (?P<skip>
          --[^\n]*                          # line comment
        | /\*.*?\*/                         # block comment
        | (?<!\w)[Ee]'(?:[^'\\]|\\.|'')*'   # escape string
        | '(?:[^']|'')*'                    # string literal
        | "(?:[^"]|"")*"                    # quoted identifier
        | \$\$.*?\$\$                       # dollar quote
        | \$(?P<tag>[A-Za-z_]\w*)\$.*?\$(?P=tag)\$  # tagged dollar quote
        | ::                                # cast
      )
    | (?P<positional>\$\d+)
    | (?<![\w)\]]):(?P<param>[A-Za-z_]\w*)   # after a word, `)` or `]` it is a slice: arr[lo:hi]
    | (?P<open>[\[(])
    | (?P<close>[\])])
    """,
    re.VERBOSE | re.DOTALL,
)
# A `[` after a name, `)`, `]` or a quoted identifier subscripts what comes before it, unless
# that name is ARRAY (a constructor, like a `[` after an operator or a comma).
_SUBSCRIPTED = re.compile(r"""(?<![\w$])(?P<array>(?i:array))\s*$|[\w)\]"]\s*$""")


@dataclass(frozen=True, slots=True)
class Query:
    """One block: its name, the text asyncpg runs and the names of its ``$1..$N``."""

    name: str
    text: str
    params: tuple[str, ...]
    _get: Callable[[Mapping[str, object]], tuple[object, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # itemgetter binds in C; it gives a bare value for one name, so wrap that case
        names = self.params
        get: Callable[[Mapping[str, object]], tuple[object, ...]]
        if len(names) > 1:
            get = itemgetter(*names)
        elif names:
            get = lambda values: (values[names[0]],)  # noqa: E731
        else:
            get = lambda values: ()  # noqa: E731
        object.__setattr__(self, "_get", get)

    def args(self, **values: object) -> tuple[object, ...]:
        """The values in ``$N`` order; TypeError when a name is missing or unknown."""
        return self.bind(values)

    def bind(self, values: Mapping[str, object]) -> tuple[object, ...]:
        """``args`` for a mapping of the values."""
        if len(values) == len(self.params):
            try:
                return self._get(values)
            except KeyError:
                pass
        raise self._mismatch(values)

    def _mismatch(self, values: Mapping[str, object]) -> TypeError:
        missing = [p for p in self.params if p not in values]
        unexpected = sorted(set(values) - set(self.params))
        said = [f"missing {', '.join(missing)}"] if missing else []
        said += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        takes = ", ".join(self.params) or "no parameters"
        return TypeError(f"query {self.name!r} takes {takes}: {'; '.join(said)}")


def compile_block(name: str, body: str) -> Query:
    """``:name`` parameters to ``$N``; ValueError names the block for a ``$N`` in it, or for
    a bare ``:name`` in an array subscript (``arr[:n]``, see the module docstring)."""
    params: list[str] = []
    out: list[str] = []
    # the brackets open at this point: "[" for a subscript, "(" for a parenthesis or ARRAY[
    opened: list[str] = []
    end = 0
    for m in _TOKEN.finditer(body):
        out.append(body[end : m.start()])
        end = m.end()
        token = m.group(0)
        if m.group("positional"):
            raise ValueError(
                f"queries.sql block {name!r}: positional {token}, name the parameter (:name)"
            )
        if m.group("open"):
            before = _SUBSCRIPTED.search(body, 0, m.start()) if token == "[" else None
            opened.append("(" if before is None or before.group("array") else "[")
        elif m.group("close"):
            if opened:
                opened.pop()
        elif (param := m.group("param")) is not None:
            if opened and opened[-1] == "[":
                raise ValueError(
                    f"queries.sql block {name!r}: {token} in an array subscript is a slice "
                    f"bound to PostgreSQL; write arr[({token})] for the parameter, or "
                    f"arr[:({param})] for a slice up to the column {param}"
                )
            if param not in params:
                params.append(param)
            token = f"${params.index(param) + 1}"
        out.append(token)
    out.append(body[end:])
    return Query(name, "".join(out), tuple(params))


@cache
def queries() -> dict[str, Query]:
    text = (SQL_DIR / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    out: dict[str, Query] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise RuntimeError(f"queries.sql defines {name!r} twice")
        out[name] = compile_block(name, body.strip())
    return out


def query(name: str) -> Query:
    """The named block (KeyError names the missing block)."""
    return queries()[name]


class Executor(Protocol):
    """What runs a block: an ``asyncpg.Connection`` (or a pool's connection)."""

    def fetch(self, query: str, /, *args: object) -> Awaitable[list[asyncpg.Record]]: ...
    def fetchrow(self, query: str, /, *args: object) -> Awaitable[asyncpg.Record | None]: ...
    def fetchval(self, query: str, /, *args: object) -> Awaitable[Any]: ...
    def execute(self, query: str, /, *args: object) -> Awaitable[str]: ...


# The four ways analysisq runs a block. Plain functions returning asyncpg's own awaitable:
# no coroutine of ours per call. The connection and the block name are positional-only, so a
# block may take a parameter called ``name``; values can only be passed by keyword.


def fetch(conn: Executor, name: str, /, **values: object) -> Awaitable[list[asyncpg.Record]]:
    q = queries()[name]
    return conn.fetch(q.text, *q.bind(values))


def fetchrow(conn: Executor, name: str, /, **values: object) -> Awaitable[asyncpg.Record | None]:
    q = queries()[name]
    return conn.fetchrow(q.text, *q.bind(values))


def fetchval(conn: Executor, name: str, /, **values: object) -> Awaitable[Any]:
    q = queries()[name]
    return conn.fetchval(q.text, *q.bind(values))


def execute(conn: Executor, name: str, /, **values: object) -> Awaitable[str]:
    q = queries()[name]
    return conn.execute(q.text, *q.bind(values))
