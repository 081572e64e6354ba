"""The unmodified official ``tinker`` SDK against the Tinker-compatible server.

By default the server runs in-process (real Model and Sampler services over the built-in tiny model, served
by uvicorn on a free loopback port). Set ``TWINKLE_TEST_BASE_URL`` to run the same tests against a deployed
server (e.g. ``hatch run deploy deploy/local-tinker.yaml`` → ``http://127.0.0.1:8000``); then
``TWINKLE_TEST_API_KEYS`` may give two comma-separated keys (default: two ``tml-`` keys for an open-mode
server) and ``TWINKLE_TEST_MAX_BODY_BYTES`` the server's body limit for the oversize test.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.acceptance

BASE_URL = os.environ.get("TWINKLE_TEST_BASE_URL")
KEYS = [k.strip() for k in os.environ.get("TWINKLE_TEST_API_KEYS", "tml-sdk-alice,tml-sdk-bob").split(",")]
LOCAL_MAX_BODY = 8 * 1024 * 1024
# A short sequence the tiny model memorises in ~30 steps at this learning rate (seeded LoRA init).
SEQ = [101, 202, 303, 404, 505, 606, 707, 808, 909, 1001, 1102, 1203]
PROMPT_LEN = 4
ADAM = types.AdamParams(learning_rate=3e-3)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    if BASE_URL:
        yield BASE_URL.rstrip("/")
        return
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    root = tmp_path_factory.mktemp("tinker-sdk")
    settings = TinkerSettings(checkpoint_dir=str(root / "ckpt"), max_body_bytes=LOCAL_MAX_BODY)
    with LocalTinkerServer(settings, TINY_MODEL_ID) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def sc(base_url):
    client = tinker.ServiceClient(base_url=base_url, api_key=KEYS[0])
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def base_model(sc):
    caps = sc.create_rest_client().get_server_capabilities().result()
    trainable = [m.model_name for m in caps.supported_models if m.trainable and m.sampleable]
    assert trainable, caps
    return trainable[0]


def _datum(seq=SEQ, weights=None):
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                       loss_fn_inputs={"target_tokens": seq[1:], "weights": weights or [1.0] * (len(seq) - 1)})


def _step(tc, data, loss_fn="cross_entropy", config=None):
    """The SDK's supervised step: both submitted before either is awaited."""
    fb = tc.forward_backward(data, loss_fn, loss_fn_config=config)
    op = tc.optim_step(ADAM)
    return fb.result(), op.result()


@pytest.fixture(scope="module")
def trained(sc, base_model):
    """A run that memorised SEQ; its loss curve."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=16, seed=0,
                                        user_metadata={"purpose": "test"}).result()
    losses = []
    for _ in range(36):
        fb, _op = _step(tc, [_datum()])
        losses.append(fb.metrics["loss:sum"])
    return tc, losses


def test_supervised_loss_falls(trained):
    tc, losses = trained
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.1 * losses[0], losses
    info = tc.get_info()
    assert info.model_data.model_name and info.lora_rank == 16


def test_the_sdk_loads_the_tokenizer_the_server_names(trained):
    """get_tokenizer() is AutoTokenizer.from_pretrained(tokenizer_id): for the built-in model that is its local
    directory, loadable by a client on the server's machine without any hub."""
    tc, _ = trained
    tokenizer = tc.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("hello world", add_special_tokens=False)) == "hello world"


def test_a_model_may_be_named_by_its_tokenizer_id(sc, trained, base_model):
    """tinker-cookbook passes one string as base_model and to AutoTokenizer.from_pretrained: the tokenizer_id
    the server reports (here the model's directory) names the same base model."""
    tc, _ = trained
    tokenizer_id = tc.get_info().model_data.tokenizer_id
    assert tokenizer_id and tokenizer_id != base_model
    alias = sc.create_lora_training_client(base_model=tokenizer_id, rank=4).result()
    assert alias.get_info().model_data.model_name == base_model
    res = sc.create_sampling_client(base_model=tokenizer_id).sample(
        types.ModelInput.from_ints(SEQ[:4]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)).result()
    assert len(res.sequences[0].tokens) == 2
    with pytest.raises(tinker.BadRequestError, match="unknown base_model"):
        sc.create_lora_training_client(base_model=tokenizer_id + "-nope", rank=4).result()


