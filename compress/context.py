"""What a pass receives besides the model and its config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import Dataset
from .errors import CancelledError


@dataclass
class PassReport:
    """A pass's contribution to the report: a summary dict, per-layer rows, plots, warnings."""

    index: int
    type: str
    summary: dict = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    plots: list[dict] = field(default_factory=list)   # {"title", "file"} relative to out dir
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_layer(self, name: str, **fields) -> None:
        self.layers.setdefault(name, {}).update(fields)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@dataclass
class PassContext:
    """Calibration data, device, scratch folder, progress and report of one pass run."""

    index: int
    calib: Dataset | None
    device: torch.device
    workdir: Path
    out_dir: Path
    report: PassReport
    batch_size: int = 32
    progress_fn: Callable[[float, str], None] | None = None
    # Set by the pipeline for ONNX-stage passes: the model file to rewrite in place.
    onnx_path: Path | None = None

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1] of this pass; raises CancelledError if the job was
        cancelled."""
        if self.progress_fn is not None:
            self.progress_fn(min(max(fraction, 0.0), 1.0), message)

    def calib_batches(self, max_samples: int | None = None):
        if self.calib is None:
            raise CancelledError("internal: pass needs calibration data")  # guarded by recipe
        ds = self.calib if max_samples is None else self.calib.take(max_samples)
        yield from ds.batches(self.batch_size, self.device)

    def save_plot(self, fig, name: str, title: str) -> None:
        """Save a matplotlib figure as plots/<name>.png and list it in the report."""
        import matplotlib.pyplot as plt

        plots = self.out_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        fname = f"pass{self.index}_{name}.png"
        fig.savefig(plots / fname, dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.report.plots.append({"title": title, "file": f"plots/{fname}"})
