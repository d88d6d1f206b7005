"""Jobs: submit, list, show, cancel, delete, and the job's log."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...redact import redact_paths
from ...runner import LOG_FILE
from ...schemas import JobPublic, JobsPublic, JobStateFilter
from ...store import ACTIVE, FINISHED, RUNNING
from ...uploads import receive_form
from ..deps import JobDep, RunnerDep, SettingsDep, StoreDep, Tenant, job_folder
from ..errors import ApiError, responses
from ..submit import prepare_job
from ..views import job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_LOG_CHUNK = 4 << 20
# Offsets past these are no real position (a billion jobs, a log of 8 PiB): 422, never an
# overflow in the database or in seek().
MAX_LIST_OFFSET = 1_000_000_000
MAX_LOG_OFFSET = 1 << 53

JOB_FORM = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "recipe": {"type": "string", "format": "binary",
                   "description": "recipe YAML (file or text)"},
        "recipe_name": {"type": "string", "description": "a bundled recipe, see GET /v1/recipes"},
        "model": {"type": "string", "format": "binary", "description":
                  ".safetensors, .onnx, .pt/.pth state dict, or a zip/tar of a Hugging Face "
                  "folder"},
        "calib": {"type": "string", "format": "binary", "description":
                  "zip/tar of an image folder, or .npz/.npy/.txt/.jsonl"},
        "eval": {"type": "string", "format": "binary",
                 "description": "evaluation data, same formats as calib"},
        "set": {"type": "array", "items": {"type": "string"},
                "description": "KEY=VALUE recipe edits"}}}}}}}


@router.post("", status_code=202, response_model=JobPublic,
             responses=responses(400, 401, 413, 415, 422), openapi_extra=JOB_FORM)
async def create_job(request: Request, tenant: Tenant, store: StoreDep, settings: SettingsDep,
                     runner: RunnerDep) -> JSONResponse:
    """Upload a recipe, model and data; the job is queued (202 + Location)."""
    job_id = uuid.uuid4().hex
    job_dir = settings.job_dir(tenant, job_id)
    try:
        form = await receive_form(request, job_dir / "inputs", settings.max_upload_bytes)
        job = await run_in_threadpool(prepare_job, form, tenant, job_id, job_dir, store,
                                      settings)
    except BaseException:
        await run_in_threadpool(shutil.rmtree, job_dir, True)
        raise
    runner.notify()
    view = job_view(job)
    return JSONResponse(JobPublic(**view).model_dump(mode="json"), status_code=202,
                        headers={"Location": view["url"]})


@router.get("", response_model=JobsPublic, responses=responses(401, 422))
def list_jobs(tenant: Tenant, store: StoreDep,
              state: Annotated[JobStateFilter, Query(
                  description="only jobs in this state; empty: all")] = "",
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0):
    """This tenant's jobs, newest first."""
    jobs, total = store.list(tenant, state=state or None, limit=limit, offset=offset)
    nxt = offset + len(jobs)
    return {"jobs": [job_view(j) for j in jobs], "total": total, "limit": limit,
            "offset": offset, "next_offset": nxt if nxt < total else None}


@router.get("/{job_id}", response_model=JobPublic, responses=responses(401, 404, 422))
def get_job(job: JobDep):
    """State, stage, progress, ETA and error of one job."""
    return job_view(job)


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={**responses(401, 404, 409, 422), 202: {"model": JobPublic,
                                                         "description": "Cancelling"}})
def cancel_job(job: JobDep, store: StoreDep, runner: RunnerDep, response: Response):
    """Cancel a queued job, or stop a running one (its process is killed)."""
    state, changed = store.cancel(job.tenant, job.id)
    if state == RUNNING:
        runner.cancel(job.id)
        response.status_code = 202
    elif not changed:
        raise ApiError(409, f"job {job.id} already finished ({state})", "Conflict")
    return job_view(store.get(job.tenant, job.id))


@router.delete("/{job_id}", status_code=204, responses=responses(401, 404, 409, 422))
def delete_job(job: JobDep, store: StoreDep, settings: SettingsDep):
    """Delete a finished job and its files."""
    if job.state in ACTIVE or not store.delete(job.tenant, job.id):
        raise ApiError(409, f"job {job.id} is {job.state}; cancel it first", "Conflict")
    shutil.rmtree(job_folder(settings, job), ignore_errors=True)
    return Response(status_code=204)


@router.get("/{job_id}/log", response_class=Response, responses={
    **responses(401, 404, 422),
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "the log from `offset`; X-Next-Offset says where to go on"}})
async def job_log(job: JobDep, request: Request, store: StoreDep, settings: SettingsDep,
                  offset: Annotated[int, Query(ge=0, le=MAX_LOG_OFFSET)] = 0,
                  follow: Annotated[bool, Query(description="stream until it ends")] = False):
    """The job's log from byte ``offset``; ``follow`` streams it until the job ends."""
    folder = job_folder(settings, job)
    path = folder / LOG_FILE
    if not follow:
        data, read = await run_in_threadpool(read_log, path, offset, folder)
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={"X-Next-Offset": str(offset + read)})

    async def stream():
        pos = offset
        while True:
            data, read = await run_in_threadpool(read_log, path, pos, folder)
            if read:
                pos += read
                yield data
                continue
            current = await run_in_threadpool(store.get, job.tenant, job.id)
            if current is None or current.state in FINISHED:
                tail, _ = await run_in_threadpool(read_log, path, pos, folder)
                if tail:
                    yield tail
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


def read_log(path: Path, offset: int, job_dir: Path) -> tuple[bytes, int]:
    """(the log from ``offset`` with server paths redacted, how many bytes of the file that
    was); whole lines when the chunk is full, so that no path is cut in two."""
    data = read_from(path, offset, MAX_LOG_CHUNK)
    if len(data) == MAX_LOG_CHUNK and (end := data.rfind(b"\n")) >= 0:
        data = data[:end + 1]
    text = data.decode("utf-8", "surrogateescape")
    return redact_paths(text, job_dir).encode("utf-8", "surrogateescape"), len(data)


def read_from(path: Path, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``path`` from ``offset``; empty past its end or if missing."""
    try:
        with open(path, "rb") as f:
            if offset >= f.seek(0, 2):
                return b""
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""
