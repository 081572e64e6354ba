"""Durable runs: a model service that loses its memory (a replica restart) goes on from each run's last step.

A "restart" here is what a dead replica leaves: the adapters are gone from the model, the service object is
gone, only ``state_dir`` remains; a new ``ModelService`` over the same directory must restore every run on
first use, exactly (same losses as a run that never stopped), for its owner only, never applying a step twice.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from model_testutil import make_batch
from twinkle.common.wire import AdamParams, LoraConfig, NotFoundError, ResyncNeeded, UserError
from twinkle.model.durability import RUN_FILE
from twinkle.model.service import ModelService

ADAM = AdamParams(learning_rate=1e-2, eps=1e-8)
LORA = LoraConfig(rank=2, seed=11)


def _service(backend, model_id, state_dir) -> ModelService:
    return ModelService(model_id, backend=backend, adapter_timeout_s=None, state_dir=str(state_dir))


async def _lose_replica(svc: ModelService, backend, *run_ids: str) -> None:
    """What a SIGKILL leaves behind: no service, no adapters; the disk as it was."""
    await svc.scheduler.close()
    for run_id in run_ids:
        if backend.has_run(run_id):
            backend.delete_adapter(run_id)


def _loss(out) -> float:
    return out.metrics["loss:sum"]


async def _reference_losses(backend, model_id, tmp_path, run_id: str, steps: int) -> list[float]:
    svc = ModelService(model_id, backend=backend, adapter_timeout_s=None)
    await svc.create_run(run_id, "ref", LORA)
    losses = []
    seq = 1
    for step in range(steps):
        losses.append(_loss(await svc.forward_backward(run_id, "ref", seq, make_batch([5, 3], step))))
        await svc.optim_step(run_id, "ref", seq + 1, ADAM)
        seq += 2
    await svc.delete_run(run_id, "ref")
    await svc.close()
    return losses


async def test_a_restarted_service_goes_on_from_the_last_step_exactly(backend, tiny_model_id, tmp_path):
    ref = await _reference_losses(backend, tiny_model_id, tmp_path, "dur-ref", 4)

    first = _service(backend, tiny_model_id, tmp_path)
    await first.create_run("dur-1", "alice", LORA)
    seq = 1
    for step in range(2):
        assert _loss(await first.forward_backward("dur-1", "alice", seq, make_batch([5, 3], step))) == ref[step]
        answer = await first.optim_step("dur-1", "alice", seq + 1, ADAM)
        seq += 2
    assert os.path.isfile(tmp_path / "dur-1" / RUN_FILE)
    await _lose_replica(first, backend, "dur-1")

    second = _service(backend, tiny_model_id, tmp_path)
    try:
        with pytest.raises(NotFoundError):  # another key cannot find it, restored or not
            await second.run_info("dur-1", "bob")
        info = await second.run_info("dur-1", "alice")
        assert info.step == 2 and info.lora == LORA
        # the last step's request repeated: its recorded answer, not a second step
        assert await second.optim_step("dur-1", "alice", seq - 1, ADAM) == answer
        with pytest.raises(UserError, match="behind the run"):  # older: refused, never run again
            await second.optim_step("dur-1", "alice", 2, ADAM)
        for step in range(2, 4):
            out = await second.forward_backward("dur-1", "alice", seq, make_batch([5, 3], step))
            assert _loss(out) == pytest.approx(ref[step], abs=1e-5)
            await second.optim_step("dur-1", "alice", seq + 1, ADAM)
            seq += 2
        assert (await second.run_info("dur-1", "alice")).step == 4
        await second.delete_run("dur-1", "alice")
        assert not os.path.exists(tmp_path / "dur-1")
    finally:
        await second.close()

    third = _service(backend, tiny_model_id, tmp_path)
    try:
        with pytest.raises(NotFoundError):  # deleted means deleted, after any restart
            await third.run_info("dur-1", "alice")
    finally:
        await third.close()


async def test_gradients_a_restart_lost_are_never_stepped_on(backend, tiny_model_id, tmp_path):
    ref = await _reference_losses(backend, tiny_model_id, tmp_path, "dur-ref2", 2)

    first = _service(backend, tiny_model_id, tmp_path)
    await first.create_run("dur-2", "alice", LORA)
    await first.forward_backward("dur-2", "alice", 1, make_batch([5, 3], 0))
    await first.optim_step("dur-2", "alice", 2, ADAM)
    await first.forward_backward("dur-2", "alice", 3, make_batch([5, 3], 1))  # accumulated, then lost
    await _lose_replica(first, backend, "dur-2")

    second = _service(backend, tiny_model_id, tmp_path)
    try:
        # seq 4 is ahead of the saved state (seq 3 ran on the lost replica): the front end must settle first
        with pytest.raises(ResyncNeeded):
            await second.optim_step("dur-2", "alice", 4, ADAM)
        assert await second.settle("dur-2", "alice", [(1, "forward_backward"), (3, "forward_backward")]) == [3]
        with pytest.raises(UserError, match="gradients of forward_backward seq_id 3 were lost") as ei:
            await second.optim_step("dur-2", "alice", 4, ADAM)
        assert ei.value.status == 409
        assert (await second.run_info("dur-2", "alice")).step == 1  # nothing was stepped
        out = await second.forward_backward("dur-2", "alice", 5, make_batch([5, 3], 1))
        assert _loss(out) == pytest.approx(ref[1], abs=1e-5)
        await second.optim_step("dur-2", "alice", 6, ADAM)
        assert (await second.run_info("dur-2", "alice")).step == 2
        await second.delete_run("dur-2", "alice")
    finally:
        await second.close()


async def test_a_restored_run_in_order_needs_no_settling_and_ids_stay_unique(backend, tiny_model_id, tmp_path):
    first = _service(backend, tiny_model_id, tmp_path)
    await first.create_run("dur-3", "alice", LORA)
    await first.forward_backward("dur-3", "alice", 1, make_batch([4], 0))
    await first.optim_step("dur-3", "alice", 2, ADAM)
    await _lose_replica(first, backend, "dur-3")

    second = _service(backend, tiny_model_id, tmp_path)
    try:
        with pytest.raises(UserError) as ei:  # the id is still taken by the saved run
            await second.create_run("dur-3", "mallory", LORA)
        assert ei.value.status == 409
        assert [r.run_id for r in await second.list_runs("alice")] == ["dur-3"]
        assert await second.list_runs("mallory") == []
        await second.forward_backward("dur-3", "alice", 3, make_batch([4], 1))
        await second.optim_step("dur-3", "alice", 4, ADAM)
        assert (await second.run_info("dur-3", "alice")).step == 2
        await second.delete_run("dur-3", "alice")
    finally:
        await second.close()


async def test_a_failed_state_write_keeps_the_step_and_the_next_write_catches_up(backend, tiny_model_id, tmp_path,
                                                                                 caplog, monkeypatch):
    """A full disk under a state write: the step stands (it was applied and answered), the failure is
    logged, and the next step's write saves the run again; what was saved before is never damaged."""
    import errno

    from twinkle.model import checkpoints

    svc = _service(backend, tiny_model_id, tmp_path)
    try:
        await svc.create_run("dur-4", "alice", LORA)
        await svc.forward_backward("dur-4", "alice", 1, make_batch([4], 0))
        await svc.optim_step("dur-4", "alice", 2, ADAM)
        before = (tmp_path / "dur-4" / RUN_FILE).read_bytes()
        real_fsync = checkpoints._fsync

        def disk_full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(checkpoints, "_fsync", disk_full)  # every write now fails as on a full disk
        try:
            await svc.forward_backward("dur-4", "alice", 3, make_batch([4], 1))
            out = await svc.optim_step("dur-4", "alice", 4, ADAM)
        finally:
            monkeypatch.setattr(checkpoints, "_fsync", real_fsync)
        assert out.metrics is not None
        assert "could not save the state of run dur-4" in caplog.text
        assert (tmp_path / "dur-4" / RUN_FILE).read_bytes() == before  # the earlier state is intact
        assert [p.name for p in tmp_path.iterdir()] == ["dur-4"]  # no half-written leftovers
        await svc.forward_backward("dur-4", "alice", 5, make_batch([4], 2))
        await svc.optim_step("dur-4", "alice", 6, ADAM)
        assert b'"next_seq":7' in (tmp_path / "dur-4" / RUN_FILE).read_bytes()
        await svc.delete_run("dur-4", "alice")
    finally:
        await svc.close()


