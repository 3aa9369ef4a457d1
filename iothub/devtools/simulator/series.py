"""The simulated values of one metric of one device over device time.

Temperature, humidity and pressure follow a daily cycle plus wandering noise with occasional
excursions (a cooling failure takes the temperature to about 29 °C for 12-20 minutes, so the
seed's "above 27.5 for 10 minutes" rule fires), status is mostly "OK" with short "WARN"/"FAULT"
spells, firmware_version constant per device, motion_detected random events (more by day),
online mostly true.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from iothub.devtools.seed import data as seed_data
from iothub.devtools.simulator.devices import SimMetric

log = structlog.get_logger(__name__)

DEFAULT_FIRMWARE: Final = "2.4.0"
DAY_START_HOUR, DAY_END_HOUR = 8, 19  # local hours when people move about (motion)
NIGHT_MOTION_PROBABILITY: Final = 0.01  # per reading, outside the day hours
DAY_MOTION_PROBABILITY: Final = 0.3  # per reading, during the day, unless the seed says
STATUS_FAULT_SHARE: Final = 0.2  # of the not-OK spells, the rest are WARN


class Series(Protocol):
    """The values of one metric of one device, as JSON text, at a device time (epoch s)."""

    def text(self, ts: float) -> str: ...


@dataclass(frozen=True)
class EpisodeSpec:
    """When spells of abnormal values happen, in device-minutes."""

    first: tuple[float, float]  # the first starts this long after the simulation's start
    gap: float  # mean time between the end of one and the start of the next (exponential)
    length: tuple[float, float]


class Episodes:
    """A schedule of spells, drawn lazily as device time advances."""

    def __init__(self, spec: EpisodeSpec, origin: float, rng: random.Random) -> None:
        self._spec = spec
        self._rng = rng
        self.start = origin + 60 * rng.uniform(*spec.first)
        self.end = self.start + 60 * rng.uniform(*spec.length)
        self.number = 0  # which spell `start`/`end` describe

    def active(self, ts: float) -> bool:
        while ts >= self.end:
            self.start = self.end + 60 * self._rng.expovariate(1 / self._spec.gap)
            self.end = self.start + 60 * self._rng.uniform(*self._spec.length)
            self.number += 1
        return ts >= self.start


@dataclass(frozen=True)
class Excursion:
    """Spells where a numeric value leaves its cycle for `level` (times the base if relative)."""

    level: float
    jitter: float
    episodes: EpisodeSpec
    relative: bool = False


# The excursions that make the seed's threshold rules fire now and then.
EXCURSIONS: Final[Mapping[str, Excursion]] = {
    # Cooling failure: above the seed's 27.5 °C for longer than its 10 minutes.
    "temperature": Excursion(29.0, 0.6, EpisodeSpec((1, 10), 60, (12, 20))),
    "humidity": Excursion(88.0, 2.0, EpisodeSpec((5, 40), 90, (3, 8))),
    # Overpressure: 1.5 times the usual (the seed's boiler: 2.7 bar, above its 2.5 for 5 min).
    "pressure": Excursion(1.5, 0.02, EpisodeSpec((5, 40), 90, (6, 10)), relative=True),
}
STATUS_EPISODES: Final = EpisodeSpec((1, 8), 30, (1, 4))
OFFLINE_EPISODES: Final = EpisodeSpec((10, 60), 120, (2, 8))
DEFAULT_CYCLES: Final[Mapping[str, seed_data.Cycle]] = {
    "temperature": seed_data.Cycle(21.5, 1.5, 15, 0.15),
    "humidity": seed_data.Cycle(45.0, 5.0, 6, 0.5, decimals=1),
    "pressure": seed_data.Cycle(1.8, 0.05, 17, 0.01, decimals=3),  # bar, like the seed's gauge
}
GENERIC_CYCLE: Final = seed_data.Cycle(50.0, 5.0, 12, 0.5)
SEED_PROFILES: Final[Mapping[tuple[str, str], seed_data.Profile]] = {
    (b.serial_id, b.metric): b.profile for b in seed_data.BINDINGS
}


class CycleSeries:
    """A daily cycle (local time) plus AR(1) noise, with excursions."""

    def __init__(
        self,
        profile: seed_data.Cycle,
        excursion: Excursion | None,
        origin: float,
        utc_offset: float,
        rng: random.Random,
    ) -> None:
        self._p = profile
        self._rng = rng
        self._offset = utc_offset
        self._wander = 0.0
        self._excursion = excursion
        self._episodes = Episodes(excursion.episodes, origin, rng) if excursion else None
        self._level = 0.0
        if excursion is not None:
            self._level = excursion.level * profile.base if excursion.relative else excursion.level

    def text(self, ts: float) -> str:
        p = self._p
        self._wander = p.persistence * self._wander + self._rng.gauss(0.0, p.noise)
        if self._episodes is not None and self._episodes.active(ts):
            assert self._excursion is not None
            jitter = self._excursion.jitter
            value = self._level + self._rng.uniform(-jitter, jitter)
        else:
            hour = ((ts + self._offset) / 3600.0) % 24.0
            daily = p.amplitude * math.cos(2 * math.pi * (hour - p.peak_hour) / 24)
            value = p.base + daily + self._wander
        return repr(round(value, p.decimals))


class StatusSeries:
    """ "OK", with spells of "WARN" (or "FAULT")."""

    def __init__(self, origin: float, rng: random.Random) -> None:
        self._episodes = Episodes(STATUS_EPISODES, origin, rng)
        self._rng = rng
        self._spell = -1
        self._bad = '"WARN"'

    def text(self, ts: float) -> str:
        if not self._episodes.active(ts):
            return '"OK"'
        if self._episodes.number != self._spell:
            self._spell = self._episodes.number
            self._bad = '"FAULT"' if self._rng.random() < STATUS_FAULT_SHARE else '"WARN"'
        return self._bad


class OnlineSeries:
    """True, with spells of false (the device reports it lost its uplink)."""

    def __init__(self, origin: float, rng: random.Random) -> None:
        self._episodes = Episodes(OFFLINE_EPISODES, origin, rng)

    def text(self, ts: float) -> str:
        return "false" if self._episodes.active(ts) else "true"


class MotionSeries:
    """Random motion events, frequent by day and rare at night (local time)."""

    def __init__(self, day_probability: float, utc_offset: float, rng: random.Random) -> None:
        self._day = day_probability
        self._offset = utc_offset
        self._rng = rng

    def text(self, ts: float) -> str:
        hour = ((ts + self._offset) / 3600.0) % 24.0
        p = self._day if DAY_START_HOUR <= hour < DAY_END_HOUR else NIGHT_MOTION_PROBABILITY
        return "true" if self._rng.random() < p else "false"


class ConstantSeries:
    def __init__(self, text: str) -> None:
        self._text = text

    def text(self, ts: float) -> str:  # noqa: ARG002, RUF100 (the Series protocol)
        return self._text


def make_series(
    serial_id: str,
    metric: SimMetric,
    origin: float,
    utc_offset: float,
    rng: random.Random,
) -> Series:
    """The value model of one metric: by its name when the data type fits, else by type.

    Devices of the seed keep the seed's profiles (base, amplitude, firmware), so the simulated
    readings continue its history."""
    profile = SEED_PROFILES.get((serial_id, metric.name))
    name = metric.name.lower()
    if metric.data_type == "numeric":
        cycle = profile if isinstance(profile, seed_data.Cycle) else None
        cycle = cycle or DEFAULT_CYCLES.get(name, GENERIC_CYCLE)
        return CycleSeries(cycle, EXCURSIONS.get(name), origin, utc_offset, rng)
    if metric.data_type == "boolean":
        if name == "motion_detected":
            day = (
                profile.probability
                if isinstance(profile, seed_data.DayActivity)
                else DAY_MOTION_PROBABILITY
            )
            return MotionSeries(day, utc_offset, rng)
        return OnlineSeries(origin, rng)
    if name == "status":
        return StatusSeries(origin, rng)
    if name == "firmware_version":
        value = profile.value if isinstance(profile, seed_data.Constant) else DEFAULT_FIRMWARE
        return ConstantSeries(json.dumps(value))
    return ConstantSeries('"OK"')
