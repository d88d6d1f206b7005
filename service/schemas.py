"""Response bodies of the API (they document the OpenAPI schema at /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "gate_failed", "failed", "cancelled"]
# The ?state= filter of GET /v1/jobs: a state, or empty for all.
JobStateFilter = Literal["", "queued", "running", "succeeded", "gate_failed", "failed",
                         "cancelled"]


class ErrorItem(BaseModel):
    loc: str = Field(description="field path, e.g. passes.0.weights.bits, or an upload field")
    msg: str


class ErrorBody(BaseModel):
    type: str
    message: str
    errors: list[ErrorItem] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Artifact(BaseModel):
    name: str
    bytes: int
    sha256: str
    url: str


class JobPublic(BaseModel):
    id: str
    url: str
    name: str
    state: JobState
    stage: str = Field(description="current stage of compress(): load, data, passes, export ...")
    progress: float = Field(description="0..1 over the whole run")
    percent: float
    eta_seconds: float | None = Field(description="estimated time left while running")
    message: str
    error: dict[str, Any] | None = Field(description="{type, message, exit_code} on failure")
    exit_code: int | None = Field(description="as `compress run`: 0 ok, 2 bad input, 3 quality "
                                              "gate failed, 1 other failure")
    gate_passed: bool | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: dict[str, str]


class JobsPublic(BaseModel):
    jobs: list[JobPublic]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class ArtifactsPublic(BaseModel):
    job_id: str
    artifacts: list[Artifact]


class RecipeInfo(BaseModel):
    name: str
    title: str
    description: str
    model_source: str
    task: str
    passes: list[str]
    yaml: str


class RecipeCheck(BaseModel):
    yaml: str = Field(description="the recipe text")
    uploads: list[Literal["model", "calib", "eval"]] = Field(
        default_factory=list, description="files that will be uploaded with the job")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE edits")


class RecipeCheckResult(BaseModel):
    valid: bool
    name: str
    model_source: str
    passes: list[str]


class Health(BaseModel):
    status: str
    version: str
    checks: dict[str, str] = Field(default_factory=dict)
