"""The whole native stack in one process, on a real HTTP port: for tests, examples and demos without Ray.

``LocalTwinkleStack`` builds the Model, Sampler and Processor services of one model id and serves the four
apps exactly where ``deploy/local.yaml`` puts them (``/server``, ``/models/<name>``, ``/sampler/<name>``,
``/processors``) from one uvicorn server on ``127.0.0.1:<free port>``, in a background thread with its own
event loop. A small prefix dispatcher stands in for the Ray Serve proxy (it sets the ASGI ``root_path`` the
way Serve does); the component apps reach the central service directly instead of through a Serve handle
(the ``Authority`` is the ``NativeService`` object itself), and the central service reaches the engines
through ``LocalPort``s. Everything else — auth, store, futures, ordering, the engines — is the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from twinkle.common.component import PeerApp

from .._uvicorn import BackgroundServer
from ..core.ports import LocalPort
from .router import create_twinkle_app
from .serving import NativeService
from .settings import NativeSettings


class PrefixDispatcher:
    """An ASGI app routing by path prefix to sub-apps (longest prefix first), as the Serve proxy does, and
    running every sub-app's lifespan in order (shut down in reverse)."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps
        self._order = sorted(apps, key=len, reverse=True)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "")
        for prefix in self._order:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                await self.apps[prefix]({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)
                return
        body = json.dumps({"detail": f"Path '{path}' not found"}).encode()
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        started: list[_Lifespan] = []
        message = await receive()
        assert message["type"] == "lifespan.startup"
        try:
            for prefix in self.apps:  # insertion order: the central server first
                span = _Lifespan(self.apps[prefix])
                await span.start()
                started.append(span)
        except BaseException as e:  # noqa: BLE001 - reported to the server
            for span in reversed(started):
                await span.stop()
            await send({"type": "lifespan.startup.failed", "message": repr(e)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        for span in reversed(started):
            with contextlib.suppress(Exception):
                await span.stop()
        await send({"type": "lifespan.shutdown.complete"})


class _Lifespan:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"an app failed to start: {reply.get('message')}")

    async def stop(self) -> None:
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        if self._task is not None:
            await self._task


class LocalTwinkleStack(BackgroundServer):
    """``with LocalTwinkleStack(settings, model_id) as stack: TwinkleClient(stack.base_url, api_key=...)``.

    ``services`` may give already-built ``{"model": ModelService, "sampler": SamplerService,
    "processor": ProcessorService}`` (shared between stacks, e.g. to restart the server over the same
    engines); otherwise they are built here and closed on exit.
    """

    what = "the Twinkle stack"
    thread_name = "twinkle-stack"
    start_timeout_s = 120
    stop_timeout_s = 60

    def __init__(self, settings: NativeSettings, model_id: str | None = None, *,
                 services: dict[str, Any] | None = None, port: int | None = None, log_level: str = "warning",
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(port=port, log_level=log_level)
        self.settings = settings
        self.model_id = model_id
        self._given = services
        self._model_kwargs = model_kwargs or {}
        self.services: dict[str, Any] = {}
        self.native: NativeService | None = None

    def _build_services(self) -> dict[str, Any]:
        if self._given is not None:
            return self._given
        from twinkle.model.service import ModelService
        from twinkle.processor.service import ProcessorService
        from twinkle.sampler.service import SamplerService

        assert self.model_id is not None, "give model_id or services"
        services = {
            "model": ModelService(self.model_id, **self._model_kwargs),
            "sampler": SamplerService(self.model_id),
            "processor": ProcessorService(self.model_id, num_workers=1),
        }
        self._own = list(services.values())
        return services

    def build_app(self) -> PrefixDispatcher:
        from twinkle.common.models import served_model_name
        from twinkle.model.app import create_model_app
        from twinkle.processor.app import create_processor_app
        from twinkle.sampler.app import create_sampler_app

        self.services = self._build_services()
        model_id = self.model_id or self.services["model"].model_id
        name = served_model_name(model_id)
        prefixes = {"model": f"/models/{name}", "sampler": f"/sampler/{name}", "processor": "/processors"}
        peers = [PeerApp(app_name=f"{kind}-{name}", deployment_name=kind, import_path=kind, route_prefix=prefix,
                         model_name=name, model_id=model_id) for kind, prefix in prefixes.items()]
        sampler = self.services["sampler"]
        self.native = NativeService(
            self.settings, models={name: LocalPort(self.services["model"])}, samplers={name: LocalPort(sampler)},
            peers=peers, server_prefix="/server",
        )
        return PrefixDispatcher({
            "/server": create_twinkle_app(self.native),
            prefixes["model"]: create_model_app(self.services["model"], self.native.authority, model_name=name),
            prefixes["sampler"]: create_sampler_app(sampler, self.native.authority, model_name=name),
            prefixes["processor"]: create_processor_app(self.services["processor"], self.native.authority),
        })
