"""Range observers for activations: collect statistics in calibration, then give a range."""

from __future__ import annotations

import torch

# Values kept per observed batch by the percentile observer; a bounded sample keeps memory flat
# on long calibration runs (ORT's histogram collectors are the usual memory complaint).
PERCENTILE_SAMPLE_PER_BATCH = 65_536
PERCENTILE_MAX_SAMPLES = 4_000_000


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


class PercentileObserver(MinMaxObserver):
    """Clips to the [100 - p, p] percentiles of a seeded random sample of observed values."""

    def __init__(self, percentile: float = 99.99, seed: int = 0):
        super().__init__()
        self.percentile = percentile
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

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(self.samples)
        if values.numel() > 16_000_000:  # torch.quantile's input limit
            values = values[:16_000_000]
        q = torch.tensor([(100 - self.percentile) / 100, self.percentile / 100])
        lo, hi = torch.quantile(values, q)
        # Never clip beyond what was seen, and never widen past it either.
        return torch.maximum(lo, self.min_val), torch.minimum(hi, self.max_val)


def make_observer(kind: str, percentile: float = 99.99):
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(f"unknown observer {kind!r}; expected minmax or percentile")
