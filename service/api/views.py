"""How the API shows a job (the body of ``JobPublic``)."""

from __future__ import annotations

from datetime import UTC, datetime

from ..redact import redact_error
from ..store import RUNNING, Job, job_times


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
            "eta_seconds": eta, "message": redact_error(job.message),
            "error": redact_error(job.error),
            "exit_code": job.exit_code, "gate_passed": job.gate_passed,
            "attempts": job.attempts, "cancel_requested": job.cancel_requested,
            **times, "links": links}