def test_native_routes_resume_a_restored_run_one_request_at_a_time(backend, tiny_model_id, tmp_path):
    """The native client sends a run's requests one at a time: on a restored run, the model app answers the
    service's question (which earlier requests ran on the lost replica) with "all of them"."""
    import asyncio

    import msgspec
    from litestar.testing import TestClient
    from twinkle.model.app import create_model_app

    class Keys:
        reported: list = []

        async def authenticate(self, api_key):
            if api_key != "tml-native":
                raise UserError("invalid API key", status=401)
            return "alice"

        async def report(self, outcomes):
            self.reported.extend(outcomes)

    async def before_the_crash():
        first = _service(backend, tiny_model_id, tmp_path)
        await first.create_run("dur-5", "alice", LORA)
        await first.forward_backward("dur-5", "alice", 1, make_batch([4], 0))
        await first.optim_step("dur-5", "alice", 2, ADAM)
        await first.forward_backward("dur-5", "alice", 3, make_batch([4], 1))  # lost with the replica
        await _lose_replica(first, backend, "dur-5")

    asyncio.run(before_the_crash())
    second = _service(backend, tiny_model_id, tmp_path)
    batch = msgspec.to_builtins(make_batch([4], 1).data)
    with TestClient(create_model_app(second, Keys())) as client:
        key = {"X-API-Key": "tml-native"}
        r = client.post("/runs/dur-5/optim_step", json={"learning_rate": 1e-2, "eps": 1e-8, "seq_id": 4}, headers=key)
        assert r.status_code == 409 and "seq_id 3 were lost" in r.json()["detail"]
        r = client.post("/runs/dur-5/forward_backward", json={"data": batch, "seq_id": 5}, headers=key)
        assert r.status_code == 200, r.text
        r = client.post("/runs/dur-5/optim_step", json={"learning_rate": 1e-2, "eps": 1e-8, "seq_id": 6}, headers=key)
        assert r.status_code == 200, r.text
        assert client.get("/runs/dur-5", headers=key).json()["step"] == 2
    # what the app served is reported to the central server (the refused optim_step is not)
    assert [(o.kind, o.seq_id, o.step) for o in Keys.reported] == [("forward_backward", 5, None), ("optim_step", 6, 2)]
    with contextlib.suppress(Exception):
        asyncio.run(second.close())


