"""examples/: the GitHub Actions and Argo steps use real CLI commands and options, and their exact
command lines run against a live local service: a job whose gate passes exits 0, one whose gate
fails exits 3, and the JSON they hand to the next step parses."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.service.conftest import onnx_recipe

ROOT = Path(__file__).resolve().parents[2]
GHA = ROOT / "examples" / "github-actions" / "compress.yml"
ARGO = ROOT / "examples" / "argo" / "compress-workflow.yaml"


def parse_compress(argv: list[str]) -> None:
    """Resolve the subcommand and parse its options exactly as the CLI would."""
    assert argv[0] == "compress"
    ctx = main.make_context("compress", list(argv[1:]))
    sub = main.get_command(ctx, argv[1])
    assert sub is not None, f"no command {argv[1]!r}"
    sub.make_context(argv[1], list(argv[2:]))


def compress_lines(script: str) -> list[list[str]]:
    """The `compress ...` command lines of a shell script, cut at redirections and ||."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line, posix=True)
        if words and words[0] == "compress":
            cut = next((i for i, w in enumerate(words) if w in (">", "||", "|", "&&")),
                       len(words))
            out.append(words[:cut])
    return out


def gha_step():
    wf = yaml.safe_load(GHA.read_text())
    steps = wf["jobs"]["compress"]["steps"]
    return wf, next(s for s in steps if s.get("id") == "compress")


def argo_template():
    wf = yaml.safe_load(ARGO.read_text())
    return wf, next(t for t in wf["spec"]["templates"] if t["name"] == "compress")


def test_examples_use_real_commands_and_options():
    wf, step = gha_step()
    lines = compress_lines(step["run"])
    assert lines and all("--wait" in a and "--json" in a for a in lines)
    for argv in lines:
        parse_compress(argv)
    assert wf["jobs"]["compress"]["env"].keys() == {"COMPRESS_URL", "COMPRESS_TOKEN"}
    assert wf["jobs"]["deploy"]["needs"] == "compress"

    wf, tpl = argo_template()
    argv = tpl["container"]["command"] + tpl["container"]["args"]
    assert "--wait" in argv and "--json" in argv
    parse_compress([a.replace("{{inputs.parameters.recipe}}", "r.yaml") for a in argv])
    env = {e["name"] for e in tpl["container"]["env"]}
    assert env == {"COMPRESS_URL", "COMPRESS_TOKEN"}
    # the next step reads this step's stdout: the job's JSON
    main_steps = next(t for t in wf["spec"]["templates"] if t["name"] == "main")["steps"]
    publish = main_steps[1][0]
    assert publish["arguments"]["parameters"][0]["value"] == "{{steps.compress.outputs.result}}"
    # the API image that the step runs has the CLI
    assert tpl["container"]["image"].startswith("compress-api")
    assert (ROOT / "docker" / "Dockerfile.api").is_file()


def recipes(tmp_path: Path, files: dict) -> dict[str, Path]:
    """A passing and a gate-failing recipe naming the tiny ONNX model by local paths."""
    out = {}
    for name, gate in (("pass", {}), ("gated", {"max_kl": 0.0})):
        r = yaml.safe_load(onnx_recipe([{"type": "ort_quantize"}], gate=gate))
        r["model"]["path"] = str(files["model"])
        r["calibration"]["path"] = str(files["calib"])
        r["evaluation"]["path"] = str(files["eval"])
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(r))
    return out


def client_env(url: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # where the `compress` console script is
    return {**os.environ, "COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a",
            "PATH": bin_dir + os.pathsep + os.environ["PATH"],
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_github_actions_step_against_a_live_service(tmp_path, server, onnx_job_files):
    url, _ = server
    _, step = gha_step()
    paths = recipes(tmp_path, onnx_job_files)
    for name, want in (("pass", 0), ("gated", 3)):
        work = tmp_path / name
        work.mkdir()
        gh_out = work / "github_output"
        # GitHub runs a `run:` script as `bash -e {file}`, the step's env added
        script = work / "step.sh"
        script.write_text(step["run"])
        proc = subprocess.run(["bash", "-e", str(script)], cwd=work, capture_output=True,
                              text=True, timeout=120,
                              env={**client_env(url), "RECIPE": str(paths[name]),
                                   "GITHUB_OUTPUT": str(gh_out)})
        assert proc.returncode == want, proc.stderr
        job = json.loads((work / "job.json").read_text())
        outputs = dict(line.split("=", 1) for line in gh_out.read_text().splitlines())
        assert outputs == {"job_id": job["id"], "state": job["state"]}
        if want == 0:
            assert job["state"] == "succeeded" and job["gate_passed"] is True
            report = json.loads((work / "compressed" / "report.json").read_text())
            assert report["passes"][0]["type"] == "ort_quantize"
        else:
            assert job["state"] == "gate_failed" and job["gate_passed"] is False
            assert job["exit_code"] == 3


@pytest.mark.slow
def test_argo_step_against_a_live_service(tmp_path, server, onnx_job_files):
    url, _ = server
    _, tpl = argo_template()
    paths = recipes(tmp_path, onnx_job_files)
    for name, want in (("pass", 0), ("gated", 3)):
        out_dir = tmp_path / f"compressed-{name}"
        argv = [a.replace("{{inputs.parameters.recipe}}", str(paths[name]))
                .replace("/tmp/compressed", str(out_dir))
                for a in tpl["container"]["command"] + tpl["container"]["args"]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=client_env(url))
        assert proc.returncode == want, proc.stderr
        job = json.loads(proc.stdout)  # outputs.result: stdout is the job's JSON alone
        assert job["state"] == ("succeeded" if want == 0 else "gate_failed")
        assert (out_dir / "model.onnx").is_file() and (out_dir / "report.json").is_file()
