"""The CLI client against a live service: submit --wait exit codes, status, logs, list,
download (checksummed), cancel, delete; and `compress serve`'s configuration."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from tests.service.conftest import SLOW_LATENCY, onnx_recipe


def run(url, *args, token="token-a"):
    result = CliRunner().invoke(main, [str(a) for a in args],
                                env={"COMPRESS_URL": url, "COMPRESS_TOKEN": token})
    return result.exit_code, result.output


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_submit_wait_download_and_job_commands(tmp_path, server, onnx_job_files):
    url, _ = server
    f = onnx_job_files
    # local paths in the recipe are uploaded with it (relative to the recipe's folder)
    recipe = yaml.safe_load(onnx_recipe([{"type": "ort_quantize"}]))
    recipe["model"]["path"] = "tiny.onnx"
    recipe["calibration"]["path"] = "calib.npz"
    recipe["evaluation"]["path"] = str(f["eval"])
    path = write(f["dir"], yaml.safe_dump(recipe), "cli_recipe.yaml")
    code, out = run(url, "submit", path, "--wait", "--json", "--no-progress",
                    "--download", tmp_path / "dl")
    assert code == 0, out
    job = json.loads(out.strip().splitlines()[-1])
    assert job["state"] == "succeeded" and job["exit_code"] == 0
    report = json.loads((tmp_path / "dl" / "report.json").read_text())
    assert report["passes"][0]["type"] == "ort_quantize"
    assert report["data"]["calibration"]["samples"] == 32

    code, out = run(url, "status", job["id"])
    assert code == 0 and "succeeded" in out and "quality gate: passed" in out
    code, out = run(url, "status", job["id"][:12])  # the 12 characters `list` shows
    assert code == 0 and f"job {job['id']}" in out
    assert "  verdict: smaller by " in out and ", no gate configured" in out
    code, out = run(url, "logs", job["id"])
    assert code == 0 and "finished: succeeded" in out
    code, out = run(url, "logs", "--follow", job["id"])
    assert code == 0 and "finished: succeeded" in out
    code, out = run(url, "list", "--state", "succeeded")
    assert code == 0 and job["id"] in out
    code, out = run(url, "download", job["id"], "--out", tmp_path / "one", "--name", "model.onnx",
                    "--no-progress")
    assert code == 0 and (tmp_path / "one" / "model.onnx").is_file()
    assert not (tmp_path / "one" / "report.json").exists()
    code, out = run(url, "download", job["id"], "--name", "nope.onnx")
    assert code == 2 and "no artifact" in out
    code, out = run(url, "wait", job["id"], "--no-progress")
    assert code == 0 and "succeeded" in out
    code, out = run(url, "delete", job["id"])
    assert code == 0
    code, out = run(url, "status", job["id"])
    assert code == 2 and "no job" in out


def test_submit_wait_exits_with_the_jobs_code(tmp_path, server, onnx_job_files):
    url, _ = server
    f = onnx_job_files
    base = ["--model", f["model"], "--calib", f["calib"], "--eval", f["eval"], "--wait",
            "--no-progress"]
    gated = write(tmp_path, onnx_recipe([{"type": "ort_quantize"}], gate={"max_kl": 0.0}))
    code, out = run(url, "submit", gated, *base)
    assert code == 3, out
    assert "gate_failed" in out and "quality gate: FAILED" in out
    assert "  verdict: " in out and ", gate failed" in out

    code, out = run(url, "submit", write(tmp_path, onnx_recipe()), *base,
                    "--set", "passes.0.nope=1")
    assert code == 2 and "passes" in out  # refused at submission: 422 -> exit 2

    bad = write(tmp_path, onnx_recipe([{"type": "ort_quantize", "bitz": 8}]))
    code, out = run(url, "submit", bad, *base)
    assert code == 2 and "passes.0.bitz" in out

    np = pytest.importorskip("numpy")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((2, 3, 4, 4), np.float32))
    code, out = run(url, "submit", write(tmp_path, onnx_recipe()), "--model", f["model"],
                    "--eval", wrong, "--wait", "--no-progress")
    assert code == 2 and "DataError" in out  # the job itself failed on bad input

    code, out = run(url, "submit", write(tmp_path, onnx_recipe()), *base, token="wrong")
    assert code == 2 and "invalid API token" in out
    code, out = run("http://127.0.0.1:9", "list")
    assert code == 1 and "cannot reach the service" in out


def test_cancel_from_the_cli(tmp_path, server, onnx_job_files):
    url, _ = server
    f = onnx_job_files
    code, out = run(url, "submit", write(tmp_path, onnx_recipe(latency=SLOW_LATENCY)),
                    "--model", f["slow"], "--eval", f["eval"], "--json")
    assert code == 0, out
    job_id = json.loads(out)["id"]
    code, out = run(url, "cancel", job_id)
    assert code == 0 and job_id in out
    code, out = run(url, "wait", job_id, "--json", "--no-progress")
    assert code == 1 and json.loads(out)["state"] == "cancelled"
    code, out = run(url, "cancel", job_id)
    assert code == 2 and "already finished" in out


def test_serve_builds_the_app_from_flags(tmp_path, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    code, out = run("", "serve", "--data-dir", tmp_path / "d", "--workers", "3", "--port", "8123")
    assert code == 0, out
    settings = seen["app"].state.settings
    assert settings.workers == 3 and seen["port"] == 8123
    token = (tmp_path / "d" / "token").read_text().strip()
    assert settings.all_tokens() == {token: "default"} and token in out
    assert "jobs.db" in settings.db_url
    code, out = run("", "serve", "--data-dir", tmp_path / "d", "--token", "abc:team")
    assert seen["app"].state.settings.all_tokens() == {"abc": "team"}


def test_library_and_cli_work_without_the_service_extra():
    """With FastAPI missing, `compress` imports, `run` is there, service commands explain."""
    import subprocess
    import sys

    code = """
