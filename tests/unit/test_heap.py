"""iothub.daemon.heap: start-up objects leave the collector's view, garbage does not."""

from __future__ import annotations

import gc
import weakref

from iothub.daemon import heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_collects_first_then_freezes_what_is_alive() -> None:
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    threshold = gc.get_threshold()
    try:
        heap.freeze_startup_objects()
        assert gone() is None  # collected before the freeze, not kept for good
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *threshold[1:])
        # Cycles made afterwards are still collected, only later.
        later = Node()
        later_gone = weakref.ref(later)
        del later
        gc.collect(0)
        assert later_gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
