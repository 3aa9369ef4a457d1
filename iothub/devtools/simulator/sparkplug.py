"""Simulated Sparkplug B traffic: one edge node whose devices are the simulator's devices.

What a real edge node publishes, in its order: an NBIRTH (its session number ``bdSeq`` and the
``Node Control/Rebirth`` command metric) before anything else, a DBIRTH the first time each
device reports (names, aliases, datatypes and that report's values), then DDATA by alias only.
Every device also reports its radio's ``rssi`` as Int8, a negative number sign-extended in
uint32 as Sparkplug sends it; the printed source excludes it unless the catalogue binds it.
``seq`` counts 0-255 over all of the node's messages, as the specification says.
"""

from __future__ import annotations

from typing import Any, Final

from ingestor.decoders import sparkplug_b_pb2 as pb
from ingestor.decoders.sparkplug_b import DataType

GROUP: Final = "iothub-sim"
NODE: Final = "sim-edge"
RSSI: Final = "rssi"
_SEQ_MODULO = 256


def _rssi(serial: str, ts_ms: int) -> int:
    """A plausible, reproducible received signal strength in dBm (-90 to -51)."""
    return -51 - (sum(map(ord, serial)) + ts_ms // 1000) % 40


def _datatype(value: object) -> DataType:
    if isinstance(value, bool):
        return DataType.Boolean
    if isinstance(value, str):
        return DataType.String
    return DataType.Double


def _set_value(metric: pb.Payload.Metric, datatype: int, value: Any) -> None:
    if datatype == DataType.Boolean:
        metric.boolean_value = value
    elif datatype == DataType.String:
        metric.string_value = value
    elif datatype == DataType.Int8:
        metric.int_value = value & 0xFFFFFFFF  # sign-extended into uint32
    else:
        metric.double_value = float(value)


class SparkplugNode:
    """Renders the simulator's messages as one edge node's Sparkplug B traffic."""

    def __init__(self) -> None:
        self._seq = 0
        self._born = False
        # Per device: metric name -> (alias, datatype), from its DBIRTH.
        self._devices: dict[str, dict[str, tuple[int, int]]] = {}

    def _payload(self, ts_ms: int) -> pb.Payload:
        message = pb.Payload(timestamp=ts_ms, seq=self._seq)
        self._seq = (self._seq + 1) % _SEQ_MODULO
        return message

    def render(self, serial: str, ts_ms: int, metrics: dict[str, Any]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        if not self._born:
            self._born = True
            birth = pb.Payload(timestamp=ts_ms, seq=0)
            birth.metrics.add(name="bdSeq", datatype=DataType.Int64, long_value=0)
            birth.metrics.add(
                name="Node Control/Rebirth", datatype=DataType.Boolean, boolean_value=False
            )
            self._seq = 1
            out.append((f"spBv1.0/{GROUP}/NBIRTH/{NODE}", birth.SerializeToString()))
        values = {**metrics, RSSI: _rssi(serial, ts_ms)}
        defined = self._devices.get(serial)
        message = self._payload(ts_ms)
        if defined is None:
            defined = self._devices[serial] = {}
            for name, value in values.items():
                datatype = DataType.Int8 if name == RSSI else _datatype(value)
                defined[name] = (len(defined) + 1, datatype)
                metric = message.metrics.add(
                    name=name, alias=len(defined), datatype=datatype, timestamp=ts_ms
                )
                _set_value(metric, datatype, value)
            kind = "DBIRTH"
        else:
            for name, value in values.items():
                alias, known = defined[name]
                metric = message.metrics.add(alias=alias, timestamp=ts_ms)
                _set_value(metric, known, value)
            kind = "DDATA"
        out.append((f"spBv1.0/{GROUP}/{kind}/{NODE}/{serial}", message.SerializeToString()))
        return out
