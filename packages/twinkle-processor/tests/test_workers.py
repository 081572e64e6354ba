"""Worker processes: same output as in-process, order kept, one tokenizer load per process, crash recovery."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import msgspec

from twinkle.processor.protocol import EncodeRequest
from twinkle.processor.service import ProcessorService


def _mixed_rows(n: int) -> list[dict]:
    rng = random.Random(3)
    rows = []
    for k in range(n):
        kind = rng.random()
        if kind < 0.45:
            rows.append({"prompt": f"q{k} " * rng.randint(1, 5), "completion": f" a{k}" * rng.randint(1, 5)})
        elif kind < 0.95:
            turns = []
            for t in range(rng.randint(1, 3)):
                turns += [{"role": "user", "content": f"u{k}.{t}"}, {"role": "assistant", "content": f"r{k}.{t}"}]
            rows.append({"messages": turns})
        else:
            rows.append({"messages": [{"role": "user", "content": ""}]})  # bad: empty content
    return rows


async def test_two_workers_match_one(service, service2):
    rows = _mixed_rows(130)
    for kwargs in ({"on_error": "skip"}, {"on_error": "skip", "train_on": "last_assistant", "max_length": 24}):
        offset = 0
        while offset is not None:
            request = EncodeRequest(rows=rows, offset=offset, **kwargs)
            one, two = await service.encode(request), await service2.encode(request)
            assert msgspec.json.encode(one) == msgspec.json.encode(two)
            assert len(two.data) > 14 and two.errors  # many shards of 7 rows, and some bad rows
            offset = two.next_offset


async def test_concurrent_requests_keep_their_order(service2):
    """Shards of four requests interleave on the same processes; each response is still its own, in order."""
    requests = [EncodeRequest(rows=_mixed_rows(30 + 9 * k), on_error="skip", max_length=20 + k) for k in range(4)]
    together = await asyncio.gather(*(service2.encode(r) for r in requests))
    for request, out in zip(requests, together):
        assert out.indices == sorted(out.indices)
        assert msgspec.json.encode(out) == msgspec.json.encode(await service2.encode(request))


async def test_tokenizer_loaded_once_per_worker(service2):
    await service2.encode(EncodeRequest(rows=_mixed_rows(60), on_error="skip"))
    loads = await service2._pool.worker_loads()
    assert 1 <= len(loads) <= 2 and os.getpid() not in loads
    assert set(loads.values()) == {1}
    health = await service2.health()
    assert (health.status, health.workers, health.workers_alive) == ("ok", 2, 2)
    info = await service2.info()
    assert info.dp_size == 2 and sorted(w.pid for w in info.workers) == sorted(loads)


async def _kill_a_worker(svc: ProcessorService) -> int:
    victim = next(iter(await svc._pool.worker_loads()))
    os.kill(victim, signal.SIGKILL)
    for _ in range(200):  # until the process is reaped
        if svc._pool.workers_alive() < svc.num_workers:
            return victim
        await asyncio.sleep(0.05)
    raise AssertionError("the pool never noticed its dead worker")


async def test_a_batch_that_meets_a_dead_worker_is_retried_once(service2, monkeypatch):
    pool = service2._pool
    request = EncodeRequest(rows=_mixed_rows(30), on_error="skip")
    before, restarts = await service2.encode(request), pool.restarts
    await _kill_a_worker(service2)
    heal, looked = pool.heal, []

    def heal_from_the_second_look() -> bool:  # the first attempt sends shards to the dead worker
        looked.append(True)
        return heal() if len(looked) > 1 else False

    monkeypatch.setattr(pool, "heal", heal_from_the_second_look)
    assert await service2.encode(request) == before
    assert len(looked) == 2 and pool.restarts == restarts + 1 and pool.workers_alive() == 2


async def test_a_dead_worker_is_replaced(service2):
    """Last in this module: it replaces ``service2``'s pool (twice), which later tests would not notice."""
    pool = service2._pool
    request = EncodeRequest(rows=_mixed_rows(30), on_error="skip")
    before, restarts = await service2.encode(request), pool.restarts
    victim = await _kill_a_worker(service2)
    after = await service2.encode(request)  # the dead worker is replaced before the batch
    assert after == before and pool.restarts == restarts + 1
    assert victim not in await pool.worker_loads()
    # A worker that dies while the service is idle is replaced by the next health check.
    await _kill_a_worker(service2)
    assert (await service2.health()).status == "ok" and pool.restarts == restarts + 2
    assert await service2.encode(request) == before
