"""The per-target circuit breaker: a target fault repeated pauses the target, not the run.

A misspelt model or a wrong endpoint path gets the same permanent answer for every prompt
(``errors.TargetFault``: 404 ``model_not_found``, 400 "Invalid model name", 404 on the path).
``items.fail`` hands such failures here. Each one fails its item for good, as any permanent
error does, and counts on the target's row (``run_targets.fault_streak``): the same fault
``targetFaultThreshold`` times in a row, with no success in between (``items.complete``
breaks a streak), pauses the target with a reason naming the setting to fix, and gives back
the items the streak failed, parked until the target is resumed. A fault that arrives while
the target is paused parks its item at once. Everything happens at the depth where failures
are recorded, so every worker (and any other writer of failures) shares one count.
"""

from __future__ import annotations

import uuid

import asyncpg

from analysisq.db import sql
from analysisq.db.connect import translated
from analysisq.errors import ErrorClass, TargetFault

_FIX = {
    "model": "targets[{target}].model (the provider does not know it)",
    "endpoint": "targets[{target}].endpoint (the provider has no such path)",
}


def pause_reason(target: str, fault: TargetFault, streak: int, message: str) -> str:
    """What status, Events and the run's output say: the setting to fix, then the answer."""
    fix = _FIX.get(fault.setting, _FIX["endpoint"]).format(target=target)
    return (
        f"{streak} answers in a row were the same target fault ({fault.fault}); fix {fix}, "
        f"then resume the target. Last answer: {message}"
    )


async def fail_on_target_fault(
    conn: asyncpg.Connection,
    item_id: int,
    token: uuid.UUID,
    target: str,
    error_class: ErrorClass,
    message: str,
    fault: TargetFault,
) -> bool:
    """Fail item *item_id* for good with *fault* and count it; False if the lease was lost.

    One transaction that first locks the target's row, so that concurrent faults of one
    target are counted one after the other and none slips past a pause."""
    with translated(f"failing item {item_id} on a target fault"):
        async with conn.transaction():
            row = await sql.fetchrow(conn, "lock_item_target", item_id=item_id)
            if row is None:
                return False
            run_id = row["run_id"]
            if row["paused"]:
                # Paused (by this fault or another): the answer says nothing about the item.
                parked = await sql.fetchval(
                    conn,
                    "release",
                    item_id=item_id,
                    token=token,
                    error_class=str(error_class),
                    error_message=message,
                    deferral=0,
                    delay=0.0,
                    park=True,
                )
                return parked is not None
            failed = await sql.fetchval(
                conn,
                "fail",
                item_id=item_id,
                token=token,
                error_class=str(error_class),
                error_message=message,
                retry_in=None,
            )
            if failed is None:
                return False
            counted = await sql.fetchrow(
                conn,
                "note_target_fault",
                run_id=run_id,
                target=target,
                fault=fault.fault,
                item_id=item_id,
            )
            assert counted is not None
            if counted["fault_streak"] >= counted["fault_threshold"]:
                reason = pause_reason(target, fault, counted["fault_streak"], message)
                await sql.fetchval(
                    conn, "pause_target", run_id=run_id, target=target, reason=reason
                )
                await sql.execute(conn, "give_back_fault_items", run_id=run_id, target=target)
    return True