def test_forward_gives_logprobs_and_changes_nothing(trained):
    tc, _ = trained
    a = tc.forward([_datum()], "cross_entropy").result()
    b = tc.forward([_datum()], "cross_entropy").result()
    lp = a.loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lp) == len(SEQ) - 1
    assert lp == b.loss_fn_outputs[0]["logprobs"].tolist()
    assert a.metrics["loss:sum"] == pytest.approx(-sum(lp), rel=1e-4)


def test_greedy_sampling_reproduces_the_trained_sequence(trained):
    tc, _ = trained
    sampler = tc.save_weights_and_get_sampling_client()
    out = sampler.sample(types.ModelInput.from_ints(SEQ[:PROMPT_LEN]), num_samples=2,
                         sampling_params=types.SamplingParams(max_tokens=len(SEQ) - PROMPT_LEN, temperature=0.0,
                                                              stop=[])).result()
    assert len(out.sequences) == 2
    for s in out.sequences:
        assert s.tokens == SEQ[PROMPT_LEN:]
        assert s.logprobs is not None and len(s.logprobs) == len(s.tokens)
        assert s.stop_reason == "length" and s.sequence_id


def test_compute_logprobs_agrees_with_the_trainer(trained):
    tc, _ = trained
    trainer = tc.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    sampler = tc.save_weights_and_get_sampling_client()
    lp = sampler.compute_logprobs(types.ModelInput.from_ints(SEQ)).result()
    assert lp[0] is None and len(lp) == len(SEQ)
    assert np.allclose(lp[1:], trainer, atol=2e-3), (lp[1:], trainer)


def test_sdk_038_prompt_and_sample_extras_agree_with_the_trainer(trained):
    """topk_prompt_logprobs, topk_sample_logprobs, target_prompt_logprobs (sparse CSR: unlisted cells ask
    nothing) and prompt_alt_tokens_k, through the unmodified SDK, against the trainer's teacher-forced
    logprobs; prompt_logprobs_last_n cuts the top-k rows too."""
    tc, _ = trained
    trainer = tc.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    sampler = tc.save_weights_and_get_sampling_client()
    n = len(SEQ)
    # column 0 asks the prompt's own next token, column 1 nothing except at row 2 (token 5)
    crow = [0] + [1 + (1 if r >= 2 else 0) + r for r in range(n - 1)]
    cols, vals = [], []
    for r in range(n - 1):
        cols.append(0), vals.append(SEQ[r + 1])
        if r == 2:
            cols.append(1), vals.append(5)
    target = types.TensorData(data=vals, dtype="int64", shape=[n - 1, 2], sparse_crow_indices=crow,
                              sparse_col_indices=cols)
    res = sampler.sample(types.ModelInput.from_ints(SEQ), num_samples=2,
                         sampling_params=types.SamplingParams(max_tokens=3, temperature=1.0, seed=5),
                         include_prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=2,
                         target_prompt_logprobs=target, prompt_alt_tokens_k=4).result()
    assert np.allclose(res.prompt_logprobs[1:], trainer, atol=2e-3)
    top = res.topk_prompt_logprobs
    assert top[0] is None and len(top) == n
    for i in range(1, n):
        assert len(top[i]) == 3 and top[i][0][1] >= top[i][1][1] >= top[i][2][1]
        # the memorised next token is the most likely one, with the trainer's logprob
        assert top[i][0][0] == SEQ[i] and abs(top[i][0][1] - trainer[i - 1]) < 2e-3
    tp = res.target_prompt_logprobs.to_numpy()
    assert tp.shape == (n - 1, 2) and np.allclose(tp[:, 0], trainer, atol=2e-3)
    assert tp[2, 1] < 0 and tp[0, 1] == 0.0  # asked at row 2 only
    alt = res.prompt_alt_tokens
    tokens, logprobs = alt.tokens.to_numpy(), alt.logprobs.to_numpy()
    assert tokens.shape == logprobs.shape == (n - 1, 4) and (logprobs <= 0).all()
    for seq in res.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens)
        assert all(len(row) == 2 and row[0][1] >= row[1][1] for row in seq.topk_logprobs)
        assert all(abs(seq.logprobs[k] - dict(row).get(t, seq.logprobs[k])) < 1e-5
                   for k, (t, row) in enumerate(zip(seq.tokens, seq.topk_logprobs)))
    last = sampler.sample(types.ModelInput.from_ints(SEQ), num_samples=1,
                          sampling_params=types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                          topk_prompt_logprobs=2, prompt_logprobs_last_n=3).result()
    assert last.topk_prompt_logprobs[: n - 3] == [None] * (n - 3)
    assert all(row is not None for row in last.topk_prompt_logprobs[n - 3:])
    with pytest.raises(tinker.BadRequestError, match="target_prompt_logprobs"):
        sampler.sample(types.ModelInput.from_ints(SEQ), num_samples=1, sampling_params=types.SamplingParams(max_tokens=1),
                       target_prompt_logprobs=types.TensorData(data=[1], dtype="int64", shape=[1, 1])).result()


