"""Binding a component's deployment class to Ray Serve with the options from the YAML.

Every component (server, model, sampler, processor) is one Ray Serve application: one deployment class whose
replica hosts the component's Litestar app (``__serve_build_asgi_app__``) and answers Serve-handle calls from
the central server. This module holds what they share.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec

from .component import ComponentSpec
from .wire import ServiceHealth
from .workers import FORWARDED_ENV, InProcessWorker, RayWorker, WorkerSpec, set_torch_threads, start_ray_workers

# A replica is an orchestrator: it needs no whole CPU, and on a 2-core laptop four whole-CPU replicas would
# never all be scheduled. The YAML can say otherwise per deployment.
DEFAULT_REPLICA_CPUS = 0.1
# Ray Serve admits 5 concurrent requests per replica unless told otherwise. Every app queues and orders its
# work itself and bounds it per key (pending requests, long-polls), and a waiting request costs a coroutine:
# slots must never be what runs out, or one key's 25 s long-polls and seq_id waits would make everybody
# queue behind them in Serve's router. 4096 is far above what the per-key limits let a few keys hold.
DEFAULT_MAX_ONGOING_REQUESTS = 4096


def deployment_options(deployment: Any | None, default_name: str,
                       on_node: str | None = None) -> tuple[str, dict[str, Any]]:
    """The Serve deployment name and ``.options(...)`` for a component: the YAML's values, over defaults
    that suit Twinkle (fractional CPUs, many concurrent requests, a short graceful shutdown); ``on_node``
    (an IP address) pins its replicas to that machine."""
    options: dict[str, Any] = deployment.serve_options() if deployment is not None else {}
    name = getattr(deployment, "name", None) or default_name
    actor_options = dict(options.pop("ray_actor_options", None) or {})
    actor_options.setdefault("num_cpus", DEFAULT_REPLICA_CPUS)
    if on_node is not None:
        # Ray gives every node the resource ``node:<its IP>`` (1.0); asking a sliver of it pins the actor.
        actor_options["resources"] = {**(actor_options.get("resources") or {}), f"node:{on_node}": 0.001}
    runtime_env = dict(actor_options.get("runtime_env") or {})
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.update(runtime_env.get("env_vars") or {})  # the YAML wins
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if runtime_env:
        actor_options["runtime_env"] = runtime_env
    options["ray_actor_options"] = actor_options
    options.setdefault("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
    if not options.get("autoscaling_config") and "num_replicas" not in options:
        options["num_replicas"] = 1
    # Serve waits up to 20 s per replica by default; a stopping server should not take a minute.
    options.setdefault("graceful_shutdown_timeout_s", 5.0)
    options.setdefault("graceful_shutdown_wait_loop_s", 0.5)
    return name, options


def bind_component(cls: type, spec: ComponentSpec, deployment: Any | None, default_name: str,
                   on_node: str | None = None, **extra_options: Any):
    """Return the Serve ``Application`` for one component (``extra_options``: the component's own;
    ``on_node``: see :func:`deployment_options`)."""
    from ray import serve

    name, options = deployment_options(deployment, default_name, on_node)
    return serve.deployment(cls).options(name=name, **options, **extra_options).bind(spec)


def route_by_run(handle: Any, run_id: str) -> Any:
    """``handle`` with its calls routed to the replica serving training run ``run_id`` (the model
    application's router reads the run from the request's ``multiplexed_model_id``)."""
    return handle.options(multiplexed_model_id=run_id)


def start_workers(spec: ComponentSpec, target: str, args_for) -> list[InProcessWorker | RayWorker]:
    """Start the component's workers as planned: one CPU worker runs in this process, anything else
    (GPU workers, data-parallel groups) runs as pinned Ray actors."""
    workers = spec.workers or [WorkerSpec(app=spec.app_name, rank=0, world_size=1)]
    if len(workers) == 1 and workers[0].cuda_visible_devices is None and on_this_node(workers[0].node_id):
        only = workers[0]
        # Ray sets OMP_NUM_THREADS to a replica's CPU request (0.1 -> 1 thread); use the cores we planned.
        set_torch_threads(only.threads or os.cpu_count() or 1)
        args, kwargs = args_for(only)
        return [InProcessWorker(target, only.rank, args, kwargs)]
    return start_ray_workers(target, list(workers), args_for)


def on_this_node(node_id: str | None) -> bool:
    if node_id is None:
        return True
    import ray

    return not ray.is_initialized() or ray.get_runtime_context().get_node_id() == node_id


async def count_alive(workers: list, timeout_s: float = 5.0) -> int:
    """How many of ``workers`` answer ``describe()`` within ``timeout_s`` (a Ray actor answers even during a
    long call: its host is an asyncio actor)."""

    async def answers(worker: Any) -> bool:
        try:
            await asyncio.wait_for(worker.describe(), timeout_s)
            return True
        except Exception:  # noqa: BLE001 - dead, unreachable or too slow all mean "not alive"
            return False

    return sum(await asyncio.gather(*(answers(w) for w in workers)))


def with_workers_alive(health: ServiceHealth, planned: int, alive: int) -> ServiceHealth:
    """``health`` with the deployment's count of its workers; degraded when some are gone."""
    status = health.status if alive >= planned else "degraded"
    return msgspec.structs.replace(health, workers=planned, workers_alive=alive, status=status)
