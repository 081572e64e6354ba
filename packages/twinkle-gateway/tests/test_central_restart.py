"""A central app that dies with training requests in flight: its next process follows them to their outcome.

The Model service keeps running (another process in a deployment); the second ``ControlPlane`` opens the
same store while the first one's requests are still queued behind a blocked model thread, exactly what a
restarted central replica finds. Requests the service received are answered with their one result (never
"submit it again", never applied twice); one it never received fails as not applied, and is used up.
"""

from __future__ import annotations

import asyncio
import threading
import time

from twinkle.common.models import TINY_MODEL_ID, served_model_name
from twinkle.common.wire import AdamParams, Datum, ForwardBackwardInput, LoraConfig, TensorData
from twinkle.server.core.control import ControlPlane
from twinkle.server.core.ports import LocalPort
from twinkle.server.core.state import FutureRecord, RunRecord
from twinkle.server.tinker import TinkerSettings

MODEL = served_model_name(TINY_MODEL_ID)
OWNER = "p-restart"
ADAM = AdamParams(learning_rate=1e-2)


def _input() -> ForwardBackwardInput:
    toks = list(range(100, 117))
    return ForwardBackwardInput(data=[Datum(model_input=toks[:-1], loss_fn_inputs={
        "target_tokens": TensorData(toks[1:], "int64"), "weights": TensorData([1.0] * 16)})], loss_fn="cross_entropy")


async def _done(plane: ControlPlane, request_id: str) -> FutureRecord:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = await plane.wait(OWNER, request_id, timeout=5)
        if record.terminal:
            return record
    raise TimeoutError(request_id)


async def test_a_restarted_central_app_follows_requests_to_their_outcome(tmp_path):
    from twinkle.model.service import ModelService

    model = ModelService(TINY_MODEL_ID, adapter_timeout_s=None)
    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"))
    first = ControlPlane(settings, models={MODEL: LocalPort(model)}, samplers={})
    await first.start()
    second = None
    gate = threading.Event()
    try:
        run = RunRecord(id="run-restart", owner=OWNER, session_id=None, base_model=MODEL, lora={"rank": 2},
                        created=time.time(), last_request=time.time())
        await first.record_run(run)
        await model.create_run(run.id, OWNER, LoraConfig(rank=2, seed=1))
        blocker = asyncio.ensure_future(model.scheduler.run_exclusive(gate.wait))  # the model thread is busy

        async def fb(port):
            inp = _input()
            return (lambda: port.forward_backward(run.id, OWNER, 1, inp)), None

        async def step(port):
            return (lambda: port.optim_step(run.id, OWNER, 2, ADAM)), None

        fb_record = await first.submit_numbered(OWNER, run, 1, "forward_backward", fb)
        step_record = await first.submit_numbered(OWNER, run, 2, "optim_step", step)
        # A request the first process recorded but died before handing to the Model service:
        lost = FutureRecord(request_id="req-never-sent", owner=OWNER, kind="optim_step", created=time.time(),
                            model_id=run.id, seq_id=3)
        await first.store.insert_future(lost)
        await asyncio.sleep(0.2)  # both handed over and waiting behind the blocked thread

        # The first process "dies" (it is never closed: its rows stay pending), the second takes over.
        second = ControlPlane(settings, models={MODEL: LocalPort(model)}, samplers={})
        await second.start()
        gate.set()
        await blocker

        fb_done = await _done(second, fb_record.request_id)
        step_done = await _done(second, step_record.request_id)
        never = await _done(second, "req-never-sent")
        assert fb_done.status == "done" and fb_done.value.metrics["loss:sum"] > 0
        assert step_done.status == "done", step_done.error
        assert never.status == "failed" and never.category == "user" and "not applied" in never.error
        assert (await model.run_info(run.id, OWNER)).step == 1  # the step ran once

        # The run goes on; the used-up seq_id 3 does not hold it back.
        async def next_fb(port):
            inp = _input()
            return (lambda: port.forward_backward(run.id, OWNER, 4, inp)), None

        after = await _done(second, (await second.submit_numbered(OWNER, run, 4, "forward_backward", next_fb)).request_id)
        assert after.status == "done", after.error
    finally:
        gate.set()
        if second is not None:
            await second.close()
        await first.close()
        await model.close()
