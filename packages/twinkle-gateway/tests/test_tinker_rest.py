"""The Tinker app over HTTP (Litestar's test client) with the real Model and Sampler services in-process.

Covers the wire details the SDK depends on (status codes, JSON vs protobuf results, futures, dedupe, errors,
durability) with raw requests, so each rule is checked on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time

import msgspec
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
zstandard = pytest.importorskip("zstandard")

from litestar.testing import TestClient  # noqa: E402
from tinker import types  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from twinkle.common.models import TINY_MODEL_ID, served_model_name  # noqa: E402
from twinkle.server.auth import principal_id  # noqa: E402
from twinkle.server.core.ports import LocalPort  # noqa: E402
from twinkle.server.core.state import FutureRecord, Store  # noqa: E402
from twinkle.server.tinker import TinkerSettings, create_tinker_app  # noqa: E402

MODEL = served_model_name(TINY_MODEL_ID)
A, B = "tml-rest-alice", "tml-rest-bob"
PROTO = "application/x-protobuf"
TOKENS = [101, 202, 303, 404, 505, 606, 707, 808]


@pytest.fixture(scope="module")
def services():
    from twinkle.model.service import ModelService
    from twinkle.sampler.service import SamplerService

    model = ModelService(TINY_MODEL_ID, gap_timeout_s=60.0)
    sampler = SamplerService(TINY_MODEL_ID)
    yield model, sampler
    with contextlib.suppress(Exception):
        asyncio.run(model.close())
    with contextlib.suppress(Exception):
        asyncio.run(sampler.close())


def _app(services, tmp_path, **settings):
    model, sampler = services
    settings.setdefault("checkpoint_dir", str(tmp_path / "ckpt"))
    settings.setdefault("state_db", str(tmp_path / "state.sqlite"))
    return create_tinker_app(TinkerSettings(**settings), {MODEL: LocalPort(model)}, {MODEL: LocalPort(sampler)},
                             path_prefix="/api/v1")


class Api:
    """Raw HTTP calls as one API key."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.key = client, key

    def post(self, path, json=None, **kw):
        headers = {"X-API-Key": self.key, **kw.pop("headers", {})}
        return self.client.post(f"/api/v1/{path}", json=json, headers=headers, **kw)

    def get(self, path, **kw):
        return self.client.get(f"/api/v1/{path}", headers={"X-API-Key": self.key}, **kw)

    def delete(self, path):
        return self.client.delete(f"/api/v1/{path}", headers={"X-API-Key": self.key})

    def put(self, path, json):
        return self.client.put(f"/api/v1/{path}", json=json, headers={"X-API-Key": self.key})

    def ok(self, path, json=None, **kw):
        r = self.post(path, json, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def result(self, request_id, proto=False, timeout=60.0):
        headers = {"Accept": PROTO} if proto else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.post("retrieve_future", {"request_id": request_id, "allow_metadata_only": True},
                          headers=headers)
            assert r.status_code == 200, r.text
            if r.headers["content-type"].startswith(PROTO):
                return r.content
            body = r.json()
            if body.get("type") != "try_again":
                return body
        raise TimeoutError(request_id)

    def session(self):
        return self.ok("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "test",
                                          "type": "create_session"})["session_id"]

    def model(self, session_id, seq=0, rank=4):
        fut = self.ok("create_model", {"session_id": session_id, "model_seq_id": seq, "base_model": MODEL,
                                       "lora_config": {"rank": rank}, "type": "create_model"})
        assert isinstance(fut["request_id"], str)
        res = self.result(fut["request_id"])
        assert res == {"type": "create_model", "model_id": f"{session_id}:train:{seq}"}, res
        return res["model_id"]

    def fwdbwd(self, model_id, seq_id, data=None, loss_fn="cross_entropy", forward_only=False, config=None):
        req = types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=data or [_datum()], loss_fn=loss_fn,
                                                              loss_fn_config=config),
            model_id=model_id, seq_id=seq_id)
        msg = forward_backward_request_to_proto(req)
        msg.forward_only = forward_only
        return self.post("forward_backward", content=msg.SerializeToString(), headers={"Content-Type": PROTO})

    def optim(self, model_id, seq_id, lr=1e-3):
        return self.ok("optim_step", {"model_id": model_id, "seq_id": seq_id, "type": "optim_step",
                                      "adam_params": {"learning_rate": lr}})


def _datum(tokens=TOKENS, weights=None):
    n = len(tokens) - 1
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights or [1.0] * n})


@pytest.fixture
def app_client(services, tmp_path):
    with TestClient(_app(services, tmp_path)) as client:
        yield client


@pytest.fixture
def alice(app_client):
    return Api(app_client, A)


@pytest.fixture
def bob(app_client):
    return Api(app_client, B)


