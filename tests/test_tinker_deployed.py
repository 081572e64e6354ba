"""The official ``tinker`` SDK against ``deploy/local-tinker.yaml`` deployed on Ray Serve.

The same acceptance suite that runs in-process (packages/twinkle-gateway/tests/test_tinker_sdk.py) runs
here against the real deployment: Serve proxy, the gateway replica, the model and sampler replicas reached
through deployment handles, the SQLite store.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from _cluster import REPO, base_env, free_port, terminate, wait_http

pytestmark = pytest.mark.acceptance

MAX_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker-deployed")
    port = free_port()
    text = (REPO / "deploy" / "local-tinker.yaml").read_text().replace("port: 8000", f"port: {port}")
    text = text.replace("    import_path: server\n    args:\n",
                        f"    import_path: server\n    args:\n      max_body_bytes: {MAX_BODY}\n", 1)
    cfg = root / "local-tinker.yaml"
    cfg.write_text(text)
    env = base_env(TWINKLE_CHECKPOINT_DIR=str(root / "ckpt"))
    proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(cfg)], env=env, cwd=root,
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/v1/healthz", 300, proc)
        for prefix in ("/api/v1/model/tiny-qwen2", "/api/v1/sampler/tiny-qwen2"):
            wait_http(f"{base}{prefix}/healthz", 120, proc)
        yield base, env, root
    finally:
        terminate(proc, timeout_s=90)


def test_official_sdk_suite_against_the_ray_serve_deployment(deployed):
    base, env, root = deployed
    suite = REPO / "packages" / "twinkle-gateway" / "tests" / "test_tinker_sdk.py"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts="
         "--import-mode=importlib", "-o", "testpaths="],
        env={**env, "TWINKLE_TEST_BASE_URL": base, "TWINKLE_TEST_MAX_BODY_BYTES": str(MAX_BODY),
             "TWINKLE_TEST_OLD_TINKER_PYTHONS": ""},
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail + "\n--- server log ---\n" + (root / "server.log").read_text()[-6000:]
    assert " passed" in run.stdout
    print(run.stdout.strip().splitlines()[-1])
