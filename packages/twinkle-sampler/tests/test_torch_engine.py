"""The torch engine against stock transformers/peft on the real tiny Qwen2 model.

Tolerance for logprobs: 1e-4 absolute (float32; the sampler's incremental KV-cache decode vs one
teacher-forced forward pass differ by ~1e-6 in practice).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time

import pytest
import torch

from twinkle.common.wire import (NotFoundError, SampleOutput, SampleRequest, SamplingParams, ServiceHealth, ServiceInfo,
                                 UserError)

ATOL = 1e-4


def max_abs_diff(a, b) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


def R(prompt, adapter=None, n=1, prompt_logprobs=False, **params) -> SampleRequest:
    return SampleRequest(prompt=list(prompt), sampling_params=SamplingParams(**params), num_samples=n,
                         prompt_logprobs=prompt_logprobs, adapter_path=adapter)


async def sample_all(service, reqs) -> list[SampleOutput]:
    return list(await asyncio.gather(*(service.sample(r) for r in reqs)))


# -- greedy and logprobs ---------------------------------------------------------------------------------


async def test_greedy_equals_generate_base_and_lora_in_one_mixed_padded_batch(service, engine, reference,
                                                                              prompts, adapters):
    # Six prompts of different lengths x (base, adapter 0, adapter 1), all at once: one left-padded batch
    # with three different adapters in it.
    cases = [(p, a) for p in prompts for a in (None, adapters[0], adapters[1])]
    engine.reset_stats()
    outs = await sample_all(service, [R(p, a, max_tokens=24, temperature=0.0) for p, a in cases])
    assert engine.stats()["batches"] == 1
    for (p, a), out in zip(cases, outs):
        want = reference.greedy(a, p, 24)
        seq = out.sequences[0]
        assert seq.tokens == want, (a, p)
        assert seq.stop_reason == ("stop" if want[-1] in engine.eos_token_ids else "length")
        assert max_abs_diff(seq.logprobs, reference.teacher_forced(a, p, seq.tokens)) < ATOL


async def test_greedy_is_repeatable_without_a_seed(service, prompts):
    a, b = await sample_all(service, [R(prompts[0], max_tokens=16, temperature=0.0)] * 2)
    assert a.sequences[0].tokens == b.sequences[0].tokens


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.3),
     dict(temperature=0.9, top_k=50, top_p=0.5)],
    ids=["plain", "top_k", "top_p", "top_k+top_p"],
)
async def test_sampled_logprobs_are_raw_teacher_forced_and_filters_hold(service, reference, prompts, adapters,
                                                                        params):
    cases = [(prompts[1], None), (prompts[4], adapters[2]), (prompts[2], adapters[3])]
    outs = await sample_all(service, [R(p, a, n=3, max_tokens=20, seed=11, **params) for p, a in cases])
    T, k, top_p = params["temperature"], params.get("top_k", -1), params.get("top_p", 1.0)
    for (p, a), out in zip(cases, outs):
        assert len(out.sequences) == 3
        for seq in out.sequences:
            assert len(seq.tokens) == len(seq.logprobs) == 20 and seq.stop_reason == "length"
            # reported logprobs = log_softmax of the RAW logits (not tempered/filtered)
            assert max_abs_diff(seq.logprobs, reference.teacher_forced(a, p, seq.tokens)) < ATOL
            # every token respects top-k / top-p of the tempered distribution it was drawn from
            logits = reference.logits(a, list(p) + seq.tokens)[len(p) - 1: len(p) - 1 + len(seq.tokens)]
            for pos, tok in enumerate(seq.tokens):
                probs = torch.softmax(logits[pos] / T, dim=-1)
                rank = int((probs > probs[tok]).sum())
                if k > 0:
                    assert rank < k
                if top_p < 1.0:
                    assert float(probs[probs > probs[tok]].sum()) < top_p + 1e-5


async def test_top_k_1_is_greedy(service, reference, prompts):
    (out,) = await sample_all(service, [R(prompts[3], max_tokens=12, temperature=1.0, top_k=1, seed=3)])
    assert out.sequences[0].tokens == reference.greedy(None, prompts[3], 12)


# -- seeds -------------------------------------------------------------------------------------------------


async def test_same_seed_same_output_different_seed_different_output(service, prompts, adapters):
    p = prompts[1]
    base = dict(max_tokens=24, temperature=1.0)
    a1, a2, b = await sample_all(service, [R(p, adapters[0], seed=42, **base), R(p, adapters[0], seed=42, **base),
                                           R(p, adapters[0], seed=43, **base)])
    assert a1.sequences[0].tokens == a2.sequences[0].tokens
    assert a1.sequences[0].tokens != b.sequences[0].tokens
    # Reproducible regardless of batch company: alone, then amid 5 other requests with other adapters.
    (alone,) = await sample_all(service, [R(p, adapters[0], seed=42, **base)])
    crowd = await sample_all(service, [R(prompts[i], adapters[i], seed=i, **base) for i in range(5)]
                             + [R(p, adapters[0], seed=42, **base)])
    assert alone.sequences[0].tokens == crowd[-1].sequences[0].tokens == a1.sequences[0].tokens
    # Without a seed, two draws differ.
    u1, u2 = await sample_all(service, [R(p, max_tokens=24, temperature=1.0)] * 2)
    assert u1.sequences[0].tokens != u2.sequences[0].tokens


async def test_num_samples_are_distinct_seeded_streams(service, reference, prompts):
    p = prompts[0]
    four, one = await sample_all(service, [R(p, n=4, max_tokens=16, seed=5), R(p, n=1, max_tokens=16, seed=5)])
    toks = [s.tokens for s in four.sequences]
    assert len(toks) == 4 and len({tuple(t) for t in toks}) == 4
    assert toks[0] == one.sequences[0].tokens  # sample i's stream depends on (seed, i) only
    for s in four.sequences:
        assert max_abs_diff(s.logprobs, reference.teacher_forced(None, p, s.tokens)) < ATOL


# -- stops -------------------------------------------------------------------------------------------------


async def test_stop_strings_end_with_the_completing_token(service, reference, tokenizer, prompts):
    p = prompts[4]
    full = reference.greedy(None, p, 30)
    assert len(full) == 30
    # A stop string that straddles a token boundary: the last character of token j-1's text + token j's text
    # (at a boundary with clean text: no half UTF-8 characters).
    def boundary(j):
        a, b = tokenizer.decode(full[:j]), tokenizer.decode(full[: j + 1])
        return a[-1:] + b[len(a):] if a and len(b) > len(a) and b.startswith(a) else ""

    j = next(j for j in range(3, 30) if boundary(j) and "\ufffd" not in boundary(j))
    stop = boundary(j)
    expect = next(k for k in range(30) if stop in tokenizer.decode(full[: k + 1]))
    assert expect <= j
    outs = await sample_all(service, [
        R(p, max_tokens=30, temperature=0.0, stop=stop),
        R(p, max_tokens=30, temperature=0.0, stop=["never-generated-zzz", stop]),
    ])
    for out in outs:
        seq = out.sequences[0]
        assert seq.tokens == full[: expect + 1] and seq.stop_reason == "stop"
        assert stop in tokenizer.decode(seq.tokens) and stop not in tokenizer.decode(seq.tokens[:-1])


async def test_stop_token_ids_include_the_stop_token(service, reference, prompts):
    p = prompts[0]
    full = reference.greedy(None, p, 30)
    stop_id = full[7]
    first = full.index(stop_id)
    (out,) = await sample_all(service, [R(p, max_tokens=30, temperature=0.0, stop=[stop_id, 1999])])
    assert out.sequences[0].tokens == full[: first + 1]
    assert out.sequences[0].stop_reason == "stop"


async def test_eos_stops_and_empty_stop_list_ignores_it(service, engine, reference, eos_adapter, prompts):
    p = prompts[0]
    eos = engine.tokenizer.eos_token_id
    assert reference.greedy(eos_adapter, p, 5) == [eos]  # the adapter really makes EOS the argmax
    default, by_id, ignore, ignore_sampled, length = await sample_all(service, [
        R(p, eos_adapter, max_tokens=9, temperature=0.0),
        R(p, eos_adapter, max_tokens=9, temperature=0.0, stop=[1234]),  # stop ids do not disable EOS
        R(p, eos_adapter, max_tokens=9, temperature=0.0, stop=[]),
        R(p, eos_adapter, n=3, max_tokens=9, temperature=1.0, seed=1, stop=[]),
        R(p, max_tokens=9, temperature=0.0),
    ])
    for out in (default, by_id):
        assert out.sequences[0].tokens == [eos] and out.sequences[0].stop_reason == "stop"
    seq = ignore.sequences[0]
    assert seq.tokens == [eos] * 9 and seq.stop_reason == "length"
    assert max_abs_diff(seq.logprobs, reference.teacher_forced(eos_adapter, p, seq.tokens)) < ATOL
    for seq in ignore_sampled.sequences:
        assert len(seq.tokens) == 9 and seq.stop_reason == "length"
        assert eos in seq.tokens[:-1]  # it went on past EOS (p(EOS) ~ 0.6 per step)
        assert max_abs_diff(seq.logprobs, reference.teacher_forced(eos_adapter, p, seq.tokens)) < ATOL
    assert len(length.sequences[0].tokens) == 9 and length.sequences[0].stop_reason == "length"


# -- prompt logprobs ---------------------------------------------------------------------------------------


async def test_prompt_logprobs_are_teacher_forced_first_null(service, reference, prompts, adapters):
    cases = [(prompts[1], None), (prompts[1], adapters[4]), (prompts[5], adapters[5]), (prompts[3], None)]
    outs = await sample_all(service, [
        R(p, a, n=2 if i == 1 else 1, prompt_logprobs=True, max_tokens=1, temperature=0.0)
        for i, (p, a) in enumerate(cases)
    ] + [R(prompts[0], max_tokens=3)])  # a request without prompt logprobs in the same batch
    for (p, a), out in zip(cases, outs):
        assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        assert all(x is not None for x in out.prompt_logprobs[1:])
        assert max_abs_diff(out.prompt_logprobs, reference.prompt_logprobs(a, p)) < ATOL
    assert outs[1].prompt_logprobs != outs[0].prompt_logprobs  # the adapter was applied
    assert outs[-1].prompt_logprobs is None


async def test_topk_target_and_alt_prompt_features_are_exact_against_teacher_forcing(service, reference, prompts,
                                                                                       adapters):
    """SDK 0.38's prompt and sample extras, in one batch with a plain request, checked against stock peft."""
    p, a = prompts[1], adapters[4]
    n = len(p)
    targets = [[p[i + 1], 7, -1] for i in range(n - 1)]
    plain, rich = await sample_all(service, [
        R(prompts[0], max_tokens=3),
        SampleRequest(prompt=list(p), adapter_path=a, num_samples=2,
                      sampling_params=SamplingParams(max_tokens=5, temperature=0.9, seed=4),
                      topk_prompt_logprobs=3, topk_sample_logprobs=4, target_prompt_logprobs=targets,
                      prompt_alt_tokens_k=6),
    ])
    assert plain.topk_prompt is None and plain.sequences[0].topk is None and plain.prompt_alt is None
    lp = torch.log_softmax(reference.logits(a, list(p)), dim=-1)  # lp[i] predicts p[i + 1]
    top = rich.topk_prompt
    assert len(top.ids) == n and top.ids[0] == [] and top.logprobs[0] == []
    for i in range(1, n):
        vals, idx = lp[i - 1].topk(3)
        assert top.ids[i] == idx.tolist() and max_abs_diff(top.logprobs[i], vals.tolist()) < ATOL
    tp = rich.target_prompt_logprobs
    assert len(tp) == n - 1 and all(len(row) == 3 for row in tp)
    for i in range(n - 1):
        assert abs(tp[i][0] - lp[i, p[i + 1]].item()) < ATOL and abs(tp[i][1] - lp[i, 7].item()) < ATOL
        assert tp[i][2] == 0.0  # -1 asked nothing
    alt = rich.prompt_alt
    assert len(alt.ids) == n - 1 and all(len(row) == 6 for row in alt.ids)
    for i in range(n - 1):
        assert max_abs_diff(alt.logprobs[i], [lp[i, t].item() for t in alt.ids[i]]) < ATOL
    assert len({t for row in alt.ids for t in row}) > n  # draws, not one repeated argmax
    for seq in rich.sequences:
        assert len(seq.topk.ids) == len(seq.tokens)
        full = torch.log_softmax(reference.logits(a, list(p) + seq.tokens), dim=-1)
        for k, t in enumerate(seq.tokens):
            vals, idx = full[n - 1 + k].topk(4)
            assert seq.topk.ids[k] == idx.tolist() and max_abs_diff(seq.topk.logprobs[k], vals.tolist()) < ATOL
    # greedy alternatives are the argmax, k times
    (greedy,) = await sample_all(service, [SampleRequest(prompt=list(p), adapter_path=a, prompt_alt_tokens_k=2,
                                                         sampling_params=SamplingParams(max_tokens=1, temperature=0))])
    assert greedy.prompt_alt.ids == [[int(lp[i].argmax())] * 2 for i in range(n - 1)]


