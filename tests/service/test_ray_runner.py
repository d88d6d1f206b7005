"""The Ray backend: jobs submitted to the service run as tasks on a real two-node Ray cluster on
loopback and finish; a Ray worker killed mid-job makes the job run again (retry policy) or fail
with the reason, and nothing is lost; cancellation and GPU placement."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from service.ray_runner import job_resources
from service.settings import Settings
from tests.service.conftest import (
    AUTH_A,
    SLOW_LATENCY,
    make_settings,
    onnx_recipe,
    running_service,
    wait_for,
)
from tests.service.test_runner import process_gone, submit

ROOT = Path(__file__).resolve().parents[2]


def test_job_resources_from_recipe_and_settings():
    s = Settings(ray_num_cpus=2, ray_num_gpus=0.5)
    assert job_resources("version: 1\ndevice: auto\n", s) == {"num_cpus": 2, "num_gpus": 0.5}
    assert job_resources("version: 1\ndevice: cuda\n", s) == {"num_cpus": 2, "num_gpus": 1.0}
    assert job_resources("version: 1\ndevice: cpu\n", s) == {"num_cpus": 2, "num_gpus": 0.0}
    assert job_resources("version: 1\n", Settings(ray_num_gpus=2))["num_gpus"] == 2


def test_serve_selects_the_ray_runner(tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner

    from compress.cli import main
    from service.ray_runner import RayRunner
    from service.runner import LocalProcessRunner, make_runner

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--token",
                                       "t:a", "--runner", "ray", "--ray-address", "head:6379"])
    assert result.exit_code == 0, result.output
    settings = seen["app"].state.settings
    assert settings.runner == "ray" and settings.ray_address == "head:6379"
    assert "on Ray (head:6379)" in result.output
    assert isinstance(make_runner(None, settings), RayRunner)
    assert isinstance(make_runner(None, Settings()), LocalProcessRunner)
    monkeypatch.setenv("COMPRESS_SERVICE_RUNNER", "ray")
    monkeypatch.setenv("COMPRESS_SERVICE_RAY_MAX_RETRIES", "3")
    assert Settings().runner == "ray" and Settings().ray_max_retries == 3
    bad = CliRunner().invoke(main, ["serve", "--runner", "spark"])
    assert bad.exit_code == 2


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a second node, one CPU each, on this machine; shut down after the module."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    old = os.environ.get("PYTHONPATH")
    # Ray workers import the service from this checkout (an installed package needs nothing).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    node_args = {"num_cpus": 1, "object_store_memory": 80 << 20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def ray_settings(tmp_path, db_url, address, **kw):
    return make_settings(tmp_path, db_url, runner="ray", ray_address=address, **kw)


def running_on_ray(client, job_id: str, attempt: int = 1, timeout: float = 90,
                   stage: str | None = "latency") -> tuple[int, int]:
    """Wait for the job's ``stage`` (None: any) on the given attempt: (Ray worker pid, job pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.app.state.store.get("tenant-a", job_id)
        if (job.state == "running" and job.attempts == attempt and job.pid
                and (stage is None or job.stage == stage)):
            log = client.get(f"/v1/jobs/{job_id}/log", headers=AUTH_A).text
            m = re.findall(r"job (?:\w+): process (\d+) started", log)
            if m:
                return job.pid, int(m[-1])
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached stage {stage} on attempt {attempt}")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_jobs_run_on_the_ray_cluster_and_finish(tmp_path, db_url, ray_cluster, onnx_job_files):
    settings = ray_settings(tmp_path, db_url, ray_cluster)
    with running_service(settings) as c:
        assert c.get("/readyz").status_code == 200
        ok = submit(c, onnx_job_files, onnx_recipe([{"type": "ort_quantize"}]))
        gated = submit(c, onnx_job_files, onnx_recipe([{"type": "ort_quantize"}],
                                                      gate={"max_kl": 0.0}))
        done = {j: wait_for(c, j, timeout=120) for j in (ok, gated)}
        assert done[ok]["state"] == "succeeded" and done[ok]["exit_code"] == 0
        assert done[gated]["state"] == "gate_failed" and done[gated]["exit_code"] == 3
        pids = set()
        for job_id in (ok, gated):
            assert done[job_id]["attempts"] == 1 and done[job_id]["progress"] == 1.0
            log = c.get(f"/v1/jobs/{job_id}/log", headers=AUTH_A).text
            assert "submitted to Ray" in log and "ran on" in log, log
            pids.add(int(re.search(r"Ray worker pid (\d+)", log).group(1)))
            arts = c.get(f"/v1/jobs/{job_id}/artifacts", headers=AUTH_A).json()["artifacts"]
            names = {a["name"] for a in arts}
            assert {"model.onnx", "report.json"} <= names
            folder = settings.job_dir("tenant-a", job_id)
            assert not list(folder.glob(".tmp-*"))
            sums = (folder / "artifacts" / "SHA256SUMS").read_text()
            assert all(a["sha256"] in sums for a in arts)
        assert os.getpid() not in pids  # the jobs ran in Ray's worker processes
        report = c.get(f"/v1/jobs/{ok}/report", headers=AUTH_A).json()
        assert report["passes"][0]["type"] == "ort_quantize"

        # A job that needs a GPU on a cluster without one fails at once with the reason.
        gpu = submit(c, onnx_job_files, "device: cuda\n" + onnx_recipe())
        job = wait_for(c, gpu, timeout=30)
        assert job["state"] == "failed" and job["error"]["type"] == "ResourceError"
        assert "needs 1 GPU" in job["message"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_ray_worker_retries_or_fails_and_nothing_is_lost(tmp_path, ray_cluster,
                                                                 onnx_job_files):
    db_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = ray_settings(tmp_path, db_url, ray_cluster, ray_max_retries=1)
    medium = {"batch_sizes": [64], "repeats": 150, "warmup": 0}
    with running_service(settings) as c:
        retried = submit(c, onnx_job_files, onnx_recipe(latency=medium), model="slow")
        doomed = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")

        # attempt 1 of both: kill their Ray worker processes mid-job
        for job_id in (retried, doomed):
            worker, child = running_on_ray(c, job_id)
            os.kill(worker, signal.SIGKILL)
            assert process_gone(worker) and process_gone(child)  # no orphan computing

        job = wait_for(c, retried, timeout=120)
        assert job["state"] == "succeeded" and job["attempts"] == 2, job
        log = c.get(f"/v1/jobs/{retried}/log", headers=AUTH_A).text
        assert "requeued: the Ray worker running the job died (WorkerCrashedError) on " \
               "attempt 1" in log, log
        assert "attempt 2 ran on" in log and "finished: succeeded" in log
        assert c.get(f"/v1/jobs/{retried}/report", headers=AUTH_A).status_code == 200

        # attempt 2 of the other: killed again, out of retries -> failed with the reason
        worker, child = running_on_ray(c, doomed, attempt=2)
        os.kill(worker, signal.SIGKILL)
        job = wait_for(c, doomed, timeout=60)
        assert job["state"] == "failed" and job["attempts"] == 2
        assert job["error"]["type"] == "WorkerCrashed"
        assert "gave up after 2 attempt(s)" in job["message"], job
        log = c.get(f"/v1/jobs/{doomed}/log", headers=AUTH_A).text
        assert log.count("submitted to Ray") == 2 and "failed: the Ray worker" in log
        assert not list(settings.job_dir("tenant-a", doomed).glob(".tmp-*"))
        assert process_gone(child)

        # cancelling a running job stops it in its Ray task; that worker lives on
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        worker, child = running_on_ray(c, slow)
        assert c.post(f"/v1/jobs/{slow}/cancel", headers=AUTH_A).status_code == 202
        job = wait_for(c, slow, timeout=30)
        assert job["state"] == "cancelled" and job["attempts"] == 1
        assert process_gone(child)
        os.kill(worker, 0)  # the Ray worker is still there for the next job


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_job_timeout_on_ray_kills_the_job_and_fails_it(tmp_path, ray_cluster, onnx_job_files):
    settings = ray_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", ray_cluster,
                            job_timeout_s=4.0, workers=1)
    with running_service(settings) as c:
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        worker, child = running_on_ray(c, slow, stage=None)
        job = wait_for(c, slow, timeout=60)
        assert job["state"] == "failed" and job["error"]["type"] == "TimeoutError"
        assert "job_timeout_s=4" in job["message"] and job["attempts"] == 1
        assert process_gone(child)
        os.kill(worker, 0)  # the job's process was stopped, not its Ray worker
