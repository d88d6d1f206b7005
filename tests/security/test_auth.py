"""Authentication on every endpoint, and tenant isolation on every route that takes a job id:
another tenant's job answers 404 exactly as a job that does not exist, and changes nothing."""

import uuid

import pytest

from tests.security.conftest import TENANTS, error_of

JOB_ROUTES = [("GET", ""), ("GET", "/log"), ("POST", "/cancel"), ("DELETE", ""),
              ("GET", "/report"), ("GET", "/report.html"), ("GET", "/artifacts"),
              ("GET", "/artifacts/model.onnx")]
TENANT_ROUTES = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/recipes"),
                 ("GET", "/v1/recipes/onnx_int8_ort"), ("POST", "/v1/recipes/validate"),
                 ("GET", "/v1/passes"), ("GET", "/v1/recipe-schema")]
BAD_AUTH = {
    "missing": ({}, "missing bearer token"),
    "empty bearer": ({"Authorization": "Bearer"}, ("missing bearer token", "invalid")),
    "unknown token": ({"Authorization": "Bearer not-a-token"}, "invalid API token"),
}


@pytest.mark.parametrize("auth", list(BAD_AUTH))
@pytest.mark.parametrize("route", TENANT_ROUTES + [("JOB",) + r for r in JOB_ROUTES],
                         ids=lambda r: " ".join(r))
def test_every_endpoint_needs_a_valid_token(api, route, auth):
    """401 with the envelope and WWW-Authenticate, before anything else is looked at: an
    existing job's id answers the same as none (the job's existence is not revealed)."""
    headers, needle = BAD_AUTH[auth]
    if route[0] == "JOB":
        method, path = route[1], f"/v1/jobs/{api.sentinels['a']}{route[2]}"
    else:
        method, path = route
    r = api.client.request(method, path, headers=headers)
    error_of(r, 401, needle)
    assert r.headers["www-authenticate"] == "Bearer"
    api.assert_no_leak(r.text)
    api.assert_intact()


MALFORMED = {
    "basic scheme": "Basic dG9rZW4tYTo=",
    "token scheme": "Token token-a",
    "no scheme": "token-a",
    "trailing garbage": "Bearer token-a extra",
    "prefix of a token": "Bearer token-",
    "token plus suffix": "Bearer token-aa",
    "tenant name as token": "Bearer tenant-a",
    "10 KB token": "Bearer " + "x" * 10_000,
    "non-ASCII token": "Bearer t\u00f6ken-a".encode(),  # UTF-8 bytes on the wire
}


@pytest.mark.parametrize("value", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_authorization_headers_answer_401(api, value):
    r = api.client.get("/v1/jobs", headers={"Authorization": value})
    error_of(r, 401, ("missing bearer token", "invalid API token"))
    api.assert_no_leak(r.text)


@pytest.mark.parametrize("where", ["query", "cookie"])
def test_token_is_read_from_the_header_only(api, where):
    """A token in the URL (logged by proxies) or a cookie (sent cross-site) is not accepted."""
    kw = {"params": {"token": "token-a", "access_token": "token-a"}} if where == "query" else \
        {"cookies": {"token": "token-a", "Authorization": "Bearer token-a"}}
    r = api.client.get("/v1/jobs", **kw)
    error_of(r, 401, "missing bearer token")


@pytest.mark.parametrize("method,suffix", JOB_ROUTES, ids=[" ".join(r) for r in JOB_ROUTES])
def test_other_tenants_job_is_404_like_a_missing_one(api, method, suffix):
    """Tenant B asking for tenant A's job gets the very answer a random id gets, and A's job
    is unchanged (cancel and delete did nothing)."""
    mine, missing = api.sentinels["a"], uuid.uuid4().hex
    before = api.snapshot()
    theirs = api.client.request(method, f"/v1/jobs/{mine}{suffix}", headers=TENANTS["b"][1])
    nothing = api.client.request(method, f"/v1/jobs/{missing}{suffix}", headers=TENANTS["b"][1])
    err = error_of(theirs, 404)
    assert theirs.text.replace(mine, missing) == nothing.text
    assert err["type"] == nothing.json()["error"]["type"]
    assert theirs.headers.get("content-length") == nothing.headers.get("content-length")
    api.assert_no_leak(theirs.text.replace(mine, missing), who="b")  # echoes B's own input
    api.assert_intact(before)
    # the owner still reaches it (not 404): the route exists and the job is A's
    own = api.client.request("GET", f"/v1/jobs/{mine}", headers=TENANTS["a"][1])
    assert own.status_code == 200 and own.json()["id"] == mine


@pytest.mark.parametrize("state", [None, "queued", "running", "cancelled"])
def test_listing_shows_only_the_tenants_own_jobs(api, state):
    params = {"limit": 500} if state is None else {"limit": 500, "state": state}
    for who, other in (("a", "b"), ("b", "a")):
        r = api.client.get("/v1/jobs", headers=TENANTS[who][1], params=params)
        assert r.status_code == 200, r.text
        ids = {j["id"] for j in r.json()["jobs"]}
        assert api.sentinels[other] not in ids
        assert (api.sentinels[who] in ids) == (state in (None, "queued"))
        assert r.json()["total"] == len(ids)
        api.assert_no_leak(r.text, who)


def test_tenants_files_live_in_separate_folders(api):
    """Tenant names never become paths: each tenant's jobs sit under its own digest folder."""
    folders = {who: api.settings.job_dir(TENANTS[who][0], job_id)
               for who, job_id in api.sentinels.items()}
    assert all(f.is_dir() for f in folders.values())
    assert folders["a"].parents[1] != folders["b"].parents[1]
    assert "tenant-a" not in str(folders["a"]) and "tenant-b" not in str(folders["b"])
