"""HTTP client of the service (used by the CLI; usable from Python).

    client = Client("http://127.0.0.1:8000", token="...")
    job = client.submit("recipes/digits_vit_w8a8.yaml")
    job = client.wait(job["id"])
    client.download(job["id"], "out/job")
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import yaml

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "gate_failed", "failed", "cancelled")
# recipe field -> upload field, for local paths that the client sends along with the recipe
RECIPE_PATHS = {"calibration.path": "calib", "evaluation.path": "eval"}
JOB_ID = re.compile(r"[0-9a-f]{32}")
MIN_ID_PREFIX = 4
CHECKSUMS = "SHA256SUMS"  # written beside downloaded artifacts


class ServiceError(Exception):
    """The service answered with an error, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        self.status = status
        self.body = body or {}
        super().__init__(message)

    @property
    def errors(self) -> list[dict]:
        return self.body.get("error", {}).get("errors") or []


class LocalInputError(ServiceError):
    """A file that the request names is missing on this side: bad input (exit 2), no request."""

    def __init__(self, message: str):
        super().__init__(0, message)


class _ProgressReader:
    """A file wrapper that reports bytes read (for an upload progress bar)."""

    def __init__(self, f, callback: Callable[[int], None] | None):
        self.f, self.callback = f, callback

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.callback and data:
            self.callback(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip a data or model folder for upload (links are followed, as the service wants files)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, Path(folder.name) / f.relative_to(folder))
    return dest


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 60.0, http: httpx.Client | None = None):
        self.url = (url or os.environ.get("COMPRESS_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("COMPRESS_TOKEN", "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self.http.headers.update(headers)

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServiceError(0, f"cannot reach the service at {self.url} ({e}); is "
                                  "`compress serve` running? (set --url or COMPRESS_URL)") from None
        self._check(resp)
        return resp

    @staticmethod
    def _check(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            body = resp.json()
        except ValueError:
            body = {}
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message", "")
            details = [f"  - {e['loc']}: {e['msg']}" for e in err.get("errors") or []
                       if e.get("msg") not in message]
            message = "\n".join([message, *details])
        else:
            message = resp.text[:500]
        raise ServiceError(resp.status_code, f"HTTP {resp.status_code}: {message}", body)

    # ------------------------------------------------------------------- jobs

    def submit(self, recipe: str | Path, *, model: str | Path | None = None,
               calib: str | Path | None = None, eval: str | Path | None = None,
               overrides: list[str] = (), on_upload: Callable[[int, int], None] | None = None
               ) -> dict:
        """Queue a job. ``recipe`` is a YAML file or the name of a bundled recipe.

        Local paths in a recipe file (model weights, calibration and evaluation data) are
        uploaded with it unless ``model``/``calib``/``eval`` replace them; folders are zipped.
        ``on_upload(sent_bytes, total_bytes)`` follows the upload.
        """
        data: dict[str, object] = {"set": list(overrides)}
        local = {"model": model, "calib": calib, "eval": eval}
        path = Path(recipe)
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            data["recipe"] = text
            for key, value in _recipe_local_paths(text, path.parent).items():
                if local.get(key) is None:
                    local[key] = value
        else:
            data["recipe_name"] = str(recipe)
        with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="compress-upload-") as tmp:
            files = {}
            total = 0
            sent = [0]

            def on_read(n: int) -> None:
                sent[0] += n
                if on_upload:
                    on_upload(sent[0], total)

            for key, value in local.items():
                if value is None:
                    continue
                p = Path(value).expanduser()
                if not p.exists():
                    raise LocalInputError(f"--{key} {str(p)!r} does not exist")
                if p.is_dir():
                    p = zip_folder(p, Path(tmp) / f"{p.name or key}.zip")
                total += p.stat().st_size
                reader = _ProgressReader(stack.enter_context(open(p, "rb")), on_read)
                files[key] = (p.name, reader)
            return self._request("POST", "/v1/jobs", data=data, files=files or None,
                                 timeout=httpx.Timeout(60.0, write=None)).json()

    def resolve_id(self, given: str) -> str:
        """A full job id from a unique prefix of one (as `compress list` shows the first 12
        characters); a full 32-character id is used as it is."""
        given = given.strip().lower()
        if JOB_ID.fullmatch(given):
            return given
        if len(given) < MIN_ID_PREFIX or not re.fullmatch(r"[0-9a-f]+", given):
            raise ServiceError(400, f"job id {given!r}: give the full id or a unique prefix of "
                                    f"at least {MIN_ID_PREFIX} hex characters (see "
                                    "`compress list`)")
        matches, offset = [], 0
        while offset is not None:
            page = self.list(limit=500, offset=offset)
            matches += [j for j in page["jobs"] if j["id"].startswith(given)]
            offset = page["next_offset"]
        if not matches:
            raise ServiceError(404, f"no job id starts with {given!r} (see `compress list`)")
        if len(matches) > 1:
            listed = "\n".join(f"  {j['id']}  {j['state']:<11} {j['name']}" for j in matches[:20])
            more = f"\n  ... and {len(matches) - 20} more" if len(matches) > 20 else ""
            raise ServiceError(400, f"job id prefix {given!r} is ambiguous: {len(matches)} jobs "
                                    f"start with it; give more characters:\n{listed}{more}")
        return matches[0]["id"]

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, *, state: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {"limit": limit, "offset": offset, **({"state": state} if state else {})}
        return self._request("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        resp = self._request("GET", f"/v1/jobs/{job_id}/log", params={"offset": offset})
        return resp.text, int(resp.headers.get("X-Next-Offset", offset + len(resp.content)))

    def follow_log(self, job_id: str, offset: int = 0) -> Iterator[str]:
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/log",
                                  params={"offset": offset, "follow": "true"},
                                  timeout=httpx.Timeout(60.0, read=None)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                yield from resp.iter_text()
        except httpx.TransportError as e:
            raise ServiceError(0, f"lost the connection to {self.url}: {e}") from None

    def wait(self, job_id: str, *, poll_s: float = 0.5, timeout: float | None = None,
             on_update: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job finishes; returns its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["state"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(0, f"job {job_id} still {job['state']} after {timeout:g} s")
            time.sleep(poll_s)

    def artifacts(self, job_id: str) -> list[dict]:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]

    def report(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    def download(self, job_id: str, dest: str | Path, names: list[str] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> list[Path]:
        """Fetch artifacts into ``dest``, verifying each SHA-256, and list them with their
        checksums in ``dest/SHA256SUMS``; returns the files written (SHA256SUMS last)."""
        dest = Path(dest)
        wanted = self.artifacts(job_id)
        if names:
            missing = set(names) - {a["name"] for a in wanted}
            if missing:
                raise ServiceError(404, f"job {job_id} has no artifact(s) "
                                        f"{', '.join(sorted(missing))}")
            wanted = [a for a in wanted if a["name"] in names]
        written = []
        for a in wanted:
            target = dest / a["name"]
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ServiceError(0, f"refusing artifact name {a['name']!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            part = target.with_name(target.name + ".part")
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{a['name']}") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._check(resp)
                with open(part, "wb") as f:
                    for chunk in resp.iter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                        if on_bytes:
                            on_bytes(len(chunk))
            if h.hexdigest() != a["sha256"]:
                part.unlink()
                raise ServiceError(0, f"{a['name']}: checksum mismatch after download")
            os.replace(part, target)
            written.append(target)
        # What was verified, in `sha256sum -c` form (as the service keeps it beside the files):
        # a later step or another machine checks the copy without asking the service again.
        sums = [f"{a['sha256']}  {a['name']}\n" for a in wanted if a["name"] != CHECKSUMS]
        if sums:
            (dest / CHECKSUMS).write_text("".join(sums))
            written.append(dest / CHECKSUMS)
        return written

    def recipes(self) -> list[dict]:
        return self._request("GET", "/v1/recipes").json()

    def ready(self) -> dict:
        return self._request("GET", "/readyz").json()


def _recipe_local_paths(text: str, base: Path) -> dict[str, Path]:
    """Local files a recipe names (not reference: paths), as upload fields."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}  # the service reports the YAML error with its position
    if not isinstance(data, dict):
        return {}
    out = {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    values = {"model": model.get("weights") or model.get("path")}
    for dotted, key in RECIPE_PATHS.items():
        section, _, field_name = dotted.partition(".")
        sec = data.get(section)
        values[key] = sec.get(field_name) if isinstance(sec, dict) else None
    for key, value in values.items():
        if isinstance(value, str) and value and not value.startswith("reference:"):
            p = Path(value).expanduser()
            out[key] = p if p.is_absolute() else base / p
    return out
