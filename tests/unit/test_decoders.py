"""Decoders over payloads quoted from the device projects' own documentation, and their traps.

Each payload cites where it is published. The router is the one the daemon builds from the
settings, so these are the exact bytes-to-readings steps of the intake (the database's part,
resolution and type checks, is covered by tests/integration/test_sources.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from structlog.testing import capture_logs

from config.sources import Source, parse_sources
from ingestor import sources
from ingestor.decoders.base import Decoder
from ingestor.payload import Limits, ParseResult
from ingestor.sources import router_for

NATIVE_TOPICS = ("devices/{serial_id}/telemetry",)
LIMITS = Limits()


def decode(
    entry: dict[str, Any], topic: str, data: bytes | str, received_at: datetime
) -> ParseResult:
    router = router_for(NATIVE_TOPICS, parse_sources([entry]))
    route = router.match(topic)
    assert route is not None, f"{topic} matches no source"
    raw = data.encode() if isinstance(data, str) else data
    return route.decode(raw, received_at, LIMITS)


def readings(parsed: ParseResult) -> list[tuple[str, str, object, datetime, str | None]]:
    return [(r.serial_id, r.metric, r.value, r.ts, r.unit) for r in parsed.readings]


def reasons(parsed: ParseResult) -> list[tuple[str, str | None]]:
    return [(str(r.reason), r.metric) for r in parsed.rejections]


# --- tasmota -------------------------------------------------------------------------------------

TASMOTA = {
    "name": "tasmota",
    "topic": "tele/{node}/SENSOR",
    "decoder": "tasmota",
    "serial": "tas-{node}",
    "time_zone": "Europe/Amsterdam",
}
# https://tasmota.github.io/docs/DS18x20/ (tasmota/docs docs/DS18x20.md) gives the one-sensor
# form; the keys of several sensors are Tasmota's own, verbatim from its v5.12.0 changelog
# (arendst/Tasmota sonoff/_changelog.ino: "DS18B20-1":{"Id":"00000483C23A","Temperature":19.5},
# "DS18B20-2":{"Id":"0000048EC44C","Temperature":19.6}), in that page's message.
TASMOTA_DS18B20 = (
    '{"Time":"2019-01-01T00:00:00","DS18B20-1":{"Id":"00000483C23A","Temperature":19.5},'
    '"DS18B20-2":{"Id":"0000048EC44C","Temperature":19.6},"TempUnit":"C"}'
)
# https://tasmota.github.io/docs/BME280/ (tasmota/docs docs/BME280.md), verbatim.
TASMOTA_BME280 = """{
  "Time": "2019-11-03T19:34:28",
  "BME280": {
    "Temperature": 21.7,
    "Humidity": 66.6,
    "Pressure": 988.6
  },
  "PressureUnit": "hPa",
  "TempUnit": "C"
}"""


def test_tasmota_nested_sensors_local_time_and_units() -> None:
    """Nested objects become BME280.Temperature; Time is Amsterdam wall time; *Unit are units."""
    parsed = decode(
        TASMOTA, "tele/plug1/SENSOR", TASMOTA_BME280, datetime(2019, 11, 3, 18, 35, tzinfo=UTC)
    )
    at = datetime(2019, 11, 3, 18, 34, 28, tzinfo=UTC)  # CET is UTC+1

    assert readings(parsed) == [
        ("tas-plug1", "BME280.Temperature", 21.7, at, "C"),
        ("tas-plug1", "BME280.Humidity", 66.6, at, None),
        ("tas-plug1", "BME280.Pressure", 988.6, at, "hPa"),
    ]
    assert parsed.rejections == ()


def test_tasmota_ds18b20_ids_are_keys_like_any_other() -> None:
    """DS18B20-1.Temperature is one key; include keeps the Ids (text) out."""
    entry = {**TASMOTA, "include": ["DS18B20-*.Temperature"]}
    parsed = decode(entry, "tele/boiler/SENSOR", TASMOTA_DS18B20, datetime(2019, 1, 1, tzinfo=UTC))

    assert [(m, v, u) for _, m, v, _, u in readings(parsed)] == [
        ("DS18B20-1.Temperature", 19.5, "C"),
        ("DS18B20-2.Temperature", 19.6, "C"),
    ]
    assert {ts for *_, ts, _ in readings(parsed)} == {datetime(2018, 12, 31, 23, tzinfo=UTC)}


def test_tasmota_epoch_wins_over_time() -> None:
    """With both (Tasmota's ``Time 4``), Epoch is used: it needs no time zone."""
    entry = {k: v for k, v in TASMOTA.items() if k != "time_zone"}
    data = '{"Time":"2021-07-14T10:00:00","Epoch":1626256800,"ANALOG":{"A0":512}}'
    parsed = decode(entry, "tele/x/SENSOR", data, datetime(2021, 7, 14, 10, tzinfo=UTC))

    assert readings(parsed) == [
        ("tas-x", "ANALOG.A0", 512, datetime(2021, 7, 14, 10, tzinfo=UTC), None)
    ]


def test_tasmota_time_without_time_zone_is_bad_timestamp() -> None:
    """A local time with no time_zone configured is never guessed as UTC."""
    entry = {k: v for k, v in TASMOTA.items() if k != "time_zone"}
    parsed = decode(entry, "tele/x/SENSOR", TASMOTA_BME280, datetime(2019, 11, 3, 18, tzinfo=UTC))

    assert parsed.readings == ()
    assert {reason for reason, _ in reasons(parsed)} == {"bad_timestamp"}
    assert "sets no time_zone" in parsed.rejections[0].detail


@pytest.mark.parametrize(
    ("local", "problem"),
    [
        ("2026-03-29T02:30:00", "does not exist in Europe/Amsterdam"),  # clocks 02:00 -> 03:00
        ("2026-10-25T02:30:00", "is ambiguous in Europe/Amsterdam"),  # 02:00-03:00 twice
        ("0001-01-01T00:00:00", "is out of range in UTC"),  # before datetime's first instant
    ],
)
def test_tasmota_dst_gap_and_overlap_are_bad_timestamp(local: str, problem: str) -> None:
    """Python would map these silently; the round trip and both folds catch them."""
    data = json.dumps({"Time": local, "ANALOG": {"A0": 1}})
    parsed = decode(TASMOTA, "tele/x/SENSOR", data, datetime.fromisoformat(f"{local}+00:00"))

    assert reasons(parsed) == [("bad_timestamp", "ANALOG.A0")]
    assert problem in parsed.rejections[0].detail


def test_tasmota_on_off_through_values_or_left_as_text() -> None:
    """STATE's "POWER":"ON" is a boolean only through values; otherwise the text goes on."""
    # https://tasmota.github.io/docs/MQTT/ : stat/tasmota/RESULT = {"POWER":"ON"}
    mapped = {**TASMOTA, "topic": "stat/{node}/RESULT", "values": {"ON": True, "OFF": False}}
    plain = {**TASMOTA, "topic": "stat/{node}/RESULT"}
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert readings(decode(mapped, "stat/p/RESULT", '{"POWER":"ON"}', now)) == [
        ("tas-p", "POWER", True, now, None)
    ]
    assert readings(decode(plain, "stat/p/RESULT", '{"POWER":"ON"}', now)) == [
        ("tas-p", "POWER", "ON", now, None)
    ]


def test_tasmota_rename_maps_a_key_to_the_catalogue_name() -> None:
    """rename gives the catalogue's metric name; the unit stays the key's."""
    entry = {
        **TASMOTA,
        "rename": {"BME280.Temperature": "temperature"},
        "include": ["BME280.Temperature"],
    }
    parsed = decode(
        entry, "tele/a/SENSOR", TASMOTA_BME280, datetime(2019, 11, 3, 18, 35, tzinfo=UTC)
    )

    assert [(m, u) for _, m, _, _, u in readings(parsed)] == [("temperature", "C")]


def test_tasmota_not_an_object_is_bad_schema() -> None:
    """A SENSOR payload that is not a JSON object is recorded, not dropped."""
    parsed = decode(TASMOTA, "tele/a/SENSOR", "[1,2]", datetime(2026, 1, 1, tzinfo=UTC))

    assert reasons(parsed) == [("bad_schema", None)]
    assert parsed.rejections[0].serial_id == "tas-a"
    assert parsed.rejections[0].detail.startswith("source 'tasmota': ")


# --- flat_json: Zigbee2MQTT and Shelly -----------------------------------------------------------

Z2M = {
    "name": "z2m",
    "topic": "zigbee2mqtt/{name+}",
    "decoder": "flat_json",
    "serial": "z2m-{name}",
    "time_field": "last_seen",
    "exclude": ["linkquality"],
    "exclude_topics": [
        "zigbee2mqtt/bridge/#",
        "zigbee2mqtt/+/availability",
        "zigbee2mqtt/+/+/availability",
        "zigbee2mqtt/+/set",
        "zigbee2mqtt/+/+/set",
    ],
}


def test_z2m_documented_message_with_a_slash_in_the_friendly_name() -> None:
    """https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html: the WSDCGQ01LM
    message; "kitchen/floor_light" is the page's own example of a friendly name with "/"."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = decode(
        Z2M, "zigbee2mqtt/kitchen/floor_light", '{"temperature": 27.34, "humidity": 44.72}', now
    )

    assert readings(parsed) == [
        ("z2m-kitchen/floor_light", "temperature", 27.34, now, None),
        ("z2m-kitchen/floor_light", "humidity", 44.72, now, None),
    ]


@pytest.mark.parametrize(
    "last_seen",
    [
        # https://app.unpkg.com/zigbee2mqtt@2.4.0/files/dist/util/utils.js (formatDate):
        # "ISO8601 (local) = 2019-03-01T16:32:45.941+01:00"; ISO_8601 is the same in UTC
        '"2019-03-01T16:32:45.941+01:00"',
        '"2019-03-01T15:32:45.941Z"',  # ISO_8601
        "1551454365941",  # epoch: milliseconds
    ],
)
def test_z2m_last_seen_iso_with_offset_or_epoch_ms(last_seen: str) -> None:
    """last_seen is the readings' time in each of its forms, and never a reading itself."""
    data = f'{{"battery":100,"linkquality":18,"occupancy":true,"last_seen":{last_seen}}}'
    parsed = decode(
        Z2M, "zigbee2mqtt/bedroom/motion", data, datetime(2019, 3, 1, 15, 33, tzinfo=UTC)
    )
    at = datetime(2019, 3, 1, 15, 32, 45, 941000, tzinfo=UTC)

    assert [(m, v, ts) for _, m, v, ts, _ in readings(parsed)] == [
        ("battery", 100, at),
        ("occupancy", True, at),
    ]


def test_z2m_linkquality_and_bridge_and_availability_are_noise() -> None:
    """The gist log of Zigbee2MQTT 1.x (payload with linkquality), bridge and availability
    topics: linkquality is excluded, the other topics are ignored without a rejection."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    log_line = '{"battery":100,"linkquality":18,"occupancy":true,"temperature":19.9}'
    parsed = decode(Z2M, "zigbee2mqtt/bedroom/motion", log_line, now)

    assert [m for _, m, *_ in readings(parsed)] == ["battery", "occupancy", "temperature"]
    for topic, body in [
        ("zigbee2mqtt/bridge/state", '{"state":"online"}'),
        ("zigbee2mqtt/bedroom/motion/availability", '{"state":"offline"}'),
        ("zigbee2mqtt/lamp/availability", "online"),
        ("zigbee2mqtt/lamp/set", '{"state":"ON"}'),
    ]:
        ignored = decode(Z2M, topic, body, now)
        assert (ignored.readings, ignored.rejections) == ((), ()), topic


SHELLY = {
    "name": "shelly",
    "topic": "{device}/events/rpc",
    "decoder": "flat_json",
    "serial": "{device}",
    "root": "params",
    "time_field": "params.ts",
}
# https://shelly-api-docs.shelly.cloud/gen2/General/Notifications (NotifyStatus example).
SHELLY_NOTIFY = (
    '{"src":"shellypro4pm-f008d1d8b8b8","dst":"user_1","method":"NotifyStatus",'
    '"params":{"ts":1631266595.43,"switch:0":{"id":0,"output":true,"source":"button"}}}'
)


def test_shelly_notify_status_float_seconds_and_partial_keys() -> None:
    """params.ts is float seconds; only the keys present are readings (a partial status)."""
    parsed = decode(
        SHELLY,
        "shellypro4pm-f008d1d8b8b8/events/rpc",
        SHELLY_NOTIFY,
        datetime(2021, 9, 10, 9, 37, tzinfo=UTC),
    )
    at = datetime(2021, 9, 10, 9, 36, 35, 430000, tzinfo=UTC)

    assert readings(parsed) == [
        ("shellypro4pm-f008d1d8b8b8", "switch:0.id", 0, at, None),
        ("shellypro4pm-f008d1d8b8b8", "switch:0.output", True, at, None),
        ("shellypro4pm-f008d1d8b8b8", "switch:0.source", "button", at, None),
    ]


def test_shelly_null_for_a_vanished_key_is_no_reading_and_no_rejection() -> None:
    """The same page: a key that goes away is sent as null; that is neither stored nor refused."""
    data = (
        '{"method":"NotifyStatus","params":{"ts":1631266595.43,'
        '"switch:0":{"id":0,"timer_started_at":null}}}'
    )
    parsed = decode(SHELLY, "shelly1/events/rpc", data, datetime(2021, 9, 10, 9, 37, tzinfo=UTC))

    assert [m for _, m, *_ in readings(parsed)] == ["switch:0.id"]
    assert parsed.rejections == ()


def test_flat_json_missing_root_is_bad_schema() -> None:
    """A message without the configured root object is recorded with the reason."""
    parsed = decode(
        SHELLY, "shelly1/events/rpc", '{"method":"NotifyEvent"}', datetime(2026, 1, 1, tzinfo=UTC)
    )

    assert reasons(parsed) == [("bad_schema", None)]
    assert "root 'params'" in parsed.rejections[0].detail


# --- value: ESPHome, Homie ------------------------------------------------------------------------

ESPHOME = {
    "name": "esphome",
    "topic": "{node}/sensor/{object}/state",
    "decoder": "value",
    "serial": "esp-{node}",
    "metric": "{object}",
}
HOMIE = {
    "name": "homie",
    "topic": "homie/{device}/{node}/{property}",
    "decoder": "value",
    "serial": "{device}",
    "metric": "{node}.{property}",
}


def test_esphome_state_topic_plain_number() -> None:
    """https://esphome.io/components/mqtt/ : <TOPIC_PREFIX>/<COMPONENT_TYPE>/<NAME>/state
    carries the bare state, e.g. "23.5" (value_accuracy_to_string of the sensor)."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = decode(ESPHOME, "livingroom/sensor/temperature/state", "23.50", now)

    assert readings(parsed) == [("esp-livingroom", "temperature", 23.5, now, None)]


@pytest.mark.parametrize("text", ["nan", "None", "NaN", "unavailable"])
def test_failed_reads_are_text_never_zero(text: str) -> None:
    """ESPHome prints a failed read as "nan"; others "None": they stay text (type_mismatch for a
    numeric metric once the catalogue is known), never 0 and never dropped."""
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert readings(decode(ESPHOME, "n/sensor/temperature/state", text, now)) == [
        ("esp-n", "temperature", text, now, None)
    ]


def test_homie_property_values() -> None:
    """https://homieiot.github.io/specification/ : homie/super-car/engine/temperature "21.5",
    booleans "true"/"false"; integers keep their type, long fractions stay exact."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cases = {
        "21.5": 21.5,
        "true": True,
        "false": False,
        "42": 42,
        "0.1000000000000000055511151231257827": Decimal("0.1000000000000000055511151231257827"),
    }
    for text, expected in cases.items():
        got = readings(decode(HOMIE, "homie/super-car/engine/temperature", text, now))
        assert got == [("super-car", "engine.temperature", expected, now, None)], text


def test_value_empty_or_invalid_utf8_is_recorded() -> None:
    """An empty payload (Homie's "delete") and bytes that are not UTF-8 are rejections."""
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert reasons(decode(ESPHOME, "n/sensor/t/state", b"", now)) == [("bad_json", None)]
    assert reasons(decode(ESPHOME, "n/sensor/t/state", b"\xff", now)) == [("bad_json", None)]


def test_value_time_bounds_apply_to_receipt() -> None:
    """Decoded readings pass the native checks: a metric name over 255 characters is refused."""
    long_name = "x" * 300
    parsed = decode(ESPHOME, f"n/sensor/{long_name}/state", "1", datetime(2026, 1, 1, tzinfo=UTC))

    assert reasons(parsed) == [("bad_schema", None)]


# --- native as a source, and routing -------------------------------------------------------------


def test_native_source_on_its_own_topic() -> None:
    """The native format on another topic, its serial from the topic's placeholder."""
    entry = {"name": "legacy", "topic": "site/{s}/up", "decoder": "native", "serial": "{s}"}
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = decode(entry, "site/SN-1/up", '{"metrics":{"temperature":20}}', now)

    assert readings(parsed) == [("SN-1", "temperature", 20, now, None)]


def test_native_topics_come_first_and_are_unchanged() -> None:
    """A native topic is decoded natively even when a source's pattern also fits it."""
    entry = {
        "name": "any",
        "topic": "{a}/{b}/{c}",
        "decoder": "value",
        "serial": "{b}",
        "metric": "{c}",
    }
    router = router_for(NATIVE_TOPICS, parse_sources([entry]))
    route = router.match("devices/SN-1/telemetry")

    assert route is not None and route.source is None and route.serial_id == "SN-1"
    other = router.match("x/y/z")
    assert other is not None and other.source is not None and other.source.name == "any"
    assert router.subscriptions("g") == ("$share/g/devices/+/telemetry", "$share/g/+/+/+")


def test_a_topic_goes_to_the_first_matching_source() -> None:
    """Two sources fitting one topic: the first decodes it."""
    first = {**ESPHOME, "name": "first"}
    second = {**ESPHOME, "name": "second", "topic": "{node}/sensor/{object+}", "metric": "x"}
    router = router_for(NATIVE_TOPICS, parse_sources([first, second]))
    route = router.match("n/sensor/t/state")

    assert route is not None and route.source is not None and route.source.name == "first"


def test_time_bounds_apply_to_decoded_readings() -> None:
    """A Tasmota reading a day in the future is ts_in_future, as a native one would be."""
    data = json.dumps({"Time": "2026-01-02T12:00:00", "ANALOG": {"A0": 1}})
    parsed = decode(TASMOTA, "tele/x/SENSOR", data, datetime(2026, 1, 1, tzinfo=UTC))

    assert reasons(parsed) == [("ts_in_future", "ANALOG.A0")]
    assert parsed.rejections[0].detail.startswith("source 'tasmota': metric 'ANALOG.A0'")


def test_decoded_readings_are_bounded_per_message() -> None:
    """A flat object with more keys than max_readings_per_message is payload_too_large."""
    body = json.dumps({f"k{i}": i for i in range(LIMITS.max_readings_per_message + 1)})
    parsed = decode(Z2M, "zigbee2mqtt/big", body, datetime(2026, 1, 1, tzinfo=UTC))

    assert reasons(parsed) == [("payload_too_large", None)]
    assert parsed.readings == ()


def test_nanosecond_local_fraction_is_cut_to_microseconds() -> None:
    """A local time with nine fraction digits keeps its microseconds (datetime's resolution)."""
    data = json.dumps({"Time": "2026-01-01T01:00:00.123456789", "ANALOG": {"A0": 1}})
    parsed = decode(TASMOTA, "tele/x/SENSOR", data, datetime(2026, 1, 1, tzinfo=UTC))

    assert parsed.readings[0].ts == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert parsed.readings[0].ts - datetime(2026, 1, 1, tzinfo=UTC) < timedelta(seconds=1)


# --- senml ---------------------------------------------------------------------------------------

SENML = {"name": "senml", "topic": "senml/{site}", "decoder": "senml"}


def test_senml_rfc8428_multiple_datapoints_example() -> None:
    """RFC 8428's example of multiple measurements over time (section 5.1, "Examples",
    https://www.rfc-editor.org/rfc/rfc8428#section-5.1): base name, base time and base unit
    carry forward; bn's trailing ":" is dropped."""
    pack = """[
     {"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e+09,
      "bu":"%RH","v":20},
     {"u":"lon","v":24.30621},
     {"u":"lat","v":60.07965},
     {"t":60,"v":20.3},
     {"u":"lon","t":60,"v":24.30622},
     {"u":"lat","t":60,"v":60.07965},
     {"t":120,"v":20.7},
     {"u":"lon","t":120,"v":24.30623},
     {"u":"lat","t":120,"v":60.07966},
     {"u":"%EL","t":150,"v":98},
     {"t":180,"v":21.2},
     {"u":"lon","t":180,"v":24.30628},
     {"u":"lat","t":180,"v":60.07967}
   ]"""
    start = datetime(2011, 10, 31, 13, 24, 24, tzinfo=UTC)  # 1.320067464e9
    parsed = decode(SENML, "senml/a", pack, start + timedelta(minutes=4))

    assert {r.serial_id for r in parsed.readings} == {"urn:dev:ow:10e2073a01080063"}
    assert parsed.rejections == ()
    got = [(r.metric, r.value, r.ts - start, r.unit) for r in parsed.readings]
    assert got[:4] == [
        ("%RH", 20, timedelta(0), "%RH"),
        ("lon", 24.30621, timedelta(0), "lon"),
        ("lat", 60.07965, timedelta(0), "lat"),
        ("%RH", 20.3, timedelta(seconds=60), "%RH"),
    ]
    assert ("%EL", 98, timedelta(seconds=150), "%EL") in got
    assert len(got) == 13


def test_senml_names_values_and_relative_time() -> None:
    """Built on RFC 8428 section 5.1's voltage/current pack, with vs/vb records: times below
    2**28 are relative to receipt; bv is added to v."""
    pack = (
        '[{"bn":"urn:dev:ow:10e2073a01080063:","bv":100,"n":"voltage","u":"V","v":20.1},'
        '{"n":"current","t":-5,"v":1.2},{"n":"state","vs":"ok"},{"n":"on","vb":true}]'
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = decode(SENML, "senml/a", pack, now)

    assert [(r.metric, r.value, r.ts, r.unit) for r in parsed.readings] == [
        ("voltage", 120.1, now, "V"),
        ("current", 101.2, now - timedelta(seconds=5), None),
        ("state", "ok", now, None),
        ("on", True, now, None),
    ]


@pytest.mark.parametrize(
    ("record", "reason", "problem"),
    [
        ('{"n":"blob","vd":"aGVsbG8"}', "bad_schema", "vd (a data value) is not supported"),
        ('{"n":"x","v":1,"foo_":1}', "bad_schema", "must-understand"),
        ('{"n":"x","v":"1"}', "type_mismatch", "v must be a number"),
        ('{"n":"x"}', "bad_schema", "exactly one of v, vs and vb"),
        ('{"bver":11,"n":"x","v":1}', "bad_schema", "bver 11 is not supported"),
    ],
)
def test_senml_unsupported_records_are_rejected_with_a_reason(
    record: str, reason: str, problem: str
) -> None:
    """Such a record is refused on its own, with why; the pack's other records still count."""
    pack = f'[{{"bn":"dev1/","n":"ok","v":1}},{record}]'
    parsed = decode(SENML, "senml/a", pack, datetime(2026, 1, 1, tzinfo=UTC))

    assert [(r.serial_id, r.metric) for r in parsed.readings] == [("dev1", "ok")]
    assert reasons(parsed) == [(reason, None)]
    assert problem in parsed.rejections[0].detail
    assert parsed.rejections[0].serial_id == "dev1"


def test_senml_serial_template_with_bn() -> None:
    """serial may combine topic levels and {bn}; without bn and serial the pack is refused."""
    entry = {**SENML, "serial": "{site}-{bn}"}
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = decode(entry, "senml/north", '[{"bn":"pump:","n":"rpm","v":1}]', now)

    assert [r.serial_id for r in parsed.readings] == ["north-pump"]
    refused = decode(SENML, "senml/a", '[{"n":"rpm","v":1}]', now)
    assert reasons(refused) == [("bad_schema", None)]
    assert "no serial_id" in refused.rejections[0].detail


def test_a_decoder_bug_is_recorded_and_logged_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception inside a decoder becomes a bad_schema rejection and a log event."""

    def broken(
        source: Source,
        fields: Mapping[str, str],
        data: bytes,
        received_at: datetime,
        limits: Limits,
    ) -> ParseResult:
        raise KeyError(source.name)

    patched: dict[str, Decoder] = {**sources.DECODERS, "tasmota": broken}
    monkeypatch.setattr(sources, "DECODERS", patched)
    with capture_logs() as logs:
        parsed = decode(TASMOTA, "tele/x/SENSOR", "{}", datetime(2026, 1, 1, tzinfo=UTC))

    assert reasons(parsed) == [("bad_schema", None)]
    assert "internal error" in parsed.rejections[0].detail
    assert [e["event"] for e in logs] == ["source_decoder_failed"]
