"""Run the Tinker app in-process over real services, on a real HTTP port: for tests, benchmarks and demos.

``LocalTinkerServer`` builds the Model and Sampler services for one model id, wraps them in ``LocalPort``s,
and serves ``create_tinker_app`` with uvicorn on ``127.0.0.1:<free port>`` in a background thread (its own
event loop), so a synchronous client such as the official ``tinker`` SDK can talk to it from the test thread.
"""

from __future__ import annotations

from typing import Any

from .._uvicorn import BackgroundServer
from ..core.ports import LocalPort
from .router import create_tinker_app
from .settings import TinkerSettings

class LocalTinkerServer(BackgroundServer):
    """``with LocalTinkerServer(settings, model_id) as srv: ServiceClient(base_url=srv.base_url, ...)``.

    ``services`` may give already-built ``{"models": {...}, "samplers": {...}}`` service objects (shared
    between servers, e.g. to restart the gateway over the same engine); otherwise they are built here (and
    closed on exit).
    """

    what = "the Tinker server"
    thread_name = "tinker-server"
    start_timeout_s = 60
    stop_timeout_s = 30

    def __init__(self, settings: TinkerSettings, model_id: str | None = None, *,
                 services: dict[str, dict[str, Any]] | None = None, port: int | None = None,
                 log_level: str = "warning", service_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(port=port, log_level=log_level)
        self.settings = settings
        self.model_id = model_id
        self._given = services
        self._service_kwargs = service_kwargs or {}
        self.services: dict[str, dict[str, Any]] = {}

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

    def build_app(self) -> Any:
        self.services = self._build_services()
        return create_tinker_app(
            self.settings,
            models={k: LocalPort(v) for k, v in self.services["models"].items()},
            samplers={k: LocalPort(v) for k, v in self.services["samplers"].items()},
            path_prefix="/api/v1",
        )
