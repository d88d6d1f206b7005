"""The FastAPI application: jobs, catalog, health and the dashboard.

``create_app(settings)`` builds an app whose lifespan opens the job store, requeues the jobs
that a previous run of this instance left running, and starts the runner. Every job route is
scoped to the tenant of the bearer token: another tenant's job answers 404, as if it did not
exist.
"""


import asyncio
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from compress import __version__
from compress.errors import InputError
from compress.recipe import recipe_to_yaml

from .archives import ArchiveLimits
from .recipes import bundled_recipe_text, bundled_recipes, check_recipe
from .runner import ARTIFACTS, LOG_FILE, JobRunner, make_runner
from .schemas import (
    ArtifactsPublic,
    ErrorResponse,
    Health,
    JobPublic,
    JobsPublic,
    RecipeCheck,
    RecipeCheckResult,
    RecipeInfo,
)
from .settings import Settings
from .store import ACTIVE, FINISHED, RUNNING, STATES, Job, JobStore, job_times
from .uploads import Form, UploadError, prepare_data, prepare_model, receive_form

log = logging.getLogger("compress.service")
STATIC = Path(__file__).parent / "static"
MAX_LOG_CHUNK = 4 << 20
RunnerFactory = Callable[[JobStore, Settings], JobRunner]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "Error",
                 errors: list[dict] | None = None, headers: dict | None = None):
        self.status, self.type, self.errors, self.headers = status, type_, errors, headers
        super().__init__(message)


def _error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": body}, status_code=status, headers=headers)


ERRORS = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


# ------------------------------------------------------------------------------ views

def job_view(job: Job) -> dict:
    times = job_times(job)
    eta = None
    if job.state == RUNNING and times["started_at"] and job.progress > 0.02:
        elapsed = (datetime.now(UTC) - times["started_at"]).total_seconds()
        eta = round(elapsed * (1 - job.progress) / job.progress, 1)
    url = f"/v1/jobs/{job.id}"
    links = {"self": url, "log": f"{url}/log", "cancel": f"{url}/cancel"}
    if job.artifacts:
        links.update(report=f"{url}/report", report_html=f"{url}/report.html",
                     artifacts=f"{url}/artifacts")
    return {"id": job.id, "url": url, "name": job.name, "state": job.state, "stage": job.stage,
            "progress": job.progress, "percent": round(job.progress * 100, 1),
            "eta_seconds": eta, "message": job.message, "error": job.error,
            "exit_code": job.exit_code, "gate_passed": job.gate_passed,
            "attempts": job.attempts, "cancel_requested": job.cancel_requested,
            **times, "links": links}


def _input_errors(e: InputError, field: str | None = None) -> dict:
    body = e.to_dict()
    if not body.get("errors") and field:
        body["errors"] = [{"loc": field, "msg": str(e)}]
    return body


# ------------------------------------------------------------------------------- app

