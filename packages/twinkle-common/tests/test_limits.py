"""Every request rule of ``twinkle.common.limits``: the accepted edge, the refused edge, the field named in the
error and the offending value in its message."""

from __future__ import annotations

import math

import msgspec
import pytest

from twinkle.common.limits import (
    DEFAULT_LIMITS,
    MAX_JSON_SAFE_INT,
    MAX_TOKEN_ID,
    RequestLimits,
    check_adam,
    check_lora,
    check_metadata,
    check_page,
    check_sampling,
    check_seq_id,
    check_tags,
    check_tensor_shape,
    check_train_input,
    check_ttl,
)
from twinkle.common.wire import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    LoraConfig,
    SamplingParams,
    TensorData,
    UserError,
)

SMALL = RequestLimits(max_datums=3, max_tokens_per_request=10, max_tokens_per_datum=6, max_tensor_elements=8,
                      max_request_tensor_elements=16, max_num_samples=4, max_sample_tokens=40, max_stop_count=3,
                      max_stop_string_chars=5, max_metadata_bytes=40, max_metadata_entries=2, max_tags=2,
                      max_tag_chars=4, max_lora_rank=16, max_seq_id=100, max_ttl_s=60, max_page_size=50)


def refused(call, field: str, *in_message: str) -> UserError:
    with pytest.raises(UserError) as e:
        call()
    assert e.value.status == 400
    assert e.value.field == field, e.value
    for text in in_message:
        assert text in e.value.message, e.value.message
    return e.value


# --- RequestLimits --------------------------------------------------------------------------------------


def test_defaults_are_advertisable():
    advertised = msgspec.to_builtins(DEFAULT_LIMITS)
    assert set(advertised) == set(RequestLimits.__struct_fields__)
    assert advertised["max_num_samples"] == 128 and advertised["max_seq_id"] == MAX_JSON_SAFE_INT
    assert advertised["max_tokens_per_datum"] is None
    assert msgspec.json.decode(msgspec.json.encode(DEFAULT_LIMITS), type=RequestLimits) == DEFAULT_LIMITS


def test_from_args_keeps_defaults_for_missing_keys():
    assert RequestLimits.from_args(None) == DEFAULT_LIMITS
    assert RequestLimits.from_args({}) == DEFAULT_LIMITS
    limits = RequestLimits.from_args({"max_num_samples": 16, "max_tokens_per_datum": 2048})
    assert (limits.max_num_samples, limits.max_tokens_per_datum, limits.max_datums) == (16, 2048, 4096)


@pytest.mark.parametrize("args,key", [
    ({"max_datums": 0}, "limits.max_datums"),
    ({"max_num_samples": "many"}, "limits.max_num_samples"),
    ({"max_seq_id": 2**63 - 1}, "limits.max_seq_id"),
    ({"max_ttl_s": 200 * 366 * 86400}, "limits.max_ttl_s"),
    ({"max_samples": 3}, "limits.max_samples"),
])
def test_from_args_names_the_bad_key(args, key):
    with pytest.raises(ValueError) as e:
        RequestLimits.from_args(args)
    assert str(e.value).startswith(key + ":")
    assert str(next(iter(args.values()))) in str(e.value) or "unknown limit" in str(e.value)


def test_from_args_refuses_a_non_mapping():
    with pytest.raises(ValueError, match="limits: expected a mapping"):
        RequestLimits.from_args([1, 2])  # type: ignore[arg-type]


def test_the_seq_id_bound_is_configurable_only_below_sqlite_headroom():
    assert RequestLimits(max_seq_id=2**62).max_seq_id == 2**62
    with pytest.raises(ValueError, match="max_seq_id"):
        RequestLimits.from_args({"max_seq_id": 2**62 + 1})


# --- LoRA -------------------------------------------------------------------------------------------------


def test_lora_edges_accepted():
    assert check_lora(LoraConfig(rank=1, alpha=1e-3, dropout=0.0, seed=0)) == LoraConfig(rank=1, alpha=1e-3, seed=0)
    check_lora(LoraConfig(rank=16, dropout=0.999, seed=2**63 - 1, train_attn=False, train_mlp=False), limits=SMALL)


