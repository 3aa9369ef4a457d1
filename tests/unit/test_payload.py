"""Payload parsing and validation: every form of docs/mqtt.md, a bad-input corpus, fuzzing."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from ingestor.payload import (
    INTERNAL_ERROR,
    MAX_NAME_LEN,
    Limits,
    ParseResult,
    RawReading,
    Rejection,
    check_reading,
    check_value,
    encode_value,
    parse_message,
    rule_value,
)
from ingestor.reasons import Reason

NOW = datetime(2026, 1, 27, 12, 0, tzinfo=UTC)
LIMITS = Limits()
SERIAL = "SN-A1-TEMP-0001"
DESIGN_EXAMPLE = {
    "schema_version": 1,
    "device": SERIAL,
    "ts": "2026-01-27T12:00:00Z",
    "metrics": {"temperature": 23.5, "humidity": 42, "online": True, "status": "OK"},
}


def parse(
    document: Any,
    topic_serial: str | None = SERIAL,
    *,
    now: datetime = NOW,
    limits: Limits = LIMITS,
) -> ParseResult:
    payload = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_message(payload, topic_serial, now, limits)


def rejected(result: ParseResult) -> Rejection:
    """The only rejection of a result without readings."""
    assert result.readings == ()
    assert len(result.rejections) == 1, result.rejections
    return result.rejections[0]


def values(result: ParseResult) -> dict[str, object]:
    return {reading.metric: reading.value for reading in result.readings}


def reasons(result: ParseResult) -> dict[str | None, Reason]:
    return {rejection.metric: rejection.reason for rejection in result.rejections}


# --- the forms of docs/mqtt.md -----------------------------------------------------------------


def test_design_example_on_shared_topic() -> None:
    """The design's example yields its four readings with their JSON types kept."""
    result = parse(DESIGN_EXAMPLE, None)
    assert result.rejections == ()
    assert result.readings == (
        RawReading(SERIAL, "temperature", NOW, 23.5, None),
        RawReading(SERIAL, "humidity", NOW, 42, None),
        RawReading(SERIAL, "online", NOW, True, None),
        RawReading(SERIAL, "status", NOW, "OK", None),
    )
    assert type(result.readings[1].value) is int


def test_per_device_topic_without_device_key_uses_topic_serial() -> None:
    """On the per-device topic the device key is optional: the topic names the device."""
    result = parse({"metrics": {"temperature": 21.0}}, "SN-7")
    assert result.readings == (RawReading("SN-7", "temperature", NOW, 21.0, None),)


def test_per_device_topic_with_equal_device_key() -> None:
    """A device key equal to the topic's serial is accepted."""
    result = parse(DESIGN_EXAMPLE, SERIAL)
    assert result.rejections == ()
    assert len(result.readings) == 4


def test_array_of_messages_for_several_devices() -> None:
    """A JSON array carries several messages; on the shared topic each names its device."""
    result = parse(
        [
            {"device": "SN-1", "metrics": {"temperature": 1}},
            {"device": "SN-2", "ts": 1769515200, "metrics": {"temperature": 2}},
        ],
        None,
    )
    assert result.rejections == ()
    assert [(r.serial_id, r.value, r.ts) for r in result.readings] == [
        ("SN-1", 1, NOW),
        ("SN-2", 2, datetime(2026, 1, 27, 12, 0, tzinfo=UTC)),
    ]


def test_metric_object_form_with_ts_and_unit() -> None:
    """A metric may carry its own ts (overriding the message's) and a unit."""
    result = parse(
        {
            "ts": "2026-01-27T11:00:00Z",
            "metrics": {
                "temperature": {
                    "value": 23.5,
                    "ts": "2026-01-27T11:30:00+00:00",
                    "unit": "celsius",
                },
                "humidity": {"value": 40},
                "pressure": 1013,
            },
        }
    )
    assert result.rejections == ()
    assert result.readings == (
        RawReading(
            SERIAL, "temperature", datetime(2026, 1, 27, 11, 30, tzinfo=UTC), 23.5, "celsius"
        ),
        RawReading(SERIAL, "humidity", datetime(2026, 1, 27, 11, tzinfo=UTC), 40, None),
        RawReading(SERIAL, "pressure", datetime(2026, 1, 27, 11, tzinfo=UTC), 1013, None),
    )


def test_null_optional_keys_count_as_absent() -> None:
    """ts, unit, device and schema_version set to null mean the same as leaving them out."""
    result = parse(
        {
            "schema_version": None,
            "device": None,
            "ts": None,
            "metrics": {"a": {"value": 1, "ts": None, "unit": None}},
        }
    )
    assert result.readings == (RawReading(SERIAL, "a", NOW, 1, None),)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-01-27T12:00:00Z", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27T14:00:00+02:00", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27T06:30:00-05:30", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27T11:59:59.123456Z", datetime(2026, 1, 27, 11, 59, 59, 123456, tzinfo=UTC)),
        ("2026-01-27T11:59:59.5+00:00", datetime(2026, 1, 27, 11, 59, 59, 500000, tzinfo=UTC)),
        ("2026-01-27 12:00:00+00:00", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        (1769515200, datetime(2026, 1, 27, 12, tzinfo=UTC)),
        (1769515199.25, datetime(2026, 1, 27, 11, 59, 59, 250000, tzinfo=UTC)),
        (1769515200123, datetime(2026, 1, 27, 12, 0, 0, 123000, tzinfo=UTC)),
        (1769515200123.5, datetime(2026, 1, 27, 12, 0, 0, 123500, tzinfo=UTC)),
    ],
)
def test_timestamp_forms(ts: object, expected: datetime) -> None:
    """ISO 8601 with any offset, epoch seconds and epoch milliseconds all become aware UTC."""
    result = parse({"ts": ts, "metrics": {"a": 1}})
    assert result.rejections == ()
    (reading,) = result.readings
    assert reading.ts == expected
    assert reading.ts.tzinfo is UTC