import sys
for name in ("fastapi", "sqlalchemy", "uvicorn", "httpx", "pydantic_settings"):
    sys.modules[name] = None  # import fails as if not installed
import compress, compress.api
from click.testing import CliRunner
from compress.cli import main
assert not [m for m in sys.modules if m.startswith("service")]
res = CliRunner().invoke(main, ["--help"])
assert res.exit_code == 0 and "submit" in res.output, res.output
res = CliRunner().invoke(main, ["submit", "x.yaml", "--wait"])
print(res.exit_code, res.output)
"""
    repo = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2 ") and "pip install 'compress-models[client]'" in out.stdout


# ------------------------------------------------------------------ short job ids (issue 15)

JOB_IDS = ["abcd1111" + "0" * 24, "abcd2222" + "0" * 24, "ef012345" + "0" * 24]


def _job(job_id: str) -> dict:
    return {"id": job_id, "url": f"/v1/jobs/{job_id}", "name": f"job-{job_id[:4]}",
            "state": "succeeded", "stage": "report", "progress": 1.0, "percent": 100.0,
            "eta_seconds": None, "message": "", "error": None, "exit_code": 0,
            "gate_passed": True, "created_at": "2026-01-01T00:00:00", "links": {}}


@pytest.fixture
def fake_service(monkeypatch):
    """The CLI against an in-process fake of the list/get/cancel/delete/log/artifacts routes;
    returns the request paths it saw."""
    import httpx

    import service.cli
    from service.client import Client

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        seen.append(f"{request.method} {path}")
        if path == "/v1/jobs":
            offset = int(request.url.params.get("offset", 0))
            page = JOB_IDS[offset:offset + 2]   # two per page: the resolver must follow pages
            nxt = offset + 2 if offset + 2 < len(JOB_IDS) else None
            return httpx.Response(200, json={"jobs": [_job(i) for i in page],
                                             "total": len(JOB_IDS), "limit": 2,
                                             "offset": offset, "next_offset": nxt})
        job_id = path.split("/")[3]
        if path.endswith("/log"):
            return httpx.Response(200, text="log of " + job_id)
        if path.endswith("/artifacts"):
            return httpx.Response(200, json={"job_id": job_id, "artifacts": []})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json=_job(job_id))

    class FakeClient(Client):
        def __init__(self, url, token):
            super().__init__(url, token, http=httpx.Client(
                base_url=url, transport=httpx.MockTransport(handler)))

    monkeypatch.setattr(service.cli, "Client", FakeClient)
    return seen


@pytest.mark.parametrize("command", [["status"], ["logs"], ["wait", "--no-progress"],
                                     ["cancel"], ["delete"], ["download", "--no-progress"]])
def test_every_job_command_takes_a_unique_id_prefix(fake_service, command, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run("http://fake", *command[:1], "abcd2", *command[1:])
    assert code == 0, out
    full = JOB_IDS[1]
    # the resolver reads both pages of the list, then every request names the full id
    assert fake_service[:2] == ["GET /v1/jobs"] * 2
    rest = fake_service[2:]
    assert rest and all(f"/v1/jobs/{full}" in p for p in rest), fake_service
    if command[0] in ("status", "cancel", "delete", "wait"):
        assert full in out


def test_ambiguous_short_or_unknown_prefix_exits_2(fake_service):
    code, out = run("http://fake", "status", "abcd")
    assert code == 2
    assert "job id prefix 'abcd' is ambiguous: 2 jobs start with it" in out
    assert JOB_IDS[0] in out and JOB_IDS[1] in out and JOB_IDS[2] not in out
    code, out = run("http://fake", "cancel", "abc")
    assert code == 2 and "unique prefix of at least 4 hex characters" in out
    code, out = run("http://fake", "delete", "9999")
    assert code == 2 and "no job id starts with '9999'" in out
    # the resolver read every page of the list (three jobs, two per page)
    assert fake_service.count("GET /v1/jobs") == 4  # 2 pages x 2 resolvable calls
    assert not [p for p in fake_service if p.startswith(("POST", "DELETE"))]
