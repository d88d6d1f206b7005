"""map_tasks on a real local Ray cluster, run as a child process by tests/test_parallel.py.

Exits 0 when every check holds, SCENARIO_FAILED when one does not (the message says which);
any other exit status means Ray itself died (see the test's docstring for why that is separate).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

SCENARIO_FAILED = 3


def _square_slowly(x: int) -> tuple[int, int]:
    time.sleep(0.05 * (6 - x))  # later items finish first: order must come from the items
    return x * x, os.getpid()


def _project(item, shared):
    return item @ shared


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def scenario(address: str) -> None:
    import ray
    import torch

    from compress import parallel
    from compress.parallel import ENV_ADDRESS, map_tasks

    os.environ[ENV_ADDRESS] = address
    assert parallel.backend() == "ray"
    out = map_tasks(_square_slowly, range(6), description="squares")
    assert ray.is_initialized(), "map_tasks should join the configured cluster itself"
    assert [v for v, _ in out] == [0, 1, 4, 9, 16, 25], out
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids and len(pids) == 2, pids  # two 1-CPU tasks at a time

    torch.manual_seed(0)
    w = torch.randn(64, 16)
    items = [torch.randn(32, 64) for _ in range(5)]
    got = map_tasks(_project, items, shared=w)
    want = [x @ w for x in items]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(got, want, strict=True))

    try:
        map_tasks(_fail_on_three, range(6))
    except ValueError as e:
        assert "item 3 is bad" in str(e), e
    else:
        raise AssertionError("a failing item's ValueError was not raised")

    # two CPUs per task on a two-CPU node: one task at a time, the results the same
    out1 = map_tasks(_square_slowly, range(6), num_cpus=2)
    assert [v for v, _ in out1] == [0, 1, 4, 9, 16, 25], out1
    del os.environ[ENV_ADDRESS]  # not configured: serial, even in a connected process
    assert parallel.backend() == "serial"
    assert {pid for _, pid in map_tasks(_square_slowly, range(3))} == {os.getpid()}


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    # Lenient health checks: on a loaded 2-core machine a busy raylet must not be declared dead.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 80 << 20, "include_dashboard": False,
        "_system_config": {"health_check_failure_threshold": 30, "health_check_timeout_ms": 30000}})
    try:
        scenario(cluster.address)
    except AssertionError:
        traceback.print_exc()
        return SCENARIO_FAILED
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    print("scenario passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