def test_epoch_of_exactly_1e11_is_seconds() -> None:
    """Only numbers above 1e11 are milliseconds: 1e11 itself is seconds (the year 5138)."""
    rejection = rejected(parse({"ts": 100_000_000_000, "metrics": {"a": 1}}))
    assert rejection.reason is Reason.ts_in_future
    assert "5138-" in rejection.detail


def test_missing_ts_is_received_at_in_utc() -> None:
    """Without ts a reading gets the receipt time, converted to UTC."""
    received = datetime(2026, 1, 27, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    (reading,) = parse({"metrics": {"a": 1}}, now=received).readings
    assert reading.ts == NOW
    assert reading.ts.tzinfo is UTC


def test_naive_received_at_is_a_caller_error() -> None:
    """A naive receipt time is a programming error of the caller, not a device problem."""
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_message(b"{}", SERIAL, datetime(2026, 1, 27), LIMITS)


def test_utf8_bom_is_accepted() -> None:
    """A leading UTF-8 byte order mark is ignored."""
    result = parse(b"\xef\xbb\xbf" + json.dumps({"metrics": {"a": 1}}).encode())
    assert values(result) == {"a": 1}


def test_non_ascii_text_is_kept() -> None:
    """Metric names, units and string values may be any Unicode text."""
    result = parse({"metrics": {"température": {"value": "état: prêt ✓", "unit": "°C"}}})
    assert result.readings == (RawReading(SERIAL, "température", NOW, "état: prêt ✓", "°C"),)


def test_time_bounds_are_inclusive() -> None:
    """Exactly future_tolerance ahead and exactly max_age old are still accepted."""
    result = parse(
        {
            "metrics": {
                "ahead": {"value": 1, "ts": (NOW + timedelta(minutes=5)).isoformat()},
                "old": {"value": 1, "ts": (NOW - timedelta(days=7)).isoformat()},
                "too_far": {"value": 1, "ts": (NOW + timedelta(minutes=5, seconds=1)).isoformat()},
                "too_old": {"value": 1, "ts": (NOW - timedelta(days=7, seconds=1)).isoformat()},
            }
        }
    )
    assert set(values(result)) == {"ahead", "old"}
    assert reasons(result) == {"too_far": Reason.ts_in_future, "too_old": Reason.ts_too_old}


def test_limits_are_configurable() -> None:
    """Tighter limits change the time bounds."""
    limits = Limits(future_tolerance=timedelta(0), max_age=timedelta(hours=1))
    result = parse(
        {"metrics": {"a": {"value": 1, "ts": 1769515201}, "b": {"value": 1, "ts": 1769508000}}},
        limits=limits,
    )
    assert reasons(result) == {"a": Reason.ts_in_future, "b": Reason.ts_too_old}


def test_limits_refuse_nonsense() -> None:
    """Limits that would reject everything are refused when built."""
    with pytest.raises(ValueError, match="max_payload_bytes"):
        Limits(max_payload_bytes=0)
    with pytest.raises(ValueError, match="max_age"):
        Limits(max_age=timedelta(0))


# --- bad payloads: the whole message ----------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
NESTED_VALUE = b'{"metrics": {"a": 1, "b": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"


@pytest.mark.parametrize(
    ("payload", "topic_serial", "reason"),
    [
        (b'{"metrics": {"a": "\xff"}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": "\xc3\x28"}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": "\xed\xa0\x80"}}', SERIAL, Reason.bad_json),  # encoded surrogate
        (json.dumps({"metrics": {"a": 1}}).encode("utf-16"), SERIAL, Reason.bad_json),
        (b"", SERIAL, Reason.bad_json),
        (b"  \n ", SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": 1}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": 1}} trailing', SERIAL, Reason.bad_json),
        (b"{'metrics': {'a': 1}}", SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": NaN}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": Infinity}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": -Infinity}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": 1, "a": 2}}', SERIAL, Reason.bad_json),
        (b'{"metrics": {"a": 1}, "metrics": {"b": 2}}', SERIAL, Reason.bad_json),
        (DEEP, SERIAL, Reason.bad_json),
        (NESTED_VALUE, SERIAL, Reason.bad_json),
        (b"1", SERIAL, Reason.bad_schema),
        (b'"text"', SERIAL, Reason.bad_schema),
        (b"null", SERIAL, Reason.bad_schema),
        (b"[]", SERIAL, Reason.bad_schema),
        (b'{"metrics": {"a": 1}}', "", Reason.bad_schema),
        (b'{"metrics": {"a": 1}}', "SN\x00", Reason.bad_schema),
        (b'{"metrics": {"a": 1}}', "S" * (MAX_NAME_LEN + 1), Reason.bad_schema),
    ],
)
def test_whole_message_rejections(payload: bytes, topic_serial: str | None, reason: Reason) -> None:
    """Payloads that cannot be read at all yield exactly one rejection with the exact reason."""
    assert rejected(parse(payload, topic_serial)).reason is reason