async def test_prompt_feature_bounds_name_their_field(service, prompts):
    p = list(prompts[1])
    bad = [
        (dict(topk_prompt_logprobs=21), "topk_prompt_logprobs"),
        (dict(topk_sample_logprobs=-1), "topk_sample_logprobs"),
        (dict(prompt_alt_tokens_k=10**9), "prompt_alt_tokens_k"),
        (dict(target_prompt_logprobs=[[1]] * (len(p) - 2)), "target_prompt_logprobs"),
        (dict(target_prompt_logprobs=[[1]] * (len(p) - 2) + [[1, 2]]), "target_prompt_logprobs[" ),
        (dict(target_prompt_logprobs=[[10**6]] * (len(p) - 1)), "target_prompt_logprobs[0]"),
        (dict(target_prompt_logprobs=[[1] * 1025] * (len(p) - 1)), "target_prompt_logprobs"),
    ]
    for kwargs, field in bad:
        with pytest.raises(UserError) as e:
            await service.sample(SampleRequest(prompt=p, sampling_params=SamplingParams(max_tokens=1), **kwargs))
        assert e.value.field is not None and e.value.field.startswith(field.rstrip("[")), (kwargs, e.value)


# -- batching ----------------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_not_serialised(service, engine, prompts):
    reqs = [R(prompts[i % len(prompts)], max_tokens=16, temperature=0.0, stop=[]) for i in range(8)]
    engine.reset_stats()
    await sample_all(service, reqs)
    batched = engine.stats()
    assert batched["batches"] == 1 and batched["batch_rows"] == [8]
    assert batched["forward_calls"] == 16  # one prefill + 15 decode steps for all 8 together
    engine.reset_stats()
    for r in reqs:
        await service.sample(r)
    assert engine.stats()["forward_calls"] == 8 * 16


