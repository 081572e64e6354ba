"""The ``tinker_public`` protobuf schema, built at import time, and the codec between it and our wire types.

Why build the descriptors here instead of importing ``tinker.proto.tinker_public_pb2``: the server must not
depend on the client SDK at runtime (its releases would pin ours, and it drags in pydantic/httpx), and the
schema is small and stable. The field numbers below are exactly those of the SDK's compiled descriptor
(``tests/test_tinker_proto.py`` compares both, field by field, and round-trips messages between them).

The messages live in a private ``DescriptorPool`` so that a process which also imports the official SDK
(the tests do) does not get a "duplicate file name" conflict in the default pool.

Only two directions matter on the wire:

- requests: ``ForwardBackwardRequest`` (the SDK always sends forward/backward as protobuf since 0.25);
- results: ``ForwardBackwardOutput`` and ``SampleResponse`` (the SDK asks for them with
  ``Accept: application/x-protobuf`` and refuses JSON for them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from twinkle.common.limits import DEFAULT_LIMITS, RequestLimits, check_tensor_shape
from twinkle.common.wire import (
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    SampleOutput,
    TensorData,
    TopK,
    UserError,
)

from .stability import Span, TrainingData

PACKAGE = "tinker_public"
FILE_NAME = "tinker_public.proto"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT,
    "int64": _F.TYPE_INT64,
    "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32,
    "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [
        ("DTYPE_UNSPECIFIED", 0),
        ("DTYPE_FLOAT32", 1),
        ("DTYPE_INT64", 2),
        ("DTYPE_INT32", 3),
        ("DTYPE_BFLOAT16", 4),
    ],
}

# (name, number, type, flags) where flags: "repeated", "optional" (proto3 optional), "oneof:<name>",
# "map:<key>" (a map<key, type>). The order of oneofs follows the SDK's descriptor: real oneofs first,
# then the synthetic ``_<field>`` oneofs of proto3 optional fields, in field order.
_MESSAGES: list[tuple[str, list[tuple[str, int, str, str]]]] = [
    ("SampleResponse", [
        ("sequences", 1, "SampledSequence", "repeated"),
        ("prompt_logprobs", 2, "bytes", "optional"),
        ("topk_prompt_logprobs", 3, "TopkLogprobs", "optional"),
        ("prompt_cache_hit_tokens", 4, "int32", ""),
        ("target_prompt_logprobs", 5, "Tensor", "optional"),
        ("prompt_alt_tokens", 6, "PromptAltTokens", "optional"),
    ]),
    ("PromptAltTokens", [("tokens", 1, "Tensor", ""), ("logprobs", 2, "Tensor", "")]),
    ("SampledSequence", [
        ("stop_reason", 1, "StopReason", ""),
        ("tokens", 2, "bytes", ""),
        ("logprobs", 3, "bytes", "optional"),
        ("topk_sampled_logprobs", 4, "TopkLogprobs", "optional"),
    ]),
    ("TopkLogprobs", [
        ("token_ids", 1, "bytes", ""), ("logprobs", 2, "bytes", ""), ("k", 3, "uint32", ""),
        ("length", 4, "uint32", ""),
    ]),
    ("SparseCsr", [("values", 1, "bytes", ""), ("crow_indices", 2, "bytes", ""), ("col_indices", 3, "bytes", "")]),
    ("Tensor", [
        ("dense", 1, "bytes", "oneof:encoding"),
        ("sparse_csr", 2, "SparseCsr", "oneof:encoding"),
        ("dtype", 3, "DType", ""),
        ("shape", 4, "int64", "repeated"),
    ]),
    ("BatchedTensor", [
        ("data", 1, "bytes", ""), ("offsets", 2, "bytes", ""), ("dtype", 3, "DType", ""),
        ("trailing_shape", 4, "int64", "repeated"),
    ]),
    ("ArrayRecord", [
        ("type_tag", 1, "string", ""), ("fields", 2, "BatchedTensor", "map:string"), ("num_datums", 3, "int64", ""),
    ]),
    ("ForwardBackwardOutput", [
        ("loss_fn_output_type", 1, "string", ""),
        ("loss_fn_outputs", 2, "ArrayRecord", "repeated"),
        ("metrics", 3, "double", "map:string"),
    ]),
    ("ForwardBackwardRequest", [
        ("model_id", 1, "string", ""),
        ("seq_id", 2, "int32", ""),
        ("data", 3, "Datum", "repeated"),
        ("loss_fn", 4, "string", ""),
        ("loss_fn_config", 5, "double", "map:string"),
        ("forward_only", 6, "bool", ""),
        ("loss_fn_config_v2", 7, "LossConfigValue", "map:string"),
    ]),
    ("LossConfigValue", [("number", 1, "double", "oneof:value"), ("text", 2, "string", "oneof:value")]),
    ("Datum", [
        ("model_input", 1, "Chunk", "repeated"),
        ("loss_fn_inputs", 2, "Tensor", "map:string"),
        ("model_input_spans", 3, "ProvenanceSpan", "repeated"),
        ("loss_fn_input_spans", 4, "ProvenanceSpan", "repeated"),
    ]),
    ("ProvenanceSpan", [
        ("prompt_tokens", 1, "PromptProvenanceSpan", "oneof:span"),
        ("sampled_tokens", 2, "SampledProvenanceSpan", "oneof:span"),
    ]),
    ("PromptProvenanceSpan", [("sequence_id", 1, "string", ""), ("offset", 2, "int64", ""),
                              ("length", 3, "int64", "")]),
    ("SampledProvenanceSpan", [("sequence_id", 1, "string", ""), ("offset", 2, "int64", ""),
                               ("length", 3, "int64", "")]),
    ("Chunk", [
        ("encoded_text", 1, "EncodedTextChunk", "oneof:chunk"),
        ("image", 2, "ImageChunk", "oneof:chunk"),
        ("dmel", 3, "DmelChunk", "oneof:chunk"),
    ]),
    ("EncodedTextChunk", [("tokens", 1, "bytes", "")]),
    ("ImageChunk", [
        ("data", 1, "bytes", ""), ("format", 2, "string", ""), ("expected_tokens", 3, "int32", "optional"),
        ("override_dimensions", 4, "ImageDimensions", "optional"),
    ]),
    ("ImageDimensions", [("width", 1, "uint32", ""), ("height", 2, "uint32", "")]),
    ("DmelChunk", [("dmel", 1, "bytes", "")]),
    ("SamplingParams", [
        ("max_tokens", 1, "int32", "optional"),
        ("seed", 2, "uint64", "optional"),
        ("temperature", 3, "float", "optional"),
        ("top_k", 4, "int32", "optional"),
        ("top_p", 5, "float", "optional"),
        ("stop_strs", 6, "StopStrings", "oneof:stop"),
        ("stop_tokens", 7, "StopTokens", "oneof:stop"),
    ]),
    ("StopStrings", [("values", 1, "string", "repeated")]),
    ("StopTokens", [("values", 1, "int32", "repeated")]),
]


def _set_type(field: descriptor_pb2.FieldDescriptorProto, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name in _ENUMS:
        field.type = _F.TYPE_ENUM
        field.type_name = f".{PACKAGE}.{type_name}"
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{type_name}"


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The ``tinker_public.proto`` file, as the SDK's compiled descriptor describes it."""
    fd = descriptor_pb2.FileDescriptorProto(name=FILE_NAME, package=PACKAGE, syntax="proto3")
    for msg_name, fields in _MESSAGES:
        msg = fd.message_type.add(name=msg_name)
        real_oneofs: list[str] = [f.split(":", 1)[1] for *_, f in fields if f.startswith("oneof:")]
        real_oneofs = list(dict.fromkeys(real_oneofs))
        for oneof in real_oneofs:
            msg.oneof_decl.add(name=oneof)
        for name, number, type_name, flags in fields:
            field = msg.field.add(name=name, number=number)
            if flags.startswith("map:"):
                entry = msg.nested_type.add(name=f"{_camel(name)}Entry")
                entry.options.map_entry = True
                key = entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL)
                _set_type(key, flags.split(":", 1)[1])
                value = entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
                _set_type(value, type_name)
                field.label = _F.LABEL_REPEATED
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{msg_name}.{entry.name}"
                continue
            _set_type(field, type_name)
            field.label = _F.LABEL_REPEATED if flags == "repeated" else _F.LABEL_OPTIONAL
            if flags.startswith("oneof:"):
                field.oneof_index = real_oneofs.index(flags.split(":", 1)[1])
        # proto3 optional fields get synthetic oneofs, declared after the real ones.
        for field in msg.field:
            spec = next(f for f in fields if f[0] == field.name)
            if spec[3] == "optional":
                field.proto3_optional = True
                field.oneof_index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=f"_{field.name}")
    for enum_name, values in _ENUMS.items():
        enum = fd.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    return fd


