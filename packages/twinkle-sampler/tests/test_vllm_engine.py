"""The vLLM engine: the pure Twinkle <-> vLLM mapping runs everywhere; the engine itself needs CUDA + vllm."""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import pytest

from twinkle.common.wire import SampleRequest, SamplingParams, UserError
from twinkle.sampler.params import Limits, resolve_request
from twinkle.sampler.vllm_engine import (
    sample_output_from_vllm,
    vllm_engine_kwargs,
    vllm_sampling_kwargs,
    vllm_seed,
)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_CUDA = _cuda()
NEEDS_GPU_REASON = (
    "the vLLM engine needs a CUDA GPU and the vllm package: "
    + ("no CUDA device is visible" if not HAS_CUDA else "")
    + (" and " if not HAS_CUDA and not HAS_VLLM else "")
    + ("vllm is not installed" if not HAS_VLLM else "")
)
LIM = Limits(vocab_size=1000, max_context_length=512)


def resolved(prompt=(1, 2, 3), n=1, prompt_logprobs=False, **params):
    return resolve_request(SampleRequest(prompt=list(prompt), sampling_params=SamplingParams(**params),
                                         num_samples=n, prompt_logprobs=prompt_logprobs), LIM)


# -- pure mapping -----------------------------------------------------------------------------------------


def test_sampling_kwargs_greedy_and_defaults():
    kw = vllm_sampling_kwargs(resolved(temperature=0.0, top_k=5, top_p=0.5))
    assert kw["temperature"] == 0.0 and kw["top_k"] == 0 and kw["top_p"] == 1.0  # greedy, never 1.0
    assert kw["logprobs"] == 0 and kw["prompt_logprobs"] is None
    assert kw["max_tokens"] == 256 and kw["n"] == 1
    assert kw["stop"] is None and kw["stop_token_ids"] is None and kw["ignore_eos"] is False
    assert kw["detokenize"] is False and kw["seed"] is None


def test_sampling_kwargs_sampled():
    kw = vllm_sampling_kwargs(resolved(n=4, prompt_logprobs=True, temperature=0.7, top_k=-1, top_p=0.9,
                                       seed=123, max_tokens=17))
    assert (kw["n"], kw["temperature"], kw["top_k"], kw["top_p"], kw["max_tokens"]) == (4, 0.7, 0, 0.9, 17)
    assert kw["prompt_logprobs"] == 0 and kw["logprobs"] == 0
    assert kw["seed"] == vllm_seed(123)


def test_sampling_kwargs_stop_forms():
    kw = vllm_sampling_kwargs(resolved(stop="\n"))
    assert kw["stop"] == ["\n"] and kw["detokenize"] is True and kw["skip_special_tokens"] is False
    assert kw["ignore_eos"] is False
    kw = vllm_sampling_kwargs(resolved(stop=["a", "b"]))
    assert kw["stop"] == ["a", "b"] and kw["stop_token_ids"] is None
    kw = vllm_sampling_kwargs(resolved(stop=[7, 9]))
    assert kw["stop"] is None and kw["stop_token_ids"] == [7, 9] and kw["ignore_eos"] is False
    kw = vllm_sampling_kwargs(resolved(stop=[]))
    assert kw["stop"] is None and kw["stop_token_ids"] is None and kw["ignore_eos"] is True


def test_seed_mapping_is_stable_bounded_and_distinct():
    assert vllm_seed(None) is None
    assert vllm_seed(1) == vllm_seed(1)
    seeds = {vllm_seed(s) for s in [0, 1, 2, -1, 2**63, 2**64 - 1, 12345678901234567890]}
    assert len(seeds) == 7
    assert all(0 <= s < 2**62 for s in seeds)  # + sample index stays a valid 64-bit generator seed