@pytest.mark.parametrize("cfg,field,value", [
    (LoraConfig(rank=0), "lora_config.rank", "0"),
    (LoraConfig(rank=17), "lora_config.rank", "17"),
    (LoraConfig(rank=True), "lora_config.rank", "True"),  # type: ignore[arg-type]
    (LoraConfig(rank=4, alpha=0.0), "lora_config.alpha", "0.0"),
    (LoraConfig(rank=4, alpha=math.inf), "lora_config.alpha", "inf"),
    (LoraConfig(rank=4, dropout=1.0), "lora_config.dropout", "1.0"),
    (LoraConfig(rank=4, dropout=-0.1), "lora_config.dropout", "-0.1"),
    (LoraConfig(rank=4, seed=-1), "lora_config.seed", "-1"),
    (LoraConfig(rank=4, seed=2**63), "lora_config.seed", str(2**63)),
    (LoraConfig(rank=4, train_attn=False, train_mlp=False, train_unembed=False), "lora_config.train_attn",
     "at least one"),
])
def test_lora_refusals(cfg, field, value):
    refused(lambda: check_lora(cfg, limits=SMALL), field, value)


def test_lora_field_prefix_is_the_callers():
    refused(lambda: check_lora(LoraConfig(rank=2000), field="lora"), "lora.rank", "2000", "1024")


# --- Adam -------------------------------------------------------------------------------------------------


def test_adam_edges_accepted():
    p = AdamParams(learning_rate=0.0, beta1=0.0, beta2=0.999999, eps=1e-30, weight_decay=0.0, grad_clip_norm=0.0)
    assert check_adam(p) is p


@pytest.mark.parametrize("kw,field,value", [
    ({"learning_rate": -1e-9}, "adam_params.learning_rate", "-1e-09"),
    ({"learning_rate": math.nan}, "adam_params.learning_rate", "nan"),
    ({"beta1": 1.0}, "adam_params.beta1", "1.0"),
    ({"beta2": -0.1}, "adam_params.beta2", "-0.1"),
    ({"eps": 0.0}, "adam_params.eps", "0.0"),
    ({"eps": math.inf}, "adam_params.eps", "inf"),
    ({"weight_decay": -1.0}, "adam_params.weight_decay", "-1.0"),
    ({"grad_clip_norm": -0.5}, "adam_params.grad_clip_norm", "-0.5"),
])
def test_adam_refusals(kw, field, value):
    refused(lambda: check_adam(AdamParams(**kw)), field, value)


def test_adam_field_prefix_is_the_callers():
    refused(lambda: check_adam(AdamParams(beta1=2.0), field="optim_params"), "optim_params.beta1", "2.0")


# --- training input ----------------------------------------------------------------------------------------


def datum(n: int, **inputs: TensorData) -> Datum:
    return Datum(model_input=list(range(1, n + 1)), loss_fn_inputs=inputs)


def fb(*data: Datum) -> ForwardBackwardInput:
    return ForwardBackwardInput(data=list(data))


def ints(*values) -> TensorData:
    return TensorData(data=list(values), dtype="int64")


def floats(*values) -> TensorData:
    return TensorData(data=list(values), dtype="float32")


def test_train_input_edges_accepted():
    inp = fb(datum(6, target_tokens=ints(0, 1, 2, 3, 4, MAX_TOKEN_ID), weights=floats(1, -2.5, 0, 0, 0, 3.4e38)),
             datum(4, target_tokens=TensorData(data=[1.0, 2.0, 3.0, 4.0], dtype="int64")))
    assert check_train_input(inp, SMALL) is inp


@pytest.mark.parametrize("inp,field,value", [
    (fb(datum(1), datum(1), datum(1), datum(1)), "data", "4 datums"),
    (fb(datum(7)), "data[0].model_input", "7 tokens"),
    (fb(datum(6), datum(5)), "data", "11 tokens"),
    (fb(Datum(model_input=[1, -1])), "data[0].model_input", "-1"),
    (fb(Datum(model_input=[1, MAX_TOKEN_ID + 1])), "data[0].model_input", str(MAX_TOKEN_ID + 1)),
    (fb(datum(2, target_tokens=ints(1, -1e308))), "data[0].loss_fn_inputs.target_tokens", "-1e+308"),
    (fb(datum(2, target_tokens=ints(1, 2.5))), "data[0].loss_fn_inputs.target_tokens", "2.5"),
    (fb(datum(2, target_tokens=ints(1, -3))), "data[0].loss_fn_inputs.target_tokens", "-3"),
    (fb(datum(2, mask=ints(1, 2**63))), "data[0].loss_fn_inputs.mask", str(2**63)),
    (fb(datum(2, weights=floats(1.0, math.nan))), "data[0].loss_fn_inputs.weights", "nan"),
    (fb(datum(2, weights=floats(math.inf, 1.0))), "data[0].loss_fn_inputs.weights", "inf"),
    (fb(datum(2, weights=floats(1.0, 1e39))), "data[0].loss_fn_inputs.weights", "1e+39"),
    (fb(datum(2, weights=floats(1.0, 10**400))), "data[0].loss_fn_inputs.weights", "index 1"),
    (fb(datum(2, weights=TensorData(data=[1.0, 2.0, 3.0], shape=[2]))), "data[0].loss_fn_inputs.weights", "3"),
    (fb(datum(2, weights=TensorData(data=[0.0] * 9, shape=[3, 3]))), "data[0].loss_fn_inputs.weights.shape", "9"),
    (fb(datum(1, a=floats(*[0.0] * 8)), datum(1, b=floats(*[0.0] * 8)), datum(1, c=floats(0))), "data", "17"),
])
def test_train_input_refusals(inp, field, value):
    refused(lambda: check_train_input(inp, SMALL), field, value)


