"""Every endpoint's success and failure paths, authentication and tenant isolation, on SQLite
and PostgreSQL. Jobs are real compress() runs on a tiny ONNX classifier."""

import hashlib
import io
import zipfile

import pytest
import yaml

from tests.service.conftest import (
    AUTH_A,
    AUTH_B,
    job_files,
    make_settings,
    onnx_recipe,
    running_service,
    wait_for,
)


def submit(client, files, recipe=None, headers=AUTH_A, model="model", **data):
    if recipe is not None:
        data["recipe"] = recipe
    return client.post("/v1/jobs", headers=headers, files=job_files(files, model), data=data)


def test_job_runs_to_report_and_artifacts(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url)) as c:
        r = submit(c, onnx_job_files, onnx_recipe([{"type": "ort_quantize"}]))
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" == job["url"]
        assert job["state"] in ("queued", "running")

        done = wait_for(c, job["id"])
        assert done["state"] == "succeeded", done
        assert (done["exit_code"], done["gate_passed"], done["percent"]) == (0, True, 100.0)
        assert done["finished_at"] >= done["started_at"] >= done["created_at"]

        report = c.get(f"/v1/jobs/{job['id']}/report", headers=AUTH_A).json()
        assert report["model"]["source"] == "onnx"
        assert report["passes"][0]["type"] == "ort_quantize"
        # static INT8 of a 1-hidden-layer MLP keeps most argmax decisions
        assert report["metrics"]["compressed"]["top1_agreement"] >= 0.8
        html = c.get(f"/v1/jobs/{job['id']}/report.html", headers=AUTH_A)
        assert html.headers["content-type"].startswith("text/html") and "<html" in html.text

        arts = c.get(f"/v1/jobs/{job['id']}/artifacts", headers=AUTH_A).json()["artifacts"]
        names = {a["name"] for a in arts}
        assert {"model.onnx", "model.fp32.onnx", "report.json", "report.html",
                "recipe.yaml"} <= names
        for a in arts:  # every artifact downloads with the checksum that the listing promised
            got = c.get(a["url"], headers=AUTH_A)
            assert got.status_code == 200
            assert hashlib.sha256(got.content).hexdigest() == a["sha256"]
            assert got.headers["x-checksum-sha256"] == a["sha256"]
        assert c.get(f"/v1/jobs/{job['id']}/artifacts/nope.onnx",
                     headers=AUTH_A).status_code == 404
        assert c.get(f"/v1/jobs/{job['id']}/artifacts/../../jobs.db",
                     headers=AUTH_A).status_code == 404

        log = c.get(f"/v1/jobs/{job['id']}/log", headers=AUTH_A)
        assert "finished: succeeded" in log.text and "passes" in log.text
        tail = c.get(f"/v1/jobs/{job['id']}/log", headers=AUTH_A,
                     params={"offset": int(log.headers["x-next-offset"]) - 10})
        assert len(tail.content) == 10
        follow = c.get(f"/v1/jobs/{job['id']}/log", headers=AUTH_A, params={"follow": True})
        assert follow.text == log.text  # a finished job's stream ends after the whole log


def test_list_filter_and_pagination(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=0)) as c:
        ids = [submit(c, onnx_job_files, onnx_recipe()).json()["id"] for _ in range(3)]
        c.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH_A)
        page = c.get("/v1/jobs", headers=AUTH_A, params={"limit": 2}).json()
        assert page["total"] == 3 and len(page["jobs"]) == 2 and page["next_offset"] == 2
        assert [j["id"] for j in page["jobs"]] == ids[:0:-1]  # newest first
        rest = c.get("/v1/jobs", headers=AUTH_A, params={"limit": 2, "offset": 2}).json()
        assert [j["id"] for j in rest["jobs"]] == ids[:1] and rest["next_offset"] is None
        queued = c.get("/v1/jobs", headers=AUTH_A, params={"state": "queued"}).json()
        assert {j["id"] for j in queued["jobs"]} == set(ids[1:])
        cancelled = c.get("/v1/jobs", headers=AUTH_A, params={"state": "cancelled"}).json()
        assert [j["id"] for j in cancelled["jobs"]] == ids[:1]
        assert c.get("/v1/jobs", headers=AUTH_A, params={"state": "done"}).status_code == 422
        assert c.get("/v1/jobs", headers=AUTH_A, params={"limit": 0}).status_code == 422


