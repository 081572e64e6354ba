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
from twinkle.common.binding import bind_component


@serve.ingress()
class CentralServer:
    """Holds what the central app needs for its lifetime: its spec and the handles on its peers.

    In twinkle mode it also answers the component apps' Serve-handle calls (``twinkle.common.authority``):
    ``authenticate``, ``submit_save``, ``submit_load``, ``resolve_checkpoint``, ``report``, served by the same
    ``NativeService`` as its HTTP routes (same store, same keys, same event loop).
    """

    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        self.native = build_native_service(spec) if spec.server_type == "twinkle" else None

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
            app = build_tinker_app(self.spec)
            if self.spec.listen is not None:
                from .listener import GatewayListener

                listener = GatewayListener(app, self.spec.listen)
                app.on_startup.append(listener.start)
                app.on_shutdown.insert(0, listener.stop)
            return app
        if self.native is not None:
            from .native import create_twinkle_app

            return create_twinkle_app(self.native, path_prefix=central_mount(self.spec.route_prefix, "twinkle")[1])
        return component_app("Twinkle server", "twinkle-gateway", self)

    # --- the Authority of the component apps (twinkle mode) -------------------------------------------

    def _native_service(self):
        if self.native is None:
            from twinkle.common.wire import UserError

            raise UserError("this server does not speak the native Twinkle protocol", status=404)
        return self.native

    async def authenticate(self, api_key: str | None) -> str:
        return await self._native_service().authority.authenticate(api_key)

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: Any) -> Any:
        return await self._native_service().authority.submit_save(owner, base_model, run_id, req)

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: Any) -> Any:
        return await self._native_service().authority.submit_load(owner, base_model, run_id, req)

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> Any:
        return await self._native_service().authority.resolve_checkpoint(owner, uri, base_model)

    async def report(self, outcomes: list[Any]) -> None:
        await self._native_service().authority.report(outcomes)


def central_mount(route_prefix: str, server_type: str) -> tuple[str, str]:
    """``(Serve route prefix, the protocol's path inside the app)`` of the central app. It is served from the
    server's root so that the OpenAI-compatible surface sits beside the protocol, as on hosted Tinker: with
    ``route_prefix: /api/v1`` (tinker) or ``/server`` (twinkle) the root is ``/``, the protocol keeps its paths
    and ``/oai/api/v1`` is added; Serve still routes the component apps' longer prefixes to them."""
    prefix = "/" + route_prefix.strip("/") if route_prefix.strip("/") else ""
    if server_type == "tinker":
        root = prefix[: -len("/api/v1")] if prefix.endswith("/api/v1") else prefix
    else:
        root = prefix.rsplit("/", 1)[0]
    return root or "/", prefix[len(root):]


def peer_handle(spec: ComponentSpec, app_name: str):
    peer = next(p for p in spec.peers if p.app_name == app_name)
    return serve.get_deployment_handle(peer.deployment_name, app_name=peer.app_name)


def peer_ports(spec: ComponentSpec, kind: str) -> dict:
    """Served model name -> a port on that application's deployment, for every peer of ``kind``. Handles
    are resolved on first use: the peers may still be starting when this replica is built."""
    from .core.ports import HandlePort

    return {p.model_name: HandlePort(lambda p=p: peer_handle(spec, p.app_name))
            for p in spec.peers if p.import_path == kind and p.model_name}


def build_tinker_app(spec: ComponentSpec) -> Litestar:
    from .tinker import TinkerSettings, create_tinker_app

    settings = TinkerSettings.from_server_args(spec.args, checkpoint_dir=spec.checkpoint_dir,
                                               state_db=spec.state_db, host=spec.http_host)
    return create_tinker_app(settings, models=peer_ports(spec, "model"), samplers=peer_ports(spec, "sampler"),
                             path_prefix=central_mount(spec.route_prefix, "tinker")[1])


def build_native_service(spec: ComponentSpec):
    """The TwinkleServer state over Serve handles on the model, sampler and processor applications."""
    from .native import NativeService, NativeSettings

    settings = NativeSettings.from_server_args(spec.args, checkpoint_dir=spec.checkpoint_dir,
                                               state_db=spec.state_db, host=spec.http_host)
    return NativeService(settings, models=peer_ports(spec, "model"), samplers=peer_ports(spec, "sampler"),
                         peers=list(spec.peers), server_prefix=spec.route_prefix)


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    # ingress: gateway: the replica answers HTTP on the launcher's machine, so it runs there
    node_ip = spec.listen.node_ip if spec.listen is not None else None
    return bind_component(CentralServer, spec, deployment, default_name, on_node=node_ip)
