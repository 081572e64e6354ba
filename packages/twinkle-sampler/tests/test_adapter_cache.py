"""AdapterCache policy: versions, LRU bound, pinning, failures (no model: the loader reads the file bytes)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from twinkle.common.wire import NotFoundError, UserError
from twinkle.sampler.adapters import AdapterCache, fingerprint


def write_ckpt(path: str, payload: bytes) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA"}')
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
        f.write(payload)
    return path


class Loader:
    """Loads = reads the weights file, so a lease's handle tells which version it holds."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.loaded: dict[str, bytes] = {}
        self.loads = 0
        self.fail_on = fail_on
        self.max_resident = 0

    def load(self, name: str, path: str) -> tuple[str, bytes]:
        with open(os.path.join(path, "adapter_model.safetensors"), "rb") as f:
            data = f.read()
        if data == self.fail_on:
            raise RuntimeError("corrupt weights")
        self.loads += 1
        self.loaded[name] = data
        self.max_resident = max(self.max_resident, len(self.loaded))
        return (name, data)

    def unload(self, handle: tuple[str, bytes]) -> None:
        del self.loaded[handle[0]]


def test_lru_bound_eviction_and_reload(tmp_path):
    ld = Loader()
    cache = AdapterCache(2, ld.load, ld.unload)
    paths = [write_ckpt(str(tmp_path / f"a{i}"), f"w{i}".encode()) for i in range(3)]
    for p in paths[:2]:
        cache.acquire(p).release()
    cache.acquire(paths[0]).release()  # a0 is now most recent; a1 is the LRU
    lease = cache.acquire(paths[2])  # evicts a1
    assert lease.handle[1] == b"w2"
    lease.release()
    resident = {os.path.basename(e["path"]) for e in cache.resident()}
    assert resident == {"a0", "a2"}
    assert ld.max_resident == 2 and len(ld.loaded) == 2
    again = cache.acquire(paths[1])  # reloaded on demand, not an error
    assert again.handle[1] == b"w1"
    again.release()
    assert cache.stats["evictions"] == 2 and ld.loads == 4


def test_pinned_adapter_is_never_evicted_and_acquire_waits(tmp_path):
    ld = Loader()
    cache = AdapterCache(1, ld.load, ld.unload)
    a = write_ckpt(str(tmp_path / "a"), b"A")
    b = write_ckpt(str(tmp_path / "b"), b"B")
    held = cache.acquire(a)
    with pytest.raises(TimeoutError):
        cache.acquire(b, timeout=0.2)
    assert held.name in ld.loaded  # still resident: the pin held

    got = []
    t = threading.Thread(target=lambda: got.append(cache.acquire(b)))
    t.start()
    time.sleep(0.1)
    assert not got  # waiting for the slot, not over-committing
    held.release()
    t.join(5)
    assert got and got[0].handle[1] == b"B"
    assert held.name not in ld.loaded and ld.max_resident == 1
    got[0].release()


def test_resaved_checkpoint_is_a_new_version_and_the_old_one_is_unloaded_after_use(tmp_path):
    ld = Loader()
    cache = AdapterCache(4, ld.load, ld.unload)
    p = write_ckpt(str(tmp_path / "run"), b"step1")
    old = cache.acquire(p)
    assert old.handle[1] == b"step1"
    write_ckpt(p, b"step2")  # same path, same size: rewritten in place
    new = cache.acquire(p)
    assert new.handle[1] == b"step2" and new.name != old.name
    assert old.name in ld.loaded  # a running batch still holds it
    old.release()
    assert old.name not in ld.loaded  # retired as soon as it was released
    new.release()
    assert [e["version"] for e in cache.resident()] == [new.version]


def test_replaced_directory_and_symlink_switch_are_new_versions(tmp_path):
    ld = Loader()
    cache = AdapterCache(4, ld.load, ld.unload)
    p = str(tmp_path / "ckpt")
    write_ckpt(p, b"v1")
    cache.acquire(p).release()
    # atomic replace: new directory renamed over the old path
    tmp = write_ckpt(str(tmp_path / ".tmp"), b"v2")
    os.rename(p, str(tmp_path / "old"))
    os.rename(tmp, p)
    with cache.acquire(p) as lease:
        assert lease.handle[1] == b"v2"
    # a "latest" symlink switched to another directory
    link = str(tmp_path / "latest")
    os.symlink(p, link)
    with cache.acquire(link) as lease:
        assert lease.handle[1] == b"v2"
    v3 = write_ckpt(str(tmp_path / "v3"), b"v3")
    os.remove(link)
    os.symlink(v3, link)
    with cache.acquire(link) as lease:
        assert lease.handle[1] == b"v3"


def test_fingerprint_sees_content_changes_in_large_files(tmp_path):
    big = b"\0" * (3 << 20)
    p = write_ckpt(str(tmp_path / "big"), big)
    _, v1 = fingerprint(p)
    st = os.stat(os.path.join(p, "adapter_model.safetensors"))
    # same size, same inode, and restore the timestamps: only the bytes differ (in the last block)
    write_ckpt(p, big[:-10] + b"1234567890")
    os.utime(os.path.join(p, "adapter_model.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(p)[1] != v1


def test_missing_and_incomplete_checkpoints_are_user_errors(tmp_path):
    ld = Loader()
    cache = AdapterCache(2, ld.load, ld.unload)
    with pytest.raises(NotFoundError) as e:
        cache.acquire(str(tmp_path / "nope"))
    assert e.value.field == "adapter_path" and e.value.status == 404
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="adapter_config.json") as e:
        cache.acquire(str(tmp_path / "empty"))
    assert e.value.field == "adapter_path"
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="adapter_model") as e:
        cache.acquire(str(tmp_path / "noweights"))
    assert e.value.field == "adapter_path"


def test_a_failed_load_is_reported_not_cached_and_frees_its_slot(tmp_path):
    ld = Loader(fail_on=b"bad")
    cache = AdapterCache(1, ld.load, ld.unload)
    p = write_ckpt(str(tmp_path / "x"), b"bad")
    with pytest.raises(UserError, match="cannot be loaded.*corrupt weights") as e:
        cache.acquire(p)
    assert e.value.field == "adapter_path"
    assert cache.resident() == [] and cache.stats["load_failures"] == 1
    write_ckpt(p, b"good")  # fixed: the next request loads it
    with cache.acquire(p) as lease:
        assert lease.handle[1] == b"good"


def test_concurrent_acquires_of_one_adapter_load_it_once(tmp_path):
    ld = Loader()
    slow = threading.Event()

    def slow_load(name, path):
        slow.wait(0.2)
        return ld.load(name, path)

    cache = AdapterCache(2, slow_load, ld.unload)
    p = write_ckpt(str(tmp_path / "a"), b"A")
    leases = []
    threads = [threading.Thread(target=lambda: leases.append(cache.acquire(p))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(leases) == 8 and ld.loads == 1 and len({lease.name for lease in leases}) == 1
    assert cache.resident()[0]["pins"] == 8
    for lease in leases:
        lease.release()
    assert cache.resident()[0]["pins"] == 0
