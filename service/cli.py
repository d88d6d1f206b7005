"""Service commands of the ``compress`` CLI (loaded lazily by compress/cli.py).

    compress serve                       run the API, workers and dashboard
    compress submit RECIPE [--wait]      queue a job; --wait exits with its code (0/2/3/1)
    compress status|logs|wait|download|list|cancel|delete

The server URL and token come from --url/--token or COMPRESS_URL/COMPRESS_TOKEN. JOB is a job id
or a unique prefix of one (at least 4 characters, as `compress list` shows them).
"""

from __future__ import annotations

import functools
import json
import secrets
import sys
from pathlib import Path

import click

from compress.cli import _Bar
from compress.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK

from .client import DEFAULT_URL, Client, LocalInputError, ServiceError


def _exit_for(err: ServiceError) -> int:
    bad_input = isinstance(err, LocalInputError) or 400 <= err.status < 500
    return EXIT_BAD_INPUT if bad_input else EXIT_FAILURE


def job_exit_code(job: dict) -> int:
    """What a pipeline step gets: the job's own code, as `compress run` would exit."""
    if job["state"] == "succeeded":
        return EXIT_OK
    if job.get("exit_code") is not None and job["state"] in ("gate_failed", "failed"):
        return job["exit_code"]
    return EXIT_FAILURE


def error_json(err: ServiceError, code: int) -> dict:
    """What `--json` prints for a request the service refused or could not take: the shape of
    `compress run --json`'s errors, with the service's error envelope (field errors included)."""
    body = err.body.get("error") if isinstance(err.body.get("error"), dict) else {}
    return {"status": "error", "exit_code": code,
            "error": {"type": type(err).__name__, "message": str(err), **body,
                      **({"http_status": err.status} if err.status else {})}}


def client_command(fn):
    """--url/--token options, a Client as the first argument, ServiceError -> exit code."""

    @click.option("--url", envvar="COMPRESS_URL", default=DEFAULT_URL, show_default=True,
                  help="service URL (env COMPRESS_URL)")
    @click.option("--token", envvar="COMPRESS_TOKEN", default="",
                  help="API token (env COMPRESS_TOKEN)")
    @functools.wraps(fn)
    def wrapper(url, token, **kw):
        client = Client(url, token)
        try:
            return fn(client, **kw)
        except ServiceError as e:
            code = _exit_for(e)
            if kw.get("as_json"):  # a pipeline step parses stdout: one JSON object, even now
                click.echo(json.dumps(error_json(e, code)))
            click.echo(f"error: {e}", err=True)
            sys.exit(code)
        finally:
            client.close()

    return wrapper


# ----------------------------------------------------------------------------- serve

@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="uploads, logs, artifacts and the SQLite database (default ./compress-data, "
                   "env COMPRESS_SERVICE_DATA_DIR)")
@click.option("--database-url", default=None,
              help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite in "
                   "the data folder)")
@click.option("--workers", type=int, default=None, help="jobs run at the same time")
@click.option("--token", "tokens", multiple=True, metavar="TOKEN[:TENANT]",
              help="accepted API token (repeatable); without any, one is generated and kept in "
                   "DATA_DIR/token")
@click.option("--max-upload-mb", type=int, default=None)
@click.option("--runner", type=click.Choice(["local", "ray"]), default=None,
              help="run jobs in local processes (default) or on a Ray cluster "
                   "(env COMPRESS_SERVICE_RUNNER)")
@click.option("--ray-address", default=None,
              help="with --runner ray: the cluster, e.g. ray-head:6379 (default 'auto'; env "
                   "COMPRESS_SERVICE_RAY_ADDRESS)")