# --- several replicas over one state directory: a run is served by the replica holding its lease ----------


@pytest.fixture(scope="module")
def other_backend(tiny_model_id):
    """A second replica's model (its own adapters), beside the module's ``backend``."""
    from twinkle.model.transformers_backend import TransformersBackend

    other = TransformersBackend(tiny_model_id, device="cpu")
    yield other
    other.close()


def _replica(backend, model_id, state_dir, holder: str) -> ModelService:
    return ModelService(model_id, backend=backend, adapter_timeout_s=None, state_dir=str(state_dir), holder=holder)


async def test_a_run_moves_between_replicas_and_the_one_it_left_steps_aside(backend, other_backend, tiny_model_id,
                                                                          tmp_path):
    from twinkle.common.wire import RunMoved

    ref = await _reference_losses(backend, tiny_model_id, tmp_path, "move-ref", 4)
    a = _replica(backend, tiny_model_id, tmp_path, "replica-a")
    b = _replica(other_backend, tiny_model_id, tmp_path, "replica-b")
    try:
        await a.create_run("move-1", "alice", LORA)
        assert _loss(await a.forward_backward("move-1", "alice", 1, make_batch([5, 3], 0))) == ref[0]
        await a.optim_step("move-1", "alice", 2, ADAM)
        assert await a.held_runs() == ["move-1"]

        # The router sends the run to b (a was thought lost): b restores it at the last step and takes it.
        assert _loss(await b.forward_backward("move-1", "alice", 3, make_batch([5, 3], 1))) == pytest.approx(
            ref[1], abs=1e-5)
        await b.optim_step("move-1", "alice", 4, ADAM)

        # a still holds its copy; it now steps aside instead of training a run b serves.
        with pytest.raises(RunMoved):
            await a.forward_backward("move-1", "alice", 5, make_batch([5, 3], 2))
        assert await a.held_runs() == [] and not backend.has_run("move-1")

        assert _loss(await b.forward_backward("move-1", "alice", 5, make_batch([5, 3], 2))) == pytest.approx(
            ref[2], abs=1e-5)
        await b.optim_step("move-1", "alice", 6, ADAM)
        assert (await b.run_info("move-1", "alice")).step == 3
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_lost_its_run_mid_step_neither_saves_nor_acknowledges_it(backend, other_backend,
                                                                                    tiny_model_id, tmp_path):
    from twinkle.common.wire import RunMoved
    from twinkle.model.durability import RunStateStore

    a = _replica(backend, tiny_model_id, tmp_path, "replica-a")
    b = _replica(other_backend, tiny_model_id, tmp_path, "replica-b")
    try:
        await a.create_run("move-2", "alice", LORA)
        await a.forward_backward("move-2", "alice", 1, make_batch([5, 3], 0))
        await a.optim_step("move-2", "alice", 2, ADAM)
        await a.forward_backward("move-2", "alice", 3, make_batch([5, 3], 1))
        assert (await b.run_info("move-2", "alice")).step == 1  # b takes the run (a restore)

        # a's step 2 was computed from its own gradients, but the run is b's now: never saved, never answered.
        with pytest.raises(RunMoved):
            await a.optim_step("move-2", "alice", 4, ADAM)
        saved, _ = RunStateStore(str(tmp_path)).read("move-2")
        assert (saved.step, saved.next_seq) == (1, 3)
        assert not backend.has_run("move-2")

        # Sent again, the step reaches b, which never saw the forward_backward it needs: refused, not stepped.
        with pytest.raises(ResyncNeeded):
            await b.optim_step("move-2", "alice", 4, ADAM)
        await b.settle("move-2", "alice", [(3, "forward_backward")])
        with pytest.raises(UserError, match="lost"):
            await b.optim_step("move-2", "alice", 4, ADAM)
        assert (await b.run_info("move-2", "alice")).step == 1
    finally:
        await a.close()
        await b.close()


async def test_the_adapter_limit_counts_an_owners_runs_on_every_replica(backend, other_backend, tiny_model_id,
                                                                       tmp_path):
    def replica(b, holder):
        return ModelService(tiny_model_id, backend=b, adapter_timeout_s=None, state_dir=str(tmp_path), holder=holder,
                            adapter_limit_per_owner=2)

    a, b = replica(backend, "replica-a"), replica(other_backend, "replica-b")
    try:
        await a.create_run("limit-1", "alice", LORA)
        await b.create_run("limit-2", "alice", LORA)
        with pytest.raises(UserError, match="adapter limit"):
            await a.create_run("limit-3", "alice", LORA)
        await b.create_run("limit-4", "bob", LORA)  # another key's runs do not count
        await a.delete_run("limit-1", "alice")
        await b.create_run("limit-3", "alice", LORA)
        assert sorted(r.run_id for r in await a.list_runs("alice")) == ["limit-2", "limit-3"]
    finally:
        await a.close()
        await b.close()