async def test_a_cancelled_request_stops_computing_at_the_next_step(service, engine, prompts):
    """cancel_future: the caller's await is cancelled; its rows leave the running batch at the next decode
    step, and a request still queued is never started."""
    engine.reset_stats()
    running = asyncio.ensure_future(service.sample(R(prompts[0], max_tokens=1800, temperature=0.0, stop=[])))
    deadline = time.monotonic() + 60
    while engine.stats()["decode_steps"] < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    queued = asyncio.ensure_future(service.sample(R(prompts[1], max_tokens=1800, temperature=0.0, stop=[])))
    await asyncio.sleep(0.1)
    running.cancel()
    queued.cancel()
    while engine.stats()["aborted_rows"] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.2)
    stats = engine.stats()
    assert stats["aborted_rows"] == 1 and stats["generated_tokens"] < 1800 and stats["batches"] == 1
    for task in (running, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len((await service.sample(R(prompts[1], max_tokens=2, temperature=0.0))).sequences) == 1  # still serving


async def test_max_batch_size_splits_but_serves_everything(reference, prompts):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler.torch_engine import TorchEngine

    eng = TorchEngine(TINY_MODEL_ID, engine_args={"max_batch_size": 4}, max_loras=2)
    try:
        outs = await eng.generate([R(prompts[i % 6], max_tokens=6, temperature=0.0) for i in range(10)])
        st = eng.stats()
        assert st["max_batch_rows"] <= 4 and st["batches"] >= 3
        for i, out in enumerate(outs):
            assert out.sequences[0].tokens == reference.greedy(None, prompts[i % 6], 6)
    finally:
        await eng.close()


# -- adapters ----------------------------------------------------------------------------------------------


async def test_adapter_churn_isolation(reference, prompts, adapters):
    """More adapters (6 + base) than slots (2), concurrent requests in random order, several waves:
    every answer must be that adapter's own (teacher-forced logprobs, greedy tokens) and no other's."""
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler import SamplerService
    from twinkle.sampler.torch_engine import TorchEngine

    eng = TorchEngine(TINY_MODEL_ID, max_loras=2)
    svc = SamplerService(TINY_MODEL_ID, engine=eng)
    rng = random.Random(1234)
    choices = [None] + adapters
    try:
        for _wave in range(3):
            cases = []
            for _ in range(14):
                a, p = rng.choice(choices), rng.choice(prompts)
                greedy = rng.random() < 0.4
                cases.append((a, p, greedy, rng.randrange(1 << 30)))
            reqs = [R(p, a, n=1 if g else 2, max_tokens=10, temperature=0.0 if g else 1.0, seed=s)
                    for a, p, g, s in cases]
            outs = await sample_all(svc, reqs)
            for (a, p, g, _), out in zip(cases, outs):
                for seq in out.sequences:
                    own = reference.teacher_forced(a, p, seq.tokens)
                    assert max_abs_diff(seq.logprobs, own) < ATOL, f"answer for {a} is not its own"
                    for other in choices:
                        if other != a:
                            assert max_abs_diff(seq.logprobs, reference.teacher_forced(other, p, seq.tokens)) > 1e-2
                if g:
                    assert out.sequences[0].tokens == reference.greedy(a, p, 10)
        st = eng.stats()
        assert st["max_resident_adapters"] <= 2
        assert st["adapters"]["evictions"] > 0 and st["adapters"]["loads"] > len(adapters)
        assert (await svc.info()).settings["resident_adapters"] <= 2
    finally:
        await svc.close()


async def test_resaved_checkpoint_is_used_by_the_next_sample(service, reference, make_adapter, prompts,
                                                             tmp_path):
    """The weight hand-off: save_weights_for_sampler rewrites the checkpoint; the next sample uses it."""
    p = prompts[1]
    path = make_adapter(str(tmp_path / "run" / "sampler_weights"), seed=501)
    v1 = reference.prompt_logprobs(path, p)
    (out,) = await sample_all(service, [R(p, path, prompt_logprobs=True, max_tokens=1)])
    assert max_abs_diff(out.prompt_logprobs, v1) < ATOL

    timings = {}
    # 1) rewritten in place (same path, same file names, same sizes)
    make_adapter(path, seed=502)
    t0 = time.perf_counter()
    (out,) = await sample_all(service, [R(p, path, prompt_logprobs=True, max_tokens=1)])
    timings["in_place"] = time.perf_counter() - t0
    v2 = reference.prompt_logprobs(path, p)
    assert max_abs_diff(v1, v2) > 1e-2
    assert max_abs_diff(out.prompt_logprobs, v2) < ATOL

    # 2) atomic replace: written to a temp dir, then renamed over the path
    tmp = make_adapter(str(tmp_path / "run" / ".tmp-save"), seed=503)
    shutil.rmtree(path)
    os.rename(tmp, path)
    t0 = time.perf_counter()
    (out,) = await sample_all(service, [R(p, path, prompt_logprobs=True, max_tokens=1)])
    timings["atomic_replace"] = time.perf_counter() - t0
    v3 = reference.prompt_logprobs(path, p)
    assert max_abs_diff(out.prompt_logprobs, v3) < ATOL and max_abs_diff(v2, v3) > 1e-2

    # An unchanged checkpoint is not reloaded: the same request again is a cache hit.
    (again,) = await sample_all(service, [R(p, path, prompt_logprobs=True, max_tokens=1)])
    assert again.prompt_logprobs == out.prompt_logprobs
    print("\nweight hand-off (save complete -> first sample with the new weights returned): "
          + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))


