"""The ttn decoder over The Things Stack's own documented messages, and its traps: three times,
nanosecond fractions, fields omitted when empty, uplinks without decoded_payload, and the
neighbouring message types that are no uplinks."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.sources import parse_sources
from ingestor.decoders import ttn
from iothub.devtools.simulator import formats
from tests.unit.test_decoders import LIMITS, decode, readings, reasons
from tests.unit.test_simulated_formats import factory

TTN = {
    "name": "ttn",
    "topic": "v3/{app}/devices/{device}/up",
    "decoder": "ttn",
    "serial": "{device}",
}
# Every message type of one application, as one subscription would bring a bridged "v3/#".
TTN_ALL = {**TTN, "topic": "v3/{app}/devices/{device}/{kind+}"}

# https://www.thethingsindustries.com/docs/integrations/data-formats/ ("Uplink message
# example"; TheThingsIndustries/lorawan-stack-docs doc/content/integrations/data-formats/
# _index.md), verbatim. It has no f_port: empty fields are omitted, says the same page.
DATA_FORMATS_UPLINK = """{
  "end_device_ids" : {
    "device_id" : "dev1",
    "application_ids" : {
      "application_id" : "app1"
    },
    "dev_eui" : "0004A30B001C0530",
    "join_eui" : "800000000000000C",
    "dev_addr" : "00BCB929"
  },
  "correlation_ids" : [
    "as:up:01E0WZGT6Y7657CPFPE5WEYDSQ",
    "gs:conn:01E0WDEC6T5T4XXBAX7S1VMFKE",
    "gs:uplink:01E0WZGSZWT07NE5TS2APTV1Z9",
    "ns:uplink:01E0WZGSZXZXZS8RFAWZX0F2FY",
    "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01E0WZGSZXGE1KS577PFBWRJEE"
  ],
  "received_at" : "2020-02-12T15:15:46.014773143Z",
  "uplink_message" : {
    "session_key_id" : "AXA50tHUGUucuzS/bCGMNw==",
    "f_cnt" : 1,
    "frm_payload" : "gkHe",
    "decoded_payload" : {
      "temperature": 1.0,
      "luminosity": 0.64
    },
    "rx_metadata" : [ {
      "gateway_ids" : {
        "gateway_id" : "gtw1",
        "eui" : "9C5C8E00001A05C4"
      },
      "time" : "2020-02-12T15:15:45.787Z",
      "timestamp" : 2463457000,
      "rssi" : -35,
      "channel_rssi" : -35,
      "snr" : 5,
      "uplink_token" : "ChIKEAoEZ3R3MRIInFyOAAAaBcQQ6L3Vlgk=",
      "channel_index" : 2
    } ],
    "settings" : {
      "data_rate" : {
        "lora" : {
          "bandwidth" : 125000,
          "spreading_factor" : 7
        }
      },
      "data_rate_index" : 5,
      "coding_rate" : "4/6",
      "frequency" : "868300000",
      "timestamp" : 2463457000,
      "time" : "2020-02-12T15:15:45.787Z"
    },
    "consumed_airtime": "0.056576s",
    "locations": {
      "user": {
        "latitude": 37.97155556731436,
        "longitude": 23.72678801175413,
        "altitude": 10,
        "source": "SOURCE_REGISTRY"
      }
    },
    "received_at" : "2020-02-12T15:15:45.789585559Z"
  }
}"""
# https://www.thethingsindustries.com/docs/integrations/other-integrations/mqtt/ ("Show uplink
# message example", lorawan-stack-docs doc/content/integrations/other-integrations/mqtt/
# _index.md), verbatim: an uplink of device dev1 without decoded_payload (no payload formatter)
# and without either received_at.
MQTT_UPLINK_UNDECODED = """{
  "end_device_ids": {
    "device_id": "dev1",
    "application_ids": {
      "application_id": "app1"
    },
    "dev_eui": "4200000000000000",
    "join_eui": "4200000000000000",
    "dev_addr": "01DA1F15"
  },
  "correlation_ids": [
    "gs:conn:01D2CSNX7FJVKQPCVG612QF1TX",
    "gs:uplink:01D2CV8HF62ME0D7MZWE38HHH8",
    "ns:uplink:01D2CV8HF6FYJHKZ45YY1DB3MR",
    "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01D2CV8HF6XR7ZFVK768PDG3J4",
    "as:up:01D2CV8HNGJ57G25BW0FCZNY07"
  ],
  "uplink_message": {
    "session_key_id": "AWiZpAyXrAfEkUNkBljRoA==",
    "f_port": 15,
    "frm_payload": "VGVtcGVyYXR1cmUgPSAwLjA=",
    "rx_metadata": [
      {
        "gateway_ids": {
          "gateway_id": "eui-0242020000247803",
          "eui": "0242020000247803"
        },
        "time": "2019-01-29T13:02:34.981Z",
        "timestamp": 1283325000,
        "rssi": -35,
        "snr": 5,
        "uplink_token": "CiIKIAoUZXVpLTAyNDIwMjAwMDAyNDc4MDMSCAJCAgAAJHgDEMj49+ME"
      }
    ],
    "settings": {
      "data_rate": {
        "lora": {
          "bandwidth": 125000,
          "spreading_factor": 7
        }
      },
      "coding_rate": "4/6",
      "frequency": "868500000",
      "gateway_channel_index": 2,
      "device_channel_index": 2
    }
  }
}"""
# The same page's join-accept example, verbatim, on v3/app1@tenant1/devices/dev1/join.
MQTT_JOIN = """{
  "end_device_ids": {
    "device_id": "dev1",
    "application_ids": {
      "application_id": "app1"
    },
    "dev_eui": "4200000000000000",
    "join_eui": "4200000000000000",
    "dev_addr": "01DA1F15"
  },
  "correlation_ids": [
    "gs:conn:01D2CSNX7FJVKQPCVG612QF1TX",
    "gs:uplink:01D2CT834K2YD17ZWZ6357HC0Z",
    "ns:uplink:01D2CT834KNYD7BT2NHK5R1WVA",
    "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01D2CT834KJ4AVSD1SJ637NAV6",
    "as:up:01D2CT83AXQFQYQ35SR74CTWKH"
  ],
  "join_accept": {
    "session_key_id": "AWiZpAyXrAfEkUNkBljRoA=="
  }
}"""
# The same page's downlink event example, verbatim, on v3/app1@tenant1/devices/dev1/down/ack.
MQTT_DOWN_ACK = """{
  "end_device_ids": {
    "device_id": "dev1",
    "application_ids": {
      "application_id": "app1"
    },
    "dev_eui": "4200000000000000",
    "join_eui": "4200000000000000",
    "dev_addr": "00E6F42A"
  },
  "correlation_ids": ["my-correlation-id", "..."],
  "downlink_ack": {
    "session_key_id": "AWnj0318qrtJ7kbudd8Vmw==",
    "f_port": 15,
    "f_cnt": 11,
    "frm_payload": "vu8=",
    "confirmed": true,
    "priority": "NORMAL",
    "correlation_ids": ["my-correlation-id", "..."]
  }
}"""
RECEIVED = datetime(2020, 2, 12, 15, 15, 46, 100000, tzinfo=UTC)  # iothub's own receipt


def test_documented_uplink_at_the_network_servers_time() -> None:
    """The Data Formats page's uplink: decoded_payload's keys are the readings, at
    uplink_message.received_at (not received_at, not the gateway's time), nanoseconds cut."""
    parsed = decode(TTN, "v3/app1@tenant1/devices/dev1/up", DATA_FORMATS_UPLINK, RECEIVED)
    at = datetime(2020, 2, 12, 15, 15, 45, 789585, tzinfo=UTC)

    assert readings(parsed) == [
        ("dev1", "temperature", 1.0, at, None),
        ("dev1", "luminosity", 0.64, at, None),
    ]
    assert parsed.rejections == ()


def test_nanosecond_fraction_is_cut_not_rounded_and_never_refused() -> None:
    """RFC 3339 with nine fraction digits: datetime keeps six; .999999999 stays in its second."""
    body = (
        '{"uplink_message":{"decoded_payload":{"t":1},'
        '"received_at":"2020-02-12T15:15:45.999999999Z"}}'
    )
    parsed = decode(TTN, "v3/app1/devices/dev1/up", body, RECEIVED)

    assert [r.ts for r in parsed.readings] == [
        datetime(2020, 2, 12, 15, 15, 45, 999999, tzinfo=UTC)
    ]


def test_application_servers_time_then_receipt_when_the_network_servers_is_absent() -> None:
    """Without uplink_message.received_at the Application Server's received_at is the time;
    without both, iothub's receipt."""
    only_as = (
        '{"received_at":"2020-02-12T15:15:46.014773143Z",'
        '"uplink_message":{"decoded_payload":{"t":1}}}'
    )
    parsed = decode(TTN, "v3/app1/devices/dev1/up", only_as, RECEIVED)
    assert [r.ts for r in parsed.readings] == [datetime(2020, 2, 12, 15, 15, 46, 14773, tzinfo=UTC)]

    neither = '{"uplink_message":{"f_port":2,"decoded_payload":{"t":1}}}'
    parsed = decode(TTN, "v3/app1/devices/dev1/up", neither, RECEIVED)
    assert [r.ts for r in parsed.readings] == [RECEIVED]


def test_uplink_without_decoded_payload_is_rejected_with_the_reason() -> None:
    """The MQTT page's uplink has frm_payload but no decoded_payload: bad_schema saying a
    payload formatter is missing, never a silent drop and never a guess at the bytes."""
    parsed = decode(TTN, "v3/app1@tenant1/devices/dev1/up", MQTT_UPLINK_UNDECODED, RECEIVED)

    assert parsed.readings == ()
    assert reasons(parsed) == [("bad_schema", None)]
    [rejection] = parsed.rejections
    assert rejection.serial_id == "dev1"
    assert "no decoded_payload" in rejection.detail
    assert "payload formatter" in rejection.detail
    assert rejection.detail.startswith("source 'ttn': ")


@pytest.mark.parametrize(
    ("uplink", "said"),
    [
        ('{"f_cnt":7}', "no frm_payload and no decoded_payload"),  # f_port 0: MAC commands only
        ('{"frm_payload":"gkHe","decoded_payload":{}}', "decoded_payload is empty"),
        ('{"frm_payload":"gkHe","decoded_payload":[1,2]}', "decoded_payload is not an object"),
        ('"up"', "uplink_message is not an object"),
    ],
)
def test_uplinks_without_readings_say_why(uplink: str, said: str) -> None:
    """Each uplink that holds no reading is bad_schema with its own reason."""
    parsed = decode(TTN, "v3/app1/devices/dev1/up", f'{{"uplink_message":{uplink}}}', RECEIVED)

    assert reasons(parsed) == [("bad_schema", None)]
    assert said in parsed.rejections[0].detail


def test_neighbouring_message_types_are_noise() -> None:
    """join, down/ack (the MQTT page's examples), service/data, location/solved: no reading and
    no rejection, when the source's topic reaches them; a message that is no The Things Stack
    message at all is bad_schema."""
    for topic, body in [
        ("v3/app1@tenant1/devices/dev1/join", MQTT_JOIN),
        ("v3/app1@tenant1/devices/dev1/down/ack", MQTT_DOWN_ACK),
        ("v3/app1@tenant1/devices/dev1/service/data", '{"service_data":{"data":{"a":1}}}'),
        ("v3/app1@tenant1/devices/dev1/location/solved", '{"location_solved":{"service":"x"}}'),
    ]:
        ignored = decode(TTN_ALL, topic, body, RECEIVED)
        assert (ignored.readings, ignored.rejections) == ((), ()), topic

    stray = decode(TTN_ALL, "v3/app1/devices/dev1/up", '{"temperature":1}', RECEIVED)
    assert reasons(stray) == [("bad_schema", None)]
    assert "no uplink_message" in stray.rejections[0].detail


def test_nested_decoded_payload_with_include_rename_and_values() -> None:
    """Nested objects flatten with "." as flat_json's do; include, rename and values apply to
    those keys; a null is no reading; a list is type_mismatch for its key only."""
    entry = {
        **TTN,
        "serial": "{app}/{device}",
        "include": ["bme.*", "door", "gps"],
        "rename": {"bme.temperature": "temperature"},
        "values": {"open": True, "closed": False},
    }
    body = (
        '{"uplink_message":{"f_port":2,"frm_payload":"AQ==","received_at":'
        '"2020-02-12T15:15:45.5Z","decoded_payload":{"bme":{"temperature":21.5,"humidity":null},'
        '"door":"open","battery":3.6,"gps":[1,2]}}}'
    )
    parsed = decode(entry, "v3/farm@ttn/devices/barn-1/up", body, RECEIVED)
    at = datetime(2020, 2, 12, 15, 15, 45, 500000, tzinfo=UTC)

    assert readings(parsed) == [
        ("farm@ttn/barn-1", "temperature", 21.5, at, None),
        ("farm@ttn/barn-1", "door", True, at, None),
    ]
    assert reasons(parsed) == [("type_mismatch", "gps")]


def test_a_bad_received_at_is_bad_timestamp_for_each_reading() -> None:
    """A time that is no RFC 3339 time rejects the readings as bad_timestamp, naming the field."""
    body = '{"uplink_message":{"received_at":"yesterday","decoded_payload":{"t":1}}}'
    parsed = decode(TTN, "v3/app1/devices/dev1/up", body, RECEIVED)

    assert reasons(parsed) == [("bad_timestamp", "t")]
    assert "uplink_message.received_at" in parsed.rejections[0].detail


# --- the fast path: msgspec skips the metadata, load_json parses what is read -------------------

DEV1 = "v3/app1@tenant1/devices/dev1/up"


def parts_both_ways(body: bytes) -> tuple[object, object]:
    """(fast path's parts or None, strict path's parts or rejection) of one message."""
    return ttn._fast_parts(body, "dev1", LIMITS), ttn._strict_parts(body, "dev1", LIMITS)


@pytest.mark.parametrize(
    "body",
    [
        DATA_FORMATS_UPLINK.encode(),
        json.dumps(json.loads(DATA_FORMATS_UPLINK), separators=(",", ":")).encode(),
    ],
)
def test_documented_uplink_takes_the_fast_path_and_reads_the_same(body: bytes) -> None:
    fast, strict = parts_both_ways(body)
    assert fast is not None, "the documented uplink fell back to the strict path"
    assert repr(fast) == repr(strict)


def test_simulated_uplinks_take_the_fast_path() -> None:
    rendered = formats.FormatFactory(factory(time.time() - 60), "ttn")
    for _ in range(20):
        _, body, _ = rendered.next(30.0, time.time())
        fast, strict = parts_both_ways(body)
        assert fast is not None and repr(fast) == repr(strict)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        # Each key the decoder reads, sent twice: msgspec would keep the last one silently.
        (
            '{"received_at":"2020-02-12T15:15:46Z","received_at":"2021-01-01T00:00:00Z",'
            '"uplink_message":{"decoded_payload":{"t":1}}}',
            "duplicate key 'received_at'",
        ),
        (
            '{"uplink_message":{"decoded_payload":{"t":1},"received_at":"2020-02-12T15:15:46Z",'
            '"received_at":"2021-01-01T00:00:00Z"}}',
            "duplicate key 'received_at'",
        ),
        (
            '{"uplink_message":{"decoded_payload":{"t":1}},'
            '"uplink_message":{"decoded_payload":{"t":2}}}',
            "duplicate key 'uplink_message'",
        ),
        (
            '{"uplink_message":{"decoded_payload":{"t":1},"decoded_payload":{"t":2}}}',
            "duplicate key 'decoded_payload'",
        ),
        ('{"uplink_message":{"decoded_payload":{"t":1,"t":2}}}', "duplicate key 't'"),
        # The same key written with an escape is the same key.
        (
            '{"uplink_message":{"decoded_payload":{"t":1},"decoded\\u005fpayload":{"t":2}}}',
            "duplicate key 'decoded_payload'",
        ),
        ('{"uplink_message":{"decoded_payload":{"t":NaN}}}', "NaN is not a JSON number"),
        ('{"x":[1,2,],"uplink_message":{"decoded_payload":{"t":1}}}', "not valid JSON"),
        ('{"x":"\xff","uplink_message":{"decoded_payload":{"t":1}}}', "not valid UTF-8"),
    ],
)
def test_what_the_decoder_reads_keeps_every_json_rule(body: str, said: str) -> None:
    """Duplicates of the keys read, NaN, invalid JSON or UTF-8 anywhere: bad_json with the same
    reason as before the fast path (which hands these to the strict one)."""
    raw = body.encode("latin-1") if "\xff" in body else body.encode()
    parsed = decode(TTN, DEV1, raw, RECEIVED)
    assert reasons(parsed) == [("bad_json", None)]
    assert said in parsed.rejections[0].detail
    assert ttn._fast_parts(raw, "dev1", LIMITS) is None


