"""``TwinkleClient``: the entry point of the SDK.

``base_url`` is the server root (``http://127.0.0.1:8000``); the client finds the central server's prefix
(``/server`` by default; a ``base_url`` with a path names it; else it asks Ray Serve's route table) and learns
every other app's prefix from ``capabilities()``. All state is per instance: two clients in one process may
talk to two servers with two keys.
"""

from __future__ import annotations

import logging
import os
import secrets
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import httpx
import msgspec

from . import _wire as W
from ._progress import progress_bar
from ._session import Heartbeat
from ._transport import Transport
from .errors import (
    TwinkleConnectionError,
    TwinkleError,
    TwinkleNotFoundError,
    TwinkleServerError,
    TwinkleTimeoutError,
    TwinkleUserError,
)
from .training import TrainingRun
from .types import (
    AuditEntry,
    Capabilities,
    Checkpoint,
    CheckpointsPage,
    Datum,
    EncodePage,
    FutureProgress,
    RenderedChat,
    RunStep,
    SampleOutput,
    TrainingRunInfo,
    TrainingRunsPage,
    UsageBucket,
)

__version__ = "0.1.0"
log = logging.getLogger("twinkle_client")

URL_ENV = "TWINKLE_SERVER_URL"
TOKEN_ENV = "TWINKLE_SERVER_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_SERVER_PREFIX = "/server"
_LOG_EVERY_S = 10.0

ProgressCallback = Callable[[FutureProgress], None]


