"""The recipe's quality gate: every configured limit must hold on the exported model."""

from __future__ import annotations

from ..errors import DataError
from ..specs import GateSpec


def gate_checks(gate: GateSpec, task: str, original: dict, compressed: dict, k: int
                ) -> list[dict]:
    """One row per configured limit: metric, limit, value, passed."""
    checks = []

    def need(metric: str, source: dict, field: str):
        if metric not in source:
            raise DataError(f"evaluation.gate.{field} needs {metric!r}, which this "
                            f"{task} evaluation does not produce"
                            + (" (the evaluation data has no labels)" if metric == "top1" else ""))
        return source[metric]

    if gate.max_accuracy_drop is not None:
        drop = (need("top1", original, "max_accuracy_drop")
                - need("top1", compressed, "max_accuracy_drop")) * 100
        checks.append({"metric": "accuracy_drop_points", "limit": gate.max_accuracy_drop,
                       "value": round(drop, 4), "passed": drop <= gate.max_accuracy_drop + 1e-9})
    for field, metric, op in (("min_top1_agreement", "top1_agreement", "ge"),
                              ("max_kl", "kl", "le"),
                              ("max_logits_rel_error", "logits_rel_error", "le"),
                              ("min_cosine", "cosine_mean", "ge"),
                              ("min_sample_cosine", "cosine_min", "ge"),
                              ("min_retrieval_overlap", f"retrieval_top{k}_overlap", "ge")):
        limit = getattr(gate, field)
        if limit is None:
            continue
        value = need(metric, compressed, field)
        ok = value >= limit if op == "ge" else value <= limit
        checks.append({"metric": metric, "limit": limit, "value": round(value, 6), "passed": ok})
    return checks


def describe_failure(check: dict) -> str:
    cmp = "at most" if check["metric"] in ("accuracy_drop_points", "kl", "logits_rel_error") \
        else "at least"
    return f"{check['metric']} is {check['value']}, the gate wants {cmp} {check['limit']}"
