"""What a Ray worker runs for one job (the worker side of ``RayRunner``).

The Ray task supervises the job exactly as ``LocalProcessRunner`` does on one machine: it runs
``service.worker.run_job`` (the same worker code) in a child process forked from a fork server
that preloaded the library, relays the child's progress into the shared job database, stops the
child when the job is cancelled or runs past its timeout, and returns the outcome to the runner,
which publishes the artifacts (on the shared storage) and records the final state.

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

PROGRESS_WRITE_INTERVAL_S = 0.5
HEARTBEAT_S = 10.0
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


def _kill(proc, grace_s: float) -> None:
    proc.terminate()
    proc.join(grace_s)
    if proc.is_alive():
        proc.kill()
        proc.join()


def execute_job(spec: dict, db_url: str, *, timeout_s: float | None = None,
                cancel_grace_s: float = 3.0) -> dict:
    """Run one job in a child process and return ``{"outcome", "payload", "exitcode", ...}``.

    ``outcome`` is what ``runner.conclude_job`` takes: result, error, cancelled, timeout or
    no_result (the child died without a result; ``exitcode`` says how).
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
    started = last_write = last_check = time.monotonic()
    pending, outcome, payload = None, "no_result", None
    try:
        while True:
            try:
                if recv.poll(0.2):
                    msg = recv.recv()
                    if msg[0] == "progress":
                        pending = msg
                    else:
                        outcome, payload = msg[0], msg[1]
            except (EOFError, OSError):  # the child closed its end: finished or died
                proc.join(30)
                if proc.is_alive():  # stuck in interpreter shutdown: its result is in already
                    _kill(proc, cancel_grace_s)
                break
            now = time.monotonic()
            if pending and now - last_write >= PROGRESS_WRITE_INTERVAL_S:
                _, stage, fraction, message = pending
                store.update_running(job_id, stage=stage, progress=round(fraction, 4),
                                     message=message[:500] or stage)
                pending, last_write = None, now
            elif now - last_write >= HEARTBEAT_S:
                store.update_running(job_id)
                last_write = now
            if outcome == "no_result":
                stop = None
                if now - last_check >= CANCEL_CHECK_S:
                    last_check = now
                    if store.cancel_requested(job_id):
                        stop = "cancelled"
                if timeout_s and now - started > timeout_s:
                    stop = "timeout"
                if stop:
                    _kill(proc, cancel_grace_s)
                    return {"outcome": stop, "payload": None, "exitcode": proc.exitcode,
                            "where": where}
            if not proc.is_alive() and not recv.poll(0):
                proc.join()
                break
    finally:
        recv.close()
    return {"outcome": outcome, "payload": payload, "exitcode": proc.exitcode, "where": where}