def _corrupt_variants(base: str, root) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    out = {}
    out["missing"] = str(root / "does-not-exist")
    d = root / "no-config"
    d.mkdir()
    shutil.copy(os.path.join(base, "adapter_model.safetensors"), d)
    out["no_config"] = str(d)
    d = root / "garbage"
    shutil.copytree(base, d)
    (d / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 10)
    out["garbage"] = str(d)
    d = root / "truncated"
    shutil.copytree(base, d)
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = str(d)
    d = root / "missing-keys"
    shutil.copytree(base, d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v for i, (k, v) in enumerate(sorted(sd.items())) if i % 3}, str(d / "adapter_model.safetensors"))
    out["missing_keys"] = str(d)
    d = root / "wrong-rank"
    shutil.copytree(base, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = cfg["r"] * 2
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    out["wrong_rank"] = str(d)
    d = root / "wrong-targets"
    shutil.copytree(base, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    out["wrong_targets"] = str(d)
    d = root / "bad-json"
    shutil.copytree(base, d)
    (d / "adapter_config.json").write_text("{not json")
    out["bad_json"] = str(d)
    return out


@pytest.mark.parametrize("first", [True, False], ids=["no-adapter-resident", "others-resident"])
async def test_broken_checkpoints_are_user_errors_never_a_base_model_fallback(reference, prompts, adapters,
                                                                             tmp_path, first):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler import SamplerService
    from twinkle.sampler.torch_engine import TorchEngine

    eng = TorchEngine(TINY_MODEL_ID, max_loras=3)
    svc = SamplerService(TINY_MODEL_ID, engine=eng)
    try:
        if not first:
            await svc.sample(R(prompts[0], adapters[0], max_tokens=2))
        for kind, path in _corrupt_variants(adapters[1], tmp_path).items():
            good = R(prompts[0], adapters[2], max_tokens=8, temperature=0.0)
            bad = R(prompts[0], path, max_tokens=8, temperature=0.0)
            res = await asyncio.gather(svc.sample(bad), svc.sample(good), svc.sample(R(prompts[0], max_tokens=8,
                                                                                        temperature=0.0)),
                                       return_exceptions=True)
            err, ok, base = res
            assert isinstance(err, UserError), (kind, err)
            assert err.field == "adapter_path", kind
            if kind == "missing":
                assert isinstance(err, NotFoundError)
            # the rest of the batch is unharmed, and the base model is intact
            assert ok.sequences[0].tokens == reference.greedy(adapters[2], prompts[0], 8), kind
            assert base.sequences[0].tokens == reference.greedy(None, prompts[0], 8), kind
            assert all(e["path"] != os.path.realpath(path) for e in eng.adapters.resident())
    finally:
        await svc.close()


# -- service -----------------------------------------------------------------------------------------------


async def test_service_validation_health_info(service, engine):
    for req, field in [
        (R([]), "prompt"),
        (R([1, engine.vocab_size]), "prompt[1]"),
        (R([1] * engine.max_context_length), "prompt"),
        (R([1], n=0), "num_samples"),
        (R([1], n=10_000), "num_samples"),
        (R([1], max_tokens=0), "sampling_params.max_tokens"),
        (R([1], temperature=-1.0), "sampling_params.temperature"),
        (R([1], top_p=0.0), "sampling_params.top_p"),
        (R([1], stop=[engine.vocab_size + 5]), "sampling_params.stop[0]"),
    ]:
        with pytest.raises(UserError) as e:
            await service.sample(req)
        assert e.value.field == field
    h = await service.health()
    assert isinstance(h, ServiceHealth) and (h.kind, h.status) == ("sampler", "ok") and h.failed == 0
    info = await service.info()
    assert isinstance(info, ServiceInfo) and info.kind == "sampler" and info.model_name == "tiny-qwen2"
    assert info.backend == "torch" and info.vocab_size == engine.vocab_size and info.tokenizer_id
    assert info.max_context_length == 2048 and "device" in info.settings
    # info is public: adapters are counted, never named (a name or path belongs to another user's run)
    assert isinstance(info.settings["resident_adapters"], int)
    # a long prompt with no max_tokens is capped by the context window, with stop reason "length"
    (out,) = await sample_all(service, [R([5] * (engine.max_context_length - 3), temperature=0.0, stop=[])])
    assert len(out.sequences[0].tokens) == 3 and out.sequences[0].stop_reason == "length"


async def test_default_max_tokens_is_256(service, prompts):
    (out,) = await sample_all(service, [R(prompts[0], temperature=0.0, stop=[])])
    assert len(out.sequences[0].tokens) == 256 and out.sequences[0].stop_reason == "length"


def test_make_engine_rejects_unknown_types_and_args():
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler import make_engine

    with pytest.raises(ValueError, match="sampler_type"):
        make_engine("tensorrt", TINY_MODEL_ID)
    with pytest.raises(ValueError, match="unknown engine_args"):
        make_engine("torch", TINY_MODEL_ID, {"gpu_memory_utilization": 0.5})


def _save_custom_adapter(path: str, seed: int, **lora_kw) -> str:
    from peft import LoraConfig, get_peft_model

    from twinkle.common.models import TINY_MODEL_ID, load_causal_lm

    torch.manual_seed(seed)
    pm = get_peft_model(load_causal_lm(TINY_MODEL_ID), LoraConfig(**lora_kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(path)
    return path


async def test_lora_variants_match_peft(service, reference, prompts, tmp_path):
    """rsLoRA, per-module rank/alpha patterns, regex targets, lm_head-only: applied exactly as peft does."""
    variants = [
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
        dict(r=6, lora_alpha=12, target_modules=r".*\.(q_proj|v_proj|up_proj)", rank_pattern={"v_proj": 2},
             alpha_pattern={"up_proj": 3.0}),
        dict(r=16, lora_alpha=16, target_modules=["lm_head"]),
        dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], layers_to_transform=[1, 3]),
    ]
    paths = [_save_custom_adapter(str(tmp_path / f"v{i}"), 40 + i, **kw) for i, kw in enumerate(variants)]
    outs = await sample_all(service, [R(prompts[1], p, prompt_logprobs=True, max_tokens=12, temperature=0.0)
                                      for p in paths])
    for path, out in zip(paths, outs):
        ref = reference.prompt_logprobs(path, prompts[1])
        assert max_abs_diff(out.prompt_logprobs, ref) < ATOL, path
        assert max_abs_diff(ref, reference.prompt_logprobs(None, prompts[1])) > 1e-3  # the adapter matters
        assert out.sequences[0].tokens == reference.greedy(path, prompts[1], 12)


async def test_lora_features_it_cannot_apply_are_refused(service, prompts, tmp_path):
    refused = {
        "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True),
        "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
        "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"),
    }
    for kind, kw in refused.items():
        path = _save_custom_adapter(str(tmp_path / kind), 1, **kw)
        with pytest.raises(UserError) as e:
            await service.sample(R(prompts[0], path, max_tokens=2))
        assert e.value.field == "adapter_path", kind
