"""One behaviour for the cases both protocols meet (``core/control.py``), pinned on both surfaces:

- an unknown run (or another key's) is 404;
- using a session its client finished is 410;
- a numbered request refused before it runs is 400, and its ``seq_id`` is released: the run's next request
  runs at once instead of failing after the Model service's gap timeout;
- a repeat of an accepted ``seq_id`` gets the first request's future.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

pytest.importorskip("tinker")

from litestar.testing import TestClient  # noqa: E402

from twinkle.common.models import TINY_MODEL_ID, served_model_name  # noqa: E402
from twinkle.server.core.ports import LocalPort  # noqa: E402
from twinkle.server.native import NativeSettings  # noqa: E402
from twinkle.server.native.testing import LocalTwinkleStack  # noqa: E402
from twinkle.server.tinker import TinkerSettings, create_tinker_app  # noqa: E402

MODEL = served_model_name(TINY_MODEL_ID)
KEY, OTHER = "tml-shared-a", "tml-shared-b"
SEQ = [11, 12, 13, 14, 15]
# Long enough that a seq_id left unreleased would fail the next request instead of letting it run.
GAP_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def tinker(tmp_path_factory):
    from twinkle.model.service import ModelService
    from twinkle.sampler.service import SamplerService

    root = tmp_path_factory.mktemp("tinker")
    model, sampler = ModelService(TINY_MODEL_ID, gap_timeout_s=GAP_TIMEOUT_S), SamplerService(TINY_MODEL_ID)
    app = create_tinker_app(TinkerSettings(checkpoint_dir=str(root / "ckpt"), api_keys=[KEY, OTHER]),
                            {MODEL: LocalPort(model)}, {MODEL: LocalPort(sampler)}, path_prefix="/api/v1")
    with TestClient(app) as client:
        yield client
    with contextlib.suppress(Exception):
        asyncio.run(model.close())


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    settings = NativeSettings(checkpoint_dir=str(root / "ckpt"), api_keys=[KEY, OTHER])
    with LocalTwinkleStack(settings, TINY_MODEL_ID, model_kwargs={"gap_timeout_s": GAP_TIMEOUT_S}) as stack:
        with httpx.Client(base_url=stack.base_url, timeout=120) as client:
            yield client


def _t(client, path, body, key=KEY):
    return client.post(f"/api/v1/{path}", json=body, headers={"X-API-Key": key})


def _t_result(client, request_id):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = _t(client, "retrieve_future", {"request_id": request_id}).json()
        if out.get("type") != "try_again":
            return out
    raise TimeoutError(request_id)


def _n(client, method, path, key=KEY, **kw):
    return client.request(method, path, headers={"X-API-Key": key}, **kw)


def _n_done(client, request_id):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = _n(client, "GET", f"/server/futures/{request_id}", params={"timeout": 5}).json()
        if out["status"] != "pending":
            return out
    raise TimeoutError(request_id)


def _datum():
    return {"model_input": SEQ[:-1], "loss_fn_inputs": {"target_tokens": {"data": SEQ[1:], "dtype": "int64"},
                                                        "weights": {"data": [1.0] * (len(SEQ) - 1)}}}


def _t_run(client):
    sid = _t(client, "create_session", {"tags": []}).json()["session_id"]
    fut = _t(client, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                      "lora_config": {"rank": 4}}).json()
    assert "error" not in _t_result(client, fut["request_id"])
    return sid, fut["model_id"]


def _n_run(client, **body):
    ref = _n(client, "POST", "/server/training_runs", json={"base_model": MODEL, "lora": {"rank": 4}, **body}).json()
    return _n_done(client, ref["request_id"])["result"]["run_id"]


# ------------------------------------------------------------------------------------------ unknown run


def test_an_unknown_or_foreign_run_is_404_on_both(tinker, native):
    _, mine = _t_run(tinker)
    for model_id in ("nobody:train:0", mine):
        r = _t(tinker, "get_info", {"model_id": model_id}, key=OTHER if model_id == mine else KEY)
        assert r.status_code == 404, r.text
    run = _n_run(native)
    assert _n(native, "GET", "/server/training_runs/run-0000000000000000").status_code == 404
    assert _n(native, "GET", f"/server/training_runs/{run}", key=OTHER).status_code == 404
    r = _n(native, "POST", f"/models/{MODEL}/runs/{run}/save", key=OTHER, json={"name": "x", "seq_id": 1})
    assert r.status_code == 404


# ------------------------------------------------------------------------------------------ finished session


def test_a_finished_session_is_410_on_both(tinker, native):
    sid = _t(tinker, "create_session", {"tags": []}).json()["session_id"]
    assert _t(tinker, f"sessions/{sid}/finish", {"reason": {"type": "success"}}).status_code == 200
    assert _t(tinker, "session_heartbeat", {"session_id": sid}).status_code == 410
    r = _t(tinker, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL})
    assert r.status_code == 410 and "finished" in r.json()["detail"]

    sid = _n(native, "POST", "/server/sessions", json={}).json()["session_id"]
    assert _n(native, "POST", f"/server/sessions/{sid}/finish").status_code == 200
    assert _n(native, "POST", f"/server/sessions/{sid}/heartbeat").status_code == 410
    r = _n(native, "POST", "/server/training_runs", json={"base_model": MODEL, "session_id": sid})
    assert r.status_code == 410 and r.json()["field"] == "session_id"


# ------------------------------------------------------------------------------------------ refused seq_id


def test_a_refused_seq_id_is_released_on_both(tinker, native):
    _, model_id = _t_run(tinker)
    r = _t(tinker, "save_weights", {"model_id": model_id, "path": "../escape", "seq_id": 1})
    assert r.status_code == 400
    step = _t(tinker, "optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}})
    assert "error" not in _t_result(tinker, step.json()["request_id"])  # ran at once: seq 1 was released

    run = _n_run(native)
    r = _n(native, "POST", f"/models/{MODEL}/runs/{run}/save", json={"name": "../escape", "seq_id": 1})
    assert r.status_code == 400 and r.json()["field"] == "name"
    r = _n(native, "POST", f"/models/{MODEL}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 2})
    assert r.status_code == 200, r.text


def test_a_repeated_seq_id_gets_the_first_future_on_both(tinker, native):
    _, model_id = _t_run(tinker)
    body = {"model_id": model_id, "path": "twice", "seq_id": 1}
    first, again = _t(tinker, "save_weights", body).json(), _t(tinker, "save_weights", body).json()
    assert first["request_id"] == again["request_id"]
    assert "error" not in _t_result(tinker, first["request_id"])
    assert _t(tinker, "save_weights", body).json()["request_id"] == first["request_id"]  # even after it ran

    run = _n_run(native)
    body = {"name": "twice", "seq_id": 1}
    first = _n(native, "POST", f"/models/{MODEL}/runs/{run}/save", json=body).json()
    assert _n_done(native, first["request_id"])["status"] == "done"
    again = _n(native, "POST", f"/models/{MODEL}/runs/{run}/save", json=body).json()
    assert again["request_id"] == first["request_id"]
