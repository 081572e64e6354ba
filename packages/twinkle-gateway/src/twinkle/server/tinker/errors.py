"""Error responses of the Tinker app: always JSON ``{"detail": "<what was wrong and where>"}``.

Why it matters to the SDK (``tinker-protocol.md`` §2.3, §2.5):

- a 400 with an *empty* body is taken for a Cloudflare rejection and retried as a connection error, so no
  error response here is ever empty;
- 409, 429 and 5xx are retried for minutes, so permanent mistakes are 400/404/422, never 409;
- a traceback never reaches the client; an unexpected error gets a correlation id that is in the server log
  next to the traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE, HTTP_500_INTERNAL_SERVER_ERROR

from twinkle.common.http import log_internal_error
from twinkle.common.wire import UserError

log = logging.getLogger("twinkle.server.tinker")


def _json(detail: str, status: int, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    return Response({"detail": detail, **extra}, status_code=status, headers=headers)


def _user_error(_: Request, exc: UserError) -> Response:
    retry_after = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return _json(str(exc), exc.status, headers=headers)


def validation_detail(exc: msgspec.ValidationError | ValidationException) -> str:
    """'seq_id: Expected `int`, got `str`' from either msgspec's or Litestar's validation error."""
    if isinstance(exc, msgspec.ValidationError):
        message = str(exc)
        if " - at `$." in message:
            text, path = message.rsplit(" - at `$.", 1)
            return f"{path.rstrip('`')}: {text}"
        return message
    parts = []
    for item in exc.extra or []:
        if not isinstance(item, dict):
            continue
        key, message = item.get("key"), str(item.get("message", ""))
        if message == f"'{key}'" and key == "data":
            parts.append("the request body is empty; expected a JSON object")
        elif key:
            parts.append(f"{key}: {message}")
        else:
            parts.append(message)
    return "; ".join(parts) or (exc.detail or "invalid request")


def _validation_error(request: Request, exc: ValidationException) -> Response:
    return _json(f"invalid request to {request.url.path}: {validation_detail(exc)}", 400)


def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail or "error"
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE and detail == "Request Entity Too Large":
        limit = getattr(request.app.state, "max_body_bytes", None)
        detail = (f"request body too large: the limit is {limit} bytes (server setting max_body_bytes); "
                  "send fewer datums per call") if limit else "request body too large"
    elif exc.status_code in (404, 405):
        # a method this path does not have is an endpoint this server does not have (the SDK retries nothing
        # on 404 and reports it plainly)
        return _json(f"no such endpoint: {request.method} {request.url.path}", 404)
    return _json(detail, exc.status_code, headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    cid = log_internal_error(log, f"internal error on {request.method} {request.url.path}", exc)
    return _json(f"internal server error (correlation id {cid})", HTTP_500_INTERNAL_SERVER_ERROR)


EXCEPTION_HANDLERS = {
    UserError: _user_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
