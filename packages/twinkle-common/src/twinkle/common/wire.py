"""Typed messages that cross process boundaries inside a Twinkle deployment.

Services call each other through Ray Serve handles with these msgspec structs (pickled by Ray), and the
native HTTP routes encode the same structs as JSON. Protocol front-ends (Tinker, Twinkle) translate their
own wire formats into these; engines never see HTTP.

Conventions (the Tinker ones, so both protocols share one engine):
- a ``Datum``'s ``model_input`` position *i* predicts ``loss_fn_inputs["target_tokens"][i]``;
  every per-token loss input has the same length as ``model_input``;
- every metric key is ``name:reduction`` (``loss:sum``), reductions ``sum|mean|min|max``.
"""

from __future__ import annotations

import asyncio
import time

from typing import Any, Literal

import msgspec

DType = Literal["int64", "float32"]


class TensorData(msgspec.Struct, frozen=True):
    """A dense tensor: row-major flattened ``data`` plus ``shape`` (1-D when ``shape`` is None)."""

    data: list[int | float]
    dtype: DType = "float32"
    shape: list[int] | None = None

    def resolved_shape(self) -> list[int]:
        return list(self.shape) if self.shape is not None else [len(self.data)]


class Datum(msgspec.Struct, frozen=True):
    model_input: list[int]
    loss_fn_inputs: dict[str, TensorData] = {}


class LoraConfig(msgspec.Struct, frozen=True):
    """LoRA settings of one training run. ``alpha`` defaults to 32 (what Tinker-compatible peers use)."""

    rank: int = 32
    alpha: float = 32.0
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    dropout: float = 0.0


class AdamParams(msgspec.Struct, frozen=True):
    """Per-call AdamW settings. ``weight_decay`` is decoupled; ``grad_clip_norm`` 0 means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class ForwardBackwardInput(msgspec.Struct, frozen=True):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None


class ForwardBackwardOutput(msgspec.Struct):
    """One entry per input datum in ``loss_fn_outputs`` (at least ``logprobs``, float32, length N)."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "ArrayRecord"


class OptimStepOutput(msgspec.Struct):
    metrics: dict[str, float] = {}


class CheckpointInfo(msgspec.Struct):
    """What a save wrote: the directory (server side) and its size; the caller owns the URI."""

    path: str
    size_bytes: int
    step: int = 0


# --- sampling -----------------------------------------------------------------------------------------


