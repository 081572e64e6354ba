"""The client's own copies of the server's JSON shapes (msgspec structs).

They mirror the server's wire types without importing them: ``twinkle-client`` must install without the
server (or torch). Decoding ignores fields the client does not know, so a newer server keeps working with
this client; requests are encoded from these structs, so a field the server does not know is a clear 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import msgspec


class TensorData(msgspec.Struct):
    """A dense tensor: row-major ``data`` plus ``shape`` (1-D when None)."""

    data: list[int | float]
    dtype: Literal["int64", "float32"] = "float32"
    shape: list[int] | None = None

    def tolist(self) -> list[int | float]:
        return list(self.data)


class Datum(msgspec.Struct):
    """One training example. Position *i* of ``model_input`` predicts ``loss_fn_inputs["target_tokens"][i]``;
    every per-token input has ``len(model_input)`` entries (the Tinker conventions)."""

    model_input: list[int]
    loss_fn_inputs: dict[str, TensorData] = {}

    @classmethod
    def from_tokens(cls, tokens: Sequence[int], weights: Sequence[float] | None = None) -> "Datum":
        """Next-token prediction over ``tokens``; ``weights[j]`` weighs the prediction of ``tokens[j + 1]``
        (default 1 everywhere)."""
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise ValueError("a datum needs at least two tokens (one input and its target)")
        w = [1.0] * (len(tokens) - 1) if weights is None else [float(x) for x in weights]
        if len(w) != len(tokens) - 1:
            raise ValueError(f"weights must have len(tokens) - 1 = {len(tokens) - 1} entries, got {len(w)}")
        return cls(model_input=tokens[:-1], loss_fn_inputs={
            "target_tokens": TensorData(tokens[1:], "int64"), "weights": TensorData(w, "float32")})

    @classmethod
    def supervised(cls, prompt: Sequence[int], completion: Sequence[int]) -> "Datum":
        """Train on ``completion`` given ``prompt`` (no loss on the prompt)."""
        tokens = list(prompt) + list(completion)
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
        return cls.from_tokens(tokens, weights)

    @classmethod
    def rl(cls, prompt: Sequence[int], completion: Sequence[int], logprobs: Sequence[float],
           advantage: float | Sequence[float]) -> "Datum":
        """An RL example for ``importance_sampling``/``ppo``/``cispo``: the sampled ``completion`` with the
        sampler's ``logprobs`` of it and its advantage (one number, or one per completion token)."""
        if len(logprobs) != len(completion):
            raise ValueError("logprobs must have one entry per completion token")
        adv = [float(advantage)] * len(completion) if isinstance(advantage, (int, float)) else list(advantage)
        if len(adv) != len(completion):
            raise ValueError("advantage must be a number or have one entry per completion token")
        n = len(prompt) - 1
        tokens = list(prompt) + list(completion)
        return cls(model_input=tokens[:-1], loss_fn_inputs={
            "target_tokens": TensorData(tokens[1:], "int64"),
            "logprobs": TensorData([0.0] * n + [float(x) for x in logprobs], "float32"),
            "advantages": TensorData([0.0] * n + [float(x) for x in adv], "float32"),
        })


