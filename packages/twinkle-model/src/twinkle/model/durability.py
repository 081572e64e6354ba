"""Durable run state: each run's adapter and optimizer state on disk, so that a restarted replica goes on.

Layout, under the model application's state root (``<checkpoint_dir>/.runs/<app>/``, shared storage on a
multi-node cluster, so a replica restarted on another node finds it too)::

    <run_id>/                  a state checkpoint (``checkpoints.write_snapshot``: PEFT files, optimizer,
                               twinkle_state.json) that stock peft also loads
    <run_id>/twinkle_run.json  who owns the run and where its request numbering stands (``SavedRun``)
    .leases/<run_id>           which replica serves the run (``RunLeases``; one line naming it)

What is saved: the state after each acknowledged ``optim_step`` and ``load_state``, and at creation. What is
not: gradients accumulated since the last step (the service tells the client when a restart lost them).

Writes are atomic (the directory is swapped whole, see ``checkpoints``), run off the model thread on one
writer thread, and **coalesced**: while a run's state is being written, newer snapshots of it replace each
other and only the newest is written next; every waiter whose snapshot is covered is then answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
from dataclasses import dataclass, field

import msgspec
from twinkle.common.wire import LoraConfig, OptimStepOutput, RunMoved

from . import checkpoints as ckpt

log = logging.getLogger(__name__)

RUN_FILE = "twinkle_run.json"
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


class SavedRun(msgspec.Struct, kw_only=True):
    """``twinkle_run.json``: the run's owner and LoRA config, and its request numbering at the saved state:
    ``next_seq`` is the first ``seq_id`` not applied; ``applied_seq`` the step request that produced the
    state, whose answer is ``result`` (a replay of it gets that answer, never a second step)."""

    format: int = 1
    run_id: str
    owner: str
    lora: LoraConfig
    step: int
    next_seq: int
    applied_seq: int | None = None
    result: OptimStepOutput | None = None


class RunLeases:
    """Which replica of a model application serves each run: the one that created or restored it last holds
    its lease, a file under ``<root>/.leases/`` that names it. A replica checks the lease before each request
    touches a run it holds and before each write of the run's state; when another replica has taken the run
    it steps aside (``RunMoved``), so two replicas never both train a run or overwrite each other's state.
    ``holder`` must be unique per replica process (Serve's replica id is)."""

    def __init__(self, root: str, holder: str) -> None:
        self.dir = os.path.join(os.path.abspath(root), ".leases")
        self.holder = holder

    def _path(self, run_id: str) -> str:
        if not isinstance(run_id, str) or not _SAFE_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} cannot name a lease")
        return os.path.join(self.dir, run_id)

    def claim(self, run_id: str) -> None:
        """Take the run (whoever held it). Atomic: a reader sees the old holder or the new one."""
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{self._path(run_id)}.{self.holder}.tmp"
        with open(tmp, "w") as f:
            f.write(self.holder)
        os.replace(tmp, self._path(run_id))

    def holder_of(self, run_id: str) -> str | None:
        try:
            with open(self._path(run_id)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def holds(self, run_id: str) -> bool:
        return self.holder_of(run_id) == self.holder

    def release(self, run_id: str) -> None:
        if self.holds(run_id):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(run_id))


@dataclass
class _Pending:
    snapshot: ckpt.RunSnapshot
    saved: SavedRun
    waiters: list[asyncio.Future] = field(default_factory=list)


class RunStateStore:
    """Saves and finds runs' state under ``root`` (see the module docstring). Use from one event loop."""

    def __init__(self, root: str, leases: RunLeases | None = None) -> None:
        self.root = os.path.abspath(root)
        self.leases = leases
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinkle-durable")
        self._pending: dict[str, _Pending] = {}
        self._writers: dict[str, asyncio.Task] = {}

    def path(self, run_id: str) -> str | None:
        """The run's directory, or None for an id that cannot name one (it then has no saved state)."""
        if not isinstance(run_id, str) or not _SAFE_ID.fullmatch(run_id):
            return None
        return os.path.join(self.root, run_id)

    # --- reading (any thread) -------------------------------------------------------------------------

    def read(self, run_id: str) -> tuple[SavedRun, str] | None:
        """The saved run and its checkpoint directory, or None when nothing (readable) is saved."""
        path = self.path(run_id)
        if path is None:
            return None
        try:
            with open(os.path.join(path, RUN_FILE), "rb") as f:
                saved = msgspec.json.decode(f.read(), type=SavedRun)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.error("the saved state of run %s is unreadable (%s); it is not restored", run_id, type(e).__name__)
            return None
        return (saved, path) if saved.run_id == run_id else None

    def list(self, owner: str) -> list[SavedRun]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        found = (self.read(n) for n in names if not n.startswith("."))
        return [saved for saved, _ in filter(None, found) if saved.owner == owner]

    # --- writing (the event loop) ---------------------------------------------------------------------

    async def save(self, run_id: str, snapshot: ckpt.RunSnapshot, saved: SavedRun) -> None:
        """Return once this state, or a newer one of the run, is on disk. Raises what the write raised."""
        if self.path(run_id) is None:
            raise ValueError(f"run id {run_id!r} cannot name a directory")
        waiter = asyncio.get_running_loop().create_future()
        pending = self._pending.get(run_id)
        if pending is None:
            self._pending[run_id] = _Pending(snapshot, saved, [waiter])
        else:  # a newer state replaces one not yet written
            pending.snapshot, pending.saved = snapshot, saved
            pending.waiters.append(waiter)
        if run_id not in self._writers:
            self._writers[run_id] = asyncio.create_task(self._drain(run_id), name=f"twinkle-save {run_id}")
        await asyncio.shield(waiter)

    async def _drain(self, run_id: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (pending := self._pending.pop(run_id, None)) is not None:
                try:
                    await loop.run_in_executor(self._executor, self._write, run_id, pending.snapshot, pending.saved)
                except Exception as e:  # noqa: BLE001 - handed to every waiter
                    for w in pending.waiters:
                        if not w.done():
                            w.set_exception(e)
                            w.exception()
                else:
                    for w in pending.waiters:
                        if not w.done():
                            w.set_result(None)
        finally:
            self._writers.pop(run_id, None)

    def _write(self, run_id: str, snapshot: ckpt.RunSnapshot, saved: SavedRun) -> None:
        if self.leases is not None and not self.leases.holds(run_id):
            raise RunMoved(f"run {run_id} is now served by another replica; this replica's state of it is not saved")
        os.makedirs(self.root, exist_ok=True)
        ckpt.write_snapshot(self.path(run_id), snapshot, extra_files={RUN_FILE: msgspec.json.encode(saved)})

    async def remove(self, run_id: str) -> None:
        """Forget a run's saved state (after its pending write, which it drops)."""
        pending = self._pending.pop(run_id, None)
        if pending is not None:
            for w in pending.waiters:
                if not w.done():
                    w.set_result(None)
        writer = self._writers.get(run_id)
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(writer)
        path = self.path(run_id)
        if path is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, ckpt.remove_directory, path)
            if self.leases is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.leases.release, run_id)

    async def close(self) -> None:
        """Finish pending writes, then stop the writer thread."""
        writers = list(self._writers.values())
        if writers:
            await asyncio.gather(*writers, return_exceptions=True)
        await asyncio.to_thread(self._executor.shutdown, True)