def test_authentication_and_tenant_isolation(tmp_path, db_url, onnx_job_files):
    settings = make_settings(tmp_path, db_url)
    with running_service(settings) as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in r.json()["error"]["message"]
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/passes").status_code == 401
        assert submit(c, onnx_job_files, onnx_recipe(), headers={}).status_code == 401

        job_a = submit(c, onnx_job_files, onnx_recipe()).json()["id"]
        job_b = submit(c, onnx_job_files, onnx_recipe(), headers=AUTH_B).json()["id"]
        done_a = wait_for(c, job_a)
        assert done_a["state"] == "succeeded", (done_a["error"], done_a["message"])
        wait_for(c, job_b, headers=AUTH_B)
        assert [j["id"] for j in c.get("/v1/jobs", headers=AUTH_B).json()["jobs"]] == [job_b]
        for method, path in [("GET", ""), ("GET", "/log"), ("GET", "/report"),
                             ("GET", "/report.html"), ("GET", "/artifacts"),
                             ("GET", "/artifacts/model.onnx"), ("POST", "/cancel"),
                             ("DELETE", "")]:
            r = c.request(method, f"/v1/jobs/{job_a}{path}", headers=AUTH_B)
            assert r.status_code == 404, (method, path, r.text)
        assert c.get(f"/v1/jobs/{job_a}", headers=AUTH_A).json()["state"] == "succeeded"
        # on disk, tenants live in different folders
        assert settings.job_dir("tenant-a", job_a).is_dir()
        assert not settings.job_dir("tenant-b", job_a).exists()