_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(build_file_descriptor())


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequestPb = _message("ForwardBackwardRequest")
ForwardBackwardOutputPb = _message("ForwardBackwardOutput")
SampleResponsePb = _message("SampleResponse")
TensorPb = _message("Tensor")
DatumPb = _message("Datum")

DTYPE_FLOAT32 = 1
DTYPE_INT64 = 2
DTYPE_INT32 = 3
DTYPE_BFLOAT16 = 4
_NP_BY_DTYPE = {
    DTYPE_FLOAT32: np.dtype("<f4"),
    DTYPE_INT64: np.dtype("<i8"),
    DTYPE_INT32: np.dtype("<i4"),
}
_PUBLIC_DTYPE = {DTYPE_FLOAT32: "float32", DTYPE_INT64: "int64", DTYPE_INT32: "int64"}
_STOP_REASON = {"stop": 0, "length": 1}


# ------------------------------------------------------------------------------------ requests


class DecodedForwardBackward:
    """A forward/backward submission. The header (model, seq_id) is decoded at once; the data only by
    ``input()``, so that a request whose data is wrong can still be attributed to its ``seq_id``."""

    __slots__ = ("model_id", "seq_id", "forward_only", "_msg")

    def __init__(self, msg: Any) -> None:
        self._msg = msg
        self.model_id: str = msg.model_id
        self.seq_id: int = int(msg.seq_id)
        self.forward_only: bool = bool(msg.forward_only)

    def input(self, limits: RequestLimits = DEFAULT_LIMITS) -> ForwardBackwardInput:
        return self.decode(limits).input

    def decode(self, limits: RequestLimits = DEFAULT_LIMITS) -> TrainingData:
        """The data and its provenance, bounded by ``limits`` while it is decoded (sparse tensors by their
        shape, before they are expanded)."""
        msg = self._msg
        if len(msg.data) > limits.max_datums:
            raise UserError(f"{len(msg.data)} datums; the limit is {limits.max_datums} (max_datums)", field="data")
        config: dict[str, float | str] | None = None
        if msg.loss_fn_config_v2:
            config = {}
            for key, value in msg.loss_fn_config_v2.items():
                kind = value.WhichOneof("value")
                config[key] = value.text if kind == "text" else float(value.number)
        elif msg.loss_fn_config:
            config = {key: float(value) for key, value in msg.loss_fn_config.items()}
        budget = ElementBudget(limits)
        decoded = [_datum_from_proto(d, f"data[{i}]", budget) for i, d in enumerate(msg.data)]
        return TrainingData(
            ForwardBackwardInput(data=[d for d, _ in decoded], loss_fn=msg.loss_fn or "cross_entropy",
                                 loss_fn_config=config),
            [p for _, p in decoded])