def test_train_input_per_datum_bound_is_the_tighter_of_limits_and_context():
    refused(lambda: check_train_input(fb(datum(5)), SMALL, max_tokens_per_datum=4), "data[0].model_input", "5", "4")
    check_train_input(fb(datum(6)), SMALL, max_tokens_per_datum=100)
    check_train_input(fb(datum(9)), DEFAULT_LIMITS)  # None: no bound but the context's
    refused(lambda: check_train_input(fb(datum(9)), DEFAULT_LIMITS, max_tokens_per_datum=8), "data[0].model_input")


def test_sizes_are_checked_before_values():
    # A refused size wins over a bad value later in the request: no element loop ran over oversized data.
    inp = fb(datum(2, weights=floats(math.nan, 0.0)), datum(6), datum(6))
    refused(lambda: check_train_input(inp, SMALL), "data", "14 tokens")


# --- tensor shapes -----------------------------------------------------------------------------------------


def test_tensor_shape_is_checked_without_expanding():
    assert check_tensor_shape([2, 4], SMALL, "t") == 8
    assert check_tensor_shape(None, SMALL, "t", data_len=3) == 3
    refused(lambda: check_tensor_shape([1, 300_000_000], DEFAULT_LIMITS, "x"), "x.shape", "300000000",
            str(DEFAULT_LIMITS.max_tensor_elements))
    refused(lambda: check_tensor_shape([3, 3], SMALL, "t"), "t.shape", "9", "8")
    refused(lambda: check_tensor_shape([2, -1], SMALL, "t"), "t.shape", "-1")
    refused(lambda: check_tensor_shape([], SMALL, "t"), "t.shape", "[]")
    refused(lambda: check_tensor_shape([1] * 9, SMALL, "t"), "t.shape")


# --- sampling ----------------------------------------------------------------------------------------------


