"""Litestar handlers of the Tinker API and the app factory.

Handlers are thin: decode, call ``TinkerService``, encode. Paths are relative to the app; the deployment
serves it at ``route_prefix: /api/v1`` (Litestar strips the ASGI ``root_path``), and tests mount it under
``/api/v1`` with ``path_prefix``.

``create_tinker_app`` returns a *fresh* app each call: Ray Serve builds the app inside the replica from a
builder function, because a Litestar instance cannot be pickled.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
from typing import Any, Callable

import msgspec
from litestar import Litestar, Request, Response, delete, get, post, put, route
from litestar.datastructures import State
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.middleware import ASGIMiddleware, DefineMiddleware
from litestar.response import File
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from twinkle.common.wire import UserError

from ..auth import ApiKeyMiddleware, Principal, caller_id
from ..core import ControlPlane
from ..core.checkpoints import parse_checkpoint_id
from ..console import PREFIX as CONSOLE_PREFIX
from ..core.metrics import MetricsMiddleware
from ..mounts import central_mounts
from ..oai import OAI_PREFIX
from ..core.ports import ModelPort, SamplerPort
from . import protocol as P
from .errors import EXCEPTION_HANDLERS, validation_detail
from .export import EXTERNAL, FILES_ROUTE, TinkerExport
from .proto import parse_forward_backward, peek_header
from .convert import input_from_json
from .stability import StabilityRecords, TrainingData
from .usage import TinkerUsage
from .sampling import TinkerSampling
from .serving import TinkerService
from .settings import TinkerSettings

log = logging.getLogger("twinkle.server.tinker")

_PROTO = "application/x-protobuf"
_THREAD_PARSE_BYTES = 1 << 20  # bigger forward/backward bodies are decoded off the event loop


def _svc(request: Request) -> TinkerService:
    return request.app.state.service


def _sampling(request: Request) -> TinkerSampling:
    return request.app.state.sampling



def _decode(body: bytes, type_: type) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise UserError(f"invalid request: {validation_detail(e)}") from None
    except msgspec.DecodeError as e:
        raise UserError(f"the body is not valid JSON ({e})") from None


# ===================================================================================== handshake & sessions


@post("/client/config", status_code=200)
async def client_config(request: Request) -> dict[str, Any]:
    return _svc(request).client_config()


@post("/client/dynamic_config", status_code=200)
async def dynamic_config(request: Request) -> dict[str, Any]:
    return TinkerService.dynamic_config()


@post("/create_session", status_code=200)
async def create_session(request: Request, data: P.CreateSessionRequest) -> P.CreateSessionResponse:
    return await _svc(request).create_session(caller_id(request), data)


@post("/session_heartbeat", status_code=200)
async def session_heartbeat(request: Request, data: P.SessionHeartbeatRequest) -> dict[str, str]:
    return await _svc(request).heartbeat(caller_id(request), data.session_id)


@post("/sessions/{session_id:str}/finish", status_code=200)
async def finish_session(request: Request, session_id: str) -> dict[str, Any]:
    body = await request.body()
    req = _decode(body, P.FinishSessionRequest) if body.strip() else P.FinishSessionRequest()
    reason = req.reason.type if req.reason is not None else None
    await _svc(request).finish_session(caller_id(request), session_id, reason)
    return {}


@post("/telemetry", status_code=200)
async def telemetry(request: Request) -> dict[str, str]:
    return {"status": "accepted"}


@get("/healthz", opt={"exclude_from_auth": True})
async def healthz(request: Request) -> Response:
    """200 when this server and every model and sampler behind it answer; 503 naming what does not."""
    down = await _svc(request).plane.health()
    if down:
        return Response({"status": "unavailable", "unavailable": down}, status_code=503)
    return Response({"status": "ok"}, status_code=200)


@get("/auth/apikey/me")
async def api_key_me(request: Request) -> P.SelfApiKeyResponse:
    """What ``tinker auth login`` asks to check a pasted key: its public metadata (401 for an unknown key).
    The principal id stands for both names: this server knows keys, not people."""
    user: Principal = request.user
    return P.SelfApiKeyResponse(
        key_id=int(user.id.removeprefix("p-"), 16) & (2**53 - 1), name=user.id,
        note="admin" if user.admin else "user",
        details=P.ApiKeyDetails(org_details=P.ApiKeyOrg(name="twinkle"), user_details=P.ApiKeyUser(email=user.id)))


@get("/get_server_capabilities")
async def get_server_capabilities(request: Request) -> P.ServerCapabilitiesResponse:
    return await _svc(request).capabilities()


@get("/sessions")
async def list_sessions(request: Request, limit: int | None = None, offset: int | None = None,
                        access_scope: str | None = None) -> P.ListSessionsResponse:
    return await _svc(request).list_sessions(caller_id(request), limit, offset)


@get("/sessions/{session_id:str}")
async def get_session(request: Request, session_id: str, access_scope: str | None = None) -> P.GetSessionResponse:
    return await _svc(request).get_session(caller_id(request), session_id)


# ===================================================================================== training


@post("/create_model", status_code=200)
async def create_model(request: Request, data: P.CreateModelRequest) -> P.UntypedFuture:
    return await _svc(request).create_model(caller_id(request), data)


@post("/get_info", status_code=200)
async def get_info(request: Request, data: P.ModelIdRequest) -> P.GetInfoResponse:
    return await _svc(request).get_info(caller_id(request), data.model_id)


@post("/unload_model", status_code=200)
async def unload_model(request: Request, data: P.ModelIdRequest) -> P.UntypedFuture:
    return await _svc(request).unload_model(caller_id(request), data.model_id)


@post("/forward_backward", status_code=200, request_max_body_size=None)
async def forward_backward(request: Request) -> P.UntypedFuture:
    """Protobuf since SDK 0.25 (``forward_only`` inside); JSON before.

    The body limit is enforced here rather than by Litestar so that an oversize request can still be
    attributed to its run and ``seq_id`` (read from the first bytes) and that number released: otherwise
    every later request of the run would wait for it."""
    svc, owner = _svc(request), caller_id(request)
    is_proto = _PROTO in (request.headers.get("content-type") or "")
    body = await _read_body(request, svc, owner, peek=is_proto)
    if is_proto:
        decoded = parse_forward_backward(body)
        make_input = functools.partial(decoded.decode, svc.settings.limits)
        if len(body) > _THREAD_PARSE_BYTES:  # decode big batches off the event loop
            make_input = await asyncio.to_thread(_decode_now, make_input)
        return await svc.forward_backward(owner, decoded.model_id, decoded.seq_id, make_input,
                                          forward_only=decoded.forward_only)
    req = await _decode_training(svc, owner, body, P.ForwardBackwardJsonRequest)
    return await svc.forward_backward(owner, req.model_id, req.seq_id,
                                      lambda: TrainingData(input_from_json(req.forward_backward_input,
                                                                           svc.settings.limits), []),
                                      forward_only=False)


@post("/forward", status_code=200)
async def forward(request: Request) -> P.UntypedFuture:
    """Pre-0.25 SDKs: forward pass only, JSON."""
    svc, owner = _svc(request), caller_id(request)
    req = await _decode_training(svc, owner, await request.body(), P.ForwardJsonRequest)
    return await svc.forward_backward(owner, req.model_id, req.seq_id,
                                      lambda: TrainingData(input_from_json(req.forward_input, svc.settings.limits), []),
                                      forward_only=True)


@post("/optim_step", status_code=200)
async def optim_step(request: Request) -> P.UntypedFuture:
    svc, owner = _svc(request), caller_id(request)
    return await svc.optim_step(owner, await _decode_training(svc, owner, await request.body(), P.OptimStepRequest))


@post("/save_weights", status_code=200)
async def save_weights(request: Request) -> P.UntypedFuture:
    svc, owner = _svc(request), caller_id(request)
    return await svc.save_weights(owner, await _decode_training(svc, owner, await request.body(),
                                                                P.SaveWeightsRequest))


@post("/save_weights_for_sampler", status_code=200)
async def save_weights_for_sampler(request: Request) -> P.UntypedFuture:
    svc, owner = _svc(request), caller_id(request)
    req = await _decode_training(svc, owner, await request.body(), P.SaveWeightsForSamplerRequest)
    return await svc.save_weights_for_sampler(owner, req)


@post("/save_weights_external", status_code=200)
async def save_weights_external(request: Request) -> P.UntypedFuture:
    svc, owner = _svc(request), caller_id(request)
    req = await _decode_training(svc, owner, await request.body(), P.SaveWeightsExternalRequest)
    return await request.app.state.export.save_weights_external(owner, req)


@get("/training_runs/{run_id:str}/checkpoints/{rest:path}")
async def external_weights_urls(request: Request, run_id: str, rest: str) -> P.ExternalWeightsUrlsOut:
    checkpoint_id, action = _split_action(rest, ("external_weights_urls",))
    kind, name = parse_checkpoint_id(checkpoint_id)
    if action is None or kind != EXTERNAL:
        raise UserError("GET …/checkpoints/external_weights/<name>/external_weights_urls gives the download URLs "
                        "of exported weights (save_weights_external)", status=404)
    base = str(request.base_url).rstrip("/") + request.app.state.path_prefix
    return await request.app.state.export.urls(caller_id(request), run_id, name, base)


@get(f"/{FILES_ROUTE}/{{token:str}}/{{rel:path}}", opt={"exclude_from_auth": True}, media_type="application/octet-stream")
async def external_weights_file(request: Request, token: str, rel: str) -> File:
    """A file of exported weights; the signed URL is the credential (no API key)."""
    path = await request.app.state.export.file_path(token, rel.lstrip("/"))
    return File(path=path, filename=os.path.basename(path))


@post("/load_weights", status_code=200)
async def load_weights(request: Request) -> P.UntypedFuture:
    svc, owner = _svc(request), caller_id(request)
    return await svc.load_weights(owner, await _decode_training(svc, owner, await request.body(),
                                                                P.LoadWeightsRequest))


OVERSIZE = "twinkle.body_over_limit"  # scope mark: a zstd body decompressed past max_body_bytes
_PEEK_BYTES = 4096


async def _read_body(request: Request, svc: TinkerService, owner: str, *, peek: bool) -> bytes:
    limit: int = request.app.state.max_body_bytes
    announced = request.content_length
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if (len(buf) > limit or request.scope.get(OVERSIZE)
                or (announced is not None and announced > limit and len(buf) >= _PEEK_BYTES)):
            header = peek_header(bytes(buf[:_PEEK_BYTES])) if peek else None
            if header is not None:
                await svc.plane.refuse_seq(owner, *header)
            raise RequestEntityTooLarge()
    if announced is not None and announced > limit:  # a short body that claimed to be huge
        raise RequestEntityTooLarge()
    return bytes(buf)


def _decode_now(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` now (in a worker thread); return a callable that gives its value or re-raises its
    ``UserError`` later, where the error can be attributed to the request's ``seq_id``."""
    try:
        value = fn()
    except UserError as e:
        error = e

        def fail() -> Any:
            raise error

        return fail
    return lambda: value


