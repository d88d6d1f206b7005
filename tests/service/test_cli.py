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
    assert out.stdout.startswith("2 ") and "pip install 'compress[service]'" in out.stdout
