"""The data types a metric can have, and which Python values belong to each: one definition.

`metrics.data_type` in the database holds one of DATA_TYPES. The ingestor checks readings
against it (with its own rejection reasons), the rule engine compiles conditions for it, and
the seed data and the simulator generate values of it; all of them take the type from here.
"""

from __future__ import annotations

import math
from typing import Final, Literal, TypeAlias, TypeGuard

DataType: TypeAlias = Literal["numeric", "str", "boolean"]
DATA_TYPES: Final[tuple[DataType, ...]] = ("numeric", "str", "boolean")

__all__ = ["DATA_TYPES", "DataType", "fits", "is_data_type"]


def is_data_type(name: object) -> TypeGuard[DataType]:
    """Whether `name` is one of DATA_TYPES (as stored in `metrics.data_type`)."""
    return name in DATA_TYPES


def fits(data_type: DataType, value: object) -> bool:
    """Whether a decoded reading value is of `data_type`: a finite number that is not a bool,
    a bool, or a str."""
    if data_type == "numeric":
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if data_type == "boolean":
        return isinstance(value, bool)
    return isinstance(value, str)