def parse_forward_backward(body: bytes) -> DecodedForwardBackward:
    """Decode a ``ForwardBackwardRequest``; raise ``UserError`` if it is not one."""
    msg = ForwardBackwardRequestPb()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or ValueError depending on backend
        raise UserError(f"body is not a valid tinker_public.ForwardBackwardRequest protobuf message ({e})") from None
    if not msg.model_id:
        raise UserError("is required", field="model_id")
    return DecodedForwardBackward(msg)


def peek_header(prefix: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) from the first bytes of a ``ForwardBackwardRequest`` too large to read whole.

    Serializers write fields in number order, so ``model_id`` (1) and ``seq_id`` (2) lead the message; this
    reads just those two, and gives up (None) on anything unexpected.
    """
    pos, model_id, seq_id = 0, None, 0
    try:
        while pos < len(prefix):
            key, pos = _varint(prefix, pos)
            field, wire = key >> 3, key & 7
            if field == 1 and wire == 2:
                length, pos = _varint(prefix, pos)
                if pos + length > len(prefix):
                    return None
                model_id = prefix[pos:pos + length].decode()
                pos += length
            elif field == 2 and wire == 0:
                value, pos = _varint(prefix, pos)
                seq_id = value - (1 << 64) if value >= 1 << 63 else value
            else:
                break
    except (IndexError, UnicodeDecodeError):
        return None
    return (model_id, seq_id) if model_id else None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _datum_from_proto(d: Any, where: str, budget: "ElementBudget") -> tuple[Datum, list[Span] | None]:
    """The datum, and its ``loss_fn_input_spans`` (None without provenance)."""
    tokens: list[int] = []
    for j, chunk in enumerate(d.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise UserError(
                f"{kind or 'empty'} chunks are not supported; this server's models take text tokens only",
                field=f"{where}.model_input.chunks[{j}]",
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise UserError("tokens must be little-endian int32 bytes", field=f"{where}.model_input.chunks[{j}]")
        tokens.extend(np.frombuffer(raw, dtype="<i4").tolist())
    inputs = {name: tensor_from_proto(t, f"{where}.loss_fn_inputs.{name}", budget)
              for name, t in d.loss_fn_inputs.items()}
    spans = None
    if d.model_input_spans or d.loss_fn_input_spans:
        targets = inputs.get("target_tokens")
        rows = len(targets.data) if targets is not None else None  # the loss then fails on its inputs
        _check_provenance(d.model_input_spans, len(tokens), len(tokens), f"{where}.model_input_spans")
        spans = _check_provenance(d.loss_fn_input_spans, rows, len(tokens), f"{where}.loss_fn_input_spans")
    return Datum(model_input=tokens, loss_fn_inputs=inputs), spans


_MAX_SEQUENCE_ID_CHARS = 256


def _check_provenance(spans: Any, length: int | None, positions: int, where: str) -> list[Span]:
    """Provenance spans (SDK 0.38 ``Datum.with_provenance``, which tinker-cookbook's RL recipes attach to every
    datum): consecutive runs, each naming a sampled sequence, whose lengths tile the field exactly. Only
    ``stable_reinforce`` reads them (``stability.py``); other losses ignore them once checked. ``length``: the
    positions the spans must tile (None: unknown); ``positions``: the datum's length, which bounds how many
    spans are read at all."""
    if not spans:
        raise UserError("provenance comes as a pair: give both model_input_spans and loss_fn_input_spans, or "
                        "neither", field=where)
    if len(spans) > 2 * max(positions, length or 0) + 8:
        raise UserError(f"{len(spans)} spans for a datum of {positions} positions", field=where)
    total = 0
    out: list[Span] = []
    for k, span in enumerate(spans):
        kind = span.WhichOneof("span")
        if kind is None:
            raise UserError("a span must be prompt_tokens or sampled_tokens", field=f"{where}[{k}]")
        run = getattr(span, kind)
        if not run.sequence_id or len(run.sequence_id) > _MAX_SEQUENCE_ID_CHARS:
            raise UserError(f"sequence_id must have 1 to {_MAX_SEQUENCE_ID_CHARS} characters",
                            field=f"{where}[{k}].sequence_id")
        if run.offset < 0 or run.length < 0:
            raise UserError("offset and length must be >= 0", field=f"{where}[{k}]")
        total += run.length
        out.append(Span(sampled=kind == "sampled_tokens", sequence_id=run.sequence_id, offset=int(run.offset),
                        length=int(run.length)))
    if length is not None and total != length:
        raise UserError(f"the spans cover {total} positions but the field has {length}; they must tile it exactly",
                        field=where)
    return out


class ElementBudget:
    """Elements of a request's loss inputs, counted from shapes as they are decoded: each tensor within
    ``max_tensor_elements``, all together within ``max_request_tensor_elements``."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.used = 0

    def take(self, shape: list[int] | None, where: str, *, data_len: int) -> None:
        self.used += check_tensor_shape(shape, self.limits, where, data_len=data_len)
        if self.used > self.limits.max_request_tensor_elements:
            raise UserError(f"more than {self.limits.max_request_tensor_elements} loss input elements in the "
                            "request (max_request_tensor_elements)", field=where)


