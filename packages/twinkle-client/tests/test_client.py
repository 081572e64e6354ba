"""``TwinkleClient`` against the real native stack in-process: training, checkpoints, resume, sampling,
dataset encoding, retries that must not double-apply, sessions, errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from twinkle_client import (
    Checkpoint,
    Datum,
    TwinkleAuthError,
    TwinkleClient,
    TwinkleNotFoundError,
    TwinkleUserError,
)

ROWS = [{"prompt": "Q: capital of France?\nA:", "completion": " Paris."},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}]


@pytest.fixture(scope="module")
def client(stack, keys):
    with TwinkleClient(stack.base_url, api_key=keys[0]) as c:
        yield c


def test_discovery_capabilities_and_env_defaults(stack, keys, monkeypatch, client):
    assert client.server_prefix == "/server" and client.health()["status"] == "ok"
    caps = client.capabilities()
    assert caps.server_type == "twinkle" and caps.models[0].model_prefix.startswith("/models/")
    with TwinkleClient(stack.base_url + "/server", api_key=keys[0]) as c:  # a base_url with the prefix
        assert c.capabilities().principal == caps.principal
    monkeypatch.setenv("TWINKLE_SERVER_URL", stack.base_url)
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", keys[1])
    with TwinkleClient() as c:
        assert c.capabilities().principal != caps.principal
    with pytest.raises(TwinkleAuthError):
        TwinkleClient(stack.base_url, api_key="tml-wrong").capabilities()
    with pytest.raises(ValueError):
        TwinkleClient("localhost:8000")


def test_train_save_resume_sample(stack, keys, client):
    pages = list(client.encode_dataset(ROWS, page_size=1))
    assert [p.indices for p in pages] == [[0], [1]] and pages[0].stats.trained_tokens > 0
    data = [d for p in pages for d in p.data]
    run = client.create_training_run(rank=8, seed=0, user_metadata={"purpose": "test"})
    assert run.state().next_seq_id == 1 and run.info.session_id == client.session_id
    losses = []
    for _ in range(8):
        losses.append(run.forward_backward(data).loss)
        run.optim_step(learning_rate=1e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    state = run.save("mid")
    assert isinstance(state, Checkpoint) and state.uri == f"twinkle://{run.run_id}/weights/mid"
    assert run.latest_checkpoint("state").uri == state.uri
    assert [c.uri for c in run.checkpoints()] == [state.uri]
    before = run.forward(data)
    with TwinkleClient(stack.base_url, api_key=keys[0]) as other:
        resumed = other.resume(state)
        assert resumed.run_id != run.run_id and resumed.info.step == 8
        assert resumed.forward(data).logprobs(1) == before.logprobs(1)
    assert run.forward(data).logprobs(0) == before.logprobs(0)
    out = run.sample(ROWS[0]["prompt"], max_tokens=4, temperature=0.0, num_samples=2, decode=True)
    assert len(out.sequences) == 2 and out.sequences[0].tokens == out.sequences[1].tokens
    assert out.sequences[0].text is not None
    latest = run.latest_checkpoint("sampler")
    assert latest.name == "latest" and latest.kind == "sampler_weights"
    base = client.sample([1, 2, 3], max_tokens=3, temperature=0.0)
    assert len(base.sequences[0].tokens) == 3
    run.optim_step(learning_rate=1e-2)  # (no gradients since the last step: nothing changes)
    run.forward_backward(data)
    run.optim_step(learning_rate=1e-2)
    assert run.forward(data).logprobs(0) != before.logprobs(0)
    assert client.resume(state.uri, into=run, optimizer=False) is run
    assert run.forward(data).logprobs(0) == before.logprobs(0)
    run.forward_backward(data)  # the handle's numbering still holds after the (unnumbered) load
    assert run.run_id in [r.run_id for r in client.iter_training_runs(page_size=1)]
    client.delete_checkpoint(state)
    with pytest.raises(TwinkleNotFoundError):
        run.latest_checkpoint("state")
    # a later handle (say, in a new process, once this one is gone) continues the run's numbering
    with TwinkleClient(stack.base_url, api_key=keys[0]) as later:
        attached = later.training_run(run.run_id)
        n = attached.state().next_seq_id
        assert len(attached.forward(data).logprobs(0)) == len(data[0].model_input)
        assert attached.state().next_seq_id == n + 1


def test_errors_are_clear_and_owned(stack, keys, client):
    run = client.create_training_run(rank=2)
    with pytest.raises(TwinkleUserError) as e:
        run.forward_backward([Datum.from_tokens([1, 2, 3])], loss_fn="nope")
    assert e.value.status == 400 and e.value.field == "loss_fn" and "cross_entropy" in e.value.detail
    with pytest.raises(TwinkleUserError) as e:
        run.load("/etc/passwd")
    assert e.value.field == "uri"
    with pytest.raises(TwinkleUserError) as e:
        client.encode_datums(jsonl='{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    assert e.value.field == "line 2"
    with pytest.raises(TwinkleUserError) as e:
        client.create_training_run(rank=0)
    assert e.value.field == "lora.rank"
    run.forward_backward([Datum.from_tokens([1, 2, 3])])  # still usable, at once
    with TwinkleClient(stack.base_url, api_key=keys[1]) as bob:
        with pytest.raises(TwinkleNotFoundError):
            bob.get_training_run(run.run_id)
        with pytest.raises(TwinkleNotFoundError):
            bob.training_run(run.run_id)


class _LoseFirstResponse(httpx.BaseTransport):
    """Forwards every request to the server, but drops the answer to the first one whose path ends with
    ``suffix`` (as a connection reset after the server did the work)."""

    def __init__(self, suffix: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.suffix = suffix
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path.endswith(self.suffix) and not self.dropped:
            response.read()
            response.close()
            self.dropped += 1
            raise httpx.ReadError("connection reset by peer", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("op", ["optim_step", "save"])
def test_a_retry_never_applies_twice(stack, keys, op):
    flaky = _LoseFirstResponse(f"/{op}")
    with TwinkleClient(stack.base_url, api_key=keys[0], transport=flaky, backoff_s=0.01) as c:
        run = c.create_training_run(rank=2)
        run.forward_backward([Datum.from_tokens([5, 6, 7, 8])])
        if op == "optim_step":
            run.optim_step(learning_rate=1e-2)
            assert run.state().step == 1  # the lost answer was retried with the same seq_id: one step, not two
        else:
            ckpt = run.save("once")
            assert [c.uri for c in run.checkpoints()] == [ckpt.uri]
        assert flaky.dropped == 1
        assert run.state().next_seq_id == 3


def test_sessions_heartbeat_and_close(stack, keys):
    c = TwinkleClient(stack.base_url, api_key=keys[0])
    c.create_training_run(rank=2)
    sid = c.session_id
    assert sid is not None
    deadline = time.monotonic() + 10
    while c._heartbeat.beats < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c._heartbeat.beats >= 2 and c._heartbeat.failures == 0
    c.close()
    r = httpx.post(f"{stack.base_url}/server/sessions/{sid}/heartbeat", headers={"X-API-Key": keys[0]})
    assert r.status_code == 410  # finished by close()
    # two clients in one process share nothing
    a, b = TwinkleClient(stack.base_url, api_key=keys[0]), TwinkleClient(stack.base_url, api_key=keys[1])
    try:
        a.create_training_run(rank=2)
        b.create_training_run(rank=2)
        assert a.session_id != b.session_id and a._heartbeat is not b._heartbeat
    finally:
        a.close()
        b.close()


def test_processor_helpers(client):
    tokens = client.tokenize(["hello", "world"])
    assert client.detokenize(tokens) == ["hello", "world"]
    chat = client.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.tokens and "hi" in chat.text
    pages = list(client.encode_dataset(jsonl='{"prompt": "a", "completion": "b"}\n{"bad": 1}\n', on_error="skip"))
    assert pages[0].errors[0].where == "line 2" and len(pages[0].data) == 1


def test_progress_bars_and_a_checkpoint_downloaded_as_its_files(stack, keys, tmp_path, capsys):
    pytest.importorskip("tqdm")
    with TwinkleClient(stack.base_url, api_key=keys[0], progress=True) as c:
        data = [d for page in c.encode_dataset(ROWS, page_size=1) for d in page.data]
        run = c.create_training_run(rank=4, seed=0)
        run.forward_backward(data)
        run.optim_step(learning_rate=1e-2)
        state = run.save("to-download")
        unpacked = c.download_checkpoint(state, tmp_path / "a")
        packed = c.download_checkpoint(state.uri, tmp_path / "b", extract=False)
        with pytest.raises(FileExistsError):
            c.download_checkpoint(state, tmp_path / "a")
        with TwinkleClient(stack.base_url, api_key=keys[1], progress=False) as bob:
            with pytest.raises(TwinkleNotFoundError):
                bob.download_checkpoint(state, tmp_path / "c")
    err = capsys.readouterr().err
    # (tqdm redraws at most every 0.1 s: the bars' totals are checked, not their last state)
    assert re.search(r"encoding: +\d+%\|.*\| \d/2 \[", err), err
    assert re.search(r"download to-download: +\d+%\|.*\| [\d.]+[kM]?/[\d.]+[kM]?B? \[", err), err
    # the files are the checkpoint's, byte for byte: the adapter as stock peft reads it, and the optimizer
    server_dir = next(p for p in Path(stack.settings.checkpoint_dir).rglob("to-download") if p.is_dir())
    ours = {p.relative_to(unpacked): p.read_bytes() for p in unpacked.rglob("*") if p.is_file()}
    theirs = {p.relative_to(server_dir): p.read_bytes() for p in server_dir.rglob("*") if p.is_file()}
    assert ours == theirs and any(p.name == "adapter_model.safetensors" for p in ours)
    import tarfile

    with tarfile.open(packed) as tar:
        assert sorted(m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()) == sorted(map(str, ours))
    assert [p.name for p in tmp_path.rglob(".twinkle-download-*")] == []  # no partial file left behind


def test_usage_history_and_audit_count_what_the_model_and_sampler_apps_served(stack, keys):
    """Training and sampling go to the component apps, which report what each request used to the central
    server; a retried request is answered again but counted once; each key sees its own figures."""
    from datetime import datetime, timedelta, timezone

    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    window = ((hour - timedelta(hours=1)).isoformat(), (hour + timedelta(hours=1)).isoformat())
    def totals(buckets) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in buckets:
            out[b.kind] = out.get(b.kind, 0) + b.quantity
        return out

    with TwinkleClient(stack.base_url, api_key=keys[1]) as carol:
        before = totals(carol.usage(*window))
        data = carol.encode_datums(ROWS)
        tokens = sum(len(d.model_input) for d in data)
        run = carol.create_training_run(rank=4, seed=0)
        losses = [run.forward_backward(data).loss, run.forward_backward(data).loss]
        run.optim_step(learning_rate=1e-2)
        run.forward(data)
        run._next_seq -= 1  # the client resends its last request, as after a lost answer: answered, not counted
        run.forward(data)
        run.forward_backward(data)
        run.optim_step(learning_rate=1e-2)
        sampled = carol.sample([5, 6, 7], max_tokens=3, temperature=0.0, num_samples=2)
        run.save("counted")
        deadline = time.monotonic() + 30
        while len(run.history()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        steps = run.history()
        assert [s.step for s in steps] == [1, 2]
        assert steps[0].loss == pytest.approx(sum(losses), rel=1e-6) and steps[0].tokens == 2 * tokens
        assert steps[0].learning_rate == pytest.approx(1e-2) and steps[1].tokens == tokens
        assert run.history(after_step=1) == steps[1:]
        # four passes (the resent forward is not counted), a prompt of 3 tokens and its samples, one save
        expected = {"training": 4 * tokens, "sampling_prefill": 3,
                    "sampling_sample": sum(len(s.tokens) for s in sampled.sequences), "checkpoint": 1}
        while True:  # reports and usage writes land off the requests' path
            buckets = carol.usage(*window)
            after = totals(buckets)
            used = {kind: after[kind] - before.get(kind, 0) for kind in after}
            if used == expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert used == expected
        assert len({b.owner for b in buckets}) == 1
        assert carol.session_id in {b.session_id for b in buckets if b.kind == "training"}
        events = {e.event for e in carol.audit_log()}
        assert {"training_run_create", "checkpoint_create"} <= events, events
    with TwinkleClient(stack.base_url, api_key=keys[0]) as other:
        assert all(b.owner != buckets[0].owner for b in other.usage(*window))
        assert all(e.owner != buckets[0].owner for e in other.audit_log())