def test_a_duplicate_key_in_metadata_the_decoder_skips_is_not_refused() -> None:
    """The documented scope of the fast path (docs/sources.md): a key twice inside rx_metadata,
    which iothub never reads, does not make the readings ambiguous; they are stored."""
    body = (
        '{"uplink_message":{"rx_metadata":[{"rssi":-35,"rssi":-36}],'
        '"decoded_payload":{"t":1},"received_at":"2020-02-12T15:15:45.789585559Z"}}'
    )
    parsed = decode(TTN, DEV1, body, RECEIVED)
    at = datetime(2020, 2, 12, 15, 15, 45, 789585, tzinfo=UTC)
    assert readings(parsed) == [("dev1", "t", 1, at, None)]


def test_deep_nesting_and_huge_payloads_are_refused_with_the_reason() -> None:
    deep = '{"uplink_message":{"rx_metadata":' + "[" * 100_000 + "]" * 100_000 + "}}"
    parsed = decode(TTN, DEV1, deep, RECEIVED)
    assert reasons(parsed) == [("bad_json", None)]
    assert "nests arrays or objects too deeply" in parsed.rejections[0].detail

    padding = "x" * (LIMITS.max_payload_bytes)
    huge = f'{{"uplink_message":{{"decoded_payload":{{"t":1}}}},"pad":"{padding}"}}'
    parsed = decode(TTN, DEV1, huge, RECEIVED)
    assert reasons(parsed) == [("payload_too_large", None)]


