"""Hostile inputs that only a running job meets, and faults while jobs run, on a service with
two workers: pickle that upload checks cannot see (a zip .pth, object arrays in .npz/.npy),
script in report text, another tenant's finished job, kill -9 of a job process, cancel while
running, ENOSPC while artifacts are written, and jobs submitted all at once."""

import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import yaml

from tests.security.conftest import TENANTS, Service, database, error_of, make_settings
from tests.security.test_uploads import RunsCode
from tests.service.conftest import SLOW_LATENCY, onnx_recipe
from tests.service.test_runner import process_gone

MARKER_NAME = "job-code-ran"
FINISHED = ("succeeded", "gate_failed", "failed", "cancelled")


@pytest.fixture(scope="module")
def jobs_api(db_kind, tmp_path_factory):
    from fastapi.testclient import TestClient

    from service.app import create_app

    root = tmp_path_factory.mktemp(f"jobs_{db_kind}")
    with database(db_kind, root) as url:
        settings = make_settings(root, url, workers=2)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield Service(client, settings, db_kind, root)


def submit(api, recipe: str, files: dict, who: str = "a") -> str:
    r = api.client.post("/v1/jobs", headers=api.headers(who), data={"recipe": recipe},
                        files=files)
    assert r.status_code == 202, r.text
    api.assert_no_leak(r.text, who)
    return r.json()["id"]


def wait(api, job_id: str, who: str = "a", states=FINISHED, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers(who)).json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")


def wait_stage(api, job_id: str, stage: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.client.get(f"/v1/jobs/{job_id}", headers=api.headers()).json()
        if job["state"] == "running" and job["stage"] == stage:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached stage {stage}")


def tiny_files(files: dict, model: str = "model") -> dict:
    return {"model": ("model.onnx", files[model].read_bytes()),
            "calib": ("calib.npz", files["calib"].read_bytes()),
            "eval": ("eval.npz", files["eval"].read_bytes())}


def assert_clean_failure(api, job: dict, error_type: str | tuple, *needles, exit_code: int):
    """A failed job says why, in words a tenant can act on, without server paths."""
    assert job["state"] == "failed" and job["exit_code"] == exit_code, job
    types = error_type if isinstance(error_type, tuple) else (error_type,)
    assert job["error"]["type"] in types, job["error"]
    text = (job["error"]["message"] + " " + job["message"]).lower()
    for n in needles:
        options = n if isinstance(n, tuple) else (n,)
        assert any(o.lower() in text for o in options), (options, job["error"])
    import json

    api.assert_no_leak(json.dumps(job))
    log = api.client.get(f"/v1/jobs/{job['id']}/log", headers=api.headers())
    assert log.status_code == 200


# ----------------------------------------------------------------- pickle inside a job

def test_zip_pth_with_code_in_its_pickle_never_runs(jobs_api, tmp_path):
    """A .pth in torch.save's zip format passes the upload check; the worker reads it with
    weights_only=True, which refuses the os.system global: bad input (exit 2), no code ran."""
    marker = tmp_path / MARKER_NAME
    pth = tmp_path / "model.pth"
    torch.save({"pos_embed": RunsCode(marker)}, pth)
    recipe = yaml.safe_dump({"version": 1, "name": "evil-pth",
                             "model": {"source": "timm", "name": "test_vit"},
                             "evaluation": {"latency": {"enabled": False}}})
    job = wait(jobs_api, submit(jobs_api, recipe, {"model": ("model.pth", pth.read_bytes())}))
    assert_clean_failure(jobs_api, job, "ModelLoadError", ("weights_only", "state dict",
                                                           "safetensors"), exit_code=2)
    assert not marker.exists(), "unpickling the upload ran its code"


@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_object_arrays_in_data_files_never_unpickle(jobs_api, onnx_job_files, fmt, tmp_path):
    marker = tmp_path / MARKER_NAME
    arr = np.array([RunsCode(marker), 1], dtype=object)
    path = tmp_path / f"evil.{fmt}"
    if fmt == "npz":
        np.savez(path, x=arr)
    else:
        np.save(path, arr, allow_pickle=True)
    files = tiny_files(onnx_job_files)
    files["eval"] = (path.name, path.read_bytes())
    job = wait(jobs_api, submit(jobs_api, onnx_recipe(name=f"evil-{fmt}"), files))
    assert_clean_failure(jobs_api, job, "DataError", "pickle", exit_code=2)
    assert not marker.exists(), "loading the data ran its code"


# ------------------------------------------------------- a finished job: escaping, tenants

XSS_NAME = "<script>document.title='pwned'</script>"
XSS_DESCRIPTION = "<img src=x onerror=\"alert(1)\">"


@pytest.fixture(scope="module")
def finished_job(jobs_api, onnx_job_files) -> str:
    """Tenant A's succeeded job whose recipe name and description carry markup."""
    recipe = yaml.safe_load(onnx_recipe(name=XSS_NAME))
    recipe["description"] = XSS_DESCRIPTION
    job_id = submit(jobs_api, yaml.safe_dump(recipe), tiny_files(onnx_job_files))
    job = wait(jobs_api, job_id)
    assert job["state"] == "succeeded", job
    return job_id


def test_report_html_escapes_recipe_text(jobs_api, finished_job):
    """Defect 4: a downloaded report opened in a browser must not run the recipe's markup."""
    r = jobs_api.client.get(f"/v1/jobs/{finished_job}/report.html", headers=jobs_api.headers())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert XSS_NAME not in r.text and "<img src=x" not in r.text
    assert "&lt;script&gt;" in r.text


def test_report_json_is_strict_json(jobs_api, finished_job):
    import json

    r = jobs_api.client.get(f"/v1/jobs/{finished_job}/report", headers=jobs_api.headers())
    assert r.status_code == 200
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"report.json holds bare {c}"))


