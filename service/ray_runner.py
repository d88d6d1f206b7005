"""``RayRunner``: the service's jobs run as tasks on a Ray cluster (``runner: ray``).

The API instance stays the only place that claims jobs and records their final state; it keeps up
to ``settings.workers`` jobs in flight on the cluster. Each job is one Ray task
(``ray_task.execute_job``) that reserves ``ray_num_cpus`` CPUs and the job's GPUs (the recipe's
``device: cuda`` takes at least one; ``ray_num_gpus`` is the default for every job), runs the
service's worker code in a child process on whichever node Ray places it, and writes progress
straight into the shared job database (PostgreSQL in a cluster). Inputs, logs and artifacts live
under ``data_dir``, which must be the same shared storage at the same path on the API and on
every Ray node.

A Ray worker or node that dies mid-job (killed, out of memory, node lost) surfaces here as a Ray
error: the job goes back to the queue while it has retries left (``ray_max_retries``) and
otherwise fails with the reason. Nothing is lost either way: the job's log keeps every attempt
and the job ends in a finished state.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .runner import JobRunner, append_log, conclude_job, job_limits, job_spec
from .settings import Settings
from .store import CANCELLED, FAILED, Job, JobStore

log = logging.getLogger("compress.service")


def job_resources(recipe_yaml: str, settings: Settings) -> dict[str, float]:
    """Ray resources for one job: CPUs from the settings, GPUs from the recipe or settings."""
    try:
        device = (yaml.safe_load(recipe_yaml) or {}).get("device", "auto")
    except yaml.YAMLError:
        device = "auto"
    gpus = settings.ray_num_gpus
    if device == "cuda":
        gpus = max(gpus, 1.0)
    elif device == "cpu":
        gpus = 0.0
    return {"num_cpus": settings.ray_num_cpus, "num_gpus": gpus}


@dataclass
class _InFlight:
    job: Job
    ref: object
    tmp_out: Path
    job_dir: Path
    log_path: Path
    resources: dict
    cancel_at: float | None = None
    beat_at: float = 0.0
    lost: bool = False  # another instance took the job back (it looked stale)


class RayRunner(JobRunner):
    """Jobs as Ray tasks; at most ``settings.workers`` in flight from this instance."""

    def __init__(self, store: JobStore, settings: Settings):
        self.store = store
        self.settings = settings
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._generation = 0
        self._cancel: set[str] = set()
        self._thread: threading.Thread | None = None
        self._remote = None
        self._ray = None

    # ------------------------------------------------------------------ interface

    def start(self) -> None:
        import ray

        from . import ray_task

        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=self.settings.ray_address or "auto", namespace="compress",
                     log_to_driver=False, configure_logging=False)
        # Ray's own retries stay off: a worker death comes back here, where the job's attempts
        # are counted in the database and the log says what happened.
        self._remote = ray.remote(max_retries=0)(ray_task.execute_job)
        log.info("Ray runner: cluster %s, resources %s", self.settings.ray_address or "auto",
                 ray.cluster_resources())
        self._thread = threading.Thread(target=self._loop, name="compress-ray-dispatch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.cancel_grace_s + 30)
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def cancel(self, job_id: str) -> None:
        # The Ray task sees the database flag within a second and stops the job itself; this
        # only arms the fallback that kills its worker if it does not.
        with self._cond:
            self._cancel.add(job_id)
            self._generation += 1
            self._cond.notify_all()

    def healthy(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and not self._stopping.is_set() and self._ray is not None
                and self._ray.is_initialized())

    # ------------------------------------------------------------------ internals

    def _loop(self) -> None:
        ray = self._ray
        flights: dict[object, _InFlight] = {}
        while not self._stopping.is_set():
            with self._cond:
                seen = self._generation
            while len(flights) < max(self.settings.workers, 1) and not self._stopping.is_set():
                try:
                    job = self.store.claim_next(self.settings.instance)
                except Exception:  # noqa: BLE001 - a database hiccup must not stop dispatching
                    log.exception("claiming a job failed")
                    job = None
                if job is None:
                    break
                try:
                    flight = self._submit(job)
                except Exception as e:  # noqa: BLE001
                    log.exception("job %s: submitting to Ray failed", job.id)
                    self._fail(job, "RayError", f"submitting the job to Ray failed: {e}")
                    continue
                if flight is not None:
                    flights[flight.ref] = flight
            self._check_cancels(flights)
            self._heartbeat(flights)
            if flights:
                ready, _ = ray.wait(list(flights), num_returns=len(flights), timeout=0.5)
                for ref in ready:
                    self._finish(flights.pop(ref))
                continue
            with self._cond:
                if self._generation == seen and not self._stopping.is_set():
                    self._cond.wait(self.settings.poll_interval_s)
        for flight in flights.values():  # stopping: running jobs go back to the queue
            ray.cancel(flight.ref, force=True)
            self.store.requeue(flight.job.id, "requeued: the service stopped while it ran",
                               attempt=flight.job.attempts)
            append_log(flight.log_path, "service stopping: Ray task killed and job requeued")

    def _submit(self, job: Job) -> _InFlight | None:
        resources = job_resources(job.recipe_yaml, self.settings)
        gpus_in_cluster = self._ray.cluster_resources().get("GPU", 0.0)
        if resources["num_gpus"] > gpus_in_cluster:
            self._fail(job, "ResourceError",
                       f"the job needs {resources['num_gpus']:g} GPU(s) per task and the Ray "
                       f"cluster has {gpus_in_cluster:g}")
            return None
        spec, job_dir, log_path, tmp_out = job_spec(self.settings, job)
        append_log(log_path, f"attempt {job.attempts} submitted to Ray by "
                             f"{self.settings.instance} ({resources['num_cpus']:g} CPU, "
                             f"{resources['num_gpus']:g} GPU)")
        self.store.update_running(job.id, message="waiting for a Ray worker")
        limits = job_limits(self.settings)
        ref = self._remote.options(**resources, name=f"compress-job-{job.id[:8]}").remote(
            dataclasses.asdict(spec), self.settings.db_url, timeout_s=limits.timeout_s,
            memory_bytes=limits.memory_bytes, cancel_grace_s=limits.cancel_grace_s,
            heartbeat_s=limits.heartbeat_s)
        return _InFlight(job, ref, tmp_out, job_dir, log_path, resources)

    def _check_cancels(self, flights: dict) -> None:
        with self._cond:  # only this instance's jobs in flight matter here
            self._cancel &= {f.job.id for f in flights.values()}
            wanted = set(self._cancel)
        now = time.monotonic()
        for flight in flights.values():
            if flight.job.id in wanted and flight.cancel_at is None:
                # Fallback deadline: the task itself stops within ~1 s plus the grace period.
                flight.cancel_at = now + self.settings.cancel_grace_s + 15
            elif flight.cancel_at is not None and now > flight.cancel_at:
                log.warning("job %s: cancelled task still running; killing its worker",
                            flight.job.id)
                self._ray.cancel(flight.ref, force=True)
                flight.cancel_at = float("inf")

    def _heartbeat(self, flights: dict) -> None:
        """Keep in-flight jobs fresh while they wait for a Ray worker (the task beats once it
        runs): a job queued in Ray for long is not stale. A job that is no longer running in
        the store was taken back by another instance; its task is stopped."""
        now = time.monotonic()
        beat = job_limits(self.settings).heartbeat_s
        for flight in flights.values():
            if flight.lost or now - flight.beat_at < beat:
                continue
            flight.beat_at = now
            if not self.store.update_running(flight.job.id):
                flight.lost = True
                self._ray.cancel(flight.ref, force=True)

    def _fail(self, job: Job, kind: str, message: str) -> None:
        self.store.finish(job.id, FAILED, attempt=job.attempts, exit_code=1,
                          message=message[:1000],
                          error={"type": kind, "message": message})
        append_log(self.settings.job_dir(job.tenant, job.id) / "job.log", f"failed: {message}")

    def _finish(self, flight: _InFlight) -> None:
        ray = self._ray
        job = flight.job
        with self._cond:
            self._cancel.discard(job.id)
        if flight.lost:
            shutil.rmtree(flight.tmp_out, ignore_errors=True)
            append_log(flight.log_path, f"attempt {job.attempts} lost the job (requeued "
                                        "elsewhere); its Ray task was stopped")
            return
        try:
            res = ray.get(flight.ref)
        except ray.exceptions.TaskCancelledError:
            self._lost(flight, "cancelled", "the job's Ray task was cancelled")
            return
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.LocalRayletDiedError, ray.exceptions.OutOfMemoryError,
                ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as e:
            self._lost(flight, "lost", f"the Ray worker running the job died "
                                       f"({type(e).__name__})")
            return
        except ray.exceptions.RayError as e:
            msg = str(e).strip().splitlines()[-1][:500] if str(e).strip() else type(e).__name__
            self._lost(flight, "error", f"the job's Ray task failed: {msg}")
            return
        append_log(flight.log_path, f"attempt {job.attempts} ran on {res.get('where')}")
        try:
            conclude_job(self.store, self.settings, job, res["outcome"], res["payload"],
                         flight.tmp_out, flight.job_dir, flight.log_path, res["exitcode"])
        except Exception:  # noqa: BLE001
            log.exception("job %s: concluding failed", job.id)
            self._fail(job, "InternalError", "the runner failed; see the service log")

    def _lost(self, flight: _InFlight, why: str, reason: str) -> None:
        """The Ray task ended without an outcome: retry by policy, or fail with the reason."""
        job = flight.job
        shutil.rmtree(flight.tmp_out, ignore_errors=True)
        if why == "cancelled" or self.store.cancel_requested(job.id):
            self.store.finish(job.id, CANCELLED, attempt=job.attempts,
                              message="cancelled while running", exit_code=1)
            append_log(flight.log_path, f"cancelled: {reason}")
            return
        retries = self.settings.ray_max_retries
        if why == "lost" and job.attempts <= retries:
            msg = f"requeued: {reason} on attempt {job.attempts} (retry {job.attempts} of " \
                  f"{retries})"
            if self.store.requeue(job.id, msg, attempt=job.attempts):
                append_log(flight.log_path, msg)
                self.notify()
                return
        if why == "lost":
            reason += f"; gave up after {job.attempts} attempt(s) (ray_max_retries={retries})"
        self.store.finish(job.id, FAILED, attempt=job.attempts, exit_code=1,
                          message=reason[:1000],
                          error={"type": "WorkerCrashed" if why == "lost" else "RayError",
                                 "message": reason})
        append_log(flight.log_path, f"failed: {reason}")
