"""The sparkplug_b decoder: payloads built with iothub's own Sparkplug B schema."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from config.sources import parse_sources
from ingestor import batch
from ingestor.catalog import Binding, Device, Snapshot
from ingestor.decoders import sparkplug_b_pb2 as pb
from ingestor.decoders.sparkplug_b import DataType
from ingestor.messages import InboundMessage
from ingestor.payload import Limits, ParseResult, finish
from ingestor.reasons import Reason
from ingestor.sources import SourceRouter, router_for

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


# --- decoding -------------------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
T0 = 1772366400000  # NOW in ms
LIMITS = Limits()
DEVICES = {
    "name": "plant",
    "topic": "spBv1.0/{group}/{type}/{node}/{device}",
    "decoder": "sparkplug_b",
    "serial": "{node}.{device}",
}
NODES = {
    "name": "plant-nodes",
    "topic": "spBv1.0/{group}/{type}/{node}",
    "decoder": "sparkplug_b",
    "serial": "{node}",
}


def router(*entries: dict[str, Any]) -> SourceRouter:
    return router_for(("devices/{serial_id}/telemetry",), parse_sources(list(entries or [DEVICES])))


def metric(**fields: Any) -> pb.Payload.Metric:
    return pb.Payload.Metric(**fields)


def message(*metrics: pb.Payload.Metric, ts: int | None = T0, seq: int = 0) -> bytes:
    built = pb.Payload(metrics=metrics, seq=seq)
    if ts is not None:
        built.timestamp = ts
    return built.SerializeToString()


def decode(spb: SourceRouter, topic: str, data: bytes, *, keep: bool = True) -> ParseResult:
    """What the intake does with one message: decode, then (batch.prepare) keep its births."""
    route = spb.match(topic)
    assert route is not None, topic
    parsed = route.decode(data, NOW, LIMITS)
    if keep:
        for birth in parsed.births:
            spb.aliases.apply(birth)
    return parsed


def readings(parsed: ParseResult) -> list[tuple[str, str, object, datetime]]:
    return [(r.serial_id, r.metric, r.value, r.ts) for r in parsed.readings]


def reasons(parsed: ParseResult) -> list[str]:
    return [str(r.reason) for r in parsed.rejections]


DBIRTH = message(
    metric(name="Inputs/Temperature", alias=1, datatype=DataType.Float, float_value=21.7),
    metric(name="Inputs/Offset", alias=2, datatype=DataType.Int8, int_value=5),
    metric(name="Inputs/Level", alias=3, datatype=DataType.Int16, int_value=300),
    metric(name="Outputs/Pump", alias=4, datatype=DataType.Boolean, boolean_value=False),
    metric(name="Counter", alias=5, datatype=DataType.Int64, long_value=7),
    seq=1,
)


def test_birth_defines_aliases_and_its_values_are_readings() -> None:
    spb = router()
    parsed = decode(spb, "spBv1.0/plant1/DBIRTH/edge1/pump7", DBIRTH)
    at = NOW
    assert readings(parsed) == [
        ("edge1.pump7", "Inputs/Temperature", 21.7, at),
        ("edge1.pump7", "Inputs/Offset", 5, at),
        ("edge1.pump7", "Inputs/Level", 300, at),
        ("edge1.pump7", "Outputs/Pump", False, at),
        ("edge1.pump7", "Counter", 7, at),
    ]
    assert parsed.rejections == ()
    (birth,) = parsed.births
    assert birth.scope == ("plant1", "edge1", "pump7")
    assert birth.serial_id == "edge1.pump7"
    assert [(d.name, d.alias, d.datatype) for d in birth.definitions][:2] == [
        ("Inputs/Temperature", 1, DataType.Float),
        ("Inputs/Offset", 2, DataType.Int8),
    ]


def test_data_by_alias_sign_extended_negatives_and_metric_time() -> None:
    spb = router()
    decode(spb, "spBv1.0/plant1/DBIRTH/edge1/pump7", DBIRTH)
    data = message(
        metric(alias=2, timestamp=T0 + 1000, int_value=4294967209),  # Int8 -87, sign-extended
        metric(alias=3, timestamp=T0 + 1000, int_value=4294966996),  # Int16 -300
        metric(alias=5, timestamp=T0 + 1000, long_value=2**64 - 2),  # Int64 -2
        metric(alias=1, float_value=12.3),  # no metric timestamp: the payload's
        seq=2,
    )
    parsed = decode(spb, "spBv1.0/plant1/DDATA/edge1/pump7", data)
    later = NOW + timedelta(seconds=1)
    assert readings(parsed) == [
        ("edge1.pump7", "Inputs/Offset", -87, later),
        ("edge1.pump7", "Inputs/Level", -300, later),
        ("edge1.pump7", "Counter", -2, later),
        ("edge1.pump7", "Inputs/Temperature", 12.3, NOW),  # the float32 12.3, as sent
    ]
    assert parsed.rejections == ()


def test_data_with_an_alias_no_birth_defined_is_rejected_never_invented() -> None:
    parsed = decode(
        router(), "spBv1.0/plant1/DDATA/edge1/pump7", message(metric(alias=1, float_value=1.5))
    )
    assert parsed.readings == ()
    (rejection,) = parsed.rejections
    assert rejection.reason == Reason.unknown_alias
    assert "alias 1 is not defined by a birth of 'plant1/edge1/pump7'" in rejection.detail
    assert rejection.serial_id == "edge1.pump7"


def test_aliases_are_per_device_and_replaced_by_the_next_birth() -> None:
    spb = router()
    decode(spb, "spBv1.0/plant1/DBIRTH/edge1/pump7", DBIRTH)
    other = decode(
        spb, "spBv1.0/plant1/DDATA/edge1/pump8", message(metric(alias=1, float_value=1.0))
    )
    assert reasons(other) == ["unknown_alias"]
    rebirth = message(metric(name="Speed", alias=1, datatype=DataType.UInt16, int_value=10))
    decode(spb, "spBv1.0/plant1/DBIRTH/edge1/pump7", rebirth)
    after = decode(
        spb,
        "spBv1.0/plant1/DDATA/edge1/pump7",
        message(metric(alias=1, int_value=11), metric(alias=2, int_value=1)),
    )
    assert readings(after) == [("edge1.pump7", "Speed", 11, NOW)]
    assert reasons(after) == ["unknown_alias"]  # alias 2 belonged to the earlier session


def test_data_by_name_uses_the_birth_datatype_or_its_own() -> None:
    spb = router()
    decode(spb, "spBv1.0/plant1/DBIRTH/edge1/pump7", DBIRTH)
    parsed = decode(
        spb,
        "spBv1.0/plant1/DDATA/edge1/pump7",
        message(
            metric(name="Inputs/Offset", int_value=4294967295),  # Int8 -1 by the birth
            metric(name="New", datatype=DataType.Int32, int_value=4294967295),  # its own: -1
            metric(name="Untyped", int_value=1),
        ),
    )
    assert readings(parsed) == [
        ("edge1.pump7", "Inputs/Offset", -1, NOW),
        ("edge1.pump7", "New", -1, NOW),
    ]
    assert reasons(parsed) == ["unknown_alias"]
    assert "no datatype, and no birth" in parsed.rejections[0].detail


def test_null_transient_and_bdseq_are_no_readings() -> None:
    spb = router(NODES)
    nbirth = message(
        metric(name="bdSeq", datatype=DataType.Int64, long_value=3),
        metric(name="Supply Voltage", alias=10, datatype=DataType.Float, float_value=12.3),
        metric(
            name="Debug", alias=11, datatype=DataType.String, string_value="x", is_transient=True
        ),
        metric(name="Fault", alias=12, datatype=DataType.String, is_null=True),
    )
    parsed = decode(spb, "spBv1.0/plant1/NBIRTH/edge1", nbirth)
    assert readings(parsed) == [("edge1", "Supply Voltage", 12.3, NOW)]
    assert parsed.rejections == ()
    assert {d.name for d in parsed.births[0].definitions} == {
        "bdSeq",
        "Supply Voltage",
        "Debug",
        "Fault",
    }
    data = decode(spb, "spBv1.0/plant1/NDATA/edge1", message(metric(alias=12, is_null=True)))
    assert (data.readings, data.rejections) == ((), ())


@pytest.mark.parametrize(
    ("datatype", "field", "value", "expected"),
    [
        (DataType.UInt8, "int_value", 255, 255),
        (DataType.UInt32, "int_value", 4294967295, 4294967295),
        (DataType.Int32, "int_value", 2147483648, -2147483648),
        (DataType.UInt64, "long_value", 2**64 - 1, 2**64 - 1),
        # The other integer field is read too; a signed type there is sign-extended by 64 bits.
        (DataType.UInt32, "long_value", 4294967295, 4294967295),
        (DataType.Int16, "long_value", 2**64 - 300, -300),
        (DataType.Double, "double_value", 0.1, 0.1),
        (DataType.Text, "string_value", "hello", "hello"),
        (DataType.UUID, "string_value", "4f2c", "4f2c"),
        (DataType.DateTime, "long_value", 1486144502122, "2017-02-03T17:55:02.122000+00:00"),
    ],
)
def test_datatypes(datatype: DataType, field: str, value: object, expected: object) -> None:
    birth = message(metric(name="m", alias=1, datatype=datatype, **{field: value}))
    parsed = decode(router(), "spBv1.0/g/DBIRTH/n/d", birth)
    assert [r.value for r in parsed.readings] == [expected]
    assert parsed.rejections == ()


DATASET = pb.Payload.DataSet(num_of_columns=1)
TEMPLATE = pb.Payload.Template(version="1")


@pytest.mark.parametrize(
    ("built", "problem"),
    [
        (
            metric(name="m", datatype=DataType.Int8, int_value=200),
            "int_value 200 is outside Int8 (-128 to 127)",
        ),
        (metric(name="m", datatype=DataType.UInt8, int_value=256), "outside UInt8"),
        (metric(name="m", datatype=DataType.UInt32, long_value=2**32), "outside UInt32"),
        (
            metric(name="m", datatype=DataType.Int8, float_value=1.0),
            "carries float_value; expected int_value",
        ),
        (metric(name="m", datatype=DataType.Boolean), "carries no value"),
        (
            metric(name="m", datatype=DataType.Bytes, bytes_value=b"\x01"),
            "datatype Bytes is not supported",
        ),
        (
            metric(name="m", datatype=DataType.File, bytes_value=b"\x01"),
            "datatype File is not supported",
        ),
        (
            metric(name="m", datatype=DataType.DataSet, dataset_value=DATASET),
            "datatype DataSet is not supported",
        ),
        (
            metric(name="m", datatype=DataType.Template, template_value=TEMPLATE),
            "datatype Template is not supported",
        ),
        (
            metric(name="m", datatype=DataType.Int32Array, bytes_value=b"\x01\x00\x00\x00"),
            "datatype Int32Array is not supported",
        ),
        (metric(name="m", datatype=99, int_value=1), "datatype 99 is not a Sparkplug datatype"),
        (metric(name="", datatype=DataType.Int8, int_value=1), "a birth metric needs a name"),
    ],
)
def test_unreadable_metrics_are_bad_schema_and_the_others_still_count(
    built: pb.Payload.Metric, problem: str
) -> None:
    good = metric(name="ok", alias=9, datatype=DataType.Boolean, boolean_value=True)
    parsed = decode(router(), "spBv1.0/g/DBIRTH/n/d", message(built, good))
    assert readings(parsed) == [("n.d", "ok", True, NOW)]
    assert reasons(parsed) == ["bad_schema"]
    assert problem in parsed.rejections[0].detail


def test_a_name_or_alias_twice_in_one_birth_is_refused() -> None:
    birth = message(
        metric(name="a", alias=1, datatype=DataType.Int32, int_value=1),
        metric(name="b", alias=1, datatype=DataType.Int32, int_value=2),
        metric(name="a", alias=2, datatype=DataType.Int32, int_value=3),
    )
    parsed = decode(router(), "spBv1.0/g/DBIRTH/n/d", birth)
    assert readings(parsed) == [("n.d", "a", 1, NOW)]
    assert [r.detail.split(": ", 2)[-1] for r in parsed.rejections] == [
        "alias 1 is defined twice in this birth",
        "name 'a' is defined twice in this birth",
    ]


def test_invalid_utf8_in_a_string_is_bad_schema_not_a_crash() -> None:
    # upb hands a proto2 string that is not UTF-8 over as bytes: name field 1, 3 bytes 0xff...
    raw = b"\x12\x07\x0a\x03\xff\xfe\xfd\x20\x0c"
    parsed = decode(router(), "spBv1.0/g/DBIRTH/n/d", raw)
    assert reasons(parsed) == ["bad_schema"]
    assert "needs a name" in parsed.rejections[0].detail


@pytest.mark.parametrize(
    ("data", "reason", "problem"),
    [
        (b"", "bad_schema", "payload is empty"),
        (b'{"temperature": 1}', "bad_schema", "not a Sparkplug B protobuf message"),
        (b"\xff" * 20, "bad_schema", "not a Sparkplug B protobuf message"),
        (b"\x00" * (LIMITS.max_payload_bytes + 1), "payload_too_large", "bytes (limit"),
    ],
)
def test_malformed_payloads_are_rejected_with_the_reason(
    data: bytes, reason: str, problem: str
) -> None:
    parsed = decode(router(), "spBv1.0/g/DDATA/n/d", data)
    assert reasons(parsed) == [reason]
    assert problem in parsed.rejections[0].detail
    assert parsed.rejections[0].detail.startswith("source 'plant': ")


def test_too_many_metrics_are_payload_too_large() -> None:
    many = message(
        *[
            metric(name=f"m{i}", datatype=DataType.Boolean, boolean_value=True)
            for i in range(LIMITS.max_readings_per_message + 1)
        ]
    )
    assert reasons(decode(router(), "spBv1.0/g/DBIRTH/n/d", many)) == ["payload_too_large"]


def test_deaths_and_commands_are_not_telemetry() -> None:
    spb = router(DEVICES, NODES)
    for topic in (
        "spBv1.0/g/NDEATH/n",
        "spBv1.0/g/DDEATH/n/d",
        "spBv1.0/g/NCMD/n",
        "spBv1.0/g/DCMD/n/d",
    ):
        rebirth = message(
            metric(name="Node Control/Rebirth", datatype=DataType.Boolean, boolean_value=True)
        )
        parsed = decode(spb, topic, rebirth)
        assert (parsed.readings, parsed.rejections, parsed.births) == ((), (), ()), topic


def test_unknown_message_type_and_wrong_level_count_are_bad_schema() -> None:
    spb = router(DEVICES, NODES)
    assert (
        "is not a Sparkplug message type"
        in decode(spb, "spBv1.0/g/NSTATE/n", message()).rejections[0].detail
    )
    assert (
        "DDATA needs a device level"
        in decode(spb, "spBv1.0/g/DDATA/n", message()).rejections[0].detail
    )
    assert (
        "NDATA has no device level"
        in decode(spb, "spBv1.0/g/NDATA/n/d", message()).rejections[0].detail
    )


def test_time_falls_back_to_receipt_and_bounds_apply() -> None:
    spb = router()
    old = metric(
        name="old", datatype=DataType.Boolean, boolean_value=True, timestamp=T0 - 30 * 86_400_000
    )
    parsed = decode(
        spb,
        "spBv1.0/g/DBIRTH/n/d",
        message(metric(name="m", datatype=DataType.Boolean, boolean_value=True), old, ts=None),
    )
    assert readings(parsed) == [("n.d", "m", True, NOW)]
    assert reasons(parsed) == ["ts_too_old"]


def test_include_rename_and_values_apply_to_metric_names() -> None:
    entry = {
        **DEVICES,
        "exclude": ["Node Control/*"],
        "rename": {"Inputs/Temperature": "temperature"},
    }
    parsed = decode(
        router(entry),
        "spBv1.0/g/DBIRTH/n/d",
        message(
            metric(name="Inputs/Temperature", alias=1, datatype=DataType.Float, float_value=20.5),
            metric(
                name="Node Control/Rebirth", alias=2, datatype=DataType.Boolean, boolean_value=False
            ),
        ),
    )
    assert readings(parsed) == [("n.d", "temperature", 20.5, NOW)]
    assert len(parsed.births[0].definitions) == 2  # excluded metrics are still defined


# The DBIRTH and NDATA examples of the Sparkplug 3.0 specification (eclipse-sparkplug/sparkplug,
# specification/src/main/asciidoc/chapters/Sparkplug_6_Payloads.adoc, sections "DBIRTH" and
# "NDATA"), as the documented JSON renders them, encoded with this schema. The specification
# publishes them as JSON, not bytes; no byte test vector is published with it.
def test_specification_examples() -> None:
    spb = router(DEVICES, NODES)
    names = [f"Inputs/{x}" for x in "ABCD"] + ["Inputs/Button"] + [f"Outputs/{x}" for x in "EFGH"]
    names += ["Outputs/LEDs/Green", "Outputs/LEDs/Red", "Outputs/LEDs/Yellow", "Outputs/Buzzer"]
    dbirth = message(
        *[
            metric(name=n, timestamp=1486144502122, datatype=DataType.Boolean, boolean_value=False)
            for n in names
        ],
        metric(
            name="Properties/Hardware Make",
            timestamp=1486144502122,
            datatype=DataType.String,
            string_value="Pibrella",
        ),
        ts=1486144502122,
        seq=1,
    )
    ndata = message(
        metric(
            name="Supply Voltage",
            timestamp=1486144502122,
            datatype=DataType.Float,
            float_value=12.3,
        ),
        ts=1486144502122,
        seq=2,
    )
    at = datetime(2017, 2, 3, 17, 55, 2, 122000, tzinfo=UTC)
    limits = Limits(max_age=timedelta(days=20 * 365))
    route = spb.match("spBv1.0/Sparkplug B Devices/DBIRTH/Raspberry Pi/Pibrella")
    assert route is not None
    birth = route.decode(dbirth, NOW, limits)
    assert len(birth.readings) == 14 and birth.rejections == ()
    assert birth.readings[-1].metric == "Properties/Hardware Make"
    assert {(r.serial_id, r.ts) for r in birth.readings} == {("Raspberry Pi.Pibrella", at)}
    route = spb.match("spBv1.0/Sparkplug B Devices/NDATA/Raspberry Pi")
    assert route is not None
    data = route.decode(ndata, NOW, limits)
    assert [(r.serial_id, r.metric, r.value, r.ts) for r in data.readings] == [
        ("Raspberry Pi", "Supply Voltage", 12.3, at)
    ]


# --- configuration and the batch stage -------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("sp/{group}/{type}/{node}", "is the Sparkplug namespace"),
        ("spBv1.0/{group}/{type}", "is the Sparkplug namespace"),
        ("spBv1.0/{group}/DDATA/{node}/{device}", "must be a placeholder such as {type}"),
        ("spBv1.0/{group}/{type}/{node+}", "has no {x+} placeholder"),
    ],
)
def test_sparkplug_topic_shape_is_checked_at_start(topic: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_sources([{**DEVICES, "topic": topic, "serial": "x"}])


def test_prepare_keeps_births_of_known_devices_only_and_data_after_a_birth_resolves() -> None:
    spb = router()
    known = Device(
        1, "edge1.pump7", "pump", True, {"inputs/offset": Binding(11, "Inputs/Offset", "numeric")}
    )
    snapshot = Snapshot({"edge1.pump7": known}, frozenset({"inputs/offset"}))

    def inbound(topic: str, data: bytes, mid: int) -> InboundMessage:
        return InboundMessage(topic, data, mid, 0, False, 1, NOW.timestamp(), time.monotonic())

    data = message(metric(alias=2, int_value=4294967209, timestamp=T0 + 1000))
    prepared = batch.prepare(
        [
            inbound("spBv1.0/plant1/DBIRTH/edge1/pump9", DBIRTH, 1),  # no such device
            inbound("spBv1.0/plant1/DBIRTH/edge1/pump7", DBIRTH, 2),
            inbound("spBv1.0/plant1/DDATA/edge1/pump7", data, 3),
        ],
        snapshot, spb, LIMITS,
    )  # fmt: skip
    assert [b.serial_id for b in prepared.births] == ["edge1.pump7"]
    assert len(spb.aliases) == 1
    assert [(r.device_metric_id, r.value_json) for r in prepared.rows] == [
        (11, '{"t":"numeric","v":5}'),
        (11, '{"t":"numeric","v":-87}'),
    ]


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        # Valid protobuf framing with arbitrary metric contents: the decoder's own paths.
        st.lists(
            st.builds(
                pb.Payload.Metric,
                name=st.text(max_size=8),
                alias=st.integers(0, 2**64 - 1),
                datatype=st.integers(0, 40),
                int_value=st.integers(0, 2**32 - 1),
                timestamp=st.integers(0, 2**64 - 1),
            ),
            max_size=5,
        ).map(lambda metrics: pb.Payload(metrics=metrics).SerializeToString()),
    ),
    kind=st.sampled_from(["DBIRTH", "DDATA", "DDEATH", "XDATA"]),
)
def test_decoder_never_raises_on_any_payload(data: bytes, kind: str) -> None:
    spb = router()
    route = spb.match(f"spBv1.0/g/{kind}/n/d")
    assert route is not None and route.decoder is not None and route.source is not None
    # The decoder itself, not Route.decode's last line of defence: it must not need that one.
    parsed = route.decoder(route.source, route.fields, data, NOW, LIMITS)
    assert all(r.reason in Reason for r in parsed.rejections)
    assert all(r.serial_id == "n.d" for r in parsed.readings)


# --- the DATA fast path (alias tables) reads exactly what the general path reads -----------

_FAST_BIRTH = message(
    metric(name="f", alias=1, datatype=DataType.Float, float_value=1.5),
    metric(name="d", alias=2, datatype=DataType.Double, double_value=2.5),
    metric(name="b", alias=3, datatype=DataType.Boolean, boolean_value=True),
    metric(name="s", alias=4, datatype=DataType.String, string_value="ON"),
    metric(name="i8", alias=5, datatype=DataType.Int8, int_value=1),
    metric(name="u32", alias=6, datatype=DataType.UInt32, int_value=1),
    metric(name="i64", alias=7, datatype=DataType.Int64, long_value=1),
    metric(name="when", alias=8, datatype=DataType.DateTime, long_value=T0),
    metric(name="blob", alias=9, datatype=DataType.Bytes, bytes_value=b"x"),
    metric(name="hidden", alias=10, datatype=DataType.Double, double_value=0.0),
)
_VALUE_FIELDS = st.one_of(
    st.fixed_dictionaries({"int_value": st.integers(0, 2**32 - 1)}),
    st.fixed_dictionaries({"long_value": st.integers(0, 2**64 - 1)}),
    st.fixed_dictionaries({"float_value": st.floats(width=32, allow_nan=True)}),
    st.fixed_dictionaries({"double_value": st.floats(allow_nan=False)}),
    st.fixed_dictionaries({"boolean_value": st.booleans()}),
    st.fixed_dictionaries({"string_value": st.sampled_from(["ON", "OFF", "x", ""])}),
    st.fixed_dictionaries({"bytes_value": st.binary(max_size=3)}),
    st.just({}),
)
_DATA_METRIC = st.builds(
    lambda alias, name, flags, ts, fields: metric(
        **({} if alias is None else {"alias": alias}),
        **({} if name is None else {"name": name}),
        **flags,
        **({} if ts is None else {"timestamp": ts}),
        **fields,
    ),
    alias=st.one_of(st.none(), st.integers(0, 12)),
    name=st.one_of(st.none(), st.sampled_from(["f", "s", "i8", "nobody", ""])),
    flags=st.fixed_dictionaries(
        {}, optional={"is_null": st.booleans(), "is_transient": st.booleans()}
    ),
    ts=st.one_of(st.none(), st.sampled_from([T0, T0 - 1000, T0 + 5, 2**63])),
    fields=_VALUE_FIELDS,
)
_FAST_SOURCE = {
    **DEVICES,
    "exclude": ["hidden"],
    "rename": {"d": "double"},
    "values": {"ON": True, "OFF": False},
}


def general_path(spb: SourceRouter, topic: str, data: bytes) -> ParseResult:
    """The message through ``_Reader.metric`` alone: the reading of every metric without the
    alias tables, which the fast path must equal."""
    from ingestor.decoders import sparkplug_b as spb_module

    route = spb.match(topic)
    assert route is not None and route.source is not None
    levels = spb_module.topic_levels(route.source, route.fields)
    scope = (levels[1], levels[3], levels[4])
    serial = route.source.serial_for(route.fields)
    parsed = pb.Payload.FromString(data)
    reader = spb_module._Reader(spb.aliases, route.source, scope, False, serial)
    for index, item in enumerate(parsed.metrics):
        reader.metric(index, item, parsed)
    return finish(serial, reader.extracted, NOW, LIMITS, tuple(reader.rejections))


_COMMON = [
    metric(alias=1, float_value=12.300000190734863),
    metric(alias=2, double_value=2.25),
    metric(alias=3, boolean_value=False),
    metric(alias=4, string_value="OFF"),
    metric(alias=4, timestamp=T0 - 1000, string_value="free text"),
    metric(alias=5, int_value=4294967209),
    metric(alias=6, int_value=4294967295),
    metric(alias=7, timestamp=T0 - 1000, long_value=2**64 - 1),
    metric(alias=10, double_value=1.0),
]


@settings(max_examples=400, deadline=None)
@given(metrics=st.lists(_DATA_METRIC, max_size=6), payload_ts=st.sampled_from([T0 - 2000, None]))
@example(metrics=_COMMON, payload_ts=T0 - 2000)
@example(metrics=_COMMON, payload_ts=None)
def test_fast_path_reads_data_exactly_as_the_general_path(
    metrics: list[pb.Payload.Metric], payload_ts: int | None
) -> None:
    """Every DATA metric, common or odd (a value in the wrong field, out of range, not UTF-8,
    null, transient, unknown alias, by name, excluded, renamed, mapped, its own time), gives
    the same readings and rejections, in the same order, through both paths."""
    spb = router(_FAST_SOURCE)
    decode(spb, "spBv1.0/g/DBIRTH/n/d", _FAST_BIRTH)
    data = message(*metrics, ts=payload_ts)
    route = spb.match("spBv1.0/g/DDATA/n/d")
    assert route is not None and route.decoder is not None and route.source is not None
    fast = route.decoder(route.source, route.fields, data, NOW, LIMITS)
    assert fast == general_path(spb, "spBv1.0/g/DDATA/n/d", data)


def test_fast_path_tables_follow_rebirths_and_do_not_grow_on_made_up_aliases() -> None:
    from ingestor.decoders import sparkplug_b as spb_module

    spb = router()
    decode(spb, "spBv1.0/g/DBIRTH/n/d", _FAST_BIRTH)
    route = spb.match("spBv1.0/g/DDATA/n/d")
    assert route is not None and isinstance(route.decoder, spb_module.SparkplugDecoder)
    decoder = route.decoder
    made_up = message(*(metric(alias=a, double_value=1.0) for a in range(100, 1100)))
    parsed = decode(spb, "spBv1.0/g/DDATA/n/d", made_up)
    assert set(reasons(parsed)) == {"unknown_alias"} and len(parsed.rejections) == 1000
    [table] = decoder._tables.values()
    assert len(table) == 0  # only aliases the birth defined get an entry
    assert readings(decode(spb, "spBv1.0/g/DDATA/n/d", message(metric(alias=2, double_value=7.0))))
    assert len(table) == 1
    # A rebirth that redefines alias 2 as Int8: the next data reads it as the new birth says.
    rebirth = message(metric(name="level", alias=2, datatype=DataType.Int8, int_value=0))
    decode(spb, "spBv1.0/g/DBIRTH/n/d", rebirth)
    after = decode(spb, "spBv1.0/g/DDATA/n/d", message(metric(alias=2, int_value=4294967295)))
    assert readings(after) == [("n.d", "level", -1, NOW.replace(microsecond=0))]


def test_topic_cache_is_bounded_against_topics_that_never_repeat() -> None:
    from ingestor.decoders import sparkplug_b as spb_module

    spb = router()
    route = spb.match("spBv1.0/g/DDATA/n/d")
    assert route is not None and isinstance(route.decoder, spb_module.SparkplugDecoder)
    decoder = route.decoder
    data = message(metric(alias=1, double_value=1.0))
    for index in range(spb_module._MAX_TOPICS + 50):
        parsed = decode(spb, f"spBv1.0/g/DDATA/n/d{index}", data)
        assert reasons(parsed) == ["unknown_alias"]
        assert len(decoder._topics) <= spb_module._MAX_TOPICS


def test_float_near_the_float32_maximum_is_read_not_a_crash() -> None:
    # 3.40250016e38 is a float32; "3.403e+38", a shorter decimal tried on the way, is beyond
    # float32's range: struct.pack raised OverflowError out of the decoder before.
    spb = router()
    decode(spb, "spBv1.0/g/DBIRTH/n/d", _FAST_BIRTH)
    for data in (
        message(metric(alias=1, float_value=3.40250016e38)),
        message(metric(name="f", float_value=3.40250016e38)),
    ):
        route = spb.match("spBv1.0/g/DDATA/n/d")
        assert route is not None and route.decoder is not None and route.source is not None
        parsed = route.decoder(route.source, route.fields, data, NOW, LIMITS)
        assert readings(parsed) == [("n.d", "f", 3.4025002e38, NOW)]
