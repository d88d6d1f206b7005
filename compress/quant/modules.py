"""Fake-quantization modules that simulate integer inference in torch and export as ONNX Q/DQ.

In torch they compute exactly what ONNX Runtime computes from the exported graph: weights are
stored as integer codes plus scales, activations are rounded to codes and back. Under
``torch.onnx.export`` they emit QuantizeLinear/DequantizeLinear around standard MatMul/Conv,
which ORT fuses into integer kernels (MatMulIntegerToFloat, QLinearConv, MatMulNBits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (
    affine_qparams,
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    reshape_for_axis,
    search_two_region,
    sqnr_from_sums,
    symmetric_qparams,
    two_region_fake_quantize,
)
from .observers import make_observer


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def onnx_qdq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, opset: int = 21,
             clip: tuple[int, int] | None = None) -> torch.Tensor:
    """QuantizeLinear -> (Clip) -> DequantizeLinear on ``x`` (per tensor), for export only.

    ``clip`` narrows the integer range for simulated widths below 8 bits (Brevitas-style
    Q -> Clip -> DQ), since ONNX has no 3/5/6-bit integer types.
    """
    sym = torch.onnx.ops.symbolic
    q = sym("QuantizeLinear", [x, scale, zp], {}, dtype=zp.dtype, shape=x.shape, version=opset)
    if clip is not None:
        lo = torch.tensor(clip[0], dtype=zp.dtype)
        hi = torch.tensor(clip[1], dtype=zp.dtype)
        q = sym("Clip", [q, lo, hi], {}, dtype=zp.dtype, shape=x.shape, version=opset)
    return sym("DequantizeLinear", [q, scale, zp], {}, dtype=x.dtype, shape=x.shape,
               version=opset)


def onnx_dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                           axis: int, opset: int = 21) -> torch.Tensor:
    return torch.onnx.ops.symbolic("DequantizeLinear", [codes, scale, zp], {"axis": axis},
                                   dtype=torch.float32, shape=codes.shape, version=opset)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer.

    Modes: ``off`` (identity), ``observe`` (record ranges, identity), ``quant`` (fake-quantize with
    frozen scale and zero point). Asymmetric ranges use uint8 codes (U8S8 is what x86 integer
    kernels want); symmetric ranges use int8. Widths below 8 bits are simulated inside the
    8-bit container with a narrower clip, and reported as simulated.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, observer: str = "minmax",
                 percentile: float = 99.99):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"activation bits must be 2..8, got {bits}")
        self.bits = bits
        self.symmetric = symmetric
        self.observer_kind = observer
        self.percentile = percentile
        self.mode = "off"
        self.observer = None
        container = torch.int8 if symmetric else torch.uint8
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=container))

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, signed=self.symmetric, narrow=False)

    @property
    def simulated(self) -> bool:
        return self.bits != 8

    def start_observing(self) -> None:
        self.observer = make_observer(self.observer_kind, self.percentile, self.bits,
                                       self.symmetric)
        self.mode = "observe"

    @property
    def observed(self) -> bool:
        """Whether calibration data reached this quantizer (a branch the data never takes,
        or a layer after an early exit, leaves it empty)."""
        return self.observer is not None and not self.observer.empty

    def freeze(self) -> None:
        """Turn observed statistics into a scale and zero point and start quantizing."""
        if not self.observed:
            raise RuntimeError("ActQuantizer.freeze() before any calibration data was observed")
        lo, hi = self.observer.range()
        self.set_range(lo, hi)
        self.observer = None

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.symmetric:
            scale, zp = symmetric_qparams(torch.maximum(lo.abs(), hi.abs()), self.bits,
                                          narrow=False)
        else:
            scale, zp = affine_qparams(lo, hi, self.bits)
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zp.reshape(()).to(self.zero_point.dtype))
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observer.observe(x)
            return x
        if self.mode != "quant":
            return x
        qmin, qmax = self.qrange
        if _exporting():
            clip = (qmin, qmax) if self.simulated else None
            return onnx_qdq(x, self.scale, self.zero_point, clip=clip)
        return fake_quantize(x, self.scale, self.zero_point.to(torch.float32), qmin, qmax)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, symmetric={self.symmetric}, observer={self.observer_kind}, "
                f"mode={self.mode}")


class TwoRegionActQuantizer(ActQuantizer):
    """OPT-m: a fine grid for the dense region and a ``2^m`` times coarser one for the long
    tail, split and ``m`` searched by the error of the product the input feeds.

    Iso-bit: ``bits`` is the total. Two regions get ``bits - 1`` bits each (one flag bit picks
    the region, so 2^bits levels in all, as MPTQ-ViT's and PTQ4ViT's twin-uniform quantizers);
    where one region at ``bits`` measures better (no useful tail), the search keeps that and
    the quantizer is a plain ``bits``-bit one. A 4-bit OPT-m activation compares with a uniform
    4-bit one at equal bits. Region widths below 8 bits live in uint8 containers with a narrowed
    clip in the export (Q -> Clip -> DQ), as for ``ActQuantizer``, so ORT and the torch
    simulation agree when the tail saturates.

    Used on post-GELU inputs (``QuantLinear``, product with the weight) and on post-Softmax
    attention probabilities (``QuantMatMul``, product ``probs @ v``). Calibration keeps a sample
    of input rows, with the matching right operand for activation products (``observe(x,
    rhs)``); ``search(rhs)`` (called by the quantize pass) sets the split and scales. In torch
    it returns ``x1 + x2``; the owning module exports the two parts as two integer matmuls on
    the same right operand (exact, at twice that product's cost).
    """

    ROWS = 512
    # Activation products: more rows (each costs K x d in the search, still small), a few per
    # attention matrix so that several calibration batches contribute.
    PRODUCT_ROWS, ROWS_PER_MATRIX = 4096, 8

    def __init__(self, bits: int = 8):
        super().__init__(bits, symmetric=False, observer="minmax")
        self.register_buffer("split", torch.zeros((), dtype=torch.float32))
        self.register_buffer("scale2", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point2", torch.zeros((), dtype=torch.uint8))
        self.rows: list[torch.Tensor] = []
        self.rhs: list[torch.Tensor] = []
        self.range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kept = 0
        self.m = 0
        # Set by search(); until then the iso-bit two-region form.
        self.region_bits = bits - 1
        self.tail = True

    def start_observing(self) -> None:
        self.rows, self.rhs, self.range, self.kept = [], [], None, 0
        self.mode = "observe"

    def observe(self, x: torch.Tensor, rhs: torch.Tensor | None = None) -> None:
        """Keep a random sample of up to ``ROWS`` rows of ``x`` (last dim = features) and the
        range of all of ``x``.

        With ``rhs`` (the right operand of ``x @ rhs``, batched like ``x``) up to
        ``PRODUCT_ROWS`` sampled rows keep their batch dims and ``rhs`` is kept beside them, so
        the search can form the product.
        """
        lo, hi = x.detach().min().float().cpu(), x.detach().max().float().cpu()
        self.range = (lo, hi) if self.range is None else (
            torch.minimum(self.range[0], lo), torch.maximum(self.range[1], hi))
        budget = self.ROWS if rhs is None else self.PRODUCT_ROWS
        if self.kept >= budget:
            return
        g = torch.Generator().manual_seed(self.kept)
        if rhs is None:
            r = x.detach().flatten(0, -2).float().cpu()
            r = r[torch.randperm(r.shape[0], generator=g)[:budget - self.kept]]
            self.rows.append(r)
            self.kept += r.shape[0]
            return
        matrices = x[..., 0, 0].numel()  # batch x heads
        take = min(x.shape[-2], self.ROWS_PER_MATRIX, -(-(budget - self.kept) // matrices))
        idx = torch.randperm(x.shape[-2], generator=g)[:take].to(x.device)
        self.rows.append(x.detach().index_select(-2, idx).float().cpu())
        self.rhs.append(rhs.detach().float().cpu())
        self.kept += matrices * take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode != "quant":
            return x
        x1, x2 = self.parts(x)
        return x1 if x2 is None else x1 + x2

    @property
    def simulated(self) -> bool:
        return self.region_bits != 8

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fine and the tail part of quantized ``x`` (tail None in the single-region form):
        the owning module multiplies each by its right operand."""
        if _exporting():
            qmin, qmax = int_range(self.region_bits, signed=False)
            clip = (qmin, qmax) if self.region_bits < 8 else None
            if not self.tail:
                return onnx_qdq(x, self.scale, self.zero_point, clip=clip), None
            x1 = onnx_qdq(torch.minimum(x, self.split), self.scale, self.zero_point, clip=clip)
            x2 = onnx_qdq(torch.relu(x - self.split), self.scale2, self.zero_point2, clip=clip)
            return x1, x2
        x1, x2 = two_region_fake_quantize(x, self.split, self.scale,
                                          self.zero_point.to(torch.float32), self.scale2,
                                          self.region_bits, self.tail)
        return x1, (x2 if self.tail else None)

    @property
    def observed(self) -> bool:
        return bool(self.rows)

    def freeze(self) -> None:
        """Frozen by ``search()`` instead; kept for the calibration loop's contract."""

    def search(self, rhs: torch.Tensor | None = None) -> dict:
        """Search split and m by the error of ``x @ rhs``: ``rhs`` given (a Linear's
        ``weight.T``) or, if None, the right operands kept by ``observe``."""
        if not self.rows:
            raise RuntimeError("TwoRegionActQuantizer.search() before any calibration data")
        if rhs is not None:
            x, rhs = torch.cat(self.rows), rhs.detach().float().cpu()
        elif len(self.rhs) == len(self.rows):
            x, rhs = self.rows, self.rhs
        else:
            raise RuntimeError("TwoRegionActQuantizer.search() needs the right operand: pass "
                               "rhs, or observe(x, rhs) during calibration")
        # The range of every observed value, not only the sampled rows: a clipped large
        # probability or GELU output costs more than a slightly coarser grid.
        best = search_two_region(x, rhs, self.bits, value_range=self.range)
        self.split.copy_(best["split"])
        self.scale.copy_(best["scale1"].reshape(()))
        self.zero_point.copy_(best["zp1"].reshape(()).to(torch.uint8))
        self.scale2.copy_(best["scale2"].reshape(()))
        self.m = best["m"]
        self.region_bits, self.tail = best["region_bits"], best["tail"]
        self.rows, self.rhs, self.range = [], [], None
        self.mode = "quant"
        return best

    def extra_repr(self) -> str:
        regions = f"two regions of {self.region_bits} bits, m={self.m}" if self.tail else \
            f"one region of {self.region_bits} bits"
        return f"bits={self.bits}, {regions}, mode={self.mode}"


class _SQNRMeter:
    """Accumulates local output SQNR (quantized vs float on the same input) when enabled."""

    def __init__(self):
        self.enabled = False
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        self.signal += float(ref.detach().double().pow(2).sum())
        self.noise += float((ref.detach().double() - out.detach().double()).pow(2).sum())

    def reset(self) -> None:
        self.signal = self.noise = 0.0

    @property
    def db(self) -> float:
        return sqnr_from_sums(self.signal, self.noise)


class QuantWeightMixin:
    """Per-output-channel symmetric integer weights, stored as codes for export."""

    weight: nn.Parameter
    w_axis_export: int

    def _init_weight_quant(self, bits: int):
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be 2..8, got {bits}")
        self.w_bits = bits
        out = self.weight.shape[0]
        self.register_buffer("w_scale", torch.ones(out, dtype=torch.float32))
        self.register_buffer("w_zero_point", torch.zeros(out, dtype=torch.int8))
        self.register_buffer("w_codes", torch.zeros_like(self.weight, dtype=torch.int8))
        self.weight_frozen = False
        self.sqnr = _SQNRMeter()

    @property
    def w_qrange(self) -> tuple[int, int]:
        return int_range(self.w_bits, signed=True, narrow=True)

    def quantize_weight(self, scale: torch.Tensor | None = None) -> None:
        """Freeze the weight to integer codes; ``scale`` overrides the min-max scale."""
        w = self.weight.detach()
        if scale is None:
            amax = w.abs().flatten(1).amax(1)
            scale, _ = symmetric_qparams(amax, self.w_bits, narrow=True)
        qmin, qmax = self.w_qrange
        s = reshape_for_axis(scale, w.ndim, 0)
        self.w_scale.copy_(scale)
        self.w_codes.copy_(quantize(w, s, torch.zeros(()), qmin, qmax).to(torch.int8))
        self.weight_frozen = True

    def dequantized_weight(self) -> torch.Tensor:
        if not self.weight_frozen:
            return self.weight
        s = reshape_for_axis(self.w_scale, self.weight.ndim, 0)
        return dequantize(self.w_codes.to(self.weight.dtype), s, torch.zeros((), device=s.device))

    @property
    def simulated(self) -> bool:
        return self.w_bits not in (8,)


class ChannelAffine(nn.Module):
    """``(x - shift) * inv_scale`` per last-dim channel: SmoothQuant's input transform where it
    cannot fold into a preceding LayerNorm (post-LN BERT, whose LN output is also the residual)."""

    def __init__(self, shift: torch.Tensor, inv_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.detach().float().clone())
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())
        # Plain SmoothQuant (shift: false) has no shift: skip the Sub, a pass over the
        # activations in the exported graph.
        self.shifted = bool(self.shift.any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.shift) if self.shifted else x) * self.inv_scale