# ------------------------------------------------------------------------------------------ handshake


def test_handshake_and_session_lifecycle(alice, bob):
    assert alice.ok("client/config", {"sdk_version": "0.38.0"})["proto_compress_fwdbwd"] is True
    assert alice.ok("client/dynamic_config", {"sdk_version": "0.38.0"})["refresh_interval_sec"] == 300
    sid = alice.session()
    assert alice.ok("session_heartbeat", {"session_id": sid, "type": "session_heartbeat"}) == {
        "type": "session_heartbeat"}
    assert bob.post("session_heartbeat", {"session_id": sid}).status_code == 404
    assert alice.ok("telemetry", {"events": [{"event": "SESSION_START"}], "platform": "x"}) == {"status": "accepted"}
    caps = alice.get("get_server_capabilities").json()
    assert caps["supported_models"] == [
        {"model_name": MODEL, "max_context_length": 2048, "trainable": True, "sampleable": True}]
    assert caps["limits"]["max_num_samples"] == 128 and caps["limits"]["max_datums"] > 0  # advertised limits
    assert bob.post(f"sessions/{sid}/finish", {"reason": {"type": "success"}}).status_code == 404
    assert alice.ok(f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None}) == {}
    r = alice.post("session_heartbeat", {"session_id": sid})
    assert r.status_code == 410 and "finished" in r.json()["detail"]
    assert alice.get("sessions").json() == {"sessions": [sid]}
    assert bob.get("sessions").json() == {"sessions": []}
    assert alice.get(f"sessions/{sid}").json()["training_run_ids"] == []
    assert bob.get(f"sessions/{sid}").status_code == 404
    # a finished session takes no new clients: 410, as for its heartbeat (the native protocol says the same)
    r = alice.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL})
    assert r.status_code == 410 and "finished" in r.json()["detail"]


# ------------------------------------------------------------------------------------------ training


def test_training_futures_proto_and_json(alice, bob):
    sid = alice.session()
    mid = alice.model(sid)
    info = alice.ok("get_info", {"model_id": mid, "type": "get_info"})
    assert info["model_data"]["model_name"] == MODEL and info["lora_rank"] == 4
    assert bob.post("get_info", {"model_id": mid}).status_code == 404

    fut = alice.fwdbwd(mid, 1).json()
    assert fut["model_id"] == mid
    out = deserialize_forward_backward_output(alice.result(fut["request_id"], proto=True))
    assert len(out.loss_fn_outputs) == 1 and len(out.loss_fn_outputs[0]["logprobs"].data) == len(TOKENS) - 1
    assert "loss:sum" in out.metrics
    # the same result as JSON, for clients that do not accept protobuf (pre-0.18 SDKs)
    as_json = alice.result(fut["request_id"])
    assert np.allclose(as_json["loss_fn_outputs"][0]["logprobs"]["data"], out.loss_fn_outputs[0]["logprobs"].data)
    assert as_json["metrics"]["loss:sum"] == pytest.approx(out.metrics["loss:sum"])
    # another principal cannot read it; an unknown id is a terminal 404
    assert bob.post("retrieve_future", {"request_id": fut["request_id"]}).status_code == 404
    r = alice.post("retrieve_future", {"request_id": "req-nope"})
    assert r.status_code == 404 and "req-nope" in r.json()["detail"]

    opt = alice.optim(mid, 2)
    assert set(alice.result(opt["request_id"])["metrics"]) >= {"learning_rate:mean"}


def test_dedupe_and_out_of_order_chunks(alice):
    mid = alice.model(alice.session())
    # chunk 2 first, chunk 1 last (as the SDK sends them); then optim before any result is read
    second = alice.fwdbwd(mid, 2).json()["request_id"]
    first = alice.fwdbwd(mid, 1).json()["request_id"]
    opt = alice.optim(mid, 3)["request_id"]
    # a retried submission (new idempotency key, same seq_id) gets the first request id
    assert alice.fwdbwd(mid, 1).json()["request_id"] == first
    assert alice.optim(mid, 3)["request_id"] == opt
    for rid in (first, second):
        assert "loss:sum" in deserialize_forward_backward_output(alice.result(rid, proto=True)).metrics
    assert alice.result(opt)["metrics"]["step:max"] == 1.0


def test_user_errors_fail_the_future_and_leave_the_run_usable(alice):
    mid = alice.model(alice.session())
    bad_len = alice.fwdbwd(mid, 1, data=[_datum(weights=[1.0, 1.0])]).json()
    failed = alice.result(bad_len["request_id"], proto=True)
    assert failed["category"] == "user" and "weights" in failed["error"]
    unknown = alice.fwdbwd(mid, 2, loss_fn="cross_entropy", config={"bogus": 1.0}).json()
    assert alice.result(unknown["request_id"], proto=True)["category"] == "user"
    t0 = time.monotonic()
    ok = alice.fwdbwd(mid, 3).json()
    assert "loss:sum" in deserialize_forward_backward_output(alice.result(ok["request_id"], proto=True)).metrics
    assert time.monotonic() - t0 < 20


