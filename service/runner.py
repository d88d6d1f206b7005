"""Runners execute queued jobs. ``JobRunner`` is the interface; ``LocalProcessRunner`` runs
each job in a child process of this machine.

A runner claims jobs from the store, runs them, reports progress to the store and ends each job
in one of the finished states. The service only calls ``start``, ``notify``, ``cancel``,
``stop`` and ``healthy``, so a distributed backend (Ray, a cluster queue) can replace the local
one by implementing the same five methods with ``publish_artifacts`` for the final step.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from compress.checksums import sha256_file  # the checksum the report's artifacts use

from .redact import redact_error
from .settings import Settings
from .store import CANCELLED, FAILED, GATE_FAILED, SUCCEEDED, Job, JobStore
from .supervise import HEARTBEAT_S, LOST, MEMORY, MIB, Limits, supervise
from .worker import JobSpec, run_job

log = logging.getLogger("compress.service")

ARTIFACTS = "artifacts"
LOG_FILE = "job.log"
CHECKSUMS = "SHA256SUMS"
CANCEL_CHECK_S = 1.0  # how often a running job's cancel flag is read from the store


class JobRunner(ABC):
    """Where jobs run. Implementations must survive a job that crashes."""

    @abstractmethod
    def start(self) -> None:
        """Begin taking queued jobs (called once, after interrupted jobs were requeued)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop taking jobs; running ones go back to the queue."""

    @abstractmethod
    def notify(self) -> None:
        """A job was queued (a hint: runners also look for work on their own)."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """The job was flagged ``cancel_requested`` in the store: stop its work now."""

    @abstractmethod
    def healthy(self) -> bool:
        """Whether this runner can take jobs (for /readyz)."""


# Text artifacts that may quote where the job ran (the library records resolved paths).
TEXT_ARTIFACTS = (".json", ".html", ".yaml", ".yml", ".txt", ".md", ".csv")
MAX_REWRITTEN_BYTES = 256 << 20


def _relative_paths(tmp_out: Path, job_dir: Path) -> None:
    """Paths of the job's folder in its text artifacts become relative to it (``inputs/x.npz``,
    an artifact by its name): what a tenant downloads never says where the server keeps it.
    Only these exact folders are replaced; images and other content are left as they are."""
    roots = []
    for folder in (tmp_out, job_dir):
        roots += sorted({str(folder), str(folder.resolve())}, key=len, reverse=True)
    for f in tmp_out.rglob("*"):
        if not f.is_file() or f.suffix.lower() not in TEXT_ARTIFACTS or \
                f.stat().st_size > MAX_REWRITTEN_BYTES:
            continue
        text = f.read_text(encoding="utf-8", errors="surrogateescape")
        fixed = text
        for root in roots:
            fixed = fixed.replace(root + "/", "").replace(root, ".")
        if fixed != text:
            f.write_text(fixed, encoding="utf-8", errors="surrogateescape")


def publish_artifacts(tmp_out: Path, final: Path, job_dir: Path | None = None) -> list[dict]:
    """Checksum every file of a finished run and move the folder into place in one rename
    (with ``job_dir``, its text files first lose the paths of the job's folder)."""
    if job_dir is not None:
        _relative_paths(tmp_out, job_dir)
    artifacts = []
    for f in sorted(p for p in tmp_out.rglob("*") if p.is_file()):
        artifacts.append({"name": f.relative_to(tmp_out).as_posix(), "bytes": f.stat().st_size,
                          "sha256": sha256_file(f)})
    (tmp_out / CHECKSUMS).write_text("".join(f"{a['sha256']}  {a['name']}\n" for a in artifacts))
    if final.exists():  # a previous attempt's, from before a restart
        shutil.rmtree(final)
    os.replace(tmp_out, final)
    return artifacts


def append_log(path: Path, line: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{stamp} {line}\n")


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        hint = " (out of memory, or killed by an operator)" if sig == "SIGKILL" else ""
        return f"the job's worker process was killed by {sig}{hint}"
    return f"the job's worker process exited with code {exitcode} without a result"


_MP = None


# Imported once by the fork server, so that jobs do not pay for them (about 5 s per job on two
# cores); a module that fails to import is skipped there and imported by the job when needed.
FORKSERVER_PRELOAD = ["service.worker", "compress.models.loaders", "timm", "onnxruntime",
                      "torch.onnx", "onnxscript"]


def _mp_context():
    """Fork server with the library preloaded: each job forks a warm, single-threaded process
    (no torch import per job, and no fork of the multi-threaded API process)."""
    global _MP
    if _MP is None:
        _MP = mp.get_context("forkserver")
        _MP.set_forkserver_preload(FORKSERVER_PRELOAD)
    return _MP


class LocalProcessRunner(JobRunner):
    """``settings.workers`` threads, each running one job at a time in a child process."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._generation = 0
        self._cancel: set[str] = set()

    def start(self) -> None:
        if self.settings.workers:
            from multiprocessing import forkserver

            _mp_context()
            # Warm the fork server now rather than in the first job (imports take ~10 s).
            threading.Thread(target=forkserver.ensure_running, daemon=True,
                             name="forkserver-start").start()
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._loop, name=f"compress-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stopping.set()
        self.notify()
        for t in self._threads:
            t.join(timeout=self.settings.cancel_grace_s + 10)

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._cond:
            self._cancel.add(job_id)

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stopping.is_set()

    # ---------------------------------------------------------------- internals

    def _loop(self) -> None:
        seen = -1
        while not self._stopping.is_set():
            with self._cond:
                seen = self._generation
            try:
                job = self.store.claim_next(self.settings.instance)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the worker
                log.exception("claiming a job failed")
                job = None
            if job is not None:
                try:
                    self._run(job)
                except Exception:  # noqa: BLE001
                    log.exception("job %s: runner error", job.id)
                    self.store.finish(job.id, FAILED, attempt=job.attempts,
                                      exit_code=1, message="internal error",
                                      error={"type": "InternalError",
                                             "message": "the runner failed; see the log"})
                continue
            with self._cond:
                if self._generation == seen and not self._stopping.is_set():
                    self._cond.wait(self.settings.poll_interval_s)

    def _cancel_wanted(self, job_id: str, last_check: list[float]) -> bool:
        with self._cond:
            if job_id in self._cancel:
                return True
        now = time.monotonic()
        if now - last_check[0] > CANCEL_CHECK_S:  # another API instance may have flagged it
            last_check[0] = now
            return self.store.cancel_requested(job_id)
        return False

    def _run(self, job: Job) -> None:
        spec, job_dir, log_path, tmp_out = job_spec(self.settings, job)
        append_log(log_path, f"attempt {job.attempts} started on {self.settings.instance}")
        ctx = _mp_context()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=run_job, args=(spec, send, os.getpid()),
                           name=f"compress-job-{job.id[:8]}")
        proc.start()
        send.close()
        self.store.update_running(job.id, pid=proc.pid, message="running")
        last_check = [time.monotonic()]

        def stop_reason() -> str | None:
            if self._stopping.is_set():
                return "stopped"
            return "cancelled" if self._cancel_wanted(job.id, last_check) else None

        try:
            outcome, reason = supervise(proc, recv, self.store, job.id,
                                        job_limits(self.settings), stop_reason)
        finally:
            recv.close()
        with self._cond:
            self._cancel.discard(job.id)
        conclude_job(self.store, self.settings, job, outcome, reason, tmp_out, job_dir,
                     log_path, proc.exitcode)


def job_limits(settings: Settings) -> Limits:
    """The time and memory limits of one job process, from the settings."""
    return Limits(timeout_s=settings.job_timeout_s or None,
                  memory_bytes=settings.job_memory_mb * MIB if settings.job_memory_mb else None,
                  cancel_grace_s=settings.cancel_grace_s,
                  heartbeat_s=min(HEARTBEAT_S, settings.stale_after_s / 3))


def job_spec(settings: Settings, job: Job) -> tuple[JobSpec, Path, Path, Path]:
    """The job's spec with a fresh output folder for this attempt; (spec, job_dir, log, tmp)."""
    job_dir = settings.job_dir(job.tenant, job.id)
    log_path = job_dir / LOG_FILE
    tmp_out = job_dir / f".tmp-{job.attempts}"
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    inputs = {k: str(job_dir / v) for k, v in (job.inputs or {}).items()}
    spec = JobSpec(job_id=job.id, recipe_yaml=job.recipe_yaml, out_dir=str(tmp_out),
                   log_path=str(log_path), model=inputs.get("model"),
                   calib=inputs.get("calib"), eval=inputs.get("eval"))
    return spec, job_dir, log_path, tmp_out


def conclude_job(store: JobStore, settings: Settings, job: Job, outcome: str,
                 payload: dict | None, tmp_out: Path, job_dir: Path, log_path: Path,
                 exitcode: int | None) -> None:
    """Publish the artifacts and record the job's final state (any runner's last step)."""
    # Only this attempt's state is written: another instance may have taken the job back.
    finish = partial(store.finish, job.id, attempt=job.attempts)
    if outcome == "result":
        try:
            artifacts = publish_artifacts(tmp_out, job_dir / ARTIFACTS, job_dir)
        except OSError as e:  # a full disk, most often: the job fails, the service goes on
            shutil.rmtree(tmp_out, ignore_errors=True)
            msg = f"storing the job's artifacts failed: {e.strerror or type(e).__name__}"
            finish(FAILED, exit_code=1, message=msg,
                   error={"type": "StorageError", "message": msg})
            append_log(log_path, f"failed: {msg}")
            return
        state = SUCCEEDED if payload["gate_passed"] else GATE_FAILED
        message = "done" if payload["gate_passed"] else "quality gate failed: " + "; ".join(
            payload["gate_failures"])
        finish(state, exit_code=payload["exit_code"],
               gate_passed=payload["gate_passed"], artifacts=artifacts,
               progress=1.0, stage="done", message=redact_error(message[:1000], job_dir))
        append_log(log_path, f"finished: {state}; {len(artifacts)} artifacts checksummed")
        return
    shutil.rmtree(tmp_out, ignore_errors=True)
    if outcome == LOST:  # another instance requeued it (no heartbeat): it owns the job now
        append_log(log_path, "this attempt lost the job (requeued elsewhere); process killed")
    elif outcome == "stopped":
        store.requeue(job.id, "requeued: the service stopped while it ran",
                      attempt=job.attempts)
        append_log(log_path, "service stopping: job killed and requeued")
    elif outcome == "cancelled":
        finish(CANCELLED, message="cancelled while running", exit_code=1)
        append_log(log_path, "cancelled: worker process killed")
    elif outcome == "timeout":
        msg = f"the job ran longer than job_timeout_s={settings.job_timeout_s:g}"
        finish(FAILED, exit_code=1, message=msg,
               error={"type": "TimeoutError", "message": msg})
        append_log(log_path, f"failed: {msg}")
    elif outcome == MEMORY:
        msg = (f"the job ran out of its memory limit of {settings.job_memory_mb} MiB "
               "(job_memory_mb); use a smaller model or data set, or ask the operator to raise "
               "the limit")
        finish(FAILED, exit_code=1, message=msg,
               error={"type": "MemoryLimitExceeded", "message": msg})
        append_log(log_path, f"failed: {msg}")
    elif outcome == "error":
        # Library messages quote the files they touched: no server path reaches the tenant.
        error = redact_error(payload, job_dir)
        finish(FAILED, exit_code=payload.get("exit_code", 1),
               error=error, message=error.get("message", "")[:1000])
        append_log(log_path, f"failed: {payload.get('type')}")
    else:
        msg = _describe_exit(exitcode)
        finish(FAILED, exit_code=1, message=msg,
               error={"type": "WorkerCrashed", "message": msg})
        append_log(log_path, f"failed: {msg}")


def make_runner(store: JobStore, settings: Settings) -> JobRunner:
    """The runner that ``settings.runner`` names (the app's default factory)."""
    if settings.runner == "ray":
        from .ray_runner import RayRunner

        return RayRunner(store, settings)
    return LocalProcessRunner(store, settings)
