"""The central ``server`` application as a Ray Serve deployment.

``server_type`` picks what it speaks: ``tinker`` mounts the Tinker-compatible API (TinkerCompatServer) and
``twinkle`` the native one (TwinkleServer). Either way it reaches the model and sampler applications through
Serve deployment handles (no HTTP hop back through the proxy), resolved lazily by application name.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from ray import serve

from twinkle.common.component import ComponentSpec
from twinkle.common.http import component_app, distribution_version
from twinkle.common.serving import bind_component


@serve.ingress()
class CentralServer:
    """Holds what the central app needs for its lifetime: its spec and the handles on its peers."""

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "server_type": self.spec.server_type}

    async def info(self) -> dict[str, Any]:
        return {
            "server_type": self.spec.server_type,
            "version": distribution_version("twinkle-gateway"),
            "applications": [
                {"name": p.app_name, "kind": p.import_path, "route_prefix": p.route_prefix, "model": p.model_name}
                for p in self.spec.peers
            ],
        }

    def __serve_build_asgi_app__(self) -> Litestar:
        if self.spec.server_type == "tinker":
            return build_tinker_app(self.spec)
        return component_app("Twinkle server", "twinkle-gateway", self)


def peer_handle(spec: ComponentSpec, app_name: str):
    peer = next(p for p in spec.peers if p.app_name == app_name)
    return serve.get_deployment_handle(peer.deployment_name, app_name=peer.app_name)


def build_tinker_app(spec: ComponentSpec) -> Litestar:
    from .backends import HandlePort
    from .tinker import TinkerSettings, create_tinker_app

    models = {p.model_name: HandlePort(lambda p=p: peer_handle(spec, p.app_name))
              for p in spec.peers if p.import_path == "model"}
    samplers = {p.model_name: HandlePort(lambda p=p: peer_handle(spec, p.app_name))
                for p in spec.peers if p.import_path == "sampler"}
    settings = TinkerSettings.from_server_args(spec.args, checkpoint_dir=spec.checkpoint_dir,
                                               state_db=spec.state_db, host=spec.http_host)
    return create_tinker_app(settings, models=models, samplers=samplers)


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    return bind_component(CentralServer, spec, deployment, default_name)

