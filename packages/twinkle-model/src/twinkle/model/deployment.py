"""The Model application as a Ray Serve deployment.

The replica hosts one ``ModelService`` (scheduling, adapters, limits) and its HTTP app. Where the compute
runs follows the placement plan:

- one CPU worker on the replica's node: the backend lives in the replica process (no extra process);
- otherwise (GPU ranks, ``dp_size`` > 1, or a worker planned on another node): one pinned Ray actor per rank, each a ``ModelWorker`` in a
  torch.distributed group, driven by a ``DataParallelBackend``.

The central server calls the service's methods through this deployment's handle (``_HANDLE_API``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from litestar import Litestar
from ray import serve

from twinkle.common.component import ComponentSpec
from twinkle.common.binding import bind_component, on_this_node, set_torch_threads
from twinkle.common.workers import free_port_on_node, start_ray_workers

from .app import create_model_app

_WORKER = "twinkle.model.distributed:ModelWorker"
_HANDLE_API = (
    "create_run", "forward_backward", "optim_step", "save_state", "save_sampler_weights", "load_state",
    "delete_run", "run_info", "list_runs", "info", "health", "skip", "next_seq_id",
)


class ModelManagement:
    def __init__(self, spec: ComponentSpec) -> None:
        from .service import ModelService

        self.spec = spec
        args = spec.args
        adapter = args.get("adapter_config") or {}
        model_id = args["model_id"]
        self.workers = []
        backend = None
        specs = list(spec.workers)
        # The same rule as every component's start_workers: one CPU worker planned on this node runs here.
        in_process = len(specs) <= 1 and (not specs or (specs[0].cuda_visible_devices is None
                                                        and on_this_node(specs[0].node_id)))
        if in_process:
            # Ray set OMP_NUM_THREADS to this replica's CPU request (0.1 -> 1 thread): use the planned cores.
            set_torch_threads((specs[0].threads if specs else None) or os.cpu_count() or 1)
        else:
            from .distributed import DataParallelBackend

            master_addr, master_port = free_port_on_node(specs[0].node_id)
            self.workers = start_ray_workers(
                _WORKER, specs,
                lambda w: ((model_id,), dict(rank=w.rank, world_size=w.world_size, master_addr=master_addr,
                                             master_port=master_port, max_tokens_per_datum=args.get("max_length"))),
            )
            # Each RayWorker is the RankHandle the backend drives: submit(method, *args) -> Future.
            backend = DataParallelBackend(self.workers, model_id=model_id)
        self.service = ModelService(
            model_id,
            adapter_limit_per_owner=adapter.get("per_token_adapter_limit", 30),
            adapter_timeout_s=adapter.get("adapter_timeout", 1800.0),
            backend=backend,
            max_tokens_per_datum=args.get("max_length"),
        )

    async def info(self) -> dict[str, Any]:
        import msgspec

        info = msgspec.to_builtins(await self.service.info())
        if self.workers:
            info["workers"] = await asyncio.gather(*(w.describe() for w in self.workers))
        else:
            from twinkle.common.workers import describe_process

            info["workers"] = [describe_process(0)]
        return {**info, "app": self.spec.app_name}

    def __serve_build_asgi_app__(self) -> Litestar:
        from twinkle.common.authority import central_authority
        from twinkle.common.models import served_model_name

        return create_model_app(self, central_authority(self.spec), model_name=served_model_name(self.spec.args["model_id"]))


def _delegate(name: str):
    async def method(self, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.service, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in _HANDLE_API:
    if _name not in ModelManagement.__dict__:
        setattr(ModelManagement, _name, _delegate(_name))

ModelManagement = serve.ingress()(ModelManagement)


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    return bind_component(ModelManagement, spec, deployment, default_name)
