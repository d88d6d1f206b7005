"""Workers: concurrency, cancellation, a crashed job process, and a restart with queued jobs,
on SQLite and PostgreSQL."""

import hashlib
import os
import signal
import threading
import time
from datetime import timedelta

from sqlalchemy import update

from service.store import Job, JobStore, utcnow
from tests.service.conftest import (
    AUTH_A,
    SLOW_LATENCY,
    job_files,
    make_settings,
    onnx_recipe,
    running_service,
    wait_for,
)


def submit(client, files, recipe, model="model"):
    r = client.post("/v1/jobs", headers=AUTH_A, files=job_files(files, model),
                    data={"recipe": recipe})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def running_pid(client, job_id: str, timeout: float = 60) -> int:
    """Wait until the job's process runs its latency stage; returns the process id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.app.state.store.get("tenant-a", job_id)
        if job.state == "running" and job.pid and job.stage == "latency":
            return job.pid
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached its latency stage")


def process_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_ten_jobs_on_two_workers_all_finish(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=2)) as c:
        ids, lock = [], threading.Lock()

        def post(i):
            job_id = submit(c, onnx_job_files, onnx_recipe(name=f"job-{i}"))
            with lock:
                ids.append(job_id)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 10
        jobs = [wait_for(c, i, timeout=120) for i in ids]
        assert [j["state"] for j in jobs] == ["succeeded"] * 10, [j["error"] for j in jobs]
        assert all(j["attempts"] == 1 for j in jobs)  # each ran exactly once
        listed = c.get("/v1/jobs", headers=AUTH_A, params={"limit": 100}).json()
        assert listed["total"] == 10 and {j["id"] for j in listed["jobs"]} == set(ids)
        assert sorted(j["name"] for j in jobs) == sorted(f"job-{i}" for i in range(10))
        # never more than two at once: intervals from the store's start and end times
        spans = [(j["started_at"], j["finished_at"]) for j in jobs]
        for start, _ in spans:
            overlapping = sum(s <= start < e for s, e in spans)
            assert overlapping <= 2
        # every job's artifacts are in place and match their checksums
        store = c.app.state.store
        settings = c.app.state.settings
        for job_id in ids:
            job = store.get("tenant-a", job_id)
            folder = settings.job_dir("tenant-a", job_id) / "artifacts"
            for a in job.artifacts:
                assert hashlib.sha256((folder / a["name"]).read_bytes()).hexdigest() == a["sha256"]
            assert not list(folder.parent.glob(".tmp-*"))


def test_cancel_queued_and_running_jobs(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=1)) as c:
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        queued = submit(c, onnx_job_files, onnx_recipe())
        pid = running_pid(c, slow)

        r = c.post(f"/v1/jobs/{queued}/cancel", headers=AUTH_A)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = c.delete(f"/v1/jobs/{slow}", headers=AUTH_A)
        assert r.status_code == 409 and "cancel it first" in r.json()["error"]["message"]

        followed = []  # a log stream opened while the job runs ends when the job does
        follower = threading.Thread(target=lambda: followed.append(c.get(
            f"/v1/jobs/{slow}/log", headers=AUTH_A, params={"follow": True}).text))
        follower.start()
        time.sleep(0.5)
        assert not followed
        r = c.post(f"/v1/jobs/{slow}/cancel", headers=AUTH_A)
        assert r.status_code == 202 and r.json()["cancel_requested"]
        follower.join(timeout=20)
        assert "latency" in followed[0] and "cancelled: worker process killed" in followed[0]
        job = wait_for(c, slow, timeout=20)
        assert job["state"] == "cancelled" and job["exit_code"] == 1
        assert process_gone(pid), "the job's process still runs after cancel"
        assert c.post(f"/v1/jobs/{slow}/cancel", headers=AUTH_A).status_code == 409
        folder = c.app.state.settings.job_dir("tenant-a", slow)
        assert not (folder / "artifacts").exists() and not list(folder.glob(".tmp-*"))
        assert "cancelled" in c.get(f"/v1/jobs/{slow}/log", headers=AUTH_A).text

        assert c.delete(f"/v1/jobs/{slow}", headers=AUTH_A).status_code == 204
        assert not folder.exists()
        assert c.get(f"/v1/jobs/{slow}", headers=AUTH_A).status_code == 404
        assert c.delete(f"/v1/jobs/{slow}", headers=AUTH_A).status_code == 404


def test_worker_crash_fails_the_job_and_the_service_stays_up(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=1)) as c:
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        pid = running_pid(c, slow)
        os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
        job = wait_for(c, slow, timeout=20)
        assert job["state"] == "failed" and job["exit_code"] == 1
        assert job["error"]["type"] == "WorkerCrashed"
        assert "killed by SIGKILL" in job["error"]["message"]
        assert "out of memory" in job["error"]["message"]
        assert c.get("/readyz").status_code == 200
        after = wait_for(c, submit(c, onnx_job_files, onnx_recipe()))
        assert after["state"] == "succeeded"


def test_restart_requeues_interrupted_and_runs_queued_jobs(tmp_path, db_url, onnx_job_files):
    settings = make_settings(tmp_path, db_url, workers=0)  # an API that takes jobs, runs none
    with running_service(settings) as c:
        store: JobStore = c.app.state.store

        def submit_and_claim(instance):
            job_id = submit(c, onnx_job_files, onnx_recipe())
            assert store.claim_next(instance).id == job_id
            return job_id

        # running when the service died: claimed, never finished
        interrupted = submit_and_claim(settings.instance)
        cancelled = submit_and_claim(settings.instance)
        store.cancel("tenant-a", cancelled)  # cancel asked while it ran, then the service died
        other = submit_and_claim("another-instance")  # runs on another, live instance
        dead = submit_and_claim("dead-instance")  # its instance died: no heartbeat for long
        with store.session.begin() as s:
            s.execute(update(Job).where(Job.id == dead).values(
                updated_at=utcnow() - timedelta(seconds=settings.stale_after_s + 1)))
        ids = [interrupted, dead] + [submit(c, onnx_job_files, onnx_recipe()) for _ in range(2)]
    restarted = make_settings(tmp_path, db_url, workers=2)
    with running_service(restarted) as c:
        jobs = [wait_for(c, i) for i in ids]
        assert [j["state"] for j in jobs] == ["succeeded"] * 4
        assert [j["attempts"] for j in jobs] == [2, 2, 1, 1]
        assert "attempt 2 started" in c.get(f"/v1/jobs/{ids[0]}/log", headers=AUTH_A).text
        assert c.get(f"/v1/jobs/{cancelled}", headers=AUTH_A).json()["state"] == "cancelled"
        assert c.get(f"/v1/jobs/{other}", headers=AUTH_A).json()["state"] == "running"


def test_stop_requeues_running_job(tmp_path, db_url, onnx_job_files):
    settings = make_settings(tmp_path, db_url, workers=1)
    with running_service(settings) as c:
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        pid = running_pid(c, slow)
    assert process_gone(pid)
    store = JobStore(settings.db_url)
    try:
        job = store.get("tenant-a", slow)
        assert job.state == "queued" and "service stopped" in job.message
        assert not list(settings.job_dir("tenant-a", slow).glob(".tmp-*"))
    finally:
        store.close()


def test_job_timeout_kills_and_fails_the_job(tmp_path, onnx_job_files):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=1,
                             job_timeout_s=2.0)
    with running_service(settings) as c:
        slow = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        pid = running_pid(c, slow)
        job = wait_for(c, slow, timeout=30)
        assert job["state"] == "failed" and job["error"]["type"] == "TimeoutError"
        assert "job_timeout_s=2" in job["error"]["message"]
        assert process_gone(pid)


def test_memory_limit_fails_the_job_and_the_service_stays_up(tmp_path, onnx_job_files):
    # 64 MiB is less than the preloaded library alone: the job's process is over at once
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=1,
                             job_memory_mb=64)
    with running_service(settings) as c:
        job = wait_for(c, submit(c, onnx_job_files, onnx_recipe()), timeout=60)
        assert (job["state"], job["exit_code"]) == ("failed", 1)
        assert job["error"]["type"] == "MemoryLimitExceeded"
        assert "ran out of its memory limit of 64 MiB" in job["error"]["message"]
        assert "ran out of its memory limit" in c.get(f"/v1/jobs/{job['id']}/log",
                                                      headers=AUTH_A).text
        assert c.get("/readyz").status_code == 200
        c.app.state.settings.job_memory_mb = 0  # the same worker runs the next job unlimited
        after = wait_for(c, submit(c, onnx_job_files, onnx_recipe()))
        assert after["state"] == "succeeded", after["error"]


def test_default_time_and_memory_limits():
    from service.runner import job_limits
    from service.settings import Settings

    settings = Settings()
    assert (settings.job_timeout_s, settings.job_memory_mb) == (7200, 16384)
    limits = job_limits(settings)
    assert (limits.timeout_s, limits.memory_bytes) == (7200, 16384 << 20)
    assert limits.heartbeat_s == 10 and settings.stale_after_s >= 3 * limits.heartbeat_s
    # a short stale_after_s brings the heartbeat down with it
    assert job_limits(Settings(stale_after_s=6)).heartbeat_s == 2
    unlimited = job_limits(Settings(job_timeout_s=0, job_memory_mb=0))
    assert (unlimited.timeout_s, unlimited.memory_bytes) == (None, None)


def test_job_errors_carry_no_server_path(tmp_path, db_url, onnx_job_files):
    import json

    import onnx

    # an ONNX model whose weights live in an external file that was not uploaded
    model = onnx.load(str(onnx_job_files["model"]))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(model, str(ext / "m.onnx"), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    settings = make_settings(tmp_path, db_url, workers=1)
    secret = str(settings.data_dir.resolve())
    with running_service(settings) as c:
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": onnx_recipe()},
                   files={"model": ("m.onnx", open(ext / "m.onnx", "rb")),
                          "eval": ("e.npz", open(onnx_job_files["eval"], "rb"))})
        job = wait_for(c, r.json()["id"])
        assert job["state"] == "failed" and job["error"]["message"]
        assert secret not in json.dumps(job) and str(tmp_path) not in json.dumps(job)

        # whatever a library puts in its message, the job's error is scrubbed on the way in
        from service.runner import conclude_job

        store = c.app.state.store
        job_id = submit(c, onnx_job_files, onnx_recipe(latency=SLOW_LATENCY), model="slow")
        running_pid(c, job_id)
        claimed = store.get("tenant-a", job_id)
        job_dir = settings.job_dir("tenant-a", job_id)
        payload = {"type": "OSError", "exit_code": 1,
                   "message": f"cannot open {job_dir}/inputs/w.bin or /opt/models/secret.bin",
                   "errors": [{"loc": "model", "msg": f"see {job_dir.resolve()}/x"}]}
        conclude_job(store, settings, claimed, "error", payload, job_dir / ".tmp-x", job_dir,
                     job_dir / "job.log", 1)
        shown = c.get(f"/v1/jobs/{job_id}", headers=AUTH_A).json()
        assert shown["error"]["message"] == "cannot open inputs/w.bin or .../secret.bin"
        assert shown["error"]["errors"] == [{"loc": "model", "msg": "see x"}]
        assert shown["message"] == shown["error"]["message"]


def test_downloads_carry_no_server_path(tmp_path, onnx_job_files):
    import hashlib
    import json

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=1)
    with running_service(settings) as c:
        job_id = submit(c, onnx_job_files, onnx_recipe([{"type": "ort_quantize"}]))
        assert wait_for(c, job_id)["state"] == "succeeded"
        url = f"/v1/jobs/{job_id}"
        report = c.get(f"{url}/report", headers=AUTH_A)
        # the library records the inputs it read; the tenant sees them relative to the job
        recorded = json.loads(report.text)["data"]["calibration"]["path"]
        assert recorded in ("inputs/calib.npz", "calib.npz"), recorded
        arts = c.get(f"{url}/artifacts", headers=AUTH_A).json()["artifacts"]
        for a in arts:  # rewritten before the checksums were taken
            got = c.get(a["url"], headers=AUTH_A)
            assert hashlib.sha256(got.content).hexdigest() == a["sha256"]
        texts = [report.text, c.get(f"{url}/report.html", headers=AUTH_A).text,
                 c.get(f"{url}/artifacts/recipe.yaml", headers=AUTH_A).text,
                 c.get(f"{url}/log", headers=AUTH_A).text,
                 c.get(f"{url}/log", headers=AUTH_A, params={"follow": True}).text]
        for text in texts:
            assert str(tmp_path) not in text and "/tenants/" not in text
