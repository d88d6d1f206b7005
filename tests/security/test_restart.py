"""kill -9 of the API process (a real `compress serve`), then a restart under the same instance
name or under a new one (a container's host name changes on every start): the job it ran is
not lost, the finished one keeps its results, and the service takes new jobs."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.security.conftest import AUTH_A, database
from tests.service.conftest import SLOW_LATENCY, onnx_recipe

pytestmark = pytest.mark.slow
STALE_AFTER_S = 20  # longer than a restart takes, so only the periodic check can requeue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(data_dir: Path, db_url: str, instance: str):
    """`compress serve` in its own process group; yields (client, process)."""
    port = free_port()
    env = {**os.environ, "COMPRESS_SERVICE_TOKENS": "token-a:tenant-a,token-b:tenant-b",
           "COMPRESS_SERVICE_INSTANCE": instance, "COMPRESS_SERVICE_POLL_INTERVAL_S": "0.2",
           "COMPRESS_SERVICE_STALE_AFTER_S": str(STALE_AFTER_S),
           "COMPRESS_SERVICE_STALE_CHECK_INTERVAL_S": "1", "COMPRESS_SERVICE_CANCEL_GRACE_S": "1"}
    log = open(data_dir.parent / f"serve-{instance}-{port}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress", "serve", "--port", str(port), "--data-dir",
         str(data_dir), "--database-url", db_url, "--workers", "2", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH_A, timeout=30)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (data_dir.parent / log.name).read_text()[-3000:]
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "compress serve did not become ready"
            time.sleep(0.2)
        yield client, proc
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if live_members(proc.pid):  # whatever is left of the group (after a kill -9)
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting for a reaper excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def submit(client, files: dict, model: str, **recipe) -> str:
    r = client.post("/v1/jobs", data={"recipe": onnx_recipe(**recipe)},
                    files={"model": ("m.onnx", files[model].read_bytes()),
                           "eval": ("eval.npz", files["eval"].read_bytes())})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_for(client, job_id: str, check, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if check(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: condition not met in {timeout}s: {job}")


@pytest.mark.parametrize("same_name", [True, False], ids=["same instance", "new instance"])
def test_api_killed_mid_job_loses_nothing(tmp_path, db_kind, onnx_job_files, same_name):
    data_dir = tmp_path / "data"
    with database(db_kind, tmp_path) as url:
        with serve(data_dir, url, "first") as (c, proc):
            done = submit(c, onnx_job_files, "model", name="finished-before")
            slow = submit(c, onnx_job_files, "slow", name="interrupted", latency=SLOW_LATENCY)
            finished = wait_for(c, done, lambda j: j["state"] == "succeeded", 120)
            wait_for(c, slow, lambda j: j["stage"] == "latency", 120)
            artifacts = c.get(f"/v1/jobs/{done}/artifacts").json()["artifacts"]
            proc.kill()  # kill -9 of the API process alone
            proc.wait()
            # its job and fork server notice and exit: nothing computes for nobody
            deadline = time.monotonic() + 20
            while live_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not live_members(proc.pid), "orphaned job processes outlived the API"

        restarted = "first" if same_name else "second"
        with serve(data_dir, url, restarted) as (c, _):
            # the interrupted job runs again (same name: at start-up; new name: once its
            # heartbeat is STALE_AFTER_S old), on the restarted instance
            job = wait_for(c, slow, lambda j: j["attempts"] == 2 and j["state"] == "running",
                           STALE_AFTER_S + 60)
            assert c.get(f"/v1/jobs/{slow}/log").text.count("attempt 2 started") == 1
            # the job that had finished keeps its state and artifacts, byte for byte
            assert c.get(f"/v1/jobs/{done}").json()["state"] == finished["state"]
            again = c.get(f"/v1/jobs/{done}/artifacts").json()["artifacts"]
            assert [(a["name"], a["sha256"]) for a in again] == [
                (a["name"], a["sha256"]) for a in artifacts]
            # and the service takes new work beside the rerun
            new = submit(c, onnx_job_files, "model", name="after-restart")
            assert wait_for(c, new, lambda j: j["state"] in ("succeeded", "failed"),
                            120)["state"] == "succeeded"
            r = c.post(f"/v1/jobs/{slow}/cancel")
            assert r.status_code == 202, r.text
            job = wait_for(c, slow, lambda j: j["state"] == "cancelled", 30)
            assert job["attempts"] == 2
            listed = c.get("/v1/jobs").json()
            assert {j["id"] for j in listed["jobs"]} == {done, slow, new}
