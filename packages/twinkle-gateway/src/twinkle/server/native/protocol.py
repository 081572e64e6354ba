"""Bodies of the native TwinkleServer routes (``/server/…``). The component apps' bodies are in
``twinkle.common.native``; ``twinkle-client`` mirrors both in its own structs.

Requests forbid unknown fields (a typo is a 400 naming it). Times are ISO-8601 UTC strings; checkpoint
addresses are ``twinkle://<run>/<kind>/<name>`` URIs, never server paths.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

API_VERSION = 1


class _In(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# --------------------------------------------------------------------------------------------- sessions


class CreateSessionIn(_In):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    client_version: str | None = None


class SessionOut(msgspec.Struct):
    session_id: str
    heartbeat_interval_s: float
    session_timeout_s: float


# --------------------------------------------------------------------------------------------- runs


class LoraIn(_In):
    """LoRA settings of a new run; ``alpha`` None = the rank's default (32, as Tinker peers use)."""

    rank: int = 32
    alpha: float | None = None
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    dropout: float = 0.0


class CreateRunIn(_In):
    """``idempotency_key``: a retried create with the same key returns the first run instead of a second."""

    base_model: str
    lora: LoraIn = LoraIn()
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None


class ResumeIn(_In):
    """Resume training from ``source``: a ``twinkle://<run>/weights/<name>`` URI, or a run id (its latest
    state checkpoint). Into a new run (default), or into the existing run ``into_run_id``."""

    source: str
    optimizer: bool = True
    into_run_id: str | None = None
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None


class CheckpointOut(msgspec.Struct):
    uri: str
    run_id: str
    kind: Literal["weights", "sampler_weights"]
    name: str
    created_at: str
    size_bytes: int | None = None
    base_model: str | None = None
    expires_at: str | None = None
    public: bool = False


class TrainingRunOut(msgspec.Struct):
    """A training run. ``model_prefix`` is where its training routes are (``<prefix>/runs/<run_id>/…``);
    ``step``/``loaded`` come from the Model service when it answers (``loaded`` False: its adapter is gone,
    e.g. after a restart — resume it from a checkpoint)."""

    run_id: str
    base_model: str
    lora: dict[str, Any]
    created_at: str
    last_request_at: str
    protocol: str
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    model_prefix: str | None = None
    step: int | None = None
    loaded: bool | None = None
    last_checkpoint: CheckpointOut | None = None
    last_sampler_checkpoint: CheckpointOut | None = None


class Cursor(msgspec.Struct):
    offset: int
    limit: int
    total: int
    next_offset: int | None = None


class TrainingRunsOut(msgspec.Struct):
    training_runs: list[TrainingRunOut]
    cursor: Cursor


class CheckpointsOut(msgspec.Struct):
    checkpoints: list[CheckpointOut]
    cursor: Cursor | None = None


class RunStep(msgspec.Struct):
    """One optimizer step of a run: the loss summed over the forward/backward passes since the previous step,
    their tokens, the learning rate and the gradient norm."""

    step: int
    time: float
    loss: float | None
    tokens: int
    learning_rate: float | None
    grad_norm: float | None


class RunHistoryOut(msgspec.Struct):
    steps: list[RunStep]


# --------------------------------------------------------------------------------------------- usage

class UsageBucket(msgspec.Struct):
    """What one key used in one UTC hour, of one kind: ``training`` / ``sampling_prefill`` /
    ``sampling_sample`` tokens, or ``checkpoint`` saves."""

    hour_start: str
    owner: str
    kind: str
    quantity: int
    session_id: str | None
    base_model: str | None


class UsageOut(msgspec.Struct):
    buckets: list[UsageBucket]


class AuditEntry(msgspec.Struct):
    time: str
    owner: str
    event: str
    details: dict[str, Any]


class AuditOut(msgspec.Struct):
    entries: list[AuditEntry]


# --------------------------------------------------------------------------------------------- futures


class FutureError(msgspec.Struct):
    detail: str
    category: Literal["user", "server"]


class FutureOut(msgspec.Struct):
    """``status`` pending: ask again (the server held the request up to ``timeout`` seconds first)."""

    request_id: str
    status: Literal["pending", "done", "failed"]
    kind: str
    result: Any = None
    error: FutureError | None = None
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------- capabilities


class ModelCapability(msgspec.Struct):
    """One served base model and where its services live (prefixes relative to the server root)."""

    name: str
    model_id: str | None
    trainable: bool
    sampleable: bool
    model_prefix: str | None = None
    sampler_prefix: str | None = None
    processor_prefix: str | None = None
    max_context_length: int | None = None
    vocab_size: int | None = None
    backend: str | None = None
    max_lora_rank: int = 1024


class Capabilities(msgspec.Struct):
    server_type: str
    version: str
    api_version: int
    server_prefix: str
    models: list[ModelCapability]
    heartbeat_interval_s: float
    long_poll_timeout_s: float
    max_body_bytes: int
    principal: str
    limits: dict[str, Any] | None = None  # twinkle.common.limits.RequestLimits
