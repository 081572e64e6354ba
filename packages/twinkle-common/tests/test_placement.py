"""Placement planner: physical ranks -> machines -> Ray nodes -> CUDA_VISIBLE_DEVICES, and every way it fails."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from msgspec.structs import replace
from twinkle.common.placement import (
    ComponentRequest,
    PlacementError,
    device_count_from_env,
    plan_for_config,
    plan_placement,
    requests_from_config,
)
from twinkle.common.topology import RayNode, Topology, load_topology

DATA = Path(__file__).parent / "data"


def gpu(
    app: str, ranks, *, nproc: int | None = None, world: int | None = None, path: str = "model"
) -> ComponentRequest:
    ranks = list(ranks)
    return ComponentRequest(app, path, "cuda", ranks, nproc or len(ranks), len(ranks) if world is None else world)


def cpu(app: str, workers: int | None = None, per_node: int | None = None) -> ComponentRequest:
    return ComponentRequest(app, "processor", "cpu", [], 1, workers, per_node)


def placed(plan, app):
    """(node_id, CUDA_VISIBLE_DEVICES) per worker, in worker order."""
    return [(w.node_id, w.visible_devices) for w in plan.by_app(app)]


# --- the seed's examples ------------------------------------------------------------------------------------

SEED_RANKS_CONFIG = {
    "server_type": "twinkle",
    "applications": [
        {"name": "server", "route_prefix": "/server", "import_path": "server", "args": None},
        {
            "name": "models-Qwen2.5-7B-Instruct",
            "import_path": "model",
            "args": {
                "nproc_per_node": 4,
                "device_group": {"name": "model", "ranks": [0, 1, 2, 3], "device_type": "cuda"},
                "device_mesh": {"device_type": "cuda", "dp_size": 4},
            },
        },
        {
            "name": "sampler-Qwen2.5-7B-Instruct",
            "import_path": "sampler",
            "args": {
                "nproc_per_node": 2,
                "device_group": {"name": "sampler", "ranks": [4, 5], "device_type": "cuda"},
                "device_mesh": {"device_type": "cuda", "dp_size": 2},
            },
        },
        {
            "name": "processor",
            "import_path": "processor",
            "args": {
                "ncpu_proc_per_node": 4,
                "device_group": {"name": "processor", "ranks": 0, "device_type": "cpu"},
                "device_mesh": {"device_type": "cpu", "dp_size": 4},
            },
        },
    ],
}


def test_seed_three_node_cluster_with_the_ranks_example():
    plan = plan_for_config(SEED_RANKS_CONFIG, load_topology(DATA / "topology-3node.yaml"), 8)

    assert plan.apps == ("models-Qwen2.5-7B-Instruct", "sampler-Qwen2.5-7B-Instruct", "processor")
    assert placed(plan, "models-Qwen2.5-7B-Instruct") == [("head-gpu0-3", str(i)) for i in range(4)]
    assert placed(plan, "sampler-Qwen2.5-7B-Instruct") == [("worker-gpu4-7", "4"), ("worker-gpu4-7", "5")]
    sampler = plan.by_app("sampler-Qwen2.5-7B-Instruct")
    assert [w.node_gpu_index for w in sampler] == [0, 1]  # Ray's GPU 0 and 1 of that node are physical 4 and 5
    assert [w.env for w in sampler] == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    processor = plan.by_app("processor")
    assert [(w.node_id, w.cpu_slot, w.visible_devices) for w in processor] == [
        ("worker-cpu", k, None) for k in range(4)
    ]
    assert {w.machine_index for w in plan.workers} == {0}
    assert plan.gpus_by_node() == {"head-gpu0-3": [0, 1, 2, 3], "worker-gpu4-7": [4, 5]}
    assert plan.notes == ()

    table = plan.format_table().splitlines()
    assert table[0].split() == ["app", "worker", "rank", "machine", "ray", "node", "device", "CUDA_VISIBLE_DEVICES"]
    assert table[2].split() == ["models-Qwen2.5-7B-Instruct", "0", "0", "0", "head-gpu", "(10.28.252.9)", "cuda:0", "0"]
    assert table[7].split() == [
        "sampler-Qwen2.5-7B-Instruct",
        "1",
        "5",
        "0",
        "worker-g",
        "(10.28.252.9)",
        "cuda:5",
        "5",
    ]
    assert table[8].split() == ["processor", "0", "-", "0", "worker-c", "(10.28.252.9)", "cpu", "slot", "0", "-"]
    # columns are aligned: every row's device column starts at the same offset
    offset = table[0].index("device")
    assert all(line[offset:].startswith(("cuda:", "cpu slot")) for line in table[2:])


def test_seed_first_example_model_on_head_processor_on_cpu_node():
    cfg = {
        "applications": [
            {"name": "server", "import_path": "server", "args": None},
            {
                "name": "models-Qwen2.5-7B-Instruct",
                "import_path": "model",
                "args": {
                    "nproc_per_node": 2,
                    "device_group": {"name": "model", "ranks": [0, 1], "device_type": "cuda"},
                    "device_mesh": {"dp_size": 2},
                },
            },
            {
                "name": "sampler",
                "import_path": "sampler",
                "args": {
                    "nproc_per_node": 2,
                    "device_group": {"name": "sampler", "ranks": [4, 5], "device_type": "cuda"},
                    "device_mesh": {"dp_size": 2},
                },
            },
            {
                "name": "processor",
                "import_path": "processor",
                "args": {
                    "nproc_per_node": 2,
                    "ncpu_proc_per_node": 2,
                    "device_group": {"name": "model", "ranks": 2, "device_type": "cpu"},
                    "device_mesh": {"dp_size": 2},
                },
            },
        ]
    }
    plan = plan_for_config(cfg, load_topology(DATA / "topology-3node.yaml"), 8)
    assert placed(plan, "models-Qwen2.5-7B-Instruct") == [("head-gpu0-3", "0"), ("head-gpu0-3", "1")]
    assert placed(plan, "sampler") == [("worker-gpu4-7", "4"), ("worker-gpu4-7", "5")]
    assert [(w.node_id, w.cpu_slot) for w in plan.by_app("processor")] == [("worker-cpu", 0), ("worker-cpu", 1)]


def test_issue_case_one_node_four_gpus_model_2_3_sampler_0():
    """`ray start --head --num-gpus=4`, no CUDA_VISIBLE_DEVICES, D unset: model [2,3], sampler [0]."""
    topology = load_topology(DATA / "topology-1node-4gpu.json")
    plan = plan_placement([gpu("model", [2, 3]), gpu("sampler", [0], path="sampler")], topology, None)
    visible = [w.visible_devices for w in plan.workers]
    assert visible == ["2", "3", "0"]
    assert [w.node_gpu_index for w in plan.workers] == [2, 3, 0]
    assert plan.device_count_per_physical_node == 4
    assert any("DEVICE_COUNT_PER_PHYSICAL_NODE is not set; inferred 4" in note for note in plan.notes)
    assert "note: DEVICE_COUNT_PER_PHYSICAL_NODE is not set" in plan.format_table()


def test_d_inferred_from_highest_device_id_on_the_only_machine():
    """The seed machine run as 0-3 / 4-7 nodes has 8 GPUs even when only the 4-7 node is up."""
    topology = Topology(
        nodes=(
            RayNode("head-cpu", "10.0.0.1", is_head=True, num_cpus=8),
            RayNode("gpus-4-7", "10.0.0.1", num_gpus=4, visible_gpus=(4, 5, 6, 7)),
        )
    )
    plan = plan_placement([gpu("sampler", [5, 6], path="sampler")], topology, None)
    assert plan.device_count_per_physical_node == 8
    assert placed(plan, "sampler") == [("gpus-4-7", "5"), ("gpus-4-7", "6")]


# --- several machines ---------------------------------------------------------------------------------------


def test_two_machines_ranks_8_to_15_land_on_the_second_machine_head_first():
    topology = load_topology(DATA / "topology-2x8.yaml")
    head = "0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"
    other = "5f0c1e2d3a4b5c6d7e8f90a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7"
    plan = plan_placement(
        [gpu("model", range(0, 8), nproc=8), gpu("sampler", range(8, 16), nproc=8, path="sampler")], topology, 8
    )
    model, sampler = plan.by_app("model"), plan.by_app("sampler")
    assert {(w.node_id, w.node_ip, w.machine_index) for w in model} == {(head, "10.0.0.20", 0)}
    assert {(w.node_id, w.node_ip, w.machine_index) for w in sampler} == {(other, "10.0.0.3", 1)}
    assert [w.visible_devices for w in sampler] == [str(i) for i in range(8)]
    assert [w.rank for w in sampler] == list(range(8, 16))
    assert [m.ip for m in plan.machines] == ["10.0.0.20", "10.0.0.3"]
    row = plan.format_table().splitlines()[2 + 8]
    assert row.split() == ["sampler", "0", "8", "1", "5f0c1e2d", "(10.0.0.3)", "cuda:0", "0"]
    json.dumps(plan.to_dict())  # JSON-serialisable as is
    assert plan.to_dict()["machines"][1] == {"index": 1, "ip": "10.0.0.3", "nodes": [other]}


def test_machines_order_numerically_and_cpu_only_machines_last():
    topology = Topology(
        nodes=(
            RayNode("cpu-head", "10.0.0.1", is_head=True, num_cpus=4),
            RayNode("g100", "10.0.0.100", num_gpus=2),
            RayNode("g3", "10.0.0.3", num_gpus=2),
            RayNode("g6", "fd00::1", num_gpus=2),
            RayNode("g9", "10.0.0.9", num_gpus=2),
        )
    )
    assert [m.ip for m in topology.machines()] == ["10.0.0.3", "10.0.0.9", "10.0.0.100", "fd00::1", "10.0.0.1"]
    plan = plan_placement([gpu("m", [0, 3, 5, 7], nproc=1), cpu("p")], topology, 2)
    assert [w.node_id for w in plan.by_app("m")] == ["g3", "g9", "g100", "g6"]
    assert [w.node_id for w in plan.by_app("p")] == ["cpu-head"]
    assert plan.by_app("p")[0].machine_index == 4


def test_device_count_missing_on_multi_machine_cluster_is_an_error():
    topology = load_topology(DATA / "topology-2x8.yaml")
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [0, 1])], topology, None)
    message = str(err.value)
    assert "DEVICE_COUNT_PER_PHYSICAL_NODE is not set" in message
    assert "'model'" in message and "10.0.0.20" in message and "10.0.0.3" in message
    assert "export DEVICE_COUNT_PER_PHYSICAL_NODE=" in message


def test_device_count_not_needed_without_gpu_ranks_on_multi_machine_cluster():
    plan = plan_placement([cpu("p", 2)], load_topology(DATA / "topology-2x8.yaml"), None)
    assert [w.node_ip for w in plan.by_app("p")] == ["10.0.0.20", "10.0.0.20"]  # no GPU-less node: the head
    assert plan.device_count_per_physical_node is None


def test_device_count_smaller_than_a_machine_is_an_error():
    with pytest.raises(PlacementError, match=r"has GPU id\(s\) 4-7 but DEVICE_COUNT_PER_PHYSICAL_NODE=4"):
        plan_placement([gpu("m", [0])], load_topology(DATA / "topology-3node.yaml"), 4)


# --- errors -------------------------------------------------------------------------------------------------


def test_two_applications_claiming_the_same_gpu():
    with pytest.raises(PlacementError) as err:
        plan_placement(
            [gpu("model", [0, 1, 2, 3]), gpu("sampler", [3, 4], path="sampler")],
            load_topology(DATA / "topology-3node.yaml"),
            8,
        )
    assert "applications 'model' and 'sampler' both claim physical GPU rank(s) 3" in str(err.value)


def test_rank_that_no_node_has():
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [7, 9], nproc=1)], load_topology(DATA / "topology-3node.yaml"), 8)
    message = str(err.value)
    assert "application 'model': rank 9 would be GPU 1 of machine 1" in message
    assert "only 1 machine(s) have GPUs; ranks that exist: 0-7" in message


def test_rank_on_a_dead_node_and_on_a_missing_node():
    seed = load_topology(DATA / "topology-3node.yaml")
    dead = Topology(nodes=tuple(replace(n, alive=n.node_id != "worker-gpu4-7") for n in seed.nodes))
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("sampler", [5])], dead, 8)
    assert (
        "rank 5 (GPU 5 of machine 0, 10.28.252.9) belongs to Ray node worker-g (10.28.252.9), which is not alive"
        in str(err.value)
    )
    assert "0-3 exist" in str(err.value)

    missing = Topology(nodes=tuple(n for n in seed.nodes if n.node_id != "worker-gpu4-7"))
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("sampler", [5])], missing, 8)
    message = str(err.value)
    assert "rank 5 (GPU 5 of machine 0, 10.28.252.9): no alive Ray node there owns that GPU" in message
    assert "Ray node head-gpu (10.28.252.9): GPUs 0-3" in message
    assert "CUDA_VISIBLE_DEVICES including 5" in message


def test_two_ray_nodes_on_one_machine_claiming_the_same_gpus():
    topology = Topology(
        nodes=(
            RayNode("aaaaaaaa-1", "10.0.0.1", is_head=True, num_gpus=4),
            RayNode("bbbbbbbb-2", "10.0.0.1", num_gpus=4),
        )
    )
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [0, 1])], topology, 8)
    message = str(err.value)
    assert "Ray node aaaaaaaa (10.0.0.1) and Ray node bbbbbbbb (10.0.0.1) both claim GPU(s) 0-3" in message
    assert "disjoint CUDA_VISIBLE_DEVICES" in message
    assert message.count("both claim") == 1  # reported once per machine, not once per rank


def test_a_dead_node_with_the_same_gpus_as_its_restarted_successor_is_no_conflict():
    topology = Topology(
        nodes=(
            RayNode("old", "10.0.0.1", is_head=False, num_gpus=4, alive=False),
            RayNode("new", "10.0.0.1", is_head=True, num_gpus=4),
        )
    )
    assert placed(plan_placement([gpu("m", [1])], topology, 4), "m") == [("new", "1")]


def test_duplicate_ranks_in_one_application():
    with pytest.raises(PlacementError, match=r"'model': rank\(s\) 1 listed more than once"):
        plan_placement([gpu("model", [0, 1, 1], world=3, nproc=1)], load_topology(DATA / "topology-3node.yaml"), 8)


def test_mesh_size_must_match_the_ranks():
    with pytest.raises(PlacementError) as err:
        plan_placement(
            [gpu("sampler", [4, 5], world=4, path="sampler")], load_topology(DATA / "topology-3node.yaml"), 8
        )
    assert (
        "application 'sampler': device_mesh size 4 (the product of its parallel sizes) does not match its 2 "
        "rank(s) [4, 5]" in str(err.value)
    )


def test_nproc_per_node_must_divide_the_ranks():
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [0, 1, 2, 3], nproc=3)], load_topology(DATA / "topology-3node.yaml"), 8)
    assert "application 'model': nproc_per_node=3 does not divide its 4 rank(s) [0, 1, 2, 3]" in str(err.value)


def test_gpu_group_on_a_cluster_without_gpus():
    topology = Topology(nodes=(RayNode("cpu", "127.0.0.1", is_head=True, num_cpus=2),))
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [0]), cpu("processor")], topology, None)
    assert "application 'model' asks for cuda ranks [0] but no alive Ray node has GPUs" in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(PlacementError) as err:
        plan_placement(
            [gpu("a", [0, 1], world=4), gpu("b", [1, 2, 3], nproc=2)], load_topology(DATA / "topology-3node.yaml"), 8
        )
    assert len(err.value.problems) == 3
    assert str(err.value).startswith("placement failed:\n  - ")


def test_empty_ranks_and_duplicate_app_names():
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("a", []), cpu("a")], load_topology(DATA / "topology-3node.yaml"), 8)
    assert "application name 'a' is used more than once" in str(err.value)
    assert "device_group.ranks is empty" in str(err.value)


# --- CPU groups ---------------------------------------------------------------------------------------------


def test_cpu_workers_spread_ncpu_per_node_and_share_slots_across_apps():
    topology = Topology(
        nodes=(
            RayNode("head", "10.0.0.1", is_head=True, num_cpus=8, num_gpus=8),
            RayNode("cpu-b", "10.0.0.3", num_cpus=2),
            RayNode("cpu-a", "10.0.0.2", num_cpus=2),
        )
    )
    plan = plan_placement([cpu("p1", 5, 2), cpu("p2")], topology, 8)
    assert [(w.node_id, w.cpu_slot) for w in plan.by_app("p1")] == [
        ("cpu-a", 0),
        ("cpu-a", 1),
        ("cpu-b", 0),
        ("cpu-b", 1),
        ("head", 0),
    ]
    assert [(w.node_id, w.cpu_slot) for w in plan.by_app("p2")] == [("cpu-a", 2)]
    assert plan.notes == ("Ray node cpu-a (10.0.0.2) hosts 3 CPU workers but has 2 CPUs",)
    with pytest.raises(PlacementError, match=r"7 CPU workers at ncpu_proc_per_node=2 need 4 Ray nodes but 3 are alive"):
        plan_placement([cpu("p", 7, 2)], topology, 8)


def test_app_on_cpu_device_type_and_app_without_device_group_are_cpu_workers():
    cfg = SimpleNamespace(
        applications=[
            SimpleNamespace(
                name="model-cpu",
                import_path="model",
                args=SimpleNamespace(
                    nproc_per_node=2,
                    device_group=SimpleNamespace(name="m", ranks=[0, 1], device_type="CPU"),
                    device_mesh=SimpleNamespace(dp_size=2, tp_size=1, pp_size=1, world_size=2),
                    ncpu_proc_per_node=None,
                ),
            ),
            SimpleNamespace(name="proc", import_path="processor", args=SimpleNamespace(nproc_per_node=1)),
        ]
    )
    requests = requests_from_config(cfg)
    assert requests == [
        ComponentRequest("model-cpu", "model", "cpu", (0, 1), 2, 2, None),
        ComponentRequest("proc", "processor", "cpu", (), 1, None, None),
    ]
    plan = plan_for_config(cfg, load_topology(DATA / "topology-1node-4gpu.json"), None)
    assert [(w.app_name, w.cpu_slot) for w in plan.workers] == [("model-cpu", 0), ("model-cpu", 1), ("proc", 2)]
    assert all(w.env == {} and w.device_label.startswith("cpu slot") for w in plan.workers)


def test_requests_from_config_reads_mesh_product_when_there_is_no_world_size_property():
    cfg = {
        "applications": [
            {
                "name": "m",
                "import_path": "model",
                "args": {
                    "device_group": {"ranks": [0, 1, 2, 3], "device_type": "cuda"},
                    "device_mesh": {"dp_size": 1, "tp_size": 2, "cp_size": 2},
                },
            }
        ]
    }
    assert requests_from_config(cfg) == [ComponentRequest("m", "model", "cuda", (0, 1, 2, 3), 1, 4, None)]


def test_npu_workers_get_the_ascend_variable():
    plan = plan_placement(
        [ComponentRequest("m", "model", "npu", [1])], load_topology(DATA / "topology-1node-4gpu.json"), 4
    )
    assert plan.workers[0].env == {"ASCEND_RT_VISIBLE_DEVICES": "1"}
    assert plan.workers[0].device_label == "npu:1"
    assert "ASCEND_RT_VISIBLE_DEVICES" in plan.format_table().splitlines()[0]


def test_by_app_unknown_name():
    plan = plan_placement([cpu("p")], load_topology(DATA / "topology-1node-4gpu.json"), None)
    with pytest.raises(KeyError, match="have: p"):
        plan.by_app("nope")


def test_device_count_from_env():
    assert device_count_from_env({}) is None
    assert device_count_from_env({"DEVICE_COUNT_PER_PHYSICAL_NODE": " 8 "}) == 8
    with pytest.raises(PlacementError, match="not an integer"):
        device_count_from_env({"DEVICE_COUNT_PER_PHYSICAL_NODE": "eight"})
    with pytest.raises(PlacementError, match="positive"):
        device_count_from_env({"DEVICE_COUNT_PER_PHYSICAL_NODE": "0"})


def test_d_inferred_when_the_only_other_machine_is_cpu_only():
    """A CPU-only head box is numbered after the GPU machines, so rank 0 stays on the GPUs and D is inferable."""
    topology = Topology(
        nodes=(
            RayNode("cpu-head", "10.0.0.1", is_head=True, num_cpus=8),
            RayNode("gpu-box", "10.0.0.2", num_cpus=64, num_gpus=8),
        )
    )
    plan = plan_placement([gpu("model", [0, 7], nproc=1), cpu("processor")], topology, None)
    assert [(w.node_id, w.machine_index, w.visible_devices) for w in plan.by_app("model")] == [
        ("gpu-box", 0, "0"),
        ("gpu-box", 0, "7"),
    ]
    assert [(w.node_id, w.machine_index) for w in plan.by_app("processor")] == [("cpu-head", 1)]
    assert plan.device_count_per_physical_node == 8


def test_rank_beyond_an_inferred_device_count_says_it_was_inferred():
    with pytest.raises(PlacementError) as err:
        plan_placement([gpu("model", [4])], load_topology(DATA / "topology-1node-4gpu.json"), None)
    assert (
        "rank 4 would be GPU 0 of machine 1 (DEVICE_COUNT_PER_PHYSICAL_NODE=4 inferred), but only 1 machine(s) have "
        "GPUs; ranks that exist: 0-3"
    ) in str(err.value)


# --- the shipped YAML files, through the real config loader -------------------------------------------------

REPO = Path(__file__).resolve().parents[3]


def _load(relative: str):
    from twinkle.common.config import load_config

    return load_config(REPO / relative)


def test_seed_ranks_example_file_on_the_seed_cluster():
    plan = plan_for_config(_load("deploy/examples/ranks.yaml"), load_topology(DATA / "topology-3node.yaml"), 8)
    assert placed(plan, "models-Qwen2.5-7B-Instruct") == [("head-gpu0-3", str(i)) for i in range(4)]
    assert placed(plan, "sampler-Qwen2.5-7B-Instruct") == [("worker-gpu4-7", "4"), ("worker-gpu4-7", "5")]
    assert [(w.node_id, w.cpu_slot) for w in plan.by_app("processor")] == [("worker-cpu", k) for k in range(4)]


def test_seed_tinker_example_shares_gpu_0_only_when_allowed():
    """The seed's tinker example gives the model [0, 1] and a vLLM sampler [0] at gpu_memory_utilization 0.5."""
    cfg = _load("deploy/examples/tinker.yaml")
    topology = load_topology(DATA / "topology-3node.yaml")
    with pytest.raises(PlacementError, match="both claim physical GPU rank.s. 0; .*allow_shared_gpus"):
        plan_for_config(cfg, topology, 8)
    plan = plan_for_config(cfg, topology, 8, allow_shared_gpus=True)
    model, sampler = plan.by_app("models-Qwen2.5-0.5B-Instruct"), plan.by_app("sampler-Qwen2.5-0.5B-Instruct")
    assert [(w.visible_devices, w.gpu_fraction) for w in model] == [("0", 0.5), ("1", 1.0)]
    assert [(w.node_id, w.visible_devices, w.gpu_fraction) for w in sampler] == [("head-gpu0-3", "0", 0.5)]
    assert plan.gpus_by_node() == {"head-gpu0-3": [0, 1]}
    assert "cuda:0 (0.5 shared)" in plan.format_table()
    assert any("share physical GPU rank(s) 0" in note for note in plan.notes)