def tensor_from_proto(t: Any, where: str, budget: ElementBudget) -> TensorData:
    """A proto ``Tensor`` (dense or sparse CSR) as a dense ``TensorData``. CSR cells not listed are 0, which is
    what the SDK's auto-sparsified ``target_tokens``/``weights`` mean."""
    np_dtype = _NP_BY_DTYPE.get(t.dtype)
    if np_dtype is None or t.dtype == DTYPE_INT32:
        raise UserError(f"unsupported dtype {t.dtype}; requests use float32 or int64", field=where)
    public = _PUBLIC_DTYPE[t.dtype]
    shape = [int(s) for s in t.shape] or None
    kind = t.WhichOneof("encoding")
    budget.take(shape, where, data_len=len(t.dense) // np_dtype.itemsize if kind == "dense" else 0)
    if kind == "sparse_csr":
        csr = t.sparse_csr
        if not shape or len(shape) != 2:
            raise UserError("a sparse CSR tensor needs a 2-D shape", field=where)
        values = _frombuffer(csr.values, np_dtype, where)
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), where)
        cols = _frombuffer(csr.col_indices, np.dtype("<i8"), where)
        rows, ncols = shape
        if (len(crow) != rows + 1 or len(cols) != len(values) or crow[0] != 0 or crow[-1] != len(values)
                or bool((np.diff(crow) < 0).any())):
            raise UserError("inconsistent sparse CSR indices", field=where)
        if len(cols) and (cols.min() < 0 or cols.max() >= ncols):
            raise UserError("sparse CSR column index out of range", field=where)
        dense = np.zeros((rows, ncols), dtype=np_dtype)
        row_of = np.repeat(np.arange(rows), np.diff(crow))
        dense[row_of, cols] = values
        return TensorData(data=dense.reshape(-1).tolist(), dtype=public, shape=shape)
    values = _frombuffer(t.dense if kind == "dense" else b"", np_dtype, where)
    if shape is not None and math.prod(shape) != len(values):
        raise UserError(f"shape {shape} does not match the {len(values)} values given", field=where)
    return TensorData(data=values.tolist(), dtype=public, shape=shape)


