"""Run the Tinker app in-process over real services, on a real HTTP port: for tests, benchmarks and demos.

``LocalTinkerServer`` builds the Model and Sampler services for one model id, wraps them in ``LocalPort``s,
and serves ``create_tinker_app`` with uvicorn on ``127.0.0.1:<free port>`` in a background thread (its own
event loop), so a synchronous client such as the official ``tinker`` SDK can talk to it from the test thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

from ..backends import LocalPort
from .router import create_tinker_app
from .settings import TinkerSettings


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTinkerServer:
    """``with LocalTinkerServer(settings, model_id) as srv: ServiceClient(base_url=srv.base_url, ...)``.

    ``services`` may give already-built ``{"models": {...}, "samplers": {...}}`` service objects (shared
    between servers, e.g. to restart the gateway over the same engine); otherwise they are built here (and
    closed on exit).
    """

    def __init__(self, settings: TinkerSettings, model_id: str | None = None, *,
                 services: dict[str, dict[str, Any]] | None = None, port: int | None = None,
                 log_level: str = "warning", service_kwargs: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.model_id = model_id
        self.port = port or free_port()
        self.log_level = log_level
        self._given = services
        self._service_kwargs = service_kwargs or {}
        self._own: list[Any] = []
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.services: dict[str, dict[str, Any]] = {}
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _build_services(self) -> dict[str, dict[str, Any]]:
        if self._given is not None:
            return self._given
        from twinkle.common.models import served_model_name
        from twinkle.model.service import ModelService
        from twinkle.sampler.service import SamplerService

        assert self.model_id is not None, "give model_id or services"
        name = served_model_name(self.model_id)
        model = ModelService(self.model_id, **self._service_kwargs)
        sampler = SamplerService(self.model_id)
        self._own = [model, sampler]
        return {"models": {name: model}, "samplers": {name: sampler}}

    def start(self) -> "LocalTinkerServer":
        import uvicorn

        self.services = self._build_services()
        app = create_tinker_app(
            self.settings,
            models={k: LocalPort(v) for k, v in self.services["models"].items()},
            samplers={k: LocalPort(v) for k, v in self.services["samplers"].items()},
            path_prefix="/api/v1",
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=self.log_level, lifespan="on",
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._server.serve())
                if self._own:
                    self._loop.run_until_complete(self._close_services())
            except BaseException as e:  # noqa: BLE001 - surfaced to the starting thread
                self._error = e
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name=f"tinker-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the Tinker server did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the Tinker server did not start within 60 s")
            time.sleep(0.02)
        return self

    async def _close_services(self) -> None:
        for service in self._own:
            close = getattr(service, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> "LocalTinkerServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
