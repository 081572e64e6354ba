"""The Processor application as a Ray Serve deployment.

Its CPU workers are local processes (``twinkle.common.workers.ProcessWorker``) of one ``ProcessorService``,
as many as the plan's ``dp_size``. The service is hosted by ``start_workers`` on the node the planner chose:
in the replica itself when that is where the replica runs, else in one pinned Ray actor there.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from ray import serve

from twinkle.common.binding import bind_component, start_workers
from twinkle.common.component import ComponentSpec
from twinkle.common.models import TINY_MODEL_ID
from twinkle.common.wire import ServiceHealth, ServiceInfo

from .app import create_processor_app

_SERVICE = "twinkle.processor.service:ProcessorService"


@serve.ingress()
class ProcessorManagement:
    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        model_id = spec.args.get("model_id") or TINY_MODEL_ID
        num_workers = max(1, len(spec.workers))
        host = spec.workers[:1]  # one host process; its pool holds the planned worker processes
        host_spec = msgspec.structs.replace(spec, workers=host)
        (self.host,) = start_workers(host_spec, _SERVICE, lambda w: ((model_id,), {"num_workers": num_workers}))

    # The service's operations by name, so the app (and handle callers) use one API for this deployment and
    # for a ``ProcessorService`` in-process.
    async def tokenize(self, request: Any) -> Any:
        return await self.host.call("tokenize", request)

    async def detokenize(self, request: Any) -> Any:
        return await self.host.call("detokenize", request)

    async def render_chat(self, request: Any) -> Any:
        return await self.host.call("render_chat", request)

    async def encode(self, request: Any) -> Any:
        return await self.host.call("encode", request)

    async def health(self) -> ServiceHealth:
        return await self.host.call("health")

    async def info(self) -> ServiceInfo:
        info: ServiceInfo = await self.host.call("info")
        host = await self.host.describe()
        # The worker processes are the host's children, on its node (they are not Ray actors).
        workers = [w if w.node_id else msgspec.structs.replace(w, node_id=host.node_id) for w in info.workers]
        return msgspec.structs.replace(info, app=self.spec.app_name, workers=workers)

    def __serve_build_asgi_app__(self) -> Litestar:
        from twinkle.common.authority import central_authority

        return create_processor_app(self, central_authority(self.spec))


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    return bind_component(ProcessorManagement, spec, deployment, default_name)
