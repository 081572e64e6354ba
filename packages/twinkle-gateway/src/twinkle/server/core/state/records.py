"""Rows of the durable store, as typed structs.

They are protocol-neutral: the Tinker app and the native Twinkle server keep the same records.
``owner`` is always a principal id (a short hash from ``auth.py``), never an API key. Times are Unix
seconds (float); JSON-valued columns (metadata, LoRA config, results) are decoded into Python values.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FutureStatus = Literal["pending", "done", "failed"]
ErrorCategory = Literal["user", "server"]


class SessionRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    protocol: str = "tinker"
    created: float
    heartbeat: float
    finished: float | None = None
    finish_reason: str | None = None
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    display_name: str | None = None
    sdk_version: str | None = None


class RunRecord(msgspec.Struct, kw_only=True):
    """A training run = one LoRA adapter on one base model."""

    id: str
    owner: str
    session_id: str | None
    base_model: str
    lora: dict[str, Any]  # twinkle.common.wire.LoraConfig as a dict
    created: float
    last_request: float
    protocol: str = "tinker"
    user_metadata: dict[str, Any] | None = None
    corrupted: bool = False


class CheckpointRecord(msgspec.Struct, kw_only=True):
    run_id: str
    kind: str  # weights | sampler_weights
    name: str
    owner: str
    path: str  # server directory
    created: float
    size_bytes: int | None = None
    public: bool = False
    expires_at: float | None = None
    user_metadata: dict[str, str] | None = None
    # base model and LoRA settings at save time, so a checkpoint stays loadable if its run row is gone
    base_model: str | None = None
    lora: dict[str, Any] | None = None

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"


class SamplerRecord(msgspec.Struct, kw_only=True):
    """A sampling session: a base model plus, optionally, adapter weights to sample with."""

    id: str
    owner: str
    session_id: str | None
    base_model: str
    created: float
    model_path: str | None = None  # the checkpoint URI the client gave (or None for the base model)
    adapter_path: str | None = None  # server directory of the adapter the sampler loads
    run_id: str | None = None
    ephemeral: bool = False  # weights saved by save_weights_and_get_sampling_client; deleted with the session
    last_used: float | None = None
    inflight: bool = False  # samples with the run's newest inflight weights, not its own (SDK kind="inflight")


class FutureRecord(msgspec.Struct, kw_only=True):
    """One asynchronous request. ``result`` is the stored (msgpack) form of a protocol-neutral value; ``value``
    is that value in memory (``core.futures.result_value``), which each protocol renders when it is retrieved."""

    request_id: str
    owner: str
    kind: str
    created: float
    model_id: str | None = None
    seq_id: int | None = None
    status: FutureStatus = "pending"
    result: bytes | None = None
    error: str | None = None
    category: ErrorCategory | None = None
    meta: dict[str, Any] | None = None  # e.g. sample_sequence_ids
    finished: float | None = None
    fetched: float | None = None
    value: Any = None  # not stored: the decoded result

    @property
    def terminal(self) -> bool:
        return self.status != "pending"


class ApiKeyRecord(msgspec.Struct, kw_only=True):
    key_hash: str
    principal: str
    source: str  # "config" | "env" | "admin"
    created: float
    label: str | None = None


class Page(msgspec.Struct):
    items: list[Any]
    total: int


class SequenceRecord(msgspec.Struct, kw_only=True):
    """One sampled sequence recorded for ``stable_reinforce``: its tokens and the sampler's logprob of each."""

    id: str
    owner: str
    session_id: str | None
    tokens: list[int]
    logprobs: list[float]
