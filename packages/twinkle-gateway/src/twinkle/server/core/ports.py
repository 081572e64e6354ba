"""Ports through which the central app reaches the Model and Sampler services.

The gateway never talks HTTP to them (a hop through the Serve proxy costs ~10 ms and re-encodes every tensor
as JSON). It calls the services' async methods with the msgspec structs of
``twinkle.common.wire``. ``ModelPort`` and ``SamplerPort`` are those APIs, one typed method each (forwarded to
the port's ``_call``); both ports below are both:

- ``LocalPort(service)`` calls a service object living in this process (tests, single-process runs);
- ``HandlePort(handle)`` calls a Ray Serve ``DeploymentHandle`` (``await handle.<method>.remote(...)``). The
  handle may also be given as a zero-argument factory, resolved on first use, so the app can be built
  before its peer deployments exist.

Both raise the services' own ``UserError``/``NotFoundError`` (Ray wraps remote exceptions; the wrapper is
removed here so the caller sees the service's error with its ``field`` and ``status``).
"""

from __future__ import annotations

import abc

import contextlib
import inspect
from typing import Any, AsyncIterator, Callable

from twinkle.common.binding import route_by_run
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepOutput,
    RunInfo,
    SampleOutput,
    SampleRequest,
    following_run,
    remote_call,
    remote_error,
)


class _Forwarding(abc.ABC):
    """Forwards each port method to ``_call(name, *args, **kwargs)``: ``LocalPort`` calls the service object,
    ``HandlePort`` the deployment."""

    @abc.abstractmethod
    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the service's method ``name``."""

    async def info(self) -> Any:
        return await self._call("info")

    async def health(self) -> dict:
        return await self._call("health")


class ModelPort(_Forwarding):
    """The async API of ``twinkle.model.service.ModelService`` (``info()`` answers its ``ModelInfo``). A call
    about a run goes through ``_run_call``, which a port to several replicas routes to the run's replica."""

    async def _run_call(self, name: str, run_id: str, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, run_id, *args, **kwargs)

    async def create_run(self, run_id: str, owner: str, lora: LoraConfig) -> RunInfo:
        return await self._run_call("create_run", run_id, owner, lora)

    async def forward_backward(self, run_id: str, owner: str, seq_id: int | None, inp: ForwardBackwardInput,
                               forward_only: bool = False) -> ForwardBackwardOutput:
        return await self._run_call("forward_backward", run_id, owner, seq_id, inp, forward_only=forward_only)

    async def optim_step(self, run_id: str, owner: str, seq_id: int | None, params: AdamParams) -> OptimStepOutput:
        return await self._run_call("optim_step", run_id, owner, seq_id, params)

    async def save_state(self, run_id: str, owner: str, seq_id: int | None, path: str,
                         include_optimizer: bool = True) -> CheckpointInfo:
        return await self._run_call("save_state", run_id, owner, seq_id, path, include_optimizer=include_optimizer)

    async def save_sampler_weights(self, run_id: str, owner: str, seq_id: int | None, path: str) -> CheckpointInfo:
        return await self._run_call("save_sampler_weights", run_id, owner, seq_id, path)

    async def load_state(self, run_id: str, owner: str, seq_id: int | None, path: str, include_optimizer: bool,
                         create: bool = False) -> RunInfo:
        return await self._run_call("load_state", run_id, owner, seq_id, path, include_optimizer, create=create)

    async def delete_run(self, run_id: str, owner: str) -> Any:
        return await self._run_call("delete_run", run_id, owner)

    async def run_info(self, run_id: str, owner: str) -> RunInfo:
        return await self._run_call("run_info", run_id, owner)

    async def list_runs(self, owner: str) -> Any:
        return await self._call("list_runs", owner)

    async def skip(self, run_id: str, owner: str, seq_id: int, reason: str) -> None:
        return await self._run_call("skip", run_id, owner, seq_id, reason)

    async def outcome(self, run_id: str, owner: str, seq_id: int) -> Any:
        return await self._run_call("outcome", run_id, owner, seq_id)

    async def settle(self, run_id: str, owner: str, finished: list[tuple[int, str]]) -> list[int]:
        return await self._run_call("settle", run_id, owner, finished)


class SamplerPort(_Forwarding):
    """The async API of ``twinkle.sampler.service.SamplerService``."""

    async def sample(self, req: SampleRequest) -> SampleOutput:
        return await self._call("sample", req)

    def sample_stream(self, req: SampleRequest) -> AsyncIterator[Any]:
        """``(sample index, token, logprob)`` as tokens are sampled (where the service can tell them), then the
        ``SampleOutput``; closing it early cancels the request."""
        return self._stream("sample_stream", req)

    def _stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """Each concrete port (``LocalPort``, ``HandlePort``) streams its own way; this class only forwards."""
        raise NotImplementedError(f"{type(self).__name__} cannot stream {name}")


class _Port(ModelPort, SamplerPort):
    """A port to either kind of service: the peer decides which methods it answers."""


class LocalPort(_Port):
    """A service object in this process. Sync methods (if any) are run as-is; async ones awaited."""

    def __init__(self, service: Any) -> None:
        self.service = service

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self.service, name)(*args, **kwargs)
        if inspect.isawaitable(out):
            out = await out
        return out

    async def _stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        method = getattr(self.service, name, None)
        if method is None:  # a service that cannot tell tokens early: its whole answer, once
            yield await self._call(name.removesuffix("_stream"), *args)
            return
        async for item in method(*args):
            yield item

    def __repr__(self) -> str:
        return f"LocalPort({type(self.service).__name__})"


class HandlePort(_Port):
    """A Ray Serve deployment, through a ``DeploymentHandle`` or a factory returning one."""

    def __init__(self, handle: Any) -> None:
        if _is_handle(handle):
            self._handle, self._factory = handle, None
        elif callable(handle):
            self._handle, self._factory = None, handle
        else:
            raise TypeError(f"HandlePort needs a DeploymentHandle or a factory of one, got {type(handle).__name__}")

    @property
    def handle(self) -> Any:
        if self._handle is None:
            assert self._factory is not None
            self._handle = self._factory()
        return self._handle

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await remote_call(getattr(self.handle, name).remote(*args, **kwargs))

    async def _run_call(self, name: str, run_id: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(route_by_run(self.handle, run_id), name)
        return await following_run(lambda: method.remote(run_id, *args, **kwargs))

    async def _stream(self, name: str, *args: Any) -> AsyncIterator[Any]:
        """A streaming handle call (the deployment's method is an async generator); closing this cancels it."""
        responses = getattr(self.handle.options(stream=True), name).remote(*args)
        try:
            while True:
                try:
                    item = await responses.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as e:  # noqa: BLE001 - the remote side's own exception, as remote_call gives it
                    raise remote_error(e) from None
                yield item
        finally:
            with contextlib.suppress(Exception):  # done already, or the replica is gone
                responses.cancel()


def _is_handle(obj: Any) -> bool:
    try:
        from ray.serve.handle import DeploymentHandle
    except ImportError:  # pragma: no cover - ray is a dependency of the gateway
        return False
    return isinstance(obj, DeploymentHandle)


PortFactory = Callable[[], Any]
