"""TEST-ONLY: run a function on N spawned rank processes joined by gloo, with megatron's parallel state set up.

    from ranks import run_ranks          # this directory on sys.path

    def check(rank, model_id):           # module-level: each rank loads it again from its file
        ...                              # parallel_state is initialised; the CPU shim is installed
        return {"diff": 0.0}             # plain data (tensors are fine), no classes of check's module

    results = run_ranks(check, 2, "builtin://tiny-qwen2", tp=2)   # [rank 0's result, rank 1's result]

Each rank installs ``cpu_shim`` (a no-op with CUDA), joins a gloo group on 127.0.0.1, runs
``initialize_model_parallel(tp, pp)`` and ``model_parallel_cuda_manual_seed``, calls ``fn(rank, *args)`` and
always tears the groups down. A rank's exception is re-raised here (``RankError``) with its traceback text; on
a timeout or a failure the other ranks (possibly stuck in a collective) are killed. ``fn``'s module is executed
again in each rank from its file, because pytest's importlib import mode gives test modules names that
cannot be imported. Meant for CPU machines: the group is always gloo.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _where(fn: Callable[..., Any]) -> tuple[str, str | None, str]:
    module = sys.modules.get(fn.__module__)
    path = getattr(module, "__file__", None) if module is not None else fn.__code__.co_filename
    return fn.__module__, path, fn.__qualname__


def _load(where: tuple[str, str | None, str]) -> Callable[..., Any]:
    """The function again, in the rank process. By file when there is one: pytest's importlib import mode gives
    test modules names that are not importable."""
    name, path, qualname = where
    if path is None:
        module = importlib.import_module(name)
    else:
        spec = importlib.util.spec_from_file_location(f"_ranks_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _rank_main(where: tuple[str, str | None, str], rank: int, world_size: int, port: int, tp: int, pp: int, seed: int,
               timeout: float, args: tuple, results: Any) -> None:
    try:
        if _HERE not in sys.path:
            sys.path.insert(0, _HERE)
        import cpu_shim
        import torch

        torch.set_num_threads(1)  # ranks share the machine's cores
        cpu_shim.install()
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        try:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            out = _load(where)(rank, *args)
        finally:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
        # Plain pickle to bytes: torch's multiprocessing pickler would share tensors through this (exiting) process.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, tp: int = 1, pp: int = 1, seed: int = 1234,
              timeout: float = 300) -> list[Any]:
    """``[fn(rank, *args) for each rank]``, computed on ``world_size`` spawned gloo ranks (see the module doc)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    where = _where(fn)
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(where, r, world_size, port, tp, pp, seed, timeout, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish "
                                       f"within {timeout}s") from None
                # A rank that crashed hard (signal, os._exit) reports nothing: a non-zero exit code says so.
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RankError(f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                    "without a result") from None
                continue
            if status == "error":
                raise RankError(f"rank {rank} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
    return [out[r] for r in range(world_size)]
