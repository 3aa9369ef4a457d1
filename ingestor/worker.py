"""The shape every background part of the service shares: a named thread, a stop event, and
the service's Worker protocol (start, stop, alive). The retention thread and the rule engine's
workers are all of this shape; each supplies only its `_run` loop."""

from __future__ import annotations

import threading


class WorkerThread:
    """A background loop on a thread of its own, stopped by setting `_stop`."""

    name = "iothub-worker"  # each subclass names its thread: logs and `thread_died` show it

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False only when the thread should be running and is not (it died)."""
        return self._thread.is_alive() or self._stop.is_set()

    def _run(self) -> None:
        raise NotImplementedError