def test_gateway_rejections_release_the_seq_id(alice):
    """A request refused at submit (400) still consumes its seq_id, so the next one runs at once instead of
    waiting for the Model service's gap timeout."""
    mid = alice.model(alice.session())
    r = alice.post("save_weights", {"model_id": mid, "path": "../escape", "seq_id": 1})
    assert r.status_code == 400 and "invalid checkpoint name" in r.json()["detail"]
    r = alice.post("optim_step", {"model_id": mid, "seq_id": 2, "adam_params": {"learning_rate": "fast"}})
    assert r.status_code == 400 and "adam_params.learning_rate" in r.json()["detail"]
    r = alice.post("optim_step", {"model_id": mid, "seq_id": 3, "optimizer_params": {"type": "dimuon"}})
    assert r.status_code == 400 and "dimuon" in r.json()["detail"]
    msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[], loss_fn="cross_entropy"), model_id=mid, seq_id=4))
    msg.data.add().model_input.add().image.data = b"png"
    r = alice.post("forward_backward", content=msg.SerializeToString(), headers={"Content-Type": PROTO})
    assert r.status_code == 400 and "image chunks" in r.json()["detail"]
    t0 = time.monotonic()
    fut = alice.fwdbwd(mid, 5).json()
    assert "loss:sum" in deserialize_forward_backward_output(alice.result(fut["request_id"], proto=True)).metrics
    assert time.monotonic() - t0 < 15  # the service's gap timeout is 60 s here


def test_big_bodies_are_decoded_off_the_loop(alice):
    """Over 1 MiB the protobuf data is decoded in a worker thread; its errors still name the field and release
    the seq_id, and the Model service still judges the content."""
    mid = alice.model(alice.session())
    long = types.Datum(model_input=types.ModelInput.from_ints([7] * 300_000),
                       loss_fn_inputs={"target_tokens": np.full(300_000, 7, dtype=np.int64)})
    msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[long], loss_fn="cross_entropy"), model_id=mid, seq_id=1))
    assert msg.ByteSize() > 1 << 20
    msg.data.add().model_input.add().image.data = b"png"
    r = alice.post("forward_backward", content=msg.SerializeToString(), headers={"Content-Type": PROTO})
    assert r.status_code == 400 and "data[1].model_input.chunks[0]" in r.json()["detail"]
    del msg.data[1]
    msg.seq_id = 2
    r = alice.post("forward_backward", content=msg.SerializeToString(), headers={"Content-Type": PROTO})
    failed = alice.result(r.json()["request_id"], proto=True)
    assert failed["category"] == "user" and "data[0]" in failed["error"]
    ok = alice.fwdbwd(mid, 3).json()
    assert "loss:sum" in deserialize_forward_backward_output(alice.result(ok["request_id"], proto=True)).metrics


@pytest.mark.parametrize("body, where", [
    ({"session_id": 5, "model_seq_id": 0, "base_model": MODEL}, "session_id"),
    ({"model_seq_id": 0, "base_model": MODEL}, "session_id"),
    ({"session_id": "s", "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": "big"}},
     "lora_config.rank"),
])
def test_validation_errors_name_the_field(alice, body, where):
    r = alice.post("create_model", body)
    assert r.status_code == 400
    assert where in r.json()["detail"] and "create_model" in r.json()["detail"]


