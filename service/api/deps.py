"""Dependencies of the routes: the tenant of the bearer token, the store, settings, a job.

Every job route looks its job up through ``job_of``, scoped to the caller's tenant: another
tenant's job, and any id that could not be one, answers 404 as if it did not exist.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..runner import JobRunner
from ..settings import Settings
from ..store import Job, JobStore
from .errors import ApiError

# Job ids are uuid4 hex; anything outside this alphabet is no job (and never reaches the database).
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

bearer = HTTPBearer(auto_error=False, description="an API token of the service")


def token_digests(settings: Settings) -> dict[str, str]:
    """{sha256(token): tenant}: the app keeps digests, never the tokens themselves."""
    return {hashlib.sha256(t.encode()).hexdigest(): tenant
            for t, tenant in settings.all_tokens().items()}


def tenant_of(request: Request,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    if creds is None:
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                       "Unauthorized", headers={"WWW-Authenticate": "Bearer"})
    digest = hashlib.sha256(creds.credentials.encode("utf-8", "replace")).hexdigest()
    tenant = request.app.state.token_digests.get(digest)
    if tenant is None:
        raise ApiError(401, "invalid API token", "Unauthorized",
                       headers={"WWW-Authenticate": "Bearer"})
    return tenant


def store_of(request: Request) -> JobStore:
    return request.app.state.store


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def runner_of(request: Request) -> JobRunner:
    return request.app.state.runner


Tenant = Annotated[str, Depends(tenant_of)]
StoreDep = Annotated[JobStore, Depends(store_of)]
SettingsDep = Annotated[Settings, Depends(settings_of)]
RunnerDep = Annotated[JobRunner, Depends(runner_of)]


def job_of(job_id: str, tenant: Tenant, store: StoreDep) -> Job:
    job = store.get(tenant, job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id[:80]!r}", "NotFound")
    return job


JobDep = Annotated[Job, Depends(job_of)]


def job_folder(settings: Settings, job: Job) -> Path:
    return settings.job_dir(job.tenant, job.id)