def test_oversize_payload_is_refused_before_decoding() -> None:
    """A payload over max_payload_bytes is payload_too_large even when it is not JSON."""
    limits = Limits(max_payload_bytes=100)
    rejection = rejected(parse(b"\xff" * 101, limits=limits))
    assert rejection.reason is Reason.payload_too_large
    assert rejection.detail == "payload is 101 bytes (limit 100)"
    assert rejection.serial_id == SERIAL
    assert parse({"metrics": {"a": 1}}, limits=limits).readings != ()


def test_too_many_readings_in_one_message() -> None:
    """More readings than max_readings_per_message reject the message as payload_too_large."""
    limits = Limits(max_readings_per_message=3)
    many = parse({"metrics": {f"m{i}": i for i in range(4)}}, limits=limits)
    assert rejected(many).reason is Reason.payload_too_large
    elements = parse([{"metrics": {"a": 1}}, {}, {}, {"metrics": {"b": 1}}], limits=limits)
    assert rejected(elements).reason is Reason.payload_too_large
    assert len(parse({"metrics": {f"m{i}": i for i in range(3)}}, limits=limits).readings) == 3


def test_bad_json_detail_points_at_the_error() -> None:
    """A JSON syntax error names its line and column; NaN and duplicate keys say what they are."""
    assert rejected(parse(b'{"metrics":\n  {"a": }}')).detail == (
        "payload is not valid JSON: Expecting value at line 2 column 9"
    )
    assert "NaN is not a JSON number" in rejected(parse(b'{"metrics": {"a": NaN}}')).detail
    assert "duplicate key 'a'" in rejected(parse(b'{"metrics": {"a": 1, "a": 2}}')).detail
    assert "not valid UTF-8" in rejected(parse(b'{"metrics": {"a": "\xff"}}')).detail


# --- bad messages inside a payload ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "topic_serial", "reason"),
    [
        ({"device": "OTHER", "metrics": {"a": 1}}, SERIAL, Reason.device_mismatch),
        ({"device": SERIAL.lower(), "metrics": {"a": 1}}, SERIAL, Reason.device_mismatch),
        ({"metrics": {"a": 1}}, None, Reason.bad_schema),
        ({"device": 42, "metrics": {"a": 1}}, None, Reason.bad_schema),
        ({"device": "", "metrics": {"a": 1}}, None, Reason.bad_schema),
        ({"device": "SN\x00", "metrics": {"a": 1}}, None, Reason.bad_schema),
        ({"device": "S" * 256, "metrics": {"a": 1}}, None, Reason.bad_schema),
        ({"schema_version": 2, "metrics": {"a": 1}}, SERIAL, Reason.bad_schema),
        ({"schema_version": "1", "metrics": {"a": 1}}, SERIAL, Reason.bad_schema),
        ({"schema_version": True, "metrics": {"a": 1}}, SERIAL, Reason.bad_schema),
        ({"schema_version": 1.0, "metrics": {"a": 1}}, SERIAL, Reason.bad_schema),
        ({"timestamp": "2026-01-27T12:00:00Z", "metrics": {"a": 1}}, SERIAL, Reason.bad_schema),
        ({"device": SERIAL}, SERIAL, Reason.bad_schema),
        ({"metrics": {}}, SERIAL, Reason.bad_schema),
        ({"metrics": [{"a": 1}]}, SERIAL, Reason.bad_schema),
        ({"metrics": None}, SERIAL, Reason.bad_schema),
    ],
)
def test_message_level_rejections(
    message: dict[str, Any], topic_serial: str | None, reason: Reason
) -> None:
    """A message whose envelope is wrong is rejected once, with the exact reason."""
    assert rejected(parse(message, topic_serial)).reason is reason


def test_bad_array_element_rejects_that_element_only() -> None:
    """In an array, each bad element is rejected on its own and the good ones are kept."""
    result = parse(
        [
            {"device": "SN-1", "metrics": {"a": 1}},
            "not an object",
            {"device": "SN-2", "metrics": {}},
            {"metrics": {"a": 3}},
            {"device": "SN-3", "schema_version": 2, "metrics": {"a": 4}},
            {"device": "SN-4", "metrics": {"a": 5}},
        ],
        None,
    )
    assert [(r.serial_id, r.value) for r in result.readings] == [("SN-1", 1), ("SN-4", 5)]
    assert [(r.reason, r.serial_id, r.detail.split(":")[0]) for r in result.rejections] == [
        (Reason.bad_schema, None, "array[1]"),
        (Reason.bad_schema, "SN-2", "array[2]"),
        (Reason.bad_schema, None, "array[3]"),
        (Reason.bad_schema, "SN-3", "array[4]"),
    ]


def test_device_mismatch_detail_names_both_serials() -> None:
    """device_mismatch says which device the payload claimed and which the topic gave."""
    rejection = rejected(parse({"device": "SN-X", "metrics": {"a": 1}}, "SN-1"))
    assert rejection == Rejection(
        Reason.device_mismatch,
        "device 'SN-X' differs from the topic's serial_id 'SN-1'",
        "SN-1",
    )


