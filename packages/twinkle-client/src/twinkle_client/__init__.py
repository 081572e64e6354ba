"""Twinkle client SDK: train LoRA adapters on a Twinkle server over HTTP (httpx + msgspec, no torch).

    from twinkle_client import TwinkleClient, Datum

    with TwinkleClient("http://127.0.0.1:8000", api_key="tml-...") as client:
        run = client.create_training_run("tiny-qwen2", rank=8)
        data = client.encode_datums("examples/data/sft.jsonl")
        for _ in range(20):
            run.forward_backward(data)
            run.optim_step(learning_rate=1e-3)
        ckpt = run.save("done")

``twinkle_client.tinker.service_client()`` returns the official ``tinker`` SDK's ``ServiceClient`` for a
server in tinker mode (``pip install 'twinkle-client[tinker]'``).
"""

from .client import TwinkleClient, __version__
from .errors import (
    TwinkleAuthError,
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
    Datum,
    EncodePage,
    ForwardBackwardOutput,
    FutureProgress,
    ModelCapability,
    OptimStepOutput,
    RowError,
    RunState,
    RunStep,
    SampledSequence,
    SampleOutput,
    TensorData,
    TrainingRunInfo,
    UsageBucket,
)

__all__ = [
    "AuditEntry", "Capabilities", "Checkpoint", "Datum", "EncodePage", "ForwardBackwardOutput", "FutureProgress",
    "ModelCapability", "OptimStepOutput", "RowError", "RunState", "RunStep", "SampleOutput", "SampledSequence",
    "TensorData", "TrainingRun", "TrainingRunInfo", "TwinkleAuthError", "TwinkleClient", "TwinkleConnectionError",
    "TwinkleError", "TwinkleNotFoundError", "TwinkleServerError", "TwinkleTimeoutError", "TwinkleUserError",
    "UsageBucket", "__version__",
]
