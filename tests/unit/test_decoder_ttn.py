"""The ttn decoder over The Things Stack's own documented messages, and its traps: three times,
nanosecond fractions, fields omitted when empty, uplinks without decoded_payload, and the
neighbouring message types that are no uplinks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.unit.test_decoders import decode, readings, reasons

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
