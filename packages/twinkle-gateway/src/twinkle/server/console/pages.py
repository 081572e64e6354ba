"""The console's routes: server-rendered pages over the control plane, the same under both protocols.

==========================================  ==================================================================
GET/POST  /console/login                    sign in with an API key (a session cookie, ``session.py``)
POST      /console/logout
GET       /console                          the caller's runs
GET       /console/runs/{run}               a run: its loss curve (live), steps, checkpoints
GET       /console/runs/{run}/history.json  the run's steps after ``after`` (what the curve polls)
GET       /console/runs/{run}/checkpoints/{kind}/{name}/download   the checkpoint's files as a tar
POST      /console/runs/{run}/checkpoints/{kind}/{name}/publish    publish or unpublish (``public`` 1/0)
GET       /console/sessions                 the caller's sessions and sampling sessions
GET       /console/usage                    the caller's usage per day (an admin's: every key's)
GET       /console/services                 requests in flight; for an admin also every service's queues,
                                            adapters and workers
GET       /console/static/{name}            the console's CSS and script, packaged with the gateway
==========================================  ==================================================================

A tenant sees only its own runs, checkpoints, sessions and usage: another key's run is "not found", as on
the APIs. Everything shown is escaped by the templates (run ids, names and metadata come from users).
"""

from __future__ import annotations

import datetime as dt
import time
from importlib import resources
from typing import Any

import jinja2
from litestar import Request, Response, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.exceptions import NotFoundException, PermissionDeniedException
from litestar.response import File, Redirect
from twinkle.common.wire import NotFoundError, UserError

from ..auth import Principal
from ..core.admin import describe_services
from ..core.checkpoints import CheckpointRef
from ..core.usage import HOUR_S
from .session import COOKIE, SESSION_S, ConsoleSessions

