"""``twinkle_client.openai.openai_client``: the official ``openai`` client against a Twinkle server's
OpenAI-compatible surface (the Tinker-compatible app in-process over the real engines)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from twinkle_client.openai import openai_client  # noqa: E402


@pytest.mark.parametrize("suffix", ["", "/api/v1", "/oai/api/v1/"])
def test_the_client_reaches_the_oai_surface_from_any_of_the_servers_urls(tinker_server, monkeypatch, suffix):
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "tml-openai-helper")
    client, model = openai_client(tinker_server.base_url + suffix, checkpoint="tiny-qwen2")
    assert type(client) is openai.OpenAI and str(client.base_url).rstrip("/").endswith("/oai/api/v1")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 3


def test_bad_urls_and_missing_keys_are_refused_before_any_request(monkeypatch):
    monkeypatch.delenv("TWINKLE_SERVER_TOKEN", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        openai_client("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="http://host:port"):
        openai_client("ftp://x", api_key="tml-x")
