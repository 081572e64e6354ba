"""Request bodies the client sends (mirrors of the server's request structs).

``omit_defaults``: only what the caller set goes on the wire, so a server that predates an optional field
still accepts the request as long as that field keeps its default.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .types import Datum


class _Out(msgspec.Struct, omit_defaults=True, kw_only=True):
    pass


class TrainBody(_Out):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None
    seq_id: int | None = None


class OptimBody(_Out):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    seq_id: int | None = None


class SaveBody(_Out):
    name: str
    kind: str = "state"
    optimizer: bool = True
    overwrite: bool = False
    ttl_seconds: int | None = None
    seq_id: int | None = None


class LoadBody(_Out):
    uri: str
    optimizer: bool = True
    seq_id: int | None = None


class SamplingParamsBody(_Out):
    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str | int] | None = None


class SampleBody(_Out):
    prompt_tokens: list[int]
    sampling_params: SamplingParamsBody = msgspec.field(default_factory=SamplingParamsBody)
    num_samples: int = 1
    prompt_logprobs: bool = False
    model_uri: str | None = None


class LoraBody(_Out):
    rank: int = 32
    alpha: float | None = None
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    dropout: float = 0.0


class CreateRunBody(_Out):
    base_model: str
    lora: LoraBody = msgspec.field(default_factory=LoraBody)
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None


class ResumeBody(_Out):
    source: str
    optimizer: bool = True
    into_run_id: str | None = None
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None


class SessionBody(_Out):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    client_version: str | None = None


class FutureRef(msgspec.Struct):
    request_id: str
    kind: str
    run_id: str | None = None
    uri: str | None = None


class FutureError(msgspec.Struct):
    detail: str
    category: str = "server"


class FutureOut(msgspec.Struct):
    request_id: str
    status: str
    kind: str
    # The result as raw JSON, decoded by the caller into what it expects (Raw cannot be in a union: a
    # pending or failed answer carries null).
    result: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: FutureError | None = None
    elapsed_s: float = 0.0


class SessionOut(msgspec.Struct):
    session_id: str
    heartbeat_interval_s: float = 10.0
    session_timeout_s: float = 120.0


class EncodeBody(_Out):
    rows: list[Any] | None = None
    jsonl: str | None = None
    format: str = "auto"
    max_length: int | None = None
    train_on: str = "all_assistant"
    on_error: str = "fail"
    offset: int = 0
    limit: int | None = None


class TokenizeBody(_Out):
    texts: list[str]
    add_special_tokens: bool = True


class DetokenizeBody(_Out):
    tokens: list[list[int]]
    skip_special_tokens: bool = False


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class RenderChatBody(_Out):
    messages: list[ChatMessage]
    add_generation_prompt: bool = False