async def _decode_training(svc: TinkerService, owner: str, body: bytes, type_: type) -> Any:
    """Decode a numbered training request. If the body is malformed but names its run and ``seq_id``, that
    number is released at the Model service before the 400 goes out, so the run does not stall."""
    try:
        return _decode(body, type_)
    except UserError:
        try:
            header = msgspec.json.decode(body, type=P.TrainingHeader)
        except (msgspec.ValidationError, msgspec.DecodeError):
            header = None
        if header is not None:
            await svc.plane.refuse_seq(owner, header.model_id, header.seq_id)
        raise


# ===================================================================================== sampling


@post("/create_sampling_session", status_code=200)
async def create_sampling_session(request: Request, data: P.CreateSamplingSessionRequest
                                  ) -> P.CreateSamplingSessionResponse:
    return await _sampling(request).create_sampling_session(caller_id(request), data)


@get("/samplers/{sampler_id:str}")
async def get_sampler(request: Request, sampler_id: str) -> P.GetSamplerResponse:
    return await _sampling(request).get_sampler(caller_id(request), sampler_id)


@post("/asample", status_code=200)
async def asample(request: Request, data: P.SampleRequestIn) -> P.UntypedFuture:
    return await _sampling(request).sample(caller_id(request), data)


# ===================================================================================== futures


