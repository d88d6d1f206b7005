"""docker/: the Dockerfiles, compose file and image scripts checked against the project without
a Docker engine (`make docker-smoke` builds and runs the images for real: docs/deployment.md).
Copied paths exist or are made by the wheels script, commands are real console scripts whose
options parse, ports and addresses agree, every COMPRESS_* variable is one the code reads,
nothing listens beyond loopback, no credential is written in, the API image's short package
list covers what the API imports, and no runtime image carries a dev package."""

import importlib.metadata as md
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from compress.cli import main
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = ROOT / "scripts" / "docker"
DOCKERFILES = ["Dockerfile.api", "Dockerfile.worker", "Dockerfile.worker-cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DEV_ONLY = {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["dev"]}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def env_names(args: str) -> list[str]:
    return [item.split("=", 1)[0] for item in shlex.split(args)]


def interpolate(value: str) -> str:
    """compose's ${VAR:-default} as its default, ${VAR:?message} as a placeholder."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"<\1>", value)


def check_command(argv: list[str]) -> None:
    """argv[0] is a console script of the project or of Ray; its options parse with click."""
    argv = [interpolate(a) for a in argv]
    if argv[0] == "compress":
        assert PROJECT["scripts"]["compress"] == "compress.cli:main"
        ctx = main.make_context("compress", list(argv[1:]), resilient_parsing=False)
        sub = main.get_command(ctx, argv[1])
        assert sub is not None, f"compress has no command {argv[1]!r}"
        sub.make_context(argv[1], list(argv[2:]))  # raises on an unknown or bad option
    elif argv[0] == "ray":
        pytest.importorskip("ray")
        ep = {e.name: e for e in md.entry_points(group="console_scripts")}["ray"]
        module = __import__(ep.module, fromlist=["cli"])  # ray.scripts.scripts: main() runs cli
        group = module.cli
        sub = group.get_command(click.Context(group), argv[1])
        assert sub is not None, f"ray has no command {argv[1]!r}"
        sub.make_context(argv[1], list(argv[2:]))
    else:
        raise AssertionError(f"unexpected command {argv}")


def check_compress_vars(names) -> None:
    fields = {f"COMPRESS_SERVICE_{n.upper()}" for n in Settings.model_fields}
    sources = "\n".join(p.read_text() for d in ("compress", "service")
                        for p in (ROOT / d).rglob("*.py"))
    for name in names:
        if name.startswith("COMPRESS_SERVICE_"):
            assert name in fields, f"{name} is no setting of service/settings.py"
        elif name.startswith("COMPRESS_"):
            assert f'"{name}"' in sources, f"{name} is read nowhere in compress/ or service/"


def option(argv: list[str], name: str) -> str:
    """The value of --name VALUE or --name=VALUE in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_matches_the_project(name):
    steps = instructions(DOCKER / name)
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    froms = [a.split()[0] for word, a in steps if word == "FROM"]
    if name.endswith("cuda"):
        # the worker's venv as is: the lock's torch is PyPI's CUDA build, its CUDA libraries are
        # wheels of the same lock, so no CUDA base image is needed
        assert froms == ["${WORKER_IMAGE}"] and args["WORKER_IMAGE"] == "compress-worker"
        lock = (ROOT / "requirements.lock").read_text()
        toolkit = re.search(r"^cuda-toolkit==(\d+)\.", lock, re.M).group(1)
        env = dict(kv.split("=", 1) for w, a in steps if w == "ENV" for kv in shlex.split(a))
        assert env["NVIDIA_REQUIRE_CUDA"] == f"cuda>={toolkit}.0"
        assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    else:
        # the dependencies' venv, the project's wheel on it, and the runtime stage, on the base
        # that build-base.sh makes
        assert froms == ["${BASE}", "build", "${BASE}"] and args["BASE"] == "compress-base:bookworm"
        base = (SCRIPTS / "build-base.sh").read_text()
        assert "IMAGE=${BASE_IMAGE:-compress-base:bookworm}" in base
        # bookworm's python3 is 3.11, the Python that pyproject.toml requires
        assert "debootstrap --variant=minbase" in base and " bookworm " in base
        assert "--include=python3,python3-venv" in base
        assert PROJECT["requires-python"] == ">=3.11,<3.12"

        copied = []
        for word, a in steps:
            if word == "COPY" and not a.startswith("--from"):
                *srcs, _dest = shlex.split(a)
                copied += srcs
        wheels_script = (SCRIPTS / "wheels.sh").read_text()
        for src in copied:
            if src.startswith("out/docker/wheels/"):  # made on the host by wheels.sh
                assert f"fetch {src.rsplit('/', 1)[1]} " in wheels_script, src
            else:
                assert (ROOT / src).exists(), f"{name}: COPY {src} is not in the repository"
        for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
            assert pkg.rstrip("*") in copied
        assert "recipes" in copied  # compress/bundled_recipes links to it
        runs = [a for word, a in steps if word == "RUN"]
        # offline: every install reads the wheels in the context, none an index
        installs = [r for r in runs if "pip install" in r]
        assert installs and all(r.count("pip install") == r.count("--no-index") for r in installs)
        # pip goes (no installs at run time); setuptools stays: torch requires it
        assert "pip uninstall --yes pip " in runs[-1]
        # the runtime stage takes the dependencies' venv and the project's wheel, no build tool
        assert ("COPY", "--from=build /opt/venv /opt/venv") in steps
        # the project is a wheel built from the sources, installed over the dependencies' venv
        assert any("pip wheel --no-index" in r and r.endswith(" /src") for r in runs)
        assert ("COPY", "--from=project /dist /tmp/dist") in steps
        if name == "Dockerfile.worker":
            assert "pip check" in runs[-1]

    # non-root, a health check, and the labels a registry shows
    users = [a for word, a in steps if word == "USER"]
    assert name.endswith("cuda") or users == ["compress"]
    if not name.endswith("cuda"):
        health = next(a for word, a in steps if word == "HEALTHCHECK")
        assert json.loads(health.split("CMD", 1)[1]) == ["python", "/opt/healthcheck.py"]
        assert ("COPY", "docker/healthcheck.py /opt/healthcheck.py") in steps
    labels = " ".join(a for word, a in steps if word == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${SOURCE_COMMIT}"' in labels

    cmd = json.loads(dict(steps)["CMD"])
    check_command(cmd)
    names = [n for word, a in steps if word == "ENV" for n in env_names(a)]
    check_compress_vars(names)
    exposed = {int(p) for word, a in steps if word == "EXPOSE" for p in a.split()}
    if name == "Dockerfile.api":
        serve = main.get_command(click.Context(main), "serve").params
        default = next(p.default for p in serve if p.name == "port")
        assert option(cmd, "--port") == str(default) and default in exposed
        assert option(cmd, "--host") == "127.0.0.1"
        env = dict(kv.split("=", 1) for w, a in steps if w == "ENV" for kv in shlex.split(a))
        assert env["HEALTHCHECK_URL"] == f"http://127.0.0.1:{default}/readyz"
        assert env["COMPRESS_SERVICE_DATA_DIR"] == "/data"
        assert env["COMPRESS_SERVICE_WORKERS"] == "0"  # the API image runs no job
        # a Ray driver needs a raylet on its host: with the Ray runner the API joins the cluster
        # as a node with no CPU before serving
        assert json.loads(dict(steps)["ENTRYPOINT"]) == ["tini", "--", "/opt/start-api.sh"]
        assert ("COPY", "docker/start-api.sh /opt/start-api.sh") in steps
        start = (DOCKER / "start-api.sh").read_text()
        ray_start = start.split("ray start", 1)[1].split("\nfi", 1)[0]
        ray_start = shlex.split(ray_start.replace("\\\n", " "))
        assert "--num-cpus=0" in ray_start and 'exec "$@"' in start
        assert '"${COMPRESS_SERVICE_RUNNER:-local}" = ray' in start
    else:
        assert cmd[:2] == ["ray", "start"]
        assert option(cmd, "--address") == "127.0.0.1:6380"
        assert ("--num-gpus=1" in cmd) == name.endswith("cuda")


def test_compose_keeps_the_api_on_loopback_and_guards_ray():
    text = (DOCKER / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"api", "ray-head", "ray-worker", "ray-worker-gpu", "worker"} <= set(services)
    # host networking, nothing published; the service binds 127.0.0.1, Ray advertises it (and
    # listens on every interface whatever it is told: hence the token, checked below)
    assert "0.0.0.0" not in text and "::" not in re.sub(r"#.*", "", text)
    for name, svc in services.items():
        assert svc["network_mode"] == "host", name
        assert "ports" not in svc, name
        assert "build" not in svc, name  # scripts/docker/build.sh builds the images
        check_command(svc["command"])
        check_compress_vars(svc.get("environment", {}))
        cmd = [interpolate(a) for a in svc["command"]]
        if cmd[0] == "compress":
            assert option(cmd, "--host") == "127.0.0.1"
        else:
            assert option(cmd, "--node-ip-address") == "127.0.0.1"
            assert "--include-dashboard=false" in cmd or "--head" not in cmd

    api, head = services["api"], services["ray-head"]
    env = {k: interpolate(str(v)) for k, v in api["environment"].items()}
    settings = Settings(**{k.removeprefix("COMPRESS_SERVICE_").lower(): v for k, v in env.items()
                           if k.startswith("COMPRESS_SERVICE_") and not k.endswith("_FILE")
                           and k != "COMPRESS_SERVICE_DATABASE_URL"})
    assert settings.runner == "ray"  # the default stack runs jobs on Ray
    # the Ray address everywhere is the head's GCS port, on loopback
    head_cmd = [interpolate(a) for a in head["command"]]
    address = f"127.0.0.1:{option(head_cmd, '--port')}"
    # Ray refuses a GCS port inside its worker ports (10002-19999 by default)
    assert not 10002 <= int(option(head_cmd, "--port")) <= 19999
    smoke_port = re.search(r"SMOKE_RAY_PORT:-(\d+)", (SCRIPTS / "smoke.sh").read_text()).group(1)
    assert not 10002 <= int(smoke_port) <= 19999
    assert env["COMPRESS_SERVICE_RAY_ADDRESS"] == address
    for name in ("ray-worker", "ray-worker-gpu"):
        assert option([interpolate(a) for a in services[name]["command"]], "--address") == address
    assert "--num-gpus=1" in services["ray-worker-gpu"]["command"]
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]
    # Ray's token authentication on every node and on the API (the driver)
    for name in ("api", "ray-head", "ray-worker", "ray-worker-gpu"):
        svc_env = services[name]["environment"]
        assert svc_env["RAY_AUTH_MODE"] == "token", name
        assert svc_env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray-token", name
        assert "ray-token" in services[name]["secrets"], name
    assert services["worker"]["profiles"] == ["local"]

    # credentials come from the environment and files, none is written here
    literal = re.sub(r"\$\{[^}]*\}", "", re.sub(r"#.*", "", text))  # no comment, no ${...}
    assert not re.search(r"postgres(ql)?(\+\w+)?://[^\s]*:[^@\s]*@", literal)
    assert "PASSWORD" not in literal.upper().replace("POSTGRES_PASSWORD", "")
    for name in ("api", "worker"):
        svc_env = services[name]["environment"]
        assert svc_env["COMPRESS_SERVICE_DATABASE_URL"].startswith("${COMPRESS_DATABASE_URL:?")
        assert svc_env["COMPRESS_SERVICE_TOKENS_FILE"] == "/run/secrets/tokens"
        assert "COMPRESS_SERVICE_TOKENS" not in svc_env
    for secret in compose["secrets"].values():
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", secret["file"]), secret

    # inputs, logs and artifacts: one volume at DATA_DIR on the API, the worker and every node
    mount = f"artifacts:{settings.data_dir.as_posix()}"
    for name, svc in services.items():
        assert mount in svc["volumes"], name
    assert set(compose["volumes"]) == {"artifacts"}


def imports_without(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the modules `blocked` cannot be imported: what an
    image without their distributions sees (an optional import that handles ImportError
    passes there as here)."""
    guard = (  # a top-level module found in site-packages itself (a vendored copy inside a
               # package, as Ray's psutil, is what the image has too)
        "import importlib.abc, importlib.machinery, json, sys, sysconfig\n"
        "from pathlib import Path\n"
        "site = Path(sysconfig.get_paths()['purelib']).resolve()\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    blocked = set(json.loads(sys.argv[1]))\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if path is not None or name not in self.blocked:\n"
        "            return None\n"
        "        spec = importlib.machinery.PathFinder.find_spec(name)\n"
        "        where = spec and (spec.origin or list(spec.submodule_search_locations)[0])\n"
        "        if where and Path(where).resolve().parent in (site, site / name):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n")
    return subprocess.run([sys.executable, "-c", guard + code, json.dumps(sorted(blocked))],
                          capture_output=True, text=True, cwd=ROOT)


def closure(requirements: list[str]) -> set[str]:
    """The requirements and everything they require, as installed here (markers evaluated)."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for sub in md.requires(req.name) or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(r)
    return seen


def api_requirements() -> list[str]:
    lines = (DOCKER / "requirements-api.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


@pytest.mark.slow  # two fresh interpreters import torch and Ray
def test_api_image_packages_cover_what_the_api_imports():
    reqs = api_requirements()
    torch = [r for r in reqs if Requirement(r).name == "torch"]
    assert torch and "+cpu" in torch[0]  # PyPI's Linux torch is the CUDA build: not this one
    names = {canonicalize_name(Requirement(r).name) for r in reqs}
    assert not names & {"timm", "torchvision", "transformers", "optimum", "scikit-learn"}
    assert not closure(reqs) & DEV_ONLY
    pytest.importorskip("ray")
    # every top-level module of an installed distribution that the API image lacks
    image = closure([r.replace("+cpu", "") for r in reqs])
    blocked = {module for module, dists in md.packages_distributions().items()
               if module not in {"compress", "service"}
               and not {canonicalize_name(d) for d in dists} & image}
    assert {"timm", "torchvision", "transformers", "sklearn", "pytest"} <= blocked
    # the API's whole import path: app, Ray runner, recipe validation, pass catalog, CLI
    run = imports_without(
        "import service.app, service.ray_runner, service.ray_task, service.cli, ray\n"
        "from compress.registry import pass_catalog; pass_catalog()\n"
        "from compress.recipe import Recipe\n"
        "from service.recipes import check_recipe\n"
        "check_recipe(open('recipes/digits_vit_w8a8.yaml').read(), uploads=set())\n", blocked)
    assert run.returncode == 0, f"the API image lacks a module:\n{run.stderr[-2000:]}"
    # and the guard works: Ray's own psutil loads, timm (a job's model zoo) does not
    run = imports_without("import ray, psutil\nimport timm", blocked)
    assert run.returncode != 0 and "No module named 'timm'" in run.stderr, run.stderr[-500:]


def test_worker_wheels_are_the_runtime_closure_without_dev_packages():
    script = (SCRIPTS / "wheels.sh").read_text()
    # the worker's wheels: the project's dependencies and its service and ray extras
    assert '["dependencies"] + p["optional-dependencies"]["service"]' in script
    assert '+ p["optional-dependencies"]["ray"]' in script
    assert '-c requirements.lock -r "$WHEELS/project-requirements.txt"' in script
    runtime = closure(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["service"]
                      + PROJECT["optional-dependencies"]["ray"])
    assert not runtime & DEV_ONLY, sorted(runtime & DEV_ONLY)
    assert {"torch", "timm", "ray", "fastapi", "psycopg"} <= runtime


def test_dockerignore_lets_in_only_what_the_dockerfiles_copy():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # all out, then the needed paths back in
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = {src for name in DOCKERFILES for word, a in instructions(DOCKER / name)
              if word == "COPY" and not a.startswith("--from") for src in shlex.split(a)[:-1]}
    assert copied <= allowed, copied - allowed
    assert not {p for p in allowed if p.split("/")[0] in {".venv", ".git", "tests", "runs"}}
    assert all(p.startswith("out/docker/wheels/") for p in allowed if p.startswith("out"))
    assert "**/__pycache__" in lines


def test_scripts_parse_and_make_target_runs_the_smoke_test():
    for script in sorted(SCRIPTS.glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
        assert "set -euo pipefail" in script.read_text()
    subprocess.run(["sh", "-n", str(DOCKER / "start-api.sh")], check=True)
    assert (DOCKER / "start-api.sh").stat().st_mode & 0o111
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^docker-smoke:.*\n\t(.+)", makefile, re.M)
    assert target and target.group(1).strip() == "scripts/docker/smoke.sh"
    # kept out of `make test`: the smoke test needs an engine, and builds GBs of images
    assert "docker" not in re.search(r"^test:.*", makefile, re.M).group(0)
    smoke = (SCRIPTS / "smoke.sh").read_text()
    assert "127.0.0.1" in smoke and "0.0.0.0" not in smoke
    assert "submit digits_vit_w8a8" in smoke and "SHA256SUMS" in smoke
    assert "down --volumes" in smoke  # tears down what it made
