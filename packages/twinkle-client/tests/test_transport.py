"""The client's HTTP behaviour in isolation (``httpx.MockTransport`` plays the server): retries and backoff,
``Retry-After``, error mapping, waiting on futures with progress. No server needed."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from twinkle_client import (
    TwinkleAuthError,
    TwinkleClient,
    TwinkleConnectionError,
    TwinkleNotFoundError,
    TwinkleServerError,
    TwinkleTimeoutError,
    TwinkleUserError,
)
from twinkle_client._transport import Transport


def _transport(handler, **kw) -> Transport:
    kw.setdefault("max_retries", 3)
    return Transport("http://twinkle.test", "tml-k", timeout=5, backoff_s=0.001, max_backoff_s=0.01,
                     user_agent="test", transport=httpx.MockTransport(handler), **kw)


def test_transient_failures_are_retried_then_succeed():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "starting"})
        if len(calls) == 3:
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(200, json={"ok": True})

    t = _transport(handler)
    assert t.call("POST", "/x", {"seq_id": 7}) == {"ok": True}
    assert len(calls) == 4
    assert {c.content for c in calls} == {b'{"seq_id":7}'}  # the same body (and seq_id) every time
    assert all(c.headers["x-api-key"] == "tml-k" for c in calls)


def test_429_honours_retry_after():
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.3"}, json={"detail": "slow down"})
        return httpx.Response(200, json={})

    _transport(handler).call("GET", "/x")
    assert calls[1] - calls[0] >= 0.29


def test_retries_give_up_with_a_clear_error():
    t = _transport(lambda r: httpx.Response(503, json={"detail": "overloaded"}), max_retries=2)
    with pytest.raises(TwinkleServerError) as e:
        t.call("GET", "/x")
    assert e.value.status == 503 and "overloaded" in e.value.detail

    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(TwinkleConnectionError):
        _transport(refuse, max_retries=1).call("GET", "/x")


@pytest.mark.parametrize("status, body, cls, field", [
    (400, {"detail": "loss_fn: unknown loss", "field": "loss_fn"}, TwinkleUserError, "loss_fn"),
    (401, {"detail": "invalid API key"}, TwinkleAuthError, None),
    (404, {"detail": "training run 'x' not found", "field": "run_id"}, TwinkleNotFoundError, "run_id"),
    (409, {"detail": "exists", "field": "name"}, TwinkleUserError, "name"),
    (400, {"detail": "Validation failed", "errors": [{"key": "lora.rank", "message": "Expected `int`"}]},
     TwinkleUserError, "lora.rank"),
    (500, {"detail": "internal server error (correlation id abc)"}, TwinkleServerError, None),
])
def test_errors_map_to_exceptions_without_retry(status, body, cls, field):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(status, json=body)

    with pytest.raises(cls) as e:
        _transport(handler).call("POST", "/x", {})
    assert len(calls) == 1 and e.value.status == status
    assert getattr(e.value, "field", None) == field
    assert body["detail"] in e.value.detail


def _fake_server(statuses):
    """A central server whose future answers ``statuses`` in turn."""
    polls = []

    def handler(request):
        path = request.url.path
        if path == "/server/healthz":
            return httpx.Response(200, json={"status": "ok", "server_type": "twinkle"})
        if path.startswith("/server/futures/"):
            polls.append(request.url.params.get("timeout"))
            status = statuses[min(len(polls), len(statuses)) - 1]
            body = {"request_id": "req-1", "status": status, "kind": "save", "elapsed_s": 1.0}
            if status == "done":
                body["result"] = {"uri": "twinkle://r/weights/x"}
            if status == "failed":
                body["error"] = {"detail": "name: checkpoint exists", "category": "user"}
            return httpx.Response(200, content=json.dumps(body))
        return httpx.Response(404, json={"detail": f"no such endpoint {path}"})

    return handler, polls


def test_wait_reports_progress_until_done():
    handler, polls = _fake_server(["pending", "pending", "done"])
    seen = []
    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler),
                       on_progress=seen.append) as c:
        assert json.loads(c.wait("req-1", kind="save x")) == {"uri": "twinkle://r/weights/x"}
    assert [p.polls for p in seen] == [1, 2] and all(p.kind == "save x" and p.status == "pending" for p in seen)
    assert len(polls) == 3


def test_wait_draws_a_bar_of_the_time_waited_only_when_asked_or_on_a_terminal(capsys):
    pytest.importorskip("tqdm")
    handler, polls = _fake_server(["pending", "running", "done"])
    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler),
                       progress=True) as c:
        c.wait("req-1", kind="save x")
    err = capsys.readouterr().err
    assert "save x: 00:00, pending" in err and "save x: 00:00, running" in err
    assert [float(t) for t in polls[1:]] == [1.0, 1.0]  # a drawn bar is redrawn every second
    handler, _ = _fake_server(["pending", "done"])
    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler)) as c:
        c.wait("req-2", kind="save y")  # progress=None: standard error is no terminal here
    assert "save y" not in capsys.readouterr().err


def test_wait_failures_and_timeouts():
    handler, _ = _fake_server(["failed"])
    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(TwinkleUserError) as e:
            c.wait("req-1")
        assert "checkpoint exists" in e.value.detail and e.value.request_id == "req-1"
    handler, _ = _fake_server(["pending"])
    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(TwinkleTimeoutError) as e:
            c.wait("req-1", timeout=0.0)
        assert e.value.request_id == "req-1"


def test_server_prefix_is_discovered_from_serve_routes():
    def handler(request):
        if request.url.path == "/-/routes":
            return httpx.Response(200, json={"/tw": "server", "/models/m": "models-m"})
        if request.url.path == "/tw/healthz":
            return httpx.Response(200, json={"status": "ok", "server_type": "twinkle"})
        return httpx.Response(404, json={"detail": "not found"})

    with TwinkleClient("http://twinkle.test", api_key="tml-k", transport=httpx.MockTransport(handler)) as c:
        assert c.server_prefix == "/tw"