# --- bad readings next to good ones -----------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (None, Reason.type_mismatch),
        ([1, 2], Reason.type_mismatch),
        ({"value": None}, Reason.type_mismatch),
        ({"value": {"x": 1}}, Reason.type_mismatch),
        ({"ts": "2026-01-27T12:00:00Z"}, Reason.bad_schema),
        ({"value": 1, "time": "2026-01-27T12:00:00Z"}, Reason.bad_schema),
        ({"value": 1, "unit": 3}, Reason.bad_schema),
        ({"value": 1, "unit": ""}, Reason.bad_schema),
        ({"value": 1, "unit": "u\x00"}, Reason.bad_schema),
        ({"value": 1, "ts": True}, Reason.bad_timestamp),
        ({"value": 1, "ts": False}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2026-01-27T12:00:00"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2026-01-27"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "yesterday"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2026-01-27T24:00:00Z"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2026-01-27T12:00:00+25:00"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "9999-12-31T23:59:59-01:00"}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2026-01-27T12:00:00Z" + " " * 100}, Reason.bad_timestamp),
        ({"value": 1, "ts": [2026, 1, 27]}, Reason.bad_timestamp),
        ({"value": 1, "ts": {"s": 1}}, Reason.bad_timestamp),
        ({"value": 1, "ts": 1769515200000000}, Reason.bad_timestamp),  # microseconds
        ({"value": 1, "ts": 1769515200000000000}, Reason.bad_timestamp),  # nanoseconds
        ({"value": 1, "ts": 1e300}, Reason.bad_timestamp),
        ({"value": 1, "ts": "2031-01-01T00:00:00Z"}, Reason.ts_in_future),
        ({"value": 1, "ts": 1769515200 + 301}, Reason.ts_in_future),
        ({"value": 1, "ts": "2020-01-01T00:00:00Z"}, Reason.ts_too_old),
        ({"value": 1, "ts": 0}, Reason.ts_too_old),
        ({"value": 1, "ts": -1}, Reason.ts_too_old),
    ],
)
def test_bad_reading_does_not_fail_its_neighbours(bad: object, reason: Reason) -> None:
    """One bad metric is rejected with its reason; the metrics around it are still readings."""
    result = parse({"metrics": {"before": 1.5, "bad": bad, "after": "ok"}})
    assert values(result) == {"before": 1.5, "after": "ok"}
    (rejection,) = result.rejections
    assert (rejection.reason, rejection.serial_id, rejection.metric) == (reason, SERIAL, "bad")
    assert rejection.detail.startswith("metric 'bad': ")


def test_huge_integer_ts_is_bad_timestamp() -> None:
    """An epoch integer of thousands of digits is a bad_timestamp, not a crash."""
    payload = b'{"metrics": {"ok": 1, "bad": {"value": 1, "ts": ' + b"9" * 5000 + b"}}}"
    result = parse(payload)
    assert values(result) == {"ok": 1}
    assert reasons(result) == {"bad": Reason.bad_timestamp}


def test_bad_message_ts_rejects_only_readings_that_use_it() -> None:
    """A bad message ts rejects the metrics relying on it; a metric with its own ts survives."""
    result = parse(
        {"ts": "not a time", "metrics": {"a": 1, "b": {"value": 2, "ts": 1769515200}, "c": 3}}
    )
    assert values(result) == {"b": 2}
    assert reasons(result) == {"a": Reason.bad_timestamp, "c": Reason.bad_timestamp}
    assert result.rejections[0].detail == (
        "metric 'a': message ts 'not a time' is neither ISO 8601 with a UTC offset "
        "nor an epoch number"
    )


def test_bad_metric_names_are_bad_schema_without_a_metric_column() -> None:
    """Empty, NUL-holding and overlong metric names are bad_schema, with no metric column."""
    result = parse({"metrics": {"": 1, "a\x00b": 2, "m" * 256: 3, "\ud800": 4, "fine": 5}})
    assert values(result) == {"fine": 5}
    assert [(r.reason, r.metric) for r in result.rejections] == [(Reason.bad_schema, None)] * 4


def test_same_metric_twice_in_one_message_is_refused() -> None:
    """A second reading of the same metric (ignoring case) at the same ts is refused, not lost."""
    result = parse(
        [
            {"metrics": {"Temp": 1, "temp": 2, "other": {"value": 3, "ts": 1769515100}}},
            {"metrics": {"TEMP": 4, "other": {"value": 5, "ts": 1769515000}}},
        ]
    )
    assert [(r.metric, r.value) for r in result.readings] == [
        ("Temp", 1),
        ("other", 3),
        ("other", 5),
    ]
    assert [(r.reason, r.metric) for r in result.rejections] == [
        (Reason.bad_schema, "temp"),
        (Reason.bad_schema, "TEMP"),
    ]
    assert "array[1]: metric 'TEMP': a reading of this metric" in result.rejections[1].detail


def test_future_detail_is_precise() -> None:
    """A ts_in_future detail gives the metric, the ts, how far ahead and the limit."""
    rejection = rejected(
        parse({"metrics": {"temperature": {"value": 1, "ts": "2031-01-01T00:00:00Z"}}})
    )
    assert rejection.detail == (
        "metric 'temperature': ts 2031-01-01T00:00:00+00:00 is 4.9 y ahead of the service clock "
        "(limit 5 min)"
    )


def test_too_old_detail_is_precise() -> None:
    """A ts_too_old detail gives the metric, the ts, its age and the limit."""
    rejection = rejected(parse({"metrics": {"t": {"value": 1, "ts": 1769515200 - 8 * 86400}}}))
    assert rejection.detail == "metric 't': ts 2026-01-19T12:00:00+00:00 is 8 d old (limit 7 d)"


