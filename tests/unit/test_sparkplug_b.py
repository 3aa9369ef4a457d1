"""The sparkplug_b decoder: payloads built with iothub's own Sparkplug B schema."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ingestor.decoders import sparkplug_b_pb2 as pb

_DECODERS = Path(__file__).resolve().parents[2] / "ingestor" / "decoders"


def test_generated_module_was_built_from_the_proto_file() -> None:
    # scripts/gen_sparkplug_proto.sh writes the .proto's digest into both generated files: an
    # edit of the .proto without regenerating fails here, not on a device's message.
    digest = hashlib.sha256((_DECODERS / "sparkplug_b.proto").read_bytes()).hexdigest()
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        second_line = (_DECODERS / name).read_text(encoding="utf-8").splitlines()[1]
        assert second_line == f"# proto-sha256: {digest}", name


def test_schema_has_the_wire_numbers_of_the_specification() -> None:
    metric = pb.Payload.Metric.DESCRIPTOR.fields_by_name
    wire = {name: field.number for name, field in metric.items()}
    assert wire == {
        "name": 1, "alias": 2, "timestamp": 3, "datatype": 4, "is_historical": 5,
        "is_transient": 6, "is_null": 7, "metadata": 8, "properties": 9, "int_value": 10,
        "long_value": 11, "float_value": 12, "double_value": 13, "boolean_value": 14,
        "string_value": 15, "bytes_value": 16, "dataset_value": 17, "template_value": 18,
        "extension_value": 19,
    }  # fmt: skip
    payload = {n: f.number for n, f in pb.Payload.DESCRIPTOR.fields_by_name.items()}
    assert payload == {"timestamp": 1, "metrics": 2, "seq": 3, "uuid": 4, "body": 5}