@post("/retrieve_futures", status_code=200)
async def retrieve_futures(request: Request, data: P.FuturesRetrieveRequest) -> P.FuturesRetrieveResponse:
    return await _sampling(request).retrieve_futures(caller_id(request), data)


@post("/join_sampling_session", status_code=200)
async def join_sampling_session(request: Request, data: P.JoinSamplingSessionRequest) -> P.JoinSamplingSessionResponse:
    return await _sampling(request).join(caller_id(request), data.sampling_session_id)


@post("/cancel_future", status_code=200)
async def cancel_future(request: Request, data: P.CancelFutureRequest) -> None:
    await _sampling(request).cancel(caller_id(request), data.request_id)


@post("/retrieve_future", status_code=200)
async def retrieve_future(request: Request, data: P.FutureRetrieveRequest) -> Response:
    proto_ok = _PROTO in (request.headers.get("accept") or "")
    body, media_type = await _svc(request).retrieve(caller_id(request), data.request_id, proto_ok=proto_ok)
    return Response(content=body, media_type=media_type, status_code=200)


# ===================================================================================== REST


@get("/training_runs")
async def list_training_runs(request: Request, limit: int | None = None, offset: int | None = None,
                             access_scope: str | None = None) -> P.TrainingRunsResponse:
    return await _svc(request).list_training_runs(caller_id(request), limit, offset)


