"""Litestar handlers of the native TwinkleServer and its app factory.

Routes (relative to the server app's ``route_prefix``, ``/server`` in ``deploy/local.yaml``); every route but
``/healthz`` and ``/info`` needs an ``X-API-Key``:

=========  =================================================  ===============================================
GET        /healthz, /info                                    liveness; the applications this server fronts
GET        /capabilities                                      models, their app prefixes and limits
POST       /sessions                                          a client session (heartbeats keep it alive)
POST       /sessions/{id}/heartbeat, /sessions/{id}/finish
GET/POST   /training_runs                                     list (paged) / create (a future)
GET/DELETE /training_runs/{run_id}                            get (with live step) / delete
GET        /training_runs/{run_id}/checkpoints[/latest]       list / newest (``?kind=state|sampler``)
DELETE     /training_runs/{run_id}/checkpoints/{kind}/{name}
GET        …/checkpoints/{kind}/{name}/archive                the checkpoint's files as a tar
GET        /training_runs/{run_id}/history                    a step per optimizer step (``?after_step&limit``)
GET        /usage?starting_on&ending_before                   tokens and saves per UTC hour (admin: every key)
GET        /audit?day&event_type                              who did what to the caller's checkpoints
GET        /checkpoints                                       every checkpoint of the caller (paged)
POST       /resume                                            a new run from a checkpoint, or load into a run
GET        /futures/{request_id}?timeout=s                    long-poll a long operation
=========  =================================================  ===============================================

``create_twinkle_app`` returns a *fresh* app each call (Ray Serve builds it inside the replica).
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.response import File
from twinkle.common.http import EXCEPTION_HANDLERS, distribution_version
from twinkle.common.native import FutureRef, decode

from ..auth import ApiKeyMiddleware, caller_id
from ..console import PREFIX as CONSOLE_PREFIX
from ..core.metrics import MetricsMiddleware
from ..mounts import central_mounts
from ..oai import OAI_PREFIX
from . import protocol as P
from .serving import NativeService


def _svc(request: Request) -> NativeService:
    return request.app.state.service



async def _body(request: Request, type_: type) -> Any:
    return decode(await request.body(), type_)


@get("/healthz", opt={"exclude_from_auth": True})
async def healthz(request: Request) -> Response:
    body, status = await _svc(request).health()
    return Response(body, status_code=status)


@get("/info", opt={"exclude_from_auth": True})
async def info(request: Request) -> dict[str, Any]:
    return await _svc(request).info()


@get("/capabilities")
async def capabilities(request: Request) -> P.Capabilities:
    return await _svc(request).capabilities(caller_id(request))


@post("/sessions", status_code=201)
async def create_session(request: Request) -> P.SessionOut:
    body = await request.body()
    req = decode(body, P.CreateSessionIn) if body.strip() else P.CreateSessionIn()
    return await _svc(request).create_session(caller_id(request), req)


@post("/sessions/{session_id:str}/heartbeat", status_code=200)
async def heartbeat(request: Request, session_id: str) -> dict[str, str]:
    return await _svc(request).heartbeat(caller_id(request), session_id)


@post("/sessions/{session_id:str}/finish", status_code=200)
async def finish_session(request: Request, session_id: str) -> dict[str, str]:
    await _svc(request).finish_session(caller_id(request), session_id)
    return {"status": "finished"}


@get("/training_runs")
async def list_runs(request: Request, limit: int | None = None, offset: int | None = None) -> P.TrainingRunsOut:
    return await _svc(request).list_runs(caller_id(request), limit, offset)


@post("/training_runs", status_code=202)
async def create_run(request: Request) -> FutureRef:
    return await _svc(request).create_run(caller_id(request), await _body(request, P.CreateRunIn))


@get("/training_runs/{run_id:str}")
async def get_run(request: Request, run_id: str) -> P.TrainingRunOut:
    return await _svc(request).get_run(caller_id(request), run_id)


@delete("/training_runs/{run_id:str}", status_code=204)
async def delete_run(request: Request, run_id: str, checkpoints: bool = False) -> None:
    await _svc(request).delete_run(caller_id(request), run_id, checkpoints=checkpoints)


@get("/training_runs/{run_id:str}/checkpoints")
async def list_checkpoints(request: Request, run_id: str) -> P.CheckpointsOut:
    return await _svc(request).list_checkpoints(caller_id(request), run_id)


@get("/training_runs/{run_id:str}/checkpoints/latest")
async def latest_checkpoint(request: Request, run_id: str, kind: str | None = None) -> P.CheckpointOut:
    return await _svc(request).latest_checkpoint(caller_id(request), run_id, kind)


@delete("/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}", status_code=204)
async def delete_checkpoint(request: Request, run_id: str, kind: str, name: str) -> None:
    await _svc(request).delete_checkpoint(caller_id(request), run_id, kind, name)


@get("/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}/archive", media_type="application/x-tar")
async def checkpoint_archive(request: Request, run_id: str, kind: str, name: str) -> File:
    """The checkpoint's files as one tar (``Content-Length`` set, so a client can show progress)."""
    path, filename, remove = await _svc(request).checkpoint_archive(caller_id(request), run_id, kind, name)
    return File(path=path, filename=filename, media_type="application/x-tar", background=BackgroundTask(remove),
                headers={"Cache-Control": "no-store"})


