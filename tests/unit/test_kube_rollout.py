"""When a rollout of the workers' Deployment is done (``analysisq.kube.rollout``)."""

from __future__ import annotations

import pytest

from analysisq.kube.rollout import old_pods_gone, rolled_out

pytestmark = pytest.mark.unit


def test_a_rollout_is_done_when_only_current_pods_remain() -> None:
    def deployment(replicas: int, updated: int, total: int, observed: int = 2) -> dict[str, object]:
        return {
            "metadata": {"generation": 2},
            "spec": {"replicas": replicas},
            "status": {
                "observedGeneration": observed,
                "updatedReplicas": updated,
                "replicas": total,
            },
        }

    assert rolled_out(deployment(2, 2, 2))
    assert not rolled_out(deployment(2, 1, 3))  # an old pod still runs
    assert not rolled_out(deployment(2, 2, 2, observed=1))  # the controller has not seen it
    assert not rolled_out(None)
    scaled_down = {"metadata": {"generation": 1}, "spec": {"replicas": 0}}
    assert rolled_out({**scaled_down, "status": {"observedGeneration": 1}})


def test_a_resume_waits_until_the_old_pods_finished_terminating() -> None:
    """rolled_out ignores deleted pods that still drain with the old key; resuming then let a
    late 401 from one of them pause the target again."""
    done = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 2, "template": {"spec": {"terminationGracePeriodSeconds": 30}}},
        "status": {"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2},
    }
    assert rolled_out(done)
    assert not old_pods_gone(done, rolled_out_at=100.0, now=100.0)
    assert not old_pods_gone(done, rolled_out_at=100.0, now=129.0)
    assert old_pods_gone(done, rolled_out_at=100.0, now=130.5)
    # where the API counts terminating pods, that count decides at once
    draining = {**done, "status": {**done["status"], "terminatingReplicas": 1}}
    assert not old_pods_gone(draining, rolled_out_at=0.0, now=1e9)
    drained = {**done, "status": {**done["status"], "terminatingReplicas": 0}}
    assert old_pods_gone(drained, rolled_out_at=100.0, now=100.0)