@get("/training_runs/{run_id:str}")
async def get_training_run(request: Request, run_id: str, access_scope: str | None = None) -> P.TrainingRunOut:
    return await _svc(request).get_training_run(caller_id(request), run_id)


@get("/training_runs/{run_id:str}/history")
async def training_run_history(request: Request, run_id: str, after_step: int = 0, limit: int | None = None
                               ) -> dict[str, Any]:
    """An extension (no SDK method): one row per optimizer step — loss, tokens, learning rate, gradient norm."""
    return {"steps": await _svc(request).plane.run_history(caller_id(request), run_id, after_step, limit)}


@get("/training_runs/{run_id:str}/checkpoints")
async def list_checkpoints(request: Request, run_id: str) -> P.CheckpointsListResponse:
    return await _svc(request).list_checkpoints(caller_id(request), run_id)


def _split_action(rest: str, actions: tuple[str, ...]) -> tuple[str, str | None]:
    """``/weights/ckpt-1`` → ("weights/ckpt-1", None); ``/weights/ckpt-1/publish`` → (…, "publish")."""
    parts = rest.strip("/").split("/")
    if len(parts) == 3 and parts[2] in actions:
        return "/".join(parts[:2]), parts[2]
    return "/".join(parts), None


@delete("/training_runs/{run_id:str}/checkpoints/{rest:path}", status_code=204)
async def delete_checkpoint(request: Request, run_id: str, rest: str) -> None:
    checkpoint_id, action = _split_action(rest, ("publish",))
    if action == "publish":
        await _svc(request).set_published(caller_id(request), run_id, checkpoint_id, False)
    else:
        await _svc(request).delete_checkpoint(caller_id(request), run_id, checkpoint_id)


