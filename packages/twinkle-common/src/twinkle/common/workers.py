"""Worker processes of a component, started on their planned devices.

A component (model, sampler, processor) runs its compute in *workers*: one per planned rank. The placement
plan says, for each rank, which Ray node it runs on and which physical GPUs it sees. This module turns that
into Ray actors:

- the actor is pinned to the planned node (``NodeAffinitySchedulingStrategy``, hard), and asks Ray for as
  many GPUs as it uses, so Ray's accounting stays honest;
- its ``CUDA_VISIBLE_DEVICES`` is the planned *physical* id, and ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``
  stops Ray from overwriting it with whichever GPU index it happened to pick. The planner guarantees that no
  two workers claim one GPU, so the two views cannot disagree;
- settings every worker must share (``TWINKLE_TRUST_REMOTE_CODE``, the cache dir) travel in its env.

A component with a single CPU worker runs it in-process instead (``InProcessWorker``): on a laptop that saves
a ~90 MB Ray worker process and a pickling hop per call, and nothing needs pinning on a CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import os
import socket
import sys
from typing import Any

import msgspec

from .env import CACHE_DIR_ENV, TRUST_REMOTE_CODE_ENV
from .wire import remote_call, remote_error

# Environment variables every worker inherits from the launcher when set there.
FORWARDED_ENV = (TRUST_REMOTE_CODE_ENV, CACHE_DIR_ENV, "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class WorkerSpec(msgspec.Struct, frozen=True):
    """Where one rank of a component runs. ``cuda_visible_devices`` is None for a CPU worker."""

    app: str
    rank: int
    world_size: int
    node_id: str | None = None
    node_ip: str | None = None
    cuda_visible_devices: str | None = None
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    threads: int | None = None  # torch intra-op threads; None = the node's cores


def load_object(path: str) -> Any:
    """Import ``package.module:attr``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def describe_process(rank: int) -> dict[str, Any]:
    return {
        "rank": rank,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


async def _invoke(target: Any, method: str, args: tuple, kwargs: dict) -> Any:
    """Await an async method in place; run a sync one (compute) in a thread so the loop stays free."""
    fn = getattr(target, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


class _WorkerHost:
    """The body of a worker actor: builds the target object in the worker process and calls its methods.

    An asyncio actor, so ``describe()`` answers while a long call runs and async targets (a sampler's
    batching loop) keep their event loop."""

    def __init__(self, target: str, rank: int, args: tuple, kwargs: dict) -> None:
        self._rank = rank
        threads = os.environ.get("TWINKLE_TORCH_THREADS")
        if threads:
            set_torch_threads(int(threads))
        self._target = load_object(target)(*args, **kwargs)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await _invoke(self._target, method, args, kwargs)

    async def describe(self) -> dict[str, Any]:
        import ray

        info = describe_process(self._rank)
        info["node_id"] = ray.get_runtime_context().get_node_id()
        return info


class InProcessWorker:
    """A worker that lives in the calling process; calls run in a thread so the event loop stays free."""

    def __init__(self, target: str, rank: int, args: tuple, kwargs: dict) -> None:
        self._rank = rank
        self.target = load_object(target)(*args, **kwargs)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await _invoke(self.target, method, args, kwargs)

    async def describe(self) -> dict[str, Any]:
        info = describe_process(self._rank)
        try:
            import ray

            info["node_id"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        except ImportError:  # pragma: no cover
            info["node_id"] = None
        return info


class RayWorker:
    """A handle on one worker actor with the same async interface as ``InProcessWorker``."""

    def __init__(self, actor: Any, spec: WorkerSpec) -> None:
        self.actor = actor
        self.spec = spec

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await remote_call(self.actor.call.remote(method, *args, **kwargs))

    def submit(self, method: str, *args: Any) -> concurrent.futures.Future:
        """The same call for a caller on a plain thread (the model's compute thread)."""
        result: concurrent.futures.Future = concurrent.futures.Future()

        def _done(ray_future: concurrent.futures.Future) -> None:
            try:
                result.set_result(ray_future.result())
            except Exception as e:  # noqa: BLE001
                result.set_exception(remote_error(e))

        self.actor.call.remote(method, *args).future().add_done_callback(_done)
        return result

    async def describe(self) -> dict[str, Any]:
        return await self.actor.describe.remote()


def worker_env(spec: WorkerSpec) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["TWINKLE_WORKER_RANK"] = str(spec.rank)
    env["TWINKLE_WORKER_WORLD_SIZE"] = str(spec.world_size)
    if spec.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    if spec.threads:
        # Ray sets OMP_NUM_THREADS to the actor's CPU request (often 0 or 1 here); say what we mean.
        env["OMP_NUM_THREADS"] = str(spec.threads)
        env["TWINKLE_TORCH_THREADS"] = str(spec.threads)
    return env


def start_ray_workers(target: str, specs: list[WorkerSpec], args_for: Any) -> list[RayWorker]:
    """Start one actor per spec. ``args_for(spec) -> (args, kwargs)`` gives each rank's constructor args."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    host_cls = ray.remote(_WorkerHost)
    workers = []
    for spec in specs:
        args, kwargs = args_for(spec)
        options: dict[str, Any] = {
            "num_cpus": spec.num_cpus,
            "num_gpus": spec.num_gpus,
            "runtime_env": {"env_vars": worker_env(spec)},
            "name": f"twinkle:{spec.app}:worker{spec.rank}",
        }
        if spec.node_id:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(spec.node_id, soft=False)
        actor = host_cls.options(**options).remote(target, spec.rank, args, kwargs)
        workers.append(RayWorker(actor, spec))
    return workers


def set_torch_threads(n: int) -> None:
    """Use ``n`` intra-op threads. Before torch is imported, the environment is enough (torch reads
    OMP_NUM_THREADS at import), so a process that never needs torch (the processor) never imports it."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def free_port_on_node(node_id: str | None) -> tuple[str, int]:
    """An (ip, port) that is free on the given node: where rank 0 hosts torch.distributed's rendezvous."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def _probe() -> tuple[str, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    task = ray.remote(num_cpus=0)(_probe)
    if node_id:
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return ray.get(task.remote(), timeout=120)
