"""``twinkle_client.tinker.service_client``: the official SDK, unpatched, against a Twinkle server in tinker
mode (the Tinker-compatible app in-process over the real engines)."""

from __future__ import annotations

import types

import pytest

tinker = pytest.importorskip("tinker")

from twinkle_client.tinker import service_client  # noqa: E402


def _public_state(module):
    """The SDK's classes and functions (its lazily imported submodules may change as it is used)."""
    return {name: id(value) for name, value in list(vars(module).items())
            if isinstance(value, type) or isinstance(value, types.FunctionType)}


def test_service_client_is_the_official_one_unpatched(tinker_server, monkeypatch):
    before = (_public_state(tinker), dict(vars(tinker.ServiceClient)))
    # the SDK's own path may be included or not; the key comes from the environment
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "tml-helper")
    sc = service_client(tinker_server.base_url + "/api/v1")
    try:
        assert type(sc) is tinker.ServiceClient
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=2).result()
        assert tc.get_info().model_data.model_name == "tiny-qwen2"
        datum = tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints([1, 2, 3]),
                                   loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
        out = tc.forward([datum], "cross_entropy").result()
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == 3
    finally:
        sc.close("success").result()
    after = _public_state(tinker)
    # nothing the SDK had was replaced (using it may import more of its own submodules)
    assert {k: after.get(k) for k in before[0]} == before[0]
    assert dict(vars(tinker.ServiceClient)) == before[1]


def test_service_client_checks_the_key_and_url(monkeypatch):
    monkeypatch.delenv("TWINKLE_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        service_client("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="tml-"):
        service_client("http://127.0.0.1:1", api_key="secret")
    with pytest.raises(ValueError, match="http://host:port"):
        service_client("127.0.0.1:8000", api_key="tml-x")
