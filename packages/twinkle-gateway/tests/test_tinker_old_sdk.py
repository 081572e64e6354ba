"""Older official SDKs against the server: ``tinker==0.16.1`` (JSON requests and results, no client/config,
``POST /forward``) and ``tinker==0.24.1`` (client/config, protobuf results accepted but JSON still understood).

They cannot share a virtualenv with the current SDK, so each runs in its own interpreter: a virtualenv
per version, created on first use under ``$TWINKLE_CACHE_DIR/sdk-venvs`` (pip, from the package index), or
the interpreters listed in ``TWINKLE_TEST_OLD_TINKER_PYTHONS`` (comma-separated). A version whose venv cannot
be built (no package index) is skipped with that reason. ``TWINKLE_TEST_BASE_URL`` points the test at a
deployed server instead of the in-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.acceptance

OLD_VERSIONS = ("0.16.1", "0.24.1")  # JSON-era requests and results; protobuf results but JSON still read
_GIVEN = os.environ.get("TWINKLE_TEST_OLD_TINKER_PYTHONS")
OLD_PYTHONS = [p.strip() for p in _GIVEN.split(",") if p.strip()] if _GIVEN is not None else list(OLD_VERSIONS)
BASE_URL = os.environ.get("TWINKLE_TEST_BASE_URL")
KEY = os.environ.get("TWINKLE_TEST_API_KEYS", "tml-old-sdk").split(",")[0].strip()

SCRIPT = r'''
import json, math, sys
import tinker
from tinker import types

base_url, key = sys.argv[1], sys.argv[2]
SEQ = [101, 202, 303, 404, 505, 606, 707, 808, 909, 1001, 1102, 1203]
datum = types.Datum(model_input=types.ModelInput.from_ints(SEQ[:-1]),
                    loss_fn_inputs={"target_tokens": SEQ[1:], "weights": [1.0] * (len(SEQ) - 1)})
sc = tinker.ServiceClient(base_url=base_url, api_key=key)
caps = sc.get_server_capabilities()
base = [m.model_name for m in caps.supported_models][0]
tc = sc.create_lora_training_client(base_model=base, rank=8, seed=0)
losses = []
for _ in range(6):
    fb = tc.forward_backward([datum], "cross_entropy")
    op = tc.optim_step(types.AdamParams(learning_rate=3e-3))
    losses.append(fb.result().metrics["loss:sum"])
    op.result()
fwd = tc.forward([datum], "cross_entropy").result()
trainer_lp = fwd.loss_fn_outputs[0]["logprobs"].tolist()
path = tc.save_state("old-sdk").result().path
sampler = tc.save_weights_and_get_sampling_client("old-sdk-sampler")
res = sampler.sample(types.ModelInput.from_ints(SEQ[:4]), num_samples=2,
                     sampling_params=types.SamplingParams(max_tokens=4, temperature=0.0)).result()
lp = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ)).result()
resumed = sc.create_training_client_from_state(path)
resumed_lp = resumed.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
rc = sc.create_rest_client()
ckpts = [c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints]
rc.delete_checkpoint(tc.model_id, "weights/old-sdk").result()
after = [c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints]
print(json.dumps({
    "version": tinker.__version__ if hasattr(tinker, "__version__") else "?",
    "losses": losses, "trainer_lp": trainer_lp, "prompt_lp": lp, "resumed_lp": resumed_lp,
    "samples": [s.tokens for s in res.sequences], "sample_lp": [s.logprobs for s in res.sequences],
    "path": path, "ckpts": ckpts, "after": after,
}))
'''


def _sdk_python(version_or_path: str) -> str:
    """An interpreter with that tinker version: an explicit path, or a cached venv built on first use."""
    if os.sep in version_or_path:
        if not os.path.exists(version_or_path):
            pytest.skip(f"no interpreter at {version_or_path}")
        return version_or_path
    from twinkle.common.env import cache_dir

    venv = os.path.join(cache_dir(), "sdk-venvs", f"tinker-{version_or_path}")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".complete")):
        build = subprocess.run(
            f"{sys.executable} -m venv --clear {venv} && {python} -m pip install -q tinker=={version_or_path}",
            shell=True, capture_output=True, text=True, timeout=600)
        if build.returncode != 0:
            pytest.skip(f"cannot build a venv with tinker=={version_or_path}: {build.stderr[-500:]}")
        open(os.path.join(venv, ".complete"), "w").close()
    return python


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    if not OLD_PYTHONS:
        pytest.skip("TWINKLE_TEST_OLD_TINKER_PYTHONS is empty")
    if BASE_URL:
        yield BASE_URL.rstrip("/")
        return
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    root = tmp_path_factory.mktemp("tinker-old")
    with LocalTinkerServer(TinkerSettings(checkpoint_dir=str(root / "ckpt")), TINY_MODEL_ID) as server:
        yield server.base_url


@pytest.mark.parametrize("python", OLD_PYTHONS)
def test_older_sdk_end_to_end(base_url, python):
    python = _sdk_python(python)
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('tinker'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([python, "-c", SCRIPT, base_url, KEY], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TINKER_TELEMETRY": "0"})
    assert proc.returncode == 0, f"tinker {version} failed:\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"tinker {version}: losses {out['losses']}", file=sys.stderr)
    assert out["losses"][-1] < out["losses"][0]
    assert len(out["trainer_lp"]) == 11
    prompt_lp = out["prompt_lp"]
    assert prompt_lp[0] is None
    assert max(abs(a - b) for a, b in zip(prompt_lp[1:], out["trainer_lp"])) < 2e-3
    assert out["resumed_lp"] == pytest.approx(out["trainer_lp"], abs=1e-5)
    assert out["samples"][0] == out["samples"][1] and len(out["samples"][0]) == 4
    assert all(len(lp) == 4 for lp in out["sample_lp"])
    assert out["path"].startswith("tinker://") and out["path"].endswith("/weights/old-sdk")
    assert "weights/old-sdk" in out["ckpts"] and "weights/old-sdk" not in out["after"]
