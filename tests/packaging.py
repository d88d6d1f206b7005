"""Build the wheel and install it into fresh virtual environments, offline, for the packaging and
examples tests.

Nothing is downloaded: the wheel builds without isolation (setuptools of this environment) and
its dependencies are this environment's own installed distributions, put on the new
environment's path by a .pth file. The client environment gets only the closure of the base and
[client] requirements (symlinked), so torch and the rest of [local] are absent there for real.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "compress-models"
SOURCES = ("pyproject.toml", "README.md", "compress", "service", "recipes")
# What the client path must never import (the [local] and [service] extras' heavy modules).
HEAVY_MODULES = ("torch", "timm", "onnx", "onnxruntime", "transformers", "optimum", "numpy",
                 "sklearn", "safetensors", "pydantic", "fastapi", "sqlalchemy", "uvicorn")


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 600)
    return subprocess.run([str(a) for a in argv], **kw)


def build_wheel(work: Path) -> Path:
    """The wheel of a clean copy of the sources (links kept: compress/bundled_recipes is one)."""
    wheel_dir = work / "dist"
    found = sorted(wheel_dir.glob("compress_models-*.whl")) if wheel_dir.is_dir() else []
    if found:
        return found[-1]
    src = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-index", "-q", "-w", wheel_dir, src])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("compress_models-*.whl")
    return wheel


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode()


def requirements(wheel: Path, extras: set[str]) -> list[Requirement]:
    """The wheel's requirements that apply with ``extras`` (self-references expanded)."""
    reqs = [Requirement(line.split(":", 1)[1].strip())
            for line in wheel_metadata(wheel).splitlines() if line.startswith("Requires-Dist:")]
    out, extras = [], set(extras)
    changed = True
    while changed:  # `service` names compress-models[client,local]: follow it
        changed = False
        for r in reqs:
            if r.name == DISTRIBUTION and _applies(r, extras) and not r.extras <= extras:
                extras |= r.extras
                changed = True
    for r in reqs:
        if r.name != DISTRIBUTION and _applies(r, extras):
            out.append(r)
    return out


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(reqs: list[Requirement]) -> dict[str, md.Distribution]:
    """The installed distributions that ``reqs`` pull in, transitively (this environment's)."""
    seen: dict[str, md.Distribution] = {}
    todo = [(r, set(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        key = _norm(req.name)
        if key in seen:
            continue
        dist = md.distribution(req.name)
        seen[key] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if _applies(sub, extras):
                todo.append((sub, set(sub.extras)))
    return seen


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def link_distributions(dists: dict[str, md.Distribution], dest: Path) -> Path:
    """A folder of links to these distributions' files (packages, modules, .dist-info)."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops - {"..", "__pycache__"}:
            if (base / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(base / top)
    return dest


def make_venv(path: Path, extra_paths: list[Path], *, with_pip: bool = True) -> Path:
    """A new virtual environment with ``extra_paths`` after its own site-packages."""
    proc = run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), path])
    assert proc.returncode == 0, proc.stderr
    py = path / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                    ).stdout.strip())
    (site / "_compress_test_deps.pth").write_text("".join(f"{p}\n" for p in extra_paths))
    return path


def pip_install(venv: Path, *args, env: dict | None = None) -> None:
    proc = run([venv / "bin" / "python", "-m", "pip", "install", "--no-index", "-q",
                "--disable-pip-version-check", *args], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def full_venv(work: Path) -> Path:
    """The wheel installed (no dependencies) in a new environment that sees this one's packages:
    what `pip install compress-models[service]` gives, without downloading torch again."""
    venv = work / "venv-full"
    if (venv / "bin" / "compress").is_file():
        return venv
    wheel = build_wheel(work)
    make_venv(venv, [Path(sysconfig.get_path("purelib"))], with_pip=True)
    # --ignore-installed: this environment's own (editable) install must stay as it is
    pip_install(venv, "--no-deps", "--ignore-installed", wheel)
    return venv


def client_venv(work: Path) -> Path:
    """A new environment holding only the base and [client] requirements (links to this
    environment's copies) and pip; the wheel is installed later, by the examples' own line."""
    venv = work / "venv-client"
    if (venv / "bin" / "python").is_file():
        return venv
    wheel = build_wheel(work)
    deps = link_distributions(closure(requirements(wheel, {"client"})), work / "client-deps")
    make_venv(venv, [deps], with_pip=True)
    return venv


def offline_pip_env(wheel_dir: Path, venv: Path, base: dict | None = None) -> dict:
    """Environment in which `pip install "compress-models[client]..."`, as an example writes
    it, installs the wheel just built and takes every dependency as already installed."""
    env = dict(base if base is not None else os.environ)
    env.update({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheel_dir),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                "VIRTUAL_ENV": str(venv)})
    for var in ("PYTHONPATH", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        env.pop(var, None)
    return env