def test_cpu_local_config_on_a_cpu_only_box():
    topology = Topology(nodes=(RayNode("local", "127.0.0.1", is_head=True, num_cpus=4),))
    plan = plan_for_config(_load("deploy/local.yaml"), topology, None)
    assert plan.workers and all(not w.is_gpu and w.node_id == "local" for w in plan.workers)
    assert plan.device_count_per_physical_node is None


def test_the_plan_shows_each_workers_place_in_a_model_parallel_mesh():
    """megatron-core's order: TP ranks adjacent, then data-parallel replicas, then pipeline stages."""
    from twinkle.common.placement import mesh_coordinates

    assert [mesh_coordinates(r, 2, 2, 2) for r in range(8)] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
    req = ComponentRequest("m", "model", "cuda", (0, 1, 2, 3), 4, 4, mesh=(2, 2, 1))
    plan = plan_placement([req], load_topology(DATA / "topology-1node-4gpu.json"), 4)
    assert [w.mesh for w in plan.workers] == ["dp0 tp0 pp0", "dp0 tp1 pp0", "dp1 tp0 pp0", "dp1 tp1 pp0"]
    table = plan.format_table().splitlines()
    assert table[0].split()[-1] == "mesh" and table[4].split()[-3:] == ["dp1", "tp0", "pp0"]
    assert "mesh" not in plan_placement([replace_mesh(req)], load_topology(DATA / "topology-1node-4gpu.json"),
                                        4).format_table()


def replace_mesh(req):
    from dataclasses import replace as dc_replace

    return dc_replace(req, mesh=None)
