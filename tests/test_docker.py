"""docker/: the Dockerfiles and compose file checked against the project (Docker cannot run
here): copied paths exist, commands are real console scripts whose options parse, ports match
the defaults, every COMPRESS_* variable is one the code reads, the volume is shared."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from compress.cli import main
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.api", "Dockerfile.worker", "Dockerfile.worker-cuda"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


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


def check_command(argv: list[str]) -> None:
    """argv[0] is a console script of the project or of Ray; its options parse with click."""
    scripts = PYPROJECT["project"]["scripts"]
    if argv[0] == "compress":
        assert scripts["compress"] == "compress.cli:main"
        ctx = main.make_context("compress", list(argv[1:]), resilient_parsing=False)
        sub = main.get_command(ctx, argv[1])
        assert sub is not None, f"compress has no command {argv[1]!r}"
        sub.make_context(argv[1], list(argv[2:]))  # raises on an unknown or bad option
    elif argv[0] == "ray":
        pytest.importorskip("ray")
        from importlib.metadata import entry_points

        ep = {e.name: e for e in entry_points(group="console_scripts")}["ray"]
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


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_matches_the_project(name):
    steps = instructions(DOCKER / name)
    assert steps[0][0] == "FROM"
    base = steps[0][1]
    assert ("nvidia/cuda" in base) == name.endswith("cuda"), base
    py = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12": every image runs 3.11
    assert "3.11" in py and ("python:3.11" in base or "python3.11" in (DOCKER / name).read_text())

    if name.endswith("cuda"):  # the image's CUDA is the one the locked torch wheels use
        lock = (ROOT / "requirements.lock").read_text()
        toolkit = re.search(r"^cuda-toolkit==(\d+)\.", lock, re.M).group(1)
        assert re.search(rf"nvidia/cuda:{toolkit}\.\d+\.\d+-", base), (base, toolkit)

    copied = []
    for word, args in steps:
        if word == "COPY":
            *srcs, _dest = shlex.split(args)
            for src in srcs:
                assert (ROOT / src).exists(), f"{name}: COPY {src} is not in the repository"
                copied.append(src)
    # the requirements file, and the package's sources that the install step builds from
    assert "requirements.lock" in copied and (ROOT / "requirements.lock").is_file()
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pkg.rstrip("*") in copied
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "pip install -r requirements.lock" in runs
    extras = re.search(r'pip install --no-deps "\.\[([a-z,]+)\]"', runs).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert {"service", "ray"} <= set(extras)

    cmd = json.loads(dict(steps)["CMD"])
    check_command(cmd)
    names = [n for word, args in steps if word == "ENV" for n in env_names(args)]
    check_compress_vars(names)
    exposed = {int(p) for word, args in steps if word == "EXPOSE" for p in args.split()}
    if name == "Dockerfile.api":
        port = main.get_command(click.Context(main), "serve").params
        default = next(p.default for p in port if p.name == "port")
        assert cmd[cmd.index("--port") + 1] == str(default) and default in exposed
        assert dict(zip(names, names, strict=False))["COMPRESS_SERVICE_DATA_DIR"]
    else:
        assert cmd[:2] == ["ray", "start"]


def test_compose_wires_api_database_ray_and_shared_volume():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"api", "postgres", "ray-head", "ray-worker", "ray-worker-gpu"} <= set(services)
    for svc in services.values():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
        if "command" in svc:
            check_command(svc["command"])

    api = services["api"]
    env = api["environment"]
    check_compress_vars(env)
    for svc in ("ray-head", "ray-worker", "ray-worker-gpu"):
        check_compress_vars(services[svc].get("environment", {}))
    settings = Settings(**{k.removeprefix("COMPRESS_SERVICE_").lower(): v for k, v in env.items()
                           if k != "COMPRESS_SERVICE_TOKENS"})
    cmd = api["command"]
    assert cmd[cmd.index("--runner") + 1] == "ray"

    # ports: the API's published port is `serve`'s; the Ray address is the head's GCS port
    serve = main.get_command(click.Context(main), "serve")
    port = next(p.default for p in serve.params if p.name == "port")
    assert cmd[cmd.index("--port") + 1] == str(port)
    assert f"{port}:{port}" in api["ports"]
    head_port = next(a.split("=")[1] for a in services["ray-head"]["command"]
                     if a.startswith("--port="))
    address = cmd[cmd.index("--ray-address") + 1]
    assert address == f"ray-head:{head_port}"
    for svc in ("ray-worker", "ray-worker-gpu"):
        assert f"--address={address}" in services[svc]["command"]
    assert "--num-gpus=1" in services["ray-worker-gpu"]["command"]

    # the database is the compose PostgreSQL, with its credentials
    pg = services["postgres"]["environment"]
    url = settings.database_url
    assert url == (f"postgresql+psycopg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{pg['POSTGRES_DB']}")
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"

    # inputs, logs and artifacts: one volume, at DATA_DIR on the API and on every Ray node
    mount = f"artifacts:{settings.data_dir.as_posix()}"
    assert mount in api["volumes"]
    for svc in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert mount in services[svc]["volumes"], svc
    assert "artifacts" in compose["volumes"]
