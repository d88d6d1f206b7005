"""The FastAPI application: jobs, results, catalog, health and the dashboard.

``create_app(settings)`` builds an app whose lifespan opens the job store, requeues the jobs
that a previous run of this instance left running, starts the runner and the periodic check for
jobs whose runner died (any instance's). Every job route is scoped to the tenant of the bearer
token: another tenant's job answers 404, as if it did not exist. The routes live in
``service/api/routes/``, their dependencies in ``service/api/deps.py``, and every error answers
the one envelope of ``service/api/errors.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from compress import __version__

from .api.deps import token_digests
from .api.errors import ApiError, install_error_handlers
from .api.routes import catalog, dashboard, health, jobs, results
from .api.views import job_view
from .runner import JobRunner, make_runner
from .settings import Settings
from .store import JobStore
from .sweeper import StaleJobSweeper

log = logging.getLogger("compress.service")
RunnerFactory = Callable[[JobStore, Settings], JobRunner]


def create_app(settings: Settings | None = None,
               runner_factory: RunnerFactory = make_runner) -> FastAPI:
    settings = settings or Settings()
    digests = token_digests(settings)
    if not digests:
        raise ValueError("no API tokens configured: set COMPRESS_SERVICE_TOKENS=TOKEN:TENANT "
                         "(or pass --token to `compress serve`)")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_url)
        requeued = store.requeue_interrupted(settings.instance, settings.stale_after_s,
                                             settings.job_max_attempts)
        if requeued:
            log.warning("requeued %d job(s) interrupted by the last stop", len(requeued))
        runner = runner_factory(store, settings)
        runner.start()
        sweeper = StaleJobSweeper(store, settings, on_requeued=runner.notify)
        sweeper.start()
        app.state.store, app.state.runner = store, runner
        try:
            yield
        finally:
            sweeper.stop()
            runner.stop()
            store.close()

    app = FastAPI(
        title="compress", version=__version__, lifespan=lifespan,
        description="Compression jobs over HTTP: upload a model, calibration data and a recipe; "
                    "get an ONNX model and an accuracy report. Authenticate with "
                    "`Authorization: Bearer <token>`; each token belongs to one tenant, and a "
                    "tenant sees only its own jobs. Every error answers "
                    '`{"error": {"type", "message", "errors": [{"loc", "msg"}]}}`.')
    app.state.settings = settings
    app.state.token_digests = digests
    install_error_handlers(app)
    for module in (jobs, results, catalog, health, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app


__all__ = ["ApiError", "create_app", "job_view"]