class ForwardBackwardOutput(msgspec.Struct):
    """One ``loss_fn_outputs`` entry per datum (``logprobs`` at least); ``metrics`` keys are
    ``name:reduction`` (``loss:sum``)."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]
    loss_fn_output_type: str = "ArrayRecord"

    @property
    def loss(self) -> float:
        """The summed loss of the batch (``metrics["loss:sum"]``)."""
        return float(self.metrics["loss:sum"])

    def logprobs(self, i: int = 0) -> list[float]:
        return [float(x) for x in self.loss_fn_outputs[i]["logprobs"].data]


class OptimStepOutput(msgspec.Struct):
    metrics: dict[str, float] = {}


class SampledSequence(msgspec.Struct):
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    text: str | None = None  # filled by ``sample(..., decode=True)``


class SampleOutput(msgspec.Struct):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


class Checkpoint(msgspec.Struct):
    """A saved checkpoint; ``uri`` (``twinkle://<run>/<kind>/<name>``) is how every call refers to it.
    ``kind``: ``weights`` (a training state: resumable) or ``sampler_weights`` (adapter only)."""

    uri: str
    run_id: str
    kind: str
    name: str
    created_at: str
    size_bytes: int | None = None
    base_model: str | None = None
    expires_at: str | None = None
    public: bool = False


class TrainingRunInfo(msgspec.Struct):
    run_id: str
    base_model: str
    lora: dict[str, Any]
    created_at: str
    last_request_at: str
    protocol: str = "twinkle"
    session_id: str | None = None
    user_metadata: dict[str, Any] | None = None
    model_prefix: str | None = None
    step: int | None = None
    loaded: bool | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None


class RunState(msgspec.Struct):
    """A run as its Model service sees it now."""

    run_id: str
    base_model: str
    lora: dict[str, Any]
    step: int
    resident: bool
    next_seq_id: int


class Cursor(msgspec.Struct):
    offset: int
    limit: int
    total: int
    next_offset: int | None = None


class TrainingRunsPage(msgspec.Struct):
    training_runs: list[TrainingRunInfo]
    cursor: Cursor


class CheckpointsPage(msgspec.Struct):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class ModelCapability(msgspec.Struct):
    name: str
    model_id: str | None = None
    trainable: bool = False
    sampleable: bool = False
    model_prefix: str | None = None
    sampler_prefix: str | None = None
    processor_prefix: str | None = None
    max_context_length: int | None = None
    vocab_size: int | None = None
    backend: str | None = None
    max_lora_rank: int | None = None


class Capabilities(msgspec.Struct):
    server_type: str
    version: str
    api_version: int
    server_prefix: str
    models: list[ModelCapability]
    heartbeat_interval_s: float = 10.0
    long_poll_timeout_s: float = 25.0
    max_body_bytes: int | None = None
    principal: str | None = None

    def model(self, name: str | None) -> ModelCapability:
        """The served model ``name``; with None, the only one (an error when there are several)."""
        if name is None:
            if len(self.models) != 1:
                names = ", ".join(m.name for m in self.models) or "none"
                raise ValueError(f"this server serves several models ({names}); name one with base_model=")
            return self.models[0]
        for m in self.models:
            if m.name == name:
                return m
        names = ", ".join(m.name for m in self.models) or "none"
        raise ValueError(f"the server does not serve {name!r}; it serves: {names}")


class RowError(msgspec.Struct):
    """A dataset row that could not be encoded: ``where`` is ``line 7`` (JSONL) or ``rows[6]``."""

    index: int
    where: str
    message: str
    line: int | None = None


class EncodeStats(msgspec.Struct):
    rows: int = 0
    skipped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0


class EncodePage(msgspec.Struct):
    """One page of an encoded dataset: ``data[k]`` came from row ``indices[k]``."""

    data: list[Datum]
    indices: list[int]
    errors: list[RowError]
    stats: EncodeStats
    offset: int
    total_rows: int
    next_offset: int | None = None


class RenderedChat(msgspec.Struct):
    text: str
    tokens: list[int]


@dataclass(frozen=True)
class FutureProgress:
    """What a progress callback gets while a long operation (create, resume, save, load) runs."""

    request_id: str
    kind: str
    status: str
    elapsed_s: float
    polls: int


class RunStep(msgspec.Struct):
    """One optimizer step of a run: the loss summed over the forward/backward passes since the previous step,
    their tokens, the learning rate and the gradient norm."""

    step: int
    time: float
    loss: float | None
    tokens: int
    learning_rate: float | None
    grad_norm: float | None


class UsageBucket(msgspec.Struct):
    """What one key used in one UTC hour: ``kind`` is ``training``, ``sampling_prefill`` or ``sampling_sample``
    (``quantity`` in tokens) or ``checkpoint`` (saves)."""

    hour_start: str
    owner: str
    kind: str
    quantity: int
    session_id: str | None = None
    base_model: str | None = None


class AuditEntry(msgspec.Struct):
    time: str
    owner: str
    event: str
    details: dict[str, Any]
