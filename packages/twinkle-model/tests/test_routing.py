"""Routing a run's calls among a model application's replicas (``twinkle.model.routing``)."""

from __future__ import annotations

from collections import Counter

from twinkle.model.durability import RunLeases
from twinkle.model.routing import choose_for_run


def test_a_run_goes_to_the_replica_holding_its_lease_while_it_is_alive():
    replicas = ["r-a", "r-b", "r-c"]
    for run_id in ("run-1", "run-2", "run-3"):
        for holder in replicas:
            assert replicas[choose_for_run(run_id, replicas, holder)] == holder


def test_a_run_without_a_live_holder_gets_the_same_replica_from_every_router_and_runs_spread():
    replicas = ["r-a", "r-b", "r-c"]
    picks = {f"run-{i}": replicas[choose_for_run(f"run-{i}", replicas, None)] for i in range(300)}
    assert picks == {run: replicas[choose_for_run(run, list(replicas), "r-dead")] for run in picks}
    spread = Counter(picks.values())
    assert set(spread) == set(replicas) and min(spread.values()) >= 70  # ~100 each
    # A replica that leaves moves only its own runs; one that joins takes runs from each, no more.
    without_b = {run: ["r-a", "r-c"][choose_for_run(run, ["r-a", "r-c"], None)] for run in picks}
    assert all(without_b[run] == picks[run] for run in picks if picks[run] != "r-b")
    with_d = {run: (replicas + ["r-d"])[choose_for_run(run, replicas + ["r-d"], None)] for run in picks}
    assert all(with_d[run] in (picks[run], "r-d") for run in picks)


def test_leases_name_the_last_claimer_and_only_it_releases(tmp_path):
    a, b = RunLeases(str(tmp_path), "r-a"), RunLeases(str(tmp_path), "r-b")
    assert a.holder_of("run-1") is None and not a.holds("run-1")
    a.claim("run-1")
    assert a.holds("run-1") and b.holder_of("run-1") == "r-a"
    b.claim("run-1")
    assert b.holds("run-1") and not a.holds("run-1")
    a.release("run-1")  # not a's any more: kept
    assert b.holds("run-1")
    b.release("run-1")
    assert a.holder_of("run-1") is None
    assert [p.name for p in (tmp_path / ".leases").iterdir()] == []  # no temporary files left behind


class _FakeReplica:
    """What Serve's router asks of a replica: its id, its capacity and its queue length."""

    def __init__(self, unique_id: str, deployment_id) -> None:
        from ray.serve._private.common import ReplicaID

        self.replica_id = ReplicaID(unique_id=unique_id, deployment_id=deployment_id)
        self.max_ongoing_requests = 100
        self.multiplexed_model_ids: set[str] = set()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def test_concurrent_calls_made_while_serving_one_request_are_all_routed(tmp_path):
    """Calls made while serving one HTTP request share Serve's internal request id; each still gets a replica
    (Serve's base router matched by that id and left the second call spinning in the router's loop)."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from twinkle.model.routing import RunAffinityRouter

    async def main() -> list:
        deployment = DeploymentID(name="ModelManagement", app_name="models-tiny")
        router = RunAffinityRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.REPLICA)
        router.initialize_state(state_dir=str(tmp_path))
        replicas = [_FakeReplica("r-a", deployment), _FakeReplica("r-b", deployment)]
        router.update_replicas(replicas)
        RunLeases(str(tmp_path), "r-b").claim("run-1")
        calls = [RequestMetadata(request_id="http-1", internal_request_id="shared", call_method=method,
                                 multiplexed_model_id=run)
                 for method, run in (("info", ""), ("health", ""), ("forward", "run-1"), ("optim_step", "run-1"))]
        chosen = [router._choose_replica_for_request(PendingRequest(args=[], kwargs={}, metadata=m)) for m in calls]
        return await asyncio.wait_for(asyncio.gather(*chosen), 5)

    picked = asyncio.run(main())
    assert [r.replica_id.unique_id for r in picked[2:]] == ["r-b", "r-b"]  # the run's calls reach its replica
    assert all(r.replica_id.unique_id in ("r-a", "r-b") for r in picked[:2])
