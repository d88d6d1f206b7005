"""Jobs whose runner died: every instance's periodic check requeues them (or fails them once
their attempts are used up), whatever the dead instance was called; on SQLite and PostgreSQL."""

import time
from datetime import timedelta

from sqlalchemy import update

from service.store import Job, JobStore, utcnow
from service.sweeper import StaleJobSweeper
from tests.service.conftest import AUTH_A, make_settings, onnx_recipe, running_service, wait_for
from tests.service.test_runner import submit


def age(store: JobStore, job_id: str, seconds: float, **values) -> None:
    """Move the job's heartbeat ``seconds`` into the past (its runner stopped beating)."""
    with store.session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            updated_at=utcnow() - timedelta(seconds=seconds), **values))


def test_api_back_under_another_instance_name_requeues_the_job(tmp_path, db_url,
                                                               onnx_job_files):
    # The API dies while a job runs and comes back as a new container (a new host name) before
    # the heartbeat is stale: the start-up check does not touch it, the periodic one must.
    old = make_settings(tmp_path, db_url, workers=0, instance="host-1")
    with running_service(old) as c:
        job_id = submit(c, onnx_job_files, onnx_recipe())
        assert c.app.state.store.claim_next("host-1").id == job_id
    new = make_settings(tmp_path, db_url, workers=1, instance="host-2", stale_after_s=30,
                        stale_check_interval_s=0.2)
    with running_service(new) as c:
        store = c.app.state.store
        time.sleep(1.0)
        job = store.get("tenant-a", job_id)
        assert (job.state, job.instance) == ("running", "host-1")  # fresh heartbeat: left alone
        age(store, job_id, 31)
        done = wait_for(c, job_id, timeout=40)
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        log = c.get(f"/v1/jobs/{job_id}/log", headers=AUTH_A).text
        assert "attempt 2 started on host-2" in log


def test_sweep_requeues_fails_after_max_attempts_and_cancels(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url, stale_after_s=60, job_max_attempts=3)
    store = JobStore(settings.db_url)
    try:
        def running(instance: str, attempts: int, stale: bool = True) -> str:
            job = store.create("tenant-a", name="j", recipe_yaml=onnx_recipe(), inputs={})
            assert store.claim_next(instance).id == job.id
            age(store, job.id, 61 if stale else 5, attempts=attempts)
            return job.id

        requeue = running("gone-1", attempts=1)
        give_up = running("gone-2", attempts=3)
        cancel = running("gone-3", attempts=1)
        store.cancel("tenant-a", cancel)
        age(store, cancel, 61)  # the cancel flag moved updated_at; its runner died after it
        alive = running("alive", attempts=1, stale=False)
        woken = []
        sweeper = StaleJobSweeper(store, settings, on_requeued=lambda: woken.append(1))
        assert sweeper.sweep() == [requeue]
        assert woken == [1]

        job = store.get("tenant-a", requeue)
        assert (job.state, job.instance, job.pid) == ("queued", None, None)
        assert "no heartbeat for 60 s" in job.message
        job = store.get("tenant-a", give_up)
        assert (job.state, job.exit_code, job.error["type"]) == ("failed", 1, "WorkerLost")
        assert "started 3 times" in job.error["message"]
        assert "job_max_attempts=3" in job.message
        assert store.get("tenant-a", cancel).state == "cancelled"
        assert store.get("tenant-a", alive).state == "running"
        assert sweeper.sweep() == []  # nothing is swept twice
    finally:
        store.close()


def test_periodic_check_runs_in_the_background(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", stale_after_s=60,
                             stale_check_interval_s=0.1)
    store = JobStore(settings.db_url)
    sweeper = StaleJobSweeper(store, settings)
    try:
        job = store.create("tenant-a", name="j", recipe_yaml=onnx_recipe(), inputs={})
        store.claim_next("gone")
        sweeper.start()
        age(store, job.id, 61)
        deadline = time.monotonic() + 5
        while store.get("tenant-a", job.id).state != "queued":
            assert time.monotonic() < deadline, "the periodic check never requeued the job"
            time.sleep(0.05)
    finally:
        sweeper.stop()
        store.close()