@post("/training_runs/{run_id:str}/checkpoints/{rest:path}", status_code=204)
async def checkpoint_action(request: Request, run_id: str, rest: str) -> None:
    checkpoint_id, action = _split_action(rest, ("publish",))
    if action != "publish":
        raise UserError(f"unknown checkpoint action; POST …/checkpoints/{checkpoint_id}/publish publishes it",
                        status=404)
    await _svc(request).set_published(caller_id(request), run_id, checkpoint_id, True)


@put("/training_runs/{run_id:str}/checkpoints/{rest:path}", status_code=204)
async def checkpoint_ttl(request: Request, run_id: str, rest: str) -> None:
    checkpoint_id, action = _split_action(rest, ("ttl",))
    if action != "ttl":
        raise UserError(f"unknown checkpoint action; PUT …/checkpoints/{checkpoint_id}/ttl sets its expiry",
                        status=404)
    body = await request.body()
    req = _decode(body, P.TtlRequest) if body.strip() else P.TtlRequest()
    await _svc(request).set_ttl(caller_id(request), run_id, checkpoint_id, req.ttl_seconds)


@get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: int | None = None, offset: int | None = None
                                ) -> P.CheckpointsListResponse:
    return await _svc(request).list_user_checkpoints(caller_id(request), limit, offset)


@get("/billing/usage/events")
async def billing_usage_events(request: Request, starting_on: str, ending_before: str) -> dict[str, Any]:
    return await request.app.state.usage.events(request.user, starting_on, ending_before)


@get("/audit")
async def audit_log(request: Request, event_type: str = "all", day: str | None = None) -> dict[str, Any]:
    return await request.app.state.usage.audit(request.user, event_type, day)


@get("/billing/usage/checkpoints/current")
async def billing_checkpoint_storage(request: Request, project_id: str | None = None) -> dict[str, Any]:
    return await request.app.state.usage.storage(request.user)


@post("/weights_info", status_code=200)
async def weights_info(request: Request, data: P.WeightsInfoRequest) -> P.WeightsInfoResponse:
    return await _svc(request).weights_info(caller_id(request), data.tinker_path)


# SDK routes this server does not serve, and what the client would be asking for.
_UNSUPPORTED = {
    "create_custom_loss": "server-side custom losses (create_custom_loss)",
    "copy_weights": "copying weights between projects (copy_weights)",
    "auth": "JWT and key management (auth/...)",
}


@route("/{rest:path}", http_method=["GET", "POST", "PUT", "DELETE", "PATCH"], status_code=404)
async def unsupported(request: Request, rest: str) -> Response:
    """Any other path: 404 naming the feature. A numbered request (``model_id`` + ``seq_id``) still has its
    ``seq_id`` released, so the run's later requests do not wait for it."""
    body = await request.body() if request.method in ("POST", "PUT") else b""
    if body:
        try:
            header = msgspec.json.decode(body, type=P.TrainingHeader)
        except (msgspec.ValidationError, msgspec.DecodeError):
            header = None
        if header is not None:
            await _svc(request).plane.refuse_seq(caller_id(request), header.model_id, header.seq_id)
    first = rest.strip("/").split("/", 1)[0]
    feature = _UNSUPPORTED.get(first)
    what = f"{feature} is not supported by this server" if feature else f"no such endpoint: {request.method} /{rest.strip('/')}"
    return Response({"detail": what}, status_code=404)


ROUTES = [
    client_config, dynamic_config, create_session, session_heartbeat, finish_session, telemetry, healthz,
    get_server_capabilities, api_key_me, list_sessions, get_session, create_model, get_info, unload_model, forward_backward,
    forward, optim_step, save_weights, save_weights_for_sampler, save_weights_external, external_weights_urls,
    external_weights_file, load_weights, create_sampling_session,
    get_sampler, asample, join_sampling_session, retrieve_futures, cancel_future, retrieve_future, list_training_runs,
    get_training_run, training_run_history, list_checkpoints,
    delete_checkpoint, checkpoint_action, checkpoint_ttl, list_user_checkpoints, weights_info, billing_usage_events,
    billing_checkpoint_storage, audit_log, unsupported,
]


