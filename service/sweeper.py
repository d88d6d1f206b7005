"""The periodic check, in every service instance, for jobs whose runner died.

A running job's runner writes a heartbeat (``updated_at``) every few seconds. When a service
instance dies, its jobs stop beating; whichever instance looks next (every
``stale_check_interval_s``) puts them back in the queue, or fails them once they have started
``job_max_attempts`` times, whatever the dead instance was called (a restarted container gets a
new host name, so a start-up check for its own name alone would never find them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .settings import Settings
from .store import JobStore

log = logging.getLogger("compress.service")


class StaleJobSweeper:
    def __init__(self, store: JobStore, settings: Settings,
                 on_requeued: Callable[[], None] = lambda: None):
        self.store = store
        self.settings = settings
        self.on_requeued = on_requeued
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> list[str]:
        """One check; returns the ids of the jobs put back in the queue."""
        ids = self.store.requeue_stale(self.settings.stale_after_s,
                                       self.settings.job_max_attempts)
        if ids:
            log.warning("requeued %d job(s) with no heartbeat for %g s: %s", len(ids),
                        self.settings.stale_after_s, ", ".join(ids))
            self.on_requeued()
        return ids

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="compress-stale-sweeper",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping.wait(self.settings.stale_check_interval_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the checks
                log.exception("checking for stale jobs failed")