def test_exact_numbers_and_epoch_times_through_the_fast_path() -> None:
    body = (
        b'{"uplink_message":{"decoded_payload":{"big":123456789012345678901234567890,'
        b'"tiny":1e-400,"x":23.50,"n":-0},"received_at":1581520545}}'
    )
    fast, strict = parts_both_ways(body)
    assert fast is not None and repr(fast) == repr(strict)
    parsed = decode(TTN, DEV1, body, RECEIVED)
    values = {r.metric: r.value for r in parsed.readings}
    assert values["big"] == 123456789012345678901234567890
    assert values["tiny"] == Decimal("1e-400")
    assert values["x"] == 23.5
    assert {r.ts for r in parsed.readings} == {datetime(2020, 2, 12, 15, 15, 45, tzinfo=UTC)}


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_TIMES = st.one_of(
    st.just("2020-02-12T15:15:45.789585559Z"), st.integers(0, 2**40), st.none(), _JSON_SCALARS
)


@settings(max_examples=300, deadline=None)
@given(
    metadata=st.dictionaries(
        st.sampled_from(["rx_metadata", "settings", "f_cnt", "frm_payload", "locations", "x"]),
        _JSON,
        max_size=4,
    ),
    decoded=_JSON,
    times=st.fixed_dictionaries({}, optional={"uplink": _TIMES, "message": _TIMES}),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 2]),
)
def test_fast_path_reads_what_the_strict_path_reads(
    metadata: dict[str, Any],
    decoded: Any,
    times: dict[str, Any],
    ascii_only: bool,
    indent: int | None,
) -> None:
    """Wherever the fast path answers, its parts are the strict path's, value for value."""
    uplink = {**metadata, "decoded_payload": decoded}
    if "uplink" in times:
        uplink["received_at"] = times["uplink"]
    message: dict[str, Any] = {"end_device_ids": {"device_id": "dev1"}, "uplink_message": uplink}
    if "message" in times:
        message["received_at"] = times["message"]
    body = json.dumps(message, ensure_ascii=ascii_only, indent=indent).encode()
    fast, strict = parts_both_ways(body)
    if fast is not None:
        assert repr(fast) == repr(strict)
    source = parse_sources([TTN])[0]
    whole = ttn.decode(source, {"app": "app1", "device": "dev1"}, body, RECEIVED, LIMITS)
    expected = ttn._readings(source, "dev1", strict, RECEIVED, LIMITS)  # type: ignore[arg-type]
    assert whole == expected