class TwinkleClient:
    """A client of one Twinkle server.

    ``api_key`` defaults to ``$TWINKLE_SERVER_TOKEN``, ``base_url`` to ``$TWINKLE_SERVER_URL`` (else
    ``http://127.0.0.1:8000``). ``timeout`` bounds one HTTP exchange (a training step on a big batch can take
    a while). ``max_retries``/``backoff_s``/``max_backoff_s`` shape the retries of transient failures.
    ``on_progress`` is called on every poll of a long operation (else progress is logged every 10 s on the
    ``twinkle_client`` logger). ``progress`` draws progress bars (``tqdm``) for dataset encoding, checkpoint
    saves and downloads: ``None`` (default) when standard error is a terminal and tqdm is installed, ``True``
    always, ``False`` never. ``heartbeat=False`` skips the session heartbeat thread.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, server_prefix: str | None = None,
                 timeout: float = 600.0, max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 on_progress: ProgressCallback | None = None, progress: bool | None = None,
                 heartbeat: bool = True, session_metadata: dict[str, Any] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must look like http://host:port, got {url!r}")
        self.root = f"{parts.scheme}://{parts.netloc}"
        self._explicit_prefix = server_prefix or (parts.path.rstrip("/") or None) or os.environ.get(
            "TWINKLE_SERVER_PREFIX")
        self.api_key = api_key if api_key is not None else os.environ.get(TOKEN_ENV)
        self.on_progress = on_progress
        self.progress = progress
        self._heartbeat_enabled = heartbeat
        self._session_metadata = session_metadata
        self._transport_override = transport
        self._transport = Transport(self.root, self.api_key, timeout=timeout, max_retries=max_retries,
                                    backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                                    user_agent=f"twinkle-client/{__version__}", transport=transport)
        self._server_prefix: str | None = None
        self._caps: Capabilities | None = None
        self.session_id: str | None = None
        self._heartbeat: Heartbeat | None = None
        self._session_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Finish the session (its runs and checkpoints stay) and release the connections."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.session_id is not None:
            try:
                self._transport.call("POST", f"{self.server_prefix}/sessions/{self.session_id}/finish", retry=False,
                                     timeout=10.0)
            except TwinkleError as e:
                log.debug("could not finish session %s: %s", self.session_id, e)
        self._transport.close()

    def __enter__(self) -> "TwinkleClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TwinkleClient({self.root!r})"

    # ------------------------------------------------------------------------------------------ discovery

    @property
    def server_prefix(self) -> str:
        if self._server_prefix is None:
            self._server_prefix = self._discover_prefix()
        return self._server_prefix

    def _discover_prefix(self) -> str:
        """The central server's prefix: the one given, else ``/server`` if it answers, else the first app in
        Ray Serve's route table (``/-/routes``) whose ``/healthz`` says it is a twinkle server."""
        if self._explicit_prefix:
            return "/" + self._explicit_prefix.strip("/")
        candidates = [DEFAULT_SERVER_PREFIX]
        try:
            routes = self._transport.call("GET", "/-/routes", retry=False, timeout=10.0)
            if isinstance(routes, dict):
                candidates += [p for p in routes if p not in candidates]
        except TwinkleError:
            pass
        for prefix in candidates:
            try:
                health = self._transport.call("GET", f"{prefix.rstrip('/')}/healthz", timeout=10.0)
            except (TwinkleUserError, TwinkleServerError):
                continue
            if isinstance(health, dict) and health.get("server_type") == "twinkle":
                return prefix.rstrip("/")
        raise TwinkleConnectionError(
            f"no Twinkle server found at {self.root} (tried {', '.join(candidates)}); pass server_prefix= or a "
            "base_url that includes it")

    # ------------------------------------------------------------------------------------------ server

    def health(self) -> dict[str, Any]:
        """The central server's health (no API key needed)."""
        return self._transport.call("GET", f"{self.server_prefix}/healthz")

    def capabilities(self, *, refresh: bool = False) -> Capabilities:
        """The served models, where their apps are, and the server's limits (cached; ``refresh`` re-reads)."""
        if self._caps is None or refresh:
            self._caps = self._transport.call("GET", f"{self.server_prefix}/capabilities", type_=Capabilities)
        return self._caps

    def _session(self) -> str | None:
        """This client's session id, created (with its heartbeat) on first use."""
        with self._session_lock:
            return self._open_session()

    def _open_session(self) -> str | None:
        if self.session_id is None and not self._closed:
            out = self._transport.call("POST", f"{self.server_prefix}/sessions", W.SessionBody(
                user_metadata=self._session_metadata, client_version=__version__), type_=W.SessionOut)
            self.session_id = out.session_id
            if self._heartbeat_enabled:
                headers = {"x-api-key": self.api_key} if self.api_key else {}
                self._heartbeat = Heartbeat(self.root, f"{self.server_prefix}/sessions/{out.session_id}/heartbeat",
                                            headers, out.heartbeat_interval_s,
                                            transport=self._transport_override).start()
        return self.session_id

    # ------------------------------------------------------------------------------------------ futures

    def wait(self, request_id: str, *, kind: str = "request", timeout: float | None = None,
             on_progress: ProgressCallback | None = None) -> bytes:
        """Wait for a long operation; return its result (JSON bytes). A user failure raises
        ``TwinkleUserError``, a server one ``TwinkleServerError``; ``timeout`` raises
        ``TwinkleTimeoutError`` (the operation goes on; wait again with its ``request_id``). Without a
        progress callback, a progress bar shows the time waited (see ``progress``)."""
        callback = on_progress or self.on_progress
        start = time.monotonic()
        last_log = start
        polls = 0
        poll_s = max(1.0, min(20.0, self._caps.long_poll_timeout_s if self._caps else 20.0))
        bar = None  # drawn from the first answer that is not the result
        try:
            while True:
                hold = poll_s if timeout is None else max(0.0, min(poll_s, timeout - (time.monotonic() - start)))
                out = self._transport.call("GET", f"{self.server_prefix}/futures/{request_id}",
                                           params={"timeout": f"{hold:.3f}"}, type_=W.FutureOut, timeout=hold + 30.0)
                polls += 1
                elapsed = time.monotonic() - start
                if out.status == "done":
                    return bytes(out.result)
                if out.status == "failed":
                    raise _future_error(out.error, request_id)
                if callback is not None:
                    callback(FutureProgress(request_id=request_id, kind=kind, status=out.status, elapsed_s=elapsed,
                                            polls=polls))
                else:
                    if bar is None:
                        bar = progress_bar(self.progress, kind, bar_format="{desc}: {elapsed}{postfix}")
                        poll_s = poll_s if bar.disable else 1.0  # a drawn bar shows the time waited: redraw it
                    bar.set_postfix_str(out.status)
                    if bar.disable and time.monotonic() - last_log >= _LOG_EVERY_S:
                        last_log = time.monotonic()
                        log.info("waiting for %s (%s): %.0f s", kind, request_id, elapsed)
                if timeout is not None and elapsed >= timeout:
                    raise TwinkleTimeoutError(f"{kind} ({request_id}) did not finish within {timeout} s; it "
                                              "continues on the server", request_id=request_id)
        finally:
            if bar is not None:
                bar.close()

    def _run_future(self, ref: W.FutureRef, kind: str, timeout: float | None) -> TrainingRunInfo:
        return msgspec.json.decode(self.wait(ref.request_id, kind=kind, timeout=timeout), type=TrainingRunInfo)

    # ------------------------------------------------------------------------------------------ runs

    def create_training_run(self, base_model: str | None = None, rank: int = 8, *, alpha: float | None = None,
                            seed: int | None = None, train_attn: bool = True, train_mlp: bool = True,
                            train_unembed: bool = True, dropout: float = 0.0,
                            user_metadata: dict[str, Any] | None = None, timeout: float | None = None) -> TrainingRun:
        """A new LoRA training run on ``base_model`` (default: the server's only model)."""
        model = self.capabilities().model(base_model)
        body = W.CreateRunBody(
            base_model=model.name, session_id=self._session(), user_metadata=user_metadata,
            lora=W.LoraBody(rank=rank, alpha=alpha, seed=seed, train_attn=train_attn, train_mlp=train_mlp,
                            train_unembed=train_unembed, dropout=dropout),
            idempotency_key=secrets.token_hex(12),
        )
        ref = self._transport.call("POST", f"{self.server_prefix}/training_runs", body, type_=W.FutureRef)
        return TrainingRun(self, self._run_future(ref, "create_training_run", timeout), next_seq_id=1)

    def resume(self, source: str | Checkpoint, *, optimizer: bool = True, into: str | TrainingRun | None = None,
               user_metadata: dict[str, Any] | None = None, timeout: float | None = None) -> TrainingRun:
        """Continue training from ``source`` — a state checkpoint URI (``twinkle://<run>/weights/<name>``)
        or a run id (its latest state checkpoint) — in a new run, or in the existing run ``into``.
        ``optimizer=False`` loads the weights only (fresh AdamW moments)."""
        source = source.uri if isinstance(source, Checkpoint) else source
        into_id = into.run_id if isinstance(into, TrainingRun) else into
        body = W.ResumeBody(source=source, optimizer=optimizer, into_run_id=into_id,
                            session_id=None if into_id else self._session(), user_metadata=user_metadata,
                            idempotency_key=secrets.token_hex(12))
        ref = self._transport.call("POST", f"{self.server_prefix}/resume", body, type_=W.FutureRef)
        info = self._run_future(ref, "resume", timeout)
        if isinstance(into, TrainingRun):
            into.info, into._dirty = info, True  # an unnumbered load: the handle's numbering still holds
            return into
        if into_id is not None:
            return self.training_run(into_id)
        return TrainingRun(self, info, next_seq_id=1)

    def training_run(self, run_id: str) -> TrainingRun:
        """A handle on an existing run (e.g. after the process that created it is gone), numbering its
        requests where the run's sequence stands. Use one live handle per run: two handles numbering the
        same run would take the same numbers, and the server answers a repeated number from its first
        request."""
        run = TrainingRun(self, self.get_training_run(run_id))
        run._resync = True
        return run

    def get_training_run(self, run_id: str) -> TrainingRunInfo:
        return self._transport.call("GET", f"{self.server_prefix}/training_runs/{run_id}", type_=TrainingRunInfo)

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> TrainingRunsPage:
        """One page of this key's runs, most recently used first."""
        return self._transport.call("GET", f"{self.server_prefix}/training_runs",
                                    params={"limit": limit, "offset": offset}, type_=TrainingRunsPage)

    def iter_training_runs(self, page_size: int = 100) -> Iterator[TrainingRunInfo]:
        offset: int | None = 0
        while offset is not None:
            page = self.list_training_runs(limit=page_size, offset=offset)
            yield from page.training_runs
            offset = page.cursor.next_offset

    def delete_training_run(self, run_id: str, *, checkpoints: bool = False) -> None:
        self._transport.call("DELETE", f"{self.server_prefix}/training_runs/{run_id}",
                             params={"checkpoints": "true" if checkpoints else "false"})

    def run_history(self, run_id: str, *, after_step: int = 0, limit: int | None = None) -> list[RunStep]:
        """A run's optimizer steps after ``after_step`` (loss since the previous step, tokens, learning rate,
        gradient norm), oldest first, at most ``limit`` (the server's page size by default)."""
        params: dict[str, Any] = {"after_step": after_step}
        if limit is not None:
            params["limit"] = limit
        out = self._transport.call("GET", f"{self.server_prefix}/training_runs/{run_id}/history", params=params)
        return msgspec.convert(out["steps"], list[RunStep])

    # ------------------------------------------------------------------------------------------ usage

    def usage(self, starting_on: str, ending_before: str) -> list[UsageBucket]:
        """This key's usage (every key's for an admin key) per UTC hour in ``[starting_on, ending_before)``:
        ISO 8601 times on hour boundaries, at most 14 days apart."""
        out = self._transport.call("GET", f"{self.server_prefix}/usage",
                                   params={"starting_on": starting_on, "ending_before": ending_before})
        return msgspec.convert(out["buckets"], list[UsageBucket])

    def audit_log(self, day: str | None = None, *, event_type: str = "all") -> list[AuditEntry]:
        """Who created, read, published or deleted what of this key's (every key's for an admin key) on a UTC
        day (``2026-12-03``; default today)."""
        params = {"event_type": event_type, **({"day": day} if day else {})}
        out = self._transport.call("GET", f"{self.server_prefix}/audit", params=params)
        return msgspec.convert(out["entries"], list[AuditEntry])

    # ------------------------------------------------------------------------------------------ checkpoints

    def list_checkpoints(self, run_id: str | None = None) -> list[Checkpoint]:
        """The checkpoints of one run, or (``run_id`` None) every checkpoint of this key, newest first."""
        if run_id is not None:
            page = self._transport.call("GET", f"{self.server_prefix}/training_runs/{run_id}/checkpoints",
                                        type_=CheckpointsPage)
            return page.checkpoints
        out: list[Checkpoint] = []
        offset: int | None = 0
        while offset is not None:
            page = self._transport.call("GET", f"{self.server_prefix}/checkpoints",
                                        params={"limit": 500, "offset": offset}, type_=CheckpointsPage)
            out.extend(page.checkpoints)
            offset = page.cursor.next_offset if page.cursor else None
        return out

    def latest_checkpoint(self, run_id: str, kind: str | None = None) -> Checkpoint:
        """The newest checkpoint of a run (``kind``: ``state``, ``sampler`` or None for either)."""
        params = {"kind": kind} if kind else None
        return self._transport.call("GET", f"{self.server_prefix}/training_runs/{run_id}/checkpoints/latest",
                                    params=params, type_=Checkpoint)

    def delete_checkpoint(self, uri: str | Checkpoint) -> None:
        uri = uri.uri if isinstance(uri, Checkpoint) else uri
        run_id, kind, name = _split_uri(uri)
        self._transport.call("DELETE", f"{self.server_prefix}/training_runs/{run_id}/checkpoints/{kind}/{name}")

    def download_checkpoint(self, uri: str | Checkpoint, dest: str | os.PathLike = ".", *,
                            extract: bool = True) -> Path:
        """Download a checkpoint's files into the directory ``dest``: unpacked into
        ``<run>-<kind>-<name>/`` (its path is returned), or (``extract=False``) as that name plus ``.tar``."""
        uri = uri.uri if isinstance(uri, Checkpoint) else uri
        run_id, kind, name = _split_uri(uri)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if extract and not hasattr(tarfile, "data_filter"):
            raise RuntimeError("extracting safely needs Python 3.10.12, 3.11.4 or newer; pass extract=False")
        bar = progress_bar(self.progress, f"download {name}", unit="B", unit_scale=True)
        fd, partial = tempfile.mkstemp(prefix=".twinkle-download-", suffix=".tar", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out:
                path = f"{self.server_prefix}/training_runs/{run_id}/checkpoints/{kind}/{name}/archive"
                self._transport.download(path, out, on_start=lambda size: bar.reset(total=size), on_chunk=bar.update)
            with tarfile.open(partial) as tar:
                top = _archive_top(tar)
                if not extract:
                    target = dest / f"{top}.tar"
                    os.replace(partial, target)
                    return target
                target = dest / top
                if target.exists():
                    raise FileExistsError(f"{target} already exists; remove it or download elsewhere")
                tar.extractall(dest, filter="data")  # members stay under dest: no links, devices or ..
            return target
        finally:
            bar.close()
            if os.path.exists(partial):
                os.remove(partial)

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, prompt: str | Sequence[int], *, base_model: str | None = None, model_uri: str | None = None,
               num_samples: int = 1, max_tokens: int | None = None, temperature: float = 1.0, top_k: int = -1,
               top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | list[int] | None = None,
               prompt_logprobs: bool = False, decode: bool = False) -> SampleOutput:
        """Sample from the base model, or from the adapter of checkpoint ``model_uri``. ``prompt``: token
        ids, or text (tokenized by the server's Processor). ``temperature=0`` is greedy."""
        name = base_model
        if name is None and model_uri is not None and len(self.capabilities().models) > 1:
            name = self.get_training_run(_split_uri(model_uri)[0]).base_model
        model = self.capabilities().model(name)
        if not model.sampler_prefix:
            raise ValueError(f"the server does not sample {model.name!r}")
        if isinstance(prompt, str):
            tokens = self.tokenize([prompt], base_model=model.name)[0]
        else:
            tokens = [int(t) for t in prompt]
        body = W.SampleBody(prompt_tokens=tokens, num_samples=num_samples, prompt_logprobs=prompt_logprobs,
                            model_uri=model_uri, sampling_params=W.SamplingParamsBody(
                                max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop=stop))
        out = self._transport.call("POST", f"{model.sampler_prefix}/sample", body, type_=SampleOutput)
        if decode and out.sequences:
            texts = self.detokenize([s.tokens for s in out.sequences], base_model=model.name)
            for s, text in zip(out.sequences, texts, strict=True):
                s.text = text
        return out

    # ------------------------------------------------------------------------------------------ processor

    def _processor(self, base_model: str | None) -> str:
        model = self.capabilities().model(base_model)
        if not model.processor_prefix:
            raise ValueError(f"the server has no processor for {model.name!r}")
        return model.processor_prefix

    def tokenize(self, texts: Sequence[str], *, base_model: str | None = None,
                 add_special_tokens: bool = True) -> list[list[int]]:
        body = W.TokenizeBody(texts=list(texts), add_special_tokens=add_special_tokens)
        return self._transport.call("POST", f"{self._processor(base_model)}/tokenize", body)["tokens"]

    def detokenize(self, tokens: Sequence[Sequence[int]], *, base_model: str | None = None,
                   skip_special_tokens: bool = False) -> list[str]:
        body = W.DetokenizeBody(tokens=[list(t) for t in tokens], skip_special_tokens=skip_special_tokens)
        return self._transport.call("POST", f"{self._processor(base_model)}/detokenize", body)["texts"]

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False,
                    base_model: str | None = None) -> RenderedChat:
        """The served model's chat template applied to ``messages`` (text and tokens)."""
        body = W.RenderChatBody(messages=[W.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                                add_generation_prompt=add_generation_prompt)
        return self._transport.call("POST", f"{self._processor(base_model)}/render_chat", body, type_=RenderedChat)

    def encode_dataset(self, source: str | os.PathLike | Iterable[dict[str, Any]] | None = None, *,
                       jsonl: str | None = None, base_model: str | None = None, format: str = "auto",
                       max_length: int | None = None, train_on: str = "all_assistant", on_error: str = "fail",
                       page_size: int | None = None) -> Iterator[EncodePage]:
        """Encode a dataset into training data on the server's Processor, page by page as pages arrive.

        ``source``: a JSONL file path, or rows (dicts); or give the JSONL text as ``jsonl``. A row is
        ``{"messages": [{"role", "content"}, …]}`` or ``{"prompt": …, "completion": …}``. With
        ``on_error="fail"`` a malformed row raises ``TwinkleUserError`` naming it (``field="line 7"``);
        with ``"skip"`` it is left out and listed in the page's ``errors``. The upload happens once; if the
        stream breaks, encoding resumes at the next page.
        """
        body = _encode_body(source, jsonl, format=format, max_length=max_length, train_on=train_on,
                            on_error=on_error, limit=page_size)
        path = f"{self._processor(base_model)}/encode/stream"
        bar = progress_bar(self.progress, "encoding", unit=" rows")
        try:
            yield from self._encode_pages(path, body, bar)
        finally:
            bar.close()

    def _encode_pages(self, path: str, body: W.EncodeBody, bar: Any) -> Iterator[EncodePage]:
        offset = 0
        attempts = 0
        while True:
            try:
                for line in self._transport.stream_lines("POST", path, msgspec.structs.replace(body, offset=offset)):
                    item = msgspec.json.decode(line)
                    if "error" in item:
                        err = item["error"] or {}
                        raise _stream_error(err)
                    page = msgspec.convert(item["page"], type=EncodePage)
                    if bar.total != page.total_rows:
                        bar.reset(total=page.total_rows)
                        bar.update(page.offset)
                    offset = page.next_offset if page.next_offset is not None else page.total_rows
                    bar.update(offset - page.offset)
                    attempts = 0
                    yield page
                    if page.next_offset is None:
                        return
                return
            except TwinkleConnectionError:
                attempts += 1
                if attempts > self._transport.max_retries:
                    raise
                log.info("the encode stream broke; resuming at row %d", offset)
                time.sleep(min(self._transport.max_backoff_s, self._transport.backoff_s * 2 ** attempts))

    def encode_datums(self, source: str | os.PathLike | Iterable[dict[str, Any]] | None = None,
                      **kwargs: Any) -> list[Datum]:
        """``encode_dataset`` collected into one list of training data."""
        return [d for page in self.encode_dataset(source, **kwargs) for d in page.data]


def _encode_body(source: Any, jsonl: str | None, **options: Any) -> W.EncodeBody:
    if (source is None) == (jsonl is None):
        raise ValueError("give a JSONL path or rows as source, or JSONL text as jsonl= (exactly one)")
    if jsonl is not None:
        return W.EncodeBody(jsonl=jsonl, **options)
    if isinstance(source, (str, os.PathLike)):
        return W.EncodeBody(jsonl=Path(source).read_text(encoding="utf-8"), **options)
    if isinstance(source, (bytes, bytearray)):
        return W.EncodeBody(jsonl=bytes(source).decode("utf-8"), **options)
    return W.EncodeBody(rows=list(source), **options)


def _archive_top(tar: tarfile.TarFile) -> str:
    """The one top directory every member of a checkpoint archive sits in."""
    tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
    if len(tops) != 1 or next(iter(tops)) in ("", ".", ".."):
        raise TwinkleServerError("the checkpoint archive is not one directory")
    return tops.pop()


def _future_error(err: W.FutureError | None, request_id: str) -> TwinkleError:
    err = err or W.FutureError(detail="request failed")
    if err.category == "user":
        if "not found" in err.detail:
            return TwinkleNotFoundError(err.detail, status=404, request_id=request_id)
        return TwinkleUserError(err.detail, status=400, request_id=request_id)
    return TwinkleServerError(err.detail, status=500, request_id=request_id)


def _stream_error(err: dict[str, Any]) -> TwinkleError:
    status = int(err.get("status") or 500)
    detail = str(err.get("detail") or "encoding failed")
    if status >= 500:
        return TwinkleServerError(detail, status=status)
    return TwinkleUserError(detail, status=status, field=err.get("field"))


def _split_uri(uri: str) -> tuple[str, str, str]:
    scheme, _, rest = uri.partition("://")
    parts = rest.split("/")
    if scheme not in ("twinkle", "tinker") or len(parts) != 3:
        raise ValueError(f"{uri!r} is not a checkpoint URI like twinkle://<run_id>/<kind>/<name>")
    return parts[0], parts[1], parts[2]

