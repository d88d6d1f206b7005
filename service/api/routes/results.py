"""Results of a finished job: report.json, report.html, and the artifacts with checksums."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ...runner import ARTIFACTS
from ...schemas import ArtifactsPublic
from ...settings import Settings
from ...store import ACTIVE, Job
from ..deps import JobDep, SettingsDep, job_folder
from ..errors import ApiError, responses

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["results"])
RESULT_ERRORS = responses(401, 404, 409, 422)


def finished_file(settings: Settings, job: Job, name: str) -> Path:
    """The path of artifact ``name`` of a finished job (409 while it has none, 404 if unknown)."""
    if not job.artifacts:
        detail = ("is still " + job.state) if job.state in ACTIVE else (
            f"{job.state} without results; see its log")
        raise ApiError(409, f"job {job.id} {detail}", "Conflict")
    if name not in {a["name"] for a in job.artifacts}:
        raise ApiError(404, f"job {job.id} has no artifact {name[:200]!r}", "NotFound")
    return job_folder(settings, job) / ARTIFACTS / name


@router.get("/report", responses={
    **RESULT_ERRORS, 200: {"content": {"application/json": {"schema": {"type": "object"}}},
                           "description": "report.json"}})
def job_report(job: JobDep, settings: SettingsDep):
    """report.json: metrics, sizes, latency, per-layer table, quality gate."""
    return FileResponse(finished_file(settings, job, "report.json"),
                        media_type="application/json")


@router.get("/report.html", responses={
    **RESULT_ERRORS, 200: {"content": {"text/html": {"schema": {"type": "string"}}},
                           "description": "report.html"}})
def job_report_html(job: JobDep, settings: SettingsDep):
    """The self-contained HTML report with its plots."""
    return FileResponse(finished_file(settings, job, "report.html"), media_type="text/html")


@router.get("/artifacts", response_model=ArtifactsPublic, responses=RESULT_ERRORS)
def job_artifacts(job: JobDep, settings: SettingsDep):
    """Files of a finished job with their sizes and SHA-256 checksums."""
    finished_file(settings, job, "report.json")
    return {"job_id": job.id, "artifacts": [
        {**a, "url": f"/v1/jobs/{job.id}/artifacts/{a['name']}"} for a in job.artifacts]}


@router.get("/artifacts/{name:path}", responses={
    **RESULT_ERRORS, 200: {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}, "description": "the file"}})
def job_artifact(job: JobDep, name: str, settings: SettingsDep):
    """One artifact (model.onnx, model.fp32.onnx, report.json, INT4 safetensors, ...)."""
    path = finished_file(settings, job, name)
    digest = next(a["sha256"] for a in job.artifacts if a["name"] == name)
    return FileResponse(path, filename=Path(name).name, headers={"X-Checksum-SHA256": digest})