@pytest.mark.parametrize("suffix", ["/report", "/report.html", "/artifacts/recipe.yaml",
                                    "/artifacts", "/log", ""])
def test_results_never_show_server_paths(jobs_api, finished_job, suffix):
    """What a tenant downloads names its inputs, never where the server keeps them (new
    defect: report.json's recipe and data sections and report.html carry the absolute path of
    the job's uploaded inputs)."""
    r = jobs_api.client.get(f"/v1/jobs/{finished_job}{suffix}", headers=jobs_api.headers())
    assert r.status_code == 200, r.text
    jobs_api.assert_no_leak(r.text)


ROUTES = [("GET", ""), ("GET", "/log"), ("POST", "/cancel"), ("DELETE", ""),
          ("GET", "/report"), ("GET", "/report.html"), ("GET", "/artifacts"),
          ("GET", "/artifacts/model.onnx"), ("GET", "/artifacts/report.json")]


@pytest.mark.parametrize("method,suffix", ROUTES, ids=[" ".join(r) for r in ROUTES])
def test_other_tenant_cannot_reach_a_finished_job(jobs_api, finished_job, method, suffix):
    """The owner reads every result; tenant B gets the answer a random id gets."""
    missing = uuid.uuid4().hex
    theirs = jobs_api.client.request(method, f"/v1/jobs/{finished_job}{suffix}",
                                     headers=TENANTS["b"][1])
    nothing = jobs_api.client.request(method, f"/v1/jobs/{missing}{suffix}",
                                      headers=TENANTS["b"][1])
    error_of(theirs, 404)
    assert theirs.text.replace(finished_job, missing) == nothing.text
    jobs_api.assert_no_leak(theirs.text.replace(finished_job, missing), who="b")
    if method == "GET":
        own = jobs_api.client.get(f"/v1/jobs/{finished_job}{suffix}", headers=jobs_api.headers())
        assert own.status_code == 200
    job = jobs_api.client.get(f"/v1/jobs/{finished_job}", headers=jobs_api.headers()).json()
    assert job["state"] == "succeeded" and job["links"].get("report")


# --------------------------------------------------------------------------- faults

def job_pid(api, job_id: str) -> int:
    # The pid is not part of the API; the store that the app was built with knows it.
    return api.client.app.state.store.get("tenant-a", job_id).pid


def test_kill_9_of_a_job_process_fails_that_job_only(jobs_api, onnx_job_files):
    slow = submit(jobs_api, onnx_recipe(latency=SLOW_LATENCY, name="slow"),
                  tiny_files(onnx_job_files, "slow"))
    wait_stage(jobs_api, slow, "latency")
    other = submit(jobs_api, onnx_recipe(name="bystander"), tiny_files(onnx_job_files), who="b")
    os.kill(job_pid(jobs_api, slow), signal.SIGKILL)  # what the OOM killer does
    job = wait(jobs_api, slow, timeout=30)
    assert_clean_failure(jobs_api, job, "WorkerCrashed", "SIGKILL", exit_code=1)
    assert jobs_api.client.get("/readyz").status_code == 200
    assert wait(jobs_api, other, who="b")["state"] == "succeeded"  # the bystander is unharmed


