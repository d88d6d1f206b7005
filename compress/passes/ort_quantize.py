"""ONNX Runtime's own INT8 quantizer, run on the exported graph (and on uploaded ONNX models)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from ..context import PassContext
from ..errors import DataError
from ..export.ort import feed_for, make_session, u8s8_saturates
from ..models.handle import ModelHandle
from ..registry import PassConfig, register_pass


class OrtQuantizeConfig(PassConfig):
    """INT8 quantization of the ONNX graph with ONNX Runtime's quantize_static/quantize_dynamic.

    Works on any exported or uploaded ONNX model. The defaults avoid what wrecks transformers
    with ORT's stock settings: only weight MatMul/Gemm/Conv are quantized (not LayerNorm, Softmax
    or Add), activation x activation MatMuls are left in float, MatMul outputs stay float, and
    activations are uint8 with int8 per-channel weights (U8S8, what x86 integer kernels want).
    Static mode needs calibration data; dynamic mode does not.

    Recipe:
        - type: ort_quantize
          mode: static
          calibrate_method: minmax
    """

    type: Literal["ort_quantize"] = "ort_quantize"
    mode: Literal["static", "dynamic"] = "static"
    per_channel: bool = True
    op_types: list[Literal["MatMul", "Gemm", "Conv"]] | Literal["auto", "all"] = Field(
        "auto", description="ops whose weights and inputs are quantized. all: every op ORT has "
        "an integer (QDQ) kernel for, with Q/DQ on the tensors between them (Conv outputs, "
        "residual Adds, pooling), which convolutional networks need to run as QLinearConv in "
        "NHWC. auto: all for graphs with Conv nodes and no LayerNormalization/Softmax, else "
        "[MatMul, Gemm, Conv] (what keeps transformers accurate)")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    exclude_activation_matmuls: bool = Field(
        True, description="keep MatMuls without a constant operand (q@k^T, probs@v) in float")
    quantize_outputs: bool = Field(False, description="also quantize MatMul/Gemm outputs")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="ONNX node names")
    calibration_samples: int = Field(128, ge=1, le=100_000)
    reduce_range: bool | None = Field(
        None, description="ORT's reduce_range (7-bit weights); null: on where this machine's "
        "CPU lacks VNNI/AMX and ORT's u8s8 kernel would saturate full-range weights")


def resolve_op_types(op_types, proto: onnx.ModelProto) -> list[str]:
    """The op list for ORT's quantizer (``OrtQuantizeConfig.op_types``)."""
    from ..quant.graph import default_op_types

    if op_types == "all":
        return default_op_types()
    if op_types == "auto":
        ops = {n.op_type for n in proto.graph.node}
        convnet = "Conv" in ops and not ops & {"LayerNormalization", "Softmax"}
        return default_op_types() if convnet else ["MatMul", "Gemm", "Conv"]
    return list(op_types)


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes neither of whose inputs is a constant (attention products)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


class _Reader:
    """ORT CalibrationDataReader over the calibration set (fixed padding for histograms)."""

    def __init__(self, ctx: PassContext, path: Path, samples: int, pad_to: int | None):
        self.sess = make_session(path)
        self.batches = list(ctx.calib.take(samples).batches(ctx.batch_size))
        if pad_to:
            # Histogram calibrators need every batch the same shape (ORT issue: "inhomogeneous").
            self.batches = [{k: _pad(v, pad_to) for k, v in b.items()} for b in self.batches]
        self.it = iter(self.batches)

    def get_next(self):
        b = next(self.it, None)
        return None if b is None else feed_for(self.sess, b)

    def rewind(self):
        self.it = iter(self.batches)

    def __iter__(self):  # qdq_loss_debug iterates readers
        return iter(feed_for(self.sess, b) for b in self.batches)


def _pad(t, length):
    import torch.nn.functional as F

    return F.pad(t, (0, length - t.shape[1])) if t.ndim == 2 else t


@register_pass(OrtQuantizeConfig, stage="onnx",
               needs_calibration=lambda c: c.mode == "static")
def ort_quantize(model: ModelHandle, config: OrtQuantizeConfig, ctx: PassContext) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    src = ctx.onnx_path
    pre = ctx.workdir / f"pass{ctx.index}_pre.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - pre-processing is an optimization only
        ctx.report.warn(f"quant_pre_process failed ({type(e).__name__}); quantizing the raw graph")
        shutil.copyfile(src, pre)
    proto = onnx.load(str(pre), load_external_data=False)
    exclude = list(config.nodes_to_exclude)
    if config.exclude_activation_matmuls:
        exclude += activation_matmuls(proto)
    extra = {} if config.quantize_outputs else {
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]}
    out = ctx.workdir / f"pass{ctx.index}_q.onnx"
    reduce = u8s8_saturates() if config.reduce_range is None else config.reduce_range
    op_types = resolve_op_types(config.op_types, proto)
    if set(op_types) - {"MatMul", "Gemm", "Conv"}:
        # Q/DQ between ops: the Conv/Add/pool outputs are quantized too (see quant/graph.py).
        extra = {"MatMulConstBOnly": True}
    ctx.progress(0.1, f"{config.mode} quantization")
    if config.mode == "dynamic":
        quantize_dynamic(str(pre), str(out), per_channel=config.per_channel,
                         weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                         nodes_to_exclude=exclude, reduce_range=reduce)
    else:
        if ctx.calib is None:
            raise DataError(f"passes.{ctx.index} (ort_quantize, static) needs calibration data")
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[config.calibrate_method]
        pad = None
        if config.calibrate_method != "minmax" and "input_ids" in ctx.calib.inputs:
            pad = ctx.calib.inputs["input_ids"].shape[1]
        reader = _Reader(ctx, pre, config.calibration_samples, pad)
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=op_types, nodes_to_exclude=exclude,
                        extra_options=extra, reduce_range=reduce)
    shutil.copyfile(out, src)
    q = onnx.load(str(src), load_external_data=False)
    n_q = sum(1 for n in q.graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"))
    ctx.report.summary.update(mode=config.mode, calibrate_method=config.calibrate_method,
                              op_types=op_types,
                              reduce_range=reduce,
                              excluded_nodes=len(exclude), quantize_nodes=n_q)
