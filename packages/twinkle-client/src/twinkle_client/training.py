"""``TrainingRun``: a handle on one training run (one LoRA adapter on a served base model).

Requests go to the Model service's own app (``<model_prefix>/runs/<run_id>/…``). Each training request
carries the next number of the run's sequence (``seq_id``): the server executes a run's requests in that
order and answers a repeated number from its first execution, so the client retries a request that may or
may not have arrived with the *same* number and can never apply a step twice. A request the server
refused (4xx) still used its number. After a request that failed without an answer (the server may or may
not have seen it), the handle asks the server where the sequence stands before numbering the next one.

A handle may be shared between threads: its training requests are numbered and sent one at a time.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import msgspec

from . import _wire as W
from .errors import TwinkleConnectionError, TwinkleServerError
from .types import (
    Checkpoint,
    Datum,
    ForwardBackwardOutput,
    OptimStepOutput,
    RunState,
    RunStep,
    SampleOutput,
    TrainingRunInfo,
)

if TYPE_CHECKING:
    from .client import TwinkleClient

SAVE_KINDS = ("state", "sampler")
_AUTO_SAMPLER_NAME = "latest"


class TrainingRun:
    def __init__(self, client: "TwinkleClient", info: TrainingRunInfo, *, next_seq_id: int = 1) -> None:
        self.client = client
        self.info = info
        self.run_id = info.run_id
        self.base_model = info.base_model
        self._prefix = info.model_prefix or client.capabilities().model(info.base_model).model_prefix
        if not self._prefix:
            raise ValueError(f"the server has no training app for {info.base_model!r}")
        self._lock = threading.Lock()
        self._next_seq = next_seq_id
        self._resync = False
        self._sampler_uri: str | None = None
        self._dirty = True  # weights changed since the last sampler save

    def __repr__(self) -> str:
        return f"TrainingRun({self.run_id!r}, base_model={self.base_model!r})"

    # ------------------------------------------------------------------------------------------ training

    def forward(self, data: Iterable[Datum], loss_fn: str = "cross_entropy",
                loss_fn_config: dict[str, float | str] | None = None) -> ForwardBackwardOutput:
        """Logprobs (and the loss) of ``data`` under the current weights; no gradients."""
        return self._train("forward", data, loss_fn, loss_fn_config)

    def forward_backward(self, data: Iterable[Datum], loss_fn: str = "cross_entropy",
                         loss_fn_config: dict[str, float | str] | None = None) -> ForwardBackwardOutput:
        """Accumulate gradients of ``loss_fn`` over ``data`` (``cross_entropy``, ``importance_sampling``,
        ``ppo``, ``cispo``, ``dro``, ``gspo``); ``optim_step`` applies them."""
        return self._train("forward_backward", data, loss_fn, loss_fn_config)

    def optim_step(self, learning_rate: float = 1e-4, *, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-12,
                   weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> OptimStepOutput:
        """One AdamW step with the gradients accumulated since the last step."""
        out = self._numbered("optim_step", lambda seq: W.OptimBody(
            learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            grad_clip_norm=grad_clip_norm, seq_id=seq), OptimStepOutput)
        self._dirty = True
        return out

    def _train(self, op: str, data: Iterable[Datum], loss_fn: str, config: dict | None) -> ForwardBackwardOutput:
        batch = list(data)
        if not batch:
            raise ValueError("data is empty")
        return self._numbered(op, lambda seq: W.TrainBody(data=batch, loss_fn=loss_fn, loss_fn_config=config,
                                                          seq_id=seq), ForwardBackwardOutput)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, name: str, kind: str = "state", *, optimizer: bool = True, overwrite: bool = False,
             ttl_seconds: int | None = None, timeout: float | None = None) -> Checkpoint:
        """Save the run as checkpoint ``name`` and wait until it is written. ``kind="state"``: adapter and
        optimizer (what ``resume``/``load`` take); ``kind="sampler"``: the adapter alone (what ``sample``
        takes). Returns the checkpoint; its ``uri`` is ``twinkle://<run>/<weights|sampler_weights>/<name>``."""
        if kind not in SAVE_KINDS:
            raise ValueError(f"kind must be one of {SAVE_KINDS}, got {kind!r}")
        ref = self._numbered("save", lambda seq: W.SaveBody(name=name, kind=kind, optimizer=optimizer,
                                                            overwrite=overwrite, ttl_seconds=ttl_seconds,
                                                            seq_id=seq), W.FutureRef)
        ckpt = msgspec.json.decode(self.client.wait(ref.request_id, kind=f"save {name}", timeout=timeout),
                                   type=Checkpoint)
        if kind == "sampler":
            self._sampler_uri, self._dirty = ckpt.uri, False
        return ckpt

    def load(self, uri: str | Checkpoint, optimizer: bool = True, *, timeout: float | None = None) -> None:
        """Load a state checkpoint (``twinkle://…/weights/<name>``) into this run, with or without its
        optimizer moments."""
        uri = uri.uri if isinstance(uri, Checkpoint) else uri
        ref = self._numbered("load", lambda seq: W.LoadBody(uri=uri, optimizer=optimizer, seq_id=seq), W.FutureRef)
        self.client.wait(ref.request_id, kind="load", timeout=timeout)
        self._dirty = True

    def history(self, after_step: int = 0) -> list[RunStep]:
        """This run's optimizer steps after ``after_step`` (``TwinkleClient.run_history``)."""
        return self.client.run_history(self.run_id, after_step=after_step)

    def checkpoints(self) -> list[Checkpoint]:
        return self.client.list_checkpoints(self.run_id)

    def latest_checkpoint(self, kind: str | None = None) -> Checkpoint:
        return self.client.latest_checkpoint(self.run_id, kind)

    # ------------------------------------------------------------------------------------------ sampling

    def sample(self, prompt: str | Sequence[int], *, num_samples: int = 1, max_tokens: int | None = None,
               temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0, seed: int | None = None,
               stop: str | list[str] | list[int] | None = None, prompt_logprobs: bool = False,
               checkpoint: str | Checkpoint | None = None, decode: bool = False) -> SampleOutput:
        """Sample from this run's weights. ``prompt``: token ids, or text (tokenized by the server's
        Processor). ``checkpoint``: a sampler (or state) checkpoint URI to sample from; by default the
        current weights, saved first as sampler checkpoint ``latest`` when they changed since the last
        sampler save. ``decode=True`` also returns each sequence's text."""
        if checkpoint is None:
            if self._dirty or self._sampler_uri is None:
                self.save(_AUTO_SAMPLER_NAME, kind="sampler", overwrite=True)
            uri = self._sampler_uri
        else:
            uri = checkpoint.uri if isinstance(checkpoint, Checkpoint) else checkpoint
        return self.client.sample(prompt, base_model=self.base_model, model_uri=uri, num_samples=num_samples,
                                  max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop=stop, prompt_logprobs=prompt_logprobs, decode=decode)

    # ------------------------------------------------------------------------------------------ the run

    def state(self) -> RunState:
        """The run as its Model service sees it now (step, LoRA settings, the next ``seq_id``)."""
        return self.client._transport.call("GET", f"{self._prefix}/runs/{self.run_id}", type_=RunState)

    def refresh(self) -> TrainingRunInfo:
        self.info = self.client.get_training_run(self.run_id)
        return self.info

    def delete(self, *, checkpoints: bool = False) -> None:
        """Release the adapter and forget the run (its checkpoints stay unless ``checkpoints=True``)."""
        self.client.delete_training_run(self.run_id, checkpoints=checkpoints)

    # ------------------------------------------------------------------------------------------ numbering

    def _numbered(self, op: str, body_for: Any, type_: Any) -> Any:
        with self._lock:
            if self._resync:
                self._next_seq = self.state().next_seq_id
                self._resync = False
            seq = self._next_seq
            self._next_seq += 1
            try:
                return self.client._transport.call("POST", f"{self._prefix}/runs/{self.run_id}/{op}", body_for(seq),
                                                   type_=type_)
            except (TwinkleConnectionError, TwinkleServerError):
                self._resync = True  # did the server take this number? ask before using the next one
                raise
