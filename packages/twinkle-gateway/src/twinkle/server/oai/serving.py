"""OpenAI-compatible completions over the control plane: the same samplers, adapter cache, limits, admission
(``max_pending_per_key``, 429) and checkpoint visibility as Tinker's ``asample``.

``model`` names what to sample: a base model (its served name or ``tokenizer_id``), a sampler checkpoint
``tinker://<run>/sampler_weights/<name>`` (``twinkle://`` too) the caller owns or that is published, or
``<base model>;<checkpoint>``. A chat is rendered with the model's own chat template by the Processor's
``render_chat``; text is encoded and decoded with the model's tokenizer (special tokens left out of replies).
A request is a ``sample`` future like any other (durable, counted in usage), awaited here.

Semantics: ``temperature`` default 1 (0 = greedy), ``top_p`` default 1, ``top_k`` (extension) off by default,
``max_tokens`` default 16 for completions and 256 for chats (capped by the context window), ``stop`` strings
end a choice *before* the stop string (OpenAI's rule; the engine reports the token that completed it),
``seed`` makes sampling repeatable, ``logprobs`` are the raw model distribution's (as Tinker's). Streaming
ends with a chunk per choice carrying its ``finish_reason`` (``stream_options.include_usage`` adds the usage
chunk); the torch engine tells tokens as it samples them, so a stream without logprobs sends each choice's text as it grows
(holding back what could still begin a stop string); with logprobs, or on an engine that answers only at the
end (vLLM, or sampler workers in other processes), the chunks come once the completion is sampled.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from twinkle.common.http import log_internal_error
from twinkle.common.limits import check_sampling
from twinkle.common.models import load_tokenizer
from twinkle.common.wire import NotFoundError, SampleOutput, SampleRequest, SamplingParams, UserError
from twinkle.processor.encoding import render_chat, validate_messages

from ..core import ControlPlane, result_value
from ..core.checkpoints import SCHEMES, parse_uri
from ..core.state import FutureRecord
from . import protocol as P

_MAX_TOP_LOGPROBS = 20
_CHAT_DEFAULT_MAX_TOKENS = 256
log = logging.getLogger("twinkle.server.oai")
_MAX_CHARS_PER_TOKEN = 64


class OpenAIServing:
    def __init__(self, plane: ControlPlane, *, scheme: str = "tinker://") -> None:
        self.plane = plane
        self.scheme = scheme  # how the protocol beside it names checkpoints in GET models
        self._tokenizers: dict[str, Any] = {}
        self._loading = asyncio.Lock()

    # ------------------------------------------------------------------------------- models

    async def models(self, owner: str) -> P.ModelList:
        now = int(time.time())
        cards = [P.ModelCard(id=name, created=now, owned_by="twinkle") for name in sorted(self.plane.samplers)]
        page = await self.plane.store.list_user_checkpoints(owner, self.plane.settings.limits.max_page_size, 0)
        for c in page.items:
            if c.kind == "sampler_weights":
                cards.append(P.ModelCard(id=f"{self.scheme}{c.run_id}/{c.kind}/{c.name}", created=int(c.created),
                                         owned_by=owner))
        return P.ModelList(data=cards)

    # ------------------------------------------------------------------------------- requests

    async def completion(self, owner: str, req: P.CompletionRequest) -> P.Completion | AsyncIterator[bytes]:
        if req.echo:
            raise UserError("echo is not supported", field="echo")
        if req.logprobs is not None and not 0 <= req.logprobs <= _MAX_TOP_LOGPROBS:
            raise UserError(f"must be between 0 and {_MAX_TOP_LOGPROBS}", field="logprobs")
        base, adapter = await self._weights(owner, req.model)
        tokenizer = await self._tokenizer(base)
        if isinstance(req.prompt, str):
            await self._check_text_length(base, len(req.prompt), "prompt")
            prompt = await asyncio.to_thread(tokenizer.encode, req.prompt)
        else:
            prompt = list(req.prompt)
        if req.stream and req.logprobs is None:
            started = await self._start_live(owner, req, base, adapter, prompt, req.max_tokens)
            return self._live(owner, req, tokenizer, prompt, started, chat=False)
        out = await self._sample(owner, req, base, adapter, prompt, req.max_tokens,
                                 req.logprobs if req.logprobs is not None else None)
        rendered = [_render(tokenizer, seq, _stops(req.stop)) for seq in out.sequences]
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        usage = _usage(prompt, out)
        if req.stream:
            return self._stream_completion(cid, created, req, rendered, usage)
        return P.Completion(id=cid, created=created, model=req.model, usage=usage, choices=[
            P.CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason,
                               logprobs=_completion_logprobs(tokenizer, r) if req.logprobs is not None else None)
            for i, r in enumerate(rendered)])

    async def chat(self, owner: str, req: P.ChatCompletionRequest) -> P.ChatCompletion | AsyncIterator[bytes]:
        if req.top_logprobs is not None and not req.logprobs:
            raise UserError("needs logprobs=true", field="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise UserError(f"must be between 0 and {_MAX_TOP_LOGPROBS}", field="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise UserError("give max_tokens or max_completion_tokens, not both", field="max_completion_tokens")
        messages = validate_messages([{"role": m.role, "content": _text(m, i)} for i, m in enumerate(req.messages)])
        base, adapter = await self._weights(owner, req.model)
        tokenizer = await self._tokenizer(base)
        await self._check_text_length(base, sum(len(m["content"]) for m in messages), "messages")
        _, prompt = await asyncio.to_thread(render_chat, tokenizer, messages, True)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = _CHAT_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if req.stream and not req.logprobs:
            started = await self._start_live(owner, req, base, adapter, list(prompt), max_tokens)
            return self._live(owner, req, tokenizer, list(prompt), started, chat=True)
        out = await self._sample(owner, req, base, adapter, list(prompt), max_tokens, top)
        rendered = [_render(tokenizer, seq, _stops(req.stop)) for seq in out.sequences]
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        usage = _usage(prompt, out)
        if req.stream:
            return self._stream_chat(cid, created, req, tokenizer, rendered, usage)
        return P.ChatCompletion(id=cid, created=created, model=req.model, usage=usage, choices=[
            P.ChatChoice(index=i, message=P.ChatMessageOut(content=r.text), finish_reason=r.finish_reason,
                         logprobs=P.ChatLogprobs(content=_chat_logprobs(tokenizer, r)) if req.logprobs else None)
            for i, r in enumerate(rendered)])

    # ------------------------------------------------------------------------------- sampling

    async def _weights(self, owner: str, model: str) -> tuple[str, str | None]:
        """(base model, adapter directory) of ``model``, visible to ``owner``; 404 naming ``model``."""
        base_name, _, path = model.rpartition(";") if ";" in model else ("", "", model)
        if not path.startswith(SCHEMES):
            base = await self.plane.served_name(path)
            if base not in self.plane.samplers:
                raise NotFoundError(f"the model {model!r} does not exist; GET models lists what you can use",
                                    field="model")
            return base, None
        ckpt = await self.plane.visible_checkpoint(owner, parse_uri(path, field="model", kinds=("sampler_weights",)),
                                                   field="model")
        base = await self.plane.base_model_of(ckpt, field="model")
        if base_name and await self.plane.served_name(base_name) != base:
            raise UserError(f"checkpoint {path} is for base model {base!r}, not {base_name!r}", field="model")
        self.plane.sampler_port(base, field="model")
        return base, ckpt.path

    async def _check_text_length(self, base: str, chars: int, field: str) -> None:
        """Bound the tokenizer's work before it starts: a prompt must fit the context window, and no tokenizer
        packs more than ``_MAX_CHARS_PER_TOKEN`` characters into a token."""
        info = await self.plane.model_info(base)
        context = getattr(info, "max_context_length", None) or 0
        if context and chars > context * _MAX_CHARS_PER_TOKEN:
            raise UserError(f"{chars} characters cannot fit the model's context window of {context} tokens",
                            field=field)

    async def _tokenizer(self, base: str) -> Any:
        if base not in self._tokenizers:
            async with self._loading:
                if base not in self._tokenizers:
                    info = await self.plane.model_info(base)
                    if info is None or not info.tokenizer_id:
                        raise UserError(f"the model {base!r} is starting; retry in a moment", status=503)
                    self._tokenizers[base] = await asyncio.to_thread(load_tokenizer, info.tokenizer_id)
        return self._tokenizers[base]

    async def _sample(self, owner: str, req: P.CompletionRequest | P.ChatCompletionRequest, base: str,
                      adapter: str | None, prompt: list[int], max_tokens: int | None, top: int | None
                      ) -> SampleOutput:
        record = await self._submit(owner, req, base, adapter, prompt, max_tokens, top, None)
        return await self._outcome(owner, record)

    async def _submit(self, owner: str, req: P.CompletionRequest | P.ChatCompletionRequest, base: str,
                      adapter: str | None, prompt: list[int], max_tokens: int | None, top: int | None,
                      live: asyncio.Queue | None) -> FutureRecord:
        """Submit the sample as a future (admission, accounting); with ``live``, its tokens are put there as the
        sampler tells them, then None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise UserError("is not supported (only 0)", field=name)
        if not prompt:
            raise UserError("the prompt is empty", field="prompt")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=-1 if req.top_k in (None, 0) else req.top_k, top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed, stop=_stops(req.stop) or None)
        try:
            check_sampling(params, num_samples=req.n, limits=self.plane.settings.limits)
        except UserError as e:
            raise UserError(str(e).split(": ", 1)[-1], field=(e.field or "").removeprefix("sampling_params."),
                            status=e.status) from None
        request = SampleRequest(prompt=prompt, sampling_params=params, num_samples=req.n, adapter_path=adapter,
                                topk_sample_logprobs=top or 0)
        port = self.plane.sampler_port(base, field="model")

        async def telling() -> SampleOutput:
            assert live is not None
            out = None
            try:
                async for item in port.sample_stream(request):
                    if isinstance(item, tuple):
                        live.put_nowait(item)
                    else:
                        out = item
            finally:
                live.put_nowait(None)
            if out is None:
                raise RuntimeError("the sampler's stream ended without its output")
            return out

        return await self.plane.submit(owner, "sample", (lambda: port.sample(request)) if live is None else telling,
                                       meta={"prompt_tokens": len(prompt), "base_model": base})

    async def _outcome(self, owner: str, record: FutureRecord) -> SampleOutput:
        while not record.terminal:
            record = await self.plane.futures.wait(record.request_id, owner) or record
        if record.status != "done":
            if record.category == "user":
                raise UserError(record.error or "the request failed")
            raise RuntimeError(record.error or "the sampler failed")
        return result_value(record)

    async def _start_live(self, owner: str, req: Any, base: str, adapter: str | None, prompt: list[int],
                          max_tokens: int | None) -> tuple[FutureRecord, asyncio.Queue, Any]:
        """Submit a streamed sample and wait for its first token, so that a request the sampler refuses is
        still an HTTP error, not an error inside a stream that already answered 200."""
        live: asyncio.Queue = asyncio.Queue()
        record = await self._submit(owner, req, base, adapter, prompt, max_tokens, None, live)
        first = await live.get()
        if first is None:
            await self._outcome(owner, record)  # raises the sampler's error, if it failed
        return record, live, first

    # ------------------------------------------------------------------------------- streaming

    async def _live(self, owner: str, req: Any, tokenizer: Any, prompt: list[int],
                    started: tuple[FutureRecord, asyncio.Queue, Any], *, chat: bool) -> AsyncIterator[bytes]:
        """Chunks as the sampler tells tokens: each choice's text grows by what its new token adds, holding back
        what could still be the start of a stop string (or half a character); the final chunks settle each
        choice on the finished output. Closing the stream early cancels the request."""
        record, live, item = started
        cid, created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": req.model}
        stops = _stops(req.stop)
        hold = max((len(x) for x in stops), default=1) - 1
        tokens: list[list[int]] = [[] for _ in range(req.n)]
        sent, stopped = [0] * req.n, [False] * req.n

        def chunk(i: int, text: str | None, finish: str | None = None) -> bytes:
            if chat:
                delta = {} if text is None else {"content": text}
                return _event({**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]})
            return _event({**head, "choices": [{"index": i, "text": text or "", "finish_reason": finish,
                                                "logprobs": None}]})

        try:
            if chat:
                for i in range(req.n):
                    yield _event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None}]})
            ended = item is None
            while not ended:
                # every token told so far, then one chunk per choice that grew (a busy loop sends fewer, longer
                # chunks instead of falling behind the sampler)
                grew: set[int] = set()
                while item is not None:
                    i, token, _logprob = item
                    if not stopped[i]:
                        tokens[i].append(token)
                        grew.add(i)
                    if live.empty():
                        break
                    item = live.get_nowait()
                ended = item is None
                for i in sorted(grew):
                    text = tokenizer.decode(tokens[i], skip_special_tokens=True)
                    cut = min((k for k in (text.find(x, max(0, sent[i] - hold)) for x in stops) if k >= 0),
                              default=-1)
                    if cut >= 0:
                        text, stopped[i], safe = text[:cut], True, cut
                    else:
                        safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
                    if safe > sent[i]:
                        yield chunk(i, text[sent[i]:safe])
                        sent[i] = safe
                if not ended:
                    item = await live.get()
                    ended = item is None
            out = await self._outcome(owner, record)
            for i, seq in enumerate(out.sequences):
                r = _render(tokenizer, seq, stops)
                if len(r.text) > sent[i]:
                    yield chunk(i, r.text[sent[i]:])
                yield chunk(i, None, r.finish_reason)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield _event({**head, "choices": [], "usage": msgspec.to_builtins(_usage(prompt, out))})
            yield b"data: [DONE]\n\n"
        except UserError as e:
            yield _event(P.error_body(str(e), type_="invalid_request_error", param=e.field))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream, like OpenAI
            cid = log_internal_error(log, f"stream {record.request_id} failed", e, request_id=record.request_id)
            yield _event(P.error_body(f"internal server error (correlation id {cid})", type_="server_error"))
        finally:
            if self.plane.futures.is_running(record.request_id):  # the client left before the end
                await self.plane.futures.cancel(record.request_id, owner, frozenset({"sample"}))

    async def _stream_completion(self, cid: str, created: int, req: P.CompletionRequest, rendered: list[_Rendered],
                                 usage: P.Usage) -> AsyncIterator[bytes]:
        base = {"id": cid, "object": "text_completion", "created": created, "model": req.model}
        for i, r in enumerate(rendered):
            for piece in r.pieces:
                yield _event({**base, "choices": [{"index": i, "text": piece, "finish_reason": None,
                                                   "logprobs": None}]})
            yield _event({**base, "choices": [{"index": i, "text": "", "finish_reason": r.finish_reason,
                                               "logprobs": None}]})
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _event({**base, "choices": [], "usage": msgspec.to_builtins(usage)})
        yield b"data: [DONE]\n\n"

    async def _stream_chat(self, cid: str, created: int, req: P.ChatCompletionRequest, tokenizer: Any,
                           rendered: list[_Rendered], usage: P.Usage) -> AsyncIterator[bytes]:
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        for i, r in enumerate(rendered):
            yield _event({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None}]})
            entries = _chat_logprobs(tokenizer, r) if req.logprobs else None
            for k, piece in enumerate(r.pieces):
                logprobs = {"content": [msgspec.to_builtins(entries[k])]} if entries else None
                yield _event({**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None,
                                                   "logprobs": logprobs}]})
            yield _event({**base, "choices": [{"index": i, "delta": {}, "finish_reason": r.finish_reason}]})
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _event({**base, "choices": [], "usage": msgspec.to_builtins(usage)})
        yield b"data: [DONE]\n\n"