def test_engine_kwargs_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("TWINKLE_TRUST_REMOTE_CODE", raising=False)
    from twinkle.common.env import trust_remote_code

    trust_remote_code.cache_clear()
    kw = vllm_engine_kwargs("/models/x", None, 6)
    assert kw["model"] == kw["tokenizer"] == "/models/x"
    assert kw["enable_lora"] is True and kw["max_loras"] == 6 and kw["max_cpu_loras"] >= 6
    assert kw["logprobs_mode"] == "raw_logprobs" and kw["trust_remote_code"] is False
    kw = vllm_engine_kwargs("/m", {"max_model_len": 1024, "gpu_memory_utilization": 0.3, "max_loras": 2,
                                   "max_lora_rank": 32, "max_num_samples": 4}, 8)
    assert kw["max_model_len"] == 1024 and kw["gpu_memory_utilization"] == 0.3
    assert kw["max_loras"] == 2 and kw["max_cpu_loras"] == 8 and kw["max_lora_rank"] == 32
    assert "max_num_samples" not in kw  # a Twinkle setting, not a vLLM one
    with pytest.raises(ValueError, match="TWINKLE_TRUST_REMOTE_CODE"):
        vllm_engine_kwargs("/m", {"trust_remote_code": True}, 1)


def _lp(d: dict[int, float]) -> dict:
    return {t: SimpleNamespace(logprob=v, rank=1, decoded_token=None) for t, v in d.items()}


def test_output_mapping():
    out = SimpleNamespace(
        prompt_token_ids=[5, 6, 7],
        prompt_logprobs=[None, _lp({6: -1.5, 9: -0.1}), _lp({7: -2.5})],
        finished=True,
        outputs=[  # vLLM may hand samples back out of order
            SimpleNamespace(index=1, token_ids=[3, 4], logprobs=[_lp({3: -0.5}), _lp({4: -0.25, 1: -3.0})],
                            finish_reason="length", stop_reason=None),
            SimpleNamespace(index=0, token_ids=(8, 2), logprobs=[_lp({8: -1.0}), _lp({2: -0.125})],
                            finish_reason="stop", stop_reason=None),
        ],
    )
    res = sample_output_from_vllm(out, prompt_logprobs=True)
    assert [s.tokens for s in res.sequences] == [[8, 2], [3, 4]]
    assert [s.logprobs for s in res.sequences] == [[-1.0, -0.125], [-0.5, -0.25]]
    assert [s.stop_reason for s in res.sequences] == ["stop", "length"]
    assert res.prompt_logprobs == [None, -1.5, -2.5]
    assert sample_output_from_vllm(out, prompt_logprobs=False).prompt_logprobs is None


def _ranked(d: dict[int, tuple[float, int]]) -> dict:
    return {t: SimpleNamespace(logprob=v, rank=r, decoded_token=None) for t, (v, r) in d.items()}


def test_topk_mapping_and_what_vllm_cannot_do():
    kw = vllm_sampling_kwargs(resolved())
    assert kw["logprobs"] == 0 and kw["prompt_logprobs"] is None
    r = resolve_request(SampleRequest(prompt=[1, 2, 3], topk_prompt_logprobs=2, topk_sample_logprobs=3), LIM)
    kw = vllm_sampling_kwargs(r)
    assert kw["logprobs"] == 3 and kw["prompt_logprobs"] == 2
    out = SimpleNamespace(
        prompt_token_ids=[5, 6, 7],
        prompt_logprobs=[None, _ranked({6: (-1.5, 4), 9: (-0.1, 1), 2: (-0.9, 2)}),
                         _ranked({7: (-0.2, 1), 3: (-2.0, 2)})],
        outputs=[SimpleNamespace(index=0, token_ids=[8], finish_reason="length",
                                 logprobs=[_ranked({8: (-3.0, 7), 1: (-0.5, 1), 4: (-0.75, 3), 2: (-0.6, 2)})])],
    )
    res = sample_output_from_vllm(out, prompt_logprobs=True, topk_sample=3, topk_prompt=2)
    assert res.prompt_logprobs == [None, -1.5, -0.2]
    assert res.topk_prompt.ids == [[], [9, 2], [7, 3]] and res.topk_prompt.logprobs == [[], [-0.1, -0.9], [-0.2, -2.0]]
    seq = res.sequences[0]
    assert seq.logprobs == [-3.0] and seq.topk.ids == [[1, 2, 4]] and seq.topk.logprobs == [[-0.5, -0.6, -0.75]]
    with pytest.raises(RuntimeError, match="top 4"):
        sample_output_from_vllm(out, prompt_logprobs=False, topk_sample=4)
    from twinkle.sampler.vllm_engine import refuse_unsupported

    for kwargs, field in [(dict(target_prompt_logprobs=[[1], [2]]), "target_prompt_logprobs"),
                          (dict(prompt_alt_tokens_k=2), "prompt_alt_tokens_k")]:
        with pytest.raises(UserError) as e:
            refuse_unsupported(resolve_request(SampleRequest(prompt=[1, 2, 3], **kwargs), LIM))
        assert e.value.field == field


