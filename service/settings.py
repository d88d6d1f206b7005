"""Service configuration: command-line flags, ``COMPRESS_SERVICE_*`` variables or a .env file."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from compress.bundled import RECIPES_DIR as BUNDLED_RECIPES


def parse_tokens(value: str | dict[str, str] | None) -> dict[str, str]:
    """``"TOKEN:TENANT,TOKEN2:TENANT2"`` (or a dict) -> {token: tenant}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    tokens = {}
    for item in value.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        token, sep, tenant = item.partition(":")
        if not sep or not token.strip() or not tenant.strip():
            raise ValueError(f"token entry {item[:4]}... must look like TOKEN:TENANT")
        tokens[token.strip()] = tenant.strip()
    return tokens


class Settings(BaseSettings):
    """Everything the service reads at start-up. Environment: ``COMPRESS_SERVICE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="COMPRESS_SERVICE_", env_file=".env",
                                      extra="ignore")

    data_dir: Path = Field(Path("compress-data"), description="uploads, logs and artifacts")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db; default: "
                          "SQLite at DATA_DIR/jobs.db")
    workers: int = Field(1, ge=0, le=64, description="jobs run at the same time (0: API only)")
    tokens: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="bearer tokens, 'TOKEN:TENANT,...'")
    tokens_file: Path | None = Field(None, description="file of TOKEN:TENANT lines")
    max_upload_mb: int = Field(2048, ge=1, description="largest request body (all files)")
    max_archive_mb: int = Field(4096, ge=1, description="largest expanded archive")
    max_archive_files: int = Field(200_000, ge=1)
    max_archive_ratio: int = Field(200, ge=1, description="expanded / compressed size limit")
    recipes_dir: Path = Field(BUNDLED_RECIPES, description="bundled recipes offered by name")
    instance: str = Field(default_factory=socket.gethostname,
                          description="name of this service instance (owner of running jobs)")
    job_timeout_s: float = Field(
        7200.0, ge=0, description="kill and fail a job running longer than this (0: no limit)")
    job_memory_mb: int = Field(
        16384, ge=0, description="kill and fail a job whose processes hold more resident memory "
                                 "than this, in MiB (0: no limit); the preloaded library takes "
                                 "about 500 MiB of it")
    cancel_grace_s: float = Field(3.0, ge=0, description="SIGTERM to SIGKILL delay on cancel")
    poll_interval_s: float = Field(1.0, gt=0, description="idle workers look for jobs this often")
    stale_after_s: float = Field(
        300.0, gt=0, description="a running job whose heartbeat is older than this is requeued "
                                 "(its instance died), whichever instance ran it; heartbeats come "
                                 "every 10 s, or every third of this if that is shorter")
    stale_check_interval_s: float = Field(
        30.0, gt=0, description="every instance looks for such stale jobs this often")
    job_max_attempts: int = Field(
        3, ge=1, description="a stale job runs again until it has started this many times; "
                             "then it fails with the reason")

    runner: Literal["local", "ray"] = Field(
        "local", description="where jobs run: child processes of this instance, or a Ray cluster")
    ray_address: str | None = Field(
        None, description="Ray cluster to run jobs on (runner=ray), e.g. ray-head:6379; default: "
                          "the cluster this machine belongs to ('auto')")
    ray_num_cpus: float = Field(1.0, gt=0, description="CPUs each job reserves on Ray")
    ray_num_gpus: float = Field(
        0.0, ge=0, description="GPUs each job reserves on Ray (a recipe with device: cuda takes "
                               "at least 1)")
    ray_max_retries: int = Field(
        1, ge=0, description="runs again a job whose Ray worker or node died, this many times; "
                             "then it fails with the reason")

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        return parse_tokens(v)

    def all_tokens(self) -> dict[str, str]:
        tokens = dict(self.tokens)
        if self.tokens_file is not None:
            tokens.update(parse_tokens(self.tokens_file.read_text()))
        return tokens

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_archive_bytes(self) -> int:
        return self.max_archive_mb * 1024 * 1024

    def tenant_dir(self, tenant: str) -> Path:
        # Tenant names never become paths; a digest keeps them apart on disk.
        return self.data_dir / "tenants" / hashlib.sha256(tenant.encode()).hexdigest()[:24]

    def job_dir(self, tenant: str, job_id: str) -> Path:
        return self.tenant_dir(tenant) / "jobs" / job_id
