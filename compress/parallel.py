"""Fan-out of independent tasks inside one job (e.g. Greedy MP's per-layer sensitivities).

``map_tasks(fn, items)`` returns ``[fn(item) for item in items]`` in order. Serial here; a
distributed backend (Ray) replaces the loop when one is configured. ``fn`` must be a picklable
module-level function and each item self-contained (tensors, state dicts, configs), because a
backend may run the calls in other processes or on other machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def map_tasks(fn: Callable[[Any], Any], items: Iterable[Any], *, description: str = "") -> list:
    """Apply ``fn`` to every item; results in item order."""
    return [fn(item) for item in items]
