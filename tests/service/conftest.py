"""Service fixtures: tiny ONNX models and data, a job store on SQLite or PostgreSQL, an app.

PostgreSQL tests use a fresh schema in the loopback server's ``test`` database (override with
``COMPRESS_TEST_POSTGRES_URL``); they skip when no server answers, except under CI, where the
server is part of the machine and a missing one is an error.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402

POSTGRES_URL = os.environ.get("COMPRESS_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TOKENS = {"token-a": "tenant-a", "token-b": "tenant-b"}
AUTH_A = {"Authorization": "Bearer token-a"}
AUTH_B = {"Authorization": "Bearer token-b"}


def _onnx_mlp(path: Path, in_shape: tuple[int, ...], hidden: list[int], seed: int) -> None:
    """An image classifier as a plain ONNX graph: Flatten -> (MatMul + Add + Relu)* -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [int(np.prod(in_shape)), *hidden, 10]
    nodes = [helper.make_node("Flatten", ["x"], ["h0"], axis=1)]
    inits = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        last = i == len(dims) - 2
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["logits" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def onnx_job_files(tmp_path_factory) -> dict[str, Path]:
    """A small ONNX classifier with calibration/evaluation arrays, and a slow one (big MatMuls)
    whose latency stage runs for minutes: the job to cancel or kill while it runs."""
    import onnxruntime as ort

    d = tmp_path_factory.mktemp("onnx_job")
    _onnx_mlp(d / "tiny.onnx", (3, 8, 8), [32], seed=0)
    _onnx_mlp(d / "slow.onnx", (3, 8, 8), [1024, 1024, 1024], seed=1)
    x = np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)
    labels = ort.InferenceSession(str(d / "tiny.onnx")).run(None, {"x": x})[0].argmax(1)
    np.savez(d / "calib.npz", x=x[:32])
    np.savez(d / "eval.npz", x=x[32:], labels=labels[32:].astype(np.int64))
    return {"dir": d, "model": d / "tiny.onnx", "slow": d / "slow.onnx",
            "calib": d / "calib.npz", "eval": d / "eval.npz"}


def onnx_recipe(passes: list[dict] | None = None, *, gate: dict | None = None,
                latency: dict | None = None, name: str = "tiny-onnx") -> str:
    """Recipe YAML for an uploaded ONNX model: cheap, latency off unless asked."""
    import yaml

    recipe = {"version": 1, "name": name,
              "model": {"source": "onnx", "path": "uploaded.onnx"},
              "evaluation": {"num_samples": 16, "batch_size": 8, "gate": gate or {},
                             "latency": latency or {"enabled": False}},
              "passes": passes or []}
    if passes:  # the section that static quantization needs; the data comes as 'calib'
        recipe["calibration"] = {"num_samples": 32, "batch_size": 16}
    return yaml.safe_dump(recipe, sort_keys=False)


SLOW_LATENCY = {"batch_sizes": [64], "repeats": 10000, "warmup": 0}


def job_files(files: dict[str, Path], model: str = "model") -> dict:
    """The multipart ``files`` of a job over the tiny ONNX model (open file handles)."""
    return {"model": ("model.onnx", open(files[model], "rb")),
            "calib": ("calib.npz", open(files["calib"], "rb")),
            "eval": ("eval.npz", open(files["eval"], "rb"))}


@contextmanager
def database(kind: str, folder: Path):
    """A fresh SQLite file or PostgreSQL schema; yields its SQLAlchemy URL."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'jobs.db'}"
        return
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except sa.exc.OperationalError as e:
        if os.environ.get("CI"):  # CI has the server: a missing one is an error there
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {str(e).splitlines()[0]}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with database(request.param, tmp_path) as url:
        yield url


def make_settings(tmp_path: Path, db_url: str, **kw) -> Settings:
    base = {"data_dir": tmp_path / "data", "database_url": db_url, "tokens": dict(TOKENS),
            "workers": 2, "poll_interval_s": 0.2, "cancel_grace_s": 1.0, "instance": "test"}
    return Settings(**{**base, **kw})


@contextmanager
def running_service(settings: Settings):
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings)) as client:
        yield client


def wait_for(client, job_id: str, states=("succeeded", "gate_failed", "failed", "cancelled"),
             timeout: float = 60, headers=AUTH_A) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")


@contextmanager
def live_server(settings: Settings):
    """The app behind a real uvicorn server on a free loopback port; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def server(tmp_path):
    """A live service on SQLite with two workers; yields (url, settings)."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")
    with live_server(settings) as url:
        yield url, settings
