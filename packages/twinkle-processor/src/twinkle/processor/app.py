"""The Processor service's Litestar app: health and info, plus the native Twinkle data routes.

``processor`` is anything with the async ``ProcessorService`` operations (the Serve deployment, or the
service itself in tests). The data routes are mounted when an ``authority`` is given
(``twinkle.common.authority``), and need an ``X-API-Key`` like every other native route:

======  ==================  ========================================================================
POST    /tokenize           texts → token ids
POST    /detokenize         token ids → texts
POST    /render_chat        messages → the chat template's text and tokens
POST    /encode             one page of dataset rows (JSONL text or a list of rows) → training data
POST    /encode/stream      every page from ``offset`` on, as NDJSON lines ``{"page": …}``
======  ==================  ========================================================================

Bodies are the typed structs of ``twinkle.processor.protocol``; nothing else is callable (upstream's
processor constructed arbitrary classes and called any decorated method by name). A malformed row is a 400
naming its line (``line 7``) or index (``rows[6]``). The stream encodes the first page before it answers,
so a bad row there is still a plain 400; a bad row on a later page ends the stream with an
``{"error": {"detail", "field", "status"}}`` line.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

import msgspec
from litestar import Litestar, Request, post
from litestar.response import Stream
from twinkle.common.authority import Authority, principal_of
from twinkle.common.http import component_app, log_internal_error
from twinkle.common.native import MAX_BODY_BYTES, MiB, decode
from twinkle.common.wire import UserError, remote_call

from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    EncodeRequest,
    EncodeResponse,
    RenderChatRequest,
    RenderChatResponse,
    TokenizeRequest,
    TokenizeResponse,
)

log = logging.getLogger("twinkle.processor.app")

#: Largest dataset upload (JSONL text or rows) one encode request may carry; other bodies use the
#: components' common MAX_BODY_BYTES.
MAX_ENCODE_BODY_BYTES = 256 * MiB


def create_processor_app(processor: Any, authority: Authority | None = None) -> Litestar:
    routes = _data_routes(processor, authority) if authority is not None else []
    return component_app("Twinkle processor", "twinkle-processor", processor, routes)


def _data_routes(processor: Any, authority: Authority) -> list:
    async def body_of(request: Request, type_: type) -> Any:
        await principal_of(request, authority)
        return decode(await request.body(), type_, strict=True)

    @post("/tokenize", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def tokenize(request: Request) -> TokenizeResponse:
        return await remote_call(processor.tokenize(await body_of(request, TokenizeRequest)))

    @post("/detokenize", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def detokenize(request: Request) -> DetokenizeResponse:
        return await remote_call(processor.detokenize(await body_of(request, DetokenizeRequest)))

    @post("/render_chat", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def render_chat(request: Request) -> RenderChatResponse:
        return await remote_call(processor.render_chat(await body_of(request, RenderChatRequest)))

    @post("/encode", status_code=200, request_max_body_size=MAX_ENCODE_BODY_BYTES)
    async def encode(request: Request) -> EncodeResponse:
        return await remote_call(processor.encode(await body_of(request, EncodeRequest)))

    @post("/encode/stream", status_code=200, request_max_body_size=MAX_ENCODE_BODY_BYTES)
    async def encode_stream(request: Request) -> Stream:
        req: EncodeRequest = await body_of(request, EncodeRequest)
        first: EncodeResponse = await remote_call(processor.encode(req))
        return Stream(_pages(processor, req, first), media_type="application/x-ndjson")

    return [tokenize, detokenize, render_chat, encode, encode_stream]


async def _pages(processor: Any, req: EncodeRequest, first: EncodeResponse) -> AsyncIterator[bytes]:
    page = first
    yield msgspec.json.encode({"page": page}) + b"\n"
    while page.next_offset is not None:
        try:
            page = await remote_call(processor.encode(msgspec.structs.replace(req, offset=page.next_offset)))
        except UserError as e:
            yield msgspec.json.encode({"error": {"detail": str(e), "field": e.field, "status": e.status}}) + b"\n"
            return
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            cid = log_internal_error(log, "encode stream failed", e)
            yield msgspec.json.encode({"error": {"detail": f"internal server error (correlation id {cid})",
                                                 "field": None, "status": 500}}) + b"\n"
            return
        yield msgspec.json.encode({"page": page}) + b"\n"

