"""The compress service: REST API, job store, workers, CLI client and web dashboard.

It imports the ``compress`` library and calls ``compress.api.compress()`` in a child process per
job; the library never imports this package, so ``compress`` stays usable without FastAPI.

    settings.py   configuration from flags and ``COMPRESS_SERVICE_*`` environment variables
    store.py      jobs in SQLite or PostgreSQL through SQLAlchemy
    runner.py     the runner interface and the local runner (child process per job)
    supervise.py  the loop that watches a job's process (local runner and Ray task)
    sweeper.py    the periodic requeue of jobs whose instance died (no heartbeat)
    redact.py     server paths out of the error messages a tenant reads
    worker.py     what runs inside the child process: one ``compress()`` call
    uploads.py    streaming multipart uploads under size limits; safe checkpoint formats
    archives.py   safe archive extraction (no traversal, no links, bounded expansion)
    recipes.py    bundled recipes and the checks an uploaded recipe must pass
    app.py        the FastAPI application (``create_app``)
    api/          its routes, dependencies, error envelope and job submission
    client.py     the HTTP client used by the CLI
    cli.py        ``compress serve|submit|status|logs|wait|download|list|cancel|delete``
    static/       the dashboard (plain HTML, CSS and JavaScript; no build step)
"""
