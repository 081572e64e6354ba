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

Without Ray, ``ProcessWorker`` hosts the target in a local process started with ``spawn`` (the processor's
encoding pool, data-parallel model ranks in tests). All three kinds have one interface: ``await call(method,
*args)``, ``submit(method, *args)`` for a caller on a plain thread (a ``concurrent.futures.Future``), and
``describe()`` (a ``WorkerInfo``). A target's sync methods run off the caller's event loop; an error raised
by the target comes back as itself (Ray's wrapper unwrapped by ``wire.remote_call``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import itertools
import multiprocessing
import os
import queue
import socket
import sys
import threading
from typing import Any, Literal

import msgspec

from .env import CACHE_DIR_ENV, TRUST_REMOTE_CODE_ENV
from .wire import WorkerInfo, remote_call, remote_error

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


def describe_process(rank: int) -> WorkerInfo:
    """This process as a worker of rank ``rank`` (with its Ray node when Ray is running here)."""
    node_id = None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
    return WorkerInfo(rank=rank, pid=os.getpid(), hostname=socket.gethostname(), node_id=node_id,
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


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

    async def describe(self) -> WorkerInfo:
        return describe_process(self._rank)


class InProcessWorker:
    """A worker that lives in the calling process; calls run in a thread so the event loop stays free."""

    def __init__(self, target: str, rank: int, args: tuple, kwargs: dict) -> None:
        self._rank = rank
        self.target = load_object(target)(*args, **kwargs)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await _invoke(self.target, method, args, kwargs)

    def submit(self, method: str, *args: Any) -> concurrent.futures.Future:
        """The call for a caller on a plain thread: runs on that thread, returns a done future."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        try:
            result.set_result(getattr(self.target, method)(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future
            result.set_exception(e)
        return result

    async def describe(self) -> WorkerInfo:
        return describe_process(self._rank)

    def close(self) -> None:
        close = getattr(self.target, "close", None)
        if close is not None and not inspect.iscoroutinefunction(close):
            close()


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

    async def describe(self) -> WorkerInfo:
        return await remote_call(self.actor.describe.remote())


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


# --- workers in local processes ----------------------------------------------------------------------------

StartMethod = Literal["spawn", "forkserver"]

_DESCRIBE = "__describe__"
_CLOSE = "__close__"


class WorkerExited(RuntimeError):
    """A worker's process ended; the calls it had not answered fail with this."""


def _process_main(conn: Any, target: str, rank: int, args: tuple, kwargs: dict, env: dict[str, str]) -> None:
    """The body of a ``ProcessWorker``: build the target, then answer calls one at a time, in order."""
    os.environ.update(env)
    threads = os.environ.get("TWINKLE_TORCH_THREADS")
    if threads:
        set_torch_threads(int(threads))
    loop = asyncio.new_event_loop()  # for a target's async methods
    try:
        obj = load_object(target)(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - delivered to the parent
        _send(conn, 0, False, e)
        return
    _send(conn, 0, True, None)
    while True:
        try:
            call_id, method, call_args, call_kwargs = conn.recv()
        except (EOFError, OSError):
            break
        try:
            if method == _DESCRIBE:
                value: Any = describe_process(rank)
            elif method == _CLOSE:
                close = getattr(obj, "close", None)
                value = close() if close is not None else None
            else:
                value = getattr(obj, method)(*call_args, **call_kwargs)
            if inspect.isawaitable(value):
                value = loop.run_until_complete(value)
            reply = (True, value)
        except BaseException as e:  # noqa: BLE001 - delivered to the parent
            reply = (False, e)
        _send(conn, call_id, *reply)
        if method == _CLOSE:
            break


def _send(conn: Any, call_id: int, ok: bool, value: Any) -> None:
    try:
        conn.send((call_id, ok, value))
    except Exception as e:  # noqa: BLE001 - a result or an exception that does not pickle
        conn.send((call_id, False, RuntimeError(f"{type(value).__name__} could not be sent back: {e}")))


class ProcessWorker:
    """A worker in a local process (started with ``spawn``, never ``fork``: the parent has threads of its own,
    and forking a threaded process can deadlock the child). The child builds ``target(*args, **kwargs)`` and
    answers calls one at a time, in the order they were sent; calls may be sent before it is ready.

    Like every spawn-started process, the child re-imports the parent's ``__main__`` module, so that must be
    import-safe. ``env`` is added to the child's environment (``TWINKLE_TORCH_THREADS`` sets its torch
    threads). Calls are sent by a thread of their own: a large argument never blocks the caller while the
    child is busy with an earlier call."""

    def __init__(self, target: str, rank: int = 0, args: tuple = (), kwargs: dict | None = None, *,
                 env: dict[str, str] | None = None, start_method: StartMethod = "spawn") -> None:
        self.rank = rank
        ctx = multiprocessing.get_context(start_method)
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_process_main, args=(child, target, rank, tuple(args), dict(kwargs or {}),
                                                                dict(env or {})),
                                    daemon=True, name=f"twinkle-worker{rank}")
        self._process.start()
        child.close()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._pending: dict[int, concurrent.futures.Future] = {0: self._ready}
        self._gone: BaseException | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"twinkle-worker{rank}-reader")
        self._sender = threading.Thread(target=self._send, daemon=True, name=f"twinkle-worker{rank}-sender")
        self._reader.start()
        self._sender.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._gone is None and self._process.is_alive()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the target is built; raises the error its constructor raised."""
        self._ready.result(timeout)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._gone is not None:
                future.set_exception(self._gone)
                return future
            call_id = next(self._ids)
            self._pending[call_id] = future
        self._outbox.put((call_id, method, args, kwargs))
        return future

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.wrap_future(self.submit(method, *args, **kwargs))

    async def describe(self) -> WorkerInfo:
        return await self.call(_DESCRIBE)

    def close(self, timeout: float = 30.0) -> None:
        """Close the target (its ``close()``, if any) and end the process; kill it if it does not end."""
        if self.is_alive():
            try:
                self.submit(_CLOSE).result(timeout)
            except Exception:  # noqa: BLE001, S110 - ending anyway
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._outbox.put(None)
        self._sender.join(5)
        self._conn.close()

    def _send(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except Exception as e:  # noqa: BLE001 - an argument that does not pickle, or the process is gone
                with self._lock:
                    future = self._pending.pop(message[0], None)
                if future is not None:
                    gone = isinstance(e, (OSError, EOFError))
                    future.set_exception(WorkerExited(f"worker {self.rank} has exited ({e})") if gone else e)

    def _read(self) -> None:
        error: BaseException | None = None
        while True:
            try:
                call_id, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            if call_id == 0 and not ok:
                error = value  # the constructor failed: every call fails with its error
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        with self._lock:
            self._gone = error or WorkerExited(f"worker {self.rank} (pid {self.pid}) has exited")
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            future.set_exception(self._gone)


def start_process_workers(target: str, specs: list[WorkerSpec], args_for: Any, *, ready_timeout: float | None = None,
                          env: dict[str, str] | None = None) -> list[ProcessWorker]:
    """Start one local process per spec (``args_for(spec) -> (args, kwargs)``, as ``start_ray_workers``), each
    with the spec's ``worker_env`` plus ``env``. With ``ready_timeout``, wait until every target is built
    (and stop them all if one fails)."""
    workers = []
    for spec in specs:
        args, kwargs = args_for(spec)
        workers.append(ProcessWorker(target, spec.rank, args, kwargs, env={**worker_env(spec), **(env or {})}))
    if ready_timeout is not None:
        try:
            for w in workers:
                w.wait_ready(ready_timeout)
        except BaseException:
            for w in workers:
                w.close(timeout=5)
            raise
    return workers


def free_local_port() -> int:
    """A TCP port free on this machine now (for a local torch.distributed rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
