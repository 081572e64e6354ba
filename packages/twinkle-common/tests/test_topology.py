"""Topology model, topology files, and the live read from a real local Ray (marked ``cluster``).

The live tests run each Ray scenario in a child process with a hard timeout; see the comment above them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twinkle.common.placement import ComponentRequest, plan_placement
from twinkle.common.topology import (
    RayNode,
    Topology,
    TopologyError,
    load_topology,
    parse_visible_devices,
    read_ray_topology,
    topology_from_dict,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[3]


# --- model and files ----------------------------------------------------------------------------------------


def test_seed_topology_file_is_one_machine_with_three_nodes():
    topology = load_topology(DATA / "topology-3node.yaml")
    (machine,) = topology.machines()
    assert machine.ip == "10.28.252.9" and machine.index == 0
    assert [n.node_id for n in machine.nodes] == ["head-gpu0-3", "worker-gpu4-7", "worker-cpu"]
    assert [n.gpu_ids for n in machine.nodes] == [(0, 1, 2, 3), (4, 5, 6, 7), ()]
    assert topology.head.node_id == "head-gpu0-3"
    assert topology.total_gpus == 8


def test_deploy_example_is_the_same_file():
    example = REPO / "deploy" / "ray" / "topology-3node-example.yaml"
    assert example.read_text() == (DATA / "topology-3node.yaml").read_text()


def test_json_file_and_round_trip(tmp_path):
    topology = load_topology(DATA / "topology-1node-4gpu.json")
    assert topology.nodes == (RayNode("single", "127.0.0.1", is_head=True, num_cpus=2, num_gpus=4),)
    again = tmp_path / "again.yaml"
    seed = load_topology(DATA / "topology-3node.yaml")
    import yaml

    again.write_text(yaml.safe_dump(seed.to_dict()))
    assert load_topology(again) == seed


def test_node_ids_default_and_visible_gpus_string():
    topology = topology_from_dict(
        {"nodes": [{"ip": "10.0.0.1", "num_gpus": 2, "visible_gpus": "6, 7"}, {"ip": "10.0.0.2"}]}
    )
    assert [n.node_id for n in topology.nodes] == ["node-0", "node-1"]
    assert topology.nodes[0].gpu_ids == (6, 7)


def test_gpu_ids_follow_ray_first_num_gpus_of_the_visible_list():
    assert RayNode("n", "h", num_gpus=2, visible_gpus=(4, 5, 6, 7)).gpu_ids == (4, 5)
    assert RayNode("n", "h", num_gpus=2.5).gpu_ids == (0, 1)
    assert RayNode("n", "h", num_gpus=4, visible_gpus=()).gpu_ids == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": [{"ip": "a", "gpus": 1}]}, "unknown field `gpus` - at `$.nodes[0]`"),
        ({"nodes": [{"num_gpus": 1}]}, "missing required field `ip` - at `$.nodes[0]`"),
        ({"nodes": [{"ip": "a", "num_gpus": "four"}]}, "Expected `float`, got `str` - at `$.nodes[0].num_gpus`"),
        ({"nodes": [{"ip": "a", "node_id": "x"}, {"ip": "b", "node_id": "x"}]}, "node_id 'x' appears twice"),
        ({"nodes": [{"ip": "a", "is_head": True}, {"ip": "b", "is_head": True}]}, "more than one alive head node"),
        ({"nodes": [{"ip": "a", "visible_gpus": "0,GPU-1234"}]}, "not an integer device index"),
        ({"nodes": [{"ip": "a", "visible_gpus": [2, 2]}]}, "lists a device twice"),
        ({"machines": []}, "a 'nodes' list"),
    ],
)
def test_bad_topologies_say_what_is_wrong(data, message):
    with pytest.raises(TopologyError) as err:
        topology_from_dict(data)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load_topology(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{nodes: ")
    with pytest.raises(TopologyError, match="broken.json: not valid JSON"):
        load_topology(broken)


def test_parse_visible_devices():
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == ()
    assert parse_visible_devices("4,5, 6") == (4, 5, 6)


def test_read_ray_topology_needs_a_connection():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    with pytest.raises(TopologyError, match="call ray.init"):
        read_ray_topology()


# --- live Ray -----------------------------------------------------------------------------------------------
#
# Each scenario runs in a child process in its own process group, with a hard timeout: Ray keeps global state
# per process (a second ray.init after a shutdown can hang), and a stuck raylet must not hang the test run.
# The child starts its raylets in a private temp dir on loopback, without token auth (the token file in ~/.ray
# is shared by every Ray on the box), and stops them by PID; the parent then SIGKILLs whatever is left of the
# group. Never `ray stop`: it would also kill clusters that other processes on this machine own.

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

_SCENARIO = r"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

spec = json.loads(sys.argv[1])
if spec["mode"] == "start":
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (this suite's loopback-only setting) makes `ray start --address`
    # refuse to join; with it on, every node still registers 127.0.0.1 through --node-ip-address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"

import ray

from twinkle.common.topology import read_ray_topology

temp_dir = Path(spec["temp_dir"])
ray_cli = str(Path(sys.executable).with_name("ray"))
procs = []


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(port, head, num_gpus, visible, num_cpus=1):
    args = [ray_cli, "start", "--block", f"--num-gpus={num_gpus}", f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    if head:
        args += ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    else:
        args += [f"--address=127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    log = open(temp_dir / f"start-{len(procs)}.log", "wb")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))


try:
    if spec["mode"] == "local":
        ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False,
                 _temp_dir=str(temp_dir), log_to_driver=False)
    else:
        port = free_port()
        head, *others = spec["nodes"]
        start(port, True, **head)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        for count, node in enumerate(others, start=2):  # one at a time: a 2-CPU box times out on parallel joins
            start(port, False, **node)
            deadline = time.monotonic() + 40
            while sum(1 for n in ray.nodes() if n["Alive"]) < count:
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise SystemExit(f"Ray node {count} of {len(spec['nodes'])} did not come up")
                time.sleep(0.5)
    print("TOPOLOGY " + json.dumps(read_ray_topology(probe_timeout_s=30).to_dict()), flush=True)
finally:
    ray.shutdown()
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
"""