@click.option("--log-level", default="info", show_default=True)
def serve(host, port, data_dir, database_url, workers, tokens, max_upload_mb, runner,
          ray_address, log_level):
    """Run the compression service: REST API (/docs), workers and dashboard (/)."""
    import uvicorn

    from .app import create_app
    from .settings import Settings, parse_tokens

    given = {"data_dir": data_dir, "database_url": database_url, "workers": workers,
             "max_upload_mb": max_upload_mb, "runner": runner, "ray_address": ray_address}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    extra = parse_tokens(",".join(t if ":" in t else f"{t}:default" for t in tokens))
    if extra:
        settings.tokens = {**settings.tokens, **extra}
    if not settings.all_tokens():
        token = _local_token(settings.data_dir)
        settings.tokens = {token: "default"}
        click.echo(f"API token (tenant 'default'): {token}   [kept in "
                   f"{settings.data_dir / 'token'}]", err=True)
    on_ray = f" on Ray ({settings.ray_address or 'auto'})" if settings.runner == "ray" else ""
    click.echo(f"dashboard: http://{host}:{port}/   API docs: http://{host}:{port}/docs   "
               f"database: {settings.db_url.split('@')[-1]}   workers: {settings.workers}"
               f"{on_ray}", err=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def _local_token(data_dir: Path) -> str:
    path = Path(data_dir) / "token"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


# ---------------------------------------------------------------------------- client

def _wait_and_report(client: Client, job_id: str, *, as_json: bool, progress: bool,
                     download: str | None, timeout: float | None) -> int:
    bar = _Bar(enabled=progress)
    try:
        job = client.wait(job_id, timeout=timeout, on_update=lambda j: bar(
            j["stage"] or j["state"], j["progress"], j["message"] if j["state"] == "running"
            else j["state"]))
    finally:
        bar.close()
    if download and job.get("links", {}).get("artifacts"):
        files = client.download(job_id, download)
        job["downloaded"] = [str(f) for f in files]
    if as_json:
        click.echo(json.dumps(job))
    else:
        _print_job(job, client.url, _verdict_line(client, job))
        if job.get("downloaded"):
            click.echo(f"downloaded {len(job['downloaded'])} files to {download}"
                       f" (report: {Path(download) / 'report.html'})")
    return job_exit_code(job)


def _verdict_line(client: Client, job: dict) -> str | None:
    """The report's verdict line (smaller by, faster or slower by, accuracy change, gate)."""
    if not job.get("links", {}).get("report"):
        return None
    try:
        return (client.report(job["id"]).get("verdict") or {}).get("line")
    except ServiceError:
        return None  # the summary is a courtesy; the job's state and exit code still stand


def _print_job(job: dict, base_url: str = "", verdict: str | None = None) -> None:
    click.echo(f"job {job['id']}  {job['name']}  {job['state']}"
               + (f"  {job['percent']:.0f}% {job['stage']}" if job["state"] == "running" else ""))
    if verdict:
        click.echo(f"  verdict: {verdict}")
    if job.get("eta_seconds") is not None:
        click.echo(f"  eta: {job['eta_seconds']:.0f} s")
    if job.get("message") and job["state"] != "succeeded":
        click.echo(f"  {job['message']}")
    if job.get("error"):
        click.echo(f"  error: {job['error'].get('type')}: {job['error'].get('message')}")
    if job.get("gate_passed") is not None:
        click.echo(f"  quality gate: {'passed' if job['gate_passed'] else 'FAILED'}")
    if job.get("links", {}).get("report_html"):
        click.echo(f"  report: {base_url}{job['links']['report_html']}")


@click.command()
@click.argument("recipe")
@click.option("--model", help="checkpoint: .safetensors, .onnx, .pt/.pth, or a model folder")
@click.option("--calib", help="calibration data: folder, archive, .npz/.npy/.txt/.jsonl")
@click.option("--eval", "eval_", help="evaluation data (same formats)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="edit the recipe")
@click.option("--wait", is_flag=True, help="wait for the job; exit with its code (0/2/3/1)")
@click.option("--download", metavar="DIR", help="with --wait: fetch the artifacts into DIR")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after seconds")
@click.option("--json", "as_json", is_flag=True, help="print JSON on stdout")
@click.option("--no-progress", is_flag=True)
@client_command
def submit(client, recipe, model, calib, eval_, overrides, wait, download, timeout, as_json,
           no_progress):
    """Queue RECIPE (a YAML file, or the name of a bundled recipe) on the service.

    Local files that the recipe names are uploaded with it; --model/--calib/--eval replace them.
    """
    bar = [None]

    def on_upload(sent: int, total: int) -> None:
        if no_progress or total < 1 << 20:
            return
        if bar[0] is None:
            from tqdm import tqdm

            bar[0] = tqdm(total=total, unit="B", unit_scale=True, desc="upload", file=sys.stderr,
                          disable=None)
        bar[0].update(sent - bar[0].n)

    try:
        job = client.submit(recipe, model=model, calib=calib, eval=eval_,
                            overrides=list(overrides), on_upload=on_upload)
    finally:
        if bar[0] is not None:
            bar[0].close()
    if not wait:
        click.echo(json.dumps(job) if as_json else f"queued job {job['id']} ({client.url}"
                   f"{job['url']})")
        return
    if not as_json:
        click.echo(f"queued job {job['id']}", err=True)
    sys.exit(_wait_and_report(client, job["id"], as_json=as_json, progress=not no_progress,
                              download=download, timeout=timeout))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True)
@client_command
def status(client, job_id, as_json):
    """Show a job's state, stage, progress, ETA, error and verdict.

    JOB is a job id or a unique prefix of at least 4 characters (likewise for logs, wait,
    download, cancel and delete)."""
    job_id = client.resolve_id(job_id)
    job = client.get(job_id)
    click.echo(json.dumps(job) if as_json else "", nl=as_json)
    if not as_json:
        _print_job(job, client.url, _verdict_line(client, job))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("-f", "--follow", is_flag=True, help="stream until the job ends")
@client_command
def logs(client, job_id, follow):
    """Print a job's log."""
    job_id = client.resolve_id(job_id)
    if follow:
        for text in client.follow_log(job_id):
            click.echo(text, nl=False)
        return
    text, _ = client.log(job_id)
    click.echo(text, nl=False)


@click.command("wait")
@click.argument("job_id", metavar="JOB")
@click.option("--download", metavar="DIR", help="fetch the artifacts into DIR")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
@client_command
def wait_cmd(client, job_id, download, timeout, as_json, no_progress):
    """Wait for a job; exit 0 ok, 2 bad input, 3 quality gate failed, 1 other."""
    job_id = client.resolve_id(job_id)
    sys.exit(_wait_and_report(client, job_id, as_json=as_json, progress=not no_progress,
                              download=download, timeout=timeout))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("--out", "out_dir", default=None, help="folder (default: ./JOB_ID)")
@click.option("--name", "names", multiple=True, help="only these artifacts (repeatable)")
@click.option("--no-progress", is_flag=True)
@client_command
def download(client, job_id, out_dir, names, no_progress):
    """Download a finished job's artifacts, checking their SHA-256."""
    job_id = client.resolve_id(job_id)
    from tqdm import tqdm

    arts = client.artifacts(job_id)
    total = sum(a["bytes"] for a in arts if not names or a["name"] in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
              disable=True if no_progress else None) as bar:
        files = client.download(job_id, out_dir or job_id, list(names) or None,
                                on_bytes=bar.update)
    for f in files:
        click.echo(str(f))


@click.command("list")
@click.option("--state", default=None, help="queued, running, succeeded, gate_failed, ...")
@click.option("--limit", default=20, show_default=True)
@click.option("--offset", default=0)
@click.option("--json", "as_json", is_flag=True)
@client_command
def list_jobs(client, state, limit, offset, as_json):
    """List your jobs, newest first."""
    page = client.list(state=state, limit=limit, offset=offset)
    if as_json:
        click.echo(json.dumps(page))
        return
    for j in page["jobs"]:
        click.echo(f"{j['id']}  {j['state']:<11} {j['percent']:5.1f}%  {j['created_at'][:19]}  "
                   f"{j['name']}")
    shown = page["offset"] + len(page["jobs"])
    click.echo(f"{shown} of {page['total']} jobs" + (
        f" (next: --offset {page['next_offset']})" if page["next_offset"] else ""), err=True)


@click.command()
@click.argument("job_id", metavar="JOB")
@client_command
def cancel(client, job_id):
    """Cancel a queued or running job."""
    job_id = client.resolve_id(job_id)
    job = client.cancel(job_id)
    click.echo(f"job {job_id}: {job['state']}"
               + (" (stopping)" if job["state"] == "running" else ""))


@click.command()
@click.argument("job_id", metavar="JOB")
@client_command
def delete(client, job_id):
    """Delete a finished job and its files."""
    job_id = client.resolve_id(job_id)
    client.delete(job_id)
    click.echo(f"job {job_id} deleted")


COMMANDS = {"serve": serve, "submit": submit, "status": status, "logs": logs, "wait": wait_cmd,
            "download": download, "list": list_jobs, "cancel": cancel, "delete": delete}
