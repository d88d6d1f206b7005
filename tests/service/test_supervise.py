"""The one supervision loop (``service.supervise``) that the local runner and the Ray task share,
on plain child processes (no library, a few seconds), and the redaction of server paths."""

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from service import ray_task, runner
from service.redact import redact_error, redact_paths
from service.supervise import (
    CANCELLED,
    LOST,
    MEMORY,
    MIB,
    NO_RESULT,
    TIMEOUT,
    Limits,
    supervise,
    tree_rss_bytes,
)

CTX = mp.get_context("fork")  # the children below only run the functions of this file


class FakeStore:
    """The one store call the loop makes; ``running=False`` once another instance took it."""

    def __init__(self, running: bool = True):
        self.running = running
        self.updates = []

    def update_running(self, job_id, **values):
        self.updates.append((time.monotonic(), values))
        return self.running


def _reports(conn):
    for i in range(3):
        conn.send(("progress", "passes", (i + 1) / 4, f"step {i}"))
        time.sleep(0.3)
    conn.send(("result", {"exit_code": 0, "gate_passed": True, "gate_failures": []}))
    conn.close()


def _sleeps(conn):
    time.sleep(60)


def _allocates(conn):
    hoard = bytearray(400 * MIB)
    hoard[:: 4096] = b"x" * len(hoard[:: 4096])  # touch every page: resident, not only mapped
    time.sleep(60)


def _dies(conn):
    os._exit(3)


def run(target, store=None, stop=lambda: None, **limits):
    recv, send = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=target, args=(send,))
    proc.start()
    send.close()
    started = time.monotonic()
    outcome, payload = supervise(proc, recv, store or FakeStore(), "job", Limits(**limits), stop)
    recv.close()
    return outcome, payload, proc, time.monotonic() - started


def test_progress_is_relayed_and_the_result_returned():
    store = FakeStore()
    outcome, payload, proc, _ = run(_reports, store, heartbeat_s=0.2)
    assert (outcome, payload["gate_passed"], proc.exitcode) == ("result", True, 0)
    stages = [v for _, v in store.updates if v]
    assert stages and stages[-1]["stage"] == "passes" and stages[-1]["progress"] >= 0.5


def test_limits_and_stop_reasons_kill_the_child():
    outcome, _, proc, took = run(_sleeps, timeout_s=0.5, cancel_grace_s=0.5)
    assert outcome == TIMEOUT and not proc.is_alive() and took < 5

    asked = time.monotonic() + 0.5
    outcome, _, proc, took = run(_sleeps, stop=lambda: CANCELLED if time.monotonic() > asked
                                 else None)
    assert outcome == CANCELLED and not proc.is_alive() and took < 5

    # another instance requeued the job (its heartbeat write finds it no longer running)
    outcome, _, proc, took = run(_sleeps, FakeStore(running=False), heartbeat_s=0.2)
    assert outcome == LOST and not proc.is_alive() and took < 5

    outcome, _, proc, _ = run(_dies)
    assert (outcome, proc.exitcode) == (NO_RESULT, 3)


def test_memory_limit_counts_the_resident_memory_of_the_process_tree():
    idle = CTX.Process(target=_sleeps, args=(None,))
    idle.start()
    time.sleep(0.5)
    base = tree_rss_bytes(idle.pid)  # what a forked child holds before it allocates
    idle.kill()
    idle.join()
    assert 0 < base < 2000 * MIB
    outcome, _, proc, took = run(_allocates, memory_bytes=base + 200 * MIB, cancel_grace_s=0.5)
    assert outcome == MEMORY and not proc.is_alive() and took < 20
    assert tree_rss_bytes(proc.pid) == 0  # gone


def test_local_runner_and_ray_task_share_the_loop():
    # one loop: neither module keeps a copy of the progress/heartbeat constants or its own loop
    for module in (runner, ray_task):
        assert module.supervise is supervise
        assert not hasattr(module, "PROGRESS_WRITE_INTERVAL_S")
    assert not hasattr(runner.LocalProcessRunner, "_supervise")


@pytest.mark.parametrize(("text", "expected"), [
    ("Data of TensorProto ( tensor name: w0) should be stored in {job}/inputs/w.bin, but it "
     "doesn't exist", "should be stored in inputs/w.bin, but"),
    ("[Errno 28] No space left on device: '{data}/tenants/x/jobs/y/artifacts/model.onnx'",
     "device: '.../model.onnx'"),
    ('File "/usr/lib/python3.11/site-packages/onnx/checker.py", line 3', '".../checker.py"'),
])
def test_redact_paths(tmp_path, text, expected):
    job, data = tmp_path / "data/tenants/t/jobs/j", tmp_path / "data"
    out = redact_paths(text.format(job=job, data=data), job)
    assert expected in out and str(tmp_path) not in out and "/usr/lib" not in out


def test_redact_keeps_routes_urls_and_relative_paths():
    text = "see GET /v1/jobs/abc, http://host/a/b, reference:digits-vit/calib.npz, a/b, 3/4"
    assert redact_paths(text) == text
    assert redact_error({"errors": [{"loc": "model", "msg": "/srv/d/x.onnx"}], "n": 1}) == {
        "errors": [{"loc": "model", "msg": ".../x.onnx"}], "n": 1}
    assert redact_paths(str(Path("/srv/data/jobs/j")), Path("/srv/data/jobs/j")) == "."