# ===================================================================================== request bodies


class ZstdRequestMiddleware(ASGIMiddleware):
    """Accept ``Content-Encoding: zstd`` request bodies (the SDK compresses forward/backward when the server
    config asks for it, and any client may). Decompression is bounded by ``max_body_bytes`` so a small
    compressed bomb cannot exhaust memory; the app's own body limit then applies to the plain body."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        encoding = next((v for k, v in scope.get("headers", ()) if k == b"content-encoding"), None)
        if encoding is None or encoding.strip().lower() != b"zstd":
            await next_app(scope, receive, send)
            return
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        state: dict[str, Any] = {"done": False}
        limit = self.max_body_bytes
        # A numbered request too large must still release its seq_id: its handler gets the body's first bytes
        # (where the run and seq_id are) and the mark, and answers 413 itself.
        numbered = scope.get("path", "").endswith("/forward_backward")

        async def receive_plain() -> Message:
            if state["done"]:
                return await receive()
            compressed = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return message
                compressed += message.get("body", b"")
                if len(compressed) > limit or not message.get("more_body", False):
                    break
            state["done"] = True
            plain, whole = await asyncio.to_thread(_unzstd, bytes(compressed), limit)
            if not whole or len(compressed) > limit:
                if not numbered:
                    raise RequestEntityTooLarge()
                scope[OVERSIZE] = True
            return {"type": "http.request", "body": plain, "more_body": False}

        await next_app(scope, receive_plain, send)


def _unzstd(data: bytes, limit: int) -> tuple[bytes, bool]:
    """``(plain body, True)``, or ``(its first bytes, False)`` when it is over ``limit`` (read no further, so a
    small compressed bomb cannot exhaust memory) or ``data`` is only the start of the body."""
    import zstandard

    cut = len(data) > limit  # the compressed body alone is over the limit: only its start was read
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(_PEEK_BYTES if cut else limit + 1)
    except zstandard.ZstdError as e:
        if cut:
            return b"", False
        raise UserError(f"the body is not valid zstd ({e})") from None
    if cut:
        return out, False
    if len(out) > limit:
        return out[:_PEEK_BYTES], False
    return out, True


# ===================================================================================== the app


def create_tinker_app(settings: TinkerSettings, models: dict[str, ModelPort], samplers: dict[str, SamplerPort],
                      *, path_prefix: str = "", oai_prefix: str | None = OAI_PREFIX, debug: bool = False) -> Litestar:
    """A fresh Tinker-compatible app over the given Model and Sampler ports (keyed by served model name), with
    the OpenAI-compatible surface at ``oai_prefix`` (None: without it).

    Its lifespan runs the control plane (``ControlPlane.lifespan``).
    """
    plane = ControlPlane(settings, models=models, samplers=samplers)
    stability = StabilityRecords(plane, keep_per_key=settings.max_recorded_sequences_per_key,
                                 ttl_s=settings.recorded_sequence_ttl_s,
                                 keep_tokens_per_key=settings.max_recorded_tokens_per_key)
    service = TinkerService(settings, plane, stability)
    sampling = TinkerSampling(settings, plane, stability)
    export = TinkerExport(settings, plane, service)

    handlers, metrics, shared = central_mounts("tinker", plane, ROUTES, path_prefix=path_prefix,
                                               oai_prefix=oai_prefix, scheme="tinker://")
    return Litestar(
        route_handlers=handlers,
        middleware=[MetricsMiddleware(metrics), ZstdRequestMiddleware(settings.max_body_bytes),
                    DefineMiddleware(ApiKeyMiddleware, public=(CONSOLE_PREFIX,))],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[plane.lifespan],
        state=State({**shared, "max_body_bytes": settings.max_body_bytes, "service": service,
                     "sampling": sampling, "export": export, "path_prefix": path_prefix,
                     "usage": TinkerUsage(plane)}),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=debug,
    )