def test_cancel_while_running_stops_the_process(jobs_api, onnx_job_files):
    slow = submit(jobs_api, onnx_recipe(latency=SLOW_LATENCY, name="slow"),
                  tiny_files(onnx_job_files, "slow"))
    wait_stage(jobs_api, slow, "latency")
    pid = job_pid(jobs_api, slow)
    r = jobs_api.client.post(f"/v1/jobs/{slow}/cancel", headers=jobs_api.headers())
    assert r.status_code == 202 and r.json()["cancel_requested"], r.text
    job = wait(jobs_api, slow, timeout=30)
    assert job["state"] == "cancelled"
    assert process_gone(pid), "the cancelled job's process still runs"
    error_of(jobs_api.client.post(f"/v1/jobs/{slow}/cancel", headers=jobs_api.headers()), 409,
             "already finished")
    error_of(jobs_api.client.get(f"/v1/jobs/{slow}/report", headers=jobs_api.headers()), 409,
             "without results")
    assert jobs_api.client.delete(f"/v1/jobs/{slow}", headers=jobs_api.headers()).status_code \
        == 204
    assert not jobs_api.settings.job_dir("tenant-a", slow).exists()


def plant_full_disk(api, job_id: str, names: list[str], stop: threading.Event) -> None:
    """As soon as the job's output folder exists, its files ``names`` become links to
    /dev/full, where every write fails with ENOSPC: a disk that fills while artifacts are
    written, without root or a tiny file system."""
    folder = api.settings.job_dir("tenant-a", job_id)
    while not stop.is_set():
        for out in folder.glob(".tmp-*"):
            for name in names:
                try:
                    (out / name).symlink_to("/dev/full")
                except (FileExistsError, FileNotFoundError):
                    pass
            return
        time.sleep(0.005)


@pytest.mark.parametrize("where,files", [("job", ["recipe.yaml", "report.json", "report.html"]),
                                         ("publish", ["SHA256SUMS"])])
def test_disk_full_while_writing_artifacts(jobs_api, onnx_job_files, where, files):
    """ENOSPC in the job (its report) or in the runner (the checksum list): the job fails
    with the reason, no half-published artifacts, and the service takes the next job."""
    latency = {"batch_sizes": [8], "repeats": 300, "warmup": 0}  # a few seconds to plant
    job_id = submit(jobs_api, onnx_recipe(latency=latency, name=f"enospc-{where}"),
                    tiny_files(onnx_job_files))
    stop = threading.Event()
    planter = threading.Thread(target=plant_full_disk, args=(jobs_api, job_id, files, stop))
    planter.start()
    try:
        job = wait(jobs_api, job_id, timeout=120)
    finally:
        stop.set()
        planter.join()
    assert_clean_failure(jobs_api, job, ("OSError", "StorageError", "DiskFullError"),
                         ("no space left", "disk is full", "enospc"), exit_code=1)
    folder = jobs_api.settings.job_dir("tenant-a", job_id)
    assert not (folder / "artifacts").exists() and not list(folder.glob(".tmp-*"))
    error_of(jobs_api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=jobs_api.headers()),
             409)
    assert jobs_api.client.get("/readyz").status_code == 200
    after = submit(jobs_api, onnx_recipe(name="after-enospc"), tiny_files(onnx_job_files))
    assert wait(jobs_api, after)["state"] == "succeeded"


def test_jobs_submitted_at_once_all_run_once(jobs_api, onnx_job_files):
    """Six jobs from two tenants posted in parallel: six ids, each listed by its owner only,
    each run exactly once to success."""
    ids: dict[str, list[str]] = {"a": [], "b": []}
    lock = threading.Lock()

    def post(who: str, i: int) -> None:
        job_id = submit(jobs_api, onnx_recipe(name=f"burst-{who}-{i}"),
                        tiny_files(onnx_job_files), who=who)
        with lock:
            ids[who].append(job_id)

    threads = [threading.Thread(target=post, args=(who, i)) for who in "ab" for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids["a"] + ids["b"])) == 6
    for who, mine in ids.items():
        jobs = [wait(jobs_api, j, who=who) for j in mine]
        assert [(j["state"], j["attempts"]) for j in jobs] == [("succeeded", 1)] * 3, jobs
        listed = jobs_api.job_ids(who)
        assert set(mine) <= listed
        assert not listed & set(ids["b" if who == "a" else "a"])
