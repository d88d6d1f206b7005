"""The API contract under hostile input: every status the campaign provokes is documented in
the OpenAPI document with the error envelope, and a body that is not JSON at all answers the
envelope too (schemathesis finds this one only by chance, so it is pinned here)."""

import pytest

from tests.security.conftest import error_of

PROVOKED = [  # (method, path template, status) seen in tests/security
    ("post", "/v1/jobs", 400), ("post", "/v1/jobs", 401), ("post", "/v1/jobs", 413),
    ("post", "/v1/jobs", 415), ("post", "/v1/jobs", 422),
    ("get", "/v1/jobs", 401), ("get", "/v1/jobs", 422),
    ("get", "/v1/jobs/{job_id}", 404), ("get", "/v1/jobs/{job_id}/log", 404),
    ("get", "/v1/jobs/{job_id}/log", 422), ("post", "/v1/jobs/{job_id}/cancel", 404),
    ("post", "/v1/jobs/{job_id}/cancel", 409), ("delete", "/v1/jobs/{job_id}", 404),
    ("delete", "/v1/jobs/{job_id}", 409), ("get", "/v1/jobs/{job_id}/report", 409),
    ("get", "/v1/jobs/{job_id}/artifacts/{name}", 404),
    ("get", "/v1/recipes/{name}", 404), ("post", "/v1/recipes/validate", 400),
    ("post", "/v1/recipes/validate", 422),
]


@pytest.fixture(scope="module")
def spec(api) -> dict:
    r = api.client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize("method,path,status", PROVOKED,
                         ids=[f"{m.upper()} {p} {s}" for m, p, s in PROVOKED])
def test_provoked_statuses_are_documented_with_the_envelope(spec, method, path, status):
    paths = {k.replace("{name:path}", "{name}"): v for k, v in spec["paths"].items()}
    responses = paths[path][method]["responses"]
    assert str(status) in responses, (path, method, sorted(responses))
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    ref = schema.get("$ref", "")
    assert ref.endswith("/ErrorResponse"), schema


@pytest.mark.parametrize("body", [b"\xff\xfe not json", b"{", b"", b"[]", b"null"],
                         ids=["bytes", "truncated", "empty", "list", "null"])
def test_validate_with_a_body_that_is_not_an_object(api, body):
    r = api.client.post("/v1/recipes/validate",
                        headers={**api.headers(), "content-type": "application/json"},
                        content=body)
    error_of(r, r.status_code)
    assert r.status_code in (400, 422), r.text
    api.assert_no_leak(r.text)
