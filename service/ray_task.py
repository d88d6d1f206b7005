"""What a Ray worker runs for one job (the worker side of ``RayRunner``).

The Ray task supervises the job with the loop that ``LocalProcessRunner`` uses on one machine
(``service.supervise``): it runs ``service.worker.run_job`` (the same worker code) in a child
process forked from a fork server that preloaded the library, relays the child's progress into
the shared job database, stops the child when the job is cancelled or passes its time or memory
limit, and returns the outcome to the runner, which publishes the artifacts (on the shared
storage) and records the final state.

This module is light on purpose (no torch): a Ray worker process only imports the library in the
fork server, so a worker that is killed takes no half-imported state with it, and the job's own
process exits by itself within a second of its Ray worker's death (``run_job`` watches its
parent).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

from .store import JobStore
from .supervise import CANCELLED, HEARTBEAT_S, Limits, supervise

CANCEL_CHECK_S = 1.0
PRELOAD = ["service.worker"]

_STORES: dict[str, JobStore] = {}
_MP = None


def _store(db_url: str) -> JobStore:
    """One connection pool per database and Ray worker process."""
    if db_url not in _STORES:
        _STORES[db_url] = JobStore(db_url)
    return _STORES[db_url]


def _context():
    global _MP
    if _MP is None:
        _MP = mp.get_context("forkserver")
        _MP.set_forkserver_preload(PRELOAD)
    return _MP


def _job_main(spec: dict, conn, parent_pid: int) -> None:
    """Child entry point: the service's worker code, unchanged."""
    from .worker import JobSpec, run_job

    run_job(JobSpec(**spec), conn, parent_pid)


def execute_job(spec: dict, db_url: str, *, timeout_s: float | None = None,
                memory_bytes: int | None = None, cancel_grace_s: float = 3.0,
                heartbeat_s: float = HEARTBEAT_S) -> dict:
    """Run one job in a child process and return ``{"outcome", "payload", "exitcode", ...}``.

    ``outcome`` is what ``runner.conclude_job`` takes: result, error, cancelled, timeout,
    memory, lost or no_result (the child died without a result; ``exitcode`` says how).
    """
    store = _store(db_url)
    job_id = spec["job_id"]
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_job_main, args=(spec, send, os.getpid()),
                       name=f"compress-job-{job_id[:8]}")
    proc.start()
    send.close()
    where = f"{socket.gethostname()} (Ray worker pid {os.getpid()}, job pid {proc.pid})"
    store.update_running(job_id, pid=os.getpid(), message=f"running on {where}")
    last_check = [time.monotonic()]

    def stop_reason() -> str | None:
        now = time.monotonic()
        if now - last_check[0] >= CANCEL_CHECK_S:
            last_check[0] = now
            if store.cancel_requested(job_id):
                return CANCELLED
        return None

    limits = Limits(timeout_s=timeout_s, memory_bytes=memory_bytes,
                    cancel_grace_s=cancel_grace_s, heartbeat_s=heartbeat_s)
    try:
        outcome, payload = supervise(proc, recv, store, job_id, limits, stop_reason)
    finally:
        recv.close()
    return {"outcome": outcome, "payload": payload, "exitcode": proc.exitcode, "where": where}
