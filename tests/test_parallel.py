"""map_tasks: serial by default; on a real local Ray cluster when one is configured, with the
same results in item order, the shared object sent once, and a failing item's error raised."""

import os
import time
from pathlib import Path

import pytest
import torch

from compress import parallel
from compress.parallel import ENV_ADDRESS, backend, map_tasks

ROOT = Path(__file__).resolve().parents[1]


def _square_slowly(x: int) -> tuple[int, int]:
    time.sleep(0.05 * (6 - x))  # later items finish first: order must come from the items
    return x * x, os.getpid()


def _project(item: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    return item @ shared


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def test_serial_when_nothing_is_configured(monkeypatch):
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    assert backend() == "serial"
    out = map_tasks(_square_slowly, range(6))
    assert [v for v, _ in out] == [0, 1, 4, 9, 16, 25]
    assert {pid for _, pid in out} == {os.getpid()}
    w = torch.randn(8, 3)
    items = [torch.randn(4, 8) for _ in range(3)]
    outputs = map_tasks(_project, items, shared=w)
    assert len(outputs) == len(items)
    assert all(torch.equal(a, x @ w) for a, x in zip(outputs, items, strict=True))
    with pytest.raises(ValueError, match="item 3 is bad"):
        map_tasks(_fail_on_three, range(5))
    assert map_tasks(_square_slowly, []) == []


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 80 << 20, "include_dashboard": False})
    try:
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_fan_out_keeps_order_shares_once_and_raises(ray_address, monkeypatch):
    import ray

    monkeypatch.setenv(ENV_ADDRESS, ray_address)
    assert backend() == "ray"
    out = map_tasks(_square_slowly, range(6), description="squares")
    assert ray.is_initialized()  # map_tasks joined the configured cluster itself
    assert [v for v, _ in out] == [0, 1, 4, 9, 16, 25]
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids and len(pids) == 2  # two 1-CPU tasks at a time

    w = torch.randn(64, 16)
    items = [torch.randn(32, 64) for _ in range(5)]
    got = map_tasks(_project, items, shared=w)
    want = [x @ w for x in items]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(got, want, strict=True))

    with pytest.raises(ValueError, match="item 3 is bad"):
        map_tasks(_fail_on_three, range(6))

    # two CPUs per task on a two-CPU node: one task at a time, the results the same
    out1 = map_tasks(_square_slowly, range(6), num_cpus=2)
    assert [v for v, _ in out1] == [0, 1, 4, 9, 16, 25]
    monkeypatch.delenv(ENV_ADDRESS)  # not configured: serial, even in a connected process
    assert parallel.backend() == "serial"
    assert {pid for _, pid in map_tasks(_square_slowly, range(3))} == {os.getpid()}