def test_recipe_errors_answer_422_with_field_path(tmp_path, db_url, onnx_job_files):
    with running_service(make_settings(tmp_path, db_url, workers=0)) as c:
        def errors(r):
            assert r.status_code == 422, r.text
            return {e["loc"]: e["msg"] for e in r.json()["error"]["errors"]}

        bad_field = onnx_recipe([{"type": "ort_quantize", "bitz": 8}])
        assert "unknown field" in errors(submit(c, onnx_job_files, bad_field))["passes.0.bitz"]
        bad_set = submit(c, onnx_job_files, onnx_recipe(), set="evaluation.num_samples=0")
        assert "evaluation.num_samples" in errors(bad_set)
        r = submit(c, onnx_job_files, "version: 1\nmodel: {source: onnx\n")
        assert r.status_code == 422 and "not valid YAML at line" in r.json()["error"]["message"]

        # a recipe may not make the server read its own files
        server_path = yaml.safe_load(onnx_recipe())
        server_path["evaluation"]["path"] = "/etc/passwd"
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": yaml.safe_dump(server_path)},
                   files={"model": ("m.onnx", open(onnx_job_files["model"], "rb"))})
        assert "does not read server paths" in errors(r)["evaluation.path"]
        server_path["evaluation"]["path"] = "reference:digits-vit/../../../etc/passwd"
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": yaml.safe_dump(server_path)},
                   files={"model": ("m.onnx", open(onnx_job_files["model"], "rb"))})
        assert "no '..'" in errors(r)["evaluation.path"]
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": onnx_recipe()})
        assert "server paths" in errors(r)["model.path"]

        assert "field required" in errors(c.post("/v1/jobs", headers=AUTH_A,
                                                  files={"calib": ("c.npz", b"x")}))["recipe"]
        assert "unknown" in errors(c.post("/v1/jobs", headers=AUTH_A,
                                          data={"recipe_name": "nope"}))["recipe_name"]
        # nothing of the refused jobs stays behind
        assert c.get("/v1/jobs", headers=AUTH_A).json()["total"] == 0
        assert not list((tmp_path / "data").glob("tenants/*/jobs/*"))

        ok = c.post("/v1/recipes/validate", headers=AUTH_A,
                    json={"yaml": onnx_recipe([{"type": "ort_quantize"}]),
                          "uploads": ["model", "calib"]})
        assert ok.status_code == 200 and ok.json()["passes"] == ["ort_quantize"]
        bad = c.post("/v1/recipes/validate", headers=AUTH_A,
                     json={"yaml": bad_field, "uploads": ["model", "calib"]})
        assert "passes.0.bitz" in errors(bad)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_upload_checks(tmp_path, db_url, onnx_job_files):
    settings = make_settings(tmp_path, db_url, workers=0, max_upload_mb=1)
    recipe = {"recipe": onnx_recipe()}
    timm_recipe = yaml.safe_load(onnx_recipe())
    timm_recipe["model"] = {"source": "timm", "name": "test_vit"}
    with running_service(settings) as c:
        def refused(files, data=recipe, status=422):
            r = c.post("/v1/jobs", headers=AUTH_A, files=files, data=data)
            assert r.status_code == status, r.text
            return r.json()["error"]

        err = refused({"model": ("pytorch_model.bin", b"\x80\x04pickle")},
                      {"recipe": yaml.safe_dump(timm_recipe)})
        assert err["errors"][0]["loc"] == "model" and "Pickle formats" in err["message"]
        err = refused({"model": ("m.safetensors", b"\xff" * 64)},
                      {"recipe": yaml.safe_dump(timm_recipe)})
        assert "not a safetensors file" in err["message"]
        err = refused({"model": ("m.pt", b"\x80\x02raw pickle")},
                      {"recipe": yaml.safe_dump(timm_recipe)})
        assert "zip format" in err["message"]
        err = refused({"model": ("m.onnx", b"x")}, {"recipe": yaml.safe_dump(timm_recipe)})
        assert "needs a .safetensors or .pt/.pth" in err["message"]
        err = refused({"model": ("m.onnx", b"x"), "calib": ("c.csv", b"1,2")})
        assert err["errors"][0]["loc"] == "calib"
        err = refused({"model": ("m.onnx", b"x"),
                       "calib": ("c.zip", _zip({"../escape.npz": b"x"}))})
        assert "outside the archive" in err["message"] and err["errors"][0]["loc"] == "calib"
        err = refused({"model": ("m.onnx", b"x"), "weights": ("w.onnx", b"x")})
        assert "unknown file field 'weights'" in err["message"]
        err = refused({"model": ("m.onnx", b"x" * (2 << 20))}, status=413)
        assert "over the limit" in err["message"]
        r = c.post("/v1/jobs", headers={**AUTH_A, "content-type": "application/json"},
                   content=b"{}")
        assert r.status_code == 415
        r = c.post("/v1/jobs", headers={**AUTH_A,
                                        "content-type": "multipart/form-data; boundary=xyz"},
                   content=b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1")
        assert r.status_code == 400
        assert not list((tmp_path / "data").glob("tenants/*/jobs/*"))


def test_failed_and_gate_failed_jobs(tmp_path, db_url, onnx_job_files):
    import numpy as np

    bad = tmp_path / "wrong_shape.npz"
    np.savez(bad, x=np.zeros((4, 3, 4, 4), np.float32))
    with running_service(make_settings(tmp_path, db_url)) as c:
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": onnx_recipe()},
                   files={"model": ("m.onnx", open(onnx_job_files["model"], "rb")),
                          "calib": ("c.npz", open(bad, "rb"))})
        gate = submit(c, onnx_job_files, onnx_recipe([{"type": "ort_quantize"}],
                                                     gate={"max_kl": 0.0}))
        failed = wait_for(c, r.json()["id"])
        assert failed["state"] == "failed" and failed["exit_code"] == 2
        assert failed["error"]["type"] == "DataError" and "3, 4, 4" in failed["error"]["message"]
        rep = c.get(f"/v1/jobs/{failed['id']}/report", headers=AUTH_A)
        assert rep.status_code == 409 and "see its log" in rep.json()["error"]["message"]
        assert "DataError" in c.get(f"/v1/jobs/{failed['id']}/log", headers=AUTH_A).text

        gated = wait_for(c, gate.json()["id"])
        assert (gated["state"], gated["exit_code"], gated["gate_passed"]) == (
            "gate_failed", 3, False)
        assert "quality gate failed" in gated["message"]
        report = c.get(f"/v1/jobs/{gated['id']}/report", headers=AUTH_A).json()
        assert report["gate"]["passed"] is False
        assert c.post(f"/v1/jobs/{gated['id']}/cancel", headers=AUTH_A).status_code == 409


