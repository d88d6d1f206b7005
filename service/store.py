"""Jobs in a relational database through SQLAlchemy: SQLite by default, PostgreSQL by URL.

Only the API process touches the database; job processes report to it through their runner.
Every state change is a conditional UPDATE (``WHERE state = ...``), so two workers, or two
service instances sharing one PostgreSQL database, never claim or finish the same job twice.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

QUEUED, RUNNING, SUCCEEDED, GATE_FAILED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "gate_failed", "failed", "cancelled")
STATES = (QUEUED, RUNNING, SUCCEEDED, GATE_FAILED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, GATE_FAILED, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")  # recipe name, cut to 200
    state: Mapped[str] = mapped_column(String(16), index=True)
    recipe_yaml: Mapped[str] = mapped_column(Text)
    # Paths of the uploaded inputs relative to the job folder: {"model": "inputs/model.onnx"}.
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stage: Mapped[str] = mapped_column(String(32), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    gate_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # [{"name", "bytes", "sha256"}] of the files moved into artifacts/ on success.
    artifacts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    instance: Mapped[str | None] = mapped_column(String(200), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                 index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _no_nul(value: Any) -> Any:
    # PostgreSQL text and JSON cannot hold NUL characters; SQLite can. Dropping them keeps both
    # databases answering the same (a recipe name or a library message may carry one).
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _attempt_is(attempt: int | None):
    return true() if attempt is None else Job.attempts == attempt


def _aware(t: datetime | None) -> datetime | None:
    # SQLite hands datetimes back without a zone; every stored time is UTC.
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=UTC)
    return t


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # WAL: readers do not block the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class JobStore:
    """Create, read and move jobs between states. Reads are scoped to one tenant."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ----------------------------------------------------------------- API side

    def create(self, tenant: str, *, name: str, recipe_yaml: str, inputs: dict[str, str],
               job_id: str | None = None) -> Job:
        job = Job(id=job_id or uuid.uuid4().hex, tenant=tenant, name=_no_nul(name)[:200],
                  state=QUEUED, recipe_yaml=_no_nul(recipe_yaml), inputs=_no_nul(inputs),
                  stage="", progress=0.0,
                  message="queued", artifacts=[], attempts=0, cancel_requested=False,
                  created_at=utcnow(), updated_at=utcnow())
        with self.session.begin() as s:
            s.add(job)
        return job

    def get(self, tenant: str, job_id: str) -> Job | None:
        if "\x00" in job_id:  # no stored id has one, and PostgreSQL refuses to compare it
            return None
        with self.session() as s:
            job = s.get(Job, job_id)
            return job if job is not None and job.tenant == tenant else None

    def get_any(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def list(self, tenant: str, *, state: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[list[Job], int]:
        query = select(Job).where(Job.tenant == tenant)
        count = select(func.count()).select_from(Job).where(Job.tenant == tenant)
        if state:
            query, count = query.where(Job.state == state), count.where(Job.state == state)
        query = query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        with self.session() as s:
            return list(s.scalars(query)), s.scalar(count) or 0

    def cancel(self, tenant: str, job_id: str) -> tuple[str | None, bool]:
        """Cancel a queued job at once, or flag a running one.

        Returns the state after and whether this call changed it (None: no such job).
        """
        now = utcnow()
        with self.session.begin() as s:
            queued = s.execute(update(Job).where(
                Job.id == job_id, Job.tenant == tenant, Job.state == QUEUED).values(
                state=CANCELLED, cancel_requested=True, message="cancelled before it started",
                finished_at=now, updated_at=now))
            if queued.rowcount:
                return CANCELLED, True
            running = s.execute(update(Job).where(Job.id == job_id, Job.tenant == tenant,
                                                  Job.state == RUNNING).values(
                cancel_requested=True, message="cancelling", updated_at=now))
            job = s.get(Job, job_id)
            if job is None or job.tenant != tenant:
                return None, False
            return job.state, bool(running.rowcount)

    def delete(self, tenant: str, job_id: str) -> bool:
        with self.session.begin() as s:
            res = s.execute(Job.__table__.delete().where(
                Job.id == job_id, Job.tenant == tenant, Job.state.in_(FINISHED)))
            return bool(res.rowcount)

    # -------------------------------------------------------------- runner side

    def claim_next(self, instance: str) -> Job | None:
        """Move the oldest queued job to running for ``instance``; None if there is none."""
        with self.session() as s:
            candidates = list(s.scalars(select(Job.id).where(Job.state == QUEUED).order_by(
                Job.created_at, Job.id).limit(8)))
        for job_id in candidates:
            now = utcnow()
            with self.session.begin() as s:
                res = s.execute(update(Job).where(Job.id == job_id, Job.state == QUEUED).values(
                    state=RUNNING, instance=instance, attempts=Job.attempts + 1, started_at=now,
                    updated_at=now, stage="starting", progress=0.0, message="starting",
                    error=None, pid=None))
                if res.rowcount == 1:
                    return s.get(Job, job_id)
        return None

    def update_running(self, job_id: str, **values: Any) -> bool:
        """Progress, pid, message of a running job (or only its heartbeat, ``updated_at``);
        False when it is no longer running."""
        with self.session.begin() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING).values(
                **_no_nul(values), updated_at=utcnow()))
            return bool(res.rowcount)

    def cancel_requested(self, job_id: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def finish(self, job_id: str, state: str, *, attempt: int | None = None,
               **values: Any) -> bool:
        """End a running job; with ``attempt``, only if that attempt still runs it (a runner
        that lost the job to another instance must not end the new attempt)."""
        now = utcnow()
        with self.session.begin() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING,
                                              _attempt_is(attempt)).values(
                state=state, finished_at=now, updated_at=now, pid=None, **_no_nul(values)))
            return bool(res.rowcount)

    def requeue(self, job_id: str, message: str, *, attempt: int | None = None) -> bool:
        with self.session.begin() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.state == RUNNING,
                                              _attempt_is(attempt)).values(
                state=QUEUED, stage="", progress=0.0, pid=None, instance=None,
                message=_no_nul(message), updated_at=utcnow()))
            return bool(res.rowcount)

    def requeue_interrupted(self, instance: str, stale_after_s: float,
                            max_attempts: int | None = None) -> list[str]:
        """At start-up: jobs this instance left running go back to the queue, as do any
        instance's stale ones (see ``requeue_stale``)."""
        return self._recover((Job.instance == instance) | self._stale(stale_after_s),
                             "the service restarted while it ran", max_attempts)

    def requeue_stale(self, stale_after_s: float, max_attempts: int | None = None) -> list[str]:
        """Running jobs whose heartbeat (``updated_at``) is older than ``stale_after_s`` lost
        their runner (its service instance died, whatever its name): back to the queue, or
        failed once they have started ``max_attempts`` times; cancelled if that was asked."""
        return self._recover(self._stale(stale_after_s),
                             f"no heartbeat for {stale_after_s:g} s (its service instance "
                             "stopped)", max_attempts)

    @staticmethod
    def _stale(stale_after_s: float):
        return Job.updated_at < utcnow() - timedelta(seconds=stale_after_s)

    def _recover(self, orphaned, why: str, max_attempts: int | None) -> list[str]:
        now = utcnow()
        orphaned = (Job.state == RUNNING) & orphaned
        with self.session.begin() as s:
            s.execute(update(Job).where(orphaned, Job.cancel_requested.is_(True)).values(
                state=CANCELLED, finished_at=now, updated_at=now, pid=None,
                message=f"cancelled ({why})"))
            if max_attempts is not None:
                msg = (f"failed: {why}, and it has started {max_attempts} times "
                       f"(job_max_attempts={max_attempts})")
                s.execute(update(Job).where(orphaned, Job.attempts >= max_attempts).values(
                    state=FAILED, finished_at=now, updated_at=now, pid=None, exit_code=1,
                    message=msg, error={"type": "WorkerLost", "message": msg}))
            ids = list(s.scalars(select(Job.id).where(orphaned)))
            if ids:
                s.execute(update(Job).where(Job.id.in_(ids), orphaned).values(
                    state=QUEUED, stage="", progress=0.0, pid=None, instance=None,
                    message=f"requeued: {why}", updated_at=now))
        return ids


def job_times(job: Job) -> dict[str, datetime | None]:
    return {"created_at": _aware(job.created_at), "started_at": _aware(job.started_at),
            "finished_at": _aware(job.finished_at), "updated_at": _aware(job.updated_at)}
