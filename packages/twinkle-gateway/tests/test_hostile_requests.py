"""Requests a careless or hostile tenant may send to the Tinker app: each earns its sender a clear 4xx naming
the field, allocates nothing large, stores nothing unreadable, and leaves the run (and every other key)
working."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest

pytest.importorskip("tinker")

from litestar.testing import TestClient  # noqa: E402

from twinkle.common.models import TINY_MODEL_ID, served_model_name  # noqa: E402
from twinkle.server.core.ports import LocalPort  # noqa: E402
from twinkle.server.tinker import TinkerSettings, create_tinker_app  # noqa: E402
from twinkle.server.tinker.proto import DTYPE_FLOAT32, ForwardBackwardRequestPb  # noqa: E402

MODEL = served_model_name(TINY_MODEL_ID)
A, B = "tml-hostile-a", "tml-hostile-b"
PROTO = "application/x-protobuf"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from twinkle.model.service import ModelService
    from twinkle.sampler.service import SamplerService

    root = tmp_path_factory.mktemp("hostile")
    model, sampler = ModelService(TINY_MODEL_ID, gap_timeout_s=60.0), SamplerService(TINY_MODEL_ID)
    app = create_tinker_app(TinkerSettings(checkpoint_dir=str(root / "ckpt"), api_keys=[A, B]),
                            {MODEL: LocalPort(model)}, {MODEL: LocalPort(sampler)}, path_prefix="/api/v1")
    with TestClient(app) as c:
        yield c
    with contextlib.suppress(Exception):
        asyncio.run(model.close())


def _post(client, path, body=None, key=A, **kw):
    return client.post(f"/api/v1/{path}", json=body, headers={"X-API-Key": key, **kw.pop("headers", {})}, **kw)


def _result(client, request_id, key=A):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = _post(client, "retrieve_future", {"request_id": request_id}, key=key).json()
        if out.get("type") != "try_again":
            return out
    raise TimeoutError(request_id)


def _run(client, key=A):
    sid = _post(client, "create_session", {}, key=key).json()["session_id"]
    fut = _post(client, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                         "lora_config": {"rank": 4}}, key=key).json()
    assert "error" not in _result(client, fut["request_id"], key)
    return sid, fut["model_id"]


def _still_trains(client, model_id, seq_id):
    step = _post(client, "optim_step", {"model_id": model_id, "seq_id": seq_id, "adam_params": {}}).json()
    assert "metrics" in _result(client, step["request_id"]), step


def test_a_huge_sparse_tensor_is_refused_by_its_shape_before_expansion(client):
    _, mid = _run(client)
    msg = ForwardBackwardRequestPb(model_id=mid, seq_id=1, loss_fn="cross_entropy")
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = np.array([1, 2], dtype="<i4").tobytes()
    t = datum.loss_fn_inputs["weights"]
    t.dtype = DTYPE_FLOAT32
    t.shape.extend([1, 300_000_000])
    t.sparse_csr.crow_indices = np.array([0, 0], dtype="<i8").tobytes()
    started = time.monotonic()
    r = client.post("/api/v1/forward_backward", content=msg.SerializeToString(),
                    headers={"X-API-Key": A, "Content-Type": PROTO})
    assert r.status_code == 400 and "max_tensor_elements" in r.json()["detail"], r.text
    assert time.monotonic() - started < 5  # refused from the shape, never expanded
    body = {"model_id": mid, "seq_id": 2, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [{"tokens": [1, 2]}]},
        "loss_fn_inputs": {"weights": {"data": [], "dtype": "float32", "shape": [1, 300_000_000],
                                       "sparse_crow_indices": [0, 0], "sparse_col_indices": []}}}]}}
    r = _post(client, "forward_backward", body)
    assert r.status_code == 400 and "max_tensor_elements" in r.json()["detail"], r.text
    _still_trains(client, mid, 3)  # both refused seq_ids were released


def test_out_of_range_numbers_are_400_naming_the_field(client):
    _, mid = _run(client)
    for path, body in (("optim_step", {"model_id": mid, "seq_id": 2**63, "adam_params": {}}),
                       ("save_weights", {"model_id": mid, "seq_id": 2**63, "path": "x"})):
        r = _post(client, path, body)
        assert r.status_code == 400 and "seq_id" in r.json()["detail"], r.text
    body = {"model_id": mid, "seq_id": 1, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [{
        "model_input": {"chunks": [{"tokens": [1, 2]}]},
        "loss_fn_inputs": {"target_tokens": {"data": [-1e308, 3], "dtype": "int64"}}}]}}
    r = _post(client, "forward_backward", body)
    assert r.status_code == 400 and "target_tokens" in r.json()["detail"], r.text
    _still_trains(client, mid, 2)


def test_oversized_metadata_and_tags_are_refused_and_nothing_unreadable_is_stored(client):
    r = _post(client, "create_session", {"user_metadata": {"k": "x" * 100_000}})
    assert r.status_code == 400 and "user_metadata" in r.json()["detail"]
    r = _post(client, "create_session", {"tags": ["t"] * 1000})
    assert r.status_code == 400 and "tags" in r.json()["detail"]
    sid, mid = _run(client)
    r = _post(client, "create_model", {"session_id": sid, "model_seq_id": 1, "base_model": MODEL,
                                       "user_metadata": {"k": "x" * 100_000}})
    assert r.status_code == 400 and "user_metadata" in r.json()["detail"]
    saved = _post(client, "save_weights", {"model_id": mid, "seq_id": 1, "path": "keep"}).json()
    assert "error" not in _result(client, saved["request_id"])
    r = client.put(f"/api/v1/training_runs/{mid}/checkpoints/weights/keep/ttl", json={"ttl_seconds": 2**63},
                   headers={"X-API-Key": A})
    assert r.status_code == 400 and "ttl_seconds" in r.json()["detail"]
    assert client.get("/api/v1/checkpoints", headers={"X-API-Key": A}).status_code == 200
    assert client.get("/api/v1/training_runs", headers={"X-API-Key": A}).status_code == 200


def test_unpublishing_revokes_other_keys_sampling_sessions(client):
    sid, mid = _run(client)
    saved = _post(client, "save_weights_for_sampler", {"model_id": mid, "seq_id": 1, "path": "shared"}).json()
    uri = _result(client, saved["request_id"])["path"]
    assert client.post(f"/api/v1/training_runs/{mid}/checkpoints/sampler_weights/shared/publish",
                       headers={"X-API-Key": A}).status_code == 204
    other_sid = _post(client, "create_session", {}, key=B).json()["session_id"]
    ss = _post(client, "create_sampling_session", {"session_id": other_sid, "sampling_session_seq_id": 0,
                                                   "model_path": uri}, key=B).json()["sampling_session_id"]
    body = {"sampling_session_id": ss, "prompt": {"chunks": [{"tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2}, "num_samples": 1}
    ok = _post(client, "asample", {**body, "seq_id": 0}, key=B).json()
    assert "sequences" in _result(client, ok["request_id"], key=B)
    assert client.delete(f"/api/v1/training_runs/{mid}/checkpoints/sampler_weights/shared/publish",
                         headers={"X-API-Key": A}).status_code == 204
    r = _post(client, "asample", {**body, "seq_id": 1}, key=B)
    assert r.status_code == 404, r.text  # the session no longer reads the unpublished checkpoint