def sp(max_tokens: int | None = 1, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


def test_sampling_edges_accepted():
    p = sp(max_tokens=10, temperature=0.0, top_p=1.0, top_k=1, seed=-(2**63), stop=["abcde", "x", "y"])
    assert check_sampling(p, num_samples=4, limits=SMALL) is p
    check_sampling(sp(top_p=1e-9, top_k=-1, seed=2**63 - 1, stop="abcde"), num_samples=1, limits=SMALL)
    check_sampling(sp(stop=[0, MAX_TOKEN_ID]), num_samples=1, limits=SMALL)
    check_sampling(sp(stop=[]), num_samples=1, limits=SMALL)
    check_sampling(sp(None), num_samples=DEFAULT_LIMITS.max_num_samples)  # max_tokens unset counts as 256
    check_sampling(sp(None), num_samples=1, limits=RequestLimits(max_sample_tokens=256))


@pytest.mark.parametrize("params,n,field,value", [
    (sp(), 0, "num_samples", "0"),
    (sp(), 5, "num_samples", "5"),
    (sp(max_tokens=0), 1, "sampling_params.max_tokens", "0"),
    (sp(max_tokens=11), 4, "sampling_params.max_tokens", "44"),
    (sp(None), 7, "sampling_params.max_tokens", "7 × 256"),
    (sp(max_tokens=10**30), 1, "sampling_params.max_tokens", str(10**30)),
    (sp(temperature=-0.01), 1, "sampling_params.temperature", "-0.01"),
    (sp(temperature=math.inf), 1, "sampling_params.temperature", "inf"),
    (sp(top_p=0.0), 1, "sampling_params.top_p", "0.0"),
    (sp(top_p=1.01), 1, "sampling_params.top_p", "1.01"),
    (sp(top_k=0), 1, "sampling_params.top_k", "0"),
    (sp(top_k=-2), 1, "sampling_params.top_k", "-2"),
    (sp(seed=2**63), 1, "sampling_params.seed", str(2**63)),
    (sp(stop=""), 1, "sampling_params.stop", "empty"),
    (sp(stop="abcdef"), 1, "sampling_params.stop", "6 characters"),
    (sp(stop=["a", "b", "c", "d"]), 1, "sampling_params.stop", "4 entries"),
    (sp(stop=["a", "abcdef"]), 1, "sampling_params.stop[1]", "6 characters"),
    (sp(stop=["a", ""]), 1, "sampling_params.stop[1]", "empty"),
    (sp(stop=[1, -1]), 1, "sampling_params.stop[1]", "-1"),
    (sp(stop=["a", 1]), 1, "sampling_params.stop", "mix"),  # type: ignore[list-item]
    (sp(stop=3), 1, "sampling_params.stop", "3"),  # type: ignore[arg-type]
])
def test_sampling_refusals(params, n, field, value):
    limits = SMALL if n < 7 else RequestLimits(max_sample_tokens=7 * 256 - 1)
    refused(lambda: check_sampling(params, num_samples=n, limits=limits), field, value)


def test_sampling_field_prefix_is_the_callers():
    refused(lambda: check_sampling(sp(top_p=2.0), num_samples=1, field="params"), "params.top_p", "2.0")


# --- control plane -----------------------------------------------------------------------------------------


def test_seq_id():
    assert check_seq_id(None) is None
    assert check_seq_id(0) == 0 and check_seq_id(MAX_JSON_SAFE_INT) == MAX_JSON_SAFE_INT
    refused(lambda: check_seq_id(MAX_JSON_SAFE_INT + 1), "seq_id", str(MAX_JSON_SAFE_INT + 1))
    refused(lambda: check_seq_id(2**63), "seq_id", str(2**63))
    refused(lambda: check_seq_id(-1), "seq_id", "-1")
    refused(lambda: check_seq_id(101, limits=SMALL), "seq_id", "101", "100")
    refused(lambda: check_seq_id(True), "seq_id", "True")  # type: ignore[arg-type]


def test_ttl():
    assert check_ttl(None) is None
    assert check_ttl(1) == 1 and check_ttl(60, limits=SMALL) == 60 and check_ttl(0.5) == 0.5
    assert check_ttl(DEFAULT_LIMITS.max_ttl_s) == DEFAULT_LIMITS.max_ttl_s
    refused(lambda: check_ttl(61, limits=SMALL), "ttl_seconds", "61", "60")
    refused(lambda: check_ttl(2**63), "ttl_seconds", str(2**63))
    refused(lambda: check_ttl(0), "ttl_seconds", "0")
    refused(lambda: check_ttl(math.nan, field="ttl"), "ttl", "nan")


def test_the_largest_ttl_renders_as_a_timestamp():
    import datetime
    import time

    datetime.datetime.fromtimestamp(time.time() + RequestLimits(max_ttl_s=100 * 366 * 86400).max_ttl_s,
                                    tz=datetime.timezone.utc).isoformat()


def test_metadata():
    assert check_metadata(None) is None
    md = {"a": "x" * 26, "b": 1}  # {"a":"xxx…","b":1} is 40 bytes
    assert len(msgspec.json.encode(md)) == 40 and check_metadata(md, limits=SMALL) is md
    refused(lambda: check_metadata({"a": "x" * 27, "b": 1}, limits=SMALL), "user_metadata", "41 bytes", "40")
    refused(lambda: check_metadata({"a": 1, "b": 2, "c": 3}, limits=SMALL), "user_metadata", "3 entries", "2")
    refused(lambda: check_metadata({1: "x"}, limits=SMALL), "user_metadata", "1")  # type: ignore[dict-item]
    refused(lambda: check_metadata(["x"], field="meta"), "meta", "list")  # type: ignore[arg-type]
    refused(lambda: check_metadata({"a": object()}), "user_metadata", "JSON")


def test_tags():
    assert check_tags(None) == [] and check_tags(("abcd", ""), limits=SMALL) == ["abcd", ""]
    refused(lambda: check_tags(["a", "b", "c"], limits=SMALL), "tags", "3 tags", "2")
    refused(lambda: check_tags(["a", "abcde"], limits=SMALL), "tags[1]", "5 characters", "4")
    refused(lambda: check_tags(["a", 3], limits=SMALL), "tags[1]", "3")  # type: ignore[list-item]
    refused(lambda: check_tags("abc"), "tags", "str")  # type: ignore[arg-type]


def test_page():
    assert check_page(None, None) == (20, 0)
    assert check_page(1, 0) == (1, 0)
    assert check_page(10**6, MAX_JSON_SAFE_INT) == (DEFAULT_LIMITS.max_page_size, MAX_JSON_SAFE_INT)
    assert check_page(None, None, limits=SMALL, default=100) == (50, 0)
    refused(lambda: check_page(0, None), "limit", "0")
    refused(lambda: check_page(None, -1), "offset", "-1")
    refused(lambda: check_page(None, 2**63), "offset", str(2**63))
