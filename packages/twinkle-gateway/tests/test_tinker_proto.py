"""The protobuf codec against the official SDK's own compiled schema and converters (wire compatibility)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tinker")

from google.protobuf import descriptor_pb2  # noqa: E402
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import (  # noqa: E402
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from twinkle.common.wire import (  # noqa: E402
    ForwardBackwardOutput,
    SampledSequence,
    SampleOutput,
    TensorData,
    UserError,
)
from twinkle.server.tinker import proto  # noqa: E402


def test_descriptor_is_identical_to_the_sdks():
    ours = proto.build_file_descriptor()
    theirs = descriptor_pb2.FileDescriptorProto()
    sdk_pb.DESCRIPTOR.CopyToProto(theirs)
    assert ours == theirs


def _sdk_request(data, loss_fn="cross_entropy", config=None, seq_id=7, model_id="s:train:0"):
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=model_id, seq_id=seq_id,
    )
    return forward_backward_request_to_proto(req).SerializeToString()


def test_forward_backward_request_from_the_sdk():
    d1 = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                     loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, 0.5]})
    d2 = types.Datum(model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5]),
                                                          types.EncodedTextChunk(tokens=[6, 7])]),
                     loss_fn_inputs={"target_tokens": [6, 7, 8], "logprobs": [-1.0, -2.0, -3.5],
                                     "advantages": [1.0, 1.0, -1.0]})
    body = _sdk_request([d1, d2], loss_fn="ppo", config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    decoded = proto.parse_forward_backward(body)
    assert (decoded.model_id, decoded.seq_id, decoded.forward_only) == ("s:train:0", 7, False)
    inp = decoded.input()
    assert inp.loss_fn == "ppo"
    assert inp.loss_fn_config == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert [d.model_input for d in inp.data] == [[1, 2, 3], [5, 6, 7]]
    assert inp.data[0].loss_fn_inputs["target_tokens"] == TensorData(data=[2, 3, 4], dtype="int64", shape=[3])
    assert inp.data[0].loss_fn_inputs["weights"].data == [0.0, 1.0, 0.5]
    assert inp.data[1].loss_fn_inputs["logprobs"].dtype == "float32"
    assert inp.data[1].loss_fn_inputs["advantages"].data == [1.0, 1.0, -1.0]


def test_string_config_values_come_from_v2():
    d = types.Datum(model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    inp = proto.parse_forward_backward(_sdk_request([d], config={"beta": 0.1, "mode": "x"})).input()
    assert inp.loss_fn_config == {"beta": 0.1, "mode": "x"}


def test_sparse_csr_tensor_is_densified():
    torch = pytest.importorskip("torch")
    weights = torch.zeros(3, 4)
    weights[1, 2] = 1.0
    weights[2, 0] = 0.5
    d = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": weights})
    assert d.loss_fn_inputs["weights"].sparse_crow_indices is not None  # the SDK did sparsify it
    inp = proto.parse_forward_backward(_sdk_request([d])).input()
    w = inp.data[0].loss_fn_inputs["weights"]
    assert w.shape == [3, 4]
    assert np.array_equal(np.asarray(w.data).reshape(3, 4), weights.numpy())


def test_forward_only_flag():
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=3, forward_only=True, loss_fn="cross_entropy")
    decoded = proto.parse_forward_backward(msg.SerializeToString())
    assert decoded.forward_only and decoded.seq_id == 3 and decoded.input().data == []


@pytest.mark.parametrize("body, message", [
    (b"\xff\xff\xff", "not a valid tinker_public.ForwardBackwardRequest"),
    (sdk_pb.ForwardBackwardRequest(seq_id=1).SerializeToString(), "model_id"),
])
def test_bad_request_bodies(body, message):
    with pytest.raises(UserError, match=message):
        proto.parse_forward_backward(body)


def test_bad_datum_names_the_field():
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = b"\x01\x00\x00"  # 3 bytes: not int32
    decoded = proto.parse_forward_backward(msg.SerializeToString())
    with pytest.raises(UserError) as e:
        decoded.input()
    assert e.value.field == "data[0].model_input.chunks[0]"
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    d = msg.data.add()
    d.model_input.add().image.data = b"png"
    with pytest.raises(UserError, match="image chunks are not supported"):
        proto.parse_forward_backward(msg.SerializeToString()).input()
    msg = sdk_pb.ForwardBackwardRequest(model_id="m", seq_id=1)
    t = msg.data.add().loss_fn_inputs["weights"]
    t.dtype = sdk_pb.DTYPE_FLOAT32
    t.shape.append(3)
    t.dense = np.zeros(2, np.float32).tobytes()
    with pytest.raises(UserError, match="shape \\[3\\] does not match the 2 values") as e:
        proto.parse_forward_backward(msg.SerializeToString()).input()
    assert e.value.field == "data[0].loss_fn_inputs.weights"


def test_forward_backward_output_decodes_in_the_sdk():
    out = ForwardBackwardOutput(
        loss_fn_outputs=[
            {"logprobs": TensorData(data=[-1.0, -2.0, -0.5], dtype="float32"),
             "elementwise_loss": TensorData(data=[1.0, 2.0, 0.5], dtype="float32")},
            {"logprobs": TensorData(data=[-3.0], dtype="float32"),
             "elementwise_loss": TensorData(data=[3.0], dtype="float32")},
        ],
        metrics={"loss:sum": 6.5, "ratio:mean": 1.0},
    )
    sdk = deserialize_forward_backward_output(proto.encode_forward_backward_output(out))
    assert sdk.metrics == {"loss:sum": 6.5, "ratio:mean": 1.0}
    assert len(sdk.loss_fn_outputs) == 2
    assert sdk.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -0.5]
    assert sdk.loss_fn_outputs[1]["elementwise_loss"].shape == [1]
    assert sdk.loss_fn_output_type == "ArrayRecord"


def test_ragged_outputs_use_several_records():
    out = ForwardBackwardOutput(
        loss_fn_outputs=[
            {"logprobs": TensorData(data=[-1.0], dtype="float32")},
            {"logprobs": TensorData(data=[1, 2, 3, 4], dtype="int64", shape=[2, 2])},
        ],
        metrics={},
    )
    raw = proto.encode_forward_backward_output(out)
    msg = sdk_pb.ForwardBackwardOutput.FromString(raw)
    assert [r.num_datums for r in msg.loss_fn_outputs] == [1, 1]
    sdk = deserialize_forward_backward_output(raw)
    assert sdk.loss_fn_outputs[1]["logprobs"].shape == [2, 2]
    assert sdk.loss_fn_outputs[1]["logprobs"].dtype == "int64"


def test_empty_forward_backward_output():
    sdk = deserialize_forward_backward_output(
        proto.encode_forward_backward_output(ForwardBackwardOutput(loss_fn_outputs=[], metrics={"loss:sum": 0.0})))
    assert sdk.loss_fn_outputs == [] and sdk.metrics == {"loss:sum": 0.0}


def test_sample_output_decodes_in_the_sdk():
    out = SampleOutput(
        sequences=[SampledSequence(tokens=[10, 11], logprobs=[-0.5, -0.25], stop_reason="length"),
                   SampledSequence(tokens=[12], logprobs=[-1.0], stop_reason="stop")],
        prompt_logprobs=[None, -2.0, -3.0],
    )
    sdk = deserialize_sample_response(proto.encode_sample_output(out))
    assert [s.tokens for s in sdk.sequences] == [[10, 11], [12]]
    assert [s.stop_reason for s in sdk.sequences] == ["length", "stop"]
    assert sdk.sequences[0].logprobs == [-0.5, -0.25]
    assert sdk.prompt_logprobs[0] is None or math.isnan(sdk.prompt_logprobs[0])
    assert sdk.prompt_logprobs[1:] == [-2.0, -3.0]


def test_sample_output_without_prompt_logprobs():
    out = SampleOutput(sequences=[SampledSequence(tokens=[1], logprobs=[-0.1], stop_reason="stop")])
    sdk = deserialize_sample_response(proto.encode_sample_output(out))
    assert sdk.prompt_logprobs is None
    assert sdk.sequences[0].logprobs is not None


def test_provenance_spans_from_the_sdk_are_checked_then_ignored():
    """tinker-cookbook's RL recipes attach provenance (``Datum.with_provenance``) to every datum: a tiling
    is accepted and changes nothing; one that does not tile its field is a 400 naming it."""
    plain = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5], "logprobs": [-1.0] * 4,
                                        "advantages": [1.0] * 4})
    spans = plain.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id="s-1", length=2),
                     types.SampledProvenanceSpan(sequence_id="s-1", offset=0, length=2)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id="s-1", offset=1, length=1),
                        types.SampledProvenanceSpan(sequence_id="s-1", length=3)])
    with_spans = proto.parse_forward_backward(_sdk_request([spans], loss_fn="importance_sampling")).input()
    without = proto.parse_forward_backward(_sdk_request([plain], loss_fn="importance_sampling")).input()
    assert with_spans == without

    msg = proto.ForwardBackwardRequestPb()
    msg.ParseFromString(_sdk_request([spans], loss_fn="importance_sampling"))
    msg.data[0].loss_fn_input_spans[1].sampled_tokens.length = 2  # now covers 3 of 4 positions
    with pytest.raises(UserError) as e:
        proto.parse_forward_backward(msg.SerializeToString()).input()
    assert e.value.field == "data[0].loss_fn_input_spans" and "cover 3 positions" in str(e.value)
    del msg.data[0].loss_fn_input_spans[:]
    with pytest.raises(UserError, match="provenance comes as a pair"):
        proto.parse_forward_backward(msg.SerializeToString()).input()

    # A flood of spans (each a few bytes) is refused by its count before it is read span by span, also
    # for a datum without target_tokens.
    del msg.data[0].loss_fn_inputs["target_tokens"]
    for _ in range(100_000):
        msg.data[0].loss_fn_input_spans.add().sampled_tokens.sequence_id = "s"
    with pytest.raises(UserError, match="100000 spans for a datum of 4 positions") as e:
        proto.parse_forward_backward(msg.SerializeToString()).input()
    assert e.value.field == "data[0].loss_fn_input_spans"
