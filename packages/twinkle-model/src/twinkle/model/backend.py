"""The engine contract: what a training backend must do for the Model service.

A backend owns ONE base model and any number of LoRA adapters on it, one per training run (``run_id``). The
service never touches torch; it calls these methods from its single executor thread (see ``scheduler.py``).

Contract, for every implementation (``TransformersBackend``, ``DataParallelBackend``, ``MegatronEngine``;
the first and last share ``adapters.AdapterBackend``):

- **Per adapter**: weights, gradient accumulator, optimizer (AdamW) state, step counter, LoRA config and the
  dropout RNG stream belong to one run. No operation on run B may change any of run A's state or results:
  A trained interleaved with B and C ends *bit-identical* to A trained alone (when ops are not fused).
- **Gradients accumulate** across ``forward_backward`` calls (losses are sums) until ``optim_step``, which
  applies them and zeroes them. ``forward_backward(forward_only=True)`` computes the same outputs without
  touching gradients.
- **Thread-safety**: none. Mutating methods must be called from one thread at a time (the service's executor
  thread); ops of different adapters share the base model and must never run concurrently. The read-only
  accessors ``run_step``, ``is_resident``, ``has_run`` and ``describe`` only read plain attributes and may be
  called from any thread.
- **Determinism**: the same sequence of ops on one adapter gives the same bits on the same device, thread
  count and batch shapes. Fused ops (``forward_backward_many`` with several runs) are equal to the separate
  ops up to float rounding (batch shapes differ), never bit-identical.
- **Residency**: ``offload`` moves an idle adapter's whole state out of the live model; any later op on that
  run restores it transparently first. Results never depend on whether an adapter was offloaded.
- **Errors**: a bad request raises ``UserError`` (``NotFoundError`` for an unknown run) naming the field, and
  leaves the adapter's state untouched; anything else is a server error.
- **Checkpoints**: ``save_state`` / ``save_sampler_weights`` write a directory atomically (temp dir, then
  rename) in the PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``) that stock
  ``peft.PeftModel.from_pretrained`` loads; state checkpoints add ``optimizer.safetensors`` and
  ``twinkle_state.json`` (step, LoRA config). ``load_state`` reproduces logprobs exactly.
- **Slices**: ``forward_backward_slices`` is ``forward_backward`` as a generator that yields between
  micro-batches; the service runs one slice per turn so that a large request cannot hold the model for
  long. Interleaving slices of different runs changes no result.
- **Snapshots**: ``snapshot`` copies a run's state off the live model (CPU memory, cheap next to a step) so
  that it can be written by another thread while training goes on (``checkpoints.write_snapshot``); the
  service keeps runs durable that way.
"""

from __future__ import annotations

import abc
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from twinkle.common.limits import check_adam, check_lora
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepOutput,
)

from .checkpoints import RunSnapshot


@dataclass(frozen=True)
class BackendInfo:
    model_name: str
    model_id: str
    backend: str
    max_context_length: int
    vocab_size: int
    dp_size: int = 1
    token_budget: int = 0  # padded tokens one pass takes on one replica (0: not known)


@dataclass(frozen=True)
class FusedItem:
    """One forward/backward request taking part in a fused pass."""

    run_id: str
    inp: ForwardBackwardInput


class TrainingBackend(abc.ABC):
    """See the module docstring for the contract every method obeys."""

    # --- adapters -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_adapter(self, run_id: str, lora: LoraConfig) -> LoraConfig:
        """Add a fresh adapter; returns the config actually used (a random seed filled in if None)."""

    @abc.abstractmethod
    def delete_adapter(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def has_run(self, run_id: str) -> bool: ...

    @abc.abstractmethod
    def run_step(self, run_id: str) -> int: ...

    @abc.abstractmethod
    def is_resident(self, run_id: str) -> bool: ...

    # --- training -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward_backward(
        self, run_id: str, inp: ForwardBackwardInput, forward_only: bool = False
    ) -> ForwardBackwardOutput: ...

    def forward_backward_slices(
        self, run_id: str, inp: ForwardBackwardInput, forward_only: bool = False
    ) -> Generator[None, None, ForwardBackwardOutput]:
        """``forward_backward`` as a generator that yields between slices of work (micro-batches), so that the
        scheduler can let other runs' requests in between; its return value is the output. A bad request
        raises before the generator is returned. Slices must leave the model as they found it. The default
        is one slice."""
        out = self.forward_backward(run_id, inp, forward_only)

        def one_slice() -> Generator[None, None, ForwardBackwardOutput]:
            return out
            yield  # a generator that returns at once

        return one_slice()

    def forward_backward_many(self, items: list[FusedItem]) -> list[ForwardBackwardOutput | Exception]:
        """Several runs' forward_backward requests, ideally in one pass. The default runs them one by one; a
        backend that can fuse overrides this. One item's error never fails the others."""
        out: list[ForwardBackwardOutput | Exception] = []
        for item in items:
            try:
                out.append(self.forward_backward(item.run_id, item.inp))
            except Exception as e:  # noqa: BLE001 - reported per item
                out.append(e)
        return out

    def can_fuse(self, run_id: str) -> bool:
        """Whether this run's forward_backward may join a fused pass."""
        return False

    @abc.abstractmethod
    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput: ...

    # --- checkpoints ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, run_id: str, include_optimizer: bool = True) -> RunSnapshot:
        """A copy of the run's weights (and optimizer state, RNG streams, step) that no later op changes."""

    @abc.abstractmethod
    def save_state(self, run_id: str, path: str, include_optimizer: bool = True) -> CheckpointInfo: ...

    @abc.abstractmethod
    def save_sampler_weights(self, run_id: str, path: str) -> CheckpointInfo: ...

    @abc.abstractmethod
    def load_state(self, run_id: str, path: str, include_optimizer: bool) -> None: ...

    @abc.abstractmethod
    def read_checkpoint_lora(self, path: str) -> LoraConfig:
        """The LoRA config a checkpoint was trained with (to create a run from it). Touches no model state."""

    # --- residency ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def offload(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def ensure_resident(self, run_id: str) -> None: ...

    # --- description ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> BackendInfo: ...

    def close(self) -> None:
        """Release resources (processes, spill files)."""


def run_slices(slices: Generator[None, None, Any]) -> Any:
    """Run a sliced job to its end in one go; its result."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return done.value


def validate_lora(lora: LoraConfig) -> None:
    """Reject LoRA configs no backend can honour (``twinkle.common.limits.check_lora``), naming ``lora.<key>``."""
    check_lora(lora, field="lora")


def validate_adam(p: AdamParams) -> None:
    """Reject AdamW settings that could corrupt weights (``twinkle.common.limits.check_adam``)."""
    check_adam(p, field="adam_params")
