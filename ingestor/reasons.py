"""Stable rejection reason codes (logs, metrics labels and ``rejected_messages.reason``)."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a message or a reading was not stored; the value is the stable code.

    Members are named exactly like their codes so ``Reason.bad_json == "bad_json"`` reads the same
    in Python, SQL and log queries. Each member's ``__doc__`` is its one-line description.
    """

    bad_json = "bad_json", "The payload is not UTF-8 JSON (or uses NaN/Infinity or duplicate keys)."
    bad_schema = "bad_schema", "The JSON does not have the shape of a telemetry message."
    payload_too_large = "payload_too_large", "The payload exceeds the byte or reading-count limit."
    unknown_device = "unknown_device", "No device has this serial_id."
    inactive_device = "inactive_device", "The device exists but is not active."
    device_mismatch = "device_mismatch", "The payload's device differs from the topic's serial_id."
    unknown_metric = (
        "unknown_metric",
        "The metric is not in the catalogue or not bound to the device.",
    )
    type_mismatch = "type_mismatch", "The value does not fit the metric's data_type."
    bad_timestamp = (
        "bad_timestamp",
        "The ts is neither RFC 3339 (ISO 8601 with an offset) nor an epoch number.",
    )
    ts_in_future = "ts_in_future", "The ts is further ahead of the service clock than allowed."
    ts_too_old = "ts_too_old", "The ts is older than the backfill limit."
    value_too_large = "value_too_large", "The value's magnitude or length exceeds its limit."
    storage_error = "storage_error", "The database refused a reading that passed validation."
    retained = "retained", "A retained message the broker replayed on subscribe; not telemetry."
    unknown_alias = (
        "unknown_alias",
        "Sparkplug data names an alias (or an untyped metric) that no kept birth has defined.",
    )

    def __new__(cls, value: str, description: str = "") -> Reason:
        # The two-element form keeps each code next to its description; str() and == see only
        # the code.
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = description
        return member
