"""``/metrics``: Prometheus text from the central app; per-key token counters and latency histograms move by
exactly what two keys did through the official SDK; only loopback or an admin key may scrape."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEYS = ("tml-metrics-alice", "tml-metrics-bob")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    settings = TinkerSettings(checkpoint_dir=str(tmp_path_factory.mktemp("metrics") / "ckpt"))
    with LocalTinkerServer(settings, TINY_MODEL_ID) as srv:
        yield srv


def _scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _finish(sc) -> None:
    """``sc.close("success")``, working around a bug of the tinker SDK (0.38): ``close`` cancels each sampling
    session's futures poller, and when that cancel lands while the poller is inside its long poll, httpx turns
    it into a connection error the poller retries; the poller then idles on its work event with the cancel
    swallowed, and ``close`` waits for it forever (seen in CI: the task is "cancelling" at
    ``session_futures_poller.py`` ``await self._has_work.wait()``). The server's part (``/finish``) is done by
    then. A poller stuck that way is cancelled once more, which it now takes; a close that still does not
    settle fails with the SDK's pending tasks."""
    import asyncio
    import concurrent.futures
    import io

    from tinker.lib.internal_client_holder import _internal_client_holder_thread_singleton as sdk_thread

    closing = sc.close("success")
    loop = sdk_thread.get_loop()
    for _ in range(2):
        try:
            return closing.result(timeout=30)
        except concurrent.futures.TimeoutError:
            def recancel() -> None:
                for task in asyncio.all_tasks(loop):
                    if task.get_name() == "tinker_session_futures_poller" and task.cancelling():
                        task.cancel()

            loop.call_soon_threadsafe(recancel)
    try:
        closing.result(timeout=60)
    except concurrent.futures.TimeoutError:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            task.print_stack(file=out)
        pytest.fail(f"the SDK's close did not finish; its pending tasks:\n{out.getvalue()}")


def test_per_key_tokens_and_latency_move_by_what_each_key_did(server):
    before = _scrape(server.base_url)
    sent = {}
    for key, n_datums in zip(KEYS, (1, 3)):
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=key)
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4).result()
        data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, 10 + i))),
                            loss_fn_inputs={"target_tokens": list(range(2, 11 + i))}) for i in range(n_datums)]
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        res = tc.save_weights_and_get_sampling_client().sample(
            types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(max_tokens=4, stop=[])).result()
        sent[key] = (sum(len(d.model_input.to_ints()) for d in data), sum(len(s.tokens) for s in res.sequences))
        _finish(sc)
    after = _scrape(server.base_url)
    keys = {s[1][0][1] for s in after if s[0] == "twinkle_tokens_total"}
    assert len(keys) == 2 and all(k.startswith("p-") for k in keys)  # principal ids, never API keys
    moved = sorted((_value(after, "twinkle_tokens_total", key=k, kind="trained")
                    - _value(before, "twinkle_tokens_total", key=k, kind="trained"),
                    _value(after, "twinkle_tokens_total", key=k, kind="sampled"),
                    _value(after, "twinkle_tokens_total", key=k, kind="prefilled")) for k in keys)
    assert moved == sorted((trained, sampled, 3) for trained, sampled in sent.values())  # one 3-token prompt
    for kind in ("forward_backward", "optim_step", "sample"):
        count = _value(after, "twinkle_request_seconds_count", kind=kind, outcome="done")
        assert count - _value(before, "twinkle_request_seconds_count", kind=kind, outcome="done") >= 2
    assert _value(after, "twinkle_http_requests_total", protocol="tinker", route="forward_backward",
                  status="200") >= 2
    assert _value(after, "twinkle_service_up", kind="model", model="tiny-qwen2") == 1
    assert _value(after, "twinkle_service_up", kind="sampler", model="tiny-qwen2") == 1


def test_queues_adapters_and_the_adapter_cache_are_scraped_from_the_model_service(tmp_path):
    """An idle run's adapter is offloaded (an eviction); its next request brings it back (a load, not a hit)."""
    import time

    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.auth import principal_id
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"))
    with LocalTinkerServer(settings, TINY_MODEL_ID, service_kwargs={"adapter_timeout_s": 3.0,
                                                                    "sweep_interval_s": 0.1}) as srv:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key=KEYS[0])
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4).result()
        data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, 10))),
                            loss_fn_inputs={"target_tokens": list(range(2, 11))})]
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        first = _scrape(srv.base_url)
        deadline = time.monotonic() + 30
        while _value(_scrape(srv.base_url), "twinkle_adapters", model="tiny-qwen2", state="offloaded") < 1:
            assert time.monotonic() < deadline, "the idle adapter was never offloaded"
            time.sleep(0.1)
        tc.forward_backward(data, "cross_entropy").result()
        after = _scrape(srv.base_url)
        _finish(sc)
    assert sum(_value(first, "twinkle_adapters", model="tiny-qwen2", state=s) for s in ("resident", "offloaded")) == 1
    assert _value(first, "twinkle_adapter_requests_total", model="tiny-qwen2", adapter="hit") == 2
    assert _value(after, "twinkle_adapter_requests_total", model="tiny-qwen2", adapter="load") == 1
    assert _value(after, "twinkle_adapter_offloads_total", model="tiny-qwen2") == 1
    assert ("twinkle_service_queued_requests", (("kind", "model"), ("model", "tiny-qwen2"))) in after
    assert ("twinkle_model_busy_seconds", (("model", "tiny-qwen2"),)) in after
    key = principal_id(KEYS[0])
    assert _value(after, "twinkle_queue_wait_seconds_count", model="tiny-qwen2", key=key) >= 3  # fb, step, fb
    assert _value(after, "twinkle_queue_wait_seconds_sum", model="tiny-qwen2", key=key) >= 0

