"""Per-key admission: queued work, held polls and open sessions are bounded per API key (429 with
Retry-After, which the tinker SDK backs off and retries), checkpoints by count and bytes; one key at its
limit never slows or refuses another key."""

from __future__ import annotations

import asyncio

import pytest
from litestar.testing import TestClient

from twinkle.common.models import TINY_MODEL_ID, served_model_name
from twinkle.server.core import Busy
from twinkle.server.core.futures import Futures
from twinkle.server.core.state import Store

pytest.importorskip("tinker")

MODEL = served_model_name(TINY_MODEL_ID)


async def _futures(tmp_path, **limits):
    store = await Store.open(str(tmp_path / "state.sqlite"))
    return store, Futures(store, long_poll_s=5.0, **limits)


async def test_queued_work_is_bounded_per_key(tmp_path):
    store, futures = await _futures(tmp_path, max_pending_per_owner=2)
    gate = asyncio.Event()

    async def slow():
        await gate.wait()
        return {"ok": True}

    try:
        first = [await futures.submit(owner="p-a", kind="k", work=slow) for _ in range(2)]
        with pytest.raises(Busy) as refused:
            await futures.submit(owner="p-a", kind="k", work=slow)
        assert refused.value.status == 429 and "max_pending_per_key" in str(refused.value)
        other = await futures.submit(owner="p-b", kind="k", work=slow)  # another key is not affected
        gate.set()
        for record in first + [other]:
            assert (await futures.wait(record.request_id, record.owner)).status == "done"
        await futures.submit(owner="p-a", kind="k", work=slow)  # room again once its work finished
    finally:
        gate.set()
        await futures.close()
        await store.close()


async def test_held_polls_are_bounded_per_key(tmp_path):
    store, futures = await _futures(tmp_path, max_polls_per_owner=1)
    gate = asyncio.Event()

    async def slow():
        await gate.wait()
        return 1

    try:
        mine = await futures.submit(owner="p-a", kind="k", work=slow)
        theirs = await futures.submit(owner="p-b", kind="k", work=slow)
        held = asyncio.create_task(futures.wait(mine.request_id, "p-a", timeout=5.0))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await futures.wait(mine.request_id, "p-a", timeout=5.0)
        assert (await futures.wait(theirs.request_id, "p-b", timeout=0.01)).status == "pending"
        assert (await futures.wait(mine.request_id, "p-a", timeout=0)).status == "pending"  # no wait, no slot
        gate.set()
        assert (await held).status == "done"
        assert (await futures.wait(mine.request_id, "p-a", timeout=5.0)).status == "done"
    finally:
        gate.set()
        await futures.close()
        await store.close()


@pytest.fixture(scope="module")
def services():
    from twinkle.model.service import ModelService
    from twinkle.sampler.service import SamplerService

    yield ModelService(TINY_MODEL_ID), SamplerService(TINY_MODEL_ID)


def _client(services, tmp_path, **settings):
    from twinkle.server.core.ports import LocalPort
    from twinkle.server.tinker import TinkerSettings, create_tinker_app

    model, sampler = services
    app = create_tinker_app(TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"), api_keys=["tml-a", "tml-b"],
                                           **settings),
                            {MODEL: LocalPort(model)}, {MODEL: LocalPort(sampler)}, path_prefix="/api/v1")
    return TestClient(app)


def _post(client, path, body, key="tml-a"):
    return client.post(f"/api/v1/{path}", json=body, headers={"X-API-Key": key})


def test_open_sessions_are_bounded_per_key_with_retry_after(services, tmp_path):
    with _client(services, tmp_path, max_sessions_per_key=2) as client:
        for _ in range(2):
            assert _post(client, "create_session", {}).status_code == 200
        r = _post(client, "create_session", {})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "max_sessions_per_key" in r.json()["detail"]
        assert _post(client, "create_session", {}, key="tml-b").status_code == 200


def test_checkpoints_are_bounded_per_key(services, tmp_path):
    with _client(services, tmp_path, max_checkpoints_per_key=1) as client:
        sid = _post(client, "create_session", {}).json()["session_id"]
        created = _post(client, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": MODEL,
                                                 "lora_config": {"rank": 4}}).json()
        model_id = created["model_id"]

        def result(request_id):
            while True:
                out = _post(client, "retrieve_future", {"request_id": request_id}).json()
                if out.get("type") != "try_again":
                    return out

        result(created["request_id"])
        saved = _post(client, "save_weights", {"model_id": model_id, "path": "one", "seq_id": 1}).json()
        assert "error" not in result(saved["request_id"])
        r = _post(client, "save_weights", {"model_id": model_id, "path": "two", "seq_id": 2})
        assert r.status_code == 400 and "max_checkpoints_per_key" in r.json()["detail"]
        step = _post(client, "optim_step", {"model_id": model_id, "seq_id": 3, "adam_params": {}}).json()
        assert "error" not in result(step["request_id"])  # the refused save released its seq_id