@pytest.mark.parametrize("broken", ["abort", "no_logprobs", "wrong_token"])
def test_output_mapping_refuses_incomplete_results(broken):
    seq = SimpleNamespace(index=0, token_ids=[3], logprobs=[_lp({3: -0.5})], finish_reason="stop")
    if broken == "abort":
        seq.finish_reason = "abort"
    elif broken == "no_logprobs":
        seq.logprobs = None
    else:
        seq.logprobs = [_lp({4: -0.5})]
    out = SimpleNamespace(prompt_token_ids=[1], prompt_logprobs=None, outputs=[seq])
    with pytest.raises(RuntimeError):
        sample_output_from_vllm(out, prompt_logprobs=False)


@pytest.mark.skipif(HAS_VLLM and HAS_CUDA, reason="vllm and CUDA are both present here")
def test_selecting_vllm_without_gpu_or_package_fails_with_the_reason():
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler import make_engine

    with pytest.raises(RuntimeError, match="vllm|CUDA"):
        make_engine("vllm", TINY_MODEL_ID)


def test_vllm_is_not_imported_unless_selected():
    import subprocess
    import sys

    code = ("import sys, twinkle.sampler, twinkle.sampler.vllm_engine, twinkle.sampler.torch_engine;"
            "print('vllm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# -- the real engine (CUDA + vllm only) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine():
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.sampler import make_engine

    eng = make_engine("vllm", TINY_MODEL_ID,
                      {"gpu_memory_utilization": 0.25, "max_model_len": 1024, "enforce_eager": True}, max_loras=2)
    yield eng
    asyncio.run(eng.close())


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and HAS_CUDA), reason=NEEDS_GPU_REASON)
async def test_vllm_greedy_logprobs_and_adapters_match_the_reference(vllm_engine, reference, prompts, adapters):
    def R(p, a=None, **kw):
        return SampleRequest(prompt=list(p), sampling_params=SamplingParams(**kw), adapter_path=a,
                             prompt_logprobs=True)

    cases = [(p, a) for p in prompts[:3] for a in (None, adapters[0], adapters[1], adapters[2])]
    outs = await vllm_engine.generate([R(p, a, max_tokens=12, temperature=0.0) for p, a in cases])
    for (p, a), out in zip(cases, outs):
        seq = out.sequences[0]
        assert seq.tokens == reference.greedy(a, p, 12)
        tf = reference.teacher_forced(a, p, seq.tokens)
        assert max(abs(x - y) for x, y in zip(seq.logprobs, tf)) < 2e-3
        pl = reference.prompt_logprobs(a, p)
        assert out.prompt_logprobs[0] is None
        assert max(abs(x - y) for x, y in zip(out.prompt_logprobs[1:], pl[1:])) < 2e-3
    # [] = exactly max_tokens; same seed = same tokens
    a, b = await vllm_engine.generate([R(prompts[0], max_tokens=9, stop=[], seed=5)] * 2)
    assert len(a.sequences[0].tokens) == 9 and a.sequences[0].stop_reason == "length"
    assert a.sequences[0].tokens == b.sequences[0].tokens

