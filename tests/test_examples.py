"""examples/ as written (issue 15): the GitHub Actions workflow installs the published client
extra and its steps, run as GitHub runs them, gate on a live service (0 passed, 3 gate failed,
2 refused recipe with a JSON error and an annotation, never a traceback); the Argo step's
command line does the same and its next step reads the JSON; the SHA256SUMS file they promise
is written by `--download` and checks; the Argo image is the tag docker/compose.yaml builds."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from compress import __version__
from compress.cli import main
from tests import packaging as pkg
from tests.service import conftest as service_fixtures
from tests.service.conftest import onnx_recipe

# The service tests' fixtures, by name: a live service and a tiny ONNX model with its data.
server = service_fixtures.server
onnx_job_files = service_fixtures.onnx_job_files

ROOT = pkg.ROOT
GHA = ROOT / "examples" / "github-actions" / "compress.yml"
ARGO = ROOT / "examples" / "argo" / "compress-workflow.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"
# GitHub's `shell: bash` on Linux runners
GHA_BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


def gha_steps() -> list[dict]:
    return yaml.safe_load(GHA.read_text())["jobs"]["compress"]["steps"]


def argo_templates() -> dict[str, dict]:
    wf = yaml.safe_load(ARGO.read_text())
    return wf, {t["name"]: t for t in wf["spec"]["templates"]}


def parse_compress(argv: list[str]) -> None:
    """Resolve the subcommand and parse its options exactly as the CLI would."""
    assert argv[0] == "compress"
    ctx = main.make_context("compress", list(argv[1:]))
    sub = main.get_command(ctx, argv[1])
    assert sub is not None, f"no command {argv[1]!r}"
    sub.make_context(argv[1], list(argv[2:]))


def compress_lines(script: str) -> list[list[str]]:
    out = []
    for line in script.splitlines():
        words = shlex.split(line) if line.strip().startswith("compress ") else []
        if words:
            cut = next((i for i, w in enumerate(words) if w in (">", "||", "|", "&&")),
                       len(words))
            out.append(words[:cut])
    return out


# ---------------------------------------------------------------------------- as written

def test_github_actions_installs_the_published_client_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installs = [s["run"] for s in gha_steps() if "pip install" in s.get("run", "")]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert words[:2] == ["pip", "install"] and len(words) == 3
    req = Requirement(words[2])
    assert req.name == project["name"] == "compress-models"
    assert req.extras == {"client"} and __version__ in req.specifier
    # the client extra is light: no torch, no FastAPI (tests/test_packaging.py installs it)
    client = " ".join(project["optional-dependencies"]["client"] + project["dependencies"])
    assert "torch" not in client and "fastapi" not in client
    assert "[service]" not in GHA.read_text() and 'install "."' not in GHA.read_text()


def test_examples_use_real_commands_and_options():
    steps = gha_steps()
    step = next(s for s in steps if s.get("id") == "compress")
    lines = compress_lines(step["run"])
    assert lines and all("--wait" in a and "--json" in a and "--download" in a for a in lines)
    for argv in lines:
        parse_compress(argv)
    download = lines[0][lines[0].index("--download") + 1]
    check = next(s for s in steps if "SHA256SUMS" in s.get("run", ""))
    assert f"cd {download} && sha256sum --check" in check["run"]

    wf, tpl = argo_templates()
    argv = tpl["compress"]["container"]["command"] + tpl["compress"]["container"]["args"]
    assert "--wait" in argv and "--json" in argv
    parse_compress([a.replace("{{inputs.parameters.recipe}}", "r.yaml") for a in argv])
    out_dir = argv[argv.index("--download") + 1]
    assert tpl["compress"]["outputs"]["artifacts"][0]["path"] == out_dir
    env = {e["name"] for e in tpl["compress"]["container"]["env"]}
    assert env == {"COMPRESS_URL", "COMPRESS_TOKEN"}
    publish = tpl["main"]["steps"][1][0]
    assert publish["arguments"]["parameters"][0]["value"] == "{{steps.compress.outputs.result}}"


def test_argo_image_is_the_tag_docker_builds():
    wf, tpl = argo_templates()
    container = tpl["compress"]["container"]
    assert container["image"] == "{{workflow.parameters.image}}"
    assert container["imagePullPolicy"] == "IfNotPresent"
    default = next(p["value"] for p in wf["spec"]["arguments"]["parameters"]
                   if p["name"] == "image")
    api = yaml.safe_load(COMPOSE.read_text())["services"]["api"]
    assert default == api["image"] == "compress-api", "the Argo example must name the image " \
        "docker/ builds"
    dockerfile = ROOT / "docker" / "Dockerfile.api"  # scripts/docker/build.sh tags compress-api
    assert '"compress"' in dockerfile.read_text()  # the image has the CLI
    assert f"docker tag {default}:{__version__} " in ARGO.read_text()  # how to push it


# ---------------------------------------------------------------------------- against a service

@pytest.fixture(scope="module")
def client_env(tmp_path_factory) -> dict:
    """An environment with only the client's requirements, where the workflow's own install
    line has installed the wheel just built (offline: pip finds it in a local folder)."""
    work = tmp_path_factory.getbasetemp() / "packaging"
    venv = pkg.client_venv(work)
    env = pkg.offline_pip_env(pkg.build_wheel(work).parent, venv)
    install = next(s["run"] for s in gha_steps() if "pip install" in s.get("run", ""))
    proc = pkg.run([*GHA_BASH, "-c", install], env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = pkg.run(["python", "-c", "import torch"], env=env)
    assert probe.returncode != 0  # the client runs without torch for real
    return env


def recipes(tmp_path: Path, files: dict) -> dict[str, Path]:
    """A passing, a gate-failing and a refused recipe naming the tiny ONNX model by path."""
    out = {}
    for name, gate, passes in (("pass", {}, [{"type": "ort_quantize"}]),
                               ("gated", {"max_kl": 0.0}, [{"type": "ort_quantize"}]),
                               ("bad", {}, [{"type": "no_such_pass"}])):
        r = yaml.safe_load(onnx_recipe(passes, gate=gate))
        r["model"]["path"] = str(files["model"])
        r["calibration"]["path"] = str(files["calib"])
        r["evaluation"]["path"] = str(files["eval"])
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(r))
    return out


def run_gha_job(work: Path, env: dict) -> tuple[list[tuple[str, int, str]], list[str]]:
    """The compress job's `run:` steps in order, as GitHub runs them: each as a bash script with
    the step's env; after a failure only `if: always()` steps run. Returns (name, code, stdout)
    of each step run, and the paths the upload-artifact step would find missing (a warning on
    GitHub, not a failure)."""
    ran, failed, missing = [], False, []
    for step in gha_steps():
        if failed and step.get("if") != "always()":
            continue
        if "run" not in step or "pip install" in step["run"]:  # `uses:` actions; installed
            if step.get("uses", "").startswith("actions/upload-artifact"):
                missing += [p for p in step["with"]["path"].split() if not (work / p).exists()]
            continue
        script = work / f"step-{len(ran)}.sh"
        script.write_text(step["run"])
        proc = subprocess.run([*GHA_BASH, str(script)], cwd=work, capture_output=True,
                              text=True, timeout=300, env=env)
        (work / f"step-{len(ran)}.log").write_text(proc.stdout + proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        ran.append((step.get("name", ""), proc.returncode, proc.stdout))
        failed = failed or proc.returncode != 0
    return ran, missing


@pytest.mark.slow
def test_github_actions_job_against_a_live_service(tmp_path, server, onnx_job_files,
                                                   client_env):
    url, _ = server
    paths = recipes(tmp_path, onnx_job_files)
    for name, want in (("pass", 0), ("gated", 3), ("bad", 2)):
        work = tmp_path / name
        work.mkdir()
        gh_out = work / "github_output"
        env = {**client_env, "COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a",
               "RECIPE": str(paths[name]), "GITHUB_OUTPUT": str(gh_out)}
        ran, not_uploaded = run_gha_job(work, env)
        compress_step = next(r for r in ran if r[0].startswith("Compress"))
        assert compress_step[1] == want, (work / "step-0.log").read_text()
        job = json.loads((work / "job.json").read_text())
        outputs = dict(line.split("=", 1) for line in gh_out.read_text().splitlines())
        if name == "bad":
            assert job["status"] == "error" and job["exit_code"] == 2
            assert "no_such_pass" in json.dumps(job["error"])
            assert outputs == {"state": "refused"}
            assert "::error title=compress submit::" in compress_step[2]
            assert len(ran) == 1  # the checksum step does not run after a failure
            assert not_uploaded == ["compressed/"]  # job.json, with the error, is kept
            continue
        assert not not_uploaded
        assert outputs == {"job_id": job["id"], "state": job["state"]}
        sums = (work / "compressed" / "SHA256SUMS").read_text()
        assert "  model.onnx\n" in sums and "  report.json\n" in sums
        if want == 0:
            assert job["state"] == "succeeded" and job["gate_passed"] is True
            assert [code for _, code, _ in ran] == [0, 0]  # compress, checksums
            report = json.loads((work / "compressed" / "report.json").read_text())
            assert report["passes"][0]["type"] == "ort_quantize"
        else:
            assert job["state"] == "gate_failed" and job["exit_code"] == 3
            assert len(ran) == 1


@pytest.mark.slow
def test_argo_step_against_a_live_service(tmp_path, server, onnx_job_files, client_env):
    url, _ = server
    _, tpl = argo_templates()
    paths = recipes(tmp_path, onnx_job_files)
    publish = tpl["publish"]["script"]
    for name, want in (("pass", 0), ("gated", 3), ("bad", 2)):
        out_dir = tmp_path / f"compressed-{name}"
        argv = [a.replace("{{inputs.parameters.recipe}}", str(paths[name]))
                .replace("/tmp/compressed", str(out_dir))
                for a in tpl["compress"]["container"]["command"]
                + tpl["compress"]["container"]["args"]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**client_env, "COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a"})
        assert proc.returncode == want, proc.stderr
        assert "Traceback" not in proc.stderr
        result = json.loads(proc.stdout)  # outputs.result: stdout is one JSON object
        if name == "bad":
            assert result["status"] == "error" and result["exit_code"] == 2
            continue
        assert result["state"] == ("succeeded" if want == 0 else "gate_failed")
        check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out_dir,
                               capture_output=True, text=True)
        assert check.returncode == 0 and "model.onnx: OK" in check.stdout, check.stdout
        if want == 0:  # the next step, with Argo's substitution of this step's stdout
            source = publish["source"].replace("{{inputs.parameters.job}}", proc.stdout.strip())
            nxt = subprocess.run([*publish["command"], "-c", source], capture_output=True,
                                 text=True, timeout=60, env={"PATH": os.environ["PATH"]})
            assert nxt.returncode == 0, nxt.stderr
            assert nxt.stdout.strip() == f"job {result['id']}: succeeded, gate passed: True"
