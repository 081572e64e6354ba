"""The Processor service: a typed async API over the served model's tokenizer.

The Litestar app and the Serve deployment call these methods; each takes and returns the structs of
:mod:`twinkle.processor.protocol`. No tokenizer work runs on the event loop: small calls run in a thread
of this process, dataset encoding runs on the worker processes (or that thread, with one worker).

Large datasets are paged, not sent whole: ``encode`` encodes at most ``max_rows_per_request`` rows from
``offset`` and returns ``next_offset`` while rows remain, so one response stays a bounded size and a
client walks the pages. Each row is encoded in exactly one page.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from twinkle.common.models import load_tokenizer, resolve_model_path, served_model_name, tokenizer_id
from twinkle.common.wire import ServiceHealth, ServiceInfo, UserError
from twinkle.common.workers import StartMethod

from . import encoding
from .encoding import EncodedRow, EncodeOptions, InvalidRow
from .protocol import (
    ROLES,
    DetokenizeRequest,
    DetokenizeResponse,
    EncodeRequest,
    EncodeResponse,
    EncodeStats,
    RenderChatRequest,
    RenderChatResponse,
    RowError,
    RowsError,
    TokenizeRequest,
    TokenizeResponse,
)
from .workers import EncoderPool

# Tokenizers without a configured limit report a huge sentinel (int(1e30)); that is "unknown", not a limit.
_NO_LIMIT = 10**9


class ProcessorService:
    """Tokenization, chat rendering and dataset encoding for one served model.

    ``num_workers`` is the application's worker count (its mesh's ``dp_size``, ``ncpu_proc_per_node`` per
    node); ``max_rows_per_request`` bounds the texts of one tokenize/detokenize call and the rows of one
    encode page.
    """

    def __init__(
        self,
        model_id: str,
        num_workers: int = 1,
        max_rows_per_request: int = 10000,
        *,
        shard_rows: int = 64,
        start_method: StartMethod = "spawn",
    ) -> None:
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request must be >= 1, got {max_rows_per_request}")
        self.model_id = model_id
        self.max_rows_per_request = max_rows_per_request
        path = resolve_model_path(model_id)
        self._tokenizer = load_tokenizer(path)
        self._tokenizer_id = tokenizer_id(model_id)
        self._started = time.time()
        self._pool = EncoderPool(path, num_workers, self._tokenizer, shard_rows=shard_rows, start_method=start_method)

    @property
    def num_workers(self) -> int:
        return self._pool.num_workers

    # --- operations --------------------------------------------------------------------------------

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_count(len(request.texts), "texts")
        tokens = await self._pool.run_local(encoding.tokenize, list(request.texts), request.add_special_tokens)
        return TokenizeResponse(tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_count(len(request.tokens), "tokens")
        try:
            texts = await self._pool.run_local(encoding.detokenize, request.tokens, request.skip_special_tokens)
        except InvalidRow as e:
            raise UserError(e.message, field=e.field) from None
        return DetokenizeResponse(texts=texts)

    async def render_chat(self, request: RenderChatRequest) -> RenderChatResponse:
        try:
            messages = encoding.validate_messages([msgspec.structs.asdict(m) for m in request.messages])
            text, tokens = await self._pool.run_local(
                encoding.render_chat, messages, request.add_generation_prompt
            )
        except InvalidRow as e:
            raise UserError(e.message, field=e.field or "messages") from None
        return RenderChatResponse(text=text, tokens=tokens)

    async def encode(self, request: EncodeRequest) -> EncodeResponse:
        """Encode one page of rows. With ``on_error="fail"`` (the default) any malformed row in the page
        fails the request with :class:`RowsError` (HTTP 400) naming the rows; with ``"skip"`` the good rows
        are returned and the bad ones listed in ``errors``."""
        limit = self._validate_encode(request)
        sources, total = await asyncio.to_thread(
            encoding.select_rows, request.rows, request.jsonl, request.offset, limit
        )
        if request.offset > total:
            raise UserError(f"{request.offset} is past the last row (the request has {total})", field="offset")
        options = EncodeOptions(format=request.format, max_length=request.max_length, train_on=request.train_on)
        results = await self._pool.encode(sources, options)
        errors = [r for r in results if isinstance(r, RowError)]
        if errors and request.on_error == "fail":
            raise RowsError(errors)
        encoded = [r for r in results if isinstance(r, EncodedRow)]
        end = request.offset + len(sources)
        return EncodeResponse(
            data=[r.datum for r in encoded],
            indices=[r.index for r in encoded],
            errors=errors,
            stats=_stats(encoded, len(errors)),
            offset=request.offset,
            total_rows=total,
            next_offset=end if end < total else None,
        )

    async def info(self) -> ServiceInfo:
        tok = self._tokenizer
        max_len = getattr(tok, "model_max_length", None)
        return ServiceInfo(
            kind="processor",
            model_name=served_model_name(self.model_id),
            model_id=self.model_id,
            max_context_length=max_len if isinstance(max_len, int) and max_len < _NO_LIMIT else None,
            vocab_size=len(tok),
            tokenizer_id=self._tokenizer_id,
            dp_size=self.num_workers,
            eos_token=tok.eos_token,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            has_chat_template=bool(getattr(tok, "chat_template", None)),
            roles=list(ROLES),
            max_rows_per_request=self.max_rows_per_request,
            workers=await self._pool.describe(),
        )

    async def health(self) -> ServiceHealth:
        """``degraded`` while fewer worker processes are alive than configured; a dead worker process is
        replaced here, so the next check (and the next request) finds the pool whole again."""
        self._pool.heal()
        alive = self._pool.workers_alive()
        return ServiceHealth(
            kind="processor",
            status="ok" if alive >= self.num_workers else "degraded",
            uptime_s=round(time.time() - self._started, 1),
            workers=self.num_workers,
            workers_alive=alive,
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.close)

    # --- private -------------------------------------------------------------------------------------

    def _check_count(self, n: int, field: str) -> None:
        if n > self.max_rows_per_request:
            raise UserError(f"{n} items; at most {self.max_rows_per_request} per request", field=field)

    def _validate_encode(self, request: EncodeRequest) -> int:
        """Check the request's own fields (not its rows) and return the effective page size."""
        if (request.rows is None) == (request.jsonl is None):
            raise UserError("give exactly one of 'rows' (a list of objects) or 'jsonl' (JSONL text)", field="rows")
        if request.offset < 0:
            raise UserError("must be >= 0", field="offset")
        if request.limit is not None and request.limit < 1:
            raise UserError("must be >= 1", field="limit")
        if request.max_length is not None and request.max_length < 2:
            raise UserError("must be >= 2 (one input token and its target)", field="max_length")
        return min(request.limit or self.max_rows_per_request, self.max_rows_per_request)


def _stats(encoded: list[EncodedRow], skipped: int) -> EncodeStats:
    return EncodeStats(
        rows=len(encoded),
        skipped=skipped,
        tokens=sum(len(r.datum.model_input) for r in encoded),
        trained_tokens=sum(r.trained_tokens for r in encoded),
        truncated=sum(1 for r in encoded if r.truncated),
    )
