"""The Python state vocabularies are the database's: each enum equals its domain's CHECK list.

``ItemStatus`` names the values of the ``queue_status`` domain and ``ErrorClass`` those of
``error_class``; adding a state to one side only fails here, not in production.
"""

from __future__ import annotations

import re
from enum import StrEnum

import asyncpg
import pytest

from analysisq.errors import ErrorClass
from analysisq.queue.states import ItemStatus

pytestmark = pytest.mark.db


async def _domain_values(conn: asyncpg.Connection, domain: str) -> set[str]:
    checks = await conn.fetch(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE contypid = $1::regtype",
        domain,
    )
    assert len(checks) == 1, f"{domain} should have exactly one CHECK, has {len(checks)}"
    return set(re.findall(r"'([^']*)'::text", checks[0]["def"]))


@pytest.mark.parametrize(
    ("domain", "enum"), [("queue_status", ItemStatus), ("error_class", ErrorClass)]
)
async def test_the_enum_is_the_database_domain(
    db: asyncpg.Connection, domain: str, enum: type[StrEnum]
) -> None:
    values = await _domain_values(db, domain)
    assert values, f"no values parsed from the {domain} CHECK"
    assert values == {member.value for member in enum}