def test_only_loopback_or_an_admin_key_may_scrape(tmp_path):
    from litestar.testing import TestClient

    from twinkle.server.core.ports import LocalPort
    from twinkle.server.tinker import TinkerSettings, create_tinker_app

    class _Down:
        async def health(self):
            raise RuntimeError("down")

    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"), api_keys=["tml-user"],
                              admin_keys=["tml-admin"])
    app = create_tinker_app(settings, {"m": LocalPort(_Down())}, {}, path_prefix="/api/v1")
    with TestClient(app) as client:  # TestClient's peer is not a loopback address
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "tml-user"}).status_code == 403
        r = client.get("/metrics", headers={"Authorization": "Bearer tml-admin"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert 'twinkle_service_up{kind="model",model="m"} 0.0' in r.text


def test_the_sdks_billing_methods_report_each_keys_usage_and_all_of_it_to_an_admin(tmp_path):
    """Per key and UTC hour: training, prefill and sampled tokens and checkpoint saves, through the SDK's own
    ``RestClient.get_billing_usage`` / ``get_current_checkpoint_storage_usage``."""
    from datetime import datetime, timedelta, timezone

    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    users, admin = ("tml-usage-a", "tml-usage-b"), "tml-usage-admin"
    settings = TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt"), api_keys=list(users), admin_keys=[admin])
    did = {}
    with LocalTinkerServer(settings, TINY_MODEL_ID) as server:
        for key, n in zip(users, (1, 2)):
            sc = tinker.ServiceClient(base_url=server.base_url, api_key=key)
            tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4).result()
            data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, 8))),
                                loss_fn_inputs={"target_tokens": list(range(2, 9))})] * n
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            tc.save_state("s").result()
            out = tc.save_weights_and_get_sampling_client().sample(
                types.ModelInput.from_ints([5, 6, 7, 8]), n, types.SamplingParams(max_tokens=3, stop=[])).result()
            did[key] = {"training": 7 * n, "sampling_prefill": 4, "sampling_sample": sum(len(s.tokens) for s in
                                                                                          out.sequences),
                        "checkpoint": 2}
            _finish(sc)
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        window = (hour - timedelta(hours=1), hour + timedelta(hours=1))

        def totals(key):
            usage = tinker.RestClient(base_url=server.base_url, api_key=key).get_billing_usage(*window).result()
            out = {}
            for e in usage.data:
                info = e.event_info
                amount = info.count if info.type == "checkpoint" else info.token_count
                out.setdefault(e.user_id, {}).setdefault(info.type, 0)
                out[e.user_id][info.type] += amount
            return out

        mine = [totals(key) for key in users]
        assert [list(m.values()) for m in mine] == [[did[users[0]]], [did[users[1]]]]  # one key each, exact
        everyone = totals(admin)
        assert sorted(everyone.values(), key=lambda d: d["training"]) == [did[users[0]], did[users[1]]]
        storage = tinker.RestClient(base_url=server.base_url, api_key=users[0]).get_current_checkpoint_storage_usage()
        rows = storage.result().data
        assert len(rows) == 1 and rows[0].checkpoint_count == 1 and rows[0].size_bytes > 0
        # the audit log: who created, read, published and deleted what, per key; everything for an admin
        a = tinker.RestClient(base_url=server.base_url, api_key=users[0])
        path = a.list_user_checkpoints().result().checkpoints[0].tinker_path
        a.publish_checkpoint_from_tinker_path(path).result()
        reader = tinker.ServiceClient(base_url=server.base_url, api_key=users[1])
        reader.create_training_client_from_state(path).result()
        _finish(reader)
        a.delete_checkpoint_from_tinker_path(path).result()
        events = [(e.event, e.event_details.get("actor"), e.tinker_path) for e in a.get_audit_log().result().entries]
        alice, bob = (next(e.user_id for e in tinker.RestClient(base_url=server.base_url, api_key=k).get_billing_usage(
            *window).result().data) for k in users)
        assert [e for e in events if e[2] == path] == [
            ("checkpoint_create", alice, path), ("checkpoint_publish", alice, path), ("checkpoint_read", bob, path),
            ("checkpoint_delete", alice, path)]
        assert events[0][0] == "training_run_create"
        b_events = tinker.RestClient(base_url=server.base_url, api_key=users[1]).get_audit_log("checkpoints").result()
        assert all(e.event_details["owner"] == bob for e in b_events.entries)  # only what is about its resources
        assert {e.event_details["owner"] for e in
                tinker.RestClient(base_url=server.base_url, api_key=admin).get_audit_log().result().entries} == {alice, bob}
        with pytest.raises(tinker.BadRequestError, match="hour"):
            tinker.RestClient(base_url=server.base_url, api_key=users[0]).get_billing_usage(
                hour + timedelta(minutes=5), hour + timedelta(hours=1)).result()


