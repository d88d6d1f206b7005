"""The security campaign's fixtures: one service per database per module, two tenants with a
sentinel job each, and the checks every hostile case ends with.

Every case asserts three things besides its status: the body is the error envelope
``{"error": {"type", "message", "errors"?}}`` with a message that says what was wrong; nothing
was lost (both tenants' sentinel jobs are intact, a refused request left no job and no folder);
nothing leaked (no other tenant's name, token or job id, no server path, no traceback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from tests.service.conftest import (  # noqa: E402,F401  (onnx_job_files is a fixture)
    AUTH_A,
    AUTH_B,
    database,
    make_settings,
    onnx_job_files,
    onnx_recipe,
)

TENANTS = {"a": ("tenant-a", AUTH_A, "token-a"), "b": ("tenant-b", AUTH_B, "token-b")}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_kind(request) -> str:
    return request.param


# ----------------------------------------------------------------------------- checks

def error_of(r, status: int, *needles, loc: str | None = None) -> dict:
    """The error body of ``r`` after checking its status and envelope.

    Each needle is a string, or a tuple of alternatives, that must appear (case-insensitive) in
    the message or in one of the errors' messages; ``loc``: some error's loc starts with it.
    """
    assert r.status_code == status, (r.status_code, r.text[:800])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) <= {"type", "message", "errors"}, err
    assert isinstance(err["type"], str) and err["type"], err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    for e in err.get("errors") or []:
        assert set(e) >= {"loc", "msg"} and isinstance(e["msg"], str), e
    text = " ".join([err["message"], *(str(e["msg"]) for e in err.get("errors") or [])]).lower()
    for needle in needles:
        options = needle if isinstance(needle, tuple) else (needle,)
        assert any(o.lower() in text for o in options), (options, err)
    if loc is not None:
        locs = [str(e["loc"]) for e in err.get("errors") or []]
        assert any(x.startswith(loc) for x in locs), (loc, err)
    return err


@dataclass
class Service:
    """A running app on one database, two tenants, and what must never change or leak."""

    client: object
    settings: object
    db: str
    root: Path
    sentinels: dict[str, str] = field(default_factory=dict)  # tenant key -> job id

    def headers(self, who: str = "a") -> dict:
        return TENANTS[who][1]

    def job_ids(self, who: str) -> set[str]:
        r = self.client.get("/v1/jobs", headers=self.headers(who), params={"limit": 500})
        assert r.status_code == 200, r.text
        return {j["id"] for j in r.json()["jobs"]}

    def folders(self) -> set[str]:
        return {p.name for p in (self.settings.data_dir / "tenants").glob("*/jobs/*")}

    def snapshot(self) -> dict:
        return {"a": self.job_ids("a"), "b": self.job_ids("b"), "folders": self.folders()}

    def assert_no_leak(self, text: str, who: str = "a") -> None:
        """Nothing of the other tenant and nothing of the server's file system in ``text``."""
        other = "b" if who == "a" else "a"
        tenant, _, token = TENANTS[other]
        forbidden = [tenant, token, self.sentinels.get(other, "\0"), "Traceback",
                     str(self.root), str(self.root.resolve()),
                     str(self.settings.data_dir.resolve()), "/tenants/"]
        for f in forbidden:
            assert f not in text, f"response leaks {f!r}: {text[:800]}"

    def assert_intact(self, before: dict | None = None) -> None:
        """Both sentinels are still there, queued, with their names; and with ``before``: the
        request added or removed no job and no job folder."""
        for who, job_id in self.sentinels.items():
            r = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers(who))
            assert r.status_code == 200, (who, r.text)
            assert (r.json()["state"], r.json()["name"]) == ("queued", f"sentinel-{who}"), r.json()
        if before is not None:
            assert self.snapshot() == before, "a refused request added or lost a job or folder"

    def refused(self, method: str, path: str, status: int, *needles, who: str = "a",
                loc: str | None = None, headers: dict | None = None, **kw) -> dict:
        """Send a hostile request; check status, envelope, message, no leak, nothing changed."""
        before = self.snapshot()
        r = self.client.request(method, path, headers=self.headers(who) if headers is None
                                else headers, **kw)
        err = error_of(r, status, *needles, loc=loc)
        self.assert_no_leak(r.text, who)
        self.assert_intact(before)
        return err


def submit_sentinels(client, files: dict[str, Path]) -> dict[str, str]:
    """One queued job per tenant (the service runs none: workers=0)."""
    ids = {}
    for who, (_, headers, _) in TENANTS.items():
        r = client.post("/v1/jobs", headers=headers, data={"recipe": onnx_recipe(
            name=f"sentinel-{who}")}, files={"model": ("model.onnx", files["model"].read_bytes())})
        assert r.status_code == 202, r.text
        ids[who] = r.json()["id"]
    return ids


# Small limits so that bombs and floods trip them with a few KB of test data.
CAMPAIGN_LIMITS = {"workers": 0, "max_upload_mb": 2, "max_archive_mb": 8,
                   "max_archive_files": 50, "max_archive_ratio": 20}


@pytest.fixture(scope="module")
def api(db_kind, tmp_path_factory, onnx_job_files):  # noqa: F811 - the imported fixture
    """The app in-process (TestClient) with no workers: submitted jobs only queue."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    root = tmp_path_factory.mktemp(f"sec_{db_kind}")
    with database(db_kind, root) as url:
        settings = make_settings(root, url, **CAMPAIGN_LIMITS)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            service = Service(client, settings, db_kind, root)
            service.sentinels = submit_sentinels(client, onnx_job_files)
            yield service
