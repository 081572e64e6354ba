"""``ControlPlane``: the one control plane under both protocols.

It owns every piece of central state — the durable ``Store``, the ``Futures``, the ``KeyRing``, the checkpoint
layout, the ports to the served models, background tasks and the sweeper — behind one ``start()``/``close()``
that each protocol app's lifespan calls. Its operations take the caller's principal id (``owner``) and return
store records; the protocol surfaces (``tinker/``, ``native/``) turn wire bodies into calls here and records
into wire bodies, and keep only their own ids and rules.

One behaviour for the cases both protocols meet:

- an unknown run, session, checkpoint or request — or another principal's — is **404**, naming the field;
- using a session its client finished is **410** (the Tinker SDK stops heartbeating on 410);
- a numbered request (``seq_id``) the server refuses before it runs is **400**, and its ``seq_id`` is still
  handed to the Model service as refused (``release_seq_id``): the service runs a run's requests strictly
  in order and would otherwise hold every later one until its gap timeout. A repeat of an accepted
  ``seq_id`` gets the first request's future, whatever it asks.
- a numbered ``forward``/``forward_backward``/``optim_step`` left running when this app's process died is
  followed to its outcome by the next process (``ModelPort.outcome``): never failed while it may still
  complete, never applied twice; one that never reached the Model service fails as "not applied".
- a numbered request whose model replica dies under it is sent again once a new replica answers (for up to
  ``replica_wait_s``): the service restores the run from its saved state and never applies a ``seq_id``
  twice. When the restored run asks which later requests already ran (``ResyncNeeded``), the plane answers
  with those it saw finish (``settle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

import msgspec

from twinkle.common.http import release_seq_id
from twinkle.common.limits import check_page, check_seq_id, check_ttl
from twinkle.common.outcomes import Outcome
from twinkle.common.wire import NotFoundError, ResyncNeeded, ServiceUnavailable, UserError

from ..auth import ADMIN_KEYS_ENV, KeyRing, check_auth_settings, keys_from_env
from .checkpoints import CheckpointLayout, CheckpointRef, dir_size, pack_checkpoint, safe_file_name, validate_run_id
from .futures import Busy, Futures, Work
from .ports import ModelPort, SamplerPort
from .settings import CentralSettings
from .state import CheckpointRecord, FutureRecord, Page, RunRecord, SamplerRecord, SessionRecord, Store
from .usage import RunHistory, UsageLedger, outcome_of

log = logging.getLogger("twinkle.server")

_INFO_TIMEOUT_S = 10.0
REFUSED = "the server refused this request before it ran (see the answer to its submission)"
RESUMABLE_KINDS = frozenset({"forward_backward", "forward", "optim_step"})
"""Numbered requests whose future's value is the Model service's answer itself (``ModelPort.outcome``)."""

Prepare = Callable[[ModelPort], Awaitable[tuple[Work, dict[str, Any] | None]]]
"""Checks a numbered request against its run and returns the work to run plus the future's ``meta``."""


class Gone(UserError):
    """The resource existed but is finished (HTTP 410)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, status=410)


MAX_ARCHIVES_PER_KEY = 2
MAX_ARCHIVES = 8  # checkpoint archives on the server's disk at once, all keys together


def iso(t: float | None) -> str | None:
    """A stored time as ISO 8601 UTC (times are bounded when stored, so this cannot overflow)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def not_expired(c: CheckpointRecord, now: float | None = None) -> bool:
    return c.expires_at is None or c.expires_at > (time.time() if now is None else now)


class ServedModel(msgspec.Struct, kw_only=True):
    """What the central app reads of a model or sampler service's ``info()`` (one typed view, whatever form
    the service answers in: a struct in-process, plain data through a Serve handle)."""

    model_name: str | None = None
    model_id: str | None = None
    backend: str | None = None
    max_context_length: int | None = None
    vocab_size: int | None = None
    tokenizer_id: str | None = None
    arch: str | None = None