def test_device_text_in_details_is_escaped_and_truncated() -> None:
    """Details quote device text with escapes, on one line, and cut long text."""
    rejection = rejected(parse({"device": "x\ny" + "z" * 500, "metrics": {"a": 1}}, None))
    assert "\n" not in rejection.detail
    assert "'x\\nyzz" in rejection.detail
    assert len(rejection.detail) < 200


# --- values after the catalogue: check_value, encode_value ------------------------------------


@pytest.mark.parametrize(
    ("value", "data_type", "reason"),
    [
        (23.5, "numeric", None),
        (-42, "numeric", None),
        (0, "numeric", None),
        (1e100, "numeric", None),
        (-1e100, "numeric", None),
        (10**100, "numeric", None),
        (True, "numeric", Reason.type_mismatch),
        ("23.5", "numeric", Reason.type_mismatch),
        (None, "numeric", Reason.type_mismatch),
        ([1], "numeric", Reason.type_mismatch),
        (math.nan, "numeric", Reason.type_mismatch),
        (math.inf, "numeric", Reason.value_too_large),
        (-math.inf, "numeric", Reason.value_too_large),
        (1.5e100, "numeric", Reason.value_too_large),
        (10**101, "numeric", Reason.value_too_large),
        pytest.param(-(10**5000), "numeric", Reason.value_too_large, id="minus-10**5000"),
        (True, "boolean", None),
        (False, "boolean", None),
        (1, "boolean", Reason.type_mismatch),
        (0, "boolean", Reason.type_mismatch),
        ("true", "boolean", Reason.type_mismatch),
        ("OK", "str", None),
        ("", "str", None),
        ("é" * 1024, "str", None),
        ("é" * 1025, "str", Reason.value_too_large),
        ("a\x00b", "str", Reason.type_mismatch),
        ("a\ud800b", "str", Reason.type_mismatch),
        (5, "str", Reason.type_mismatch),
        (False, "str", Reason.type_mismatch),
        (1, "text", Reason.type_mismatch),
    ],
)
def test_check_value(value: object, data_type: Any, reason: Reason | None) -> None:
    """Each data_type accepts exactly its JSON type within its bounds."""
    problem = check_value(value, data_type, LIMITS)
    assert (problem[0] if problem else None) is reason
    if problem:
        assert INTERNAL_ERROR not in problem[1]


def test_check_value_details() -> None:
    """check_value details say what the value was and what was expected."""
    assert check_value(True, "numeric", LIMITS) == (
        Reason.type_mismatch,
        "boolean true is not a number (data_type numeric)",
    )
    assert check_value("a" * 2000, "str", LIMITS) == (
        Reason.value_too_large,
        "string of 2000 characters exceeds the limit of 1024",
    )
    assert check_value(2e100, "numeric", LIMITS) == (
        Reason.value_too_large,
        "number 2e+100 exceeds the magnitude limit 1e+100",
    )
    huge = check_value(10**5000, "numeric", LIMITS)
    assert huge is not None and "integer of about 5000 digits" in huge[1]


def test_parsed_values_flow_into_check_value() -> None:
    """Huge numbers and NUL strings parse as readings and check_value rejects them precisely."""
    payload = (
        b'{"metrics": {"huge": ' + b"9" * 5000 + b', "big": 1e400, "nul": "a\\u0000b",'
        b' "surrogate": "\\ud800", "ok": 1}}'
    )
    result = parse(payload)
    assert result.rejections == ()
    problems = {
        r.metric: check_reading(r, "str" if isinstance(r.value, str) else "numeric", LIMITS)
        for r in result.readings
    }
    assert problems["ok"] is None
    assert {name: p.reason for name, p in problems.items() if p} == {
        "huge": Reason.value_too_large,
        "big": Reason.value_too_large,
        "nul": Reason.type_mismatch,
        "surrogate": Reason.type_mismatch,
    }
    nul = problems["nul"]
    assert nul is not None
    assert nul == Rejection(
        Reason.type_mismatch,
        "metric 'nul': string 'a\\x00b' contains NUL (U+0000), which PostgreSQL cannot store",
        SERIAL,
        "nul",
    )


def test_for_reading_prefixes_the_metric() -> None:
    """Rejection.for_reading builds the catalogue stage's rejections with the metric prefix."""
    reading = RawReading(SERIAL, "Temperature", NOW, 1, None)
    assert Rejection.for_reading(reading, Reason.unknown_metric, "not bound") == Rejection(
        Reason.unknown_metric, "metric 'Temperature': not bound", SERIAL, "Temperature"
    )


@pytest.mark.parametrize(
    ("value", "data_type", "unit", "expected"),
    [
        (23.5, "numeric", None, '{"t":"numeric","v":23.5}'),
        (42, "numeric", "%", '{"t":"numeric","v":42,"u":"%"}'),
        (1e100, "numeric", None, '{"t":"numeric","v":1e+100}'),
        (True, "boolean", None, '{"t":"boolean","v":true}'),
        ('état "ok"\n', "str", "°C", '{"t":"str","v":"état \\"ok\\"\\n","u":"°C"}'),
    ],
)
def test_encode_value(value: Any, data_type: Any, unit: str | None, expected: str) -> None:
    """value_jsonb is compact JSON with t, v and u, non-ASCII kept as UTF-8."""
    assert encode_value(value, data_type, unit) == expected
    assert json.loads(expected)["v"] == value


