"""Range observers for activations: collect statistics in calibration, then give a range.

``minmax`` keeps the running extremes; ``percentile`` clips to sample percentiles; ``mse`` and
``cosine`` search a grid of clipping ranges inside the observed extremes for the one whose
fake-quantized sample is closest to the sample (mean squared error, or 1 - cosine similarity),
the usual remedy for long-tailed activations (a few large values that would otherwise stretch
the scale over codes the bulk never uses).
"""

from __future__ import annotations

import torch

from .functional import affine_qparams, fake_quantize, int_range, symmetric_qparams

# Values kept per observed batch by the sampling observers; a bounded sample keeps memory flat
# on long calibration runs (ORT's histogram collectors are the usual memory complaint).
PERCENTILE_SAMPLE_PER_BATCH = 65_536
PERCENTILE_MAX_SAMPLES = 4_000_000
SEARCH_SAMPLES = 262_144  # values a clipping search evaluates each candidate on
SEARCH_GRID = 64          # candidate clipping fractions per search direction


class MinMaxObserver:
    """Running minimum and maximum over all calibration batches."""

    def __init__(self):
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float().cpu(), x.detach().max().float().cpu()
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    @property
    def empty(self) -> bool:
        return self.min_val is None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class SamplingObserver(MinMaxObserver):
    """Min/max plus a seeded, bounded random sample of the observed values."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.gen = torch.Generator().manual_seed(seed)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().flatten().float().cpu()
        if flat.numel() > PERCENTILE_SAMPLE_PER_BATCH:
            idx = torch.randint(0, flat.numel(), (PERCENTILE_SAMPLE_PER_BATCH,), generator=self.gen)
            flat = flat[idx]
        if self.kept < PERCENTILE_MAX_SAMPLES:
            self.samples.append(flat)
            self.kept += flat.numel()

    def values(self, limit: int) -> torch.Tensor:
        v = torch.cat(self.samples)
        if v.numel() > limit:
            v = v[torch.randperm(v.numel(), generator=self.gen)[:limit]]
        return v


class PercentileObserver(SamplingObserver):
    """Clips to the [100 - p, p] percentiles of a seeded random sample of observed values."""

    def __init__(self, percentile: float = 99.99, seed: int = 0):
        super().__init__(seed)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values(16_000_000)  # torch.quantile's input limit
        q = torch.tensor([(100 - self.percentile) / 100, self.percentile / 100])
        lo, hi = torch.quantile(values, q)
        # Never clip beyond what was seen, and never widen past it either.
        return torch.maximum(lo, self.min_val), torch.minimum(hi, self.max_val)


def quantization_error(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                       symmetric: bool, metric: str) -> float:
    """Error of fake-quantizing ``x`` over the range [lo, hi]: ``mse`` or ``cosine`` (1 - cos)."""
    if symmetric:
        scale, zp = symmetric_qparams(torch.maximum(lo.abs(), hi.abs()), bits, narrow=False)
    else:
        scale, zp = affine_qparams(lo, hi, bits)
    qmin, qmax = int_range(bits, signed=symmetric)
    y = fake_quantize(x, scale, zp.float(), qmin, qmax)
    if metric == "mse":
        return float((y - x).pow(2).mean())
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0)
    return float(1 - cos)


def search_clip_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int = 8,
                      symmetric: bool = False, metric: str = "mse", grid: int = SEARCH_GRID,
                      min_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping range inside [lo, hi] that minimizes the quantization error of ``x``.

    Symmetric: one fraction ``t`` of max(|lo|, |hi|). Asymmetric: the upper end is searched first
    (``t * hi``), then the lower end (``t * lo``) with the best upper end fixed; fractions run over
    ``grid`` values in [min_fraction, 1]. The unclipped range is always a candidate.
    """
    fractions = torch.linspace(min_fraction, 1.0, grid)

    def best(candidates):
        errs = [quantization_error(x, a, b, bits, symmetric, metric) for a, b in candidates]
        return candidates[min(range(len(errs)), key=errs.__getitem__)]

    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return best([(-amax * t, amax * t) for t in fractions])
    _, hi = best([(lo, hi * t) for t in fractions])
    lo, _ = best([(lo * t, hi) for t in fractions])
    return lo, hi


class SearchObserver(SamplingObserver):
    """Clipping range searched on the sample by ``metric`` (``mse`` or ``cosine``)."""

    def __init__(self, metric: str, bits: int = 8, symmetric: bool = False, seed: int = 0):
        super().__init__(seed)
        self.metric, self.bits, self.symmetric = metric, bits, symmetric

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return search_clip_range(self.values(SEARCH_SAMPLES), self.min_val, self.max_val,
                                 self.bits, self.symmetric, self.metric)


OBSERVERS = ("minmax", "percentile", "mse", "cosine")


def make_observer(kind: str, percentile: float = 99.99, bits: int = 8, symmetric: bool = False):
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    if kind in ("mse", "cosine"):
        return SearchObserver(kind, bits, symmetric)
    raise ValueError(f"unknown observer {kind!r}; expected one of {', '.join(OBSERVERS)}")
