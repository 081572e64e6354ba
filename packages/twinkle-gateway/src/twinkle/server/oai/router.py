"""Litestar handlers of the OpenAI-compatible surface, mounted at ``OAI_PREFIX`` by both central apps.

Keys come as ``Authorization: Bearer <key>`` (what OpenAI clients send) or ``X-API-Key``. Every error is in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status OpenAI uses.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.response import Stream

from twinkle.common.http import log_internal_error
from twinkle.common.wire import NotFoundError, UserError

from ..auth import caller_id
from . import protocol as P
from .serving import OpenAIServing

log = logging.getLogger("twinkle.server.oai")

OAI_PREFIX = "/oai/api/v1"


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.oai



def _decode(body: bytes, type_: type) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        text = str(e)
        message, _, where = text.partition(" - at `$.")
        param = where.rstrip("`") or None
        if message.startswith("Object contains unknown field"):
            param = message.split("`")[1] if "`" in message else param
            message = "this parameter is not supported by this server"
        raise UserError(message, field=param) from None
    except msgspec.DecodeError as e:
        raise UserError(f"the body is not valid JSON ({e})") from None


def _answer(result: Any) -> Any:
    if isinstance(result, msgspec.Struct):
        return result
    return Stream(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@get("/models")
async def list_models(request: Request) -> P.ModelList:
    return await _serving(request).models(caller_id(request))


@post("/completions", status_code=200)
async def completions(request: Request) -> Any:
    req = _decode(await request.body(), P.CompletionRequest)
    return _answer(await _serving(request).completion(caller_id(request), req))


@post("/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Any:
    req = _decode(await request.body(), P.ChatCompletionRequest)
    return _answer(await _serving(request).chat(caller_id(request), req))


def _error(message: str, status: int, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> Response:
    return Response(P.error_body(message, type_=type_, param=param, code=code), status_code=status, headers=headers)


def _user_error(_: Request, exc: UserError) -> Response:
    message = str(exc)
    if exc.field and message.startswith(f"{exc.field}: "):
        message = message[len(exc.field) + 2:]
    if isinstance(exc, NotFoundError) or exc.status == 404:
        return _error(message, 404, "invalid_request_error", exc.field,
                      "model_not_found" if exc.field == "model" else "not_found")
    retry_after = getattr(exc, "retry_after_s", None)
    if exc.status == 429:
        return _error(message, 429, "rate_limit_exceeded", exc.field, "rate_limit_exceeded",
                      headers={"Retry-After": str(max(1, round(retry_after or 1)))})
    return _error(message, exc.status, "invalid_request_error", exc.field)


def _http_error(_: Request, exc: HTTPException) -> Response:
    if isinstance(exc, NotAuthorizedException):
        return _error(exc.detail or "invalid API key", 401, "invalid_request_error", None, "invalid_api_key")
    if exc.status_code in (404, 405):
        return _error("no such endpoint", 404, "invalid_request_error", None, "not_found")
    return _error(exc.detail or "error", exc.status_code, "invalid_request_error", headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    cid = log_internal_error(log, f"internal error on {request.method} {request.url.path}", exc)
    return _error(f"internal server error (correlation id {cid})", 500, "server_error")


def oai_router(prefix: str = OAI_PREFIX) -> Router:
    return Router(path=prefix, route_handlers=[list_models, completions, chat_completions],
                  exception_handlers={UserError: _user_error, HTTPException: _http_error, Exception: _internal_error})
