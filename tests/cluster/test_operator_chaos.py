"""The operator under faults: killed worker pods, a killed operator (during the fill and during
the run), a database restart, a missing Secret and a refused API key. The invariants: every
item ends terminal, none is lost, none is done twice, no secret leaks, and the operator never
crash-loops."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import asyncpg
import pytest
from operator_env import (  # noqa: F401 (fixtures)
    FakeProviders,
    OperatorFactory,
    analysis_run,
    analysisrun_crd_fixture,
    apply,
    assert_exactly_once,
    condition,
    events,
    fake_providers_fixture,
    get_deployment,
    get_run,
    operators_fixture,
    queue_counts,
    secret,
    seed_prompts,
    sql,
    wait_complete,
    wait_for,
)

from analysisq.db.embedded import EmbeddedPostgres
from analysisq.db.migrate import migrate
from controlplane.fixtures import Kubectl
from controlplane.podrunner import PodRunner

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]


def fake_target(url: str, **extra: object) -> dict[str, object]:
    return {"name": "llm", "provider": "openai", "model": "fake-model", "endpoint": url, **extra}


def run_id_of(kubectl: Kubectl, namespace: str, name: str) -> str:
    run_id: str = wait_for(lambda: get_run(kubectl, namespace, name)["status"]["runId"])
    return run_id


def completed(url: str, run_id: str) -> int:
    return queue_counts(url, run_id).get("completed", 0)


def test_a_killed_worker_pods_items_come_back_and_complete_once(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    seed_prompts(db_url, 300)
    provider = fake_providers("--latency-ms", "300")
    operators([namespace])
    apply(kubectl, namespace, analysis_run(
        "crashy", workers=3, batchSize=3, leaseSeconds=5, targets=[fake_target(provider.url)]
    ))  # fmt: skip
    run_id = run_id_of(kubectl, namespace, "crashy")
    wait_for(lambda: len(pod_runner.pids(namespace)) == 3, timeout=30)
    wait_for(lambda: completed(db_url, run_id) >= 30, timeout=60)

    (pod, pid), *_ = pod_runner.pids(namespace).items()
    held = sql(
        db_url,
        "SELECT count(*) FROM analysis_queue WHERE run_id = $1 AND status = 'processing'"
        " AND lease_owner LIKE $2",
        run_id,
        f"{pod[1]}:%",
    )[0][0]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()

    wait_complete(kubectl, namespace, "crashy")
    assert_exactly_once(db_url, run_id, 300)
    (row,) = sql(
        db_url,
        "SELECT max(attempts) AS attempts, sum(lease_losses) AS losses,"
        " count(*) FILTER (WHERE status = 'failed') AS failed"
        " FROM analysis_queue WHERE run_id = $1",
        run_id,
    )
    assert row["failed"] == 0 and row["attempts"] <= 3, dict(row)
    assert held >= 1 and row["losses"] >= 1, (held, dict(row))
    exits = [e.exit_code for e in pod_runner.events_for(namespace, pod[1]) if e.kind == "exited"]
    assert 137 in exits
    reset = get_run(kubectl, namespace, "crashy")["status"]["lastStuckReset"]
    assert reset["time"] and reset["count"] >= 0  # the operator's timer ran (every 5 s here)
    print(f"\n[worker kill -9] run complete {time.monotonic() - killed_at:.1f} s after the kill")


class TableLock:
    """Holds ``LOCK TABLE analysis_queue IN SHARE MODE`` so that the fill's INSERT waits."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(url))
        self.loop.run_until_complete(
            self.conn.execute("BEGIN; LOCK TABLE analysis_queue IN SHARE MODE")
        )

    def release(self) -> None:
        self.loop.run_until_complete(self.conn.execute("COMMIT"))
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def test_an_operator_killed_during_the_fill_leaves_no_duplicate_items(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
) -> None:
    seed_prompts(db_url, 400)
    op = operators([namespace])
    lock = TableLock(db_url)
    try:
        two = [
            {"name": "one", "provider": "echo", "model": "e1"},
            {"name": "two", "provider": "echo", "model": "e2"},
        ]
        apply(kubectl, namespace, analysis_run("refill", workers=2, targets=two))
        wait_for(lambda: get_run(kubectl, namespace, "refill")["status"]["phase"] == "Filling")
        run_id = get_run(kubectl, namespace, "refill")["status"]["runId"]
        op.kill()
    finally:
        lock.release()
    assert get_deployment(kubectl, namespace, "refill-workers") is None
    op.start()
    wait_complete(kubectl, namespace, "refill")
    assert_exactly_once(db_url, run_id, 800)
    status = get_run(kubectl, namespace, "refill")["status"]
    assert status["counts"]["total"] == status["counts"]["completed"] == 800


