"""What runs inside a job's child process: one ``compress()`` call, reported over a pipe.

The child writes its own log (stdout and stderr at the file-descriptor level, so native
libraries' output lands there too), sends ``("progress", stage, fraction, message)`` while it
runs and one final ``("result", {...})`` or ``("error", {...})``. It exits by itself if the API
process disappears, so a killed service leaves no orphan computing for nobody.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

# Imported here so that the fork server preloads the library once and every job starts warm.
from compress.api import compress
from compress.errors import CompressError
from compress.recipe import recipe_from_yaml

log = logging.getLogger("compress.job")


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs; plain data so that any runner backend can ship it."""

    job_id: str
    recipe_yaml: str
    out_dir: str
    log_path: str
    model: str | None = None
    calib: str | None = None
    eval: str | None = None


def _redirect_output(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _exit_with_parent(parent_pid: int) -> None:
    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(70)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class _ProgressReporter:
    """Sends every update to the runner; writes a log line per stage and every few seconds."""

    def __init__(self, conn):
        self.conn = conn
        self.stage = None
        self.logged_at = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        self.conn.send(("progress", stage, float(fraction), message))
        now = time.monotonic()
        if stage != self.stage or now - self.logged_at > 5:
            self.stage, self.logged_at = stage, now
            log.info("%-16s %3.0f%% %s", stage, fraction * 100, message)


def run_job(spec: JobSpec, conn, parent_pid: int) -> None:
    """Child process entry point."""
    _redirect_output(spec.log_path)
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("compress").setLevel(logging.INFO)  # ours, not the exporters' chatter
    log.info("job %s: process %d started", spec.job_id, os.getpid())
    try:
        recipe = recipe_from_yaml(spec.recipe_yaml, source="recipe.yaml")
        result = compress(recipe, model=spec.model, calib=spec.calib, eval=spec.eval,
                          out_dir=spec.out_dir, progress=_ProgressReporter(conn))
        log.info("job %s: done, quality gate %s", spec.job_id,
                 "passed" if result.gate_passed else "FAILED")
        conn.send(("result", {"exit_code": result.exit_code, "gate_passed": result.gate_passed,
                              "gate_failures": result.gate_failures}))
    except CompressError as e:
        log.error("job %s failed: %s", spec.job_id, e)
        conn.send(("error", {**e.to_dict(), "exit_code": e.exit_code}))
    except BaseException as e:  # noqa: BLE001 - report anything; the traceback goes to the log
        traceback.print_exc()
        conn.send(("error", {"type": type(e).__name__, "message": str(e) or repr(e),
                             "exit_code": 1}))
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
