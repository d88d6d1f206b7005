"""The HTTP API in parts, as the FastAPI full-stack template lays it out.

    errors.py     the one error envelope and the handlers that produce it for every error
    deps.py       dependencies: the tenant of the bearer token, the store, a tenant's job
    views.py      how a job is shown (``job_view``)
    submit.py     a job submission: recipe checks and uploaded inputs (``prepare_job``)
    routes/       jobs, results, catalog, health and dashboard routers

``service.app.create_app`` puts them together.
"""
