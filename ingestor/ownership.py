"""Which worker process owns a device, and a worker's part of a message several workers own.

With `workers` > 1 each device belongs to one worker (`device_owner`), so that its readings are
evaluated by one process, in order. The receiving process (`ingestor.handoff`) decides where a
message goes; `Split` is what a worker is told when the message names devices of several.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def device_owner(serial: str, workers: int) -> int:
    """The worker that owns the device with this serial_id: every process must agree."""
    # crc32, not hash(): Python salts str hashes per process.
    return zlib.crc32(serial.encode("utf-8", "surrogatepass")) % workers


@dataclass(frozen=True, slots=True)
class Split:
    """A worker's part of a message whose devices several workers own.

    Every owner decodes the whole message the same way and stores (and evaluates) only the
    readings of the devices it owns, so each device's readings stay with one worker, in order.
    What the decoder rejected (a bad element, a bad value, the message refused whole) is the
    same in every part: the primary (the owner of the first device) alone records it, so that
    such a message still gives one rejected_messages row. A reading the decoder accepted is
    checked against the catalogue by its device's owner, which records it if it fails: the
    workers' catalogues may differ for a moment, and one judge per reading never loses one."""

    worker: int  # this worker's index
    workers: int
    owners: tuple[int, ...]  # every owner it was sent to, the primary first

    @property
    def primary(self) -> bool:
        return self.worker == self.owners[0]

    def keeps(self, serial: str) -> bool:
        """Whether this worker stores the readings of `serial`. A device whose owner was not
        sent the message (the receiving process read the payload differently from the decoder)
        is the primary's: stored once, whoever stores it."""
        owner = device_owner(serial, self.workers)
        return owner == self.worker or (self.primary and owner not in self.owners)
