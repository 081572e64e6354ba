"""The Model deployment's worker start path (the shared ``start_workers``) and its typed info/health."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle

import pytest
from twinkle.common import binding
from twinkle.common.component import ComponentSpec
from twinkle.common.wire import ServiceHealth, ServiceInfo, WorkerInfo
from twinkle.common.workers import InProcessWorker, WorkerSpec
from twinkle.model import deployment
from twinkle.model.backend import BackendInfo
from twinkle.model.distributed import DataParallelBackend, Placement
from twinkle.model.service import ModelService


def _spec(model_id: str, *workers: WorkerSpec) -> ComponentSpec:
    return ComponentSpec(app_name="m", route_prefix="/m", import_path="model", server_type="twinkle",
                         args={"model_id": model_id, "max_length": 64}, workers=list(workers))


class _FakeActor:
    """Stands in for a pinned Ray actor: records its target and constructor args, answers ``placement`` and
    ``describe``."""

    def __init__(self, target: str, spec: WorkerSpec, args: tuple, kwargs: dict) -> None:
        self.target, self.spec, self.args, self.kwargs = target, spec, args, kwargs

    def submit(self, method: str, *args):
        answers = {"placement": Placement(dp_rank=self.spec.rank, dp_size=self.spec.world_size),
                   "describe": BackendInfo(model_name="m", model_id=self.args[0], backend="transformers",
                                           max_context_length=64, vocab_size=100)}
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(answers[method])
        return future


@pytest.fixture
def planned_here(monkeypatch):
    """Ray's view of nodes without Ray: the replica runs on node "here"; actors are recorded, not started."""
    monkeypatch.setattr(binding, "on_this_node", lambda node_id: node_id in (None, "here"))
    monkeypatch.setattr(binding, "start_ray_workers",
                        lambda target, specs, args_for: [_FakeActor(target, s, *args_for(s)) for s in specs])


def test_a_cpu_worker_planned_on_the_replicas_node_runs_in_the_replica(planned_here, tiny_model_id):
    workers, backend = deployment.start_model_workers(_spec(tiny_model_id, WorkerSpec("m", 0, 1, node_id="here")))
    assert len(workers) == 1 and isinstance(workers[0], InProcessWorker)
    assert backend is workers[0].target.backend and backend.describe().max_context_length == 64
    info = asyncio.run(workers[0].describe())
    assert isinstance(info, WorkerInfo) and info.pid == os.getpid()


def test_a_cpu_worker_planned_on_another_node_runs_there(planned_here, tiny_model_id):
    workers, backend = deployment.start_model_workers(_spec(tiny_model_id, WorkerSpec("m", 0, 1, node_id="far")))
    (actor,) = workers
    assert isinstance(actor, _FakeActor) and actor.spec.node_id == "far"
    assert isinstance(backend, DataParallelBackend)
    assert actor.args == (tiny_model_id,)
    assert (actor.kwargs["rank"], actor.kwargs["world_size"], actor.kwargs["device"]) == (0, 1, "cpu")
    assert actor.kwargs["max_tokens_per_datum"] == 64


def test_a_gpu_worker_is_an_actor_on_its_device(planned_here, tiny_model_id):
    gpu = WorkerSpec("m", 0, 1, node_id="here", cuda_visible_devices="3", num_gpus=1)
    (actor,), _ = deployment.start_model_workers(_spec(tiny_model_id, gpu))
    assert isinstance(actor, _FakeActor) and actor.kwargs["device"] is None  # the one GPU it sees
    assert actor.target == "twinkle.model.distributed:ModelWorker" and "tp_size" not in actor.kwargs


def test_a_megatron_application_starts_megatron_ranks_laid_out_by_its_mesh(planned_here, tiny_model_id, monkeypatch):
    monkeypatch.setattr(deployment, "free_port_on_node", lambda node_id: ("10.0.0.7", 29500))  # rank 0's node
    gpus = [WorkerSpec("m", r, 4, node_id="here", cuda_visible_devices=str(r), num_gpus=1) for r in range(4)]
    spec = _spec(tiny_model_id, *gpus)
    spec = ComponentSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__},
                            "args": {**spec.args, "backend": "megatron",
                                     "device_mesh": {"dp_size": 2, "tp_size": 2, "pp_size": 1}}})
    actors, backend = deployment.start_model_workers(spec)
    assert [a.target for a in actors] == ["twinkle.model.megatron.worker:MegatronWorker"] * 4
    assert [(a.kwargs["rank"], a.kwargs["world_size"], a.kwargs["tp_size"], a.kwargs["pp_size"]) for a in actors] == [
        (r, 4, 2, 1) for r in range(4)]
    assert {(a.kwargs["master_addr"], a.kwargs["master_port"]) for a in actors} == {("10.0.0.7", 29500)}
    assert isinstance(backend, DataParallelBackend)


async def test_info_and_health_are_typed_and_cross_processes_as_structs(backend, tiny_model_id):
    svc = ModelService(tiny_model_id, backend=backend, adapter_timeout_s=None)
    try:
        info, health = await svc.info(), await svc.health()
    finally:
        await svc.close()
    assert isinstance(info, ServiceInfo) and info.kind == "model" and info.backend == "transformers"
    assert info.dp_size == 1 and info.runs == 0 and info.tokenizer_id
    assert isinstance(health, ServiceHealth) and (health.kind, health.status, health.workers) == ("model", "ok", 1)
    # Ray pickles what a Serve handle returns: the caller gets the struct back, not a dict.
    for value in (info, health):
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value) and back == value


async def test_the_deployment_counts_workers_that_do_not_answer():
    class Dead:
        async def describe(self):
            raise RuntimeError("actor died")

    class Alive:
        async def describe(self):
            return None

    assert await binding.count_alive([Alive(), Dead(), Alive()]) == 2
    health = binding.with_workers_alive(ServiceHealth(kind="model"), planned=3, alive=2)
    assert (health.status, health.workers, health.workers_alive) == ("degraded", 3, 2)
    assert binding.with_workers_alive(ServiceHealth(kind="model"), planned=2, alive=2).status == "ok"
