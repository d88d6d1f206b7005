import json

import numpy as np
import pytest

from compress.report import strict_json


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_become_null_with_a_warning():
    report = {"metrics": {"compressed": {"kl": float("nan"), "cosine_mean": np.float32("inf"),
                                          "top1": 0.5}},
              "export": {"parity": [{"batch_size": 1, "cosine": float("-inf")}]},
              "latency": {"original": {1: 2.5}}, "warnings": ["earlier"]}
    text = strict_json(report)
    out = _strict_loads(text)
    assert out["metrics"]["compressed"] == {"kl": None, "cosine_mean": None, "top1": 0.5}
    assert out["export"]["parity"][0]["cosine"] is None
    assert out["latency"]["original"] == {"1": 2.5}
    assert out["warnings"][0] == "earlier"
    assert out["warnings"][1] == (
        "values that were not finite numbers are written as null: metrics.compressed.kl (nan), "
        "metrics.compressed.cosine_mean (inf), export.parity.0.cosine (-inf)")
    assert report["metrics"]["compressed"]["kl"] != report["metrics"]["compressed"]["kl"]  # copy


def test_finite_report_is_unchanged():
    report = {"a": [1, 2.5, None, "x"], "b": {"c": np.float64(0.25), "d": np.int64(3)}}
    assert _strict_loads(strict_json(report)) == {"a": [1, 2.5, None, "x"],
                                                  "b": {"c": 0.25, "d": 3}}


def test_plain_json_dumps_would_write_bare_nan():
    # What report.json held before: invalid for strict parsers.
    with pytest.raises(ValueError, match="bare NaN"):
        _strict_loads(json.dumps({"kl": float("nan")}))
