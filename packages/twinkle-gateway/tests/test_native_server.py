"""The native protocol over raw HTTP, in-process: the TwinkleServer app and the component apps' native
routes over the real Model, Sampler and Processor services (``LocalTwinkleStack``: one uvicorn server, the
apps at their ``deploy/local.yaml`` prefixes, the central service as the components' ``Authority``).

Each rule of the wire contract is checked on its own: auth and ownership, futures, seq_id ordering and
dedupe, checkpoint URIs (never paths), the processor's row errors.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from twinkle.common.models import TINY_MODEL_ID, served_model_name
from twinkle.server.auth import principal_id
from twinkle.server.native import NativeSettings
from twinkle.server.native.testing import LocalTwinkleStack

MODEL = served_model_name(TINY_MODEL_ID)
A, B = "tml-native-alice", "tml-native-bob"
SEQ = [101, 202, 303, 404, 505, 606, 707, 808]
M, S, P = f"/models/{MODEL}", f"/sampler/{MODEL}", "/processors"


def _datum(seq=SEQ):
    n = len(seq) - 1
    return {"model_input": seq[:-1], "loss_fn_inputs": {"target_tokens": {"data": seq[1:], "dtype": "int64"},
                                                        "weights": {"data": [1.0] * n}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    settings = NativeSettings(checkpoint_dir=str(root / "ckpt"), api_keys=[A, B], heartbeat_interval_s=1.0)
    with LocalTwinkleStack(settings, TINY_MODEL_ID) as s:
        yield s


class Api:
    def __init__(self, stack, key):
        self.http = httpx.Client(base_url=stack.base_url, headers={"X-API-Key": key} if key else {}, timeout=120)

    def __getattr__(self, name):
        return getattr(self.http, name)

    def ok(self, method, path, status=200, **kw):
        r = self.http.request(method, path, **kw)
        assert r.status_code == status, r.text
        return r.json() if r.content else None

    def wait(self, request_id, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.ok("GET", f"/server/futures/{request_id}", params={"timeout": 5})
            if out["status"] != "pending":
                return out
        raise TimeoutError(request_id)

    def done(self, request_id):
        out = self.wait(request_id)
        assert out["status"] == "done", out
        return out["result"]

    def create_run(self, rank=4, **body):
        body = {"base_model": MODEL, "lora": {"rank": rank, "seed": 0}, **body}
        ref = self.ok("POST", "/server/training_runs", 202, json=body)
        return self.done(ref["request_id"])["run_id"]


@pytest.fixture(scope="module")
def alice(stack):
    return Api(stack, A)


@pytest.fixture(scope="module")
def bob(stack):
    return Api(stack, B)


def test_health_is_open_everything_else_needs_a_key(stack, alice):
    anon = Api(stack, None)
    assert anon.ok("GET", "/server/healthz")["status"] == "ok"
    for prefix in ("/server", M, S, P):
        assert anon.get(f"{prefix}/healthz").status_code == 200
    r = anon.get("/server/capabilities")
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    assert Api(stack, "tml-unknown").get("/server/capabilities").status_code == 401
    assert anon.post(f"{M}/runs/x/forward", json={"data": [_datum()]}).status_code == 401
    assert anon.post(f"{S}/sample", json={"prompt_tokens": [1]}).status_code == 401
    assert anon.post(f"{P}/tokenize", json={"texts": ["a"]}).status_code == 401
    caps = alice.ok("GET", "/server/capabilities")
    assert caps["principal"] == principal_id(A)  # the same principal ids as the Tinker server
    (model,) = caps["models"]
    assert model["name"] == MODEL and model["trainable"] and model["sampleable"]
    assert (model["model_prefix"], model["sampler_prefix"], model["processor_prefix"]) == (M, S, P)
    assert model["max_context_length"] > 0 and caps["server_prefix"] == "/server"


def test_runs_are_futures_listed_paged_and_owned(alice, bob):
    ids = [alice.create_run() for _ in range(3)]
    page = alice.ok("GET", "/server/training_runs", params={"limit": 2})
    assert len(page["training_runs"]) == 2 and page["cursor"]["next_offset"] == 2
    rest = alice.ok("GET", "/server/training_runs", params={"limit": 2, "offset": 2})
    listed = [r["run_id"] for r in page["training_runs"] + rest["training_runs"]]
    assert set(ids) <= set(listed) and len(listed) == len(set(listed))
    run = alice.ok("GET", f"/server/training_runs/{ids[0]}")
    assert run["loaded"] and run["step"] == 0 and run["lora"]["rank"] == 4 and run["model_prefix"] == M
    assert run["protocol"] == "twinkle"
    for method, path in (("GET", f"/server/training_runs/{ids[0]}"), ("DELETE", f"/server/training_runs/{ids[0]}"),
                         ("GET", f"/server/training_runs/{ids[0]}/checkpoints"), ("GET", f"{M}/runs/{ids[0]}")):
        r = bob.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
    assert ids[0] not in [r["run_id"] for r in bob.ok("GET", "/server/training_runs")["training_runs"]]
    alice.ok("DELETE", f"/server/training_runs/{ids[2]}", 204)
    assert alice.get(f"/server/training_runs/{ids[2]}").status_code == 404
    assert alice.get(f"{M}/runs/{ids[2]}").status_code == 404


def test_create_is_idempotent_with_a_key(alice):
    body = {"base_model": MODEL, "lora": {"rank": 2}, "idempotency_key": "once-only"}
    first = alice.ok("POST", "/server/training_runs", 202, json=body)
    again = alice.ok("POST", "/server/training_runs", 202, json=body)
    assert again["request_id"] == first["request_id"] and again["run_id"] == first["run_id"]


def test_bad_create_requests(alice):
    no_targets = {"train_attn": False, "train_mlp": False, "train_unembed": False}
    for body, field in (({"base_model": "nope"}, "base_model"),
                        ({"base_model": MODEL, "lora": {"rank": 0}}, "lora.rank"),
                        ({"base_model": MODEL, "lora": no_targets}, "lora.train_attn")):
        r = alice.post("/server/training_runs", json=body)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    r = alice.post("/server/training_runs", json={"base_model": MODEL, "lr": 1})
    assert r.status_code == 400 and "lr" in r.json()["detail"]
    assert alice.post("/server/training_runs", content=b"{not json").status_code == 400


def test_training_is_ordered_and_deduplicated_by_seq_id(alice):
    run = alice.create_run()
    assert alice.ok("GET", f"{M}/runs/{run}")["next_seq_id"] == 1
    fb = {"data": [_datum()], "seq_id": 1}
    first = alice.ok("POST", f"{M}/runs/{run}/forward_backward", json=fb)
    again = alice.ok("POST", f"{M}/runs/{run}/forward_backward", json=fb)  # a retry: the first result
    assert again == first and len(first["loss_fn_outputs"][0]["logprobs"]["data"]) == len(SEQ) - 1
    step = alice.ok("POST", f"{M}/runs/{run}/optim_step", json={"learning_rate": 1e-2, "seq_id": 2})
    assert alice.ok("POST", f"{M}/runs/{run}/optim_step", json={"learning_rate": 1e-2, "seq_id": 2}) == step
    state = alice.ok("GET", f"{M}/runs/{run}")
    assert state["step"] == 1 and state["next_seq_id"] == 3  # stepped once, not twice
    fwd = alice.ok("POST", f"{M}/runs/{run}/forward", json={"data": [_datum()], "seq_id": 3})
    assert fwd["metrics"]["loss:sum"] < first["metrics"]["loss:sum"]
    # a body that cannot be decoded still uses its seq_id: the next number runs at once, not after a gap timeout
    r = alice.post(f"{M}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 4, "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["detail"]
    r = alice.post(f"{M}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 5, "loss_fn": "nope"})
    assert r.status_code == 400 and r.json()["field"] == "loss_fn"
    t0 = time.monotonic()
    alice.ok("POST", f"{M}/runs/{run}/forward", json={"data": [_datum()], "seq_id": 6})
    assert time.monotonic() - t0 < 10
    # unnumbered requests are fine too (they run after what arrived before them)
    alice.ok("POST", f"{M}/runs/{run}/forward", json={"data": [_datum()]})
    assert alice.ok("GET", f"{M}/runs/{run}")["next_seq_id"] == 7


def test_save_load_and_checkpoint_uris(alice, bob):
    run = alice.create_run()
    alice.ok("POST", f"{M}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 1})
    alice.ok("POST", f"{M}/runs/{run}/optim_step", json={"learning_rate": 1e-2, "seq_id": 2})
    ref = alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "s1", "seq_id": 3})
    assert ref["uri"] == f"twinkle://{run}/weights/s1"
    assert alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "s1", "seq_id": 3}) == ref  # a retry
    saved = alice.done(ref["request_id"])
    assert saved["uri"] == ref["uri"] and saved["size_bytes"] > 0 and "path" not in saved
    r = alice.post(f"{M}/runs/{run}/save", json={"name": "s1", "seq_id": 4})
    assert r.status_code == 409 and r.json()["field"] == "name"
    r = alice.post(f"{M}/runs/{run}/save", json={"name": "../../etc", "seq_id": 5})
    assert r.status_code == 400 and r.json()["field"] == "name"
    over = alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "s1", "overwrite": True, "seq_id": 6})
    alice.done(over["request_id"])
    sampler = alice.done(alice.ok("POST", f"{M}/runs/{run}/save", 202,
                                  json={"name": "s1", "kind": "sampler", "seq_id": 7})["request_id"])
    assert sampler["uri"] == f"twinkle://{run}/sampler_weights/s1" and sampler["kind"] == "sampler_weights"
    listed = alice.ok("GET", f"/server/training_runs/{run}/checkpoints")["checkpoints"]
    assert {c["uri"] for c in listed} == {ref["uri"], sampler["uri"]}
    latest = alice.ok("GET", f"/server/training_runs/{run}/checkpoints/latest", params={"kind": "state"})
    assert latest["uri"] == ref["uri"]
    assert alice.ok("GET", f"/server/training_runs/{run}/checkpoints/latest")["uri"] == sampler["uri"]
    assert ref["uri"] in [c["uri"] for c in alice.ok("GET", "/server/checkpoints")["checkpoints"]]
    # load: server paths are refused, other keys' checkpoints do not exist, a sampler checkpoint is no state
    refused = (("/etc/passwd", 400), ("file:///tmp/x", 400), (sampler["uri"], 400),
               (f"twinkle://{run}/weights/no", 404))
    for seq, (uri, status) in enumerate(refused, start=8):
        r = alice.post(f"{M}/runs/{run}/load", json={"uri": uri, "seq_id": seq})
        assert r.status_code == status and r.json()["field"] == "uri", (uri, r.text)
    loaded = alice.ok("POST", f"{M}/runs/{run}/load", 202, json={"uri": ref["uri"], "optimizer": False, "seq_id": 12})
    alice.done(loaded["request_id"])
    other = bob.create_run()
    r = bob.post(f"{M}/runs/{other}/load", json={"uri": ref["uri"], "seq_id": 1})
    assert r.status_code == 404
    assert bob.post(f"{M}/runs/{run}/save", json={"name": "x", "seq_id": 13}).status_code == 404
    # the run still works, at once, after all the refusals (each released its seq_id)
    t0 = time.monotonic()
    alice.ok("POST", f"{M}/runs/{run}/forward", json={"data": [_datum()], "seq_id": 13})
    assert time.monotonic() - t0 < 10
    # download: the owner's only, named by field; each archive is removed from the server's disk once sent
    leftovers = set(Path(tempfile.gettempdir()).glob("twinkle-checkpoint-*"))
    archive = alice.get(f"/server/training_runs/{run}/checkpoints/weights/s1/archive")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    assert int(archive.headers["content-length"]) == len(archive.content) > 0
    assert bob.get(f"/server/training_runs/{run}/checkpoints/weights/s1/archive").status_code == 404
    for kind, name, field in (("ephemeral", "s1", "kind"), ("weights", "..", "name"), ("weights", "a b", "name")):
        r = alice.get(f"/server/training_runs/{run}/checkpoints/{kind}/{name}/archive")
        assert r.status_code in (400, 404) and (r.status_code == 404 or r.json()["field"] == field), r.text
    assert set(Path(tempfile.gettempdir()).glob("twinkle-checkpoint-*")) == leftovers
    # delete a checkpoint
    assert bob.delete(f"/server/training_runs/{run}/checkpoints/weights/s1").status_code == 404
    alice.ok("DELETE", f"/server/training_runs/{run}/checkpoints/weights/s1", 204)
    assert alice.get(f"/server/training_runs/{run}/checkpoints/latest", params={"kind": "state"}).status_code == 404


def test_sampling_base_model_and_checkpoints(alice, bob):
    out = alice.ok("POST", f"{S}/sample", json={"prompt_tokens": SEQ[:3], "num_samples": 2, "prompt_logprobs": True,
                                                "sampling_params": {"max_tokens": 4, "temperature": 0.0}})
    assert len(out["sequences"]) == 2 and out["sequences"][0]["tokens"] == out["sequences"][1]["tokens"]
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == 3
    run = alice.create_run()
    ref = alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "smp", "kind": "sampler"})
    uri = alice.done(ref["request_id"])["uri"]
    body = {"prompt_tokens": SEQ[:3], "model_uri": uri, "sampling_params": {"max_tokens": 3, "temperature": 0.0}}
    assert len(alice.ok("POST", f"{S}/sample", json=body)["sequences"][0]["tokens"]) == 3
    r = bob.post(f"{S}/sample", json=body)
    assert r.status_code == 404 and r.json()["field"] == "model_uri"
    for bad, field in (({"model_uri": "/tmp"}, "model_uri"), ({"prompt_tokens": []}, "prompt_tokens"),
                       ({"num_samples": 0}, "num_samples"),
                       ({"sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
                       ({"sampling_params": {"temperature": -1}}, "sampling_params.temperature")):
        r = alice.post(f"{S}/sample", json={**body, **bad})
        assert r.status_code == 400 and r.json()["field"] == field, (bad, r.text)


def test_resume_from_a_uri_or_a_run(alice, bob):
    run = alice.create_run()
    r = alice.post("/server/resume", json={"source": run})
    assert r.status_code == 404 and "no saved state" in r.json()["detail"]
    alice.ok("POST", f"{M}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 1})
    alice.ok("POST", f"{M}/runs/{run}/optim_step", json={"learning_rate": 1e-2, "seq_id": 2})
    saved = alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "r", "seq_id": 3})
    uri = alice.done(saved["request_id"])["uri"]
    before = alice.ok("POST", f"{M}/runs/{run}/forward", json={"data": [_datum()], "seq_id": 4})
    new = alice.done(alice.ok("POST", "/server/resume", 202, json={"source": run})["request_id"])
    assert new["run_id"] != run and new["step"] == 1 and new["user_metadata"]["resumed_from"] == uri
    after = alice.ok("POST", f"{M}/runs/{new['run_id']}/forward", json={"data": [_datum()], "seq_id": 1})
    assert after["loss_fn_outputs"] == before["loss_fn_outputs"]
    # into an existing run
    target = alice.create_run()
    ref = alice.ok("POST", "/server/resume", 202, json={"source": uri, "into_run_id": target})
    into = alice.done(ref["request_id"])
    assert into["run_id"] == target and into["step"] == 1
    assert alice.ok("POST", f"{M}/runs/{target}/forward", json={"data": [_datum()], "seq_id": 1}) == after
    assert bob.post("/server/resume", json={"source": uri}).status_code == 404
    assert bob.post("/server/resume", json={"source": run}).status_code == 404


def test_sessions_and_futures_are_owned(alice, bob):
    s = alice.ok("POST", "/server/sessions", 201, json={"tags": ["t"], "client_version": "test"})
    assert s["heartbeat_interval_s"] == 1.0
    sid = s["session_id"]
    assert alice.ok("POST", f"/server/sessions/{sid}/heartbeat")["status"] == "ok"
    assert bob.post(f"/server/sessions/{sid}/heartbeat").status_code == 404
    run = alice.create_run(session_id=sid)
    assert alice.ok("GET", f"/server/training_runs/{run}")["session_id"] == sid
    alice.ok("POST", f"/server/sessions/{sid}/finish")
    assert alice.post(f"/server/sessions/{sid}/heartbeat").status_code == 410
    r = alice.post("/server/training_runs", json={"base_model": MODEL, "session_id": sid})
    assert r.status_code == 410
    ref = alice.ok("POST", "/server/training_runs", 202, json={"base_model": MODEL})
    assert bob.get(f"/server/futures/{ref['request_id']}").status_code == 404
    assert alice.get("/server/futures/req-nope").status_code == 404
    assert alice.wait(ref["request_id"])["status"] == "done"


def test_processor_routes(alice):
    toks = alice.ok("POST", f"{P}/tokenize", json={"texts": ["hello world", "hi"]})["tokens"]
    assert len(toks) == 2 and all(toks)
    assert alice.ok("POST", f"{P}/detokenize", json={"tokens": toks})["texts"] == ["hello world", "hi"]
    chat = alice.ok("POST", f"{P}/render_chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "add_generation_prompt": True})
    assert "hi" in chat["text"] and chat["tokens"]
    jsonl = "".join('{"prompt": "p%d", "completion": " c%d"}\n' % (i, i) for i in range(5))
    page = alice.ok("POST", f"{P}/encode", json={"jsonl": jsonl, "limit": 2})
    assert page["indices"] == [0, 1] and page["next_offset"] == 2 and page["total_rows"] == 5
    with alice.stream("POST", f"{P}/encode/stream", json={"jsonl": jsonl, "limit": 2}) as r:
        lines = [line for line in r.iter_lines() if line]
    import json

    pages = [json.loads(line)["page"] for line in lines]
    assert [p["indices"] for p in pages] == [[0, 1], [2, 3], [4]]
    bad = jsonl + '{"prompt": "x"}\n'
    r = alice.post(f"{P}/encode", json={"jsonl": bad})
    assert r.status_code == 400 and r.json()["field"] == "line 6" and "completion" in r.json()["detail"]
    r = alice.post(f"{P}/encode/stream", json={"rows": [{"prompt": "a", "completion": "b"}, 7]})
    assert r.status_code == 400 and r.json()["field"] == "rows[1]"
    # a bad row on a later page ends the stream with an error line
    with alice.stream("POST", f"{P}/encode/stream", json={"jsonl": bad, "limit": 4}) as r:
        items = [json.loads(line) for line in r.iter_lines() if line]
    assert "page" in items[0] and items[-1]["error"]["field"] == "line 6" and items[-1]["error"]["status"] == 400
    r = alice.post(f"{P}/encode", json={"jsonl": jsonl, "shuffle": True})
    assert r.status_code == 400 and "shuffle" in r.json()["detail"]


def test_a_key_has_at_most_two_checkpoint_archives_on_disk_at_once(stack, alice):
    """Each download is packed into a temporary file: a key asking for many at once gets a 429."""
    from twinkle.server.core.control import MAX_ARCHIVES
    from twinkle.server.core.futures import Busy

    run = alice.create_run()
    alice.ok("POST", f"{M}/runs/{run}/forward_backward", json={"data": [_datum()], "seq_id": 1})
    alice.done(alice.ok("POST", f"{M}/runs/{run}/save", 202, json={"name": "c", "seq_id": 2})["request_id"])
    plane = stack.native.plane

    async def main():
        c = await plane.own_checkpoint(principal_id(A), run, "weights", "c", field="uri", uri="-")
        first = await plane.checkpoint_archive(c, "test", purpose="test")
        second = await plane.checkpoint_archive(c, "test", purpose="test")
        with pytest.raises(Busy):
            await plane.checkpoint_archive(c, "test", purpose="test")
        first[2]()
        first[2]()  # releasing twice frees one place only
        third = await plane.checkpoint_archive(c, "test", purpose="test")
        with pytest.raises(Busy):
            await plane.checkpoint_archive(c, "test", purpose="test")
        for archive in (second, third):
            archive[2]()
        # and the server holds at most MAX_ARCHIVES at once, whichever keys asked
        held = [await plane.checkpoint_archive(msgspec.structs.replace(c, owner=f"p-{i // 2}"), "test", purpose="test")
                for i in range(MAX_ARCHIVES)]
        with pytest.raises(Busy):
            await plane.checkpoint_archive(msgspec.structs.replace(c, owner="p-another"), "test", purpose="test")
        for archive in held:
            archive[2]()
        return [Path(a[0]).exists() for a in (first, second, third, *held)]

    assert asyncio.run(main()) == [False] * (3 + MAX_ARCHIVES)

