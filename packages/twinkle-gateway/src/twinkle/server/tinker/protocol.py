"""JSON request and response bodies of the Tinker API, as msgspec structs (the official SDK's pydantic
types, re-declared so that the server does not import the SDK).

Tolerance rules (``tinker-protocol.md`` §11), applied to every request struct:

- unknown fields are ignored, including the ``type`` discriminator the SDK adds to every request;
- every field that a client may leave out is ``X | None = None``: the SDK omits unset optionals, while old
  (0.3-era) clients send explicit ``null`` for them. Defaults are applied where the value is used, so
  ``null`` and "absent" mean the same thing;
- a model-input chunk without ``type`` is ``encoded_text``.

Responses carry exactly the fields the SDK validates (strictly) plus harmless extras.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# ------------------------------------------------------------------------------------ shared pieces


class _Req(msgspec.Struct, kw_only=True):
    """Base of request bodies: unknown keys ignored (msgspec's default)."""


class ChunkIn(_Req):
    """One model-input chunk. Only ``encoded_text`` is trainable/sampleable here; the other kinds are
    accepted by the parser so the error can say what was wrong."""

    type: str | None = None
    tokens: list[int] | None = None
    data: str | None = None
    format: str | None = None
    expected_tokens: int | None = None
    location: str | None = None
    dmel: str | None = None


class ModelInputIn(_Req):
    chunks: list[ChunkIn]


class TensorDataIn(_Req):
    data: list[int | float]
    dtype: str | None = None
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


class DatumIn(_Req):
    model_input: ModelInputIn
    loss_fn_inputs: dict[str, TensorDataIn] | None = None


class ForwardBackwardInputIn(_Req):
    data: list[DatumIn]
    loss_fn: str | None = None
    loss_fn_config: dict[str, float | str] | None = None


# ------------------------------------------------------------------------------------ session


class ClientConfigRequest(_Req):
    sdk_version: str | None = None


class CreateSessionRequest(_Req):
    tags: list[str] | None = None
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class CreateSessionResponse(msgspec.Struct):
    session_id: str
    type: str = "create_session"
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatRequest(_Req):
    session_id: str


class FinishReason(_Req):
    type: str | None = None


class FinishSessionRequest(_Req):
    reason: FinishReason | None = None
    detail: str | None = None


# ------------------------------------------------------------------------------------ training


class LoraConfigIn(_Req):
    rank: int | None = None
    seed: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


class OptimizerConfigIn(_Req):
    type: str | None = None
    version: int | None = None


class CreateModelRequest(_Req):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfigIn | None = None
    optimizer_config: OptimizerConfigIn | None = None


class ModelIdRequest(_Req):
    """``get_info`` and ``unload_model``."""

    model_id: str


class TrainingHeader(_Req):
    """The part of every numbered training request that identifies it."""

    model_id: str
    seq_id: int | None = None


class ForwardBackwardJsonRequest(_Req):
    """Pre-0.25 JSON ``forward_backward``."""

    forward_backward_input: ForwardBackwardInputIn
    model_id: str
    seq_id: int | None = None


class ForwardJsonRequest(_Req):
    """Pre-0.25 ``POST /forward``."""

    forward_input: ForwardBackwardInputIn
    model_id: str
    seq_id: int | None = None


class AdamParamsIn(_Req):
    type: str | None = None
    learning_rate: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    grad_clip_norm: float | None = None


class OptimStepRequest(_Req):
    """The SDK sends ``adam_params`` (Adam) or ``optimizer_params`` (other families); ``optim_params`` is the
    field's own name and accepted too."""

    model_id: str
    seq_id: int | None = None
    adam_params: AdamParamsIn | None = None
    optimizer_params: AdamParamsIn | None = None
    optim_params: AdamParamsIn | None = None


class SaveWeightsRequest(_Req):
    model_id: str
    path: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    overwrite: bool | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternalRequest(_Req):
    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: list[str] | None = None


class ExternalWeightsUrlsOut(msgspec.Struct):
    urls: dict[str, str]
    expires: str


class SaveWeightsForSamplerRequest(_Req):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: str | None = None
    seq_id: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class LoadWeightsRequest(_Req):
    path: str
    optimizer: bool | None = None
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigIn | None = None
    weights_access_token: str | None = None


class UntypedFuture(msgspec.Struct, omit_defaults=True):
    """What every future-returning endpoint answers at once."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


# ------------------------------------------------------------------------------------ sampling


class CreateSamplingSessionRequest(_Req):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class CreateSamplingSessionResponse(msgspec.Struct):
    sampling_session_id: str
    type: str = "create_sampling_session"


class SamplingParamsIn(_Req):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None


class SampleRequestIn(_Req):
    prompt: ModelInputIn
    sampling_params: SamplingParamsIn | None = None
    num_samples: int | None = None
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int | None = None
    topk_sample_logprobs: int | None = None
    target_prompt_logprobs: TensorDataIn | None = None
    prompt_alt_tokens_k: int | None = None
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None


class FuturesTargetIn(_Req):
    sampling_session_id: str
    cloned_sampler_id: int = 0
    type: str = "sampling_session"


class FuturesRetrieveRequest(_Req):
    target: FuturesTargetIn
    prev_cursor: int = 0
    timeout: float | None = None
    retrieved_request_ids: list[str] = []


class FutureCompletionOut(msgspec.Struct, omit_defaults=True):
    state: str
    request_id: str
    response_payload_uncompressed_size: int | None = None


class FuturesRetrieveResponse(msgspec.Struct):
    completions: list[FutureCompletionOut]
    cursor: int


class JoinSamplingSessionRequest(_Req):
    sampling_session_id: str


class JoinSamplingSessionResponse(msgspec.Struct):
    client_counter: int
    type: str = "join_sampling_session"


class CancelFutureRequest(_Req):
    request_id: str


class GetSamplerResponse(msgspec.Struct):
    sampler_id: str
    base_model: str
    model_path: str | None = None


# ------------------------------------------------------------------------------------ futures


class FutureRetrieveRequest(_Req):
    request_id: str
    allow_metadata_only: bool | None = None


class TryAgainResponse(msgspec.Struct):
    request_id: str
    type: str = "try_again"
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"


class RequestFailedResponse(msgspec.Struct):
    error: str
    category: Literal["user", "server", "unknown"]


# ------------------------------------------------------------------------------------ REST


class WeightsInfoRequest(_Req):
    tinker_path: str


class TtlRequest(_Req):
    ttl_seconds: int | None = None


class CheckpointOut(msgspec.Struct):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler", "external"]
    time: str
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: str | None = None


class CursorOut(msgspec.Struct):
    offset: int
    limit: int
    total_count: int


class CheckpointsListResponse(msgspec.Struct):
    checkpoints: list[CheckpointOut]
    cursor: CursorOut | None = None


class TrainingRunOut(msgspec.Struct):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: str
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: CheckpointOut | None = None
    last_sampler_checkpoint: CheckpointOut | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(msgspec.Struct):
    training_runs: list[TrainingRunOut]
    cursor: CursorOut


class WeightsInfoResponse(msgspec.Struct):
    base_model: str
    is_lora: bool = True
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "adamw"})


class GetSessionResponse(msgspec.Struct):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(msgspec.Struct):
    sessions: list[str]


class SupportedModelOut(msgspec.Struct):
    model_name: str
    max_context_length: int | None = None
    trainable: bool = True
    sampleable: bool = False


class ServerCapabilitiesResponse(msgspec.Struct):
    supported_models: list[SupportedModelOut]
    limits: dict[str, Any] | None = None  # twinkle.common.limits.RequestLimits: what every request must stay within


class ModelDataOut(msgspec.Struct):
    model_name: str
    arch: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(msgspec.Struct):
    model_id: str
    model_data: ModelDataOut
    type: str = "get_info"
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None
    optimizer_config: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "adamw"})


# ------------------------------------------------------------------------------------ auth (CLI login)


class ApiKeyOrg(msgspec.Struct):
    name: str


class ApiKeyUser(msgspec.Struct):
    email: str


class ApiKeyDetails(msgspec.Struct):
    org_details: ApiKeyOrg
    user_details: ApiKeyUser


class SelfApiKeyResponse(msgspec.Struct):
    """``GET /auth/apikey/me``: what the SDK's ``tinker auth login`` stores about a key it checked."""

    key_id: int
    name: str
    note: str
    details: ApiKeyDetails
