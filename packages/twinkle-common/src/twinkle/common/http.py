"""What every component's Litestar app shares: error mapping, the health/info routes, OpenAPI and the served
model name (``served_model_name``).

Errors: a ``UserError`` becomes its 4xx with ``{"detail": message, "field": ...}``; a validation error of a
request body becomes 400 naming the field; anything else becomes a 500 with a correlation id, and the
traceback goes to the server log only — never to the client.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Awaitable, Callable, TypeVar

from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE

from .wire import ServiceHealth, ServiceInfo, ServiceUnavailable, UserError

log = logging.getLogger("twinkle")

T = TypeVar("T")


def _user_error(_: Request, exc: UserError) -> Response:
    body: dict[str, Any] = {"detail": str(exc)}
    if exc.field:
        body["field"] = exc.field
    retry_after = getattr(exc, "retry_after_s", None)  # a 429: when to try again
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return Response(body, status_code=exc.status, headers=headers)


def _validation_error(_: Request, exc: ValidationException) -> Response:
    body: dict[str, Any] = {"detail": exc.detail or "invalid request"}
    if exc.extra:
        body["errors"] = exc.extra
    return Response(body, status_code=400)


def _http_error(_: Request, exc: HTTPException) -> Response:
    body: dict[str, Any] = {"detail": exc.detail or "error"}
    return Response(body, status_code=exc.status_code, headers=exc.headers)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the traceback if any, and every ``extra`` field
    (``correlation_id``, ``request_id``): the launcher's side of ``log_format: json``."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        import json

        out: dict[str, Any] = {"asctime": self.formatTime(record), "levelname": record.levelname,
                               "name": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        out.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        return json.dumps(out, default=str)


def log_internal_error(logger: logging.Logger, what: str, exc: BaseException, **context: Any) -> str:
    """Log an unexpected error with its traceback under a new correlation id, and return the id: the client sees
    only the id, the operator finds the traceback by it (a ``correlation_id`` field in JSON logs, with
    ``context`` such as the ``request_id``)."""
    cid = secrets.token_hex(6)
    logger.error("%s, correlation id %s", what, cid, exc_info=exc, extra={"correlation_id": cid, **context})
    return cid


def _internal_error(request: Request, exc: Exception) -> Response:
    cid = log_internal_error(log, f"internal error on {request.method} {request.url.path}", exc)
    return Response({"detail": f"internal server error (correlation id {cid})"},
                    status_code=HTTP_500_INTERNAL_SERVER_ERROR)


def _unavailable(request: Request, exc: Exception) -> Response:
    """A serving process was lost or a run is moving between replicas: worth retrying in a moment."""
    return Response({"detail": f"{exc}; retry in a moment"}, status_code=HTTP_503_SERVICE_UNAVAILABLE,
                    headers={"Retry-After": "1"})


EXCEPTION_HANDLERS = {
    UserError: _user_error,
    ServiceUnavailable: _unavailable,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


def health_routes(health: Callable[[], Awaitable[ServiceHealth]], info: Callable[[], Awaitable[ServiceInfo]]) -> list:
    """``GET /healthz`` (cheap liveness plus the component's own check) and ``GET /info``: the public views of
    the component's ``ServiceHealth`` and ``ServiceInfo`` (no processes, hosts, queues or tenants' counts;
    the central app's admin routes show those)."""

    @get("/healthz")
    async def healthz() -> ServiceHealth:
        return (await health()).public()

    @get("/info")
    async def info_route() -> ServiceInfo:
        return (await info()).public()

    return [healthz, info_route]


def served_model_name(component: Any, model_name: str | None = None) -> Callable[[], Awaitable[str]]:
    """``async () -> name``: ``model_name`` if given, else the component's ``info().model_name`` (asked once)."""
    names: dict[str, str] = {}

    async def served_name() -> str:
        if model_name:
            return model_name
        if "name" not in names:
            names["name"] = (await component.info()).model_name
        return names["name"]

    return served_name


def distribution_version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare source checkout
        return "0.0.0"


def component_app(title: str, distribution: str, component: Any, routes: list = ()) -> Litestar:
    """A component's app: its health/info routes (``component.health()``/``info()``) plus its own routes."""
    handlers = health_routes(component.health, component.info) + list(routes)
    return create_app(title, distribution_version(distribution), handlers)


def create_app(title: str, version: str, route_handlers: list, **kwargs: Any) -> Litestar:
    return Litestar(
        route_handlers=route_handlers,
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title=title, version=version, path="/docs"),
        **kwargs,
    )


async def release_seq_id(model: Any, run_id: str, owner: str, seq_id: int, reason: str) -> None:
    """Tell the Model service (a ``ModelService``, a port or a handle wrapper with ``skip``) that request
    ``seq_id`` of a run was refused before it reached the service, so the run moves on to ``seq_id + 1`` at
    once; a repeat of the refused request is answered with ``reason``. Best effort: the run's gap timeout
    is the fallback."""
    try:
        await model.skip(run_id, owner, seq_id, reason)
    except UserError:
        pass
    except Exception:  # noqa: BLE001
        log.warning("could not release seq_id %s of run %s", seq_id, run_id, exc_info=True)
