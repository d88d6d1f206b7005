"""ONNX Runtime sessions, batched inference and latency measurement."""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..data import Dataset
from ..models.handle import ModelHandle


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# x86 flags under which ORT's u8s8 GEMM accumulates exactly (VNNI/AMX dot products into int32).
# Without them (AVX2 only) MLAS uses vpmaddubsw, whose int16 pair sums saturate when both int8
# weights of a pair are large: full-range int8 weights then lose accuracy in ORT (measured:
# MiniLM cosine 0.9973 -> 0.9939, digits ViT quantize_static 98.0% -> 93.5%), 7-bit ones do not.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache  # the CPU does not change under a running process
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def u8s8_saturates() -> bool:
    """True on x86 CPUs whose int8 GEMM in ONNX Runtime saturates full-range int8 weights."""
    flags = cpu_flags()
    return "avx2" in flags and not any(f in flags for f in EXACT_INT8_FLAGS)


def make_session(path: Path, threads: int | None = None, optimized_path: Path | None = None,
                 extra: dict[str, str] | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feed_for(session: ort.InferenceSession,
             batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Map a batch dict onto the session's inputs (single image input taken by position)."""
    inputs = session.get_inputs()
    if "pixel_values" in batch and len(inputs) == 1:
        return {inputs[0].name: batch["pixel_values"].cpu().numpy().astype(np.float32)}
    feed = {}
    for inp in inputs:
        if inp.name in batch:
            feed[inp.name] = batch[inp.name].cpu().numpy()
        elif inp.name == "token_type_ids" and "input_ids" in batch:
            feed[inp.name] = np.zeros_like(batch["input_ids"].cpu().numpy())
        else:
            raise KeyError(f"ONNX input {inp.name!r} has no data; batch holds {sorted(batch)}")
    return feed


def predict_onnx(session: ort.InferenceSession, dataset: Dataset, batch_size: int) -> np.ndarray:
    outs = [session.run(None, feed_for(session, b))[0] for b in dataset.batches(batch_size)]
    return np.concatenate(outs, 0)


def latency_inputs(handle: ModelHandle, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    return handle.example_inputs(batch_size=batch_size, seq_len=seq_len)


def measure_latencies(models: dict[str, Path], handle: ModelHandle, batch_sizes: list[int], *,
                      repeats: int = 20, warmup: int = 3, threads: int | None = None,
                      seq_len: int = 128, rounds: int = 4) -> dict[str, dict[str, float]]:
    """Median wall time (ms) of one ``session.run`` per model and batch size.

    Models are measured in interleaved rounds so that load from elsewhere on a shared machine
    hits them alike; each figure is the median over all ``repeats`` runs.
    """
    sessions = {name: make_session(p, threads) for name, p in models.items()}
    feeds = {name: {bs: feed_for(s, latency_inputs(handle, bs, seq_len)) for bs in batch_sizes}
             for name, s in sessions.items()}
    times: dict[str, dict[int, list[float]]] = {n: {bs: [] for bs in batch_sizes} for n in models}
    for name, s in sessions.items():
        for bs in batch_sizes:
            for _ in range(warmup):
                s.run(None, feeds[name][bs])
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for n_runs in per_round:
        for name, s in sessions.items():
            for bs in batch_sizes:
                feed = feeds[name][bs]
                for _ in range(n_runs):
                    t = time.perf_counter()
                    s.run(None, feed)
                    times[name][bs].append((time.perf_counter() - t) * 1000)
    return {name: {str(bs): round(statistics.median(ts), 3) for bs, ts in per_bs.items()}
            for name, per_bs in times.items()}
