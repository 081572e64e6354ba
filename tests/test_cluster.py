"""Deploy on a real local Ray cluster and check placement, health routes and shutdown.

The cluster has 4 fake GPUs (``ray start --head --num-gpus=4`` works on a CPU box): Ray accounts for them
and the launcher pins workers to them, while torch, seeing no CUDA, computes on the CPU. What is checked is
what the plan promises: each worker process runs with the ``CUDA_VISIBLE_DEVICES`` of its physical rank.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from _cluster import REPO, RayHead, base_env, free_port, ray_processes, terminate, wait_http

pytestmark = pytest.mark.cluster

CONFIG = """
server_type: twinkle
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: server
    route_prefix: /server
    import_path: server
    args:
  - name: models-tiny
    route_prefix: /models/tiny
    import_path: model
    args:
      model_id: builtin://tiny-qwen2
      nproc_per_node: 2
      device_group: {{name: model, ranks: [2, 3], device_type: cuda}}
      device_mesh: {{device_type: cuda, dp_size: 2}}
  - name: sampler-tiny
    route_prefix: /sampler/tiny
    import_path: sampler
    args:
      model_id: builtin://tiny-qwen2
      sampler_type: torch
      device_group: {{name: sampler, ranks: [0], device_type: cuda}}
      device_mesh: {{device_type: cuda, dp_size: 1}}
"""


def test_workers_get_their_planned_gpus(tmp_path):
    head = RayHead(num_gpus=4, num_cpus=4)
    try:
        port = free_port()
        cfg = tmp_path / "cluster.yaml"
        cfg.write_text(textwrap.dedent(CONFIG.format(port=port)))
        # The keys reach the replicas through the launcher, not the cluster's environment (ray start never saw them).
        env = head.client_env(DEVICE_COUNT_PER_PHYSICAL_NODE="4", TWINKLE_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
                              TWINKLE_API_KEYS="tml-cluster-key", TWINKLE_ADMIN_KEYS="tml-cluster-admin")
        # The cluster really requires its token: a driver without it cannot join.
        denied = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{head.address}')"],
                                env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0
        plan = subprocess.run([sys.executable, "-m", "twinkle.server", "plan", str(cfg)], env={**env, "RAY_ADDRESS": head.address},
                              capture_output=True, text=True, timeout=180)
        assert plan.returncode == 0, plan.stderr
        assert "cuda:2" in plan.stdout and "cuda:3" in plan.stdout and "cuda:0" in plan.stdout

        launch = subprocess.run(
            [sys.executable, "-m", "twinkle.server", "--config", str(cfg), "--address", head.address, "--no-wait"],
            env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path,
        )
        assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
        base = f"http://127.0.0.1:{port}"
        for prefix in ("/server", "/models/tiny", "/sampler/tiny"):
            assert wait_http(f"{base}{prefix}/healthz", 60).status_code == 200

        assert httpx.get(f"{base}/server/capabilities", headers={"X-API-Key": "tml-unknown"}).status_code == 401
        assert httpx.get(f"{base}/server/capabilities", headers={"X-API-Key": "tml-cluster-key"}).status_code == 200

        # Where workers run is for operators: the public /info does not say, the admin route does.
        assert httpx.get(f"{base}/models/tiny/info", timeout=30).json()["workers"] == []
        assert httpx.get(f"{base}/server/admin/services", headers={"X-API-Key": "tml-cluster-key"}).status_code == 403
        services = httpx.get(f"{base}/server/admin/services", headers={"X-API-Key": "tml-cluster-admin"},
                             timeout=30).json()["services"]
        workers = {s["kind"]: s["info"]["workers"] for s in services}
        model_workers = workers["model"]
        assert sorted(w["cuda_visible_devices"] for w in model_workers) == ["2", "3"]
        assert [w["cuda_visible_devices"] for w in sorted(model_workers, key=lambda w: w["rank"])] == ["2", "3"]
        sampler_workers = workers["sampler"]
        assert [w["cuda_visible_devices"] for w in sampler_workers] == ["0"]
        # Every worker is its own process, not the replica's.
        assert len({w["pid"] for w in model_workers + sampler_workers}) == 3

        # Training runs data-parallel over the two pinned workers (gloo): the loss falls.
        from twinkle_client import Datum, TwinkleClient

        with TwinkleClient(base, api_key="tml-cluster-key") as client:
            run = client.create_training_run("tiny-qwen2", rank=4, seed=0)
            data = [Datum.from_tokens([5 + i, 17, 29, 31, 37, 41, 43]) for i in range(4)]  # 2 per rank
            losses = []
            for _ in range(4):
                losses.append(run.forward_backward(data).metrics["loss:sum"])
                run.optim_step(learning_rate=1e-2)
            assert losses[-1] < losses[0]

        # Operators see the live cluster from the command line: applications, replicas, queues, adapters.
        status = subprocess.run([sys.executable, "-m", "twinkle.server", "status", "--address", head.address,
                                 "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        apps = {a["name"]: a for a in json.loads(status.stdout)["applications"]}
        assert all(a["status"] == "RUNNING" and a["replicas"] == {"RUNNING": 1} for a in apps.values()), apps
        model = next(a for a in apps.values() if (a.get("info") or {}).get("kind") == "model")
        assert model["health"]["runs"] == 1 and model["health"]["workers_alive"] == 2
        table = subprocess.run([sys.executable, "-m", "twinkle.server", "status", "--address", head.address],
                               env=env, capture_output=True, text=True, timeout=120).stdout
        assert "APPLICATION" in table and "1/1 resident" in table, table

        stop = subprocess.run([sys.executable, "-m", "twinkle.server", "stop", "--address", head.address],
                              env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base}/server/healthz", timeout=5).raise_for_status()
    finally:
        head.stop()
    deadline = time.monotonic() + 30
    while ray_processes(head.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes(head.temp_dir) == []


def test_local_deploy_starts_answers_and_stops_cleanly(tmp_path):
    """``python -m twinkle.server --config deploy/local.yaml`` with an embedded Ray, then SIGTERM; on a machine
    that has a Ray token (as after any earlier local ``ray.init``) and Ray's default auth mode, so the
    embedded Ray runs with token authentication."""
    port = free_port()
    cfg = tmp_path / "local.yaml"
    cfg.write_text((REPO / "deploy" / "local.yaml").read_text().replace("port: 8000", f"port: {port}"))
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = base_env(TWINKLE_CHECKPOINT_DIR=str(tmp_path / "ckpt"), RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_AUTH_MODE")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(cfg)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/server/healthz", 240, proc)
        startup_s = time.monotonic() - t0
        for prefix in ("/models/tiny-qwen2", "/sampler/tiny-qwen2", "/processors"):
            wait_http(f"{base}{prefix}/healthz", 60, proc)
        info = httpx.get(f"{base}/models/tiny-qwen2/info", timeout=30).json()
        assert info["model_name"] == "tiny-qwen2"
        print(f"local stack: first healthy response after {startup_s:.1f} s")
    finally:
        rc = terminate(proc, timeout_s=90)
        output = proc.stdout.read() if proc.stdout else ""
    assert rc == 0, output[-4000:]
    session_marker = "session_"  # embedded Ray processes all carry the session dir in their args
    deadline = time.monotonic() + 30
    while [p for p in ray_processes(session_marker) if "raylet" in p or "gcs_server" in p] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [p for p in ray_processes(session_marker) if "raylet" in p or "gcs_server" in p] == []
