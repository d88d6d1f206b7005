"""Task accuracy and fidelity of a compressed model's outputs against the original's."""

from __future__ import annotations

import numpy as np


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def classification_fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, mean KL(original || compressed) and relative L2 error of the logits.

    The logit error matters for models whose top-1 is fragile (near-uniform logits, e.g.
    random weights), where agreement alone says little.
    """
    p, q = _softmax(ref.astype(np.float64)), _softmax(out.astype(np.float64))
    kl = (p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(-1)
    diff = np.linalg.norm((out - ref).astype(np.float64))
    return {"top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()),
            "kl": float(kl.mean()),
            "logits_rel_error": float(diff / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))}


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def retrieval_overlap(ref: np.ndarray, out: np.ndarray, k: int) -> float:
    """Mean overlap of each item's k nearest neighbours (cosine, itself excluded) in both spaces."""
    n = len(ref)
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def neighbours(e):
        e = _normalize(e)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = neighbours(ref), neighbours(out)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


def embedding_fidelity(ref: np.ndarray, out: np.ndarray, k: int = 10) -> dict[str, float]:
    """Cosine of each output vector to the original's: sentence embeddings [S, C], or token maps
    [S, N, C] (dense features), where every token's cosine counts and a sample scores the mean
    over its tokens.

    ``cosine_mean``/``cosine_min`` are the mean and the worst over samples. Token maps add the
    worst single token and the relative L2 error of the whole map; embeddings add the overlap of
    nearest neighbours.
    """
    cos = (_normalize(ref) * _normalize(out)).sum(-1)
    if cos.ndim == 1:
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                f"retrieval_top{k}_overlap": retrieval_overlap(ref, out, k)}
    per_sample = cos.reshape(len(cos), -1).mean(1)
    diff = np.linalg.norm((out - ref).astype(np.float64))
    return {"cosine_mean": float(per_sample.mean()), "cosine_min": float(per_sample.min()),
            "token_cosine_min": float(cos.min()),
            "rel_error": float(diff / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))}


def output_agreement(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Raw output agreement (export parity): cosine over the flattened batch, max |diff|."""
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    with np.errstate(invalid="ignore"):  # Inf outputs give a NaN cosine, which parity refuses
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        return {"cosine": cos, "max_abs_diff": float(np.abs(a - b).max())}


def parity_problem(ref: np.ndarray, out: np.ndarray, min_cosine: float) -> str | None:
    """Why ``out`` (ONNX Runtime) does not match ``ref`` (torch), or None when it does.

    NaN or Inf on either side is a failure: the cosine comparison alone would let NaN through,
    since every comparison with NaN is False.
    """
    bad_ref, bad_out = int((~np.isfinite(ref)).sum()), int((~np.isfinite(out)).sum())
    if bad_ref or bad_out:
        return (f"outputs hold NaN or Inf (torch {bad_ref}, ONNX Runtime {bad_out} of "
                f"{out.size} values)")
    cos = output_agreement(ref, out)["cosine"]
    if not cos >= min_cosine:
        return f"cosine {cos:.4f} < export.parity_min_cosine {min_cosine}"
    return None


def task_metrics(task: str, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None,
                 k: int = 10) -> dict[str, float]:
    """All metrics of ``out`` for the task; ``ref`` is the original model's output.

    Image models that output a token map [S, N, C] are scored like embeddings, per token.
    """
    if task == "image-classification" and ref.ndim == 2:
        m = classification_fidelity(ref, out)
        if labels is not None:
            m["top1"] = top1_accuracy(out, labels)
        return m
    return embedding_fidelity(ref, out, k)
