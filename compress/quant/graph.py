"""W8A8 on the ONNX graph, for convolutional networks: Q/DQ on every tensor between the ops
that ONNX Runtime runs as integer kernels.

Why CNNs need this and transformers do not: ORT turns ``DQ -> MatMul <- DQ(weight)`` into
``MatMulIntegerToFloat`` with a float output, so a transformer is fast with only its Linear
inputs quantized (what ``quantize``'s torch modules export). A Conv is different: ORT's QDQ
rule for Conv needs a ``QuantizeLinear`` on the *output* as well (``DQ -> Conv -> Q`` becomes
``QLinearConv``), and its NHWC layout transformer only keeps chains of QLinear ops in uint8
NHWC. With Q/DQ on Conv inputs only (what the torch modules export), every Conv stays a float
Conv fed by a runtime dequantization, the BatchNorm after it can no longer be fused (its weight
is not a constant), and Reorder nodes convert NCHW <-> NCHWc around each one: measured 0.72x
of fp32 on ResNet-18 at batch 8, 2 threads. Placing Q/DQ on every activation tensor between
Conv, Add, pooling, Relu/Clip (absorbed into the quantization range) and Gemm, as ORT's own
static quantizer does, gives ``QLinearConv``/``QLinearAdd``/``NhwcMaxPool``/``QGemm`` chains.
The graph is quantized with ORT's QDQ quantizer (calibrated on the recipe's data), with the
settings that keep accuracy on x86 CPUs: per-channel int8 weights, uint8 activations, 7-bit
weight codes where the u8s8 kernel saturates, MatMuls between two activations left float.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from ..data import Dataset

# Activation observers of ``quantize`` -> ORT calibration methods. mse/cosine clip outliers;
# the graph-level analogue is a high percentile (ORT 1.32's entropy calibration gave ranges
# identical to min-max on MobileNetV3 and ConvNeXt: same file, byte for byte).
CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "mse": "Percentile",
               "cosine": "Percentile"}
CLIP_PERCENTILE = 99.999  # for mse/cosine: measured relative logit error 0.041 vs 0.042 min-max
# LayerNorm stays float, as in the torch engine: quantizing its input and output raised
# ConvNeXt-atto's relative logit error from 0.0245 to 0.0294 and saved no time.
FLOAT_OP_TYPES = ("LayerNormalization",)
# Ops ORT's QDQ quantizer places Q/DQ around by default, plus elementwise ops that ORT has QDQ
# fusions for (QLinearAdd/Mul/Sigmoid/AveragePool/GlobalAveragePool/LeakyRelu): keeping them
# integer keeps the NHWC uint8 chain unbroken (EfficientNet's SiLU, squeeze-excite, residuals).
EXTRA_OP_TYPES = ("Add", "Mul", "Sigmoid", "GlobalAveragePool", "LeakyRelu")


class _Reader:
    """ORT CalibrationDataReader over a calibration Dataset (feeds by the session's inputs)."""

    def __init__(self, path: Path, data: Dataset, batch_size: int):
        from ..export.ort import feed_for, make_session

        sess = make_session(path)
        self.feeds = [feed_for(sess, b) for b in data.batches(batch_size)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def default_op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry

    return sorted((set(QDQRegistry) | set(EXTRA_OP_TYPES)) - set(FLOAT_OP_TYPES))


def quantize_graph(src: Path, dst: Path, calib: Dataset, *, workdir: Path, batch_size: int = 16,
                   samples: int = 128, observer: str = "minmax", percentile: float = 99.99,
                   per_channel: bool = True, reduce_range: bool = False,
                   op_types: list[str] | None = None,
                   nodes_to_exclude: list[str] = ()) -> dict:
    """Static QDQ W8A8 of the float ONNX model ``src`` into ``dst``; returns a summary.

    ``observer`` maps onto ORT's calibration (``CALIBRATION``). BatchNorm is folded into Conv by
    ORT's pre-processing (``quant_pre_process``) if the torch side has not done it already.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    pre = workdir / f"{src.stem}.pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimization only
        shutil.copyfile(src, pre)
    method = CALIBRATION[observer]
    extra = {"MatMulConstBOnly": True}
    if method == "Percentile":
        extra["CalibPercentile"] = percentile if observer == "percentile" else CLIP_PERCENTILE
    reader = _Reader(pre, calib.take(min(samples, len(calib))), batch_size)
    types = op_types or default_op_types()
    notes = []

    def run(method: str) -> None:
        reader.rewind()
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method),
                        op_types_to_quantize=types, nodes_to_exclude=list(nodes_to_exclude),
                        extra_options=extra, reduce_range=reduce_range)

    try:
        run(method)
    except ValueError as e:
        if method == "MinMax":
            raise
        # ORT's histogram calibrators fail on a tensor with a constant value ("Too many bins
        # for data range", EfficientNet-B0); min-max has no histogram.
        notes.append(f"{method} calibration failed in ONNX Runtime ({e}); used MinMax")
        method = "MinMax"
        extra.pop("CalibPercentile", None)
        run(method)
    proto = onnx.load(str(dst), load_external_data=False)
    quantized = Counter()
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
               for i in node.input):
            quantized[node.op_type] += 1
    return {"engine": "onnx", "calibration": method, "per_channel": per_channel,
            "reduce_range": reduce_range,
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
            "quantized_ops": dict(sorted(quantized.items(), key=lambda kv: -kv[1])),
            "calibration_samples": int(min(samples, len(calib))),
            **({"notes": notes} if notes else {})}


def output_sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    ref, got = reference.astype(np.float64), got.astype(np.float64)
    noise = float(((ref - got) ** 2).sum())
    return round(10 * np.log10(max(float((ref ** 2).sum()), 1e-30) / max(noise, 1e-30)), 2)


def apply_pending(handle, model_onnx: Path, calib: Dataset | None, workdir: Path,
                  batch_size: int) -> dict | None:
    """Run the graph quantization a ``quantize`` pass (engine: onnx) left in
    ``handle.info["graph_quantize"]`` on the exported ``model_onnx``, in place; returns the
    summary (also written into that pass's report), or None when nothing was pending."""
    from ..errors import DataError
    from ..export.onnx import slim_onnx

    pending = handle.info.pop("graph_quantize", None)
    if pending is None:
        return None
    if calib is None:
        raise DataError(f"passes.{pending['index']} (quantize) needs calibration data")
    float_path = workdir / "graph_quantize" / "model.float.onnx"
    float_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_onnx, float_path)
    summary = quantize_graph(float_path, model_onnx, calib, workdir=float_path.parent,
                             batch_size=batch_size, samples=pending["samples"],
                             observer=pending["observer"], percentile=pending["percentile"],
                             reduce_range=pending["reduce_range"])
    slim_onnx(model_onnx)
    pending["report"].summary.update(summary)
    return summary