def test_a_runs_history_has_one_row_per_step(server):
    """Loss summed over the passes since the previous step, their tokens, learning rate, gradient norm."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=KEYS[0])
    tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(1, 9))),
                        loss_fn_inputs={"target_tokens": list(range(2, 10))})
    losses = []
    for step in range(3):
        passes = [tc.forward_backward([datum], "cross_entropy").result() for _ in range(step + 1)]
        losses.append(sum(p.metrics["loss:sum"] for p in passes))
        tc.optim_step(types.AdamParams(learning_rate=1e-3 * (step + 1))).result()
    run_id = tc.model_id
    url = f"{server.base_url}/api/v1/training_runs/{run_id}/history"
    rows = httpx.get(url, headers={"X-API-Key": KEYS[0]}, timeout=30).json()["steps"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["tokens"] for r in rows] == [8, 16, 24]
    assert [r["learning_rate"] for r in rows] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-6)
    assert all(r["grad_norm"] > 0 and r["time"] > 0 for r in rows)
    later = httpx.get(url, params={"after_step": 2}, headers={"X-API-Key": KEYS[0]}, timeout=30).json()["steps"]
    assert [r["step"] for r in later] == [3]
    assert httpx.get(url, headers={"X-API-Key": KEYS[1]}, timeout=30).status_code == 404  # another key's run
    _finish(sc)


def test_the_grafana_dashboard_reads_only_metrics_the_server_exposes():
    import json
    import re
    from pathlib import Path

    from twinkle.common.wire import ServiceHealth
    from twinkle.server.core.metrics import Metrics

    dashboard = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "twinkle-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(twinkle_[a-z_]+)", e)}
    metrics = Metrics("test")
    metrics.request_seconds.labels("sample", "done").observe(0.1)  # histogram series exist once observed
    metrics.services.health[("model", "m")] = ServiceHealth(  # as read from a model service at scrape time
        kind="model", queued=0, busy_for_s=0.0, runs=1, resident_runs=1, adapter_hits=1, adapter_loads=0,
        adapter_offloads=0, queue_wait={"p-x": (1, 0.1)})
    exposed = {s.name for family in metrics.registry.collect() for s in family.samples} | {
        f.name for f in metrics.registry.collect()} | {f.name + "_total" for f in metrics.registry.collect()}
    assert used and used <= exposed, used - exposed


def test_an_internal_error_is_logged_under_the_correlation_id_its_client_sees(tmp_path):
    """The id in an error body finds the traceback: a ``correlation_id`` field on the log record (a JSON line
    with ``log_format: json``), with the failed request's id."""
    import json
    import logging

    from litestar.testing import TestClient

    from twinkle.common.http import JsonLogFormatter
    from twinkle.server.core.ports import LocalPort
    from twinkle.server.tinker import TinkerSettings, create_tinker_app

    class Broken:
        async def create_run(self, *args, **kwargs):
            raise RuntimeError("disk on fire")

    app = create_tinker_app(TinkerSettings(checkpoint_dir=str(tmp_path / "ckpt")), {"m": LocalPort(Broken())}, {},
                            path_prefix="/api/v1")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("twinkle").addHandler(handler)
    with TestClient(app) as client:
        headers = {"X-API-Key": "tml-logs"}
        sid = client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "t"}, headers=headers).json()
        fut = client.post("/api/v1/create_model", headers=headers, json={
            "session_id": sid["session_id"], "model_seq_id": 0, "base_model": "m", "lora_config": {"rank": 2}}).json()
        body = client.post("/api/v1/retrieve_future", json={"request_id": fut["request_id"]}, headers=headers).json()
    cid = body["error"].split("correlation id ")[1].rstrip(")")
    logging.getLogger("twinkle").removeHandler(handler)
    record = next(r for r in records if getattr(r, "correlation_id", None) == cid)
    assert record.request_id == fut["request_id"] and "disk on fire" not in body["error"]
    line = json.loads(JsonLogFormatter().format(record))
    assert line["correlation_id"] == cid and line["request_id"] == fut["request_id"] and "disk on fire" in line["exc_text"]