class SamplingParams(msgspec.Struct, frozen=True):
    """``temperature`` 0 is greedy. ``stop``: None = stop at EOS; a string or list of strings; a list of
    token ids; ``[]`` = ignore EOS and generate exactly ``max_tokens``."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None


class SampleRequest(msgspec.Struct, frozen=True):
    """One prompt to continue ``num_samples`` times. Logprobs are of the raw model distribution (before
    temperature, top-k and top-p). The optional extras (Tinker SDK 0.38), each at most
    ``RequestLimits.max_logprobs_k`` wide:

    - ``topk_prompt_logprobs`` k: the k most likely tokens at every prompt position after the first;
    - ``topk_sample_logprobs`` k: the k most likely tokens at every sampled position;
    - ``target_prompt_logprobs``: ``[len(prompt) - 1][K]`` token ids (-1 = none), row i scored at prompt
      position i + 1;
    - ``prompt_alt_tokens_k`` k: k independent draws, at the request's temperature, at every prompt position
      after the first, with their logprobs.
    """

    prompt: list[int]
    sampling_params: SamplingParams = SamplingParams()
    num_samples: int = 1
    prompt_logprobs: bool = False
    # Directory of a sampler checkpoint (PEFT adapter) on the shared checkpoint filesystem; None = base model.
    adapter_path: str | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: list[list[int]] | None = None
    prompt_alt_tokens_k: int = 0


class TopK(msgspec.Struct):
    """Top-k tokens per position, most likely first: ``ids[i]`` and ``logprobs[i]`` (empty where a position has
    none, e.g. the first prompt token)."""

    ids: list[list[int]]
    logprobs: list[list[float]]


class SampledSequence(msgspec.Struct):
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    topk: TopK | None = None  # with topk_sample_logprobs, one row per token


class SampleOutput(msgspec.Struct):
    sequences: list[SampledSequence]
    # One per prompt token; the first is None (nothing predicts it).
    prompt_logprobs: list[float | None] | None = None
    topk_prompt: TopK | None = None  # one row per prompt token, the first empty
    target_prompt_logprobs: list[list[float]] | None = None  # the request's shape; 0.0 where it asked -1
    prompt_alt: TopK | None = None  # [len(prompt) - 1][k] draws and their logprobs


# --- errors -------------------------------------------------------------------------------------------


class UserError(ValueError):
    """The request was wrong (bad shape, unknown loss, unknown run...). Maps to HTTP 4xx / category "user".

    ``field`` names where the mistake is, e.g. ``data[3].loss_fn_inputs.weights``.
    """

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field
        self.status = status

    def __reduce__(self):
        # Keep ``field`` and ``status`` when the error crosses a process boundary (Ray pickles it).
        return (_rebuild_user_error, (type(self), self.message, self.field, self.status))


class NotFoundError(UserError):
    def __init__(self, message: str, *, field: str | None = None, status: int = 404) -> None:
        super().__init__(message, field=field, status=status)


def _rebuild_user_error(cls, message, field, status):
    return cls(message, field=field, status=status)


class ResyncNeeded(UserError):
    """A run restored from its saved state got ``seq_id`` ahead of where it stands: the requests in between
    ran on a replica that is gone. The front end answers with ``settle`` (which of them it saw finish) and
    sends the request again; a client never sees this. ``expected``: the ``seq_id`` the run stands at."""

    def __init__(self, message: str, *, expected: int = 0, field: str | None = "seq_id", status: int = 409) -> None:
        super().__init__(message, field=field, status=status)
        self.expected = expected

    def __reduce__(self):
        return (_rebuild_resync, (self.message, self.expected))


def _rebuild_resync(message: str, expected: int) -> "ResyncNeeded":
    return ResyncNeeded(message, expected=expected)


class ServiceUnavailable(Exception):
    """The process serving a call died or cannot be reached (a Ray actor or replica lost). Whether the call
    took effect is unknown to the caller; only a call that is safe to repeat may be sent again."""


class RunMoved(ServiceUnavailable):
    """The run is now served by another replica of its model application (it was restored there after this
    replica was thought lost, or the replicas changed). Nothing ran here: send the call again, and the
    router finds the run's new replica."""


_LOST_PROCESS = ("RayActorError", "NodeDiedError", "WorkerCrashedError", "OwnerDiedError")


async def remote_call(awaitable):
    """Await a call into another process (a Ray actor or a Serve handle): its ``UserError`` comes out as itself
    (status, field; never Ray's wrapper, whose message is the remote traceback); any other failure is Ray's
    ``cause`` where it has one. The one place where Ray errors are unwrapped."""
    try:
        return await awaitable
    except Exception as e:  # noqa: BLE001 - re-raised as the remote side's own exception
        raise remote_error(e) from None


