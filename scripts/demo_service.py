"""`make demo`: start the service on its embedded defaults, submit the bundled example through
the CLI, and print the dashboard URL and where the report is.

The service (SQLite and files under out/service) keeps running in the background so that the
dashboard can be opened; `make demo-stop` (this script with --stop) ends it. Run again, the
script reuses the running service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "out" / "service"
PID_FILE = DATA / "server.pid"
RECIPE = ROOT / "recipes" / "digits_vit_w8a8.yaml"


def compress_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "compress", *args]


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_service(url: str, port: int) -> None:
    if ready(url):
        print(f"service already running at {url}")
        return
    DATA.mkdir(parents=True, exist_ok=True)
    log = open(DATA / "server.log", "ab")  # noqa: SIM115 - handed to the background process
    proc = subprocess.Popen(
        compress_cmd("serve", "--data-dir", str(DATA), "--port", str(port), "--workers", "1"),
        cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    PID_FILE.write_text(str(proc.pid))
    deadline = time.monotonic() + 120
    while not ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the service did not start; see {DATA / 'server.log'}")
        time.sleep(0.5)
    print(f"service started at {url} (pid {proc.pid}, log {DATA / 'server.log'})")


def stop_service() -> None:
    if not PID_FILE.is_file():
        print("no demo service is running")
        return
    pid = int(PID_FILE.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        print(f"stopped the demo service (pid {pid})")
    except ProcessLookupError:
        print("the demo service had already stopped")
    PID_FILE.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("COMPRESS_DEMO_PORT",
                                                                        8000)))
    parser.add_argument("--stop", action="store_true", help="stop the demo service")
    args = parser.parse_args()
    if args.stop:
        stop_service()
        return 0
    url = f"http://127.0.0.1:{args.port}"
    # Build (or find) the digits ViT first: shipped weights, checked by SHA-256.
    subprocess.run(compress_cmd("reference", "build", "digits-vit"), cwd=ROOT, check=True)
    start_service(url, args.port)
    token = (DATA / "token").read_text().strip()
    env = {**os.environ, "COMPRESS_URL": url, "COMPRESS_TOKEN": token}
    out = ROOT / "out" / "demo"
    print(f"$ compress submit {RECIPE.relative_to(ROOT)} --wait --download out/demo")
    code = subprocess.run(compress_cmd("submit", str(RECIPE), "--wait", "--download", str(out)),
                          cwd=ROOT, env=env).returncode
    print()
    print(f"dashboard:  {url}/#token={token}")
    print(f"report:     {out / 'report.html'}  (and the job's page on the dashboard)")
    print(f"model:      {out / 'model.onnx'}")
    print(f"API docs:   {url}/docs     CLI: COMPRESS_URL={url} COMPRESS_TOKEN=$(cat "
          f"{(DATA / 'token').relative_to(ROOT)}) .venv/bin/compress list")
    print("the service keeps running in the background; stop it with `make demo-stop`")
    return code


if __name__ == "__main__":
    sys.exit(main())