def apply_input_transform(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook running ``module.input_transform`` on the first input of a float layer."""
    return (module.input_transform(args[0]), *args[1:])


class QuantLinear(QuantWeightMixin, nn.Module):
    """nn.Linear with fake-quantized input and integer weights.

    Export: ``Q/DQ(x) @ DQ(codes^T, axis=1) + bias``, the layout ORT fuses into
    MatMulIntegerToFloat (float output, integer product).
    """

    def __init__(self, linear: nn.Linear, w_bits: int = 8,
                 input_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = input_quantizer
        # Set by smooth_quant where the smoothing cannot fold into a LayerNorm (ChannelAffine).
        self.input_transform = getattr(linear, "input_transform", None)
        self._init_weight_quant(w_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int = 8,
                   input_quantizer: ActQuantizer | None = None) -> QuantLinear:
        return cls(linear, w_bits, input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "input_transform", None) is not None:
            x = self.input_transform(x)
        if _exporting() and self.weight_frozen:
            codes_t = self.w_codes.t().contiguous()
            w = onnx_dequantize_weight(codes_t, self.w_scale, self.w_zero_point, axis=1)
            if isinstance(self.input_quantizer, TwoRegionActQuantizer) and \
                    self.input_quantizer.mode == "quant":
                x1, x2 = self.input_quantizer.parts(x)
                y = torch.matmul(x1, w)
                if x2 is not None:
                    y = y + torch.matmul(x2, w)
            else:
                xq = self.input_quantizer(x) if self.input_quantizer is not None else x
                y = torch.matmul(xq, w)
            return y + self.bias if self.bias is not None else y
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        y = F.linear(xq, self.dequantized_weight(), self.bias)
        if self.sqnr.enabled:
            self.sqnr.add(F.linear(x, self.weight, self.bias), y)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}"


class QuantConv2d(QuantWeightMixin, nn.Module):
    """nn.Conv2d with fake-quantized input and per-output-channel integer weights."""

    def __init__(self, conv: nn.Conv2d, w_bits: int = 8,
                 input_quantizer: ActQuantizer | None = None):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride, conv.padding, conv.dilation, conv.groups)
        self.input_quantizer = input_quantizer
        self._init_weight_quant(w_bits)

    def _conv(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        if _exporting() and self.weight_frozen:
            w = onnx_dequantize_weight(self.w_codes, self.w_scale, self.w_zero_point, axis=0)
            return self._conv(xq, w)
        y = self._conv(xq, self.dequantized_weight())
        if self.sqnr.enabled:
            self.sqnr.add(self._conv(x, self.weight), y)
        return y


class MatMul(nn.Module):
    """``a @ b`` as a module, so passes can swap in a quantized or binarized product."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class QuantMatMul(MatMul):
    """Activation x activation product (attention) with both operands fake-quantized."""

    def __init__(self, a_quantizer: ActQuantizer, b_quantizer: ActQuantizer):
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer
        self.sqnr = _SQNRMeter()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        aq = self.a_quantizer
        if isinstance(aq, TwoRegionActQuantizer) and aq.mode == "observe":
            aq.observe(a, rhs=b)  # OPT-m searches by the error of a @ b, so it keeps b too
            return torch.matmul(a, self.b_quantizer(b))
        if isinstance(aq, TwoRegionActQuantizer) and aq.mode == "quant" and _exporting():
            a1, a2 = aq.parts(a)
            bq = self.b_quantizer(b)
            y = torch.matmul(a1, bq)
            return y if a2 is None else y + torch.matmul(a2, bq)
        y = torch.matmul(aq(a), self.b_quantizer(b))
        if self.sqnr.enabled and not _exporting():
            self.sqnr.add(torch.matmul(a, b), y)
        return y


QUANT_MODULES = (QuantLinear, QuantConv2d, QuantMatMul)


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_act_mode(model: nn.Module, mode: str) -> None:
    for q in act_quantizers(model):
        if mode == "observe":
            q.start_observing()
        else:
            q.mode = mode
