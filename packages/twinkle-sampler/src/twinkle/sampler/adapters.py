"""The adapter cache both engines share: which LoRA adapters are resident, and which version of each.

An adapter is addressed by the directory of a sampler checkpoint (PEFT format: ``adapter_config.json`` +
``adapter_model.safetensors``). The cache guarantees:

- **Never another adapter.** An entry is keyed by the directory's canonical path (symlinks resolved) *and*
  a fingerprint of its files (inode, size, mtime/ctime in ns, the config's bytes, and a digest of the weights
  file: all of it up to 1 MiB, else its head, tail and 16 evenly spaced blocks). A checkpoint re-saved at the
  same path is a new version: the next ``acquire`` loads it, and the old version is unloaded as soon as no
  batch holds it. This is the weight hand-off after ``save_weights_for_sampler``.
- **Bounded residency.** At most ``max_loras`` versions are resident (loaded or loading). A new one evicts
  the least recently used entry that nobody holds; an evicted adapter is simply reloaded on its next use.
- **Pinned while in use.** ``acquire`` returns a lease; until it is released the entry cannot be evicted
  or unloaded. When every slot is held, ``acquire`` waits for a release (it never over-commits).
- **No silent fallback.** A checkpoint that is missing is a ``NotFoundError``, one that cannot be loaded a
  ``UserError``, both with ``field="adapter_path"``; a failed load is not cached, so a fixed checkpoint
  loads on the next try.

The cache is engine-agnostic and thread-safe: an engine supplies ``load(name, path) -> handle`` and
``unload(handle)``. ``load`` runs in the thread that called ``acquire``, outside the cache's lock, so engines
choose the thread (the torch engine calls ``acquire`` from its single compute thread, which is the only
thread that ever touches the model).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twinkle.common.wire import NotFoundError, UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_FULL_HASH_LIMIT = 1 << 20
_BLOCK = 4096
_EDGE = 64 * 1024
_SAMPLES = 16


def adapter_files(path: str) -> tuple[str, str, str]:
    """Return ``(canonical_dir, config_file, weights_file)`` or raise a ``UserError`` on ``adapter_path``."""
    canon = os.path.realpath(os.path.expanduser(path))
    if not os.path.exists(canon):
        raise NotFoundError(f"adapter checkpoint {path!r} does not exist", field="adapter_path")
    if not os.path.isdir(canon):
        raise UserError(f"adapter checkpoint {path!r} is not a directory", field="adapter_path")
    cfg = os.path.join(canon, CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise UserError(f"adapter checkpoint {path!r} has no {CONFIG_FILE}; it is not a PEFT adapter",
                        field="adapter_path")
    for name in WEIGHT_FILES:
        w = os.path.join(canon, name)
        if os.path.isfile(w):
            return canon, cfg, w
    raise UserError(f"adapter checkpoint {path!r} has no {' or '.join(WEIGHT_FILES)}", field="adapter_path")


def fingerprint(path: str) -> tuple[str, str]:
    """``(canonical_dir, version_digest)`` of an adapter checkpoint directory. Cheap: a few ``stat`` calls and
    at most ~200 KiB read, so it runs on every request."""
    canon, cfg, weights = adapter_files(path)
    h = hashlib.blake2b(digest_size=16)
    try:
        for f in (canon, cfg, weights):
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns};".encode())
        with open(cfg, "rb") as fh:
            h.update(fh.read())
        size = os.path.getsize(weights)
        with open(weights, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(_EDGE))
                step = (size - 2 * _EDGE) // (_SAMPLES + 1)
                for i in range(1, _SAMPLES + 1):
                    fh.seek(_EDGE + i * step)
                    h.update(fh.read(_BLOCK))
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    except FileNotFoundError as e:  # replaced while we looked: report as missing, the caller may retry
        raise NotFoundError(f"adapter checkpoint {path!r} changed while being read: {e}", field="adapter_path") from e
    return canon, h.hexdigest()


@dataclass(eq=False)
class _Entry:
    name: str
    path: str
    version: str
    handle: Any = None
    state: str = "loading"  # loading | ready
    pins: int = 0
    stale: bool = False
    last_used: float = 0.0
    loaded_at: float = 0.0
    load_s: float = 0.0
    error: BaseException | None = None


@dataclass(frozen=True)
class AdapterLease:
    """A pinned, loaded adapter version. Release it (or use it as a context manager) when the batch ends."""

    name: str
    path: str
    version: str
    handle: Any
    _cache: "AdapterCache" = field(repr=False, compare=False)
    _entry: _Entry = field(repr=False, compare=False)

    def release(self) -> None:
        self._cache.release(self)

    def __enter__(self) -> "AdapterLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdapterCache:
    def __init__(
        self,
        max_loras: int,
        load: Callable[[str, str], Any],
        unload: Callable[[Any], None],
        *,
        name_prefix: str = "lora",
    ) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        self.max_loras = max_loras
        self._load = load
        self._unload = unload
        self._prefix = name_prefix
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._current: dict[str, _Entry] = {}  # canonical path -> newest version's entry
        self._stale: list[_Entry] = []  # older versions still pinned by a running batch
        self.stats = {"hits": 0, "loads": 0, "evictions": 0, "reloads_new_version": 0, "load_failures": 0}

    # -- public ----------------------------------------------------------------------------------------

    def acquire(self, path: str, *, timeout: float | None = None) -> AdapterLease:
        """Pin the current version of the adapter at ``path``, loading it (and evicting another) if needed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _attempt in range(3):
            canon, version = fingerprint(path)
            lease = self._acquire_version(path, canon, version, deadline)
            # A checkpoint rewritten *during* the load would leave us holding a mix; check and retry.
            try:
                _, after = fingerprint(path)
            except UserError:
                after = version
            if after == version:
                return lease
            self.release(lease)
        raise UserError(f"adapter checkpoint {path!r} keeps changing while being loaded", field="adapter_path")

    def release(self, lease: AdapterLease) -> None:
        to_unload = []
        with self._cv:
            e = lease._entry
            e.pins -= 1
            assert e.pins >= 0, "adapter lease released twice"
            e.last_used = time.monotonic()
            if e.pins == 0 and e.stale:
                self._stale.remove(e)
                to_unload.append(e)
            self._cv.notify_all()
        self._unload_entries(to_unload)

    def resident(self) -> list[dict]:
        with self._cv:
            entries = list(self._current.values()) + list(self._stale)
            return [
                {"name": e.name, "path": e.path, "version": e.version, "state": e.state, "pins": e.pins,
                 "stale": e.stale, "load_s": round(e.load_s, 4)}
                for e in sorted(entries, key=lambda e: e.last_used, reverse=True)
            ]

    def clear(self) -> None:
        """Unload every entry nobody holds (used on shutdown)."""
        with self._cv:
            victims = [e for e in self._current.values() if e.pins == 0 and e.state == "ready"]
            for e in victims:
                del self._current[e.path]
        self._unload_entries(victims)

    # -- internals -------------------------------------------------------------------------------------

    def _slots_used(self) -> int:
        return len(self._current) + len(self._stale)

    def _acquire_version(self, path: str, canon: str, version: str, deadline: float | None) -> AdapterLease:
        to_unload: list[_Entry] = []
        with self._cv:
            while True:
                e = self._current.get(canon)
                if e is not None and e.version != version:
                    # The checkpoint was re-saved: retire the old version (now, or when its last batch ends).
                    del self._current[canon]
                    self.stats["reloads_new_version"] += 1
                    if e.state == "ready" and e.pins == 0:
                        to_unload.append(e)
                    else:  # held by a batch, or still loading for an earlier caller: retire when released
                        e.stale = True
                        self._stale.append(e)
                    e = None
                if e is not None:
                    if e.state == "ready":
                        e.pins += 1
                        e.last_used = time.monotonic()
                        self.stats["hits"] += 1
                        break
                    self._wait(deadline, canon)  # someone else is loading this very version
                    continue
                if self._slots_used() >= self.max_loras:
                    victim = self._lru_victim()
                    if victim is None:
                        self._wait(deadline, canon)
                        continue
                    del self._current[victim.path]
                    self.stats["evictions"] += 1
                    to_unload.append(victim)
                e = _Entry(name=f"{self._prefix}{next(self._ids)}", path=canon, version=version, pins=1)
                self._current[canon] = e
                break
        self._unload_entries(to_unload)
        if e.state == "ready":
            return AdapterLease(e.name, e.path, e.version, e.handle, self, e)
        return self._load_entry(path, e)

    def _load_entry(self, path: str, e: _Entry) -> AdapterLease:
        t0 = time.perf_counter()
        try:
            handle = self._load(e.name, e.path)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, none falls back
            with self._cv:
                if self._current.get(e.path) is e:
                    del self._current[e.path]
                elif e in self._stale:
                    self._stale.remove(e)
                self.stats["load_failures"] += 1
                self._cv.notify_all()
            if isinstance(exc, UserError):
                if exc.field is None:
                    exc.field = "adapter_path"
                raise
            if not isinstance(exc, Exception):
                raise
            raise UserError(f"adapter checkpoint {path!r} cannot be loaded: {type(exc).__name__}: {exc}",
                            field="adapter_path") from exc
        with self._cv:
            e.handle = handle
            e.state = "ready"
            e.loaded_at = e.last_used = time.monotonic()
            e.load_s = time.perf_counter() - t0
            self.stats["loads"] += 1
            # If it went stale while loading (re-saved meanwhile) it is already in _stale; this caller, who
            # asked before the save, is still served, and the version is unloaded at its release.
            self._cv.notify_all()
        log.info("loaded adapter %s from %s in %.3fs", e.name, e.path, e.load_s)
        return AdapterLease(e.name, e.path, e.version, handle, self, e)

    def _lru_victim(self) -> _Entry | None:
        idle = [e for e in self._current.values() if e.pins == 0 and e.state == "ready"]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def _wait(self, deadline: float | None, canon: str) -> None:
        if deadline is None:
            self._cv.wait()
            return
        left = deadline - time.monotonic()
        if left <= 0 or not self._cv.wait(left):
            raise TimeoutError(f"no adapter slot became free for {canon!r} ({self.max_loras} slots, all in use)")

    def _unload_entries(self, entries: list[_Entry]) -> None:
        for e in entries:
            try:
                self._unload(e.handle)
            except Exception:  # noqa: BLE001 - an unload failure must not fail the request that evicted it
                log.exception("unloading adapter %s (%s) failed", e.name, e.path)
