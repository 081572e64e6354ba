"""``NativeAuthority``: what the component apps (model, sampler, processor) ask the central server through a
Serve handle (``twinkle.common.authority``) — authenticate a key, start a save or a load of a run as a durable
future, resolve a checkpoint a caller may sample from. Same keys, store and rules as the HTTP routes: it is a
thin surface over the same ``ControlPlane``.

Training requests themselves never pass through here: the client sends them to the Model service's own app,
which reports what each used afterwards (``report``). A save or load is a numbered request of its run
(``seq_id``), so it keeps its place in the run's order.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import msgspec
from litestar.exceptions import NotAuthorizedException

from twinkle.common.native import SAVE_KINDS, FutureRef, LoadRequest, ResolvedCheckpoint, SaveRequest
from twinkle.common.outcomes import Outcome
from twinkle.common.wire import NotFoundError, UserError

from ..core import ControlPlane
from ..core.checkpoints import CheckpointRef, validate_name
from ..core.ports import ModelPort
from ..core.state import FutureRecord, RunRecord
from .convert import SCHEME, checkpoint_out, resolve_uri


log = logging.getLogger("twinkle.server")

_MAX_RUNS_REMEMBERED = 100_000
_NOT_OURS = "\0not-ours"  # a run id's session when the run is not its reporter's owner's


class NativeAuthority:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._reported: collections.OrderedDict[str, int] = collections.OrderedDict()  # run -> last seq_id told

    async def authenticate(self, api_key: str | None) -> str:
        """The principal id of ``api_key`` (``auth.KeyRing``); an unknown key is a 401."""
        await self.plane.ready()
        assert self.plane.keyring is not None
        try:
            return self.plane.keyring.authenticate(api_key).id
        except NotAuthorizedException as e:
            raise UserError(str(e.detail), status=401) from None

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: SaveRequest) -> FutureRef:
        """Start a save of run ``run_id`` (asked by the app of ``base_model``) as a future."""
        run = await self._run_of_app(owner, base_model, run_id)
        kind = SAVE_KINDS[req.kind]

        async def prepare(port: ModelPort):
            ref = CheckpointRef(run_id=run.id, kind=kind, name=validate_name(req.name, field="name"), scheme=SCHEME)
            expires = self.plane.expiry(req.ttl_seconds)
            await self.plane.check_checkpoint_quota(owner)
            path = self.plane.checkpoint_path(owner, run, kind, ref.name)
            if not req.overwrite and await self.plane.existing_checkpoint(run, kind, ref.name) is not None:
                raise UserError(f"checkpoint {ref.uri} already exists; pass overwrite=True or choose another name",
                                field="name", status=409)

            async def work() -> Any:
                if kind == "weights":
                    info = await port.save_state(run.id, owner, req.seq_id, path, include_optimizer=req.optimizer)
                else:
                    info = await port.save_sampler_weights(run.id, owner, req.seq_id, path)
                _expect(info, "size_bytes", run.id, req.seq_id)
                return checkpoint_out(await self.plane.record_checkpoint(owner, run, ref, path, info, expires))

            return work, {"uri": ref.uri}

        return _ref(await self.plane.submit_numbered(owner, run, req.seq_id, "save", prepare), run)

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: LoadRequest) -> FutureRef:
        """Start a load of a state checkpoint into run ``run_id`` as a future."""
        run = await self._run_of_app(owner, base_model, run_id)

        async def prepare(port: ModelPort):
            ckpt = await resolve_uri(self.plane, owner, req.uri, field="uri", kinds=("weights",))
            ckpt_base = await self.plane.base_model_of(ckpt, field="uri")
            if ckpt_base != run.base_model:
                raise UserError(f"{req.uri} was trained on {ckpt_base!r}; run {run.id!r} trains {run.base_model!r}",
                                field="uri")

            async def work() -> Any:
                info = await port.load_state(run.id, owner, req.seq_id, ckpt.path, req.optimizer, create=False)
                _expect(info, "lora", run.id, req.seq_id)
                return {"run_id": run.id, "uri": req.uri, "step": getattr(info, "step", None)}

            return work, {"uri": req.uri}

        return _ref(await self.plane.submit_numbered(owner, run, req.seq_id, "load", prepare), run)

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> ResolvedCheckpoint:
        """A checkpoint ``owner`` may sample from (theirs, or published) with the sampler of ``base_model``."""
        await self.plane.ready()
        ckpt = await resolve_uri(self.plane, owner, uri, field="model_uri")
        ckpt_base = await self.plane.base_model_of(ckpt, field="model_uri")
        if ckpt_base != base_model:
            raise UserError(f"{uri} was trained on {ckpt_base!r}; this sampler serves {base_model!r}",
                            field="model_uri")
        return ResolvedCheckpoint(uri=uri, run_id=ckpt.run_id, kind=ckpt.kind, name=ckpt.name, path=ckpt.path,
                                  base_model=ckpt_base)

    async def report(self, outcomes: list[Outcome]) -> None:
        """Account what the component apps served: each run's session is filled in here, and a report about a
        run its owner does not have is dropped (a component only reports requests the central server
        authenticated, so that is a run deleted meanwhile)."""
        await self.plane.ready()
        sessions: dict[tuple[str, str], str | None] = {}  # (run, owner) -> the run's session
        for o in outcomes:
            o = msgspec.convert(o, Outcome, from_attributes=True)  # a plain form through a Serve handle
            if o.run_id is not None:
                key = (o.run_id, o.owner)
                if key not in sessions:
                    run = await self.plane.store.get_run(o.run_id)
                    sessions[key] = run.session_id if run is not None and run.owner == o.owner else _NOT_OURS
                if sessions[key] == _NOT_OURS:  # deleted meanwhile, or (a bug) not its owner's
                    log.debug("dropped the report of a %s of run %r: no such run of its owner", o.kind, o.run_id)
                    continue
                if o.seq_id is not None:
                    if o.seq_id <= self._reported.get(o.run_id, 0):
                        continue  # a retried request, answered again from its first execution
                    self._reported[o.run_id] = o.seq_id
                    self._reported.move_to_end(o.run_id)
                    if len(self._reported) > _MAX_RUNS_REMEMBERED:
                        self._reported.popitem(last=False)
                o = msgspec.structs.replace(o, session_id=sessions[key])
            self.plane.observe(o)

    async def _run_of_app(self, owner: str, base_model: str, run_id: str) -> RunRecord:
        await self.plane.ready()
        run = await self.plane.run(owner, run_id, field="run_id")
        if run.base_model != base_model:  # asked at another model's app: that app has no such run
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return run


def _ref(record: FutureRecord, run: RunRecord) -> FutureRef:
    return FutureRef(request_id=record.request_id, kind=record.kind, run_id=run.id, uri=(record.meta or {}).get("uri"))


def _expect(out: Any, attribute: str, run_id: str, seq_id: int | None) -> None:
    """The Model service answers a repeated ``seq_id`` with its first request's result; if that was another
    operation (two clients numbering one run), fail instead of recording a checkpoint that was not written."""
    if not hasattr(out, attribute):
        raise UserError(f"seq_id {seq_id} of run {run_id!r} was already used by another kind of request; continue "
                        "from the run's next_seq_id", field="seq_id", status=409)