class ControlPlane:
    """Central state and the operations both protocols share. ``start()`` before use; ``close()`` at the end."""

    def __init__(self, settings: CentralSettings, *, models: dict[str, ModelPort],
                 samplers: dict[str, SamplerPort]) -> None:
        allowed = set(settings.supported_models) if settings.supported_models is not None else None
        self.settings = settings
        self.models = {k: v for k, v in models.items() if allowed is None or k in allowed}
        self.samplers = {k: v for k, v in samplers.items() if allowed is None or k in allowed}
        self.layout = CheckpointLayout(settings.checkpoint_dir)
        self.admin_keys = list(dict.fromkeys([*settings.admin_keys, *keys_from_env(ADMIN_KEYS_ENV)]))
        self.keys = check_auth_settings(settings.host, [*settings.api_keys, *self.admin_keys])
        self._store: Store | None = None
        self._futures: Futures | None = None
        self.keyring: KeyRing | None = None
        self._model_info: dict[str, Any] = {}
        self._housekeeping: list[Callable[[float], Awaitable[dict[str, int]]]] = []
        self._archives: dict[str, int] = {}  # owner -> checkpoint archives on disk for its downloads
        self._background: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._started = asyncio.Event()
        # told of every request's outcome, served here or reported by a component: usage, histories, metrics
        self.observers: list[Callable[[Outcome], None]] = [UsageLedger(lambda: self.store).finished,
                                                           RunHistory(lambda: self.store).finished]

    # =============================================================================== lifecycle

    async def start(self) -> None:
        self._store = await Store.open(self.settings.state_path)
        self._futures = Futures(self._store, long_poll_s=self.settings.long_poll_timeout_s,
                                max_pending_per_owner=self.settings.max_pending_per_key,
                                max_polls_per_owner=self.settings.max_polls_per_key,
                                observers=[lambda record, value: self.observe(outcome_of(record, value))])
        await self._futures.recover(self._resumable)
        self.keyring = await KeyRing.load(self._store, self.keys, host=self.settings.host, admin_keys=self.admin_keys)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="twinkle sweeper")
        self._started.set()

    async def close(self) -> None:
        self._started.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        if self._futures is not None:
            await self._futures.close()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._store is not None:
            await self._store.close()
        self.keyring = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The protocol app's lifespan: the plane runs while the app serves, and its key ring authenticates."""
        await self.start()
        app.state.keyring = self.keyring
        try:
            yield
        finally:
            app.state.keyring = None
            await self.close()

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until ``start()`` ran (Serve-handle calls may arrive while the app is starting)."""
        if not self._started.is_set():
            try:
                await asyncio.wait_for(self._started.wait(), timeout)
            except asyncio.TimeoutError:
                raise UserError("the server is still starting; retry in a moment", status=503) from None

    @property
    def started(self) -> bool:
        return self._started.is_set()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise UserError("the server is still starting; retry in a moment", status=503)
        return self._store

    @property
    def futures(self) -> Futures:
        if self._futures is None:
            raise UserError("the server is still starting; retry in a moment", status=503)
        return self._futures

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        """Run ``coro`` in the background; a failure is logged, never lost."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    # =============================================================================== served models

    def model_port(self, base_model: str, *, field: str = "base_model") -> ModelPort:
        port = self.models.get(base_model)
        if port is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise UserError(f"unknown base_model {base_model!r}; this server trains: {served}", field=field)
        return port

    def sampler_port(self, base_model: str, *, field: str = "base_model") -> SamplerPort:
        port = self.samplers.get(base_model)
        if port is None:
            served = ", ".join(sorted(self.samplers)) or "none"
            raise UserError(f"no sampler serves base model {base_model!r}; this server samples: {served}",
                            field=field)
        return port

    async def served_name(self, name: str) -> str:
        """The served name of a base model, which a client may also call by its ``tokenizer_id`` (what
        ``get_info`` reports: a hub id, or the model's directory on this machine). tinker-cookbook uses one string
        for both the base model and ``AutoTokenizer.from_pretrained``, so on the server's machine it can name the
        built-in or a local model by its directory. Unknown names come back unchanged (and are refused where
        they are used)."""
        if name in self.models or name in self.samplers or not name:
            return name
        for served in self.served_names():
            info = await self.model_info(served)
            alias = info.tokenizer_id if info is not None else None
            if alias and (alias == name or (os.path.isabs(name) and os.path.isabs(alias)
                                            and os.path.realpath(alias) == os.path.realpath(name))):
                return served
        return name

    def served_names(self) -> list[str]:
        return sorted(set(self.models) | set(self.samplers))

    async def model_info(self, name: str) -> ServedModel | None:
        """``info()`` of the service serving ``name``, cached once read; None while it cannot answer."""
        if name in self._model_info:
            return self._model_info[name]
        port = self.models.get(name) or self.samplers.get(name)
        if port is None:
            return None
        try:
            raw = await asyncio.wait_for(port.info(), _INFO_TIMEOUT_S)
            info = msgspec.convert(msgspec.to_builtins(raw), ServedModel, strict=False)
        except Exception as e:  # noqa: BLE001 - capabilities degrade gracefully while a peer starts
            log.warning("could not read info of model %s: %s", name, e)
            return None
        self._model_info[name] = info
        return info

    async def health(self, timeout_s: float = 5.0) -> list[str]:
        """What is not serving: the plane itself while it starts, and every model or sampler service whose
        ``health()`` fails or does not answer within ``timeout_s``. Empty when all is well."""
        if not self.started:
            return ["server (starting)"]
        ports = [(f"model {n}", p) for n, p in self.models.items()] + \
                [(f"sampler {n}", p) for n, p in self.samplers.items()]

        async def down(name: str, port: Any) -> str | None:
            try:
                await asyncio.wait_for(port.health(), timeout_s)
                return None
            except asyncio.TimeoutError:
                log.warning("health check of %s failed: no answer within %g s", name, timeout_s)
                return name
            except Exception:  # noqa: BLE001 - any failure means "not serving"; the reason goes to the log
                log.warning("health check of %s failed", name, exc_info=True)
                return name

        return [n for n in await asyncio.gather(*(down(n, p) for n, p in ports)) if n]

    # =============================================================================== sessions

    async def open_session(self, session: SessionRecord) -> SessionRecord:
        limit = self.settings.max_sessions_per_key
        if await self.store.count_open_sessions(session.owner) >= limit:
            raise Busy(f"this API key has {limit} open sessions (server setting max_sessions_per_key); finish "
                       "some (close your clients) or wait until idle ones time out",
                       retry_after_s=self.settings.session_timeout_s)
        await self.store.create_session(session)
        return session

    async def session(self, owner: str, session_id: str, *, live: bool = False) -> SessionRecord:
        """The caller's session; with ``live``, one that may still start work (not finished by its client)."""
        s = await self.store.get_session(session_id, owner)
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if live and s.finished is not None and s.finish_reason != "expired":
            raise Gone(f"session {session_id!r} is finished ({s.finish_reason}); start a new client",
                       field="session_id")
        return s

    async def heartbeat(self, owner: str, session_id: str) -> SessionRecord:
        s = await self.store.heartbeat(session_id, owner, time.time())
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if s.finished is not None:
            raise Gone(f"session {session_id!r} is finished ({s.finish_reason})", field="session_id")
        return s

    async def finish_session(self, owner: str, session_id: str, reason: str = "success") -> None:
        if not await self.store.finish_session(session_id, owner, reason, time.time()):
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        self.spawn(self._drop_ephemeral(session_ids=[session_id]), f"cleanup {session_id}")

    async def list_sessions(self, owner: str, limit: int, offset: int) -> Page:
        return await self.store.list_sessions(owner, limit, offset)

    # =============================================================================== runs

    async def run(self, owner: str, run_id: str, *, field: str = "model_id") -> RunRecord:
        validate_run_id(run_id, field=field)
        run = await self.store.get_run(run_id)
        if run is None or run.owner != owner:
            raise NotFoundError(f"training run {run_id!r} not found", field=field)
        return run

    async def record_run(self, run: RunRecord) -> RunRecord:
        await self.store.create_run(run)
        self.audit(run.owner, "training_run_create", actor=run.owner, model_id=run.id, base_model=run.base_model)
        return run

    def observe(self, outcome: Outcome) -> None:
        """Tell every observer of a finished request (an observer never changes an outcome)."""
        for observe in self.observers:
            try:
                observe(outcome)
            except Exception:  # noqa: BLE001 - accounting must not fail the request it accounts for
                log.exception("outcome observer failed on a %s of %s", outcome.kind, outcome.owner)

    def audit(self, owner: str, event: str, **details: Any) -> None:
        """Record who did what to ``owner``'s resource (``details`` holds ``actor`` and what it was about)."""
        self.store.add_audit_background(time.time(), owner, event, details)

    def audit_checkpoint(self, c: CheckpointRecord, event: str, actor: str, **details: Any) -> None:
        self.audit(c.owner, event, actor=actor, model_id=c.run_id, tinker_path=f"tinker://{c.run_id}/{c.kind}/{c.name}",
                   **details)

    async def checkpoint_archive(self, c: CheckpointRecord, actor: str, *, purpose: str
                                 ) -> tuple[str, str, Callable[[], None]]:
        """``c`` packed for download: the tar file's path, a file name for it, and the function that removes it
        once sent. Each archive is a temporary copy on the server's disk, so a key has at most
        ``MAX_ARCHIVES_PER_KEY`` at once and the server ``MAX_ARCHIVES`` (429 beyond)."""
        if self._archives.get(c.owner, 0) >= MAX_ARCHIVES_PER_KEY:
            raise Busy(f"at most {MAX_ARCHIVES_PER_KEY} checkpoint downloads at once per key; retry when one ends")
        if sum(self._archives.values()) >= MAX_ARCHIVES:
            raise Busy("the server is preparing too many checkpoint downloads; retry in a moment", retry_after_s=5.0)
        self._archives[c.owner] = self._archives.get(c.owner, 0) + 1
        done = False

        def release(path: str | None = None) -> None:
            nonlocal done
            if not done:
                done = True
                self._archives[c.owner] -= 1
                if not self._archives[c.owner]:
                    del self._archives[c.owner]
            if path is not None:
                with contextlib.suppress(OSError):
                    os.remove(path)

        top = f"{c.run_id}-{c.kind}-{c.name}"
        try:
            path = await asyncio.to_thread(pack_checkpoint, c.path, top)
        except BaseException:
            release()
            raise
        self.audit_checkpoint(c, "checkpoint_read", actor, purpose=purpose)
        return path, f"{safe_file_name(top)}.tar", lambda: release(path)

    async def list_runs(self, owner: str, limit: int, offset: int
                        ) -> tuple[Page, dict[tuple[str, str], CheckpointRecord]]:
        """A page of the caller's runs and the newest checkpoint of each kind of each."""
        page = await self.store.list_runs(owner, limit, offset)
        return page, await self.store.latest_checkpoints([r.id for r in page.items])

    async def run_history(self, owner: str, run_id: str, after_step: int, limit: int | None) -> list[dict[str, Any]]:
        """The caller's run's steps after ``after_step`` (``core.usage.RunHistory``), at most a page."""
        run = await self.run(owner, run_id, field="training_run_id")
        limit, _ = self.page(limit, 0, default=self.settings.limits.max_page_size)
        rows = await self.store.run_steps(run.id, after_step, limit)
        keys = ("step", "time", "loss", "tokens", "learning_rate", "grad_norm")
        return [dict(zip(keys, row)) for row in rows]

    async def latest_checkpoints(self, run_id: str) -> dict[tuple[str, str], CheckpointRecord]:
        return await self.store.latest_checkpoints([run_id])

    async def delete_run(self, owner: str, run: RunRecord, *, checkpoints: bool = False) -> None:
        """Release the run's adapter and forget the run; its checkpoints stay unless ``checkpoints``."""
        port = self.models.get(run.base_model)
        if port is not None:
            with contextlib.suppress(NotFoundError):  # the adapter is already gone (e.g. after a restart)
                await port.delete_run(run.id, owner)
        if checkpoints:
            for c in await self.store.list_checkpoints(run.id):
                await self.delete_checkpoint(c, actor=owner)
        await self.store.delete_run(run.id)

    async def usage(self) -> dict[str, dict[str, int]]:
        """Every principal's runs, open sessions, checkpoints (count, bytes) and requests in flight (admins)."""
        in_flight = self.futures.pending_by_owner()
        usage = await self.store.usage(owners=in_flight)
        for owner, row in usage.items():
            row["requests_in_flight"] = in_flight.get(owner, 0)
        return usage

    # =============================================================================== submissions

    async def submit(self, owner: str, kind: str, work: Work, *, dedupe: tuple[str, int] | None = None,
                     meta: dict[str, Any] | None = None, touch_run: str | None = None) -> FutureRecord:
        """Record a request and start ``work``; a repeat of ``dedupe`` gets the first request's record."""
        model_id, seq_id = dedupe if dedupe is not None else (None, None)
        return await self.futures.submit(owner=owner, kind=kind, work=work, model_id=model_id, seq_id=seq_id,
                                         meta=meta, touch_run=touch_run)

    async def submit_numbered(self, owner: str, run: RunRecord, seq_id: int | None, kind: str,
                              prepare: Prepare) -> FutureRecord:
        """Submit request ``seq_id`` of ``run``: ``prepare`` checks it and returns its work.

        The check runs first (the common case costs no lookup); only when it refuses is the first request
        of that ``seq_id`` looked up — a retried save must not fail on the checkpoint its first try wrote.
        """
        check_seq_id(seq_id, limits=self.settings.limits)
        port = self.model_port(run.base_model)
        try:
            work, meta = await prepare(port)
        except UserError:
            if seq_id is None:
                raise
            first = await self.futures.find(run.id, seq_id)
            if first is not None and first.owner == owner:
                return first
            self.spawn(release_seq_id(port, run.id, owner, seq_id, REFUSED), f"refuse {run.id}#{seq_id}")
            raise
        if seq_id is not None:
            work = self._through_replica_loss(owner, run, seq_id, port, work)
        meta = {**(meta or {}), "session_id": run.session_id, "base_model": run.base_model}  # usage attribution
        return await self.futures.submit(owner=owner, kind=kind, work=work, model_id=run.id, seq_id=seq_id,
                                         meta=meta, touch_run=run.id)

    def _resumable(self, record: FutureRecord) -> Work | None:
        """The work that follows a request a previous process of this app left running to its outcome at
        the Model service: numbered requests whose answer is the service's own (others are failed)."""
        if record.kind not in RESUMABLE_KINDS or record.model_id is None or record.seq_id is None:
            return None
        seq_id = record.seq_id

        async def outcome() -> Any:
            run = await self.run(record.owner, record.model_id)
            port = self.model_port(run.base_model)
            ask = lambda: port.outcome(run.id, record.owner, seq_id)  # noqa: E731
            return await self._through_replica_loss(record.owner, run, seq_id, port, ask)()

        return outcome

    def _through_replica_loss(self, owner: str, run: RunRecord, seq_id: int, port: ModelPort, work: Work) -> Work:
        """``work`` sent again while its model replica is being replaced (safe: the service keys it by
        ``seq_id``), with the restored run told which of its later requests already finished elsewhere."""

        async def resilient() -> Any:
            deadline = time.monotonic() + self.settings.replica_wait_s
            delay, settled = 0.5, False
            while True:
                try:
                    return await work()
                except ResyncNeeded as e:
                    if settled:
                        raise UserError("the model service could not resume this run in order; retry the "
                                        "request", field="seq_id", status=409) from None
                    settled = True
                    await port.settle(run.id, owner, await self.futures.finished_seqs(run.id, e.expected))
                except ServiceUnavailable:
                    if time.monotonic() + delay > deadline:
                        raise ServiceUnavailable(
                            f"the model replica serving this run was lost and no new one answered within "
                            f"{self.settings.replica_wait_s:g} s; the request may not have run (the run's step "
                            "tells)") from None
                    settled = False  # a newer replica restores the run again
                    log.warning("model replica lost under %s#%d; sending it again in %.1f s", run.id, seq_id, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 4.0)

        return resilient

    async def refuse_seq(self, owner: str, run_id: str, seq_id: int | None) -> None:
        """Release ``seq_id`` of a run whose request could not even be decoded (if the run is the caller's and
        the number was not used yet)."""
        if seq_id is None or seq_id < 0:
            return
        try:
            run = await self.run(owner, run_id)
            port = self.model_port(run.base_model)
        except UserError:
            return
        if await self.futures.find(run.id, seq_id) is None:
            self.spawn(release_seq_id(port, run.id, owner, seq_id, REFUSED), f"refuse {run.id}#{seq_id}")

    async def wait(self, owner: str, request_id: str, timeout: float | None = None) -> FutureRecord:
        """The request's record once finished, or still pending after ``timeout`` (the long-poll)."""
        record = await self.futures.wait(request_id, owner, timeout=timeout)
        if record is None:
            raise NotFoundError(f"request {request_id!r} not found (unknown, or its result has expired)",
                                field="request_id")
        return record

    # =============================================================================== checkpoints

    def page(self, limit: int | None, offset: int | None, *, default: int = 20) -> tuple[int, int]:
        """(limit, offset) of a list request, checked and capped."""
        return check_page(limit, offset, limits=self.settings.limits, default=default)

    def expiry(self, ttl_seconds: int | None, field: str = "ttl_seconds") -> float | None:
        """When a checkpoint with this TTL expires (None: never); bounded so it can always be rendered."""
        ttl = check_ttl(ttl_seconds, limits=self.settings.limits, field=field)
        return None if ttl is None else time.time() + ttl

    def checkpoint_path(self, owner: str, run: RunRecord, kind: str, name: str) -> str:
        return self.layout.path_for(owner, run.id, kind, name)

    async def check_checkpoint_quota(self, owner: str) -> None:
        """Refuse a save when the caller keeps as many checkpoints (or bytes) as allowed."""
        count, size = await self.store.checkpoint_usage(owner)
        settings = self.settings
        if count >= settings.max_checkpoints_per_key or size >= settings.max_checkpoint_bytes_per_key:
            raise UserError(f"this API key keeps {count} checkpoints ({size} bytes); the limits are "
                            f"{settings.max_checkpoints_per_key} checkpoints and "
                            f"{settings.max_checkpoint_bytes_per_key} bytes (server settings "
                            "max_checkpoints_per_key, max_checkpoint_bytes_per_key); delete some first",
                            field="path")

    async def existing_checkpoint(self, run: RunRecord, kind: str, name: str) -> CheckpointRecord | None:
        return await self.store.get_checkpoint(run.id, kind, name)

    async def record_checkpoint(self, owner: str, run: RunRecord, ref: CheckpointRef, path: str, info: Any,
                                expires: float | None, user_metadata: dict[str, str] | None = None
                                ) -> CheckpointRecord:
        """Record a checkpoint the Model service has written (after it was written, never before)."""
        size = getattr(info, "size_bytes", None)
        if size is None:
            size = await asyncio.to_thread(dir_size, path)
        record = CheckpointRecord(run_id=run.id, kind=ref.kind, name=ref.name, owner=owner, path=path,
                                  created=time.time(), size_bytes=size, expires_at=expires,
                                  user_metadata=user_metadata, base_model=run.base_model, lora=run.lora)
        await self.store.put_checkpoint(record)
        self.audit_checkpoint(record, "checkpoint_create", owner)
        return record

    async def visible_checkpoint(self, owner: str, ref: CheckpointRef, *, field: str,
                                 allow_public: bool = True) -> CheckpointRecord:
        """The checkpoint if ``owner`` may use it now (theirs, or published) and it has not expired; else 404
        (another principal's private checkpoint is reported exactly like a missing one)."""
        c = await self.store.get_checkpoint(ref.run_id, ref.kind, ref.name)
        if c is None or not (c.owner == owner or (allow_public and c.public)):
            raise NotFoundError(f"checkpoint {ref.uri} not found", field=field)
        if not not_expired(c):
            raise NotFoundError(f"checkpoint {ref.uri} has expired", field=field)
        return c

    async def own_checkpoint(self, owner: str, run_id: str, kind: str, name: str, *, field: str,
                             uri: str) -> CheckpointRecord:
        validate_run_id(run_id, field=field)
        c = await self.store.get_checkpoint(run_id, kind, name)
        if c is None or c.owner != owner:
            raise NotFoundError(f"checkpoint {uri} not found", field=field)
        return c

    async def base_model_of(self, c: CheckpointRecord, *, field: str = "path") -> str:
        return c.base_model or (await self._run_of(c, field=field)).base_model

    async def lora_of(self, c: CheckpointRecord, *, field: str = "path") -> dict[str, Any]:
        return c.lora or (await self._run_of(c, field=field)).lora

    async def _run_of(self, c: CheckpointRecord, *, field: str) -> RunRecord:
        run = await self.store.get_run(c.run_id)
        if run is None:
            raise NotFoundError(f"the training run {c.run_id!r} of this checkpoint no longer exists", field=field)
        return run

    async def run_checkpoints(self, run_id: str, kinds: tuple[str, ...] = ("weights", "sampler_weights")
                              ) -> list[CheckpointRecord]:
        """A run's unexpired checkpoints of ``kinds``, oldest first."""
        now = time.time()
        return [c for c in await self.store.list_checkpoints(run_id) if c.kind in kinds and not_expired(c, now)]

    async def user_checkpoints(self, owner: str, limit: int, offset: int) -> Page:
        return await self.store.list_user_checkpoints(owner, limit, offset)

    async def delete_checkpoint(self, c: CheckpointRecord, *, actor: str | None = None) -> None:
        """Delete a checkpoint: by its owner, or (``actor`` None) by the server when it expired."""
        await self.store.delete_checkpoint(c.run_id, c.kind, c.name)
        await asyncio.to_thread(self.layout.remove, c.path)
        self.audit_checkpoint(c, "checkpoint_delete", actor or "server", reason="deleted" if actor else "expired")

    async def update_checkpoint(self, c: CheckpointRecord, **changes: Any) -> None:
        await self.store.update_checkpoint(c.run_id, c.kind, c.name, **changes)
        if "public" in changes:
            self.audit_checkpoint(c, "checkpoint_publish" if changes["public"] else "checkpoint_unpublish", c.owner)
        if "expires_at" in changes:
            self.audit_checkpoint(c, "checkpoint_ttl_set", c.owner, expires_at=changes["expires_at"])

    # =============================================================================== sampling sessions

    async def sampler(self, owner: str, sampler_id: str) -> SamplerRecord:
        s = await self.store.get_sampler(sampler_id, owner)
        if s is None:
            raise NotFoundError(f"sampling session {sampler_id!r} not found", field="sampling_session_id")
        return s

    async def drop_sampler_weights(self, s: SamplerRecord) -> None:
        if s.adapter_path:
            await self.store.drop_sampler_weights(s.id)
            await asyncio.to_thread(self.layout.remove, s.adapter_path)

    async def trim_ephemeral(self, run_id: str, keep: int) -> None:
        """Keep the newest ``keep`` ephemeral sampler weights of a run (an RL loop saves one per step), and
        always its newest inflight weights, which every inflight sampling session of the run samples with."""
        samplers = [s for s in await self.store.ephemeral_samplers(run_id=run_id) if s.adapter_path]
        newest_inflight = next((s for s in samplers if s.inflight), None)
        for s in samplers[keep:]:
            if s is not newest_inflight:
                await self.drop_sampler_weights(s)

    async def inflight_weights(self, run_id: str) -> str | None:
        """The adapter directory of a run's newest inflight weights (None once they are cleaned up)."""
        return next((s.adapter_path for s in await self.store.ephemeral_samplers(run_id=run_id)
                     if s.inflight and s.adapter_path), None)

    async def _drop_ephemeral(self, *, session_ids: list[str]) -> None:
        for s in await self.store.ephemeral_samplers(session_ids=session_ids):
            await self.drop_sampler_weights(s)

    # =============================================================================== housekeeping

    def add_housekeeping(self, task: Callable[[float], Awaitable[dict[str, int]]]) -> None:
        """Run ``task(now)`` in every sweep too (a protocol's own cleanup)."""
        self._housekeeping.append(task)

    async def sweep(self) -> dict[str, int]:
        """One cleanup pass: expired checkpoints, old results, silent sessions, and each protocol's own."""
        now = time.time()
        expired = await self.store.expired_checkpoints(now)
        for c in expired:
            await self.delete_checkpoint(c)
        settings = self.settings
        pruned = await self.store.prune_futures(now - settings.future_ttl_s, now - settings.fetched_result_ttl_s)
        closed = await self.store.expire_sessions(now - settings.session_timeout_s, now)
        accounting = await self.store.prune_accounting(now - settings.audit_retention_s, now - settings.usage_retention_s)
        counts = {"checkpoints": len(expired), "futures": pruned, "sessions": len(closed), "accounting": accounting}
        for task in self._housekeeping:
            counts.update(await task(now))
        return counts

    async def _sweep_forever(self) -> None:
        while True:
            try:
                counts = await self.sweep()
                if any(counts.values()):
                    log.info("cleanup: %s", counts)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the sweeper must survive a bad pass
                log.exception("cleanup pass failed")
            await asyncio.sleep(self.settings.sweep_interval_s)