def test_catalog_health_and_docs(tmp_path, db_url, monkeypatch):
    with running_service(make_settings(tmp_path, db_url, workers=1)) as c:
        recipes = c.get("/v1/recipes", headers=AUTH_A).json()
        by_name = {r["name"]: r for r in recipes}
        assert {"digits_vit_w8a8", "minilm_w8a8", "onnx_int8_ort"} <= set(by_name)
        assert by_name["digits_vit_w8a8"]["passes"] == ["quantize"]
        assert "version: 1" in by_name["digits_vit_w8a8"]["yaml"]
        assert c.get("/v1/recipes/onnx_int8_ort", headers=AUTH_A).json()["model_source"] == "onnx"
        assert c.get("/v1/recipes/nope", headers=AUTH_A).status_code == 404
        passes = {p["type"]: p for p in c.get("/v1/passes", headers=AUTH_A).json()}
        assert "bits" in passes["quantize"]["schema"]["$defs"]["WeightQuant"]["properties"]
        schema = c.get("/v1/recipe-schema", headers=AUTH_A).json()
        assert "passes" in schema["properties"]

        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["checks"] == {"database": "ok", "data_dir": "ok", "workers": "ok"}
        store = c.app.state.store
        monkeypatch.setattr(store, "ping", lambda: (_ for _ in ()).throw(OSError("down")))
        down = c.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["database"] == "error: OSError"

        spec = c.get("/openapi.json").json()
        body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
        assert {"recipe", "model", "calib", "eval"} <= set(
            body["multipart/form-data"]["schema"]["properties"])
        assert "HTTPBearer" in spec["components"]["securitySchemes"]
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "<script" in page.text


@pytest.mark.parametrize("archive", ["zip", "tar.gz"])
def test_image_folder_archive_upload(tmp_path, archive, onnx_job_files):
    """An image-folder archive is extracted and read as an image folder by the worker."""
    import tarfile

    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    for cls in range(2):
        (folder / str(cls)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i + cls, np.uint8)).save(
                folder / str(cls) / f"{i}.png")
    path = tmp_path / f"images.{archive}"
    if archive == "zip":
        path.write_bytes(_zip({f"images/{p.relative_to(folder)}": p.read_bytes()
                               for p in folder.rglob("*.png")}))
    else:
        with tarfile.open(path, "w:gz") as tf:
            tf.add(folder, arcname="images")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=1)
    with running_service(settings) as c:
        r = c.post("/v1/jobs", headers=AUTH_A, data={"recipe": onnx_recipe()},
                   files={"model": ("m.onnx", open(onnx_job_files["model"], "rb")),
                          "eval": (path.name, open(path, "rb"))})
        assert r.status_code == 202, r.text
        job = wait_for(c, r.json()["id"])
        assert job["state"] == "succeeded", job
        report = c.get(f"/v1/jobs/{job['id']}/report", headers=AUTH_A).json()
        assert report["data"]["evaluation"]["format"] == "imagefolder"
        assert report["data"]["evaluation"]["samples"] == 8
