"""Prometheus metrics of one central app, in the standard text format at ``<server root>/metrics``.

Built on ``prometheus_client`` with a registry per app (Ray Serve's own metrics, exported by Ray's metrics
agent, are left alone). What is counted where:

- HTTP requests by protocol, route (the handler's name) and status: ``MetricsMiddleware``, in both apps;
- every request when it ends (``Metrics.finished``, an observer of the control plane: the central app's
  futures, and in twinkle mode the training and sampling the component apps report): its duration by kind
  and outcome (step and sample latency histograms), and per key the tokens it trained (forward/backward),
  prefilled (a sample's prompt) and sampled;
- at scrape time, from the plane: requests queued or running and polls held per key, checkpoint bytes per
  key, and whether each model and sampler service answers its health check; from that check (one replica's
  figures where an application has several): requests queued at each service, how long the model's current
  operation has run, how long each key's requests waited in its queue, adapters resident on the device and
  offloaded, and the adapter cache's hits, loads (misses) and idle offloads (evictions) since the replica
  started.

Keys appear only as principal ids (``p-…``), never as API keys. ``/metrics`` answers without a key to
loopback clients only; from anywhere else it needs an admin key.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from twinkle.common.outcomes import Outcome
from twinkle.common.wire import ServiceHealth

from ..auth import request_key

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metrics of one app, on its own registry."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("twinkle_http_requests", "HTTP requests answered", ["protocol", "route", "status"],
                                registry=r)
        self.request_seconds = Histogram("twinkle_request_seconds", "Time from a request's submission to its "
                                         "outcome, by kind (forward_backward, optim_step, sample, ...)",
                                         ["kind", "outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("twinkle_tokens", "Tokens per key: trained (forward/backward), prefilled (sample "
                              "prompts), sampled", ["key", "kind"], registry=r)
        self.pending = Gauge("twinkle_pending_requests", "Requests queued or running per key", ["key"], registry=r)
        self.polls = Gauge("twinkle_held_polls", "Long-polls held open per key", ["key"], registry=r)
        self.checkpoint_bytes = Gauge("twinkle_checkpoint_bytes", "Bytes of checkpoints kept per key", ["key"],
                                      registry=r)
        self.service_up = Gauge("twinkle_service_up", "1 when a model or sampler service answers its health check",
                                ["kind", "model"], registry=r)
        self.services = _ServiceFigures()
        r.register(self.services)

    # ------------------------------------------------------------------------------- futures

    def finished(self, o: Outcome) -> None:
        """A request ended (the control plane tells its observers of each)."""
        self.request_seconds.labels(o.kind, o.status).observe(max(0.0, o.finished - o.created))
        if o.status != "done":
            return
        if o.kind == "forward_backward":
            self.tokens.labels(o.owner, "trained").inc(o.trained_tokens)
        elif o.kind == "sample":
            self.tokens.labels(o.owner, "sampled").inc(o.sampled_tokens)
            self.tokens.labels(o.owner, "prefilled").inc(o.prompt_tokens)

    # ------------------------------------------------------------------------------- scrape

    async def render(self, plane: Any) -> bytes:
        """The exposition, after reading what is sampled at scrape time from ``plane``."""
        self.pending.clear()
        for key, n in plane.futures.pending_by_owner().items():
            self.pending.labels(key).set(n)
        self.polls.clear()
        for key, n in plane.futures.polls_by_owner().items():
            self.polls.labels(key).set(n)
        self.checkpoint_bytes.clear()
        for key, row in (await plane.store.usage()).items():
            self.checkpoint_bytes.labels(key).set(row["checkpoint_bytes"])

        self.services.health.clear()

        async def up(kind: str, name: str, port: Any) -> None:
            try:
                health = await asyncio.wait_for(port.health(), 5.0)
                self.services.health[(kind, name)] = msgspec.convert(health, ServiceHealth, from_attributes=True)
                self.service_up.labels(kind, name).set(1)
            except Exception:  # noqa: BLE001 - down is the figure
                self.service_up.labels(kind, name).set(0)

        await asyncio.gather(*[up("model", n, p) for n, p in plane.models.items()],
                             *[up("sampler", n, p) for n, p in plane.samplers.items()])
        return generate_latest(self.registry)


class _ServiceFigures:
    """The load figures of the services' health checks made for this scrape, as metric families."""

    def __init__(self) -> None:
        self.health: dict[tuple[str, str], ServiceHealth] = {}

    def collect(self):
        queued = GaugeMetricFamily("twinkle_service_queued_requests", "Requests waiting or running at a model or "
                                   "sampler service", labels=["kind", "model"])
        busy = GaugeMetricFamily("twinkle_model_busy_seconds", "How long the model's current operation has run",
                                 labels=["model"])
        adapters = GaugeMetricFamily("twinkle_adapters", "Training runs' adapters held by the model service, on the "
                                     "device (resident) or moved off it (offloaded)", labels=["model", "state"])
        requests = CounterMetricFamily("twinkle_adapter_requests", "Requests by whether their run's adapter was on "
                                       "the device (hit) or was brought back (load)", labels=["model", "adapter"])
        offloads = CounterMetricFamily("twinkle_adapter_offloads", "Adapters moved off the device when idle",
                                       labels=["model"])
        waited = SummaryMetricFamily("twinkle_queue_wait_seconds", "Time a key's requests waited in the model's "
                                     "queue before they started", labels=["model", "key"])
        for (kind, name), h in self.health.items():
            if h.queued is not None:
                queued.add_metric([kind, name], h.queued)
            if kind != "model" or h.runs is None:
                continue
            busy.add_metric([name], h.busy_for_s or 0.0)
            adapters.add_metric([name, "resident"], h.resident_runs or 0)
            adapters.add_metric([name, "offloaded"], h.runs - (h.resident_runs or 0))
            if h.adapter_hits is not None:
                requests.add_metric([name, "hit"], h.adapter_hits)
                requests.add_metric([name, "load"], h.adapter_loads or 0)
                offloads.add_metric([name], h.adapter_offloads or 0)
            for key, (count, seconds) in (h.queue_wait or {}).items():
                waited.add_metric([name, key], count, seconds)
        return [queued, busy, adapters, requests, offloads, waited]


class MetricsMiddleware(ASGIMiddleware):
    """Counts every HTTP answer by the route's handler name and its status."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, send_status)
        finally:
            handler = scope.get("route_handler")
            route = getattr(handler, "handler_name", None) or "unmatched"
            self.metrics.requests.labels(self.metrics.protocol, route, str(status["code"])).inc()


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@get("/metrics", opt={"exclude_from_auth": True}, include_in_schema=False)
async def metrics_route(request: Request) -> Response:
    """Prometheus text format; loopback clients need no key, others an admin key."""
    if not _loopback(request):
        keyring = request.app.state.keyring
        key = request_key(request.headers)
        if keyring is None or key is None:
            raise NotAuthorizedException(detail="/metrics needs an admin key from outside this host")
        if not keyring.authenticate(key).admin:
            raise PermissionDeniedException(detail="/metrics needs an admin key from outside this host")
    metrics: Metrics = request.app.state.metrics
    body = await metrics.render(request.app.state.plane)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
