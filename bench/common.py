"""Shared benchmark plumbing: reference models, peer quantizers, evaluation, timing, tables.

Each benchmark builds ONNX files for every variant first, then evaluates them on the same data
and times them together in interleaved rounds in this one process, so ratios compare like
with like on a shared machine.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress import compress
from compress.data import Dataset
from compress.evaluate.metrics import task_metrics
from compress.export.onnx import onnx_size_bytes
from compress.export.ort import default_threads, make_session, measure_latencies, predict_onnx
from compress.models import ModelHandle

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# MPTQ-ViT's SQ-b as the mixed-precision benchmarks put it before the mixed pass.
SQB = {"type": "smooth_quant", "alpha": "search", "shift": True}


@dataclass
class Variant:
    name: str
    path: Path
    note: str = ""
    build_seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class Bench:
    """One model: its handle (for inputs), reference outputs, calibration/eval data."""

    key: str
    handle: ModelHandle
    fp32: Path
    calib: Dataset
    eval: Dataset
    reference: np.ndarray
    batch_sizes: list[int]
    seq_len: int = 128
    variants: list[Variant] = field(default_factory=list)

    @property
    def labels(self):
        return None if self.eval.labels is None else self.eval.labels.numpy()


def run_recipe(recipe: Path, out: Path, overrides: list[str] = ()) -> tuple[Path, dict, float]:
    """Run one of our recipes (latency off: timed later beside the peers)."""
    t = time.perf_counter()
    result = compress(recipe, out_dir=out,
                      overrides=["evaluation.latency.enabled=false", *overrides])
    return result.model_path, result.report, time.perf_counter() - t


def load_bench(key: str, recipe: Path, out: Path, batch_sizes: list[int], seq_len: int = 128,
               overrides: list[str] = ()) -> tuple[Bench, Path, dict, float]:
    """Run ``recipe`` (our method) and keep its fp32 export, data and reference outputs."""
    from compress.api import Pipeline
    from compress.recipe import load_recipe

    model_path, report, seconds = run_recipe(recipe, out / "ours", overrides)
    r = load_recipe(recipe, overrides=["evaluation.latency.enabled=false", *overrides])
    p = Pipeline(r, model=None, calib=None, eval=None, out_dir=out / "ours", progress=None,
                 device="cpu")
    p.load()
    p.load_data()
    p.baseline()
    bench = Bench(key, p.handle, out / "ours" / "model.fp32.onnx", p.calib, p.eval, p.reference,
                  batch_sizes, seq_len)
    return bench, model_path, report, seconds


class _Reader:
    def __init__(self, sess, batches):
        self.sess, self.batches, self.i = sess, batches, 0

    def get_next(self):
        from compress.export.ort import feed_for

        if self.i >= len(self.batches):
            return None
        self.i += 1
        return feed_for(self.sess, self.batches[self.i - 1])

    def rewind(self):
        self.i = 0


def ort_static_default(bench: Bench, out: Path) -> Variant:
    """ORT quantize_static exactly as its docs show it: QDQ, default op types, MinMax."""
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    pre = out / "ort_pre.onnx"
    dst = out / "ort_static.onnx"
    t = time.perf_counter()
    quant_pre_process(str(bench.fp32), str(pre), skip_symbolic_shape=True)
    reader = _Reader(make_session(pre), list(bench.calib.batches(16)))
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Variant("ORT quantize_static (QDQ, default ops)", dst,
                   build_seconds=time.perf_counter() - t)


def ort_dynamic(bench: Bench, out: Path) -> Variant:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    pre = out / "ort_pre_dyn.onnx"
    dst = out / "ort_dynamic.onnx"
    t = time.perf_counter()
    quant_pre_process(str(bench.fp32), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    return Variant("ORT quantize_dynamic (per-channel)", dst, build_seconds=time.perf_counter() - t)


def optimum_dynamic(bench: Bench, out: Path) -> Variant:
    """Optimum's ORTQuantizer with its AVX-512 VNNI preset (dynamic, per-channel)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    d = out / "optimum"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bench.fp32, d / "model.onnx")
    t = time.perf_counter()
    quantizer = ORTQuantizer.from_pretrained(d, file_name="model.onnx")
    qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    quantizer.quantize(save_dir=d / "q", quantization_config=qconfig)
    path = next((d / "q").glob("*.onnx"))
    return Variant("Optimum ORTQuantizer (avx512_vnni, dynamic)", path,
                   build_seconds=time.perf_counter() - t)


def evaluate_variants(bench: Bench) -> None:
    for v in bench.variants:
        out = predict_onnx(make_session(v.path), bench.eval, 32)
        v.metrics = task_metrics(bench.handle.task, bench.reference, out, bench.labels)


def time_variants(bench: Bench, repeats: int, threads: int | None = None) -> dict:
    lat = measure_latencies({v.name: v.path for v in bench.variants}, bench.handle,
                            bench.batch_sizes, repeats=repeats, warmup=3,
                            threads=threads or default_threads(), seq_len=bench.seq_len)
    for v in bench.variants:
        v.metrics["latency_ms"] = lat[v.name]
    return lat


def table(bench: Bench) -> str:
    fp32 = bench.variants[0]
    task = bench.handle.task
    bs = bench.batch_sizes
    if task == "image-classification":
        head = "|variant|top-1|agreement|KL|logit rel. err|MB|x smaller|" + "|".join(
            f"b{b} ms (x fp32)" for b in bs) + "|"
    else:
        head = "|variant|cosine mean/min|top-10 overlap|MB|x smaller|" + "|".join(
            f"b{b} ms (x fp32)" for b in bs) + "|"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_size = onnx_size_bytes(fp32.path)
    for v in bench.variants:
        m = v.metrics
        size = onnx_size_bytes(v.path)
        lat = "|".join(f"{m['latency_ms'][str(b)]:.2f} "
                       f"({fp32.metrics['latency_ms'][str(b)] / m['latency_ms'][str(b)]:.2f})"
                       for b in bs)
        if task == "image-classification":
            top1 = f"{m['top1'] * 100:.2f}" if "top1" in m else "-"
            lines.append(f"|{v.name}|{top1}|{m['top1_agreement'] * 100:.2f}%|{m['kl']:.2e}|"
                         f"{m['logits_rel_error']:.4f}|{size / 1e6:.2f}|{base_size / size:.2f}|"
                         f"{lat}|")
        else:
            lines.append(f"|{v.name}|{m['cosine_mean']:.4f}/{m['cosine_min']:.4f}|"
                         f"{m['retrieval_top10_overlap']:.3f}|{size / 1e6:.2f}|"
                         f"{base_size / size:.2f}|{lat}|")
    return "\n".join(lines)


def save(results: dict, out: Path, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown)