# ----------------------------------------------------------------------------------- rendering


class _Rendered(msgspec.Struct):
    """One choice: its text, the text each kept token added (``pieces``), and those tokens."""

    text: str
    pieces: list[str]
    tokens: list[int]
    logprobs: list[float]
    topk: Any
    finish_reason: str


def _render(tokenizer: Any, seq: Any, stops: list[str]) -> _Rendered:
    """The reply as OpenAI gives it: special tokens left out, cut before the first stop string; ``pieces[k]`` is
    the text token k adds (empty while it holds half a character), over the tokens up to the cut."""
    text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
    finish = seq.stop_reason
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    pieces: list[str] = []
    done = 0
    for k in range(len(seq.tokens)):
        if cut >= 0 and done >= len(text) and k > 0:
            break
        prefix = tokenizer.decode(seq.tokens[:k + 1], skip_special_tokens=True)
        end = done if prefix.endswith("\ufffd") else min(len(prefix), len(text))
        pieces.append(text[done:max(done, end)])
        done = max(done, end)
    if done < len(text) and pieces:
        pieces[-1] += text[done:]
    n = len(pieces)
    return _Rendered(text=text, pieces=pieces, tokens=list(seq.tokens[:n]), logprobs=list(seq.logprobs[:n]),
                     topk=seq.topk, finish_reason=finish)


