"""``ProcessWorker``: a target in a spawned local process, called like every other worker."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from twinkle.common.wire import UserError, WorkerInfo
from twinkle.common.workers import InProcessWorker, ProcessWorker, WorkerExited, WorkerSpec, start_process_workers

_TARGET = "worker_targets:Echo"


@pytest.fixture
def targets_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # a spawned child starts with the parent's sys.path


@pytest.fixture
def worker(targets_importable):
    w = ProcessWorker(_TARGET, 3, ("> ",), env={"TWINKLE_TEST_MARK": "yes"})
    yield w
    w.close()


async def test_calls_run_in_the_child_in_order_and_errors_come_back_as_themselves(worker):
    worker.wait_ready(120)
    assert await worker.call("pid") != os.getpid()
    assert await worker.call("env", "TWINKLE_TEST_MARK") == "yes"
    assert await worker.call("echo", "a", suffix="!") == "> a!"
    assert await worker.call("later", 21) == 42  # an async method of the target
    assert await asyncio.gather(*(worker.call("record", n) for n in range(5))) == [list(range(k + 1)) for k in range(5)]
    with pytest.raises(UserError) as e:
        await worker.call("refuse")
    assert (type(e.value), e.value.field, e.value.status, e.value.message) == (UserError, "when", 409, "not today")
    assert worker.submit("echo", "b").result(30) == "> b"  # from a plain thread
    info = await worker.describe()
    assert isinstance(info, WorkerInfo) and info.rank == 3 and info.pid == worker.pid != os.getpid()


async def test_a_process_that_exits_fails_its_calls_and_every_later_one(worker):
    with pytest.raises(WorkerExited):
        await worker.call("exit")
    assert not worker.is_alive()
    with pytest.raises(WorkerExited):
        await worker.call("echo", "x")


def test_a_target_that_cannot_start_raises_its_error(targets_importable):
    (w,) = start_process_workers(_TARGET, [WorkerSpec("t", 0, 1)], lambda s: (("p",), {}))
    try:
        w.wait_ready(120)
        assert w.submit("echo", "ok").result(30) == "pok"
    finally:
        w.close()
    with pytest.raises(UserError) as e:
        start_process_workers(_TARGET, [WorkerSpec("t", 0, 1)], lambda s: (("p",), {"fail": True}), ready_timeout=120)
    assert (e.value.field, e.value.status) == ("prefix", 422)


async def test_an_in_process_worker_has_the_same_interface():
    w = InProcessWorker("collections:OrderedDict", 0, (), {})
    await w.call("__setitem__", "k", 1)
    assert w.submit("get", "k").result() == 1
    assert (await w.describe()).pid == os.getpid()