def test_workers_keep_draining_while_the_operator_is_down(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    """The HA decision (one replica, Recreate): an operator outage delays status, not work."""
    seed_prompts(db_url, 300)
    provider = fake_providers("--latency-ms", "250")
    op = operators([namespace])
    apply(kubectl, namespace, analysis_run(
        "steady", workers=2, batchSize=3, targets=[fake_target(provider.url)]
    ))  # fmt: skip
    run_id = run_id_of(kubectl, namespace, "steady")
    wait_for(lambda: completed(db_url, run_id) >= 20, timeout=60)
    op.kill()
    frozen = get_run(kubectl, namespace, "steady")["status"]["counts"]["completed"]
    before = completed(db_url, run_id)
    time.sleep(4)
    assert completed(db_url, run_id) > before  # the workers do not need the operator
    assert get_run(kubectl, namespace, "steady")["status"]["counts"]["completed"] == frozen
    op.start()
    wait_complete(kubectl, namespace, "steady")
    assert_exactly_once(db_url, run_id, 300)


def test_the_run_waits_out_a_database_restart_and_completes(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    fake_providers: FakeProviders,
    tmp_path: Path,
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", fsync=False)
    url = pg.start()
    try:

        async def prepare() -> None:
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(prepare())
        seed_prompts(url, 300)
        provider = fake_providers("--latency-ms", "250")
        op = operators([namespace], database_url=url)
        apply(kubectl, namespace, analysis_run(
            "resilient", workers=2, batchSize=2, leaseSeconds=10,
            targets=[fake_target(provider.url)],
        ))  # fmt: skip
        run_id = run_id_of(kubectl, namespace, "resilient")
        wait_for(lambda: completed(url, run_id) >= 30, timeout=60)

        pg.stop(mode="fast")

        def degraded() -> None:
            cond = condition(get_run(kubectl, namespace, "resilient"), "Degraded")
            assert cond is not None and cond["status"] == "True", cond
            assert cond["reason"] == "DatabaseUnavailable", cond

        wait_for(degraded, timeout=30)

        def reported_unavailable() -> None:
            # Still alive (200) while the database is down; kopf caches probes for 10 s.
            code, body = op.health()
            assert code == 200 and "unavailable" in body, (code, body)

        wait_for(reported_unavailable, timeout=30, interval=1)
        assert op.child is not None and op.child.alive()
        pg.start()

        wait_complete(kubectl, namespace, "resilient")
        assert_exactly_once(url, run_id, 300)
        assert op.child is not None and op.child.alive() and op.starts == 1
        cond = condition(get_run(kubectl, namespace, "resilient"), "Degraded")
        assert cond is not None and cond["status"] == "False"
        reasons = [e["reason"] for e in events(kubectl, namespace, "resilient")]
        assert "DatabaseUnavailable" in reasons
        errors = [
            line
            for line in op.metrics().splitlines()
            if line.startswith('analysisq_reconcile_errors_total{reason="DatabaseUnavailable"}')
        ]
        assert errors and float(errors[0].split()[-1]) >= 1, errors
    finally:
        pg.stop(mode="immediate")


def test_a_missing_secret_and_a_refused_key_wait_for_a_fix_without_losing_items(
    operators: OperatorFactory,
    namespace: str,
    kubectl: Kubectl,
    pod_runner: PodRunner,
    db_url: str,
    fake_providers: FakeProviders,
) -> None:
    good, bad = "sk-good-4d1c9b7e5f", "sk-wrong-8a2e6c0d3b"
    seed_prompts(db_url, 60)
    provider = fake_providers("--require-api-key", good, "--latency-ms", "50")
    op = operators([namespace])
    target = fake_target(provider.url, apiKeySecretRef={"name": "llm-key", "key": "token"})
    apply(kubectl, namespace, analysis_run("keyed", workers=2, targets=[target]))

    def reason_is(expected: str) -> None:
        cond = condition(get_run(kubectl, namespace, "keyed"), "Degraded")
        assert cond is not None and cond["status"] == "True", cond
        assert cond["reason"] == expected, cond

    wait_for(lambda: reason_is("SecretMissing"), timeout=30)
    run = get_run(kubectl, namespace, "keyed")
    assert run["status"]["phase"] == "Pending"
    assert "secret llm-key not found" in run["status"]["message"]
    assert get_deployment(kubectl, namespace, "keyed-workers") is None

    secret(kubectl, namespace, "llm-key", {"token": bad})
    wait_for(lambda: reason_is("TargetPaused"), timeout=90)
    status = get_run(kubectl, namespace, "keyed")["status"]
    assert [t["name"] for t in status["pausedTargets"]] == ["llm"]
    run_id = status["runId"]
    counts = queue_counts(db_url, run_id)
    assert counts.get("failed", 0) == 0 and counts.get("completed", 0) == 0, counts

    secret(kubectl, namespace, "llm-key", {"token": good})
    kubectl("annotate", "--overwrite", "analysisrun", "keyed", "analysisq.io/resume-targets=1",
            namespace=namespace)  # fmt: skip
    wait_complete(kubectl, namespace, "keyed")
    assert_exactly_once(db_url, run_id, 60)
    reasons = [e["reason"] for e in events(kubectl, namespace, "keyed")]
    assert {"SecretMissing", "TargetPaused", "TargetsResumed", "Succeeded"} <= set(reasons)

    everything = "\n".join(
        [
            kubectl("get", "analysisrun", "keyed", "-o", "yaml", namespace=namespace).stdout,
            json.dumps(events(kubectl, namespace, "keyed")),
            json.dumps(get_deployment(kubectl, namespace, "keyed-workers")),
            op.log_text(),
        ]
    )
    for value in (good, bad):
        assert value not in everything
