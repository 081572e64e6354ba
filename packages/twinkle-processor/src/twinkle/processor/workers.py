"""CPU worker processes that encode shards of a batch in parallel.

Tokenizing is cheap per row but a dataset has many rows, and chat-template rendering is pure Python (the
GIL serializes it), so threads do not scale; processes do. The pool is a stdlib ``ProcessPoolExecutor``:

- it starts its processes with ``spawn`` (or ``forkserver``), never ``fork``: the service runs inside a Ray
  actor with threads of its own (Ray's, the event loop's, the tokenizer's Rust pool), and forking a
  threaded process can deadlock the child;
- each process loads the tokenizer once, in the pool's initializer, from the already-resolved local model
  directory (no hub lookups per worker), with ``TOKENIZERS_PARALLELISM=false`` so N processes do not each
  start a Rust thread per core;
- a batch is cut into shards of at most ``shard_rows`` rows, spread over the processes; results come back in
  submission order, so row order is preserved whatever finishes first;
- a process that dies (killed, out of memory) breaks a ``ProcessPoolExecutor`` for good; the pool is
  replaced and the batch retried once, so one crash costs one slow request rather than the service.

Like every spawn-started pool, the children re-import the parent's ``__main__`` module, so it must be
import-safe (guarded by ``if __name__ == "__main__":``); Ray's worker entry point, pytest and
``python -m twinkle.server`` are. The processes are not Ray actors: the deployment should ask Ray for the
CPUs they use.

With one worker there is no process pool: encoding runs in a thread of the service's own process with the
service's tokenizer, which saves a process (a few hundred MB: transformers imports torch) and a pickling hop per
shard. Shards are still submitted one at a time, so a small ``tokenize`` call waits for at most one shard of
a large encode, not all of it. Calls on the in-process tokenizer are serialized by a lock: a Hugging Face
fast tokenizer is a Rust object that raises "Already borrowed" if two threads use it while one changes its
settings.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Literal, Sequence

from .encoding import EncodedRow, EncodeOptions, RowSource, encode_rows
from .protocol import RowError

StartMethod = Literal["spawn", "forkserver"]

# --- inside a worker process ---------------------------------------------------------------------------

_TOKENIZER: Any = None
_LOADS = 0


def _init_worker(model_path: str) -> None:
    global _TOKENIZER, _LOADS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from twinkle.common.models import load_tokenizer

    _TOKENIZER = load_tokenizer(model_path)
    _LOADS += 1


def _encode_shard(sources: list[RowSource], options: EncodeOptions) -> list[EncodedRow | RowError]:
    return encode_rows(_TOKENIZER, sources, options)


def _probe(delay: float) -> tuple[int, int]:
    """(pid, how many times this process loaded the tokenizer): lets tests and health see the workers."""
    time.sleep(delay)
    return os.getpid(), _LOADS


# --- in the service's process --------------------------------------------------------------------------


class EncoderPool:
    """Encodes row shards on ``num_workers`` processes (or in-process when ``num_workers == 1``) and runs
    small tokenizer calls on the service's own tokenizer in a thread."""

    def __init__(
        self,
        model_path: str,
        num_workers: int,
        tokenizer: Any,
        *,
        shard_rows: int = 64,
        start_method: StartMethod = "spawn",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.model_path = model_path
        self.num_workers = num_workers
        self.shard_rows = shard_rows
        self.restarts = 0
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="twinkle-processor")
        self._context = multiprocessing.get_context(start_method)
        self._processes: ProcessPoolExecutor | None = self._new_process_pool() if num_workers > 1 else None

    # -- public ---------------------------------------------------------------------------------------

    async def run_local(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(tokenizer, *args)`` on the in-process tokenizer, in a thread, one call at a time."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._call_locked, fn, args)

    async def encode(self, sources: Sequence[RowSource], options: EncodeOptions) -> list[EncodedRow | RowError]:
        """Encode rows; the result is in the order of ``sources``."""
        shards = self._shards(sources)
        if not shards:
            return []
        if self._processes is None:
            out: list[EncodedRow | RowError] = []
            for shard in shards:
                out.extend(await self.run_local(encode_rows, shard, options))
            return out
        results = await self._on_processes(shards, options)
        return [r for shard in results for r in shard]

    def workers_alive(self) -> int:
        if self._processes is None:
            return 1
        if getattr(self._processes, "_broken", False):
            return 0
        procs = getattr(self._processes, "_processes", None) or {}
        return sum(1 for p in procs.values() if p.is_alive())

    async def worker_loads(self) -> dict[int, int]:
        """pid -> tokenizer loads, for each worker process that answers a probe (every one, in practice:
        the probes sleep briefly so that idle processes pick them up)."""
        if self._processes is None:
            return {os.getpid(): 1}
        loop = asyncio.get_running_loop()
        probes = [loop.run_in_executor(self._processes, _probe, 0.05) for _ in range(4 * self.num_workers)]
        return dict(await asyncio.gather(*probes))

    def heal(self) -> bool:
        """Replace a broken process pool (a worker died while idle); True if one was replaced."""
        if self._processes is not None and getattr(self._processes, "_broken", False):
            self._replace(self._processes)
            return True
        return False

    def close(self) -> None:
        if self._processes is not None:
            self._processes.shutdown(wait=True, cancel_futures=True)
            self._processes = None
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- private --------------------------------------------------------------------------------------

    def _call_locked(self, fn: Callable[..., Any], args: tuple) -> Any:
        with self._lock:
            return fn(self._tokenizer, *args)

    def _shards(self, sources: Sequence[RowSource]) -> list[list[RowSource]]:
        """Even shards for small batches (every worker gets some), ``shard_rows``-sized ones for large
        batches (so a slow shard does not leave the other workers idle at the end)."""
        n = len(sources)
        if n == 0:
            return []
        size = max(1, min(self.shard_rows, math.ceil(n / self.num_workers)))
        return [list(sources[k : k + size]) for k in range(0, n, size)]

    async def _on_processes(self, shards: list[list[RowSource]], options: EncodeOptions) -> list[list]:
        for attempt in (0, 1):
            pool = self._processes
            if pool is None:
                raise RuntimeError("the encoder pool is closed")
            try:
                futures = [asyncio.wrap_future(pool.submit(_encode_shard, shard, options)) for shard in shards]
                return await asyncio.gather(*futures)
            except BrokenProcessPool:
                if attempt:
                    raise
                self._replace(pool)
        raise AssertionError("unreachable")  # pragma: no cover

    def _new_process_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.num_workers,
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(self.model_path,),
        )
        # Start every process now (one is spawned per submit while none is idle), so the first request
        # does not pay for importing transformers N times.
        for _ in range(self.num_workers):
            pool.submit(_probe, 0.0)
        return pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._processes is not broken:  # another request already replaced it
            return
        self._processes = self._new_process_pool()
        self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)
