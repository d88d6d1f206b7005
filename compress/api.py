"""``compress()``: the one entry point that the CLI, the service worker and the tests call.

Stages: load the model and data, record the original model's outputs, export the original to
ONNX, run the recipe's torch passes, export the compressed model, run ONNX passes, check ORT
against torch, evaluate both ONNX models, time them, gate, write report.json and report.html.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .checksums import sha256_file
from .context import PassContext, PassReport
from .data import Dataset, load_dataset
from .errors import (
    EXIT_GATE_FAILED,
    EXIT_OK,
    CompressError,
    DataError,
    ExportError,
    ModelLoadError,
    NonFiniteError,
    PassError,
)
from .evaluate.gate import describe_failure, gate_checks, performance_checks
from .evaluate.metrics import output_agreement, parity_problem, task_metrics
from .export.metadata import HF_CONSUMER_FILES, describe_source, write_output_metadata
from .export.onnx import export_onnx, onnx_files, onnx_size_bytes, op_histogram, slim_onnx
from .export.ort import default_threads, make_session, measure_latencies, predict_onnx
from .export.ort_lowering import lower_file, round_embedding_tables
from .models import ModelHandle, load_model
from .paths import resolve_path
from .quant.graph import apply_pending as apply_graph_quantization
from .recipe import Recipe, load_recipe, recipe_base_dir
from .registry import get_pass
from .report import REPORT_SCHEMA_VERSION, environment_info, strict_json, write_html
from .report.card import write_model_card
from .report.plots import latency_plot, layer_plot
from .report.verdict import verdict
from .specs import CalibrationSpec, EvaluationSpec

log = logging.getLogger("compress")

# (stage, share of the overall progress bar)
STAGES = {"load": 0.04, "data": 0.04, "baseline": 0.08, "export_original": 0.08, "passes": 0.44,
          "export": 0.12, "evaluate": 0.10, "latency": 0.08, "report": 0.02}
ProgressFn = Callable[[str, float, str], None]


@dataclass
class CompressResult:
    out_dir: Path
    report: dict
    model_path: Path
    report_path: Path
    html_path: Path
    gate_passed: bool
    gate_failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.gate_passed else EXIT_GATE_FAILED

    def summary(self) -> dict:
        """What ``compress run --json`` prints: paths, headline metrics, gate."""
        r = self.report
        return {"status": "ok" if self.gate_passed else "gate_failed",
                "exit_code": self.exit_code, "out_dir": str(self.out_dir),
                "model": str(self.model_path), "report": str(self.report_path),
                "report_html": str(self.html_path), "metrics": r["metrics"], "size": r["size"],
                "latency": r["latency"], "gate": r["gate"], "verdict": r.get("verdict")}


class _Progress:
    def __init__(self, fn: ProgressFn | None):
        self.fn = fn
        self.done = 0.0
        self.stage = ""

    def start(self, stage: str) -> None:
        self.stage = stage
        self.update(0.0, "")

    def finish(self, stage: str) -> None:
        self.update(1.0, "")
        self.done += STAGES[stage]

    def update(self, fraction: float, message: str) -> None:
        if self.fn is not None:
            self.fn(self.stage, min(1.0, self.done + STAGES.get(self.stage, 0) * fraction), message)


def _pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise DataError("recipe device is 'cuda' but no CUDA device is available; use 'auto' or "
                        "'cpu'")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


@torch.no_grad()
def predict_torch(handle: ModelHandle, dataset: Dataset, batch_size: int,
                  device: torch.device) -> np.ndarray:
    handle.module.eval()
    outs = [handle.forward(b).float().cpu().numpy() for b in dataset.batches(batch_size, device)]
    return np.concatenate(outs, 0)


def check_outputs_finite(out: np.ndarray, what: str) -> None:
    """NaN/Inf outputs of the original model on finite inputs: its weights are bad input."""
    finite = np.isfinite(out).reshape(len(out), -1).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise NonFiniteError(
            f"the original model's outputs on {what} hold NaN or Inf for {len(bad)} of "
            f"{len(out)} samples (first: sample {int(bad[0])}), although the inputs are finite; "
            "its weights overflow or are damaged. Check the checkpoint (and model.kwargs)")


def _shown(override: str | None, recipe_value: str | None) -> str | None:
    """A file as reports and messages show it: the recipe's value as written, or only the name
    of a file given on the command line (or uploaded: the service passes uploads that way)."""
    return Path(override).name if override else recipe_value


def _given_model_path(recipe: Recipe, override: str | None) -> str | None:
    """The model path as the user wrote it (never the resolved server path)."""
    if override:
        return str(override)
    return recipe.model.file_value


def _resolve_model_path(recipe: Recipe, override: str | None, base: Path | None) -> Path | None:
    if override:
        return Path(override).expanduser().resolve()
    value = recipe.model.file_value
    return resolve_path(value, base) if value else None


def _resolve_data(spec, override: str | None, base: Path | None) -> Path | None:
    if override:
        return Path(override).expanduser().resolve()
    if spec is not None and spec.path:
        return resolve_path(spec.path, base)
    return None


PARAMS_COUNTED = ("parameters of the original model before compression (torch parameters; "
                  "buffers not counted)",
                  "parameters of the original model before compression (elements of its "
                  "floating-point ONNX initializers)")


def _original_param_count(handle: ModelHandle) -> int | None:
    if handle.module is not None:
        return handle.param_count() or None
    if handle.onnx_path is None:
        return None
    import onnx

    model = onnx.load(str(handle.onnx_path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in floats) or None


class Pipeline:
    """One run of a recipe. ``run()`` returns a CompressResult; stages fill ``self.report``."""

    def __init__(self, recipe: Recipe, *, model: str | None, calib: str | None,
                 eval: str | None, out_dir: Path, progress: ProgressFn | None,
                 device: str | None):
        self.recipe = recipe
        self.overrides = {"model": model, "calib": calib, "eval": eval}
        self.out = out_dir
        self.progress = _Progress(progress)
        self.device = _pick_device(device or recipe.device)
        self.stages: dict[str, float] = {}
        self.warnings: list[str] = []
        self.pass_reports: list[PassReport] = []
        self.base = recipe_base_dir(recipe) or Path.cwd()

    @contextmanager
    def stage(self, name: str):
        self.progress.start(name)
        t = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t, 3)
        self.progress.finish(name)

    # ------------------------------------------------------------------ stages

    def load(self) -> None:
        path = _resolve_model_path(self.recipe, self.overrides["model"], self.base)
        if path is not None and not path.exists():
            field_name = self.recipe.model.file_field
            given = _given_model_path(self.recipe, self.overrides["model"])
            expected = ("a .safetensors or .pt weights file" if field_name == "weights" else
                        "a Hugging Face model folder" if self.recipe.model.source == "hf" else
                        "an .onnx file")
            raise ModelLoadError(f"model.{field_name} {given!r} does not exist; expected "
                                 f"{expected} (set it in the recipe or pass --model)")
        self.model_path = path
        self.handle = load_model(self.recipe.model, path)
        # Counted now, before any pass: quantized layers keep their weights as buffers, so a
        # count after the passes would change with the recipe (205,258 vs 25,034).
        self.original_params = _original_param_count(self.handle)
        # Hashes and timm's config come from the model as loaded, before passes patch it.
        self.source_info = describe_source(self.handle, path, self.recipe.model.kwargs)
        if self.handle.module is not None:
            self.handle.to(self.device)

    def load_data(self) -> None:
        r = self.recipe
        calib_spec = r.calibration
        calib_path = _resolve_data(calib_spec, self.overrides["calib"], self.base)
        if calib_spec is None and calib_path is not None:
            calib_spec = CalibrationSpec(path=str(calib_path))
        self.calib: Dataset | None = None
        if calib_spec is not None:
            if calib_path is None:
                raise DataError("calibration.path is not set; give it in the recipe or pass "
                                "--calib")
            self._check_exists(calib_path, self.overrides["calib"] or calib_spec.path,
                               "calibration", "--calib")
            self.calib = load_dataset(calib_spec, calib_path, self.handle, "calibration")
            self.calib.source = _shown(self.overrides["calib"], calib_spec.path)
        eval_spec: EvaluationSpec = r.evaluation
        eval_path = _resolve_data(eval_spec, self.overrides["eval"], self.base)
        if eval_path is not None:
            self._check_exists(eval_path, self.overrides["eval"] or eval_spec.path,
                               "evaluation", "--eval")
            self.eval = load_dataset(eval_spec, eval_path, self.handle, "evaluation")
            self.eval.source = _shown(self.overrides["eval"], eval_spec.path)
        elif self.calib is not None:
            self.eval = self.calib
            self.warnings.append("no evaluation data (evaluation.path or --eval): metrics are "
                                 "measured on the calibration samples, which flatters the result")
        else:
            raise DataError("no evaluation data: set evaluation.path (or calibration.path) in the "
                            "recipe, or pass --eval")

    @staticmethod
    def _check_exists(path: Path, given: str | None, role: str, option: str) -> None:
        if not path.exists():
            raise DataError(f"{role}.path {given or path.name!r} does not exist; expected an "
                            f"image folder, .npz, .npy, .txt or .jsonl file (set it in the "
                            f"recipe or pass {option})")

    def baseline(self) -> None:
        bs = self.recipe.evaluation.batch_size
        if self.handle.module is not None:
            self.reference = predict_torch(self.handle, self.eval, bs, self.device)
        else:
            self.reference = predict_onnx(make_session(self.handle.onnx_path), self.eval, bs)
        check_outputs_finite(self.reference, f"evaluation data {self.eval.source!r}")
        if self.calib is not None and self.calib is not self.eval and \
                self.handle.module is not None:
            # Passes calibrate on these; one batch shows weights that blow up on this data.
            first = predict_torch(self.handle, self.calib.take(min(len(self.calib), bs)), bs,
                                  self.device)
            check_outputs_finite(first, f"calibration data {self.calib.source!r}")

    def export_original(self) -> None:
        ex = self.recipe.export
        self.fp32_path = self.out / "model.fp32.onnx" if ex.keep_fp32 else \
            self.workdir / "model.fp32.onnx"
        if self.handle.module is not None:
            self._export(self.fp32_path)
        else:
            self._copy_onnx(self.handle.onnx_path, self.fp32_path)

    def _export(self, path: Path) -> None:
        module_device = self.handle.device
        self.handle.to("cpu")
        try:
            export_onnx(self.handle, path, opset=self.recipe.export.opset,
                        external_data=self.recipe.export.external_data)
        finally:
            self.handle.to(module_device)

    @staticmethod
    def _copy_onnx(src: Path, dst: Path) -> None:
        import onnx

        model = onnx.load(str(src))  # pulls external data in
        size = model.ByteSize()
        onnx.save(model, str(dst), save_as_external_data=size > (1 << 30),
                  location=dst.name + ".data")

    def run_passes(self, stage_filter: str) -> None:
        entries = [(i, p, get_pass(p.type)) for i, p in enumerate(self.recipe.passes)]
        entries = [e for e in entries if e[2].stage == stage_filter]
        batch = self.recipe.calibration.batch_size if self.recipe.calibration else 32
        for n, (i, cfg, entry) in enumerate(entries):
            report = PassReport(index=i, type=cfg.type)
            self.pass_reports.append(report)

            def on_progress(frac: float, msg: str, n=n, i=i, cfg=cfg):
                self.progress.update((n + frac) / len(entries), f"pass {i} ({cfg.type}) {msg}")

            ctx = PassContext(index=i, calib=self.calib, device=self.device,
                              workdir=self.workdir, out_dir=self.out, report=report,
                              batch_size=batch, progress_fn=on_progress,
                              onnx_path=self.model_onnx if stage_filter == "onnx" else None)
            t = time.perf_counter()
            try:
                entry.fn(self.handle, cfg, ctx)
            except CompressError:
                raise
            except (TypeError, AttributeError, NameError, AssertionError):
                raise  # bugs, not input: keep the original traceback
            except Exception as e:  # noqa: BLE001 - anything else fails this pass with a reason
                raise PassError(i, cfg.type, f"{type(e).__name__}: {e}") from e
            report.seconds = round(time.perf_counter() - t, 3)
            self.warnings += [f"pass {i} ({cfg.type}): {w}" for w in report.warnings]

    def export_compressed(self) -> None:
        self.model_onnx = self.out / "model.onnx"
        self.parity = []
        torch_passes = any(get_pass(p.type).stage == "torch" for p in self.recipe.passes)
        if not torch_passes:
            self._copy_onnx(self.fp32_path, self.model_onnx)
            return
        ex = self.recipe.export
        if ex.int8_embeddings:  # torch computes what the int8 tables give: parity stays exact
            round_embedding_tables(self.handle.module)
        self._export(self.model_onnx)
        if ex.ort_cpu_kernels:
            self.lowered = lower_file(self.model_onnx, int8_embeddings=ex.int8_embeddings)
        # ORT must agree with the torch model it came from, at several batch sizes.
        sess = make_session(self.model_onnx)
        for bs in ex.verify_batch_sizes:
            sample = self.eval.take(min(bs, len(self.eval)))
            ref = predict_torch(self.handle, sample, bs, self.device)
            got = predict_onnx(sess, sample, bs)
            agree = output_agreement(ref, got)
            self.parity.append({"batch_size": bs, **{k: round(v, 6) for k, v in agree.items()}})
            problem = parity_problem(ref, got, ex.parity_min_cosine)
            if problem:
                raise ExportError(f"ONNX Runtime output of model.onnx disagrees with the torch "
                                  f"model at batch {bs}: {problem}")
        # quantize (engine: onnx) places its Q/DQ on the exported graph: the torch model stays
        # float, so the check above compared float with float and there is no torch twin.
        batch = self.recipe.calibration.batch_size if self.recipe.calibration else 32
        if apply_graph_quantization(self.handle, self.model_onnx, self.calib, self.workdir,
                                    batch) is not None:
            self.compressed_torch = None
            return
        self.compressed_torch = predict_torch(self.handle, self.eval,
                                              self.recipe.evaluation.batch_size, self.device)

    def describe_output(self) -> None:
        """ONNX metadata in every ONNX file of ``out`` and the files other tools read
        (compress/export/metadata.py); the model card is written from what this returns."""
        paths = [self.model_onnx] + ([self.fp32_path] if self.fp32_path.parent == self.out
                                     else [])
        self.output_metadata = write_output_metadata(
            self.out, paths, handle=self.handle, source=self.source_info,
            recipe=self._recipe_as_shown(), max_length=self.recipe.evaluation.max_length,
            eval_path=_resolve_data(self.recipe.evaluation, self.overrides["eval"], self.base))

    def evaluate(self) -> None:
        ev = self.recipe.evaluation
        task = self.handle.task
        labels = None if self.eval.labels is None else self.eval.labels.numpy()
        fp32_out = predict_onnx(make_session(self.fp32_path), self.eval, ev.batch_size)
        comp_out = predict_onnx(make_session(self.model_onnx), self.eval, ev.batch_size)
        self.metrics = {
            "original": task_metrics(task, self.reference, fp32_out, labels, ev.retrieval_k),
            "compressed": task_metrics(task, self.reference, comp_out, labels, ev.retrieval_k),
        }
        if getattr(self, "compressed_torch", None) is not None:
            self.metrics["compressed_torch"] = task_metrics(
                task, self.reference, self.compressed_torch, labels, ev.retrieval_k)
            agreement = output_agreement(self.compressed_torch, comp_out)
            self.parity.append({"batch_size": "eval",
                                **{k: round(v, 6) for k, v in agreement.items()}})
        if "top1" in self.metrics["original"]:
            # Paired outcomes on the same samples: what the accuracy change's interval needs.
            orig_right = fp32_out.argmax(-1) == labels
            comp_right = comp_out.argmax(-1) == labels
            self.metrics["drop"] = {
                "top1_points": round(
                    (self.metrics["original"]["top1"] - self.metrics["compressed"]["top1"]) * 100,
                    4),
                "lost": int((orig_right & ~comp_right).sum()),
                "gained": int((~orig_right & comp_right).sum()), "samples": len(labels)}
        self.gate = gate_checks(ev.gate, task, self.metrics["original"],
                                self.metrics["compressed"], ev.retrieval_k)

    def latency(self) -> None:
        spec = self.recipe.evaluation.latency
        threads = spec.threads or default_threads()
        self.latency_result = {"threads": threads, "repeats": spec.repeats, "unit": "ms",
                               "seq_len": spec.seq_len if self.handle.task == "text-embedding"
                               else None}
        if not spec.enabled:
            return
        lat = measure_latencies({"original": self.fp32_path, "compressed": self.model_onnx},
                                self.handle, spec.batch_sizes, repeats=spec.repeats,
                                warmup=spec.warmup, threads=threads, seq_len=spec.seq_len)
        self.latency_result.update(lat)
        self.latency_result["speedup"] = {
            bs: round(lat["original"][bs] / max(lat["compressed"][bs], 1e-9), 3)
            for bs in lat["original"]}

    def _recipe_as_shown(self) -> dict:
        """The recipe as run, with files given on the command line (or uploaded to the
        service) by their names only: reports never show where the server keeps them."""
        data = self.recipe.model_dump(mode="json")
        for key, section, field_name in (("model", "model", self.recipe.model.file_field),
                                         ("calib", "calibration", "path"),
                                         ("eval", "evaluation", "path")):
            if self.overrides[key] and data.get(section):
                data[section][field_name] = Path(self.overrides[key]).name
        return data

    def write_report(self) -> dict:
        h = self.handle
        layers = []
        for pr in self.pass_reports:
            for name, fields in pr.layers.items():
                layers.append({"name": name, "pass": pr.index, **fields})
        plots = []
        if layer_plot(layers, self.out / "plots" / "layers.png"):
            plots.append({"title": "Per-layer SQNR and bit-width", "file": "plots/layers.png"})
        if latency_plot(self.latency_result, self.out / "plots" / "latency.png"):
            plots.append({"title": "Latency", "file": "plots/latency.png"})
        for pr in self.pass_reports:
            plots += pr.plots
        recipe = self._recipe_as_shown()
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        orig_size = onnx_size_bytes(self.fp32_path)
        comp_size = onnx_size_bytes(self.model_onnx)
        artifacts = []
        for f in sorted(p for p in self.out.rglob("*") if p.is_file()):
            rel = f.relative_to(self.out).as_posix()
            if rel in ("report.json", "report.html") or rel.startswith("."):
                continue
            artifacts.append({"name": rel, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
        self.gate = self.gate + performance_checks(
            self.recipe.evaluation.gate, self.latency_result.get("speedup"), comp_size)
        gate_passed = all(c["passed"] for c in self.gate)
        report = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "compress_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "recipe": recipe,
            "model": {"source": h.source, "name": h.name, "task": h.task,
                      "output": h.output_name,
                      "params": self.original_params,
                      "params_counted": PARAMS_COUNTED[h.source == "onnx"],
                      "path": _shown(self.overrides["model"],
                                     _given_model_path(self.recipe, None))},
            "data": {"calibration": self.calib.summary() if self.calib else None,
                     "evaluation": self.eval.summary()},
            "device": str(self.device),
            "passes": [{"index": p.index, "type": p.type, "seconds": p.seconds,
                        "summary": p.summary, "warnings": p.warnings} for p in self.pass_reports],
            "layers": layers,
            "metrics": self.metrics,
            "gate": {"passed": gate_passed, "checks": self.gate},
            "size": {"original_bytes": orig_size, "compressed_bytes": comp_size,
                     "ratio": round(orig_size / max(comp_size, 1), 3)},
            "latency": self.latency_result,
            "export": {"opset": self.recipe.export.opset,
                       "exporter": {f: v["exporter"] for f, v in
                                    self.handle.info.get("export", {}).items()},
                       "exporter_failures": {f: v["failed"] for f, v in
                                             self.handle.info.get("export", {}).items()
                                             if v["failed"]},
                       "artifacts": artifacts,
                       "parity": self.parity, "op_histogram": op_histogram(self.model_onnx),
                       "ort_cpu_kernels": getattr(self, "lowered", None),
                       "files": [f.name for f in onnx_files(self.model_onnx)]},
            "plots": plots,
            "stages": self.stages,
            "environment": environment_info(),
            "warnings": self.warnings + h.info.get("load_notes", [])
            + (self.calib.notes if self.calib else [])
            + ([] if self.eval is self.calib else self.eval.notes),
        }
        report["verdict"] = verdict(report)
        report["export"]["metadata"] = {k: v for k, v in self.output_metadata.items()
                                        if k != "io"}
        return report

    def run(self) -> CompressResult:
        self.out.mkdir(parents=True, exist_ok=True)
        t_all = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="compress-") as tmp:
            self.workdir = Path(tmp)
            with self.stage("load"):
                self.load()
            with self.stage("data"):
                self.load_data()
            with self.stage("baseline"):
                self.baseline()
            with self.stage("export_original"):
                self.export_original()
            with self.stage("passes"):
                self.run_passes("torch")
            with self.stage("export"):
                self.export_compressed()
                self.run_passes("onnx")
                if any(get_pass(p.type).stage == "onnx" for p in self.recipe.passes):
                    slim_onnx(self.model_onnx)   # ORT's quantizers write value_info and docs
                self.describe_output()
            with self.stage("evaluate"):
                self.evaluate()
            with self.stage("latency"):
                self.latency()
            with self.stage("report"):
                self.stages["total"] = round(time.perf_counter() - t_all, 3)
                report = self.write_report()
                report_path = self.out / "report.json"
                report_path.write_text(strict_json(report))
                html_path = write_html(report, self.out, self.out / "report.html")
                write_model_card(report, self.out, self.output_metadata)
        failures = [describe_failure(c) for c in report["gate"]["checks"] if not c["passed"]]
        return CompressResult(out_dir=self.out, report=report, model_path=self.model_onnx,
                              report_path=report_path, html_path=html_path,
                              gate_passed=report["gate"]["passed"], gate_failures=failures)


def calib_override(calib: str | None) -> dict[str, str] | None:
    """A --calib path stands in for calibration.path, even in a recipe without that section."""
    return {"calibration.path": str(Path(calib).expanduser().resolve())} if calib else None


def compress(recipe: Recipe | str | Path, *, model: str | None = None, calib: str | None = None,
             eval: str | None = None, out_dir: str | Path = "out",
             overrides: list[str] = (), progress: ProgressFn | None = None,
             device: str | None = None) -> CompressResult:
    """Run a recipe end to end; returns the result even when the quality gate fails.

    Args:
        recipe: a Recipe, or the path of a recipe YAML file.
        model: weights file (timm) or model folder/ONNX file (hf/onnx), overriding the recipe.
        calib: calibration data path, overriding ``calibration.path``.
        eval: evaluation data path, overriding ``evaluation.path``.
        out_dir: where model.onnx, model.fp32.onnx, report.json and report.html go.
        overrides: ``KEY=VALUE`` edits applied to the recipe before validation.
        progress: called as ``progress(stage, overall_fraction, message)``; may raise
            ``compress.errors.CancelledError`` to stop the run.
        device: "cpu", "cuda" or "auto", overriding the recipe's ``device``.

    Raises:
        InputError (RecipeError, ModelLoadError, DataError) for bad input, PassError,
        ExportError for failures on valid input.
    """
    values = calib_override(calib)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=list(overrides), values=values)
    elif overrides or values:
        from .recipe import parse_recipe

        base = recipe._base_dir
        recipe = parse_recipe(recipe.model_dump(mode="json"), overrides=list(overrides),
                              values=values)
        recipe._base_dir = base
    torch.manual_seed(0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} is a file; pass a folder for the results")
    pipeline = Pipeline(recipe, model=model, calib=calib, eval=eval, out_dir=out,
                        progress=progress, device=device)
    return pipeline.run()


def clean_out_dir(out: Path) -> None:
    """Remove the files a previous run left in ``out`` (used by the CLI's --overwrite)."""
    for name in ("model.onnx", "model.onnx.data", "model.fp32.onnx", "model.fp32.onnx.data",
                 "report.json", "report.html", "recipe.yaml", "README.md", *HF_CONSUMER_FILES):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