def test_save_state_and_resume_exactly(sc, trained):
    tc, _ = trained
    path = tc.save_state("resume-point").result().path
    assert path == f"tinker://{tc.model_id}/weights/resume-point"
    resumed = sc.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != tc.model_id
    # the same next step on both: same loss, same weights afterwards (optimizer moments restored)
    data = [_datum(SEQ[::-1])]
    fb_a, _ = _step(tc, data)
    fb_b, _ = _step(resumed, data)
    assert fb_b.metrics["loss:sum"] == pytest.approx(fb_a.metrics["loss:sum"], rel=1e-5)
    la = tc.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    lb = resumed.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert np.allclose(la, lb, atol=1e-5)
    # weights only: same logprobs as at the save
    weights_only = sc.create_training_client_from_state(path).result()
    assert weights_only.get_info().lora_rank == 16
    lw = weights_only.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert len(lw) == len(SEQ) - 1


@pytest.mark.parametrize("loss_fn, config", [
    ("importance_sampling", None),
    ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("cispo", None),
])
def test_rl_step(sc, base_model, loss_fn, config):
    tc = sc.create_lora_training_client(base_model=base_model, rank=8).result()
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = SEQ[:PROMPT_LEN]
    res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                         sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)).result()
    data = []
    for i, s in enumerate(res.sequences):
        assert s.logprobs is not None and len(s.logprobs) == len(s.tokens) > 0
        n_prompt = len(prompt) - 1
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(prompt + s.tokens[:-1]),
            loss_fn_inputs={"target_tokens": [0] * n_prompt + s.tokens,
                            "logprobs": [0.0] * n_prompt + list(s.logprobs),
                            "advantages": [0.0] * n_prompt + [1.0 if i % 2 else -1.0] * len(s.tokens)}))
    fb, op = _step(tc, data, loss_fn, config)
    assert len(fb.loss_fn_outputs) == len(data)
    assert math.isfinite(fb.metrics["loss:sum"])
    for d, out in zip(data, fb.loss_fn_outputs):
        lp = out["logprobs"].tolist()
        assert len(lp) == d.model_input.length
        # the run's first step starts from the sampler's weights: the importance ratio is 1 on sampled tokens
        sampled = d.loss_fn_inputs["logprobs"].tolist()
        n = len(prompt) - 1
        assert np.allclose(lp[n:], sampled[n:], atol=2e-3)
    assert op.metrics is not None


