"""Hostile ids and query values on job and recipe routes: 404 or 422 with the error envelope,
never a 500, never another job, never a file outside the job's folder."""

from urllib.parse import quote

import pytest

HOSTILE_IDS = {
    "NUL byte": "a\x00b",
    "very long": "f" * 5000,
    "unicode": "j\u00f6b-\u6f22\u5b57-\U0001f600",
    "dot-dot slash": "../x",
    "encoded traversal": "..%2F..%2Fjobs.db",
    "SQL quote": "' OR '1'='1",
    "SQL statement": "1; DROP TABLE jobs; --",
    "SQL wildcard": "%",
    "glob": "*",
    "whitespace": " ",
    "CRLF": "a\r\nX-Injected: 1",
}
JOB_SUFFIXES = ["", "/log", "/cancel", "/report", "/artifacts", "/artifacts/report.json"]


def _path(raw: str) -> str:
    # Quoted so that the id reaches the router as one path segment (slashes included).
    return quote(raw, safe="")


@pytest.mark.parametrize("suffix", JOB_SUFFIXES)
@pytest.mark.parametrize("job_id", list(HOSTILE_IDS.values()), ids=list(HOSTILE_IDS))
def test_hostile_job_ids_answer_404(api, job_id, suffix):
    method = "POST" if suffix == "/cancel" else "GET"
    api.refused(method, f"/v1/jobs/{_path(job_id)}{suffix}", 404)


@pytest.mark.parametrize("job_id", ["sentinel-upper", "sentinel-prefix", "sentinel-like"])
def test_near_misses_of_a_real_id_answer_404(api, job_id):
    """Ids are matched exactly: no case folding, no prefix match, no LIKE pattern."""
    real = api.sentinels["a"]
    near = {"sentinel-upper": real.upper(), "sentinel-prefix": real[:-1],
            "sentinel-like": real[:-2] + "%"}[job_id]
    api.refused("GET", f"/v1/jobs/{_path(near)}", 404)


@pytest.mark.parametrize("name", ["../jobs.db", "..%2F..%2Fjobs.db", "/etc/passwd",
                                  "report.json/../../../inputs/model.onnx", "a\x00b",
                                  "x" * 5000])
def test_artifact_names_never_reach_other_files(api, name):
    """The sentinel is queued, so it has no artifacts: 409 'still queued', whatever the name."""
    api.refused("GET", f"/v1/jobs/{api.sentinels['a']}/artifacts/{_path(name)}", 409,
                "still queued")


@pytest.mark.parametrize("name", list(HOSTILE_IDS.values()) + ["onnx_int8_ort/../../etc/passwd",
                                                               "..", "onnx_int8_ort.yaml.bak"],
                         ids=list(HOSTILE_IDS) + ["traversal after a real name", "dot-dot",
                                                  "suffix"])
def test_hostile_recipe_names(api, name):
    api.refused("GET", f"/v1/recipes/{_path(name)}", 404)
    err = api.refused("POST", "/v1/jobs", 422, loc="recipe_name", data={"recipe_name": name})
    assert "onnx_int8_ort" in err["message"]  # the message lists the names that exist


QUERY_CASES = {
    "offset 2**63": ({"offset": 2**63}, "offset"),
    "offset -1": ({"offset": -1}, "offset"),
    "limit 0": ({"limit": 0}, "limit"),
    "limit 10**6": ({"limit": 10**6}, "limit"),
    "limit text": ({"limit": "abc"}, "limit"),
    "unknown state": ({"state": "done"}, "state"),
    "state with NUL": ({"state": "queued\x00"}, "state"),
}


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_bad_list_queries_answer_422(api, case):
    params, field = QUERY_CASES[case]
    api.refused("GET", "/v1/jobs", 422, field, loc=field, params=params)


def test_empty_state_means_no_filter(api):
    """The schema allows ``state=``; it lists every job, as no filter does (defect 9)."""
    r = api.client.get("/v1/jobs", headers=api.headers(), params={"state": ""})
    assert r.status_code == 200, r.text
    assert api.sentinels["a"] in {j["id"] for j in r.json()["jobs"]}


@pytest.mark.parametrize("params", [{"offset": 2**63}, {"offset": -1}, {"offset": "x"},
                                    {"follow": "maybe"}], ids=["huge", "negative", "text", "bool"])
def test_bad_log_queries_answer_422(api, params):
    field = next(iter(params))
    api.refused("GET", f"/v1/jobs/{api.sentinels['a']}/log", 422, field, loc=field,
                params=params)


def test_log_offset_past_the_end_is_empty(api):
    r = api.client.get(f"/v1/jobs/{api.sentinels['a']}/log", headers=api.headers(),
                       params={"offset": 2**40})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["x-next-offset"] == str(2**40)
