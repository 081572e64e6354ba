"""Request limits and validation rules: the one owner of every bound a request is checked against.

Both protocol front ends and the engines call these functions, so a rule (what a LoRA rank may be, how many
samples one request may ask for, how long a stop string may be) is written once. Engines add only what only
they know: the vocabulary and the context window.

Contract:

- :class:`RequestLimits` holds every configurable bound, with defaults sized for a shared server; the YAML
  sets them under the central server's ``args.limits`` (``RequestLimits.from_args``), and
  ``msgspec.to_builtins(limits)`` is what capabilities advertise.
- Every ``check_*`` function is pure (no I/O, no allocation proportional to anything but its input), returns
  the value it checked (normalised where said) and raises :class:`~twinkle.common.wire.UserError` (400)
  naming the field, the limit and the value on the first mistake. Size checks run before any per-element
  work, so an oversized request costs no more than reading its sizes.
- Integers that reach storage or torch are bounded here: a value outside a bound is a 400, never an
  overflow deeper down (SQLite, ``datetime``, ``torch.tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .wire import AdamParams, ForwardBackwardInput, LoraConfig, SamplingParams, TensorData, UserError

#: Largest integer every JSON client reads back exactly (IEEE double, JavaScript's MAX_SAFE_INTEGER). Ids and
#: offsets above it would be rounded by such clients, and it leaves SQLite's signed 64 bits ample headroom.
MAX_JSON_SAFE_INT = 2**53 - 1
#: Token ids travel as int32 on the Tinker wire; no vocabulary comes near this.
MAX_TOKEN_ID = 2**31 - 1
#: Seeds go to ``torch.Generator.manual_seed`` and vLLM, which take a signed 64-bit value.
SEED_RANGE = (-(2**63), 2**63 - 1)
#: LoRA initialisation seeds (``torch.manual_seed``), as the checkpoint format records them.
LORA_SEED_RANGE = (0, 2**63 - 1)
#: ``max_tokens`` of a request that leaves it unset (before the engine caps it by the context window).
DEFAULT_MAX_TOKENS = 256
#: float32 is what per-token loss inputs become; a larger magnitude would turn into infinity.
_FLOAT32_MAX = 3.4028234663852886e38
#: The input whose values are token ids (the wire convention of ``wire.Datum``).
_TOKEN_INPUTS = frozenset({"target_tokens"})

_YEAR_S = 366 * 86400

Count = Annotated[int, Meta(ge=1)]


class RequestLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on one request. Every field is a positive count; None (where allowed) means "no bound here"."""

    max_datums: Count = 4096
    """Datums in one forward/forward_backward request."""
    max_tokens_per_request: Count = 1_048_576
    """``model_input`` tokens summed over a request's datums (e.g. 256 sequences of 4096 tokens)."""
    max_tokens_per_datum: Count | None = None
    """Tokens of one datum; None = the model's context length (the engine's bound)."""
    max_tensor_elements: Count = 1_048_576
    """Elements of one ``loss_fn_inputs`` tensor, dense or sparse (by its shape, checked before expanding)."""
    max_request_tensor_elements: Count = 8_388_608
    """Elements of all ``loss_fn_inputs`` tensors of a request together (8 inputs per token at the token cap)."""
    max_num_samples: Count = 128
    """Continuations of one prompt per sample request."""
    max_sample_tokens: Count = 1_048_576
    """``num_samples × max_tokens`` of one sample request (``max_tokens`` unset counts as 256)."""
    max_logprobs_k: Count = 20
    """k of ``topk_prompt_logprobs``, ``topk_sample_logprobs`` and ``prompt_alt_tokens_k`` (vLLM's default
    ``max_logprobs``)."""
    max_target_logprobs_k: Count = 1024
    """Columns of ``target_prompt_logprobs`` (token ids scored per prompt position)."""
    max_stop_count: Count = 1024
    """Entries of ``stop`` (strings or token ids)."""
    max_stop_string_chars: Count = 256
    """Characters of one stop string."""
    max_metadata_bytes: Count = 16384
    """``user_metadata`` as compact JSON, in bytes."""
    max_metadata_entries: Count = 64
    """Keys of ``user_metadata``."""
    max_tags: Count = 32
    """Tags on one run or session."""
    max_tag_chars: Count = 128
    """Characters of one tag."""
    max_lora_rank: Count = 1024
    """Largest LoRA rank a run may ask for."""
    max_seq_id: Annotated[int, Meta(ge=1, le=2**62)] = MAX_JSON_SAFE_INT
    """Largest ``seq_id`` (the smallest is 0). The default is the largest integer every JSON client reads
    exactly; more than 2**62 is refused because SQLite stores signed 64-bit integers and the server adds to
    seq ids."""
    max_ttl_s: Annotated[int, Meta(ge=1, le=100 * _YEAR_S)] = 10 * _YEAR_S
    """Longest checkpoint TTL in seconds (10 years); bounded so that every expiry time can be rendered."""
    max_page_size: Count = 1000
    """Most items one list request returns (a larger ``limit`` is capped to this)."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None) -> RequestLimits:
        """Limits from a YAML mapping (missing keys keep their defaults); a ``ValueError`` names the bad key."""
        if args is None:
            return cls()
        if not isinstance(args, Mapping):
            raise ValueError(f"limits: expected a mapping of limit names to numbers, got {type(args).__name__}")
        unknown = sorted(str(k) for k in args if k not in cls.__struct_fields__)
        if unknown:
            raise ValueError(f"limits.{unknown[0]}: unknown limit; known: {', '.join(cls.__struct_fields__)}")
        try:
            return msgspec.convert(dict(args), cls)
        except msgspec.ValidationError as e:
            text = str(e)
            message, _, where = text.partition(" - at `$.")
            key = where.rstrip("`").split(".")[0].split("[")[0]
            if key in args:
                got = f" {args[key]!r}" if ", got `" in message else f", got {args[key]!r}"
                raise ValueError(f"limits.{key}: {message}{got}") from None
            raise ValueError(f"limits: {text}") from None


DEFAULT_LIMITS = RequestLimits()


# --------------------------------------------------------------------------------------------- helpers


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(value: object, field: str) -> float:
    if not _is_number(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise UserError(f"expected a finite number, got {value!r}", field=field)
    return float(value)  # type: ignore[arg-type]


def _int_in(value: object, lo: int, hi: int, field: str, what: str = "an integer") -> int:
    if not _is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise UserError(f"must be {what} in [{lo}, {hi}], got {value!r}", field=field)
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- training


def check_lora(cfg: LoraConfig, field: str = "lora_config", *, limits: RequestLimits = DEFAULT_LIMITS) -> LoraConfig:
    """A LoRA config any backend can honour: rank in [1, ``max_lora_rank``], positive finite alpha, dropout
    in [0, 1), a seed in ``LORA_SEED_RANGE`` (or None), and at least one trained module group."""
    _int_in(cfg.rank, 1, limits.max_lora_rank, f"{field}.rank", "an integer rank")
    if _finite(cfg.alpha, f"{field}.alpha") <= 0:
        raise UserError(f"must be a positive number, got {cfg.alpha!r}", field=f"{field}.alpha")
    if not 0.0 <= _finite(cfg.dropout, f"{field}.dropout") < 1.0:
        raise UserError(f"must be in [0, 1), got {cfg.dropout!r}", field=f"{field}.dropout")
    if cfg.seed is not None:
        _int_in(cfg.seed, *LORA_SEED_RANGE, f"{field}.seed")
    if not (cfg.train_attn or cfg.train_mlp or cfg.train_unembed):
        raise UserError("at least one of train_attn, train_mlp and train_unembed must be true",
                        field=f"{field}.train_attn")
    return cfg


def check_adam(params: AdamParams, field: str = "adam_params") -> AdamParams:
    """AdamW settings that cannot corrupt weights: all finite; ``learning_rate``, ``weight_decay`` and
    ``grad_clip_norm`` (0 = no clipping) >= 0; betas in [0, 1); ``eps`` > 0 (0 divides zero moments by zero,
    turning a parameter without gradient into NaN)."""
    for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        _finite(getattr(params, name), f"{field}.{name}")
    for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
        if getattr(params, name) < 0:
            raise UserError(f"must be >= 0, got {getattr(params, name)!r}", field=f"{field}.{name}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(params, name) < 1.0:
            raise UserError(f"must be in [0, 1), got {getattr(params, name)!r}", field=f"{field}.{name}")
    if not params.eps > 0:
        raise UserError(f"must be > 0, got {params.eps!r}", field=f"{field}.eps")
    return params


def check_tensor_shape(shape: Sequence[int] | None, limits: RequestLimits = DEFAULT_LIMITS, field: str = "tensor",
                       *, data_len: int | None = None) -> int:
    """The element count of a tensor of ``shape`` (None = 1-D of ``data_len``), refused above
    ``max_tensor_elements``. Call it before expanding a sparse tensor: it reads only the shape."""
    if shape is None:
        if data_len is None:
            raise UserError("a tensor needs a shape or data", field=field)
        shape = [data_len]
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 8:
        raise UserError(f"shape must be a list of 1 to 8 dimensions, got {shape!r}", field=f"{field}.shape")
    count = 1
    for i, dim in enumerate(shape):
        if not _is_int(dim) or dim < 0:
            raise UserError(f"dimension {i} must be an integer >= 0, got {dim!r}", field=f"{field}.shape")
        count *= dim
    if count > limits.max_tensor_elements:
        raise UserError(f"shape {list(shape)} holds {count} elements; the limit is {limits.max_tensor_elements} "
                        "(max_tensor_elements)", field=f"{field}.shape")
    return count


def check_train_input(inp: ForwardBackwardInput, limits: RequestLimits = DEFAULT_LIMITS, *,
                      max_tokens_per_datum: int | None = None) -> ForwardBackwardInput:
    """Bound a forward/backward request: datum count, tokens per datum (the tighter of
    ``limits.max_tokens_per_datum`` and ``max_tokens_per_datum``, e.g. the model's context), tokens per
    request, tensor sizes, token ids in [0, ``MAX_TOKEN_ID``], int64 inputs integral and in range, float
    inputs finite and within float32. The vocabulary is the engine's to check."""
    data = inp.data
    if len(data) > limits.max_datums:
        raise UserError(f"{len(data)} datums; the limit is {limits.max_datums} (max_datums)", field="data")
    per_datum = [x for x in (limits.max_tokens_per_datum, max_tokens_per_datum) if x is not None]
    datum_cap = min(per_datum) if per_datum else None
    total = 0
    for i, datum in enumerate(data):
        n = len(datum.model_input)
        if datum_cap is not None and n > datum_cap:
            raise UserError(f"{n} tokens; the limit per datum is {datum_cap}", field=f"data[{i}].model_input")
        total += n
    if total > limits.max_tokens_per_request:
        raise UserError(f"{total} tokens in the request; the limit is {limits.max_tokens_per_request} "
                        "(max_tokens_per_request)", field="data")
    elements = 0
    for i, datum in enumerate(data):
        for name, td in datum.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs.{name}"
            count = check_tensor_shape(td.shape, limits, where, data_len=len(td.data))
            if count != len(td.data):
                raise UserError(f"shape {td.resolved_shape()} holds {count} values but data has {len(td.data)}",
                                field=where)
            elements += count
    if elements > limits.max_request_tensor_elements:
        raise UserError(f"{elements} loss input elements in the request; the limit is "
                        f"{limits.max_request_tensor_elements} (max_request_tensor_elements)", field="data")
    for i, datum in enumerate(data):
        _check_ints(datum.model_input, 0, MAX_TOKEN_ID, f"data[{i}].model_input", "token id")
        for name, td in datum.loss_fn_inputs.items():
            _check_tensor_values(td, name, f"data[{i}].loss_fn_inputs.{name}")
    return inp


def _check_tensor_values(td: TensorData, name: str, field: str) -> None:
    if td.dtype == "int64":
        lo, hi, what = (0, MAX_TOKEN_ID, "token id") if name in _TOKEN_INPUTS else (*SEED_RANGE, "int64 value")
        _check_ints(td.data, lo, hi, field, what)
    elif td.dtype == "float32":
        _check_floats(td.data, field)
    else:
        raise UserError(f"dtype must be int64 or float32, got {td.dtype!r}", field=field)


def _first_bad(values: Sequence[Any], ok) -> tuple[int, Any]:
    return next(((k, v) for k, v in enumerate(values) if not ok(v)), (0, values[0]))


def _check_ints(values: Sequence[Any], lo: int, hi: int, field: str, what: str) -> None:
    """Every value an integer in [lo, hi]; min/max/sum run in C, the element loop only to name a bad one."""
    def ok(v: Any) -> bool:
        return (_is_int(v) or (isinstance(v, float) and v.is_integer())) and lo <= v <= hi

    if not values:
        return
    try:
        fine = lo <= min(values) and max(values) <= hi
        # A float anywhere makes the sum a float; only then is the slower per-element check needed.
        if fine and not _is_int(sum(values)):
            fine = all(map(ok, values))
    except (TypeError, OverflowError):
        fine = False
    if not fine:
        k, v = _first_bad(values, ok)
        raise UserError(f"{what} {v!r} at index {k} is outside [{lo}, {hi}]", field=field)


def _check_floats(values: Sequence[Any], field: str) -> None:
    """Every value a finite number within float32 (a NaN or an infinity makes the sum non-finite)."""
    def ok(v: Any) -> bool:
        return _is_number(v) and -_FLOAT32_MAX <= v <= _FLOAT32_MAX  # NaN and infinities compare False

    if not values:
        return
    try:
        fine = -_FLOAT32_MAX <= min(values) and max(values) <= _FLOAT32_MAX and math.isfinite(sum(values))
    except (TypeError, OverflowError):
        fine = False
    if not fine:
        k, v = _first_bad(values, ok)
        raise UserError(f"value {v!r} at index {k} is not a finite float32 number", field=field)


# --------------------------------------------------------------------------------------------- sampling


def check_sampling(params: SamplingParams, *, num_samples: int, limits: RequestLimits = DEFAULT_LIMITS,
                   field: str = "sampling_params") -> SamplingParams:
    """Sampling settings, engine-independent: ``num_samples`` in [1, ``max_num_samples``]; ``max_tokens``
    None or >= 1 with ``num_samples × max_tokens`` <= ``max_sample_tokens``; ``temperature`` finite >= 0
    (0 = greedy); ``top_p`` in (0, 1]; ``top_k`` -1 (off) or >= 1; ``seed`` in ``SEED_RANGE``; ``stop``
    None, a string, a list of strings or a list of token ids (not mixed), at most ``max_stop_count`` entries,
    strings non-empty and at most ``max_stop_string_chars`` long, ids in [0, ``MAX_TOKEN_ID``].
    ``num_samples`` errors name the field ``num_samples``, the others ``<field>.<name>``."""
    _int_in(num_samples, 1, limits.max_num_samples, "num_samples")
    if params.max_tokens is not None and (not _is_int(params.max_tokens) or params.max_tokens < 1):
        raise UserError(f"must be an integer >= 1, got {params.max_tokens!r}", field=f"{field}.max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens
    if num_samples * max_tokens > limits.max_sample_tokens:
        raise UserError(f"num_samples × max_tokens = {num_samples} × {max_tokens} = {num_samples * max_tokens}; "
                        f"the limit is {limits.max_sample_tokens} (max_sample_tokens)", field=f"{field}.max_tokens")
    if _finite(params.temperature, f"{field}.temperature") < 0:
        raise UserError(f"must be >= 0 (0 = greedy), got {params.temperature!r}", field=f"{field}.temperature")
    if not 0 < _finite(params.top_p, f"{field}.top_p") <= 1:
        raise UserError(f"must be in (0, 1], got {params.top_p!r}", field=f"{field}.top_p")
    if not _is_int(params.top_k) or not (params.top_k == -1 or params.top_k >= 1):
        raise UserError(f"must be -1 (off) or an integer >= 1, got {params.top_k!r}", field=f"{field}.top_k")
    if params.seed is not None:
        _int_in(params.seed, *SEED_RANGE, f"{field}.seed")
    _check_stop(params.stop, limits, f"{field}.stop")
    return params


def _check_stop(stop: Any, limits: RequestLimits, field: str) -> None:
    if stop is None:
        return
    if isinstance(stop, str):
        entries: Sequence[Any] = [stop]
    elif isinstance(stop, (list, tuple)):
        entries = stop
        if len(entries) > limits.max_stop_count:
            raise UserError(f"{len(entries)} entries; the limit is {limits.max_stop_count} (max_stop_count)",
                            field=field)
        if not (all(isinstance(s, str) for s in entries) or all(_is_int(s) for s in entries)):
            raise UserError("must be all strings or all token ids, not a mix", field=field)
    else:
        raise UserError(f"must be a string, a list of strings or a list of token ids, got {stop!r}", field=field)
    for i, s in enumerate(entries):
        where = field if isinstance(stop, str) else f"{field}[{i}]"
        if isinstance(s, str):
            if not s:
                raise UserError("a stop string must not be empty", field=where)
            if len(s) > limits.max_stop_string_chars:
                raise UserError(f"a stop string of {len(s)} characters; the limit is {limits.max_stop_string_chars} "
                                "(max_stop_string_chars)", field=where)
        else:
            _int_in(s, 0, MAX_TOKEN_ID, where, "a token id")


# --------------------------------------------------------------------------------------------- control plane


def check_seq_id(seq_id: int | None, *, limits: RequestLimits = DEFAULT_LIMITS, field: str = "seq_id") -> int | None:
    """A request's ``seq_id``: None (unnumbered) or an integer in [0, ``max_seq_id``]."""
    if seq_id is None:
        return None
    return _int_in(seq_id, 0, limits.max_seq_id, field)


def check_ttl(ttl_seconds: int | float | None, *, limits: RequestLimits = DEFAULT_LIMITS,
              field: str = "ttl_seconds") -> int | float | None:
    """A TTL in seconds: None (never expires) or a finite number in (0, ``max_ttl_s``], returned unchanged."""
    if ttl_seconds is None:
        return None
    if not _is_number(ttl_seconds) or not math.isfinite(ttl_seconds) or not 0 < ttl_seconds <= limits.max_ttl_s:
        raise UserError(f"must be a positive number of seconds up to {limits.max_ttl_s} (or null for no expiry), "
                        f"got {ttl_seconds!r}", field=field)
    return ttl_seconds


def check_metadata(metadata: Mapping[str, Any] | None, *, limits: RequestLimits = DEFAULT_LIMITS,
                   field: str = "user_metadata") -> Mapping[str, Any] | None:
    """``user_metadata``: None or a JSON object with string keys, at most ``max_metadata_entries`` keys and
    ``max_metadata_bytes`` bytes as compact JSON."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise UserError(f"must be a JSON object, got {type(metadata).__name__}", field=field)
    if len(metadata) > limits.max_metadata_entries:
        raise UserError(f"{len(metadata)} entries; the limit is {limits.max_metadata_entries} (max_metadata_entries)",
                        field=field)
    for key in metadata:
        if not isinstance(key, str):
            raise UserError(f"keys must be strings, got {key!r}", field=field)
    try:
        size = len(msgspec.json.encode(metadata))
    except (TypeError, ValueError, OverflowError) as e:
        raise UserError(f"must be plain JSON ({e})", field=field) from None
    if size > limits.max_metadata_bytes:
        raise UserError(f"{size} bytes as JSON; the limit is {limits.max_metadata_bytes} (max_metadata_bytes)",
                        field=field)
    return metadata


def check_tags(tags: Sequence[str] | None, *, limits: RequestLimits = DEFAULT_LIMITS, field: str = "tags") -> list[str]:
    """Tags: at most ``max_tags`` strings of at most ``max_tag_chars`` characters each (None = none)."""
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise UserError(f"must be a list of strings, got {type(tags).__name__}", field=field)
    if len(tags) > limits.max_tags:
        raise UserError(f"{len(tags)} tags; the limit is {limits.max_tags} (max_tags)", field=field)
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise UserError(f"must be a string, got {tag!r}", field=f"{field}[{i}]")
        if len(tag) > limits.max_tag_chars:
            raise UserError(f"a tag of {len(tag)} characters; the limit is {limits.max_tag_chars} (max_tag_chars)",
                            field=f"{field}[{i}]")
    return list(tags)


def check_page(limit: int | None, offset: int | None, *, limits: RequestLimits = DEFAULT_LIMITS,
               default: int = 20) -> tuple[int, int]:
    """(limit, offset) of a list request: ``limit`` >= 1 (None = ``default``), capped at ``max_page_size``;
    ``offset`` in [0, ``MAX_JSON_SAFE_INT``] (None = 0)."""
    if limit is not None:
        _int_in(limit, 1, MAX_JSON_SAFE_INT, "limit")
    if offset is not None:
        _int_in(offset, 0, MAX_JSON_SAFE_INT, "offset")
    return min(default if limit is None else limit, limits.max_page_size), (offset or 0)