def test_encode_value_refuses_non_finite_numbers() -> None:
    """encode_value never writes NaN or Infinity, which jsonb would refuse."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_value(math.inf, "numeric", None)


def test_reason_codes_are_the_designs() -> None:
    """Reason holds exactly the design's stable codes plus storage_error, each described."""
    assert [reason.value for reason in Reason] == [
        "bad_json",
        "bad_schema",
        "payload_too_large",
        "unknown_device",
        "inactive_device",
        "device_mismatch",
        "unknown_metric",
        "type_mismatch",
        "bad_timestamp",
        "ts_in_future",
        "ts_too_old",
        "value_too_large",
        "storage_error",
        "retained",
        "unknown_alias",  # DESIGN 3b: Sparkplug data whose alias no birth defined
    ]
    assert Reason("ts_in_future") is Reason.ts_in_future
    assert f"{Reason.bad_json}" == "bad_json"
    assert all(reason.__doc__ and reason.__doc__.endswith(".") for reason in Reason)


# --- robustness -------------------------------------------------------------------------------

_STRINGS = [
    "",
    "a",
    SERIAL,
    "temperature",
    "OK",
    "\x00",
    "\ud800",
    "\udfff\ud800",
    "é✓",
    "x" * 300,
    "2026-01-27T12:00:00Z",
    "2026-01-27T12:00:00",
    "2026-01-27T12:00:00+23:59",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-23:00",
    "nan",
    "\n",
]
_NUMBERS: list[Any] = [
    0,
    -1,
    1.5,
    1769515200,
    1769515200123,
    1e11,
    1e100,
    1e300,
    -1e300,
    10**30,
    2**63,
    -(2**64),
]
_KEYS = ["device", "ts", "metrics", "schema_version", "value", "unit", "a", "A", "temperature"]
_TOKENS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"\\u0000",
    b"\\ud800",
    b"[",
    b"{",
    b"}",
    b'"',
    b",",
    b":",
    b"1e999",
    b"9" * 5000,
    b"\xff",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",
    b"true",
    b"null",
]


def _random_scalar(rng: random.Random) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(_STRINGS)
    if kind == 1:
        return rng.choice(_NUMBERS)
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind == 3:
        return rng.choice([True, False, None])
    return 1769515200 + rng.randint(-(10**6), 10**6)


def _random_json(rng: random.Random, depth: int) -> Any:
    if depth <= 0 or rng.random() < 0.4:
        return _random_scalar(rng)
    if rng.random() < 0.3:
        return [_random_json(rng, depth - 1) for _ in range(rng.randrange(4))]
    keys = rng.sample(_KEYS + _STRINGS, rng.randrange(5))
    return {key: _random_json(rng, depth - 1) for key in keys}


def _random_message(rng: random.Random) -> Any:
    """Mostly well-shaped messages with random contents, so that deep code paths run."""
    metrics: dict[str, Any] = {}
    for _ in range(rng.randrange(1, 6)):
        name = rng.choice(_KEYS + _STRINGS) if rng.random() < 0.3 else f"m{rng.randrange(20)}"
        if rng.random() < 0.4:
            fields = rng.sample(["value", "value", "ts", "unit", "x"], rng.randrange(1, 4))
            metrics[name] = {field: _random_scalar(rng) for field in fields}
        else:
            metrics[name] = _random_json(rng, 2) if rng.random() < 0.3 else _random_scalar(rng)
    message: dict[str, Any] = {"metrics": metrics}
    odds = rng.random()
    if odds < 0.3:
        message["device"] = SERIAL
    elif odds < 0.5:
        message["device"] = _random_scalar(rng)
    odds = rng.random()
    if odds < 0.3:
        message["ts"] = 1769515200 - rng.randrange(10**6)
    elif odds < 0.6:
        message["ts"] = _random_scalar(rng)
    odds = rng.random()
    if odds < 0.2:
        message["schema_version"] = 1
    elif odds < 0.3:
        message["schema_version"] = _random_scalar(rng)
    if rng.random() < 0.1:
        message[rng.choice(_STRINGS)] = _random_json(rng, 1)
    return message


