"""Test helpers of twinkle-model (a uniquely named module: tests run with --import-mode=importlib)."""

from __future__ import annotations

import torch
from twinkle.common.wire import Datum, ForwardBackwardInput, TensorData


def make_datum(n: int, seed: int, *, loss: str = "cross_entropy", vocab: int = 2000) -> Datum:
    """A random datum of n tokens with the inputs ``loss`` needs (RL inputs look like a cookbook datum)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n + 1,), generator=g).tolist()
    inputs = {"target_tokens": TensorData(toks[1:], "int64")}
    if loss == "cross_entropy":
        inputs["weights"] = TensorData((torch.rand(n, generator=g) * 2 - 0.5).tolist())
    else:
        prompt = max(1, n // 3)
        q = (-torch.rand(n, generator=g) * 6 - 1).tolist()
        adv = (torch.randn(n, generator=g)).tolist()
        inputs["logprobs"] = TensorData([0.0] * prompt + q[prompt:])
        inputs["advantages"] = TensorData([0.0] * prompt + adv[prompt:])
        if loss == "gspo":
            inputs["sequence_ratio_mask"] = TensorData([0.0] * prompt + [1.0] * (n - prompt))
    return Datum(model_input=toks[:-1], loss_fn_inputs=inputs)


def make_batch(sizes, seed: int, loss: str = "cross_entropy", **cfg) -> ForwardBackwardInput:
    return ForwardBackwardInput(
        data=[make_datum(n, seed * 1000 + i, loss=loss) for i, n in enumerate(sizes)],
        loss_fn=loss,
        loss_fn_config=cfg or None,
    )


def adapter_state(backend, run_id: str) -> dict[str, torch.Tensor]:
    run = backend._resident(run_id)
    return {k: p.detach().clone() for k, p in run.params.items()}
