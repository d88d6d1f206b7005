"""The queue under pressure, with no workers: many submissions at once from two tenants are all
accounted for, and a queued job cancels and deletes cleanly (then answers as a missing one)."""

import threading

from tests.security.conftest import error_of, onnx_recipe


def test_concurrent_submissions_are_all_accounted_for(api):
    n = 8  # per tenant
    ids: dict[str, list[str]] = {"a": [], "b": []}
    statuses: list[int] = []
    lock = threading.Lock()
    before = api.snapshot()

    def post(who: str, i: int) -> None:
        r = api.client.post("/v1/jobs", headers=api.headers(who),
                            data={"recipe": onnx_recipe(name=f"burst-{who}-{i}")},
                            files={"model": ("m.onnx", b"onnx")})
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 202:
                ids[who].append(r.json()["id"])

    threads = [threading.Thread(target=post, args=(who, i)) for who in "ab" for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [202] * (2 * n)
    assert len(set(ids["a"] + ids["b"])) == 2 * n
    for who in "ab":
        assert api.job_ids(who) == before[who] | set(ids[who])
        names = {api.client.get(f"/v1/jobs/{j}", headers=api.headers(who)).json()["name"]
                 for j in ids[who]}
        assert names == {f"burst-{who}-{i}" for i in range(n)}
    assert api.folders() == before["folders"] | set(ids["a"]) | set(ids["b"])
    for who in "ab":  # leave the module's service as it was
        for job_id in ids[who]:
            assert api.client.post(f"/v1/jobs/{job_id}/cancel",
                                   headers=api.headers(who)).status_code == 200
            assert api.client.delete(f"/v1/jobs/{job_id}",
                                     headers=api.headers(who)).status_code == 204
    api.assert_intact(before)


def test_cancel_while_queued_then_delete(api):
    before = api.snapshot()
    r = api.client.post("/v1/jobs", headers=api.headers(), data={"recipe": onnx_recipe()},
                        files={"model": ("m.onnx", b"onnx")})
    job_id = r.json()["id"]
    error_of(api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()), 409,
             "cancel it first")
    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    error_of(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()), 409,
             "already finished")
    error_of(api.client.get(f"/v1/jobs/{job_id}/report", headers=api.headers()), 409,
             "without results")
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 204
    for path in ("", "/log", "/report"):
        error_of(api.client.get(f"/v1/jobs/{job_id}{path}", headers=api.headers()), 404)
    api.assert_intact(before)
