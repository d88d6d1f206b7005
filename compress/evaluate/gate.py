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


def performance_checks(gate: GateSpec, speedup: dict | None, compressed_bytes: int
                       ) -> list[dict]:
    """Rows for the speed and size limits; ``speedup`` maps batch size -> fp32 / compressed
    ONNX Runtime latency (as measured by the latency stage, keys as strings or ints)."""
    checks = []
    if gate.min_speedup is not None:
        if not speedup:
            # The recipe validator refuses min_speedup without latency; this is a run where
            # timing produced nothing, which must not pass silently.
            raise DataError("evaluation.gate.min_speedup needs latency measured, but no latency "
                            "was recorded; enable evaluation.latency")
        measured = {int(bs): value for bs, value in speedup.items()}
        wanted = gate.min_speedup if isinstance(gate.min_speedup, dict) else \
            dict.fromkeys(measured, gate.min_speedup)
        for bs, limit in sorted(wanted.items()):
            if bs not in measured:
                raise DataError(f"evaluation.gate.min_speedup has batch {bs}, which latency did "
                                f"not measure (measured: {sorted(measured)})")
            value = measured[bs]
            checks.append({"metric": f"speedup_batch_{bs}", "limit": limit,
                           "value": round(value, 4), "passed": value >= limit - 1e-9})
    if gate.max_size_mb is not None:
        size_mb = compressed_bytes / 1e6
        checks.append({"metric": "size_mb", "limit": gate.max_size_mb,
                       "value": round(size_mb, 4), "passed": size_mb <= gate.max_size_mb})
    return checks


AT_MOST = ("accuracy_drop_points", "kl", "logits_rel_error", "size_mb")


def describe_failure(check: dict) -> str:
    metric = check["metric"]
    if metric.startswith("speedup_batch_"):
        from ..report.verdict import speed_words

        return (f"speedup at batch {metric.removeprefix('speedup_batch_')} is "
                f"{check['value']:.2f} (compressed is {speed_words(check['value'])} than fp32), "
                f"the gate wants at least {check['limit']:g} (evaluation.gate.min_speedup)")
    cmp = "at most" if metric in AT_MOST else "at least"
    return f"{metric} is {check['value']}, the gate wants {cmp} {check['limit']}"
