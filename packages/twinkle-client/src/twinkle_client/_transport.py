"""HTTP for the client: one ``httpx.Client`` per ``TwinkleClient``, retries, and error mapping.

Retried (with exponential backoff and jitter, at most ``max_retries`` times): connection errors and
timeouts, 502/503/504, and 429 (after the server's ``Retry-After`` when it gives one). Retrying is safe for
every request this client sends: reads are reads; training requests carry the run's ``seq_id``, which the
server answers from the first execution; creates and resumes carry an idempotency key; saves and loads
are deduplicated on their ``seq_id``. Anything else (4xx, 500) is raised at once as a ``TwinkleUserError``
or ``TwinkleServerError`` with the server's ``detail``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any, BinaryIO, Callable, Iterator

import httpx
import msgspec

from .errors import (
    TwinkleAuthError,
    TwinkleConnectionError,
    TwinkleError,
    TwinkleNotFoundError,
    TwinkleServerError,
    TwinkleUserError,
)

log = logging.getLogger("twinkle_client")

RETRY_STATUS = frozenset({429, 502, 503, 504})
_JSON = {"content-type": "application/json"}


class Transport:
    def __init__(self, root: str, api_key: str | None, *, timeout: float, max_retries: int, backoff_s: float,
                 max_backoff_s: float, user_agent: str, transport: httpx.BaseTransport | None = None) -> None:
        headers = {"user-agent": user_agent}
        if api_key:
            headers["x-api-key"] = api_key
        self.root = root
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._timeout = httpx.Timeout(timeout, connect=min(30.0, timeout))
        self.http = httpx.Client(base_url=root, headers=headers, timeout=self._timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------------------------------ requests

    def call(self, method: str, path: str, body: Any = None, *, type_: Any = None, params: dict | None = None,
             timeout: float | None = None, retry: bool = True) -> Any:
        """Send a request and decode its JSON answer (into ``type_`` when given; None for an empty one)."""
        r = self.send(method, path, body, params=params, timeout=timeout, retry=retry)
        if not r.content:
            return None
        try:
            return msgspec.json.decode(r.content, type=type_) if type_ is not None else msgspec.json.decode(r.content)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise TwinkleServerError(f"unexpected answer from {method} {path}: {e}", status=r.status_code) from None

    def send(self, method: str, path: str, body: Any = None, *, params: dict | None = None,
             timeout: float | None = None, retry: bool = True) -> httpx.Response:
        content = msgspec.json.encode(body) if body is not None else None
        headers = _JSON if content is not None else None
        attempt = 0
        while True:
            try:
                r = self.http.request(method, path, content=content, headers=headers, params=params,
                                      timeout=self._timeout if timeout is None else timeout)
            except httpx.TransportError as e:
                if not retry or attempt >= self.max_retries:
                    raise TwinkleConnectionError(f"{method} {self.root}{path} failed: {e!r}") from e
                self._sleep(attempt, None, f"{method} {path}: {type(e).__name__}")
                attempt += 1
                continue
            if r.status_code in RETRY_STATUS and retry and attempt < self.max_retries:
                self._sleep(attempt, r.headers.get("retry-after"), f"{method} {path}: HTTP {r.status_code}")
                attempt += 1
                continue
            if r.status_code >= 400:
                raise error_from(r)
            return r

    def stream_lines(self, method: str, path: str, body: Any, *, timeout: float | None = None) -> Iterator[bytes]:
        """POST and yield the answer's lines as they arrive (NDJSON). Errors before the first byte are
        retried like ``send``; a dropped stream raises ``TwinkleConnectionError`` for the caller to resume."""
        with self._stream(method, path, msgspec.json.encode(body), timeout) as r:
            for line in r.iter_lines():
                if line.strip():
                    yield line.encode() if isinstance(line, str) else line

    def download(self, path: str, out: BinaryIO, on_start: Callable[[int | None], None],
                 on_chunk: Callable[[int], None]) -> int:
        """GET ``path`` into ``out``; ``on_start`` gets the announced size (None if unknown), ``on_chunk`` each
        chunk's size. Errors before the first byte are retried like ``send``; returns the bytes written."""
        with self._stream("GET", path, None, None) as r:
            length = r.headers.get("content-length")
            on_start(int(length) if length and length.isdigit() else None)
            written = 0
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
                written += len(chunk)
                on_chunk(len(chunk))
            return written

    @contextlib.contextmanager
    def _stream(self, method: str, path: str, content: bytes | None, timeout: float | None
                ) -> Iterator[httpx.Response]:
        """A streamed answer with a good status: retryable statuses are retried like ``send``, errors raised;
        a connection lost before or while reading is ``TwinkleConnectionError``."""
        attempt = 0
        try:
            while True:
                with self.http.stream(method, path, content=content, headers=_JSON if content is not None else None,
                                      timeout=self._timeout if timeout is None else timeout) as r:
                    if r.status_code in RETRY_STATUS and attempt < self.max_retries:
                        r.read()
                        self._sleep(attempt, r.headers.get("retry-after"), f"{method} {path}: HTTP {r.status_code}")
                        attempt += 1
                        continue
                    if r.status_code >= 400:
                        r.read()
                        raise error_from(r)
                    yield r
                    return
        except httpx.TransportError as e:
            raise TwinkleConnectionError(f"{method} {self.root}{path} failed: {e!r}") from e

    def _sleep(self, attempt: int, retry_after: str | None, what: str) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), 60.0))
            except ValueError:
                pass
        log.info("retrying %s in %.2f s (attempt %d of %d)", what, delay, attempt + 1, self.max_retries)
        time.sleep(delay)


def error_from(r: httpx.Response) -> TwinkleError:
    """The exception for an error response: the server's ``detail`` and ``field``, never a traceback."""
    detail, field = f"HTTP {r.status_code}", None
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = str(body.get("detail") or detail)
        field = body.get("field")
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):  # a body validation error
            first = errors[0]
            field = field or first.get("key")
            detail = f"{detail}: " + "; ".join(f"{e.get('key')}: {e.get('message')}" for e in errors[:5]
                                                if isinstance(e, dict))
    elif r.text:
        detail = r.text[:500]
    status = r.status_code
    if status >= 500:
        return TwinkleServerError(detail, status=status)
    if status in (401, 403):
        return TwinkleAuthError(detail, status=status, field=field)
    if status == 404:
        return TwinkleNotFoundError(detail, status=status, field=field)
    return TwinkleUserError(detail, status=status, field=field)
