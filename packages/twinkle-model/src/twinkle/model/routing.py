"""Which replica of a model application serves a run: Ray Serve request routing keyed by the run.

A run's adapter and optimizer live in one replica's memory, so every call about a run must reach the replica
that holds it. Callers name the run as the request's ``multiplexed_model_id`` (``binding.route_by_run``); Serve's
routers, in the central app and in the HTTP proxy alike, then use ``RunAffinityRouter``:

1. the replica that reports holding the run (each replica reports its runs every
   ``ROUTING_STATS_PERIOD_S``, ``ModelManagement.record_routing_stats``);
2. a run nobody holds (new, or its replica is gone) goes to the replica that rendezvous hashing of the run
   id over the live replicas picks. Every router computes the same choice without talking to the others,
   new runs spread evenly over the replicas, and a replica that leaves or joins moves only the runs it
   held or would win.

Routing is a preference, not the guarantee: two routers may briefly disagree (a report not yet seen). The
guarantee is the run's lease (``durability.RunLeases``): the replica that restores a run takes it, the one
that had it steps aside and answers ``RunMoved``, and the caller sends the call again.

Calls that name no run (``info``, ``health``, ``list_runs``) go to the less busy of two random replicas.
The router is a plain ``RequestRouter``, not Serve's FIFO one: that one may hand the replica chosen for one
request to another request waiting ahead of it, which would send a run's call to a replica chosen for
another run.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTING_STATS_PERIOD_S = 1.0
ROUTER_CLASS = "twinkle.model.routing:RunAffinityRouter"


def router_options() -> dict[str, Any]:
    """The model deployment's ``request_router_config``."""
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(request_router_class=ROUTER_CLASS,
                                                         request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)}


def _weight(run_id: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{run_id}\0{replica}".encode(), digest_size=8).digest()


def choose_for_run(run_id: str, replicas: Sequence[tuple[str, Any]]) -> int:
    """Index of the replica to serve ``run_id`` among ``(replica id, routing stats)`` pairs (see the module
    docstring); ties between several replicas claiming the run (a report not yet updated) go by hash too."""
    holders = [i for i, (_, stats) in enumerate(replicas) if run_id in ((stats or {}).get("runs") or ())]
    pool = holders or range(len(replicas))
    return max(pool, key=lambda i: _weight(run_id, replicas[i][0]))


class RunAffinityRouter(RequestRouter):
    """A call about a run goes to the replica serving it; any other call to the less busy of two."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        run_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not run_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        pick = choose_for_run(run_id, [(r.replica_id.unique_id, r.routing_stats) for r in candidate_replicas])
        return [[candidate_replicas[pick]]]
