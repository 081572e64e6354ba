"""Request resolution and defaults, and stop-string matching (pure, but for one test on the real tiny model)."""

from __future__ import annotations

import pytest

from twinkle.common.limits import RequestLimits
from twinkle.common.wire import SampleRequest, SamplingParams, UserError
from twinkle.sampler.params import DEFAULT_MAX_TOKENS, Limits, StopStrings, resolve_request

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


@pytest.mark.parametrize("top_k,expected", [(-1, 0), (1, 1), (7, 7), (99, 99), (100, 0), (1000, 0)])
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
        (req(top_k=0), "sampling_params.top_k"),
        (req(seed=2**63), "sampling_params.seed"),
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


def test_the_engine_cap_on_num_samples_replaces_the_request_limit():
    limits = Limits(vocab_size=100, max_context_length=50, max_num_samples=2, request=RequestLimits(max_num_samples=64))
    assert resolve_request(req(num_samples=2), limits).num_samples == 2
    with pytest.raises(UserError, match=r"\[1, 2\], got 3") as e:
        resolve_request(req(num_samples=3), limits)
    assert e.value.field == "num_samples"


def test_request_limits_bound_stop_strings_and_samples_times_tokens():
    limits = Limits(vocab_size=100, max_context_length=50, request=RequestLimits(
        max_stop_count=2, max_stop_string_chars=3, max_sample_tokens=20))
    assert resolve_request(req(stop=["abc", "d"], max_tokens=10, num_samples=2), limits).stop_strings == ("abc", "d")
    for r, field, text in ((req(stop=["a", "b", "c"], max_tokens=1), "sampling_params.stop", "3 entries"),
                           (req(stop=["a", "abcd"], max_tokens=1), "sampling_params.stop[1]", "4 characters"),
                           (req(max_tokens=7, num_samples=3), "sampling_params.max_tokens", "21")):
        with pytest.raises(UserError) as e:
            resolve_request(r, limits)
        assert e.value.field == field and text in e.value.message


# --- stop strings ---------------------------------------------------------------------------------------


class CountingSet(frozenset):
    """A frozenset that counts membership probes: the matcher's unit of work."""

    probes = 0

    def __contains__(self, item) -> bool:
        CountingSet.probes += 1
        return frozenset.__contains__(self, item)


class Decoder:
    """One character per token (``chr``), recording how many tokens each call decodes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, tokens) -> str:
        self.sizes.append(len(tokens))
        return "".join(map(chr, tokens))


def generate(matcher: StopStrings, text: str, decode) -> int | None:
    """Feed ``text`` one token at a time; the index of the token that completes a stop string, if any."""
    tokens: list[int] = []
    for i, ch in enumerate(text):
        tokens.append(ord(ch))
        if matcher.completed_by_last(tokens, decode):
            return i
    return None


def test_stop_string_is_found_at_the_token_that_completes_it():
    m = StopStrings(["lo w", "xyz", "world!"])
    assert generate(m, "hello world!", Decoder()) == 6  # "lo w" ends at index 6
    assert generate(StopStrings(["d!"]), "hello world!", Decoder()) == 11
    assert generate(StopStrings(["h"]), "hello", Decoder()) == 0
    assert generate(StopStrings(["nothing"]), "hello world", Decoder()) is None
    assert not StopStrings([]) and generate(StopStrings([]), "abc", Decoder()) is None


def test_ten_thousand_stop_strings_cost_work_bounded_by_the_longest_not_the_count():
    stops = [f"<{i:05d}>" for i in range(10_000)] + ["END"]  # two distinct lengths: 7 and 3
    m = StopStrings(stops)
    m._stops = CountingSet(m._stops)
    decode = Decoder()
    text = "some generated text, with no decoy in it, then END and more"
    CountingSet.probes = 0
    hit = generate(m, text, decode)
    assert hit == text.index("END") + 2
    steps = hit + 1
    assert max(decode.sizes) <= m.window == 7 + 4  # only the tail that could hold a stop string is decoded
    assert len(decode.sizes) <= 2 * steps
    # One new character per step, probed once per distinct length: at most 2 lookups a step, not 10,001 scans.
    assert CountingSet.probes <= 2 * steps


def test_rewritten_tail_characters_are_probed_again():
    # A byte-level tokenizer shows an incomplete character as U+FFFD until the next token completes it; the
    # stop string that the completed character finishes must still be found.
    pieces = {1: "a", 2: "\ufffd", 3: "é"}

    def decode(tokens):
        text = "".join(pieces[t] for t in tokens)
        return text.replace("\ufffd\ufffd", "é")  # tokens 2, 2 decode together to "é"

    m = StopStrings(["aé"])
    assert m.completed_by_last([1, 2], decode) is False
    assert m.completed_by_last([1, 2, 2], decode) is True


def test_real_tokenizer_stop_matching_agrees_with_a_full_scan(tokenizer):
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # three\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = ["return a", "(1, 2)", "three\n"] + [f"never-{i}" for i in range(10_000)]

    def decode(toks):
        return tokenizer.decode(toks, skip_special_tokens=False)

    m = StopStrings(stops)
    tokens: list[int] = []
    for i, t in enumerate(ids):
        tokens.append(t)
        if m.completed_by_last(tokens, decode):
            break
    full = next(k for k in range(len(ids)) if any(s in decode(ids[:k + 1]) for s in stops[:3]))
    assert i == full and "return a" in decode(tokens)


async def test_the_torch_engine_stops_on_one_of_many_stop_strings_decoding_only_the_tail(engine, monkeypatch):
    prompt = [5, 6, 7, 8]
    free = (await engine.generate([req(prompt, max_tokens=12, temperature=0.0, stop=[])]))[0].sequences[0].tokens
    text = engine.tokenizer.decode(free, skip_special_tokens=False)
    stop = text[len(engine.tokenizer.decode(free[:6], skip_special_tokens=False)) - 2:][:2]
    want = next(k for k in range(len(free)) if stop in engine.tokenizer.decode(free[:k + 1], skip_special_tokens=False))
    decoys = [f"\x00decoy{i:04d}" for i in range(engine.limits.effective().max_stop_count - 1)]
    sizes: list[int] = []
    real = engine._decode

    def counting(toks):
        sizes.append(len(toks))
        return real(toks)

    monkeypatch.setattr(engine, "_decode", counting)
    out = (await engine.generate([req(prompt, max_tokens=12, temperature=0.0, stop=decoys + [stop])]))[0].sequences[0]
    assert out.tokens == free[:want + 1] and out.stop_reason == "stop"
    assert sizes and max(sizes) <= max(len(s) for s in decoys + [stop]) + 4
    assert len(sizes) <= 2 * len(out.tokens)