PREFIX = "/console"
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_HISTORY_PAGE = 1000  # steps per history request; the curve pages through longer runs
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_templates = jinja2.Environment(loader=jinja2.PackageLoader("twinkle.server.console", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined)


def _when(seconds: float | None) -> str:
    if not seconds:
        return "—"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_templates.filters.update(when=_when, size=_size)


def _sessions(request: Request) -> ConsoleSessions:
    return request.app.state.console


def _plane(request: Request) -> Any:
    return request.app.state.plane


def _scheme(request: Request) -> str:
    return request.app.state.console_scheme


async def _viewer(request: Request) -> Principal | None:
    return await _sessions(request).check(request.cookies.get(COOKIE))


async def _page(request: Request, template: str, viewer: Principal, **context: Any) -> Response:
    csrf = await _sessions(request).csrf(request.cookies[COOKIE])
    html = _templates.get_template(template).render(viewer=viewer, csrf=csrf, prefix=PREFIX, **context)
    return Response(html, media_type=MediaType.HTML, headers=_SECURITY_HEADERS)


def _to_login() -> Redirect:
    return Redirect(path=f"{PREFIX}/login", status_code=303)


async def _signed_in(request: Request) -> Principal:
    viewer = await _viewer(request)
    if viewer is None:
        raise PermissionDeniedException(detail="sign in at /console/login")
    return viewer


async def _form_checked(request: Request) -> dict[str, str]:
    """The posted form, once its CSRF token matches the session."""
    form = dict(await request.form())
    if not await _sessions(request).check_csrf(request.cookies.get(COOKIE, ""), form.get("csrf")):
        raise PermissionDeniedException(detail="the form is stale or did not come from this console; reload it")
    return form


# ----------------------------------------------------------------------------------------- sign in/out


@get("/login")
async def login_form(request: Request) -> Response:
    html = _templates.get_template("login.html").render(prefix=PREFIX, error=None)
    return Response(html, media_type=MediaType.HTML, headers=_SECURITY_HEADERS)


@post("/login", status_code=303)
async def login(request: Request) -> Response:
    form = await request.form()
    key = str(form.get("api_key") or "").strip()
    keyring = request.app.state.keyring
    try:
        if keyring is None:
            raise UserError("the server is still starting; retry in a moment")
        principal = keyring.authenticate(key)
    except Exception:  # noqa: BLE001 - any refusal is the same answer, naming no reason a guesser could use
        html = _templates.get_template("login.html").render(prefix=PREFIX, error="That key was not accepted.")
        return Response(html, media_type=MediaType.HTML, status_code=401, headers=_SECURITY_HEADERS)
    cookie = await _sessions(request).issue(principal)
    secure = request.url.scheme == "https"
    return Redirect(path=PREFIX, status_code=303, cookies=[
        Cookie(key=COOKIE, value=cookie, path=PREFIX, httponly=True, samesite="strict", secure=secure,
               max_age=SESSION_S)])


@post("/logout", status_code=303)
async def logout(request: Request) -> Response:
    await _form_checked(request)
    return Redirect(path=f"{PREFIX}/login", status_code=303,
                    cookies=[Cookie(key=COOKIE, value="", path=PREFIX, max_age=0, httponly=True, samesite="strict")])


# ----------------------------------------------------------------------------------------- pages


@get("/")
async def runs_page(request: Request, offset: int = 0) -> Response:
    viewer = await _viewer(request)
    if viewer is None:
        return _to_login()
    plane = _plane(request)
    limit, offset = plane.page(50, offset)
    page, _latest = await plane.list_runs(viewer.id, limit, offset)
    last = await plane.store.last_steps([r.id for r in page.items])
    rows = [{"run": run, "step": last.get(run.id, (0, None))[0], "loss": last.get(run.id, (0, None))[1]}
            for run in page.items]
    return await _page(request, "runs.html", viewer, rows=rows, total=page.total, offset=offset, limit=limit)


@get("/runs/{run_id:str}")
async def run_page(request: Request, run_id: str) -> Response:
    viewer = await _viewer(request)
    if viewer is None:
        return _to_login()
    plane = _plane(request)
    run = await _own_run(plane, viewer, run_id)
    steps = await plane.run_history(viewer.id, run.id, -1, _HISTORY_PAGE)
    checkpoints = await plane.run_checkpoints(run.id)
    scheme = _scheme(request)
    return await _page(request, "run.html", viewer, run=run, steps=steps, curve=_curve(steps),
                       checkpoints=[{"c": c, "uri": CheckpointRef(c.run_id, c.kind, c.name, scheme).uri}
                                    for c in checkpoints])


@get("/runs/{run_id:str}/history.json")
async def run_history(request: Request, run_id: str, after: int = -1) -> Response:
    viewer = await _signed_in(request)
    plane = _plane(request)
    run = await _own_run(plane, viewer, run_id)
    steps = await plane.run_history(viewer.id, run.id, after, _HISTORY_PAGE)
    return Response({"steps": steps}, headers=_SECURITY_HEADERS)


@get("/runs/{run_id:str}/checkpoints/{kind:str}/{name:str}/download")
async def download(request: Request, run_id: str, kind: str, name: str) -> Response:
    viewer = await _signed_in(request)
    plane = _plane(request)
    c = await _own_checkpoint(request, plane, viewer, run_id, kind, name)
    archive, filename, remove = await plane.checkpoint_archive(c, viewer.id, purpose="console download")
    return File(path=archive, filename=filename, media_type="application/x-tar", background=BackgroundTask(remove),
                headers={"Cache-Control": "no-store"})


@post("/runs/{run_id:str}/checkpoints/{kind:str}/{name:str}/publish", status_code=303)
async def publish(request: Request, run_id: str, kind: str, name: str) -> Response:
    viewer = await _signed_in(request)
    form = await _form_checked(request)
    plane = _plane(request)
    c = await _own_checkpoint(request, plane, viewer, run_id, kind, name)
    await plane.update_checkpoint(c, public=form.get("public") == "1")
    return Redirect(path=f"{PREFIX}/runs/{c.run_id}", status_code=303)


async def _own_checkpoint(request: Request, plane: Any, viewer: Principal, run_id: str, kind: str, name: str) -> Any:
    """The viewer's checkpoint, or 404 (also for a malformed kind or name: the console names no fields)."""
    run = await _own_run(plane, viewer, run_id)
    try:
        return await plane.own_checkpoint(viewer.id, run.id, kind, name, field="checkpoint",
                                          uri=CheckpointRef(run.id, kind, name, _scheme(request)).uri)
    except (NotFoundError, UserError):
        raise NotFoundException(detail="no such checkpoint") from None


@get("/sessions")
async def sessions_page(request: Request) -> Response:
    viewer = await _viewer(request)
    if viewer is None:
        return _to_login()
    plane = _plane(request)
    sessions = (await plane.list_sessions(viewer.id, 100, 0)).items
    samplers = await plane.store.list_samplers(viewer.id, 100)
    return await _page(request, "sessions.html", viewer, sessions=sessions, samplers=samplers)


@get("/usage")
async def usage_page(request: Request, days: int = 7) -> Response:
    viewer = await _viewer(request)
    if viewer is None:
        return _to_login()
    days = min(max(days, 1), 400)
    end = (int(time.time()) // HOUR_S + 1) * HOUR_S  # buckets are keyed by their hour's first second
    rows = await _plane(request).store.usage_buckets(None if viewer.admin else viewer.id, end - days * 24 * HOUR_S,
                                                     end)
    daily: dict[tuple[str, str, str, str], int] = {}
    for owner, hour, _session, base_model, kind, quantity in rows:
        day = dt.datetime.fromtimestamp(hour, dt.timezone.utc).strftime("%Y-%m-%d")
        key = (day, owner, base_model or "—", kind)
        daily[key] = daily.get(key, 0) + quantity
    table = [{"day": d, "owner": o, "base_model": m, "kind": k, "quantity": q}
             for (d, o, m, k), q in sorted(daily.items(), reverse=True)]
    return await _page(request, "usage.html", viewer, rows=table, days=days)


@get("/services")
async def services_page(request: Request) -> Response:
    viewer = await _viewer(request)
    if viewer is None:
        return _to_login()
    plane = _plane(request)
    mine = (await plane.store.usage([viewer.id]))[viewer.id]
    services = await describe_services(plane) if viewer.admin else []
    everyone = await plane.usage() if viewer.admin else {}
    return await _page(request, "services.html", viewer, mine=mine, services=services, everyone=everyone,
                       models=plane.served_names())


@get("/static/{name:str}")
async def static(name: str) -> Response:
    if name not in _STATIC:
        raise NotFoundException(detail="no such file")
    body = resources.files("twinkle.server.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC[name], headers={"Cache-Control": "max-age=300",
                                                            "X-Content-Type-Options": "nosniff"})


# ----------------------------------------------------------------------------------------- helpers


async def _own_run(plane: Any, viewer: Principal, run_id: str) -> Any:
    try:
        return await plane.run(viewer.id, run_id, field="run")
    except (NotFoundError, UserError):
        raise NotFoundException(detail="no such training run") from None


def _curve(steps: list[dict[str, Any]], width: int = 640, height: int = 220) -> dict[str, Any]:
    """The loss curve's SVG polyline points (server-rendered; the script redraws it as steps arrive)."""
    points = [(s["step"], s["loss"]) for s in steps if s.get("loss") is not None]
    if not points:
        return {"points": "", "width": width, "height": height, "low": None, "high": None}
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 20) / max(x1 - x0, 1)
    sy = (height - 20) / (y1 - y0 if y1 > y0 else 1.0)
    coords = " ".join(f"{10 + (x - x0) * sx:.1f},{height - 10 - (y - y0) * sy:.1f}" for x, y in points)
    return {"points": coords, "width": width, "height": height, "low": y0, "high": y1}


def console_router() -> Router:
    """The console's routes, to mount beside a protocol (the app's ``state`` must hold ``plane``, ``keyring``,
    ``console`` (``ConsoleSessions``) and ``console_scheme``)."""
    return Router(path=PREFIX, include_in_schema=False, route_handlers=[
        login_form, login, logout, runs_page, run_page, run_history, download, publish, sessions_page, usage_page,
        services_page, static])