def _frombuffer(raw: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise UserError(f"byte length {len(raw)} is not a multiple of {dtype.itemsize} ({dtype.name})", field=where)
    return np.frombuffer(raw, dtype=dtype)


# ------------------------------------------------------------------------------------ results


def encode_forward_backward_output(out: ForwardBackwardOutput) -> bytes:
    """One ``ArrayRecord`` per run of datums whose fields share dtype and trailing shape (usually one).

    Each field is a ``BatchedTensor``: the datums' values concatenated, with int64 *byte* offsets.
    """
    msg = ForwardBackwardOutputPb()
    msg.loss_fn_output_type = out.loss_fn_output_type or "ArrayRecord"
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    for group in _rectangular_groups(out.loss_fn_outputs):
        record = msg.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(group)
        if not group or not group[0]:
            continue
        for name in group[0]:
            arrays = [_tensor_array(d[name]) for d in group]
            bt = record.fields[name]
            bt.dtype = DTYPE_INT64 if arrays[0].dtype == np.int64 else DTYPE_FLOAT32
            trailing = group[0][name].resolved_shape()[1:]
            bt.trailing_shape.extend(trailing)
            sizes = np.fromiter((a.nbytes for a in arrays), dtype=np.int64, count=len(arrays))
            bt.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8").tobytes()
            bt.data = b"".join(a.tobytes() for a in arrays)
    return msg.SerializeToString()


def _tensor_array(t: TensorData) -> np.ndarray:
    return np.asarray(t.data, dtype="<i8" if t.dtype == "int64" else "<f4")


def _rectangular_groups(outputs: list[dict[str, TensorData]]) -> list[list[dict[str, TensorData]]]:
    """Split datums where the set of fields, a dtype or a trailing shape changes (the SDK accepts several
    records and takes datums in order across them)."""
    groups: list[list[dict[str, TensorData]]] = []
    last_sig: Any = None
    for d in outputs:
        sig = tuple(sorted((k, v.dtype, tuple(v.resolved_shape()[1:])) for k, v in d.items()))
        if not groups or sig != last_sig:
            groups.append([])
            last_sig = sig
        groups[-1].append(d)
    return groups or [[]]


def encode_sample_output(out: SampleOutput) -> bytes:
    """``SampleResponse``: int32 tokens, float32 logprobs per sequence; prompt logprobs with NaN where a
    position has none (the first); top-k rows as dense ``(length, k)`` matrices with the SDK's sentinel
    (id 0, logprob -99999) where a position has none; chosen-id logprobs and prompt draws as dense tensors."""
    msg = SampleResponsePb()
    for seq in out.sequences:
        s = msg.sequences.add()
        s.stop_reason = _STOP_REASON[seq.stop_reason]
        s.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        # Always present (RL loops assert logprobs is not None); an empty sequence has empty bytes.
        s.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
        if seq.topk is not None:
            _fill_topk(s.topk_sampled_logprobs, seq.topk)
    if out.prompt_logprobs is not None:
        values = [math.nan if v is None else v for v in out.prompt_logprobs]
        msg.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if out.topk_prompt is not None:
        _fill_topk(msg.topk_prompt_logprobs, out.topk_prompt)
    if out.target_prompt_logprobs is not None:
        _fill_dense(msg.target_prompt_logprobs, out.target_prompt_logprobs, DTYPE_FLOAT32)
    if out.prompt_alt is not None:
        _fill_dense(msg.prompt_alt_tokens.tokens, out.prompt_alt.ids, DTYPE_INT64)
        _fill_dense(msg.prompt_alt_tokens.logprobs, out.prompt_alt.logprobs, DTYPE_FLOAT32)
    return msg.SerializeToString()


_TOPK_MASK_LOGPROB = -99999.0  # the SDK's sentinel for "no entry" (tinker.types.topk_logprobs.MASK_LOGPROB)


def _fill_topk(msg: Any, topk: TopK) -> None:
    k = max((len(row) for row in topk.ids), default=0)
    ids = np.zeros((len(topk.ids), k), dtype="<i4")
    lps = np.full((len(topk.ids), k), _TOPK_MASK_LOGPROB, dtype="<f4")
    for i, (row_ids, row_lps) in enumerate(zip(topk.ids, topk.logprobs)):
        ids[i, :len(row_ids)] = row_ids
        lps[i, :len(row_lps)] = row_lps
    msg.token_ids, msg.logprobs, msg.k, msg.length = ids.tobytes(), lps.tobytes(), k, len(topk.ids)


def _fill_dense(msg: Any, rows: list[list[Any]], dtype: int) -> None:
    width = len(rows[0]) if rows else 0
    msg.dense = np.asarray(rows, dtype=_NP_BY_DTYPE[dtype]).reshape(len(rows), width).tobytes()
    msg.dtype = dtype
    msg.shape.extend([len(rows), width])
