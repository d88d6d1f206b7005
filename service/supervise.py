"""The loop that watches one job's child process: the local runner and the Ray task both use it.

It relays the child's progress into the job store, writes a heartbeat (``updated_at``) at least
every ``limits.heartbeat_s``, and stops the child when the job is cancelled, the service stops,
it runs past its timeout or its process tree grows past its memory limit. Light on purpose (no
torch): the Ray task imports it in a process that never loads the library.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .store import JobStore

PROGRESS_WRITE_INTERVAL_S = 0.5
# A running job's updated_at moves at least this often, and at least three times per
# stale_after_s (see job_limits), so that no live job looks dead to another instance.
HEARTBEAT_S = 10.0
POLL_S = 0.2
MIB = 1 << 20

# Outcomes besides the child's own "result" / "error": what runner.conclude_job records.
STOPPED, CANCELLED, TIMEOUT, MEMORY, LOST, NO_RESULT = (
    "stopped", "cancelled", "timeout", "memory", "lost", "no_result")


@dataclass(frozen=True)
class Limits:
    timeout_s: float | None = None  # None or 0: no limit
    memory_bytes: int | None = None
    cancel_grace_s: float = 3.0
    heartbeat_s: float = HEARTBEAT_S


def kill(proc, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``."""
    proc.terminate()
    proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc; 0 if it is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return total


def _stop_for(proc, limits: Limits, elapsed: float, still_ours: bool,
              stop_reason: Callable[[], str | None]) -> str | None:
    """Why the child must be stopped now, or None."""
    if (reason := stop_reason()) is not None:
        return reason
    if not still_ours:
        return LOST
    if limits.timeout_s and elapsed > limits.timeout_s:
        return TIMEOUT
    if limits.memory_bytes and tree_rss_bytes(proc.pid) > limits.memory_bytes:
        return MEMORY
    return None


def supervise(proc, recv, store: JobStore, job_id: str, limits: Limits,
              stop_reason: Callable[[], str | None]) -> tuple[str, dict | None]:
    """Relay progress until the child ends; returns ``(outcome, payload)``.

    ``outcome`` is the child's "result" or "error" (with its payload), or one of STOPPED,
    CANCELLED (from ``stop_reason()``, asked every poll), TIMEOUT, MEMORY, LOST (the job is no
    longer running in the store: another instance took it back) or NO_RESULT (the child died
    without a word; its exit code says how). The child is killed for all but the first two.
    """
    started = last_write = time.monotonic()
    pending, outcome, payload = None, NO_RESULT, None
    while True:
        try:
            if recv.poll(POLL_S):
                msg = recv.recv()
                if msg[0] == "progress":
                    pending = msg
                else:
                    outcome, payload = msg[0], msg[1]
        except (EOFError, OSError):  # the child closed its end (finished or died)
            proc.join(30)
            if proc.is_alive():  # stuck in interpreter shutdown: its result is in already
                kill(proc, limits.cancel_grace_s)
            break
        now = time.monotonic()
        still_ours = True
        if pending and now - last_write >= min(PROGRESS_WRITE_INTERVAL_S, limits.heartbeat_s):
            _, stage, fraction, message = pending
            still_ours = store.update_running(job_id, stage=stage, progress=round(fraction, 4),
                                              message=message[:500] or stage)
            pending, last_write = None, now
        elif now - last_write >= limits.heartbeat_s:
            still_ours = store.update_running(job_id)
            last_write = now
        # Once the final message is in, the child is let finish rather than killed.
        stop = None if outcome != NO_RESULT else _stop_for(proc, limits, now - started,
                                                           still_ours, stop_reason)
        if stop:
            kill(proc, limits.cancel_grace_s)
            return stop, None
        if not proc.is_alive() and not recv.poll(0):
            proc.join()
            break
    return outcome, payload