def _token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return text, list(text.encode("utf-8", errors="replace"))


def _chat_logprobs(tokenizer: Any, r: _Rendered) -> list[P.TokenLogprob]:
    out = []
    for k, (token, lp) in enumerate(zip(r.tokens, r.logprobs)):
        text, raw = _token_text(tokenizer, token)
        top = []
        if r.topk is not None:
            for t, v in zip(r.topk.ids[k], r.topk.logprobs[k]):
                tt, tb = _token_text(tokenizer, t)
                top.append(P.TopLogprob(token=tt, logprob=v, bytes=tb))
        out.append(P.TokenLogprob(token=text, logprob=lp, bytes=raw, top_logprobs=top))
    return out


def _completion_logprobs(tokenizer: Any, r: _Rendered) -> P.CompletionLogprobs:
    tokens = [_token_text(tokenizer, t)[0] for t in r.tokens]
    offsets, at = [], 0
    for piece in r.pieces[:len(tokens)]:
        offsets.append(at)
        at += len(piece)
    offsets += [at] * (len(tokens) - len(offsets))
    top = None
    if r.topk is not None:
        top = [{_token_text(tokenizer, t)[0]: v for t, v in zip(ids, lps)}
               for ids, lps in zip(r.topk.ids[:len(tokens)], r.topk.logprobs[:len(tokens)])]
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=list(r.logprobs), top_logprobs=top, text_offset=offsets)


def _usage(prompt: list[int], out: SampleOutput) -> P.Usage:
    completion = sum(len(s.tokens) for s in out.sequences)
    return P.Usage(prompt_tokens=len(prompt), completion_tokens=completion, total_tokens=len(prompt) + completion)


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _text(message: P.ChatMessageIn, i: int) -> str:
    if isinstance(message.content, str) or message.content is None:
        return message.content or ""
    parts = []
    for k, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise UserError(f"content parts of type {part.type!r} are not supported (text models only)",
                            field=f"messages[{i}].content[{k}]")
        parts.append(part.text)
    return "".join(parts)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"
