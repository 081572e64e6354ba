"""The OpenAI-compatible surface in-process: a stream sends text while the completion is still being sampled,
and leaving a stream early cancels the request."""

from __future__ import annotations

import time

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    settings = TinkerSettings(checkpoint_dir=str(tmp_path_factory.mktemp("oai") / "ckpt"))
    with LocalTinkerServer(settings, TINY_MODEL_ID) as srv:
        yield srv


def _client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/oai/api/v1", api_key="tml-oai", max_retries=0)


def test_a_stream_sends_text_while_the_completion_is_sampled(server):
    futures = server.app.state.plane.futures
    stream = _client(server).completions.create(model="tiny-qwen2", prompt="Hello", max_tokens=1500,
                                                 temperature=0, stream=True)
    pieces, running_at_first = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            if running_at_first is None:
                running_at_first = futures.running  # the request is still being sampled
            pieces.append(chunk.choices[0].text)
    assert running_at_first == 1 and len(pieces) > 100
    whole = _client(server).completions.create(model="tiny-qwen2", prompt="Hello", max_tokens=1500, temperature=0)
    assert "".join(pieces) == whole.choices[0].text


def test_leaving_a_stream_cancels_its_request(server):
    futures = server.app.state.plane.futures
    engine = server.services["samplers"]["tiny-qwen2"].engine
    before = engine.stats()["aborted_rows"]
    stream = _client(server).chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=1800, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while (futures.running or engine.stats()["aborted_rows"] == before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert futures.running == 0 and engine.stats()["aborted_rows"] == before + 1
