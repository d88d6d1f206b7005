"""One error envelope for every error, and no 500 on hostile input (issue 14: items 5, 9, 10),
on SQLite and PostgreSQL."""

import yaml

from tests.service.conftest import AUTH_A, job_files, make_settings, onnx_recipe, running_service


def envelope(r, status: int) -> dict:
    """The error body of ``r``, after checking its status and the envelope's shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["message"], str) and err["message"]
    for item in err.get("errors") or []:
        assert set(item) == {"loc", "msg"} and isinstance(item["loc"], str)
    return err


def test_validation_errors_and_unknown_routes_answer_the_envelope(tmp_path, db_url):
    with running_service(make_settings(tmp_path, db_url, workers=0)) as c:
        err = envelope(c.get("/v1/jobs", headers=AUTH_A, params={"limit": 0}), 422)
        assert err["type"] == "ValidationError"
        assert [e["loc"] for e in err["errors"]] == ["limit"]
        assert "greater than or equal to 1" in err["errors"][0]["msg"]
        err = envelope(c.get("/v1/jobs", headers=AUTH_A, params={"state": "done"}), 422)
        assert [e["loc"] for e in err["errors"]] == ["state"]
        err = envelope(c.post("/v1/recipes/validate", headers=AUTH_A, json={}), 422)
        assert [e["loc"] for e in err["errors"]] == ["yaml"]
        err = envelope(c.post("/v1/recipes/validate", content=b"{not json",
                              headers={**AUTH_A, "content-type": "application/json"}), 422)
        assert err["type"] == "ValidationError"
        assert envelope(c.get("/v1/nope", headers=AUTH_A), 404)["type"] == "NotFound"
        err = envelope(c.delete("/v1/passes", headers=AUTH_A), 405)
        assert err["type"] == "MethodNotAllowed"
        err = envelope(c.post("/v1/jobs", headers={**AUTH_A, "content-type": "application/json"},
                              content=b"{}"), 415)
        assert "multipart/form-data" in err["message"]
        envelope(c.get("/v1/jobs"), 401)
        # an empty ?state= means no filter, as the schema says
        r = c.get("/v1/jobs", headers=AUTH_A, params={"state": ""})
        assert r.status_code == 200 and r.json()["total"] == 0


def test_openapi_documents_the_envelope_for_every_error(tmp_path, db_url):
    with running_service(make_settings(tmp_path, db_url, workers=0)) as c:
        spec = c.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorResponse"
    post_jobs = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "401", "413", "415", "422", "500"} <= set(post_jobs)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "500" in op["responses"], (method, path)
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and status != "503":
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": ref}, (method, path, status, schema)
    state = next(p for p in spec["paths"]["/v1/jobs"]["get"]["parameters"]
                 if p["name"] == "state")
    assert "" in state["schema"]["enum"] and "queued" in state["schema"]["enum"]


def test_hostile_input_never_answers_500(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=0)) as c:
        def submit(recipe, **data):
            return c.post("/v1/jobs", headers=AUTH_A, files=job_files(onnx_job_files),
                          data={"recipe": recipe, **data})

        deep = "[" * 5000 + "]" * 5000
        err = envelope(submit(deep), 422)
        assert "nested too deeply" in err["message"]
        err = envelope(c.post("/v1/recipes/validate", headers=AUTH_A, json={"yaml": deep}), 422)
        assert "nested too deeply" in err["message"]
        err = envelope(submit(onnx_recipe(), set="name=!!python/object/apply:os.system [id]"),
                       422)
        assert err["errors"][0]["loc"] == "name" and "python/object" in err["message"]
        err = envelope(submit(onnx_recipe(), set="evaluation.num_samples=[1, 2"), 422)
        assert err["errors"][0]["loc"] == "evaluation.num_samples"
        err = envelope(c.post("/v1/recipes/validate", headers=AUTH_A, json={
            "yaml": onnx_recipe(), "uploads": ["model"], "set": ["name=" + "[" * 3000]}), 422)
        assert "nested too deeply" in err["message"]

        # offsets past any real size: 422 for the job list, empty for a log (never an overflow)
        err = envelope(c.get("/v1/jobs", headers=AUTH_A, params={"offset": 2**63}), 422)
        assert [e["loc"] for e in err["errors"]] == ["offset"]
        job = submit(onnx_recipe()).json()
        log = f"/v1/jobs/{job['id']}/log"
        assert envelope(c.get(log, headers=AUTH_A, params={"offset": 2**63}), 422)
        r = c.get(log, headers=AUTH_A, params={"offset": 2**40})
        assert r.status_code == 200 and r.content == b""
        assert r.headers["x-next-offset"] == str(2**40)
        page = c.get("/v1/jobs", headers=AUTH_A, params={"offset": 10**9}).json()
        assert page["jobs"] == [] and page["total"] == 1

        # NUL bytes: in a job id (404 as any unknown id) and in a recipe name (stored without)
        for method in ("GET", "DELETE"):
            err = envelope(c.request(method, "/v1/jobs/ab%00cd", headers=AUTH_A), 404)
            assert err["type"] == "NotFound"
        envelope(c.post("/v1/jobs/ab%00cd/cancel", headers=AUTH_A), 404)
        envelope(c.get(f"/v1/jobs/{job['id']}%00/log", headers=AUTH_A), 404)
        named = yaml.safe_load(onnx_recipe())
        named["name"] = "evil\x00name"
        r = submit(yaml.safe_dump(named))
        if r.status_code == 202:
            assert r.json()["name"] == "evilname"
            listed = c.get("/v1/jobs", headers=AUTH_A).json()["jobs"]
            assert "evilname" in {j["name"] for j in listed}
        else:  # the recipe schema may refuse control characters in names instead
            assert envelope(r, 422)["errors"][0]["loc"] == "name"
        err = envelope(c.get("/v1/recipes/a%00b", headers=AUTH_A), 404)
        assert err["type"] == "NotFound"


def test_size_limits_are_stated_in_mib(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=0,
                             max_upload_mb=20)
    with running_service(settings) as c:
        big = {"model": ("m.onnx", b"x" * (22 << 20))}
        err = envelope(c.post("/v1/jobs", headers=AUTH_A, files=big,
                              data={"recipe": onnx_recipe()}), 413)
        assert "over the limit of 20 MiB" in err["message"], err
        assert " MB" not in err["message"]


def test_an_input_with_thousands_of_problems_gets_a_short_answer(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=0)
    doc = yaml.safe_load(onnx_recipe())
    doc.update({f"k{i}": 1 for i in range(2000)})
    with running_service(settings) as c:
        r = c.post("/v1/recipes/validate", headers=AUTH_A, json={"yaml": yaml.safe_dump(doc),
                                                                "uploads": ["model"]})
    err = envelope(r, 422)
    assert len(r.content) < 20_000
    assert [e["loc"] for e in err["errors"][:2]] == ["k0", "k1"]
    assert len(err["errors"]) == 51 and err["errors"][-1]["msg"].startswith("... and 1950 more")
    assert len(err["message"].splitlines()) == 21 and "more lines" in err["message"]
