"""The Model application as a Ray Serve deployment.

The replica hosts one ``ModelService`` (scheduling, adapters, limits) and its HTTP app. Its compute runs in
one ``ModelWorker`` per planned rank, started by ``start_workers`` like every component's workers:

- one CPU worker planned on the replica's node runs in the replica process, and the service drives its
  backend directly;
- otherwise (GPU ranks, ``dp_size`` > 1, or a worker planned on another node) each rank is a pinned Ray
  actor in a torch.distributed group, driven by a ``DataParallelBackend``.

The central server calls the service's methods through this deployment's handle (``_HANDLE_API``), each
call about a run routed to the replica serving it (``routing``). With several replicas, the native HTTP
routes, which reach whichever replica the proxy picks, send a call about a run on to that run's replica.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
from litestar import Litestar
from ray import serve

from twinkle.common.binding import bind_component, count_alive, route_by_run, start_workers, with_workers_alive
from twinkle.common.component import ComponentSpec
from twinkle.common.wire import ServiceHealth, ServiceInfo, following_run
from twinkle.common.workers import InProcessWorker, WorkerSpec, free_port_on_node

from .app import create_model_app
from .backend import TrainingBackend
from .routing import router_options

_WORKER = "twinkle.model.distributed:ModelWorker"
_MEGATRON_WORKER = "twinkle.model.megatron.worker:MegatronWorker"
_HANDLE_API = (
    "create_run", "forward_backward", "optim_step", "save_state", "save_sampler_weights", "load_state",
    "delete_run", "run_info", "list_runs", "info", "health", "skip", "next_seq_id", "settle",
    "outcome",
)


def run_state_dir(spec: ComponentSpec) -> str | None:
    """Where the application keeps its runs durable (``<checkpoint_dir>/.runs/<app>``), or None when the
    YAML turned it off (``durable_runs: false``) or no checkpoint directory is set."""
    if not spec.args.get("durable_runs", True) or not spec.checkpoint_dir:
        return None
    return os.path.join(spec.checkpoint_dir, ".runs", spec.app_name)


def start_model_workers(spec: ComponentSpec) -> tuple[list, TrainingBackend]:
    """Start the application's ranks as planned (``start_workers``): ``ModelWorker``s of the transformers
    backend, or ``MegatronWorker``s laid out by ``device_mesh`` (tp, pp, dp); return them with the backend that
    drives them: the in-process worker's own backend, or a ``DataParallelBackend`` over actors."""
    from .distributed import DataParallelBackend

    args = spec.args
    model_id = args["model_id"]
    megatron = args.get("backend") == "megatron"
    mesh = args.get("device_mesh") or {}
    planned = spec.workers or [WorkerSpec(app=spec.app_name, rank=0, world_size=1)]
    # Only a group of ranks needs a rendezvous (hosted by rank 0's node).
    master = free_port_on_node(planned[0].node_id) if len(planned) > 1 else ("127.0.0.1", 0)

    def worker_args(w: WorkerSpec) -> tuple[tuple, dict]:
        kwargs = dict(rank=w.rank, world_size=w.world_size, master_addr=master[0], master_port=master[1],
                      device=None if w.cuda_visible_devices else "cpu", max_tokens_per_datum=args.get("max_length"))
        if megatron:
            kwargs.update(tp_size=mesh.get("tp_size", 1), pp_size=mesh.get("pp_size", 1))
        return (model_id,), kwargs

    workers = start_workers(spec, _MEGATRON_WORKER if megatron else _WORKER, worker_args)
    if len(workers) == 1 and isinstance(workers[0], InProcessWorker):
        return workers, workers[0].target.backend  # in this process: no fan-out, no pickling
    return workers, DataParallelBackend(workers, model_id=model_id)


class ModelManagement:
    def __init__(self, spec: ComponentSpec) -> None:
        from .service import ModelService

        self.spec = spec
        adapter = spec.args.get("adapter_config") or {}
        self.workers, backend = start_model_workers(spec)
        self.service = ModelService(
            spec.args["model_id"],
            adapter_limit_per_owner=adapter.get("per_token_adapter_limit", 30),
            adapter_timeout_s=adapter.get("adapter_timeout", 1800.0),
            backend=backend,
            max_tokens_per_datum=spec.args.get("max_length"),
            state_dir=run_state_dir(spec),
            holder=serve.get_replica_context().replica_id.unique_id,
        )

    async def info(self) -> ServiceInfo:
        info = await self.service.info()
        workers = await asyncio.gather(*(w.describe() for w in self.workers))
        return msgspec.structs.replace(info, app=self.spec.app_name, workers=list(workers))

    async def health(self) -> ServiceHealth:
        return with_workers_alive(await self.service.health(), len(self.workers), await count_alive(self.workers))

    def __serve_build_asgi_app__(self) -> Litestar:
        from twinkle.common.authority import central_authority
        from twinkle.common.models import served_model_name

        model = self if self.spec.max_replicas == 1 else _RunRouted(self)
        return create_model_app(model, central_authority(self.spec), model_name=served_model_name(self.spec.args["model_id"]))


class _RunRouted:
    """This deployment as the native routes use it when it has several replicas: a call about a run goes
    through the deployment's handle to the replica serving the run (here, if the proxy already routed it by
    run); other calls are answered here."""

    def __init__(self, local: "ModelManagement") -> None:
        self._local = local
        self._handle = None

    def __getattr__(self, name: str) -> Any:
        if name not in _RUN_CALLS:
            return getattr(self._local, name)

        async def call(run_id: str, *args: Any, **kwargs: Any) -> Any:
            if serve.get_multiplexed_model_id() == run_id:
                return await getattr(self._local, name)(run_id, *args, **kwargs)
            if self._handle is None:
                context = serve.get_replica_context()
                self._handle = serve.get_deployment_handle(context.deployment, context.app_name)
            routed = getattr(route_by_run(self._handle, run_id), name)
            return await following_run(lambda: routed.remote(run_id, *args, **kwargs))

        return call



def _delegate(name: str):
    async def method(self, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.service, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in _HANDLE_API:
    if _name not in ModelManagement.__dict__:
        setattr(ModelManagement, _name, _delegate(_name))

ModelManagement = serve.ingress()(ModelManagement)


_RUN_CALLS = frozenset(_HANDLE_API) - {"list_runs", "info", "health"}


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    return bind_component(ModelManagement, spec, deployment, default_name, **router_options(run_state_dir(spec)))