async def following_run(call, wait_s: float = 5.0):
    """``remote_call(call())``, sent again while the run it is about moves to another replica (``RunMoved``:
    nothing ran; Serve's routers learn the run's new replica within about a second)."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return await remote_call(call())
        except RunMoved:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def remote_error(e: BaseException) -> BaseException:
    """The exception the remote side raised, for an error coming out of a Ray call (see ``remote_call``)."""
    user = unwrap_user_error(e)
    if user is not None:
        return user
    if any(c.__name__ in _LOST_PROCESS for c in type(e).__mro__):
        return ServiceUnavailable(f"the serving process was lost ({type(e).__name__})")
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


def unwrap_user_error(e: BaseException) -> UserError | None:
    """The ``UserError`` a Ray task error wraps, if any (``RayTaskError.cause``, possibly nested). Ray's
    wrapper is an instance of the cause's class too, but its message is the remote traceback, which must not
    reach a client."""
    cur: BaseException | None = e
    for _ in range(6):
        if cur is None:
            return None
        if isinstance(cur, UserError) and type(cur).__module__.startswith("twinkle."):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
    return None


# --- service descriptions -----------------------------------------------------------------------------


class RunInfo(msgspec.Struct):
    """A training run (one LoRA adapter) as the Model service knows it."""

    run_id: str
    lora: LoraConfig
    step: int = 0
    resident: bool = True  # False while offloaded after ``adapter_timeout`` of idleness


ServiceKind = Literal["model", "sampler", "processor"]


class WorkerInfo(msgspec.Struct, frozen=True):
    """Where one worker of a service runs (its process, host, Ray node and visible GPUs)."""

    rank: int
    pid: int
    hostname: str
    node_id: str | None = None
    cuda_visible_devices: str | None = None


class ServiceInfo(msgspec.Struct, kw_only=True):
    """What a model, sampler or processor service says about itself (``info()``, ``GET /info``). Fields that
    do not apply to a kind of service are None. Nothing in it belongs to one tenant: counts, never run ids,
    adapter names or paths."""

    kind: ServiceKind
    model_name: str  # served name, e.g. "Qwen/Qwen2.5-7B-Instruct" or "tiny-qwen2"
    model_id: str  # as configured, e.g. "ms://Qwen/Qwen2.5-7B-Instruct"
    backend: str | None = None  # the engine: "transformers" (model), "torch" | "vllm" (sampler)
    max_context_length: int | None = None
    vocab_size: int | None = None
    tokenizer_id: str | None = None  # for AutoTokenizer.from_pretrained: a hub id, or the local directory
    arch: str | None = None  # the model's architecture family (``config.model_type``), e.g. "qwen2"
    dp_size: int | None = None  # data-parallel workers
    app: str | None = None  # the application's name in the YAML, when deployed
    workers: list[WorkerInfo] = []
    runs: int | None = None  # model: training runs held, all tenants together
    # processor: the tokenizer's special tokens and what one request may carry
    eos_token: str | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    has_chat_template: bool | None = None
    roles: list[str] | None = None
    max_rows_per_request: int | None = None
    # engine settings worth showing an operator (device, dtype, batch sizes, engine args)
    settings: dict[str, Any] = {}

    def public(self) -> "ServiceInfo":
        """What anyone may read (``GET /info``): the model and its limits, without processes, hosts, counts
        or engine settings (which may hold secrets); operators read the rest through the admin routes."""
        return msgspec.structs.replace(self, app=None, workers=[], runs=None, settings={})


class ServiceHealth(msgspec.Struct, kw_only=True):
    """A service's liveness (``health()``, ``GET /healthz``); cheap, never waits for compute. ``degraded``
    while fewer workers answer than were planned. Counters are totals over all tenants."""

    kind: ServiceKind
    status: Literal["ok", "degraded"] = "ok"
    uptime_s: float = 0.0
    workers: int = 1  # planned
    workers_alive: int | None = None  # None where the service cannot see its workers (the deployment counts)
    queued: int | None = None  # requests waiting or running
    busy_for_s: float | None = None  # model: how long the current operation has run
    runs: int | None = None  # model: training runs held
    resident_runs: int | None = None  # model: runs whose adapter is on the device
    adapter_hits: int | None = None  # model, since start: requests whose run's adapter was on the device
    adapter_loads: int | None = None  # model, since start: requests that brought it back (a cache miss)
    adapter_offloads: int | None = None  # model, since start: adapters moved off the device when idle
    queue_wait: dict[str, tuple[int, float]] | None = None  # model: per key, requests started and their wait (s)
    served: int | None = None  # sampler: requests answered
    failed: int | None = None  # sampler: requests that failed

    def public(self) -> "ServiceHealth":
        """What anyone may read (``GET /healthz``): liveness, without the tenants' load."""
        return ServiceHealth(kind=self.kind, status=self.status, uptime_s=self.uptime_s, workers=self.workers,
                             workers_alive=self.workers_alive)
