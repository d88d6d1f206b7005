"""The package as users install it (issue 15): a wheel named compress-models that carries the
bundled recipes, the dashboard and the digits ViT's weights; installed in a fresh environment, it
lists the recipes, serves the dashboard and runs a bundled recipe from a folder with no source
tree. The [client] extra talks to a service without torch: its requirements pull in none of the
heavy modules, and its commands run in an environment where torch is not installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from compress import __version__
from compress.bundled import RECIPES_DIR, bundled_recipe_names
from compress.reference import digits_vit
from tests import packaging as pkg
from tests.service import conftest as service_fixtures
from tests.service.conftest import onnx_recipe

# The service tests' fixtures, by name: a live service and a tiny ONNX model with its data.
server = service_fixtures.server
onnx_job_files = service_fixtures.onnx_job_files

STATIC = pkg.ROOT / "service" / "static"
CLIENT_COMMANDS = ("submit", "status", "logs", "wait", "download", "list", "cancel", "delete")

# Run in a subprocess: makes every heavy module unimportable, runs the CLI, then checks that
# nothing heavy was imported on the way (the blocker would have failed the command otherwise).
BLOCKED_CLI = """
import sys
HEAVY = {heavy!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            # as if not installed
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from compress.cli import main
try:
    main({argv!r}, prog_name="compress")
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
assert not [m for m in sys.modules if m.partition(".")[0] in HEAVY], sorted(sys.modules)
sys.exit(code)
"""


def blocked_cli(argv: list[str], env: dict | None = None, cwd: Path | None = None):
    code = BLOCKED_CLI.format(heavy=pkg.HEAVY_MODULES, argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=cwd or pkg.ROOT, env=env)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "packaging"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- fast checks

def test_bundled_recipes_are_found_through_the_package():
    """compress/bundled_recipes (a link in a checkout) is where the package finds recipes/."""
    assert (pkg.ROOT / "compress" / "bundled_recipes").resolve() == RECIPES_DIR
    assert RECIPES_DIR == (pkg.ROOT / "recipes").resolve()
    assert bundled_recipe_names() == sorted(p.stem for p in (pkg.ROOT / "recipes").glob("*.yaml"))


def test_client_commands_and_recipe_list_import_nothing_heavy(tmp_path):
    for name in CLIENT_COMMANDS:
        proc = blocked_cli([name, "--help"])
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert f"Usage: compress {name}" in proc.stdout
    proc = blocked_cli(["recipe", "list", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["name"] for r in json.loads(proc.stdout)] == bundled_recipe_names()
    proc = blocked_cli(["--version"])
    assert proc.returncode == 0 and f"compress (compress-models) {__version__}" in proc.stdout
    # a command of the [local] extra names it instead of failing with a traceback
    proc = blocked_cli(["run", "digits_vit_w8a8", "--out", tmp_path / "o"])
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'compress-models[local]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_client_commands_work_against_a_service_without_heavy_modules(tmp_path, server,
                                                                       onnx_job_files):
    """submit --wait --download, status, list, download: torch, numpy, FastAPI unimportable."""
    url, _ = server
    f = onnx_job_files
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(onnx_recipe([{"type": "ort_quantize"}]))
    env = {**os.environ, "COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a"}
    proc = blocked_cli(["submit", recipe, "--model", f["model"], "--calib", f["calib"], "--eval",
                        f["eval"], "--wait", "--json", "--no-progress", "--download",
                        tmp_path / "dl"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded"
    sums = (tmp_path / "dl" / "SHA256SUMS").read_text().splitlines()
    assert any(line.endswith("  model.onnx") for line in sums)
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"],
                           cwd=tmp_path / "dl", capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for argv in (["status", job["id"][:8]], ["list"],
                 ["download", job["id"], "--out", tmp_path / "again", "--no-progress"]):
        proc = blocked_cli(argv, env=env)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    assert (tmp_path / "again" / "model.onnx").read_bytes() == \
        (tmp_path / "dl" / "model.onnx").read_bytes()


def test_bad_input_under_json_exits_2_with_a_json_error(tmp_path, server, onnx_job_files):
    """A recipe the service refuses, an unknown bundled name or job, a missing local file: exit
    2 and one JSON error object on stdout (a pipeline step parses it), no traceback."""
    url, _ = server
    f = onnx_job_files
    bad = yaml.safe_load(onnx_recipe([{"type": "no_such_pass"}]))
    bad["model"]["path"], bad["calibration"]["path"] = str(f["model"]), str(f["calib"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(bad))
    env = {**os.environ, "COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a"}
    cases = {"refused recipe": (["submit", recipe, "--wait", "--json"], 422),
             "unknown bundled name": (["submit", "no_such_recipe", "--json"], None),
             "unknown job": (["status", "ffffffff", "--json"], 404),
             "missing local file": (["submit", recipe, "--model", tmp_path / "nope.onnx",
                                     "--json"], 0)}
    for case, (argv, status) in cases.items():
        proc = blocked_cli(argv, env=env)
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
        err = json.loads(proc.stdout)  # one JSON object, not an empty stdout
        assert err["status"] == "error" and err["exit_code"] == 2, (case, err)
        assert err["error"]["message"], case
        got = err["error"].get("http_status", 0)
        assert got == status if status is not None else 400 <= got < 500, (case, err)
        assert "Traceback" not in proc.stderr, case
    proc = blocked_cli(["submit", recipe, "--wait", "--json"], env=env)
    err = json.loads(proc.stdout)["error"]
    assert "no_such_pass" in json.dumps(err), err  # the service's field errors come along


# ---------------------------------------------------------------------------- the wheel

@pytest.mark.slow
def test_wheel_carries_recipes_dashboard_and_weights_and_declares_extras(work):
    wheel = pkg.build_wheel(work)
    assert wheel.name == f"compress_models-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        recipes = sorted(Path(n).stem for n in names
                         if n.startswith("compress/bundled_recipes/") and n.endswith(".yaml"))
        assert recipes == bundled_recipe_names()
        for f in STATIC.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                rel = f"service/static/{f.relative_to(STATIC).as_posix()}"
                assert zf.read(rel) == f.read_bytes(), rel
        weights = f"compress/reference/weights/{digits_vit.SHIPPED_WEIGHTS.name}"
        import hashlib

        assert hashlib.sha256(zf.read(weights)).hexdigest() == digits_vit.SHIPPED_WEIGHTS_SHA256
        assert "compress/reference/texts/calib.txt" in names
        assert "compress/report/templates/report.html.j2" in names
    meta = pkg.wheel_metadata(wheel)
    assert "Name: compress-models" in meta
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"client", "local", "service", "ray"} <= extras
    # the client's whole dependency closure holds nothing heavy; the service's holds torch
    client = pkg.closure(pkg.requirements(wheel, {"client"}))
    assert "httpx" in client and not {m.replace("_", "-") for m in pkg.HEAVY_MODULES} & set(client)
    assert {"torch", "fastapi", "httpx"} <= set(pkg.closure(pkg.requirements(wheel, {"service"})))


@pytest.mark.slow
def test_installed_wheel_lists_recipes_serves_dashboard_and_runs_a_recipe(work, tmp_path):
    venv = pkg.full_venv(work)
    cwd = tmp_path / "elsewhere"  # no source tree here or above
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"COMPRESS_CACHE": str(tmp_path / "cache"), "PATH": f"{venv / 'bin'}:"
                f"{env['PATH']}"})
    where = pkg.run([venv / "bin" / "python", "-c",
                     "import compress, service; print(compress.__file__); print(service.__file__)"],
                    cwd=cwd, env=env)
    assert where.returncode == 0, where.stderr
    assert all(str(venv) in line for line in where.stdout.split()), where.stdout

    listed = pkg.run(["compress", "recipe", "list", "--json"], cwd=cwd, env=env)
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)] == bundled_recipe_names()

    port = free_port()
    serve = subprocess.Popen(["compress", "serve", "--port", str(port), "--data-dir",
                              str(tmp_path / "data"), "--token", "tok:team", "--workers", "0"],
                             cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "serve.log", "w"))  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serve.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and page.text == (STATIC / "index.html").read_text()
        for f in STATIC.iterdir():
            if f.is_file():
                got = httpx.get(f"{url}/static/{f.name}")
                assert got.status_code == 200 and got.content == f.read_bytes(), f.name
        recipes = httpx.get(f"{url}/v1/recipes", headers={"Authorization": "Bearer tok"})
        assert recipes.status_code == 200
        assert sorted(r["name"] for r in recipes.json()) == bundled_recipe_names()
    finally:
        serve.terminate()
        serve.wait(timeout=30)

    # A bundled recipe by name; the digits ViT comes from the shipped weights, not training.
    t0 = time.monotonic()
    ran = pkg.run(["compress", "run", "digits_vit_w8a8", "--out", cwd / "out", "--json",
                   "--no-progress"], cwd=cwd, env=env, timeout=900)
    seconds = time.monotonic() - t0
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    assert (cwd / "out" / "model.onnx").is_file() and (cwd / "out" / "report.html").is_file()
    meta = json.loads(next((tmp_path / "cache").glob("digits-vit-*/meta.json")).read_text())
    assert meta["weights"] == "shipped"
    assert meta["weights_sha256"] == digits_vit.SHIPPED_WEIGHTS_SHA256
    print(f"compress run digits_vit_w8a8 from the installed wheel, empty cache: {seconds:.0f} s; "
          f"{json.dumps(summary)[:200]}")


@pytest.mark.slow
def test_client_extra_installs_and_runs_without_torch(work, tmp_path, server, onnx_job_files):
    """The client environment: the wheel's [client] closure and nothing else; then the wheel,
    installed by the line the README gives, talks to a live service."""
    url, _ = server
    venv = pkg.client_venv(work)
    wheel = pkg.build_wheel(work)
    env = pkg.offline_pip_env(wheel.parent, venv)
    env.update({"COMPRESS_URL": url, "COMPRESS_TOKEN": "token-a"})
    install = pkg.run(["pip", "install", f"compress-models[client]=={__version__}"], env=env,
                      cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    for heavy in ("torch", "numpy", "fastapi", "onnxruntime"):
        probe = pkg.run(["python", "-c", f"import {heavy}"], env=env, cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, heavy
    f = onnx_job_files
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(onnx_recipe([{"type": "ort_quantize"}]))
    sub = pkg.run(["compress", "submit", recipe, "--model", f["model"], "--calib", f["calib"],
                   "--eval", f["eval"], "--wait", "--json", "--no-progress", "--download",
                   "dl"], env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr[-3000:]
    assert json.loads(sub.stdout)["state"] == "succeeded"
    check = pkg.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=tmp_path / "dl")
    assert check.returncode == 0, check.stdout
    serve = pkg.run(["compress", "serve"], env=env, cwd=tmp_path)
    assert serve.returncode == 2 and "compress-models[service]" in serve.stderr
