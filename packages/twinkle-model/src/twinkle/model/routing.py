"""Which replica of a model application serves a run: Ray Serve request routing keyed by the run.

A run's adapter and optimizer live in one replica's memory, so every call about a run must reach the replica
that holds it. Callers name the run as the request's ``multiplexed_model_id`` (``binding.route_by_run``);
Serve's routers, in the central app and in the HTTP proxy alike, then use ``RunAffinityRouter``:

1. the replica holding the run's lease (``durability.RunLeases``: a file in the application's run-state
   directory naming the replica that created or restored the run last), when it is among the live replicas;
2. otherwise (the run is new, or its replica is gone) the replica that rendezvous hashing of the run id over
   the live replicas picks: every router computes the same choice without talking to the others, and new
   runs spread evenly over the replicas. That replica creates or restores the run and takes its lease.

The lease is also the guarantee: a replica that finds a run it holds leased to another steps aside
(``RunMoved``) and the caller sends the call again, so a router with a stale view costs a retry, never a
run trained in two places.

Calls that name no run (``info``, ``health``, ``list_runs``) go to one of two random replicas. The router is a
plain ``RequestRouter``, not Serve's FIFO one: that one may hand the replica chosen for one request to
another request waiting ahead of it, which would send a run's call to a replica chosen for another run. A
chosen replica goes to the very request it was chosen for (``_fulfill_next_pending_request``): Serve's base
matches by internal request id, which every call made while serving one HTTP request shares, so two concurrent
calls of one request (``admin/services`` asks for ``info`` and ``health`` at once) left one of them spinning in
the router's event loop, stalling every handle call of the process.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .durability import RunLeases

ROUTER_CLASS = "twinkle.model.routing:RunAffinityRouter"


def router_options(state_dir: str | None) -> dict[str, Any]:
    """The model deployment's ``request_router_config``: routed by the leases under ``state_dir``."""
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(request_router_class=ROUTER_CLASS,
                                                         request_router_kwargs={"state_dir": state_dir or ""})}


def _weight(run_id: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{run_id}\0{replica}".encode(), digest_size=8).digest()


def choose_for_run(run_id: str, replicas: Sequence[str], holder: str | None) -> int:
    """Index of the replica to serve ``run_id`` among the live ``replicas`` (their unique ids), given the
    replica its lease names (``holder``; None when it has none)."""
    if holder in replicas:
        return replicas.index(holder)
    return max(range(len(replicas)), key=lambda i: _weight(run_id, replicas[i]))


class RunAffinityRouter(RequestRouter):
    """A call about a run goes to the replica serving it; any other call to one of two random replicas."""

    def initialize_state(self, state_dir: str = "", **kwargs: Any) -> None:
        self._leases = RunLeases(state_dir, holder="") if state_dir else None

    def _holder(self, run_id: str) -> str | None:
        if getattr(self, "_leases", None) is None:
            return None
        try:
            return self._leases.holder_of(run_id)
        except (OSError, ValueError):  # an id no run can have, or storage unreadable: hash
            return None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        run_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not run_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        pick = choose_for_run(run_id, [r.replica_id.unique_id for r in candidate_replicas], self._holder(run_id))
        return [[candidate_replicas[pick]]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return
