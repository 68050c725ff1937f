"""Array slices in a named block mean to PostgreSQL what the compiler says they mean."""

from __future__ import annotations

import asyncpg
import pytest

from analysisq.db.sql import compile_block

pytestmark = pytest.mark.db


async def test_slices_stay_sql_and_parenthesised_subscripts_are_parameters(
    db: asyncpg.Connection,
) -> None:
    q = compile_block(
        "slices",
        "SELECT a[2:n], a[(1):n], a[:(n)], a[(:i)], a[(:i):(:j)], ARRAY[:i, :j]"
        " FROM (SELECT ARRAY[10, 20, 30, 40] AS a, 3 AS n) t",
    )
    row = await db.fetchrow(q.text, *q.args(i=4, j=4))
    assert row is not None
    assert tuple(row) == ([20, 30], [10, 20, 30], [10, 20, 30], 40, [40], [4, 4])
