"""The command line: check-config, print-config and plan (dry run against a topology file)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twinkle.common.config import load_config_text
from twinkle.server.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml")) + [REPO / "deploy" / "local.yaml",
                                                                    REPO / "deploy" / "local-tinker.yaml"]
TOPOLOGY = REPO / "deploy" / "ray" / "topology-3node-example.yaml"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_check_config_accepts_every_example(path, capsys):
    assert main(["check-config", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("setting,field", [
    ("tp_size: 2", "device_mesh.tp_size"), ("pp_size: 2", "device_mesh.pp_size"),
    ("cp_size: 2", "device_mesh.cp_size"), ("ep_size: 2", "device_mesh.ep_size")])
def test_parallelism_the_backend_lacks_is_refused_not_run_as_data_parallel(tmp_path, capsys, setting, field):
    dp = 2 if "ep_size" in setting else 1  # experts are sharded over dp x tp x cp ranks
    text = (REPO / "deploy" / "local.yaml").read_text().replace("dp_size: 1", f"dp_size: {dp}\n        {setting}", 1)
    text = text.replace("ranks: 1\n", "ranks: 2\n", 1)
    path = tmp_path / "parallel.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "data-parallel" in err and "Traceback" not in err


@pytest.mark.parametrize("setting,refused", [("tp_size: 2", None), ("pp_size: 2", None),
                                             ("cp_size: 2", "device_mesh.cp_size")])
def test_the_megatron_backend_runs_tensor_and_pipeline_parallelism_not_context(tmp_path, capsys, setting, refused):
    text = (REPO / "deploy" / "local.yaml").read_text().replace("dp_size: 1", f"dp_size: 1\n        {setting}", 1)
    text = text.replace("ranks: 1\n", "ranks: 2\n", 1).replace(
        "use_megatron: false", "use_megatron: true", 1)
    path = tmp_path / "megatron.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == (2 if refused else 0)
    err = capsys.readouterr().err
    if refused:
        assert refused in err and "the megatron backend" in err and "Traceback" not in err


def _with_replicas(deployment: str, setting: str, replace: tuple[str, str] | None = None) -> str:
    text = (REPO / "deploy" / "local-tinker.yaml").read_text().replace(
        f"      - name: {deployment}\n", f"      - name: {deployment}\n        {setting}\n", 1)
    return text.replace(*replace, 1) if replace else text


def test_more_than_one_replica_of_the_server_is_refused(tmp_path, capsys):
    path = tmp_path / "replicas.yaml"
    path.write_text(_with_replicas("TinkerCompatServer", "num_replicas: 2"))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "applications[0].deployments[0].num_replicas" in err and "one writer" in err


@pytest.mark.parametrize("deployment,setting", [
    ("ModelManagement", "num_replicas: 2"), ("SamplerManagement", "num_replicas: 3"),
    ("ModelManagement", "autoscaling_config: {min_replicas: 1, max_replicas: 4}")])
def test_several_model_or_sampler_replicas_with_in_replica_cpu_workers_are_accepted(tmp_path, deployment, setting):
    path = tmp_path / "replicas.yaml"
    path.write_text(_with_replicas(deployment, setting))
    assert main(["check-config", str(path)]) == 0


@pytest.mark.parametrize("setting,replace,field,words", [
    ("num_replicas: 2", ("durable_runs: true", "durable_runs: false"), "args.durable_runs", "durable state"),
    ("num_replicas: 2", ("dp_size: 1", "dp_size: 2"), "deployments[0].num_replicas", "devices of their own"),
    ('num_replicas: "auto"', None, "deployments[0].num_replicas", "max_replicas"),
    ("autoscaling_config: {max_replicas: 2}", ("dp_size: 1", "dp_size: 2"),
     "deployments[0].autoscaling_config.max_replicas", "devices of their own")])
def test_model_replicas_that_cannot_be_honoured_are_refused(tmp_path, capsys, setting, replace, field, words):
    text = _with_replicas("ModelManagement", setting, replace)
    if replace and replace[0] == "durable_runs: true":
        text = text.replace("      use_megatron: false\n", "      use_megatron: false\n      durable_runs: false\n", 1)
    else:
        text = text.replace("ranks: 1\n", "ranks: 2\n", 1) if replace else text
    path = tmp_path / "replicas.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"applications[1].{field}" in err and words in err and "Traceback" not in err


def test_check_config_reports_the_line_of_a_mistake(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "deploy" / "local.yaml").read_text().replace("dp_size: 1", "dp_szie: 1", 1))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:" in err and "dp_szie" in err and "device_mesh" in err
    assert "Traceback" not in err


def test_print_config_json_round_trips(capsys):
    assert main(["print-config", str(REPO / "deploy" / "local-tinker.yaml"), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["server_type"] == "tinker"
    assert load_config_text(json.dumps(data)).server_type == "tinker"


def test_server_type_override(capsys):
    assert main(["print-config", str(REPO / "deploy" / "local.yaml"), "-t", "tinker", "--format", "json"]) == 2
    # local.yaml has a processor, which only the twinkle protocol serves: the override is refused clearly.
    assert "processor" in capsys.readouterr().err


def test_plan_ranks_example_on_the_seed_cluster(capsys, monkeypatch):
    monkeypatch.setenv("DEVICE_COUNT_PER_PHYSICAL_NODE", "8")
    assert main(["plan", str(REPO / "deploy" / "examples" / "ranks.yaml"), "--topology", str(TOPOLOGY), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    devices = {(w["app_name"], w["worker_index"]): (w["node_id"], w["device"]) for w in plan["workers"]}
    assert devices[("models-Qwen2.5-7B-Instruct", 3)] == ("head-gpu0-3", 3)
    assert devices[("sampler-Qwen2.5-7B-Instruct", 0)] == ("worker-gpu4-7", 4)
    assert devices[("processor", 0)][0] == "worker-cpu"


def test_plan_seed_tinker_example_shares_gpu0_because_the_sampler_takes_half(capsys):
    assert main(["plan", str(REPO / "deploy" / "examples" / "tinker.yaml"), "--topology", str(TOPOLOGY)]) == 0
    out = capsys.readouterr().out
    assert "0.5 shared" in out


def test_plan_overlap_without_sharing_is_an_error(tmp_path, capsys):
    cfg = (REPO / "deploy" / "examples" / "tinker.yaml").read_text().replace("gpu_memory_utilization: 0.5",
                                                                            "gpu_memory_utilization: 1.0")
    path = tmp_path / "overlap.yaml"
    path.write_text(cfg)
    assert main(["plan", str(path), "--topology", str(TOPOLOGY)]) == 2
    err = capsys.readouterr().err
    assert "both claim physical GPU" in err


def test_plan_missing_topology_file_is_a_clear_error(capsys):
    assert main(["plan", str(REPO / "deploy" / "local.yaml"), "--topology", "/nonexistent/topology.yaml"]) == 2
    assert "Traceback" not in capsys.readouterr().err



def test_a_taken_port_is_a_clear_error_before_ray_starts(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("twinkle.server._ray_runtime._existing_cluster_address", lambda: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "busy.yaml"
        cfg.write_text((REPO / "deploy" / "local-tinker.yaml").read_text().replace("port: 8000", f"port: {port}"))
        assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is not available" in err and "Traceback" not in err


def test_the_port_probe_ignores_time_wait_sockets_of_a_stopped_server():
    """Right after a server with client traffic stops, its port has TIME_WAIT sockets but no listener: a
    restart must not be refused."""
    import socket

    from twinkle.server.launcher import _check_port_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    _check_port_free("127.0.0.1", port)  # no LaunchError


def test_start_up_progress_names_each_application_with_its_replica_counts():
    from types import SimpleNamespace

    from ray.serve._private.common import ReplicaState

    from twinkle.server.launcher import start_up_summary

    def app(status, *deployments):
        return SimpleNamespace(status=status, deployments={
            f"d{i}": SimpleNamespace(replica_states=states) for i, states in enumerate(deployments)})

    apps = {"server": app("RUNNING", {ReplicaState.RUNNING: 1}),
            "models": app("DEPLOYING", {ReplicaState.RUNNING: 1, ReplicaState.STARTING: 2})}
    assert start_up_summary(apps, ["server", "models", "sampler"]) == (
        "server RUNNING 1/1 running; models DEPLOYING 1/3 running (2 starting); sampler waiting")


def test_a_lost_deployment_whose_shutdown_hangs_still_ends_the_launcher_with_its_reason_logged():
    """Ray can hang tearing down a cluster whose control store is gone; the launcher then exits anyway."""
    script = (
        "import logging, threading\n"
        "from twinkle.server import launcher\n"
        "logging.basicConfig(level='INFO')\n"
        "launcher.LOST_SHUTDOWN_S = 0.5\n"
        "class Hung:\n"
        "    def shutdown(self):\n"
        "        threading.Event().wait()\n"
        "launcher._shutdown_lost(Hung())\n"
        "print('not reached')\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "not reached" not in done.stdout
    assert "Ray did not shut down within 0.5 s" in done.stderr
    assert time.monotonic() - started < 30


def test_a_lost_deployment_that_shuts_down_returns_to_the_caller():
    from twinkle.server import launcher

    calls = []

    class Quick:
        def shutdown(self):
            calls.append("shutdown")

    launcher._shutdown_lost(Quick())
    assert calls == ["shutdown"]