def test_bad_requests_get_clear_messages(alice):
    sid = alice.session()
    r = alice.post("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": "Qwen/Qwen3-8B"})
    assert r.status_code == 400 and "unknown base_model 'Qwen/Qwen3-8B'" in r.json()["detail"]
    r = alice.post("create_model", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"]
    r = alice.post("forward_backward", content=b"\x00garbage", headers={"Content-Type": PROTO})
    assert r.status_code == 400 and "ForwardBackwardRequest" in r.json()["detail"]
    r = alice.post("no_such_route", {})
    assert r.status_code == 404 and "no such endpoint" in r.json()["detail"]
    r = alice.post("load_weights", {"session_id": sid, "model_seq_id": 1, "path": "/etc/passwd", "optimizer": True})
    assert r.status_code == 400 and "tinker://" in r.json()["detail"]
    r = alice.post("load_weights", {"session_id": sid, "model_seq_id": 1, "optimizer": True,
                                    "path": "tinker://x:train:0/weights/../../etc"})
    assert r.status_code == 400
    r = alice.post("load_weights", {"session_id": sid, "model_seq_id": 1, "optimizer": True,
                                    "path": "tinker://x:train:0/weights/nope"})
    assert r.status_code == 404 and "not found" in r.json()["detail"]


def test_json_era_clients(alice):
    """Pre-0.25 SDKs: JSON forward_backward, POST /forward, chunks without ``type``, explicit nulls."""
    sid = alice.ok("create_session", {"tags": [], "user_metadata": None, "sdk_version": "0.3.0"})["session_id"]
    fut = alice.ok("create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                    "user_metadata": None, "lora_config": {"rank": 4, "seed": None}})
    mid = alice.result(fut["request_id"])["model_id"]
    datum = {"model_input": {"chunks": [{"tokens": TOKENS[:-1]}]},
             "loss_fn_inputs": {"target_tokens": {"data": TOKENS[1:], "dtype": "int64", "shape": [7]},
                                "weights": {"data": [1.0] * 7, "dtype": "float32"}}}
    fb = alice.ok("forward_backward", {"forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy",
                                                                  "loss_fn_config": None},
                                       "model_id": mid, "seq_id": 1})
    out = alice.result(fb["request_id"])
    assert len(out["loss_fn_outputs"][0]["logprobs"]["data"]) == 7 and "loss:sum" in out["metrics"]
    fwd = alice.ok("forward", {"forward_input": {"data": [datum], "loss_fn": "cross_entropy"}, "model_id": mid,
                               "seq_id": 2})
    assert alice.result(fwd["request_id"])["loss_fn_outputs"][0]["logprobs"]["data"] == pytest.approx(
        out["loss_fn_outputs"][0]["logprobs"]["data"])
    opt = alice.ok("optim_step", {"adam_params": {"learning_rate": 0.0001}, "model_id": mid, "seq_id": 3})
    assert "metrics" in alice.result(opt["request_id"])
    ss = alice.ok("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "base_model": MODEL, "model_path": None})
    smp = alice.ok("asample", {"num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS[:3]}]},
                               "sampling_params": {"max_tokens": 4}, "sampling_session_id": ss["sampling_session_id"],
                               "seq_id": 0, "prompt_logprobs": None, "topk_prompt_logprobs": 0})
    res = alice.result(smp["request_id"])
    assert res["type"] == "sample" and len(res["sequences"][0]["tokens"]) <= 4
    assert res["sequences"][0]["stop_reason"] in ("stop", "length")


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_dedupe_ids_and_prompt_logprobs(alice, bob):
    sid = alice.session()
    ss = alice.ok("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "base_model": MODEL})["sampling_session_id"]
    assert ss == f"{sid}:sample:0"
    assert alice.get(f"samplers/{ss}").json() == {"sampler_id": ss, "base_model": MODEL, "model_path": None}
    assert bob.get(f"samplers/{ss}").status_code == 404
    body = {"num_samples": 3, "prompt": {"chunks": [{"tokens": TOKENS[:4], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 3, "temperature": 0.0, "top_k": -1, "top_p": 1.0},
            "sampling_session_id": ss, "seq_id": 0, "prompt_logprobs": True, "topk_prompt_logprobs": 0,
            "type": "sample"}
    fut = alice.ok("asample", body)
    ids = fut["sample_sequence_ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    again = alice.ok("asample", body)  # backpressure resubmit: same seq_id, same request, same ids
    assert again == fut
    assert bob.post("asample", body).status_code == 404
    res = deserialize_sample_response(alice.result(fut["request_id"], proto=True))
    assert len(res.sequences) == 3
    assert all(s.logprobs is not None and len(s.logprobs) == len(s.tokens) for s in res.sequences)
    assert res.sequences[0].tokens == res.sequences[1].tokens  # greedy
    assert len(res.prompt_logprobs) == 4 and (res.prompt_logprobs[0] is None or math.isnan(res.prompt_logprobs[0]))
    r = alice.post("asample", {**body, "seq_id": 1, "topk_prompt_logprobs": 1000})
    assert r.status_code == 200  # refused by the sampler, as a failed future naming the field
    failed = alice.result(r.json()["request_id"])
    assert failed["category"] == "user" and "topk_prompt_logprobs" in failed["error"]
    r = alice.post("asample", {**body, "seq_id": 2, "prompt": {"chunks": [{"type": "image", "data": "AA=="}]}})
    assert r.status_code == 400 and "image chunks" in r.json()["detail"]
    # prompt_logprobs_last_n: earlier positions are NaN
    last = alice.ok("asample", {**body, "seq_id": 3, "num_samples": 1, "prompt_logprobs_last_n": 2})
    lp = deserialize_sample_response(alice.result(last["request_id"], proto=True)).prompt_logprobs
    assert [x is None or math.isnan(x) for x in lp] == [True, True, False, False]


def test_retrieve_futures_is_a_cursor_over_one_clients_completions(alice, bob):
    sid = alice.session()
    ss = alice.ok("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "base_model": MODEL})["sampling_session_id"]
    body = {"num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS[:4]}]}, "sampling_session_id": ss,
            "sampling_params": {"max_tokens": 2, "temperature": 0.0}}
    target = {"type": "sampling_session", "sampling_session_id": ss, "cloned_sampler_id": 0}
    assert alice.ok("retrieve_futures", {"target": target, "timeout": 0}) == {"completions": [], "cursor": 0}
    first = alice.ok("asample", {**body, "seq_id": 0})["request_id"]
    clone = alice.ok("asample", {**body, "seq_id": 3_000_000_000})["request_id"]  # client 3's block
    bad = alice.ok("asample", {**body, "seq_id": 1, "topk_sample_logprobs": 1000})["request_id"]
    seen, cursor = {}, 0
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:  # long-polls until something finishes
        page = alice.ok("retrieve_futures", {"target": target, "prev_cursor": cursor})
        assert page["cursor"] >= cursor
        cursor = page["cursor"]
        seen.update({c["request_id"]: c for c in page["completions"]})
    assert set(seen) == {first, bad}  # client 0's requests only
    assert seen[first]["state"] == "finished" and seen[first]["response_payload_uncompressed_size"] > 0
    assert seen[bad] == {"state": "failed", "request_id": bad}
    assert alice.ok("retrieve_futures", {"target": target, "prev_cursor": cursor, "timeout": 0})["completions"] == []
    again = alice.ok("retrieve_futures", {"target": target, "prev_cursor": 0, "timeout": 0})
    assert {c["request_id"] for c in again["completions"]} == {first, bad}  # unacked: reported again
    page = alice.ok("retrieve_futures", {"target": {**target, "cloned_sampler_id": 3}, "timeout": 30})
    assert [c["request_id"] for c in page["completions"]] == [clone]
    assert len(alice.result(first)["sequences"]) == 1  # the payload itself still comes from retrieve_future
    assert bob.post("retrieve_futures", {"target": target}).status_code == 404
    r = alice.post("retrieve_futures", {"target": {**target, "cloned_sampler_id": -1}})
    assert r.status_code == 400 and "cloned_sampler_id" in r.json()["detail"]


def test_cancel_future_stops_a_sampling_request(alice, bob):
    sid = alice.session()
    ss = alice.ok("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                              "base_model": MODEL})["sampling_session_id"]
    body = {"num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS[:4]}]}, "sampling_session_id": ss,
            "sampling_params": {"max_tokens": 1500, "temperature": 0.0, "stop": []}, "seq_id": 0}
    fut = alice.ok("asample", body)["request_id"]
    assert bob.post("cancel_future", {"request_id": fut}).status_code == 404  # another key's request
    assert alice.post("cancel_future", {"request_id": "req-nope"}).status_code == 404
    assert alice.post("cancel_future", {"request_id": fut}).status_code == 200
    failed = alice.result(fut)
    assert failed["category"] == "user" and "cancelled" in failed["error"]
    assert alice.post("cancel_future", {"request_id": fut}).status_code == 200  # finished: nothing to do
    mid = alice.model(sid)
    step = alice.ok("optim_step", {"model_id": mid, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}})
    r = alice.post("cancel_future", {"request_id": step["request_id"]})
    assert r.status_code in (200, 409)  # a training step is never cancelled: 409 while it runs, 200 once done
    assert "metrics" in alice.result(step["request_id"])


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_rest(alice, bob):
    sid = alice.session()
    mid = alice.model(sid)
    saved = alice.ok("save_weights", {"model_id": mid, "path": "ck-1", "seq_id": 1, "type": "save_weights",
                                      "user_metadata": {"step": "1"}})
    uri = alice.result(saved["request_id"])["path"]
    assert uri == f"tinker://{mid}/weights/ck-1"
    again = alice.post("save_weights", {"model_id": mid, "path": "ck-1", "seq_id": 2})
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    samp = alice.ok("save_weights_for_sampler", {"model_id": mid, "path": "s-1", "seq_id": 3, "kind": "snapshot"})
    s_uri = alice.result(samp["request_id"])["path"]
    assert s_uri == f"tinker://{mid}/sampler_weights/s-1"
    eph = alice.ok("save_weights_for_sampler", {"model_id": mid, "sampling_session_seq_id": 0, "seq_id": 4})
    assert alice.result(eph["request_id"])["sampling_session_id"] == f"{sid}:sample:0"

    listed = alice.get(f"training_runs/{mid}/checkpoints").json()
    assert [c["checkpoint_id"] for c in listed["checkpoints"]] == ["weights/ck-1", "sampler_weights/s-1"]
    ck = listed["checkpoints"][0]
    assert ck["checkpoint_type"] == "training" and ck["size_bytes"] > 0 and ck["user_metadata"] == {"step": "1"}
    assert ck["tinker_path"] == uri and ck["time"].endswith("Z")
    assert bob.get(f"training_runs/{mid}/checkpoints").status_code == 404
    run = alice.get(f"training_runs/{mid}").json()
    assert run["model_owner"] == principal_id(A) and run["lora_rank"] == 4
    assert run["last_checkpoint"]["checkpoint_id"] == "weights/ck-1"
    assert run["last_sampler_checkpoint"]["checkpoint_id"] == "sampler_weights/s-1"
    assert alice.ok("weights_info", {"tinker_path": uri}) == {
        "base_model": MODEL, "is_lora": True, "lora_rank": 4, "train_unembed": True, "train_mlp": True,
        "train_attn": True, "optimizer_config": {"type": "adamw"}}
    assert bob.post("weights_info", {"tinker_path": uri}).status_code == 404
    assert alice.get("checkpoints?limit=1").json()["cursor"] == {"offset": 0, "limit": 1, "total_count": 2}

    # publish: another principal may now read (not delete) it
    assert alice.post(f"training_runs/{mid}/checkpoints/weights/ck-1/publish").status_code == 204
    assert bob.post("weights_info", {"tinker_path": uri}).status_code == 200
    assert bob.delete(f"training_runs/{mid}/checkpoints/weights/ck-1").status_code == 404
    assert alice.delete(f"training_runs/{mid}/checkpoints/weights/ck-1/publish").status_code == 204
    assert bob.post("weights_info", {"tinker_path": uri}).status_code == 404

    # delete (the checkpoint id holds a slash)
    assert alice.delete(f"training_runs/{mid}/checkpoints/sampler_weights/s-1").status_code == 204
    assert alice.delete(f"training_runs/{mid}/checkpoints/sampler_weights/s-1").status_code == 404
    assert alice.delete(f"training_runs/{mid}/checkpoints/bogus/s-1").status_code == 400
    assert [c["checkpoint_id"] for c in alice.get(f"training_runs/{mid}/checkpoints").json()["checkpoints"]] == [
        "weights/ck-1"]


def test_sampling_a_deleted_checkpoint(alice):
    sid = alice.session()
    mid = alice.model(sid)
    fut = alice.ok("save_weights_for_sampler", {"model_id": mid, "path": "gone-soon", "seq_id": 1})
    uri = alice.result(fut["request_id"])["path"]
    ss = alice.ok("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 5,
                                              "model_path": uri})["sampling_session_id"]
    assert alice.get(f"samplers/{ss}").json()["model_path"] == uri
    body = {"prompt": {"chunks": [{"tokens": TOKENS[:3]}]}, "sampling_params": {"max_tokens": 2},
            "sampling_session_id": ss}
    ok = alice.ok("asample", {**body, "seq_id": 0})
    assert len(alice.result(ok["request_id"])["sequences"]) == 1
    assert alice.delete(f"training_runs/{mid}/checkpoints/sampler_weights/gone-soon").status_code == 204
    # the session's checkpoint is checked again at every sample: gone now, so the sample is refused
    r = alice.post("asample", {**body, "seq_id": 1})
    assert r.status_code == 404 and r.json()["detail"].startswith("model_path:") and "ckpt" not in r.json()["detail"]
    r = alice.post("create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 6, "model_path": uri})
    assert r.status_code == 404


def test_ttl_is_enforced_by_the_sweeper(services, tmp_path):
    with TestClient(_app(services, tmp_path, sweep_interval_s=0.2)) as client:
        alice = Api(client, A)
        mid = alice.model(alice.session())
        saved = alice.ok("save_weights", {"model_id": mid, "path": "short", "seq_id": 1})
        uri = alice.result(saved["request_id"])["path"]
        ckpt_dir = next((tmp_path / "ckpt").rglob("short"))
        assert ckpt_dir.is_dir()
        assert alice.put(f"training_runs/{mid}/checkpoints/weights/short/ttl", {"ttl_seconds": 0}).status_code == 400
        assert alice.put(f"training_runs/{mid}/checkpoints/weights/short/ttl", {"ttl_seconds": 1}).status_code == 204
        expires = alice.get(f"training_runs/{mid}/checkpoints").json()["checkpoints"][0]["expires_at"]
        assert expires.endswith("Z")
        deadline = time.monotonic() + 10
        while ckpt_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not ckpt_dir.exists()
        assert alice.get(f"training_runs/{mid}/checkpoints").json()["checkpoints"] == []
        assert alice.post("weights_info", {"tinker_path": uri}).status_code == 404


def test_ephemeral_sampler_weights_are_trimmed(services, tmp_path):
    with TestClient(_app(services, tmp_path, ephemeral_keep=1)) as client:
        alice = Api(client, A)
        sid = alice.session()
        mid = alice.model(sid)
        samplers = []
        for i in range(2):
            fut = alice.ok("save_weights_for_sampler", {"model_id": mid, "sampling_session_seq_id": i,
                                                        "seq_id": i + 1})
            samplers.append(alice.result(fut["request_id"])["sampling_session_id"])
        body = {"num_samples": 1, "prompt": {"chunks": [{"tokens": TOKENS[:3]}]}, "sampling_params": {"max_tokens": 2}}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = alice.post("asample", {**body, "sampling_session_id": samplers[0], "seq_id": 0})
            if r.status_code == 410:
                break
            time.sleep(0.1)
        assert r.status_code == 410 and "save weights for sampling again" in r.json()["detail"]
        ok = alice.ok("asample", {**body, "sampling_session_id": samplers[1], "seq_id": 0})
        assert len(alice.result(ok["request_id"])["sequences"]) == 1
        assert len(list((tmp_path / "ckpt").rglob("ephemeral/*"))) == 1
        # a session's ephemeral weights go when it is finished and they are unused for ephemeral_ttl_s
        assert alice.ok(f"sessions/{sid}/finish", {"reason": {"type": "success"}}) == {}


def test_training_runs_paging(alice, bob):
    sid = alice.session()
    ids = [alice.model(sid, seq=i) for i in range(3)]
    page = alice.get("training_runs?limit=2&offset=0&access_scope=owned").json()
    assert page["cursor"] == {"offset": 0, "limit": 2, "total_count": 3}
    assert [r["training_run_id"] for r in page["training_runs"]] == ids[::-1][:2]
    page = alice.get("training_runs?limit=2&offset=2").json()
    assert [r["training_run_id"] for r in page["training_runs"]] == ids[:1]
    assert bob.get("training_runs").json()["cursor"]["total_count"] == 0
    assert bob.get(f"training_runs/{ids[0]}").status_code == 404
    assert alice.get("training_runs?limit=0").status_code == 400
    assert alice.get(f"sessions/{sid}").json()["training_run_ids"] == ids


# ------------------------------------------------------------------------------------------ transport


def test_zstd_bodies_and_size_limit(services, tmp_path):
    with TestClient(_app(services, tmp_path, max_body_bytes=64 * 1024)) as client:
        alice = Api(client, A)
        mid = alice.model(alice.session())
        msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
            forward_backward_input=types.ForwardBackwardInput(data=[_datum()], loss_fn="cross_entropy"),
            model_id=mid, seq_id=1))
        body = zstandard.ZstdCompressor().compress(msg.SerializeToString())
        r = alice.post("forward_backward", content=body, headers={"Content-Type": PROTO, "Content-Encoding": "zstd"})
        assert r.status_code == 200, r.text
        assert "loss:sum" in deserialize_forward_backward_output(alice.result(r.json()["request_id"], True)).metrics
        # a compressed forward_backward over the limit (once decompressed, or even compressed) is a 413 that
        # still releases its seq_id: the run's next request runs at once instead of waiting 30 s for it
        rng = random.Random(0)
        for seq, tokens in ((2, [7] * 60_000), (4, [rng.randrange(4096) for _ in range(60_000)])):
            msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
                forward_backward_input=types.ForwardBackwardInput(
                    data=[types.Datum(model_input=types.ModelInput.from_ints(tokens),
                                      loss_fn_inputs={"target_tokens": tokens})], loss_fn="cross_entropy"),
                model_id=mid, seq_id=seq))
            r = alice.post("forward_backward", content=zstandard.ZstdCompressor().compress(msg.SerializeToString()),
                           headers={"Content-Type": PROTO, "Content-Encoding": "zstd"})
            assert r.status_code == 413, r.text
            step = alice.ok("optim_step", {"model_id": mid, "seq_id": seq + 1, "adam_params": {"learning_rate": 1e-4}})
            assert "metrics" in alice.result(step["request_id"], timeout=20)
        big = {"model_id": mid, "seq_id": 6, "adam_params": {"learning_rate": 1e-4}, "pad": "x" * 100_000}
        r = alice.post("optim_step", big)
        assert r.status_code == 413 and "65536 bytes" in r.json()["detail"]
        bomb = zstandard.ZstdCompressor().compress(b'{"model_id": "' + b"a" * 1_000_000 + b'"}')
        assert len(bomb) < 64 * 1024
        r = alice.post("optim_step", content=bomb, headers={"Content-Type": "application/json",
                                                            "Content-Encoding": "zstd"})
        assert r.status_code == 413
        r = alice.post("optim_step", content=b"not zstd", headers={"Content-Type": "application/json",
                                                                   "Content-Encoding": "zstd"})
        assert r.status_code == 400 and "zstd" in r.json()["detail"]


def test_long_poll_returns_try_again(services, tmp_path):
    with TestClient(_app(services, tmp_path, long_poll_timeout_s=0.3)) as client:
        alice = Api(client, A)
        mid = alice.model(alice.session())
        waiting = alice.fwdbwd(mid, 2).json()["request_id"]  # seq 1 missing: it waits in the service
        t0 = time.monotonic()
        r = alice.post("retrieve_future", {"request_id": waiting})
        assert time.monotonic() - t0 >= 0.25
        assert r.json() == {"request_id": waiting, "type": "try_again", "queue_state": "active"}
        alice.fwdbwd(mid, 1)
        assert "loss:sum" in deserialize_forward_backward_output(alice.result(waiting, proto=True)).metrics


# ------------------------------------------------------------------------------------------ durability


def test_restart_keeps_state_and_fails_dead_requests(services, tmp_path):
    with TestClient(_app(services, tmp_path)) as client:
        alice = Api(client, A)
        sid = alice.session()
        mid = alice.model(sid)
        saved = alice.ok("save_weights", {"model_id": mid, "path": "keep", "seq_id": 1})
        uri = alice.result(saved["request_id"])["path"]
        fb = alice.fwdbwd(mid, 2).json()["request_id"]
        first = alice.result(fb, proto=True)
        cut_off = alice.fwdbwd(mid, 4).json()["request_id"]  # waits for seq 3, which never comes
    # graceful shutdown: the waiting request ended as a server error
    # a process that died with a request in flight: simulated by a row left pending
    async def leave_pending():
        store = await Store.open(str(tmp_path / "state.sqlite"))
        await store.insert_future(FutureRecord(request_id="req-dead", owner=principal_id(A), kind="optim_step",
                                               created=time.time(), model_id=mid, seq_id=99))
        await store.insert_future(FutureRecord(request_id="req-dead-save", owner=principal_id(A),
                                               kind="save_weights", created=time.time(), model_id=mid, seq_id=98))
        await store.close()

    asyncio.run(leave_pending())
    with TestClient(_app(services, tmp_path)) as client:
        alice = Api(client, A)
        assert sid in alice.get("sessions").json()["sessions"]
        assert alice.get(f"training_runs/{mid}").json()["training_run_id"] == mid
        assert alice.get(f"training_runs/{mid}/checkpoints").json()["checkpoints"][0]["tinker_path"] == uri
        assert alice.result(fb, proto=True) == first  # a finished result is still there
        # a training request is followed to the Model service, which never received it: not applied
        dead = alice.result("req-dead")
        assert dead["category"] == "user" and "not applied" in dead["error"]
        # any other kind of request a dead process left running fails as a server error
        dead = alice.result("req-dead-save")
        assert dead["category"] == "server" and "restarted" in dead["error"]
        shut = alice.result(cut_off)
        assert shut["category"] == "server" and "shut down" in shut["error"]
        assert alice.ok("get_info", {"model_id": mid})["model_id"] == mid


def test_unload_model(alice):
    mid = alice.model(alice.session())
    fut = alice.ok("unload_model", {"model_id": mid, "type": "unload_model"})
    assert alice.result(fut["request_id"]) == {"type": "unload_model", "model_id": mid}
    gone = alice.fwdbwd(mid, 1).json()
    failed = alice.result(gone["request_id"], proto=True)
    assert failed["category"] == "user" and "not found" in failed["error"]


def test_results_are_rendered_once(alice):
    mid = alice.model(alice.session())
    rid = alice.fwdbwd(mid, 1).json()["request_id"]
    first = alice.result(rid, proto=True)
    assert alice.result(rid, proto=True) == first
    assert msgspec.json.decode(msgspec.json.encode(alice.result(rid)))["metrics"]


def test_unsupported_routes_are_404_naming_the_feature_and_release_the_seq_id(alice):
    mid = alice.model(alice.session())
    r = alice.post("create_custom_loss", {"model_id": mid, "seq_id": 1})
    assert r.status_code == 404 and "create_custom_loss" in r.json()["detail"]
    step = alice.ok("optim_step", {"model_id": mid, "seq_id": 2, "adam_params": {"learning_rate": 1e-3}})
    assert "metrics" in alice.result(step["request_id"])  # ran at once: seq 1 was released
    r = alice.get("training_runs/x/checkpoints/external_weights/out/external_weights_urls")
    assert r.status_code == 404
    r = alice.post("copy_weights", {"source": "x"})
    assert r.status_code == 404 and "copy_weights" in r.json()["detail"]
    r = alice.post("no/such/thing", {})
    assert r.status_code == 404 and "no such endpoint" in r.json()["detail"]
