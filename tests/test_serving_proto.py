"""The checked-in stubs are what grpcio-tools makes of the checked-in proto now."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from jaxinfer.sampling import SamplingParams
from jaxinfer.serving import protogen


def test_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    fresh = protogen.generate(tmp_path)
    checked_in = protogen.ROOT / pathlib.Path(protogen.PROTO).parent
    for path in fresh:
        assert path.read_text() == (checked_in / path.name).read_text(), (
            f"{path.name} is stale: run python -m jaxinfer.serving.protogen"
        )


def test_stubs_import_and_name_the_service():
    from jaxinfer.serving.proto import inference_pb2, inference_pb2_grpc

    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert service.full_name == "jaxinfer.v1.Inference"
    assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "ModelInfo"]
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    fields = inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(fields) == engine_fields  # every engine setting, no other
    assert all(f.has_presence for f in fields.values() if not f.is_repeated)  # unset = default


def test_request_options_keep_their_numbers_and_types():
    """vLLM's request options: fields 14-17; logit_bias a map of int64 ids to double biases."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from jaxinfer.serving.proto import inference_pb2

    fields = inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    numbers = {
        "min_tokens": (14, F.TYPE_INT64),
        "logit_bias": (15, F.TYPE_MESSAGE),
        "include_stop_str_in_output": (16, F.TYPE_BOOL),
        "skip_special_tokens": (17, F.TYPE_BOOL),
    }
    assert {name: (fields[name].number, fields[name].type) for name in numbers} == numbers
    entry = fields["logit_bias"].message_type
    assert entry.GetOptions().map_entry
    assert [(f.name, f.type) for f in entry.fields] == [
        ("key", F.TYPE_INT64),
        ("value", F.TYPE_DOUBLE),
    ]
    msg = inference_pb2.SamplingParams(logit_bias={50256: -100.0, 5: 2.5})
    again = inference_pb2.SamplingParams.FromString(msg.SerializeToString())
    assert dict(again.logit_bias) == {5: 2.5, 50256: -100.0}
    assert not again.HasField("min_tokens") and not again.HasField("skip_special_tokens")


def test_prompt_logprobs_fields_keep_their_numbers_and_types():
    """SamplingParams.prompt_logprobs is field 18 (optional int64: unset = none); the response
    carries them as GenerateResponse.prompt_logprobs, field 7, one TokenLogprobs per prompt token
    after the first, as `logprobs` (field 6) carries the new tokens'."""
    from google.protobuf.descriptor import FieldDescriptor as F

    from jaxinfer.serving.proto import inference_pb2 as pb

    field = pb.SamplingParams.DESCRIPTOR.fields_by_name["prompt_logprobs"]
    assert (field.number, field.type, field.has_presence) == (18, F.TYPE_INT64, True)
    response = pb.GenerateResponse.DESCRIPTOR.fields_by_name
    for name, number in (("logprobs", 6), ("prompt_logprobs", 7)):
        assert response[name].number == number and response[name].is_repeated
        assert response[name].message_type.full_name == "jaxinfer.v1.TokenLogprobs"
    msg = pb.GenerateResponse(
        prompt_logprobs=[
            pb.TokenLogprobs(token_id=9, logprob=-1.5, top=[pb.TopLogprob(token_id=3)])
        ]
    )
    again = pb.GenerateResponse.FromString(msg.SerializeToString())
    assert [
        (e.token_id, e.logprob, [t.token_id for t in e.top]) for e in again.prompt_logprobs
    ] == [(9, -1.5, [3])]
    assert not pb.SamplingParams().HasField("prompt_logprobs")
    assert pb.SamplingParams(prompt_logprobs=0).HasField("prompt_logprobs")  # 0 is not unset