def _live_topology(spec: dict, timeout_s: float = 90.0) -> Topology:
    """Run one scenario in a child process group and return the topology it read from Ray."""
    temp_dir = Path(tempfile.mkdtemp(prefix="twr", dir="/tmp"))  # short: raylet socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    env.update(RAY_ENV)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCENARIO, json.dumps({**spec, "temp_dir": str(temp_dir)})],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"Ray scenario did not finish in {timeout_s:.0f}s:\n{out[-3000:]}{_start_logs(temp_dir)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # raylets the child could not stop
    logs = _start_logs(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("TOPOLOGY ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}:\n{out[-3000:]}{logs}"
    return topology_from_dict(json.loads(lines[-1].removeprefix("TOPOLOGY ")))


def _start_logs(temp_dir: Path) -> str:
    return "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(temp_dir.glob("start-*.log"))
    )


@pytest.mark.cluster
def test_live_local_ray_without_cuda_visible_devices():
    """The issue's case on a live Ray: one node, --num-gpus=4, model [2,3] + sampler [0]."""
    pytest.importorskip("ray")
    topology = _live_topology({"mode": "local"})
    (node,) = topology.nodes
    assert node.is_head and node.alive and node.ip
    assert (node.num_gpus, node.num_cpus, node.visible_gpus) == (4, 2, None)
    plan = plan_placement(
        [
            ComponentRequest("model", "model", "cuda", [2, 3], 2, 2),
            ComponentRequest("sampler", "sampler", "cuda", [0], 1, 1),
        ],
        topology,
        None,
    )
    assert [(w.node_id, w.visible_devices) for w in plan.workers] == [
        (node.node_id, "2"),
        (node.node_id, "3"),
        (node.node_id, "0"),
    ]


@pytest.mark.cluster
def test_live_probe_reads_each_raylets_cuda_visible_devices():
    """The seed's recipe on loopback: a head with CUDA_VISIBLE_DEVICES=4,5,6,7 and a second node with 0,1.

    Two nodes with different lists prove that each probe ran on the node it was pinned to.
    """
    pytest.importorskip("ray")
    topology = _live_topology(
        {"mode": "start", "nodes": [{"num_gpus": 4, "visible": "4,5,6,7"}, {"num_gpus": 2, "visible": "0,1"}]}
    )
    by_gpus = {node.visible_gpus: node for node in topology.nodes}
    assert set(by_gpus) == {(4, 5, 6, 7), (0, 1)}
    assert by_gpus[(4, 5, 6, 7)].is_head and not by_gpus[(0, 1)].is_head
    assert len(topology.machines()) == 1  # one IP, one machine

    plan = plan_placement(
        [
            ComponentRequest("model", "model", "cuda", [5, 6], 2, 2),
            ComponentRequest("sampler", "sampler", "cuda", [1], 1, 1),
            ComponentRequest("processor", "processor", "cpu", [], 1, 2, 2),
        ],
        topology,
        8,
    )
    head, small = by_gpus[(4, 5, 6, 7)], by_gpus[(0, 1)]
    assert [(w.node_id, w.visible_devices) for w in plan.by_app("model")] == [(head.node_id, "5"), (head.node_id, "6")]
    assert [(w.node_id, w.visible_devices, w.node_gpu_index) for w in plan.by_app("sampler")] == [
        (small.node_id, "1", 1)
    ]
    assert {w.node_id for w in plan.by_app("processor")} == {head.node_id}  # no GPU-less node: the head
