"""CPU worker processes that encode shards of a batch in parallel.

Tokenizing is cheap per row but a dataset has many rows, and chat-template rendering is pure Python (the
GIL serializes it), so threads do not scale; processes do. Each process is a
``twinkle.common.workers.ProcessWorker`` (every component's one mechanism for a worker in a local process):

- it is started with ``spawn`` (or ``forkserver``), never ``fork``: the service runs inside a Ray actor with
  threads of its own (Ray's, the event loop's, the tokenizer's Rust pool), and forking a threaded process
  can deadlock the child;
- it loads the tokenizer once (a ``ShardEncoder``), from the already-resolved local model directory (no hub
  lookups per worker), with ``TOKENIZERS_PARALLELISM=false`` so N processes do not each start a Rust thread
  per core;
- a batch is cut into shards of at most ``shard_rows`` rows; each process takes the next shard as soon as it
  is free, and results are put back in submission order, so row order is preserved whatever finishes first;
- a process that dies (killed, out of memory) is replaced, before the next batch or by the next health
  check; a batch it was working on is retried once, so one crash costs one slow request rather than the
  service.

Like every spawn-started process, the children re-import the parent's ``__main__`` module, so it must be
import-safe (guarded by ``if __name__ == "__main__":``); Ray's worker entry point, pytest and
``python -m twinkle.server`` are. The processes are not Ray actors: the deployment should ask Ray for the
CPUs they use.

With one worker there is no process: encoding runs in a thread of the service's own process with the
service's tokenizer, which saves a process (a few hundred MB: transformers imports torch) and a pickling hop per
shard. Shards are still submitted one at a time, so a small ``tokenize`` call waits for at most one shard of
a large encode, not all of it. Calls on the in-process tokenizer are serialized by a lock: a Hugging Face
fast tokenizer is a Rust object that raises "Already borrowed" if two threads use it while one changes its
settings.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from twinkle.common.wire import WorkerInfo
from twinkle.common.workers import ProcessWorker, StartMethod, WorkerExited, describe_process

from .encoding import EncodedRow, EncodeOptions, RowSource, encode_rows
from .protocol import RowError

_ENCODER = "twinkle.processor.workers:ShardEncoder"

# --- inside a worker process ---------------------------------------------------------------------------

_LOADS = 0  # tokenizer loads in this process: one per process is the contract


class ShardEncoder:
    """The target of one worker process: the tokenizer, loaded once, and the shard encoder."""

    def __init__(self, model_path: str) -> None:
        global _LOADS
        from twinkle.common.models import load_tokenizer

        self._tokenizer = load_tokenizer(model_path)
        _LOADS += 1

    def encode(self, sources: list[RowSource], options: EncodeOptions) -> list[EncodedRow | RowError]:
        return encode_rows(self._tokenizer, sources, options)

    def probe(self) -> tuple[int, int]:
        """(pid, how many times this process loaded the tokenizer): lets tests and health see the workers."""
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
        self._start_method = start_method
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="twinkle-processor")
        # Started now (each imports transformers), so the first request does not wait for N imports.
        self._processes = [self._start(rank) for rank in range(num_workers)] if num_workers > 1 else []
        self._closed = False

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
        if not self._processes:
            out: list[EncodedRow | RowError] = []
            for shard in shards:
                out.extend(await self.run_local(encode_rows, shard, options))
            return out
        results = await self._on_processes(shards, options)
        return [r for shard in results for r in shard]

    def workers_alive(self) -> int:
        if not self._processes:
            return 1
        return sum(1 for w in self._processes if w.is_alive())

    async def describe(self) -> list[WorkerInfo]:
        """Where the encoding runs: each worker process, or this process with one worker."""
        if not self._processes:
            return [describe_process(0)]
        return list(await asyncio.gather(*(w.describe() for w in self._processes)))

    async def worker_loads(self) -> dict[int, int]:
        """pid -> tokenizer loads, for each worker process."""
        if not self._processes:
            return {os.getpid(): 1}
        return dict(await asyncio.gather(*(w.call("probe") for w in self._processes)))

    def heal(self) -> bool:
        """Replace every worker process that has died; True if one was replaced."""
        if self._closed:
            return False
        replaced = False
        for rank, worker in enumerate(self._processes):
            if not worker.is_alive():
                self._processes[rank] = self._start(rank)
                worker.close(timeout=1)
                self.restarts += 1
                replaced = True
        return replaced

    def close(self) -> None:
        self._closed = True
        processes, self._processes = self._processes, []
        for worker in processes:
            worker.close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- private --------------------------------------------------------------------------------------

    def _start(self, rank: int) -> ProcessWorker:
        return ProcessWorker(_ENCODER, rank, (self.model_path,), env={"TOKENIZERS_PARALLELISM": "false"},
                             start_method=self._start_method)

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
            self.heal()
            workers = list(self._processes)
            if not workers:
                raise RuntimeError("the encoder pool is closed")
            results: list[Any] = [None] * len(shards)
            todo = iter(range(len(shards)))  # shared: a worker takes the next shard when it is free

            async def drain(worker: ProcessWorker) -> None:
                for i in todo:
                    results[i] = await worker.call("encode", shards[i], options)

            outcomes = await asyncio.gather(*(drain(w) for w in workers), return_exceptions=True)
            errors = [e for e in outcomes if isinstance(e, BaseException)]
            if not errors:
                return results
            if attempt or not any(isinstance(e, WorkerExited) for e in errors):
                raise errors[0]
        raise AssertionError("unreachable")  # pragma: no cover
