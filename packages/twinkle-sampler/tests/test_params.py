"""Request validation and defaults (pure; no model)."""

from __future__ import annotations

import pytest

from twinkle.common.wire import SampleRequest, SamplingParams, UserError
from twinkle.sampler.params import DEFAULT_MAX_TOKENS, Limits, resolve_request

LIM = Limits(vocab_size=100, max_context_length=50, max_num_samples=16)


def req(prompt=(1, 2, 3), **kw) -> SampleRequest:
    top = {k: kw.pop(k) for k in ("num_samples", "prompt_logprobs", "adapter_path") if k in kw}
    return SampleRequest(prompt=list(prompt), sampling_params=SamplingParams(**kw), **top)


def field_of(r: SampleRequest) -> str | None:
    with pytest.raises(UserError) as e:
        resolve_request(r, LIM)
    assert e.value.status == 400
    return e.value.field


def test_defaults():
    r = resolve_request(req(), LIM)
    assert r.max_tokens == min(DEFAULT_MAX_TOKENS, 50 - 3)
    assert (r.temperature, r.top_k, r.top_p, r.seed) == (1.0, 0, 1.0, None)
    assert (r.stop_strings, r.stop_token_ids, r.ignore_eos) == ((), (), False)
    assert not r.greedy


def test_default_max_tokens_is_256_when_the_context_allows():
    r = resolve_request(req(), Limits(vocab_size=100, max_context_length=4096))
    assert r.max_tokens == 256


def test_temperature_zero_is_greedy_never_one():
    r = resolve_request(req(temperature=0.0), LIM)
    assert r.greedy and r.temperature == 0.0
    assert not resolve_request(req(temperature=1e-3), LIM).greedy


def test_max_tokens_is_capped_by_the_context_window():
    assert resolve_request(req(max_tokens=1000), LIM).max_tokens == 47
    assert resolve_request(req(prompt=range(49), max_tokens=5), LIM).max_tokens == 1


@pytest.mark.parametrize("top_k,expected", [(-1, 0), (0, 0), (1, 1), (7, 7), (100, 0), (1000, 0)])
def test_top_k(top_k, expected):
    assert resolve_request(req(top_k=top_k), LIM).top_k == expected


def test_stop_forms():
    assert resolve_request(req(stop="\n"), LIM).stop_strings == ("\n",)
    r = resolve_request(req(stop=["a", "bc", "a"]), LIM)
    assert r.stop_strings == ("a", "bc") and not r.ignore_eos
    r = resolve_request(req(stop=[5, 9]), LIM)
    assert r.stop_token_ids == (5, 9) and not r.ignore_eos
    r = resolve_request(req(stop=[]), LIM)
    assert r.ignore_eos and r.stop_strings == () and r.stop_token_ids == ()
    assert not resolve_request(req(stop=None), LIM).ignore_eos


@pytest.mark.parametrize(
    "r,field",
    [
        (req(prompt=()), "prompt"),
        (req(prompt=range(50)), "prompt"),
        (req(prompt=(1, 100, 2)), "prompt[1]"),
        (req(prompt=(1, -1)), "prompt[1]"),
        (req(num_samples=0), "num_samples"),
        (req(num_samples=17), "num_samples"),
        (req(max_tokens=0), "sampling_params.max_tokens"),
        (req(max_tokens=-5), "sampling_params.max_tokens"),
        (req(temperature=-0.1), "sampling_params.temperature"),
        (req(temperature=float("nan")), "sampling_params.temperature"),
        (req(top_p=0.0), "sampling_params.top_p"),
        (req(top_p=1.5), "sampling_params.top_p"),
        (req(top_k=-2), "sampling_params.top_k"),
        (req(stop=""), "sampling_params.stop"),
        (req(stop=["ok", ""]), "sampling_params.stop[1]"),
        (req(stop=[3, 100]), "sampling_params.stop[1]"),
        (req(adapter_path=""), "adapter_path"),
    ],
)
def test_rejections_name_the_field(r, field):
    assert field_of(r) == field


def test_mixed_stop_list_is_rejected():
    # msgspec would refuse this on the wire; a Python caller can still build it.
    r = SampleRequest(prompt=[1], sampling_params=SamplingParams(stop=["a", 3]))  # type: ignore[list-item]
    assert field_of(r) == "sampling_params.stop"
