"""The native protocol end to end: ``twinkle-client`` against a deployed local server.

``python -m twinkle.server --config <deploy/local.yaml on a free port>`` runs as a subprocess with an embedded
Ray (Ray Serve proxy, four applications, Serve-handle calls between them), with two API keys configured.
The client encodes a JSONL dataset through the Processor, trains a LoRA until the loss falls, saves,
resumes in a new client from the latest checkpoint, samples what was learned; two keys cannot see each
other's runs; bad rows and bad requests get clear 4xx errors and leave the run usable.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
from _cluster import REPO, base_env, free_port, terminate, wait_http
from twinkle_client import Datum, TwinkleAuthError, TwinkleClient, TwinkleNotFoundError, TwinkleUserError

pytestmark = pytest.mark.acceptance

ALICE, BOB = "tml-e2e-alice", "tml-e2e-bob"
DATASET = REPO / "examples" / "data" / "sft.jsonl"
PREFIXES = ("/server", "/models/tiny-qwen2", "/sampler/tiny-qwen2", "/processors")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native-e2e")
    port = free_port()
    cfg = tmp / "local.yaml"
    cfg.write_text((REPO / "deploy" / "local.yaml").read_text().replace("port: 8000", f"port: {port}"))
    env = base_env(TWINKLE_CHECKPOINT_DIR=str(tmp / "ckpt"), TWINKLE_API_KEYS=f"{ALICE},{BOB}")
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(cfg)], env=env, cwd=tmp,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    ok = False
    try:
        for prefix in PREFIXES:
            wait_http(f"{base}{prefix}/healthz", 300, proc)
        yield base
        ok = True
    finally:
        rc = terminate(proc, timeout_s=90)
        if not ok or rc != 0:
            print(log_path.read_text(errors="replace")[-6000:])
    assert rc == 0, f"the server exited with {rc}"


@pytest.fixture(scope="module")
def alice(base_url):
    with TwinkleClient(base_url, api_key=ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def trained(alice):
    """A run trained on the example dataset until its loss fell to a tenth; saved as ``final``."""
    data = alice.encode_datums(DATASET)
    run = alice.create_training_run(rank=16, seed=0)
    losses = []
    for _ in range(80):
        losses.append(run.forward_backward(data).loss)
        run.optim_step(learning_rate=3e-3)
        if losses[-1] < 0.05 * losses[0]:
            break
    ckpt = run.save("final")
    return run, data, losses, ckpt


def test_encode_train_save(alice, trained):
    run, data, losses, ckpt = trained
    assert len(data) == sum(1 for line in DATASET.read_text().splitlines() if line.strip())
    assert losses[-1] < 0.05 * losses[0], losses
    assert ckpt.uri == f"twinkle://{run.run_id}/weights/final" and ckpt.size_bytes > 0
    assert alice.latest_checkpoint(run.run_id, "state").uri == ckpt.uri
    info = alice.get_training_run(run.run_id)
    assert info.step == len(losses) and info.loaded and info.last_checkpoint.uri == ckpt.uri
    assert run.run_id in [r.run_id for r in alice.iter_training_runs()]


def test_history_and_usage_of_training_served_by_the_model_app(base_url, alice, trained):
    """The model app serves training itself and reports each request to the central app through a Serve
    handle: the run's history has every step with its loss, and the key's usage counts every trained token."""
    from datetime import datetime, timedelta, timezone

    run, data, losses, _ = trained
    deadline = time.monotonic() + 60
    while len(run.history()) < len(losses) and time.monotonic() < deadline:
        time.sleep(0.2)
    steps = run.history()
    assert [s.step for s in steps] == list(range(1, len(losses) + 1))
    assert [s.loss for s in steps] == pytest.approx(losses, rel=1e-6)
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    buckets = alice.usage((hour - timedelta(hours=2)).isoformat(), (hour + timedelta(hours=1)).isoformat())
    trained_tokens = sum(b.quantity for b in buckets if b.kind == "training")
    assert trained_tokens >= len(losses) * sum(len(d.model_input) for d in data)
    with TwinkleClient(base_url, api_key=BOB) as bob:
        with pytest.raises(TwinkleNotFoundError):
            bob.run_history(run.run_id)
    # the web console of a twinkle-mode server shows the run and its curve from those reports
    with httpx.Client(base_url=base_url, timeout=30) as browser:
        assert browser.post("/console/login", data={"api_key": ALICE}).status_code == 303
        page = browser.get(f"/console/runs/{run.run_id}")
        assert page.status_code == 200 and run.run_id in page.text
        history = browser.get(f"/console/runs/{run.run_id}/history.json").json()["steps"]
        assert [s["loss"] for s in history] == pytest.approx(losses, rel=1e-6)


def test_resume_in_a_new_client_is_exact(base_url, trained):
    run, data, _losses, _ckpt = trained
    before = run.forward(data)
    with TwinkleClient(base_url, api_key=ALICE) as fresh:
        resumed = fresh.resume(run.run_id)  # the run's latest state checkpoint
        assert resumed.run_id != run.run_id
        after = resumed.forward(data)
        for i in range(len(data)):
            assert after.logprobs(i) == pytest.approx(before.logprobs(i), abs=1e-6)
        # ...and it trains on: the same step on both gives the same loss (optimizer moments restored)
        a = run.forward_backward(data).loss
        b = resumed.forward_backward(data).loss
        assert b == pytest.approx(a, rel=1e-5)
        run.optim_step(learning_rate=3e-3)
        resumed.optim_step(learning_rate=3e-3)
        assert resumed.forward(data).logprobs(0) == pytest.approx(run.forward(data).logprobs(0), abs=1e-5)


def test_sampling_reproduces_what_was_learned(alice, trained):
    run, _data, _losses, _ckpt = trained
    row = {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris."}
    prompt = alice.tokenize([row["prompt"]])[0]
    completion = alice.tokenize([row["completion"]], add_special_tokens=False)[0]
    sampler_ckpt = run.save("sampler-final", kind="sampler")
    out = alice.sample(prompt, model_uri=sampler_ckpt.uri, max_tokens=len(completion) + 4, temperature=0.0,
                       num_samples=2, decode=True)
    for seq in out.sequences:
        assert seq.tokens[: len(completion)] == completion, seq
        assert seq.text.startswith(row["completion"])
        assert len(seq.logprobs) == len(seq.tokens)
    # the handle samples its current weights (saved for the sampler on the way)
    assert run.sample(row["prompt"], max_tokens=len(completion), temperature=0.0).sequences[0].tokens == completion


def test_the_openai_surface_serves_native_checkpoints(base_url, alice, trained):
    """server_type twinkle answers OpenAI clients at <root>/oai/api/v1 too, with the same keys and rules."""
    import openai

    from twinkle_client.openai import openai_client

    run, _data, _losses, _ckpt = trained
    sampler_ckpt = run.save("oai-final", kind="sampler")
    client, model = openai_client(base_url, ALICE, checkpoint=sampler_ckpt.uri, max_retries=0)
    assert {model, "tiny-qwen2"} <= {m.id for m in client.models.list().data}
    out = client.completions.create(model=model, prompt="Q: What is the capital of France?\nA:", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text.startswith(" Paris")
    bob, _ = openai_client(base_url, BOB, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=model, prompt="x", max_tokens=2)


def test_two_keys_are_isolated(base_url, alice, trained):
    run, data, _losses, ckpt = trained
    with TwinkleClient(base_url, api_key=BOB) as bob:
        assert bob.capabilities().principal != alice.capabilities().principal
        assert run.run_id not in [r.run_id for r in bob.iter_training_runs()]
        with pytest.raises(TwinkleNotFoundError):
            bob.get_training_run(run.run_id)
        with pytest.raises(TwinkleNotFoundError):
            bob.training_run(run.run_id)
        with pytest.raises(TwinkleNotFoundError):
            bob.resume(ckpt.uri)
        with pytest.raises(TwinkleNotFoundError):
            bob.sample([1, 2, 3], model_uri=ckpt.uri, max_tokens=2)
        with pytest.raises(TwinkleNotFoundError):
            bob.delete_checkpoint(ckpt.uri)
        assert ckpt.uri not in [c.uri for c in bob.list_checkpoints()]
        # straight at the model app: someone else's run does not exist there either
        r = httpx.post(f"{base_url}/models/tiny-qwen2/runs/{run.run_id}/forward",
                       json={"data": [_json_datum(data[0])]}, headers={"X-API-Key": BOB}, timeout=30)
        assert r.status_code == 404, r.text
    with pytest.raises(TwinkleAuthError):
        TwinkleClient(base_url, api_key="tml-not-a-key").capabilities()
    r = httpx.get(f"{base_url}/models/tiny-qwen2/runs/{run.run_id}", timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["detail"]


def test_bad_rows_and_bad_requests_get_clear_errors(alice, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n{"messages": [{"role": "bot", '
                   '"content": "x"}]}\n')
    with pytest.raises(TwinkleUserError) as e:
        alice.encode_datums(bad)
    assert e.value.status == 400 and e.value.field == "line 3" and "line 4" in e.value.detail
    pages = list(alice.encode_dataset(bad, on_error="skip"))
    assert [err.where for err in pages[0].errors] == ["line 3", "line 4"] and len(pages[0].data) == 1

    run = alice.create_training_run(rank=4, seed=0)
    good = [Datum.supervised([11, 12, 13], [14, 15])]
    with pytest.raises(TwinkleUserError) as e:
        run.forward_backward(good, loss_fn="no_such_loss")
    assert e.value.field == "loss_fn"
    wrong = Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": good[0].loss_fn_inputs["target_tokens"]})
    with pytest.raises(TwinkleUserError) as e:
        run.forward_backward([wrong])
    assert e.value.status == 400 and "data[0]" in (e.value.field or e.value.detail)
    with pytest.raises(TwinkleUserError) as e:
        run.load("/etc/passwd")
    assert e.value.field == "uri" and "twinkle://" in e.value.detail
    with pytest.raises(TwinkleUserError) as e:
        run.save("../escape")
    assert e.value.field == "name"
    with pytest.raises(TwinkleUserError) as e:
        run.optim_step(learning_rate=-1.0)
    with pytest.raises(TwinkleUserError) as e:
        alice.create_training_run(rank=0)
    assert e.value.field == "lora.rank"
    # the run is still usable, promptly (every refused request released its seq_id)
    t0 = time.monotonic()
    first = run.forward_backward(good).loss
    run.optim_step(learning_rate=1e-2)
    assert run.forward_backward(good).loss < first
    assert time.monotonic() - t0 < 20
    assert run.state().step == 1


def _json_datum(d: Datum) -> dict:
    import msgspec

    return msgspec.to_builtins(d)
