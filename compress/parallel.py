"""Fan-out of independent tasks inside one job (e.g. Greedy MP's per-layer sensitivities).

``map_tasks(fn, items)`` returns ``[fn(item) for item in items]`` in order. It runs serially,
unless a Ray cluster is configured: then every item is one Ray task and the calls run on the
cluster's workers, results still in item order, the first failing item's exception raised as
its own type (the other tasks are cancelled); a task whose worker process dies runs once more.

Configuration (no recipe change needed, so the same recipe runs on a laptop and a cluster):

  COMPRESS_RAY_ADDRESS     a Ray cluster address (``ray-head:6379``, ``auto`` for the cluster
                           this machine joined with ``ray start``); unset: serial. A process
                           already connected (``ray.init`` done) submits to its own cluster.
  COMPRESS_RAY_TASK_CPUS   CPUs each task reserves (default 1; Ray then runs torch with that many
                           threads), so a 2-CPU node runs two tasks at a time.

``fn`` must be a picklable module-level function and each item self-contained (tensors, state
dicts, configs), because the calls may run in other processes or on other machines. A large
read-only object that every call needs (a model, calibration batches) goes in ``shared``: it is
sent to the cluster once (Ray's object store) and every call is ``fn(item, shared)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("compress.parallel")

ENV_ADDRESS = "COMPRESS_RAY_ADDRESS"
ENV_TASK_CPUS = "COMPRESS_RAY_TASK_CPUS"
_UNSET = object()


def ray_address() -> str | None:
    """The configured cluster (None: serial)."""
    return os.environ.get(ENV_ADDRESS) or None


def backend() -> str:
    """``"ray"`` when ``map_tasks`` would fan out over a cluster, else ``"serial"``."""
    return "ray" if ray_address() else "serial"


def map_tasks(fn: Callable[..., Any], items: Iterable[Any], *, description: str = "",
              shared: Any = _UNSET, num_cpus: float | None = None) -> list:
    """Apply ``fn`` to every item (``fn(item, shared)`` when ``shared`` is given); results in
    item order. ``num_cpus`` overrides ``COMPRESS_RAY_TASK_CPUS`` for this call."""
    items = list(items)
    if not items or not ray_address():
        if shared is _UNSET:
            return [fn(item) for item in items]
        return [fn(item, shared) for item in items]
    return _ray_map(fn, items, description, shared, num_cpus)


def _ray_map(fn, items: list, description: str, shared, num_cpus: float | None) -> list:
    try:
        import ray
    except ImportError as e:  # configured, but the extra is missing: say so, never go serial
        raise RuntimeError(f"{ENV_ADDRESS} is set but Ray is not installed: pip install "
                           "'compress-models[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=ray_address(), log_to_driver=False, configure_logging=False)
    cpus = num_cpus if num_cpus is not None else float(os.environ.get(ENV_TASK_CPUS, "1"))
    remote = ray.remote(num_cpus=cpus, max_retries=1)(fn)
    log.info("%s: %d tasks on Ray (%g CPU each)", description or fn.__name__, len(items), cpus)
    if shared is _UNSET:
        refs = [remote.remote(item) for item in items]
    else:
        shared_ref = ray.put(shared)  # once; each task gets it from the object store
        refs = [remote.remote(item, shared_ref) for item in items]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        for ref in refs:
            ray.cancel(ref)
        raise e.as_instanceof_cause() from None