def create_app(settings: Settings | None = None,
               runner_factory: RunnerFactory = make_runner) -> FastAPI:
    settings = settings or Settings()
    tokens = {hashlib.sha256(t.encode()).hexdigest(): tenant
              for t, tenant in settings.all_tokens().items()}
    if not tokens:
        raise ValueError("no API tokens configured: set COMPRESS_SERVICE_TOKENS=TOKEN:TENANT "
                         "(or pass --token to `compress serve`)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_url)
        requeued = store.requeue_interrupted(settings.instance, settings.stale_after_s)
        if requeued:
            log.warning("requeued %d job(s) interrupted by the last stop", len(requeued))
        runner = runner_factory(store, settings)
        runner.start()
        app.state.store, app.state.runner = store, runner
        try:
            yield
        finally:
            runner.stop()
            store.close()

    app = FastAPI(
        title="compress", version=__version__, lifespan=lifespan,
        description="Compression jobs over HTTP: upload a model, calibration data and a recipe; "
                    "get an ONNX model and an accuracy report. Authenticate with "
                    "`Authorization: Bearer <token>`; each token belongs to one tenant, and a "
                    "tenant sees only its own jobs.")
    app.state.settings = settings
    limits = ArchiveLimits(settings.max_archive_bytes, settings.max_archive_files,
                           settings.max_archive_ratio)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        body = {"type": e.type, "message": str(e)}
        if e.errors:
            body["errors"] = e.errors
        return _error_response(e.status, body, e.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(_request, e: UploadError):
        body = {"type": "UploadError", "message": str(e)}
        if e.field:
            body["errors"] = [{"loc": e.field, "msg": str(e)}]
        return _error_response(e.status, body)

    @app.exception_handler(InputError)
    async def _input_error(_request, e: InputError):
        return _error_response(422, _input_errors(e))

    bearer = HTTPBearer(auto_error=False, description="an API token of the service")

    def tenant_of(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if creds is None:
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                           "Unauthorized", headers={"WWW-Authenticate": "Bearer"})
        tenant = tokens.get(hashlib.sha256(creds.credentials.encode()).hexdigest())
        if tenant is None:
            raise ApiError(401, "invalid API token", "Unauthorized",
                           headers={"WWW-Authenticate": "Bearer"})
        return tenant

    Tenant = Annotated[str, Depends(tenant_of)]

    def store_of(request: Request) -> JobStore:
        return request.app.state.store

    def job_of(job_id: str, tenant: Tenant, request: Request) -> Job:
        job = store_of(request).get(tenant, job_id) if len(job_id) <= 64 else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}", "NotFound")
        return job

    JobDep = Annotated[Job, Depends(job_of)]

    def job_folder(job: Job) -> Path:
        return settings.job_dir(job.tenant, job.id)

    # --------------------------------------------------------------------- jobs

    def prepare_job(form: Form, tenant: str, job_id: str, job_dir: Path, store: JobStore) -> Job:
        recipe_name = form.text("recipe_name")
        if "recipe" in form.files:
            upload = form.files["recipe"]
            if upload.size > 1 << 20:
                raise ApiError(413, "recipe file is larger than 1 MB", "UploadError")
            text, source = upload.path.read_text(encoding="utf-8", errors="replace"), "recipe"
            upload.path.unlink()
        elif form.text("recipe"):
            text, source = form.text("recipe"), "recipe"
        elif recipe_name:
            text = bundled_recipe_text(settings.recipes_dir, recipe_name)
            if text is None:
                names = ", ".join(r["name"] for r in bundled_recipes(settings.recipes_dir))
                raise ApiError(422, f"no bundled recipe {recipe_name!r}; known: {names}",
                               "RecipeError", [{"loc": "recipe_name", "msg": "unknown recipe"}])
            source = recipe_name
        else:
            raise ApiError(422, "send a recipe: a 'recipe' file or text, or 'recipe_name' of a "
                                "bundled recipe", "RecipeError",
                           [{"loc": "recipe", "msg": "field required"}])
        uploads = {k for k in form.files if k != "recipe"}
        recipe = check_recipe(text, uploads=uploads, overrides=form.fields.get("set", []),
                              source=source)
        inputs = {}
        if "model" in form.files:
            try:
                model_path = prepare_model(form.files["model"], limits)
            except InputError as e:
                raise ApiError(422, str(e), type(e).__name__,
                               [{"loc": "model", "msg": str(e)}]) from None
            _check_model_fits(recipe.model.source, model_path)
            inputs["model"] = model_path.relative_to(job_dir).as_posix()
        for key in ("calib", "eval"):
            if key in form.files:
                try:
                    inputs[key] = prepare_data(form.files[key], limits).relative_to(
                        job_dir).as_posix()
                except InputError as e:
                    raise ApiError(422, str(e), type(e).__name__,
                                   [{"loc": key, "msg": str(e)}]) from None
        return store.create(tenant, name=recipe.name or recipe_name or "job",
                            recipe_yaml=recipe_to_yaml(recipe), inputs=inputs, job_id=job_id)

    @app.post("/v1/jobs", status_code=202, response_model=JobPublic, tags=["jobs"],
              responses={**ERRORS, 413: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "recipe": {"type": "string", "format": "binary",
                                 "description": "recipe YAML (file or text)"},
                      "recipe_name": {"type": "string",
                                      "description": "a bundled recipe, see GET /v1/recipes"},
                      "model": {"type": "string", "format": "binary", "description":
                                ".safetensors, .onnx, .pt/.pth state dict, or a zip/tar of a "
                                "Hugging Face folder"},
                      "calib": {"type": "string", "format": "binary", "description":
                                "zip/tar of an image folder, or .npz/.npy/.txt/.jsonl"},
                      "eval": {"type": "string", "format": "binary",
                               "description": "evaluation data, same formats as calib"},
                      "set": {"type": "array", "items": {"type": "string"},
                              "description": "KEY=VALUE recipe edits"}}}}}}})
    async def create_job(request: Request, tenant: Tenant) -> JSONResponse:
        """Upload a recipe, model and data; the job is queued (202 + Location)."""
        job_id = uuid.uuid4().hex
        job_dir = settings.job_dir(tenant, job_id)
        try:
            form = await receive_form(request, job_dir / "inputs", settings.max_upload_bytes)
            job = await run_in_threadpool(prepare_job, form, tenant, job_id, job_dir,
                                          store_of(request))
        except BaseException:
            await run_in_threadpool(shutil.rmtree, job_dir, True)
            raise
        request.app.state.runner.notify()
        view = job_view(job)
        return JSONResponse(JobPublic(**view).model_dump(mode="json"), status_code=202,
                            headers={"Location": view["url"]})

    @app.get("/v1/jobs", response_model=JobsPublic, tags=["jobs"], responses=ERRORS)
    def list_jobs(request: Request, tenant: Tenant,
                  state: Annotated[str | None, Query(description="|".join(STATES))] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0)] = 0):
        """This tenant's jobs, newest first."""
        if state is not None and state not in STATES:
            raise ApiError(422, f"unknown state {state!r}; one of {', '.join(STATES)}",
                           "ValidationError", [{"loc": "state", "msg": "unknown state"}])
        jobs, total = store_of(request).list(tenant, state=state, limit=limit, offset=offset)
        nxt = offset + len(jobs)
        return {"jobs": [job_view(j) for j in jobs], "total": total, "limit": limit,
                "offset": offset, "next_offset": nxt if nxt < total else None}

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, tags=["jobs"], responses=ERRORS)
    def get_job(job: JobDep):
        """State, stage, progress, ETA and error of one job."""
        return job_view(job)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic, tags=["jobs"],
              responses={**ERRORS, 409: {"model": ErrorResponse}})
    def cancel_job(job: JobDep, request: Request, response: Response):
        """Cancel a queued job, or stop a running one (its process is killed)."""
        store = store_of(request)
        state, changed = store.cancel(job.tenant, job.id)
        if state == RUNNING:
            request.app.state.runner.cancel(job.id)
            response.status_code = 202
        elif not changed:
            raise ApiError(409, f"job {job.id} already finished ({state})", "Conflict")
        return job_view(store.get(job.tenant, job.id))

    @app.delete("/v1/jobs/{job_id}", status_code=204, tags=["jobs"],
                responses={**ERRORS, 409: {"model": ErrorResponse}})
    def delete_job(job: JobDep, request: Request):
        """Delete a finished job and its files."""
        if job.state in ACTIVE or not store_of(request).delete(job.tenant, job.id):
            raise ApiError(409, f"job {job.id} is {job.state}; cancel it first", "Conflict")
        shutil.rmtree(job_folder(job), ignore_errors=True)
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/log", tags=["jobs"], responses=ERRORS,
             response_class=Response)
    async def job_log(job: JobDep, request: Request,
                      offset: Annotated[int, Query(ge=0)] = 0,
                      follow: Annotated[bool, Query(description="stream until it ends")] = False):
        """The job's log from byte ``offset``; ``follow`` streams it until the job ends."""
        path = job_folder(job) / LOG_FILE
        if not follow:
            data = _read_from(path, offset, MAX_LOG_CHUNK)
            return Response(data, media_type="text/plain; charset=utf-8",
                            headers={"X-Next-Offset": str(offset + len(data))})
        store = store_of(request)

        async def stream():
            pos = offset
            while True:
                data = await run_in_threadpool(_read_from, path, pos, MAX_LOG_CHUNK)
                if data:
                    pos += len(data)
                    yield data
                    continue
                current = await run_in_threadpool(store.get, job.tenant, job.id)
                if current is None or current.state in FINISHED:
                    tail = await run_in_threadpool(_read_from, path, pos, MAX_LOG_CHUNK)
                    if tail:
                        yield tail
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    def finished_file(job: Job, name: str) -> Path:
        if not job.artifacts:
            detail = ("is still " + job.state) if job.state in ACTIVE else (
                f"{job.state} without results; see its log")
            raise ApiError(409, f"job {job.id} {detail}", "Conflict")
        if name not in {a["name"] for a in job.artifacts}:
            raise ApiError(404, f"job {job.id} has no artifact {name!r}", "NotFound")
        return job_folder(job) / ARTIFACTS / name

    @app.get("/v1/jobs/{job_id}/report", tags=["results"],
             responses={**ERRORS, 409: {"model": ErrorResponse}})
    def job_report(job: JobDep):
        """report.json: metrics, sizes, latency, per-layer table, quality gate."""
        return FileResponse(finished_file(job, "report.json"), media_type="application/json")

    @app.get("/v1/jobs/{job_id}/report.html", tags=["results"], response_class=HTMLResponse,
             responses={**ERRORS, 409: {"model": ErrorResponse}})
    def job_report_html(job: JobDep):
        """The self-contained HTML report with its plots."""
        return FileResponse(finished_file(job, "report.html"), media_type="text/html")

    @app.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactsPublic, tags=["results"],
             responses={**ERRORS, 409: {"model": ErrorResponse}})
    def job_artifacts(job: JobDep):
        """Files of a finished job with their sizes and SHA-256 checksums."""
        finished_file(job, "report.json")
        return {"job_id": job.id, "artifacts": [
            {**a, "url": f"/v1/jobs/{job.id}/artifacts/{a['name']}"} for a in job.artifacts]}

    @app.get("/v1/jobs/{job_id}/artifacts/{name:path}", tags=["results"],
             responses={**ERRORS, 409: {"model": ErrorResponse}})
    def job_artifact(job: JobDep, name: str):
        """One artifact (model.onnx, model.fp32.onnx, report.json, INT4 safetensors, ...)."""
        path = finished_file(job, name)
        digest = next(a["sha256"] for a in job.artifacts if a["name"] == name)
        return FileResponse(path, filename=Path(name).name,
                            headers={"X-Checksum-SHA256": digest})

    # ------------------------------------------------------------------ catalog

    @app.get("/v1/recipes", response_model=list[RecipeInfo], tags=["catalog"], responses=ERRORS)
    def list_recipes(_tenant: Tenant):
        """The bundled recipes, with their YAML."""
        return bundled_recipes(settings.recipes_dir)

    @app.get("/v1/recipes/{name}", response_model=RecipeInfo, tags=["catalog"],
             responses=ERRORS)
    def get_recipe(name: str, _tenant: Tenant):
        """One bundled recipe."""
        for r in bundled_recipes(settings.recipes_dir):
            if r["name"] == name.removesuffix(".yaml"):
                return r
        raise ApiError(404, f"no bundled recipe {name!r}", "NotFound")

    @app.post("/v1/recipes/validate", response_model=RecipeCheckResult, tags=["catalog"],
              responses={**ERRORS, 422: {"model": ErrorResponse}})
    def validate_recipe(body: RecipeCheck, _tenant: Tenant):
        """Check a recipe as job submission would; 422 lists each problem with its field."""
        recipe = check_recipe(body.yaml, uploads=set(body.uploads), overrides=body.set)
        return {"valid": True, "name": recipe.name, "model_source": recipe.model.source,
                "passes": [p.type for p in recipe.passes]}

    @app.get("/v1/passes", tags=["catalog"], responses=ERRORS)
    def list_passes(_tenant: Tenant) -> list[dict]:
        """Every registered pass with its stage, documentation and config JSON Schema."""
        from compress.registry import pass_catalog

        return pass_catalog()

    @app.get("/v1/recipe-schema", tags=["catalog"], responses=ERRORS)
    def recipe_schema(_tenant: Tenant) -> dict:
        """The JSON Schema of recipes."""
        from compress.recipe import Recipe

        return Recipe.model_json_schema()

    # ------------------------------------------------------------------- health

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz():
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", response_model=Health, tags=["health"],
             responses={503: {"model": Health}})
    def readyz(request: Request):
        """Readiness: database reachable, data folder writable, workers alive."""
        checks = {}
        try:
            store_of(request).ping()
            checks["database"] = "ok"
        except Exception as e:  # noqa: BLE001
            checks["database"] = f"error: {type(e).__name__}"
        checks["data_dir"] = "ok" if os.access(settings.data_dir, os.W_OK) else "not writable"
        checks["workers"] = "ok" if request.app.state.runner.healthy() else "not running"
        ok = all(v == "ok" for v in checks.values())
        body = {"status": "ok" if ok else "unavailable", "version": __version__,
                "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    # ---------------------------------------------------------------- dashboard

    @app.get("/", include_in_schema=False)
    def dashboard():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""


def _check_model_fits(source: str, path: Path) -> None:
    expected = {"timm": "a .safetensors or .pt/.pth weights file",
                "onnx": "an .onnx file", "hf": "a zip/tar of a Hugging Face model folder"}[source]
    fits = {"timm": path.is_file() and path.suffix in (".safetensors", ".pt", ".pth"),
            "onnx": path.is_file() and path.suffix == ".onnx",
            "hf": path.is_dir()}[source]
    if not fits:
        raise ApiError(422, f"model: the recipe's model.source is {source!r}, which needs "
                            f"{expected}; got {path.name!r}", "ModelLoadError",
                       [{"loc": "model", "msg": f"expected {expected}"}])


__all__ = ["ApiError", "create_app", "job_view"]
