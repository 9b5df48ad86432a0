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