@get("/training_runs/{run_id:str}/history")
async def run_history(request: Request, run_id: str, after_step: int = 0, limit: int | None = None
                      ) -> P.RunHistoryOut:
    return await _svc(request).run_history(caller_id(request), run_id, after_step, limit)


@get("/usage")
async def usage(request: Request, starting_on: str, ending_before: str) -> P.UsageOut:
    return await _svc(request).usage(request.user, starting_on, ending_before)


@get("/audit")
async def audit(request: Request, event_type: str = "all", day: str | None = None) -> P.AuditOut:
    return await _svc(request).audit(request.user, event_type, day)


@get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: int | None = None, offset: int | None = None
                                ) -> P.CheckpointsOut:
    return await _svc(request).list_user_checkpoints(caller_id(request), limit, offset)


@post("/resume", status_code=202)
async def resume(request: Request) -> FutureRef:
    return await _svc(request).resume(caller_id(request), await _body(request, P.ResumeIn))


@get("/futures/{request_id:str}")
async def wait_future(request: Request, request_id: str, timeout: float | None = None) -> P.FutureOut:
    return await _svc(request).wait_future(caller_id(request), request_id, timeout)


ROUTES = [
    healthz, info, capabilities, create_session, heartbeat, finish_session, list_runs, create_run, get_run,
    delete_run, list_checkpoints, latest_checkpoint, delete_checkpoint, checkpoint_archive, run_history, usage, audit,
    list_user_checkpoints, resume, wait_future,
]


def create_twinkle_app(service: NativeService, *, path_prefix: str = "", oai_prefix: str | None = OAI_PREFIX,
                       debug: bool = False) -> Litestar:
    """A fresh TwinkleServer app over ``service``, with the OpenAI-compatible surface at ``oai_prefix`` (None:
    without it); its lifespan runs the control plane."""

    handlers, metrics, shared = central_mounts("twinkle", service.plane, ROUTES, path_prefix=path_prefix,
                                               oai_prefix=oai_prefix, scheme="twinkle://")
    docs = f"{path_prefix}/docs"
    return Litestar(
        route_handlers=handlers,
        middleware=[MetricsMiddleware(metrics), DefineMiddleware(ApiKeyMiddleware, public=(docs, CONSOLE_PREFIX))],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[service.plane.lifespan],
        state=State({**shared, "service": service}),
        request_max_body_size=service.settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Twinkle server", version=distribution_version("twinkle-gateway"),
                                     path=docs),
        debug=debug,
    )