def _random_payload(rng: random.Random, corpus: list[bytes]) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(64))
    if choice == 1:  # a valid payload with a few bytes flipped, cut or spliced
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data) + 1)
            action = rng.randrange(3)
            if action == 0 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif action == 1:
                del data[at : at + rng.randrange(1, 8)]
            else:
                data[at:at] = rng.choice(_TOKENS)
        return bytes(data)
    if choice == 2:
        document = _random_json(rng, 4)
    else:
        document = _random_message(rng)
        if rng.random() < 0.3:
            document = [document, _random_message(rng), _random_json(rng, 2)]
    text = json.dumps(document, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")


def _assert_storable(text: str | None) -> None:
    """PostgreSQL text can hold it: valid Unicode without NUL."""
    if text is not None:
        text.encode("utf-8")  # no lone surrogates
        assert "\x00" not in text


def _assert_one_line(detail: str) -> None:
    _assert_storable(detail)
    assert detail.isprintable(), detail


def _assert_sound(result: ParseResult, limits: Limits) -> None:
    assert isinstance(result, ParseResult)
    assert len(result.readings) + len(result.rejections) <= limits.max_readings_per_message
    for reading in result.readings:
        assert reading.ts.tzinfo is UTC
        assert reading.serial_id and len(reading.serial_id) <= MAX_NAME_LEN
        assert reading.metric and len(reading.metric) <= MAX_NAME_LEN
        _assert_storable(reading.serial_id)
        _assert_storable(reading.metric)
        assert reading.unit is None or reading.unit
        _assert_storable(reading.unit)
        assert type(reading.value) in (int, float, bool, str)
        for data_type in ("numeric", "str", "boolean"):
            problem = check_value(reading.value, data_type, limits)
            if problem is None:
                encoded = encode_value(reading.value, data_type, reading.unit)
                encoded.encode("utf-8")
                assert "\\u0000" not in encoded
            else:
                assert problem[0] in (Reason.type_mismatch, Reason.value_too_large)
                assert INTERNAL_ERROR not in problem[1]
                _assert_one_line(problem[1])
    for rejection in result.rejections:
        assert isinstance(rejection.reason, Reason)
        assert rejection.reason not in (Reason.storage_error, Reason.unknown_device)
        assert INTERNAL_ERROR not in rejection.detail, rejection.detail
        assert 0 < len(rejection.detail) < 400
        _assert_one_line(rejection.detail)
        _assert_storable(rejection.serial_id)
        _assert_storable(rejection.metric)


def test_garbage_never_raises() -> None:
    """Thousands of random, mutated and hostile payloads never raise and yield sound results."""
    rng = random.Random(20260127)
    corpus = [
        json.dumps(DESIGN_EXAMPLE).encode(),
        json.dumps([DESIGN_EXAMPLE, {"metrics": {"t": {"value": 1, "ts": 1769515200}}}]).encode(),
        b'{"metrics": {"a": {"value": "x", "unit": "u", "ts": "2026-01-27T11:00:00+01:00"}}}',
    ]
    limits = Limits(max_readings_per_message=50)
    seen_reasons: set[Reason] = set()
    readings = 0
    for _ in range(5000):
        payload = _random_payload(rng, corpus)
        topic_serial = rng.choice([None, SERIAL, SERIAL, SERIAL, SERIAL, "", "SN\x00", "\ud800"])
        result = parse_message(payload, topic_serial, NOW, limits)
        _assert_sound(result, limits)
        seen_reasons.update(rejection.reason for rejection in result.rejections)
        readings += len(result.readings)
    # The generator reaches the interesting paths, not only bad_json.
    assert readings > 500
    assert {Reason.bad_json, Reason.bad_schema, Reason.bad_timestamp, Reason.ts_too_old} <= (
        seen_reasons
    )
    assert {Reason.type_mismatch, Reason.device_mismatch, Reason.ts_in_future} <= seen_reasons


def test_internal_errors_become_marked_rejections() -> None:
    """Should validation itself fail, the message is rejected with a detail saying it is our bug."""
    result = parse_message("not bytes", SERIAL, NOW, LIMITS)  # type: ignore[arg-type]
    rejection = rejected(result)
    assert rejection.reason is Reason.bad_schema
    assert rejection.detail.startswith(INTERNAL_ERROR)
    assert rejection.serial_id == SERIAL


def test_check_value_never_raises() -> None:
    """check_value answers for any Python object and any data_type string."""
    rng = random.Random(7)
    oddities: list[object] = [object(), b"bytes", 10**5000, -(10**5000), math.nan, (), {1}]
    for _ in range(2000):
        value = rng.choice(oddities) if rng.random() < 0.2 else _random_json(rng, 2)
        data_type = rng.choice(["numeric", "str", "boolean", "", "NUMERIC", "\x00"])
        problem = check_value(value, data_type, LIMITS)  # type: ignore[arg-type]
        if problem is not None:
            assert INTERNAL_ERROR not in problem[1]
            _assert_one_line(problem[1])


# --- exact numbers and RFC 3339 times ------------------------------------------------------------


def _one_value(number: str) -> object:
    result = parse(b'{"metrics": {"a": ' + number.encode() + b"}}")
    assert result.rejections == ()
    (reading,) = result.readings
    return reading.value


@pytest.mark.parametrize(
    ("number", "stored"),
    [
        ("23.5", '{"t":"numeric","v":23.5}'),
        ("0.1", '{"t":"numeric","v":0.1}'),
        ("23.50", '{"t":"numeric","v":23.5}'),  # the same number: no Decimal needed
        ("1E5", '{"t":"numeric","v":100000.0}'),
        ("1e-400", '{"t":"numeric","v":1E-400}'),
        ("4.9e-325", '{"t":"numeric","v":4.9E-325}'),  # below the smallest subnormal double
        (
            "123456789012345678901234567890.5",
            '{"t":"numeric","v":123456789012345678901234567890.5}',
        ),
        ("3.14159265358979323846", '{"t":"numeric","v":3.14159265358979323846}'),
        ("1.00000000000000000001e10", '{"t":"numeric","v":10000000000.0000000001}'),
        ("-0", '{"t":"numeric","v":0}'),
        ("123456789012345678901234567890", '{"t":"numeric","v":123456789012345678901234567890}'),
    ],
)
def test_numbers_keep_every_digit_on_the_way_to_value_jsonb(number: str, stored: str) -> None:
    """What a double cannot hold (underflow, more than 17 digits) is kept as a Decimal of the
    sent text; the jsonb text has the number's exact value, and check_value accepts it."""
    value = _one_value(number)
    assert check_value(value, "numeric", LIMITS) is None
    encoded = encode_value(value, "numeric")  # type: ignore[arg-type]
    assert Decimal(json.loads(encoded, parse_float=Decimal)["v"]) == Decimal(number)
    assert json.loads(encoded, parse_float=Decimal) == json.loads(stored, parse_float=Decimal)


def test_a_decimal_value_renders_with_its_unit() -> None:
    """The object form with a unit keeps the digits too."""
    result = parse(b'{"metrics": {"a": {"value": 1e-400, "unit": "m\\u00b3"}}}')
    (reading,) = result.readings
    assert encode_value(reading.value, "numeric", reading.unit) == (
        '{"t":"numeric","v":1E-400,"u":"m³"}'
    )


def test_the_rule_engine_gets_the_nearest_double() -> None:
    """Rules compare doubles: rule_value turns an exact Decimal into a float, others unchanged."""
    value = _one_value("123456789012345678901234567890.5")
    assert isinstance(value, Decimal)
    assert rule_value(value) == pytest.approx(1.2345678901234568e29)
    assert type(rule_value(value)) is float
    assert rule_value(1e-400 * 0) == 0.0 and rule_value(7) == 7 and rule_value("x") == "x"


@pytest.mark.parametrize(
    ("number", "detail"),
    [
        ("1e400", "exceeds the magnitude limit 1e+100"),
        ("-1.5e100", "exceeds the magnitude limit 1e+100"),
        ("1." + "1" * 100, "has 101 significant digits (limit 100)"),
        ("1e-1001", "has a digit 1001 places after the decimal point (limit 1000)"),
        ("0." + "0" * 1000 + "1", "has a digit 1001 places after the decimal point"),
    ],
)
def test_numbers_that_cannot_be_kept_are_value_too_large(number: str, detail: str) -> None:
    """Too large, too many digits or too fine a step: value_too_large, never a rounded value."""
    problem = check_value(_one_value(number), "numeric", LIMITS)
    assert problem is not None and problem[0] is Reason.value_too_large
    assert detail in problem[1]
    assert len(problem[1]) < 200  # a long number is shortened in the detail


def test_zeros_and_long_numbers_do_not_count_as_digits() -> None:
    """Trailing zeros are not significant digits, and a zero has no finest digit."""
    assert check_value(_one_value("1" + "0" * 99 + ".000"), "numeric", LIMITS) is None
    assert check_value(_one_value("0e-5000"), "numeric", LIMITS) is None


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-01-27t12:00:00z", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27T12:00:00z", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27t13:00:00+01:00", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-27T11:59:59.123456789Z", datetime(2026, 1, 27, 11, 59, 59, 123456, tzinfo=UTC)),
        ("2026-01-27T11:59:59.9999999Z", datetime(2026, 1, 27, 11, 59, 59, 999999, tzinfo=UTC)),
        ("2026-01-27T12:00:00-00:00", datetime(2026, 1, 27, 12, tzinfo=UTC)),
        ("2026-01-26T23:59:60Z", datetime(2026, 1, 26, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2026-01-27T00:59:60.5+01:00", datetime(2026, 1, 26, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms_are_accepted(ts: str, expected: datetime) -> None:
    """Lower-case t and z, fractions of any length (cut to microseconds), -00:00, and a leap
    second at 23:59:60 UTC (as its last microsecond) are RFC 3339 and are accepted."""
    result = parse({"ts": ts, "metrics": {"a": 1}})
    assert result.rejections == ()
    (reading,) = result.readings
    assert reading.ts == expected


@pytest.mark.parametrize(
    ("ts", "why"),
    [
        ("2026-W05-2T12:00:00Z", "is ISO 8601 but not RFC 3339"),  # ISO week date
        ("2026-027T12:00:00Z", "is neither ISO 8601"),  # ordinal date
        ("2026-01-27T12:00Z", "is ISO 8601 but not RFC 3339"),  # no seconds
        ("20260127T120000Z", "is ISO 8601 but not RFC 3339"),  # basic format
        ("2026-01-27T12:00:00+0100", "is ISO 8601 but not RFC 3339"),  # offset without colon
        ("2026-01-27T12:00:00+01", "is ISO 8601 but not RFC 3339"),
        ("2026-01-27T12:00:00,5Z", "is ISO 8601 but not RFC 3339"),  # comma fraction
        ("2026-01-27T12:00:00.Z", "is ISO 8601 but not RFC 3339"),  # a point without digits
        ("2026-01-27T12:00:00", "has no UTC offset"),
        ("2026-01-27T12:00:60Z", "has second 60 outside a leap second"),
        ("2026-02-30T12:00:00Z", "is neither ISO 8601"),
        ("٢٠٢٦-01-27T12:00:00Z", "is neither ISO 8601"),  # non-ASCII digits
    ],
)
def test_other_iso_8601_forms_are_bad_timestamp(ts: str, why: str) -> None:
    """Week and ordinal dates, reduced, basic and comma forms are not RFC 3339: bad_timestamp,
    with a detail that says so."""
    rejection = rejected(parse({"ts": ts, "metrics": {"a": 1}}))
    assert rejection.reason is Reason.bad_timestamp
    assert why in rejection.detail


def test_an_epoch_with_more_digits_than_a_double_is_exact_to_the_microsecond() -> None:
    """Nanosecond epoch seconds (a Decimal) round to the microsecond, without a float between."""
    (reading,) = parse(b'{"ts": 1769515199.123456789, "metrics": {"a": 1}}').readings
    assert reading.ts == datetime(2026, 1, 27, 11, 59, 59, 123457, tzinfo=UTC)
    bad = rejected(parse(b'{"ts": 1e400, "metrics": {"a": 1}}'))
    assert bad.reason is Reason.bad_timestamp and "out of range as a Unix epoch" in bad.detail
