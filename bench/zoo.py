"""Model-zoo benchmark: every zoo member x every bundled pass family, beside ORT's quantizers.

Usage: .venv/bin/python bench/zoo.py [--zoo out/zoo] [--models a,b] [--quick]
       [--families w8a8,fast,int4,tome,evit,text_token_prune,binarize]
       [--out bench/recorded/zoo-2026-12-07] [--timeout 1200] [--jobs 1] [--report]

Build the zoo first (``scripts/build_zoo.py``; ``make zoo`` does both). Each member runs in a
process of its own (``--one KEY``), as bench/quantization.py runs its models: compress's
pipeline stages load, data, baseline and fp32 export once, then per pass family the stages
after them (passes, export, ONNX Runtime parity) on a copy of the loaded model; the exit code
is the one the CLI would return (0; 2 for input compress refuses; 1 for a bug), ONNX Runtime
``quantize_static`` and ``quantize_dynamic`` on the same fp32 ONNX file and calibration data,
then fidelity on the evaluation data (top-1 agreement and logit error for classifiers, cosine
for encoders), file size and latency at batch 8, all timed together in one process.

``--quick``: 16 calibration / 64 evaluation samples (32 / 128 without), 5 timing repeats (10
without), and the token passes that do not apply to the member's kind
(``compress.models.kind``) are checked at the pass only (the refusal and its exit code; no
export). Results: ``<out>/<key>/result.json``
per member (rewritten after every row, so a member that times out keeps what finished),
``<out>/results.jsonl`` (one line per member, written as members finish) and
``<out>/results.md`` (the table BENCHMARKS.md quotes). ``--jobs N`` runs N members at once
(each in its own process, its variants timed interleaved there); ``--report`` only rewrites
results.md from the members' folders, rows of members stopped part-way included.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["w8a8", "fast", "int4", "tome", "evit", "text_token_prune", "binarize"]
BATCH = 8
TOKEN_FAMILIES = ("tome", "evit", "text_token_prune")


def family_passes(family: str, quick: bool) -> tuple[list[dict], dict]:
    """(passes, export block) of one pass family, as a user would write them."""
    import yaml

    if family == "w8a8":
        return [{"type": "quantize"}], {}
    if family == "fast":
        # The bundled fast-INT8 recipe's passes and export settings, whatever they are today.
        r = yaml.safe_load((ROOT / "recipes" / "deit_small_int8_fast.yaml").read_text())
        return r["passes"], r.get("export", {})
    if family == "int4":
        # Embeddings too: in a text encoder the token table is most of the file (30522 x 256
        # of a 4-layer BERT's 11M parameters), so INT4 of the Linear layers alone is 1.3x.
        return [{"type": "weight_only", "bits": 4, "block_size": 32,
                 "targets": ["Linear", "Conv2d", "Embedding"]}], {}
    if family == "tome":
        return [{"type": "tome", "r": 8}], {}
    if family == "evit":
        return [{"type": "evit", "keep_rate": 0.7}], {}
    if family == "text_token_prune":
        return [{"type": "text_token_prune", "keep_rate": 0.6}], {}
    if family == "binarize":
        steps = 10 if quick else 50
        return [{"type": "binarize", "level": "W1A32",
                 "distillation": {"method": "output", "steps": steps, "batch_size": 16,
                                  "max_seconds": 60}}], {}
    raise ValueError(family)


def base_recipe(member: dict, zoo: Path, quick: bool) -> dict:
    model = dict(member["model"])
    text = model.get("task") == "text-embedding"
    data = zoo / ("texts" if text else "images")
    calib = str(data / "calib.txt") if text else str(data / "calib")
    evals = str(data / "eval.txt") if text else str(data / "eval")
    # Evaluation: 128 images (64 quick), so one flipped prediction moves top-1 agreement by
    # 0.8 points, not 6 as with 16; the table gives each agreement its 95% interval. Both
    # compress and ORT's quantize_static calibrate on the same 32 images.
    n_cal, n_eval = (16, 64) if quick else (32, 128)
    return {
        "version": 1, "name": f"zoo-{member['key']}", "model": model,
        "calibration": {"path": calib, "num_samples": n_cal, "batch_size": 16},
        "evaluation": {"path": evals, "num_samples": n_eval, "batch_size": 16,
                       "latency": {"enabled": False}},
        "passes": [{"type": "quantize"}],
    }


def exit_code_of(e: BaseException) -> int:
    from compress.errors import CompressError

    return e.exit_code if isinstance(e, CompressError) else 1


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:400] if text else ''}"


# --------------------------------------------------------------------------- one member


def run_one(key: str, zoo: Path, out: Path, families: list[str], quick: bool,
            threads: int = 1) -> dict:
    import torch

    from bench.common import Bench, Variant, evaluate_variants, ort_dynamic, ort_static_default
    from compress.api import Pipeline
    from compress.export.onnx import onnx_size_bytes
    from compress.models.kind import applicable_passes, model_kind
    from compress.recipe import parse_recipe

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    member = json.loads((zoo / key / "member.json").read_text())
    work = out / key
    work.mkdir(parents=True, exist_ok=True)
    result = {"key": key, "family": member["family"], "group": member["group"],
              "params": member["params"], "quick": quick, "rows": {}, "started": time.time()}
    base = base_recipe(member, zoo, quick)

    # The member as compress sees it: load, data, reference outputs, fp32 ONNX; these stages
    # run once and every pass family starts from them (a deep copy of the loaded model).
    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="zoo-"))
    try:
        p = Pipeline(parse_recipe(base), model=None, calib=None, eval=None,
                     out_dir=work / "fp32", progress=None, device="cpu")
        p.workdir = tmp
        p.load()
        p.load_data()
        p.baseline()
        kind = model_kind(p.handle)
        result["kind"] = {"kind": kind.kind, "arch": kind.arch, "why": kind.why,
                          "token_runner": kind.token_runner}
        applies = set(applicable_passes(kind))
        fp32 = work / "model.fp32.onnx"
        p._export(fp32)
        result["rows"]["fp32"] = {"exit": 0, "seconds": round(time.perf_counter() - t, 1),
                                  "export": p.handle.info.get("export")}
        _save_partial(result, work)
    except Exception as e:  # noqa: BLE001 - recorded as the member's result
        result["rows"]["fp32"] = {"exit": exit_code_of(e), "error": first_line(e),
                                  "seconds": round(time.perf_counter() - t, 1)}
        if exit_code_of(e) == 1:
            result["rows"]["fp32"]["traceback"] = traceback.format_exc(limit=6)
        result["partial"] = False
        return result
    bench = Bench(key, p.handle, fp32, p.calib, p.eval, p.reference, [BATCH])
    is_text = p.handle.task == "text-embedding"
    original = copy.deepcopy(p.handle)
    base_size = onnx_size_bytes(fp32)

    def measure(v: Variant) -> None:
        """Fidelity and size of one variant, saved at once: a member stopped part-way keeps
        them (latency needs every variant together, at the end)."""
        row = result["rows"].setdefault(v.name, {})
        try:
            evaluate_variants(Bench(key, bench.handle, fp32, bench.calib, bench.eval,
                                    bench.reference, [BATCH], variants=[v]))
        except Exception as e:  # noqa: BLE001 - a file ORT cannot run is a result
            row["eval_error"] = first_line(e)
            return
        bench.variants.append(v)
        m = v.metrics
        row["size_ratio"] = round(base_size / onnx_size_bytes(v.path), 3)
        if is_text:
            row["cosine_mean"] = round(float(m["cosine_mean"]), 5)
            row["cosine_min"] = round(float(m["cosine_min"]), 5)
        else:
            row["top1_agreement"] = round(float(m["top1_agreement"]), 4)
            row["eval_samples"] = len(bench.eval)
            lo, hi = wilson(float(m["top1_agreement"]), len(bench.eval))
            row["top1_agreement_ci95"] = [round(lo, 4), round(hi, 4)]
            row["logits_rel_error"] = round(float(m["logits_rel_error"]), 5)
        _save_partial(result, work)

    bench.variants = []
    measure(Variant("fp32", fp32))

    # ORT's own quantizers first (seconds each): a member stopped part-way keeps the peers.
    for name, peer in (("ort_static", ort_static_default), ("ort_dynamic", ort_dynamic)):
        t = time.perf_counter()
        try:
            v = peer(bench, work)
            v.name = name
            result["rows"][name] = {"exit": 0}
        except Exception as e:  # noqa: BLE001 - a peer failing is a result
            result["rows"][name] = {"exit": "error", "error": first_line(e)}
        result["rows"][name]["seconds"] = round(time.perf_counter() - t, 1)
        if result["rows"][name]["exit"] == 0:
            measure(v)

    family_pass = {"w8a8": "quantize", "fast": "quantize", "int4": "weight_only",
                   "tome": "tome", "evit": "evit", "text_token_prune": "text_token_prune",
                   "binarize": "binarize"}
    for fam in families:
        passes, export = family_passes(fam, quick)
        row: dict = {"passes": passes}
        t = time.perf_counter()
        if quick and fam in TOKEN_FAMILIES and family_pass[fam] not in applies:
            row.update(_pass_only(base, passes, work / fam))   # expected refusal: no export
        else:
            recipe = dict(base, passes=passes, **({"export": export} if export else {}))
            try:
                # compress()'s stages after the shared ones: passes, export + ORT parity.
                run = Pipeline(parse_recipe(recipe), model=None, calib=None, eval=None,
                               out_dir=work / fam, progress=None, device="cpu")
                (work / fam).mkdir(parents=True, exist_ok=True)
                run.workdir, run.fp32_path = tmp, fp32
                run.handle = copy.deepcopy(original)
                # The pipeline's own uses of the evaluation data here are the ORT parity check
                # (a batch) and the compressed torch model's outputs, which this benchmark does
                # not report: a slice serves both. Fidelity below is ORT on all of p.eval.
                run.calib, run.eval, run.reference = p.calib, p.eval.take(16), p.reference
                run.run_passes("torch")
                run.export_compressed()
                run.run_passes("onnx")
                row["exit"] = 0
                row["export"] = run.handle.info.get("export")
                built = Variant(fam, run.model_onnx)
            except Exception as e:  # noqa: BLE001 - the exit code is the result
                row.update(exit=exit_code_of(e), error=first_line(e))
                if row["exit"] == 1:
                    row["traceback"] = traceback.format_exc(limit=8)
        row["seconds"] = round(time.perf_counter() - t, 1)
        result["rows"][fam] = row
        _save_partial(result, work)
        if row["exit"] == 0 and "note" not in row:
            measure(built)
        print(f"[{key}] {fam}: exit {row['exit']} ({row['seconds']} s) {row.get('error', '')}",
              flush=True)

    # Latency of everything ORT could run, timed together (interleaved rounds).
    lat = _time(bench, repeats=5 if quick else 10, threads=threads)
    result["timing"] = {"threads": threads, "batch": BATCH, "load_average": os.getloadavg()}
    for v in bench.variants:
        row = result["rows"][v.name]
        if v.name in lat and "fp32" in lat:
            row["latency_ms_b8"] = round(lat[v.name], 3)
            row["speedup_b8"] = round(lat["fp32"] / lat[v.name], 3)
    result["seconds"] = round(time.time() - result.pop("started"), 1)
    result["partial"] = False
    return result


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``p`` measured on ``n`` samples."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _save_partial(result: dict, work: Path) -> None:
    """Rows so far, so a member that runs out of time still reports what finished."""
    (work / "result.json").write_text(json.dumps(dict(result, partial=True), indent=2,
                                                 default=str))


def _pass_only(base: dict, passes: list[dict], out: Path) -> dict:
    """Load the model and run only the torch pass: the exit code compress would return."""
    import torch

    from compress.api import Pipeline
    from compress.context import PassContext, PassReport
    from compress.recipe import parse_recipe
    from compress.registry import get_pass

    try:
        recipe = parse_recipe(dict(base, passes=passes))
        p = Pipeline(recipe, model=None, calib=None, eval=None, out_dir=out, progress=None,
                     device="cpu")
        p.load()
        entry = get_pass(passes[0]["type"])
        cfg = recipe.passes[0]
        calib = None
        if entry.calibration_needed(cfg):
            p.load_data()
            calib = p.calib
        out.mkdir(parents=True, exist_ok=True)
        ctx = PassContext(index=0, calib=calib, device=torch.device("cpu"), workdir=out,
                          out_dir=out, report=PassReport(0, cfg.type))
        entry.fn(p.handle, cfg, ctx)
        return {"exit": 0, "note": "pass only (quick)"}
    except Exception as e:  # noqa: BLE001
        row = {"exit": exit_code_of(e), "error": first_line(e), "note": "pass only (quick)"}
        if row["exit"] == 1:
            row["traceback"] = traceback.format_exc(limit=8)
        return row


def _time(bench, repeats: int, threads: int) -> dict[str, float]:
    from compress.export.ort import measure_latencies

    try:
        lat = measure_latencies({v.name: v.path for v in bench.variants}, bench.handle, [BATCH],
                                repeats=repeats, warmup=2, threads=threads,
                                seq_len=bench.seq_len)
    except Exception:  # noqa: BLE001 - time one at a time, so one bad file does not hide all
        lat = {}
        for v in bench.variants:
            try:
                lat.update(measure_latencies({v.name: v.path}, bench.handle, [BATCH],
                                             repeats=repeats, warmup=2,
                                             threads=threads, seq_len=bench.seq_len))
            except Exception:  # noqa: BLE001
                pass
    out = {}
    for name, per_bs in lat.items():
        value = per_bs.get(str(BATCH), per_bs.get(BATCH)) if isinstance(per_bs, dict) else per_bs
        if isinstance(value, dict):
            value = value.get("median_ms", value.get("mean_ms"))
        if value is not None:
            out[name] = float(value)
    return out


# --------------------------------------------------------------------------- table


def table(results: list[dict], families: list[str]) -> str:
    """One row per member x variant: exit code, fidelity, size and speed against fp32."""
    lines = ["|model|kind|variant|exit|top-1 agr. [95% CI] / cosine|logit rel. err|x smaller|"
             "x faster b8|note|", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        kind = r.get("kind", {}).get("kind", "-")
        rows = r.get("rows", {})
        if r.get("timeout") or r.get("process_exit") or r.get("stopped"):
            why = (f"timed out after {r['timeout']} s" if r.get("timeout") else
                   r["stopped"] if r.get("stopped") else
                   f"benchmark process exit {r['process_exit']}")
            lines.append(f"|{r['key']}|{kind}|rows below: finished before it stopped|-|-|-|-|-|"
                         f"{why}; families without a row were not run|")
        for name in ["fp32", *families, "ort_static", "ort_dynamic"]:
            row = rows.get(name)
            if row is None:
                continue
            ci = row.get("top1_agreement_ci95")
            fid = (f"{row['top1_agreement'] * 100:.1f}%" + (
                f" [{ci[0] * 100:.0f}-{ci[1] * 100:.0f}]" if ci else "")
                if "top1_agreement" in row else
                   f"{row['cosine_mean']:.4f}" if "cosine_mean" in row else "-")
            err = f"{row['logits_rel_error']:.3f}" if "logits_rel_error" in row else "-"
            size = f"{row['size_ratio']:.2f}" if "size_ratio" in row else "-"
            speed = f"{row['speedup_b8']:.2f}" if "speedup_b8" in row else "-"
            note = (row.get("error") or row.get("note") or row.get("eval_error") or "")
            note = note.replace("|", "/")[:160]
            lines.append(f"|{r['key']}|{kind}|{name}|{row.get('exit', '-')}|{fid}|{err}|{size}|"
                         f"{speed}|{note}|")
    return "\n".join(lines)


def summary(results: list[dict], families: list[str]) -> str:
    counts = {0: 0, 1: 0, 2: 0, 3: 0}
    bugs = []
    for r in results:
        for name in ["fp32", *families]:
            row = r.get("rows", {}).get(name)
            if row is None or not isinstance(row.get("exit"), int):
                continue
            counts[row["exit"]] = counts.get(row["exit"], 0) + 1
            if row["exit"] == 1:
                bugs.append(f"{r['key']}/{name}: {row.get('error', '')[:120]}")
    text = (f"{len(results)} members; compress runs by exit code: "
            + ", ".join(f"exit {k}: {v}" for k, v in sorted(counts.items())))
    if bugs:
        text += "\n\nExit 1 (bugs):\n" + "\n".join(f"- {b}" for b in bugs)
    return text


# --------------------------------------------------------------------------- driver


def clean_member(folder: Path) -> None:
    """Leave the record (result.json, log.txt); the models are hundreds of MB per member."""
    import shutil

    for f in folder.iterdir():
        if f.name in ("result.json", "log.txt"):
            continue
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def record(res: dict, results: list[dict], log: Path, args, families: list[str]) -> None:
    """Append one member to results.jsonl and rewrite results.md."""
    results.append(res)
    with open(log, "a") as f:
        f.write(json.dumps(res) + "\n")
    (args.out / "results.md").write_text(
        summary(results, families) + "\n\n" + table(results, families) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("out/zoo"))
    ap.add_argument("--models", default="", help="comma-separated member keys (default: all)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/recorded/zoo-2026-12-07"))
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per member")
    ap.add_argument("--jobs", type=int, default=1, help="members run at once (one process each)")
    ap.add_argument("--threads", type=int, default=1, help=(
        "ONNX Runtime threads for timing (1: stable ratios on a shared machine)"))
    ap.add_argument("--keep-files", action="store_true", help=(
        "keep each member's ONNX files and pass outputs (default: only result.json, log.txt)"))
    ap.add_argument("--report", action="store_true", help=(
        "only rewrite <out>/results.md from the members' result.json files, members stopped "
        "before they finished included (their finished rows)"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        print(f"unknown families {bad}; known: {FAMILIES}", file=sys.stderr)
        return 2
    if args.one:
        res = run_one(args.one, args.zoo, args.out, families, args.quick, args.threads)
        (args.out / args.one / "result.json").write_text(json.dumps(res, indent=2))
        return 0
    if args.report:
        found = sorted(args.out.glob("*/result.json"), key=lambda f: f.stat().st_mtime)
        results = []
        for f in found:
            res = json.loads(f.read_text())
            if res.get("partial"):
                res["stopped"] = "stopped before it finished (deadline)"
            results.append(res)
        (args.out / "results.md").write_text(
            summary(results, families) + "\n\n" + table(results, families) + "\n")
        return 0
    index = json.loads((args.zoo / "zoo.json").read_text()) if (args.zoo / "zoo.json").is_file() \
        else {}
    keys = [k for k in args.models.split(",") if k] or list(index)
    missing = [k for k in keys if not (args.zoo / k / "member.json").is_file()]
    if missing:
        print(f"not built: {', '.join(missing)}; run scripts/build_zoo.py --models "
              f"{','.join(missing)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    results = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {r["key"] for r in results}
    todo = []
    for key in keys:
        if key in done:
            continue
        prior = args.out / key / "result.json"
        done_before = json.loads(prior.read_text()) if prior.is_file() else {}
        if done_before and not done_before.get("partial", "seconds" not in done_before):
            record(done_before, results, log, args, families)  # finished by an earlier driver
            continue
        todo.append(key)
    # Up to --jobs members at once, each in a process of its own; a member's own stages
    # (and its timing, interleaved across its variants) stay in that one process.
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            key = todo.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", key, "--zoo",
                   str(args.zoo), "--out", str(args.out), "--families", ",".join(families),
                   "--threads", str(args.threads)]
            if args.quick:
                cmd.append("--quick")
            (args.out / key).mkdir(parents=True, exist_ok=True)
            logf = open(args.out / key / "log.txt", "w")
            running[key] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT),
                            time.time(), logf)
        time.sleep(1)
        for key, (proc, start, logf) in list(running.items()):
            rc = proc.poll()
            if rc is None and time.time() - start > args.timeout:
                proc.kill()
                proc.wait()
                rc = "timeout"
            if rc is None:
                continue
            logf.close()
            del running[key]
            path = args.out / key / "result.json"
            res = json.loads(path.read_text()) if path.is_file() else {"key": key, "rows": {}}
            if rc != 0:
                # Rows finished before the timeout (or crash) stay; the rest were not run.
                res.update(process_exit=rc,
                           **({"timeout": args.timeout} if rc == "timeout" else {}))
            res["wall_seconds"] = round(time.time() - start, 1)
            if not args.keep_files:
                clean_member(args.out / key)
            record(res, results, log, args, families)
            print(f"{key}: done in {res['wall_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