def _rl_datum(prompt, seq, advantage, *, logprobs=None, targets=None, sequence_id=None):
    """A cookbook-shaped RL datum: prompt + sampled tokens, advantages on the sampled ones, provenance."""
    n_prompt, tokens = len(prompt) - 1, list(seq.tokens)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(prompt + tokens[:-1]),
        loss_fn_inputs={"target_tokens": prompt[1:] + (targets or tokens),
                        "logprobs": [0.0] * n_prompt + list(logprobs if logprobs is not None else seq.logprobs),
                        "advantages": [0.0] * n_prompt + [advantage] * len(tokens)})
    sid = sequence_id or seq.sequence_id
    return datum.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=len(prompt)),
                     types.SampledProvenanceSpan(sequence_id=sid, length=len(tokens) - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt),
                        types.SampledProvenanceSpan(sequence_id=sid, length=len(tokens))])


def test_stable_reinforce_trains_on_what_the_sampler_recorded(base_url, sc, base_model):
    """The behaviour logprobs come from the server's record of each sampled sequence, not from the datum: the
    client sends zeros, yet the ratio is 1 on the sampler's own weights. Provenance that is missing, names a
    sequence of another session or one sampled without record_stability_info, or claims other tokens, is a
    user error naming the field, and the run stays usable."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=8, seed=3).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True)
    prompt = SEQ[:PROMPT_LEN]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11)
    res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=4, sampling_params=params).result()
    assert len({s.sequence_id for s in res.sequences}) == 4
    data = [_rl_datum(prompt, s, 1.0 if i % 2 else -1.0, logprobs=[0.0] * len(s.tokens))
            for i, s in enumerate(res.sequences)]
    fb = tc.forward_backward(data, "stable_reinforce").result()
    assert fb.metrics["ratio:mean"] == pytest.approx(1.0, abs=2e-3)
    assert fb.metrics["clip_fraction:mean"] == 0.0
    expected = 0.0  # r = 1: the loss is -sum(A * lp) over sampled tokens
    for d, out in zip(data, fb.loss_fn_outputs):
        lp = out["logprobs"].tolist()
        expected -= sum(a * x for a, x in zip(d.loss_fn_inputs["advantages"].tolist(), lp))
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=2e-3, abs=2e-3)
    assert tc.optim_step(ADAM).result().metrics is not None

    def refused(datum, match, client=tc):  # a 400 at submission: the seq_id is released, the run goes on
        with pytest.raises(tinker.BadRequestError, match=match):
            client.forward_backward([datum], "stable_reinforce").result()

    seq = res.sequences[0]
    plain = types.Datum(model_input=data[0].model_input, loss_fn_inputs=data[0].loss_fn_inputs)
    refused(plain, r"loss_fn_input_spans: stable_reinforce needs provenance")
    wrong = [(t + 1) % 100 for t in seq.tokens]
    refused(_rl_datum(prompt, seq, 1.0, targets=wrong), r"are not the tokens sequence")
    unrecorded = tc.save_weights_and_get_sampling_client().sample(
        types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result().sequences[0]
    refused(_rl_datum(prompt, unrecorded, 1.0), r"sequence_id: no recorded sequence")
    with tinker.ServiceClient(base_url=base_url, api_key=KEYS[0]) as other_session:
        other = other_session.create_lora_training_client(base_model=base_model, rank=8).result()
        refused(data[0], "no recorded sequence", other)
    fb = tc.forward_backward(data, "stable_reinforce").result()  # still usable
    assert math.isfinite(fb.metrics["loss:sum"])


def test_the_cli_downloads_a_checkpoint_that_stock_peft_loads(base_url, sc, trained, tmp_path):
    """``tinker checkpoint download tinker://…/weights/…`` (the SDK's CLI, unmodified): it loads the state into a
    new run, exports it with save_weights_external, fetches every file from the signed URLs and deletes the
    export. Stock peft then gives exactly the server's logprobs."""
    import subprocess
    import sys

    import torch
    from peft import PeftModel
    from twinkle.common.models import TINY_MODEL_ID, load_causal_lm

    tc, _ = trained
    state = tc.save_state("for-download").result().path
    env = {**os.environ, "TINKER_BASE_URL": base_url, "TINKER_API_KEY": KEYS[0]}
    run = subprocess.run([sys.executable, "-m", "tinker.cli", "checkpoint", "download", state, "--output",
                          str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    target = tmp_path / state.replace("tinker://", "").replace("/", "_")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    ours = tc.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    model = PeftModel.from_pretrained(load_causal_lm(TINY_MODEL_ID), str(target)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([SEQ[:-1]])).logits.float()
    theirs = torch.log_softmax(logits, -1)[0].gather(-1, torch.tensor(SEQ[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(ours), theirs, rtol=0, atol=0)
    # the CLI deleted its temporary export
    left = sc.create_rest_client().list_user_checkpoints().result().checkpoints
    assert not [c for c in left if c.checkpoint_type == "external"]


def test_exported_weights_urls_are_signed_and_expire_with_the_checkpoint(base_url, sc, trained):
    import httpx

    tc, _ = trained
    path = tc.save_weights_external("export-1").result().path
    assert path.endswith("/external_weights/export-1")
    rest = tinker.RestClient(base_url=base_url, api_key=KEYS[0])
    urls = rest.get_external_weights_urls(path).result().urls
    assert sorted(urls) == ["adapter_config.json", "adapter_model.safetensors"]
    with httpx.Client(timeout=30) as http:
        assert http.get(urls["adapter_config.json"]).json()["r"] == 16  # no API key: the URL is the credential
        forged = urls["adapter_config.json"].replace("adapter_config.json", "adapter_model.safetensors")
        assert http.get(forged).status_code == 404  # signed for one file only
        assert http.get(urls["adapter_config.json"] + "x").status_code == 404
        bob = tinker.RestClient(base_url=base_url, api_key=KEYS[1])  # another key cannot sign them
        with pytest.raises(tinker.NotFoundError):
            bob.get_external_weights_urls(path).result()
        with pytest.raises(tinker.BadRequestError, match="already exists"):
            tc.save_weights_external("export-1").result()
        rest.delete_checkpoint_from_tinker_path(path).result()
        assert http.get(urls["adapter_model.safetensors"]).status_code == 404


def test_inflight_sampling_clients_follow_the_runs_newest_weights(sc, base_model):
    """Async RL keeps its samplers across steps: every inflight client of a run samples with the newest inflight
    weights, also after far more saves than the ephemeral weights a run keeps (where a snapshot answers 410)."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=8, seed=2).result()
    prompt = types.ModelInput.from_ints(SEQ[:PROMPT_LEN])

    def logprobs(client):
        return client.compute_logprobs(types.ModelInput.from_ints(SEQ)).result()[1:]

    first = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    before = logprobs(first)
    for _ in range(10):  # more than ephemeral_keep (8) saves, each after a step
        _step(tc, [_datum()])
        latest = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    trainer = tc.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    assert np.allclose(logprobs(first), trainer, atol=2e-3) and not np.allclose(before, trainer, atol=2e-3)
    assert np.allclose(logprobs(latest), trainer, atol=2e-3)
    assert len(first.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences[0].tokens) == 2
    with pytest.raises(tinker.APIStatusError) as e:  # a snapshot's weights were cleaned up meanwhile
        snapshot.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result()
    assert e.value.status_code == 410


def test_copies_of_a_sampling_client_join_its_session(base_url, trained):
    """A SamplingClient pickled into workers (as RL rollouts do) joins its sampling session and gets its own
    block of seq_ids: every copy's requests are answered, none is mistaken for another's."""
    import pickle

    import httpx

    tc, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    copies = [pickle.loads(pickle.dumps(sampler)) for _ in range(3)]
    prompt = types.ModelInput.from_ints(SEQ[:PROMPT_LEN])
    outs = [[c.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result().sequences[0].tokens
             for _ in range(2)] for c in [sampler, *copies]]
    assert all(tokens == SEQ[PROMPT_LEN:PROMPT_LEN + 4] for per_client in outs for tokens in per_client)
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{base_url}/api/v1/join_sampling_session", headers={"X-API-Key": KEYS[1]},
                      json={"sampling_session_id": sampler._sampling_session_id})
        assert r.status_code == 404  # another key's session
        r = http.post(f"{base_url}/api/v1/join_sampling_session", headers={"X-API-Key": KEYS[0]},
                      json={"sampling_session_id": sampler._sampling_session_id})
        assert r.json() == {"client_counter": 4, "type": "join_sampling_session"}  # the three copies joined


def test_rest_client_checkpoints(sc, trained):
    tc, _ = trained
    rc = sc.create_rest_client()
    named = tc.save_weights_for_sampler("rest-sampler").result().path
    state = tc.save_state("rest-state", ttl_seconds=3600).result().path
    listed = rc.list_checkpoints(tc.model_id).result().checkpoints
    ids = {c.checkpoint_id: c for c in listed}
    assert {"weights/rest-state", "sampler_weights/rest-sampler"} <= set(ids)
    assert ids["weights/rest-state"].expires_at is not None and ids["weights/rest-state"].size_bytes > 0
    run = rc.get_training_run_by_tinker_path(state).result()
    assert run.training_run_id == tc.model_id and run.user_metadata == {"purpose": "test"}
    assert run.lora_rank == 16 and run.is_lora
    info = rc.get_weights_info_by_tinker_path(state).result()
    assert info.lora_rank == 16 and info.base_model == tc.get_info().model_data.model_name
    runs = rc.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= 1
    mine = rc.list_user_checkpoints(limit=1000).result()
    assert state in [c.tinker_path for c in mine.checkpoints]
    rc.publish_checkpoint_from_tinker_path(state).result()
    assert {c.tinker_path: c.public for c in rc.list_checkpoints(tc.model_id).result().checkpoints}[state]
    rc.unpublish_checkpoint_from_tinker_path(state).result()
    rc.set_checkpoint_ttl_from_tinker_path(state, None).result()
    rc.delete_checkpoint_from_tinker_path(named).result()
    rc.delete_checkpoint(tc.model_id, "weights/rest-state").result()
    left = {c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert not left & {"weights/rest-state", "sampler_weights/rest-sampler"}
    s2 = tc.save_weights_for_sampler("rest-s2").result().path
    sc.create_sampling_client(model_path=s2).result()
    session = rc.get_session(sc.holder.get_session_id()).result()
    assert tc.model_id in session.training_run_ids
    assert sc.holder.get_session_id() in rc.list_sessions().result().sessions
    sampler = rc.get_sampler(session.sampler_ids[-1]).result()
    assert (sampler.base_model, sampler.model_path) == (tc.get_info().model_data.model_name, s2)


def test_two_keys_cannot_see_each_other(base_url, sc, trained):
    tc, _ = trained
    path = tc.save_state("private").result().path
    other = tinker.ServiceClient(base_url=base_url, api_key=KEYS[1])
    try:
        rc = other.create_rest_client()
        with pytest.raises(tinker.NotFoundError):
            rc.get_training_run(tc.model_id).result()
        with pytest.raises(tinker.NotFoundError):
            rc.list_checkpoints(tc.model_id).result()
        assert tc.model_id not in [r.training_run_id for r in rc.list_training_runs(limit=100).result().training_runs]
        assert path not in [c.tinker_path for c in rc.list_user_checkpoints(limit=1000).result().checkpoints]
        with pytest.raises(tinker.NotFoundError):
            rc.delete_checkpoint_from_tinker_path(path).result()
        with pytest.raises(tinker.NotFoundError):
            other.create_training_client_from_state(path).result()
    finally:
        other.close("success").result()
    # still there for its owner
    assert path in [c.tinker_path for c in sc.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints]


def test_bad_requests_are_clear_and_leave_the_run_usable(sc, base_model):
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()

    def still_usable():
        fb, op = _step(tc, [_datum()])
        assert math.isfinite(fb.metrics["loss:sum"]) and op.metrics is not None

    with pytest.raises(tinker.RequestFailedError, match="weights") as e:  # wrong shape
        tc.forward_backward([_datum(weights=[1.0, 1.0])], "cross_entropy").result()
    assert e.value.category.value == "user"
    still_usable()
    with pytest.raises(tinker.RequestFailedError, match="unknown loss") as e:
        tc.forward_backward([_datum()], "dro_v9").result()  # type: ignore[arg-type]
    assert e.value.category.value == "user"
    still_usable()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        tc.save_state("no/slashes").result()
    t0 = time.monotonic()
    still_usable()
    assert time.monotonic() - t0 < 20  # the refused seq_id did not stall the run
    with pytest.raises(tinker.BadRequestError, match="unknown base_model"):
        sc.create_lora_training_client(base_model="no-such/model", rank=4).result()
    with pytest.raises((tinker.NotFoundError, tinker.BadRequestError)):
        sc.create_training_client_from_state(f"tinker://{tc.model_id}/weights/never-saved").result()
    with pytest.raises(ValueError):  # the SDK itself refuses a non-tinker path
        sc.create_sampling_client(model_path="/etc/passwd").result()
    still_usable()


def test_oversize_payload_is_refused(sc, base_model):
    limit = int(os.environ.get("TWINKLE_TEST_MAX_BODY_BYTES", LOCAL_MAX_BODY if not BASE_URL else 0))
    if not limit:
        pytest.skip("set TWINKLE_TEST_MAX_BODY_BYTES to the deployed server's body limit")
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()
    n = limit // 8 + 1000  # one datum (never split by the SDK) of > limit bytes of int32 tokens + float weights
    big = types.Datum(model_input=types.ModelInput.from_ints([7] * n),
                      loss_fn_inputs={"target_tokens": np.full(n, 7, dtype=np.int64),
                                      "weights": np.zeros(n, dtype=np.float32)})
    with pytest.raises(tinker.APIStatusError, match="too large") as e:
        tc.forward_backward([big], "cross_entropy").result()
    assert e.value.status_code == 413
    fb, _ = _step(tc, [_datum()])
    assert math.isfinite(fb.metrics["loss:sum"])


def test_close_finishes_the_session(base_url, base_model):
    client = tinker.ServiceClient(base_url=base_url, api_key=KEYS[0])
    client.create_lora_training_client(base_model=base_model, rank=4).result()
    session_id = client.holder.get_session_id()
    client.close("success", detail="done").result()
    rc = tinker.ServiceClient(base_url=base_url, api_key=KEYS[0]).create_rest_client()
    assert session_id in rc.list_sessions(limit=1000).result().sessions


def test_the_cli_login_check_verifies_a_key(base_url):
    """``tinker auth login`` checks a pasted key with GET /api/v1/auth/apikey/me before storing it."""
    import httpx
    from tinker.cli.auth_api import AuthApiError, TinkerAuthApi

    with httpx.Client(timeout=30) as http:
        api = TinkerAuthApi(http, base_url=base_url)
        me = api.get_self_api_key(KEYS[0])
        assert me.name.startswith("p-") and me.details.org_details.name == "twinkle" and me.key_id > 0
        assert api.get_self_api_key(KEYS[1]).key_id != me.key_id
        with pytest.raises(AuthApiError, match="401"):
            api.get_self_api_key("not-a-key")
