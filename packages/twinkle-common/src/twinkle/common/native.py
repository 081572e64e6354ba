"""Request and response bodies of the native Twinkle protocol on the component apps (model, sampler).

The native client talks to each service's own app (``/models/<name>/…``, ``/sampler/<name>/…``) and to the
central server (``/server/…``). The component apps and the central server both need these structs — the
model app forwards a save or load to the central server through a Serve handle with them — and the
components cannot import the gateway, so they live here.

Design rules (upstream's native API forwarded any extra JSON key as a keyword argument into the model):

- one struct per operation, ``forbid_unknown_fields``: a misspelt field is a 400 naming it, never ignored;
- every training request may carry the client's ``seq_id``; the Model service runs a run's numbered requests
  in order and answers a repeated number from the first execution, which is what makes client retries safe;
- checkpoints are only ever named by ``twinkle://<run>/<kind>/<name>`` URIs (or a bare name for a save);
  no field anywhere takes a server path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from .limits import DEFAULT_LIMITS, MAX_JSON_SAFE_INT, RequestLimits, check_sampling
from .wire import Datum, LoraConfig, SamplingParams, UserError

T = TypeVar("T")

#: ``kind`` of a save on the wire → the checkpoint kind in URIs and the store.
SAVE_KINDS = {"state": "weights", "sampler": "sampler_weights"}

MiB = 1024 * 1024
#: Largest training/sampling body a component app accepts (a forward_backward batch as JSON).
MAX_BODY_BYTES = 64 * MiB
#: A client's ``seq_id``, bounded at decoding (``limits.check_seq_id`` applies a configured bound).
SeqId = Annotated[int, msgspec.Meta(ge=0, le=MAX_JSON_SAFE_INT)]


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class TrainRequest(_Body):
    """``forward`` and ``forward_backward`` of a run (the Tinker data conventions, see ``wire.Datum``)."""

    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float | str] | None = None
    seq_id: SeqId | None = None


class OptimStepRequest(_Body):
    """One AdamW step over the gradients accumulated since the last step (see ``wire.AdamParams``)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    seq_id: SeqId | None = None


class SaveRequest(_Body):
    """Save the run as checkpoint ``name``: ``state`` (adapter + optimizer: resumable) or ``sampler``
    (adapter only: what a sampler loads). ``ttl_seconds`` makes it expire."""

    name: str
    kind: Literal["state", "sampler"] = "state"
    optimizer: bool = True
    overwrite: bool = False
    ttl_seconds: int | None = None
    seq_id: SeqId | None = None


class LoadRequest(_Body):
    """Load a state checkpoint (``twinkle://<run>/weights/<name>``) into the run, optionally with its
    optimizer moments."""

    uri: str
    optimizer: bool = True
    seq_id: SeqId | None = None


class SampleParamsIn(_Body):
    """Sampling settings as JSON: ``temperature`` 0 is greedy; ``stop`` None stops at EOS, ``[]`` never
    stops early, else strings or token ids. (``wire.SamplingParams`` cannot be decoded from JSON as is: its
    ``stop`` is a union of two list types.)"""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str | int] | None = None

    def to_wire(self, *, num_samples: int = 1, limits: RequestLimits = DEFAULT_LIMITS) -> SamplingParams:
        """These settings as ``wire.SamplingParams``, checked by ``limits.check_sampling``."""
        stop: Any = self.stop
        if isinstance(stop, list) and stop:
            if all(isinstance(x, str) for x in stop):
                stop = [str(x) for x in stop]
            elif all(isinstance(x, int) and not isinstance(x, bool) for x in stop):
                stop = [int(x) for x in stop]
            else:
                raise UserError("must be all strings or all token ids, not a mix", field="sampling_params.stop")
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, seed=self.seed, stop=stop)
        return check_sampling(params, num_samples=num_samples, limits=limits)


class SampleRequestIn(_Body):
    """Sample ``num_samples`` continuations of ``prompt_tokens`` from the base model, or from the adapter
    of a checkpoint (``model_uri``, a ``twinkle://`` URI of either kind)."""

    prompt_tokens: list[int]
    sampling_params: SampleParamsIn = SampleParamsIn()
    num_samples: int = 1
    prompt_logprobs: bool = False
    model_uri: str | None = None


class FutureRef(msgspec.Struct):
    """A long operation was accepted: wait for ``request_id`` at the central server's ``/futures/{id}``.
    ``uri`` is the checkpoint a save will write; ``run_id`` the run it concerns."""

    request_id: str
    kind: str
    run_id: str | None = None
    uri: str | None = None


class RunState(msgspec.Struct):
    """A run as its Model service sees it now. ``next_seq_id`` is where a client that attaches to the run
    continues numbering its requests."""

    run_id: str
    base_model: str
    lora: LoraConfig
    step: int
    resident: bool
    next_seq_id: int


class ResolvedCheckpoint(msgspec.Struct, frozen=True):
    """What the central server tells a component about a checkpoint its caller may use: the directory
    (server side, never sent to clients) and what it holds."""

    uri: str
    run_id: str
    kind: str
    name: str
    path: str
    base_model: str


# --- decoding ------------------------------------------------------------------------------------------


def decode(body: bytes, type_: type[T], *, what: str = "request body", strict: bool = False) -> T:
    """Decode a JSON body into ``type_``; a mistake becomes a ``UserError`` naming the field.

    ``strict``: refuse top-level keys ``type_`` does not have, also for structs declared without
    ``forbid_unknown_fields`` (a misspelt option must not be silently ignored)."""
    if not body.strip():
        raise UserError(f"the {what} is empty; expected a JSON object")
    try:
        if strict:
            raw = msgspec.json.decode(body)
            if isinstance(raw, dict):
                unknown = sorted(set(raw) - set(getattr(type_, "__struct_fields__", raw)))
                if unknown:
                    raise UserError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected some of "
                                    f"{', '.join(type_.__struct_fields__)}", field=unknown[0])
            return msgspec.convert(raw, type_)
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        message, field = _split_validation(str(e))
        raise UserError(message, field=field) from None
    except msgspec.DecodeError as e:
        raise UserError(f"the {what} is not valid JSON ({e})") from None


def _split_validation(message: str) -> tuple[str, str | None]:
    """``"Expected `int`, got `str` - at `$.data[0].model_input[2]`"`` → (message, ``data[0].model_input[2]``)."""
    if " - at `$" in message:
        text, path = message.rsplit(" - at `$", 1)
        return text, path.rstrip("`").lstrip(".") or None
    return message, None


class SeqHeader(msgspec.Struct):
    """Just the ``seq_id`` of a numbered request whose body failed to decode (unknown fields ignored)."""

    seq_id: int | None = None


def peek_seq_id(body: bytes) -> int | None:
    try:
        seq = msgspec.json.decode(body, type=SeqHeader).seq_id
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return seq if seq is not None and 0 <= seq <= MAX_JSON_SAFE_INT else None

