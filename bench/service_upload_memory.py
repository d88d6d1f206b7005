"""Resident memory of the API process while it receives a large upload.

Starts `compress serve` (SQLite, no workers, so the job only queues) as its own process, warms
it up with a small job, resets the kernel's peak-RSS counter (/proc/PID/clear_refs), uploads a
500 MB safetensors checkpoint through the CLI's client and reads the peak (VmHWM) back, with a
20 ms RSS sampler as a second witness. Target: the upload raises the API's RSS by <= 50 MB.

    python bench/service_upload_memory.py [--mb 500] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import Client  # noqa: E402

TOKEN = "bench-token"


def write_safetensors(path: Path, n_bytes: int) -> None:
    """A valid safetensors header over a sparse zero-filled tensor of n_bytes."""
    n = n_bytes // 4
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, n * 4]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header.encode())
        f.truncate(8 + len(header) + n * 4)


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--limit-mb", type=float, default=50)
    ap.add_argument("--out", default=None, help="folder for upload_memory.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        tmp = Path(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "compress", "serve", "--data-dir", str(tmp / "data"),
             "--port", str(port), "--workers", "0", "--token", f"{TOKEN}:bench",
             "--max-upload-mb", str(args.mb + 100), "--log-level", "warning"],
            cwd=ROOT, stdout=log, stderr=log)
        try:
            client = Client(f"http://127.0.0.1:{port}", TOKEN, timeout=600)
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.ready()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError((tmp / "server.log").read_text()) from None
                    time.sleep(0.3)
            recipe = tmp / "recipe.yaml"
            recipe.write_text(yaml.safe_dump({
                "version": 1, "name": "upload-bench",
                "model": {"source": "timm", "name": "test_vit", "weights": "model.safetensors"},
                "evaluation": {"path": "eval.npz"}}))
            np.savez(tmp / "eval.npz", x=np.zeros((4, 3, 224, 224), np.float32))
            write_safetensors(tmp / "small.safetensors", 1 << 20)
            write_safetensors(tmp / "model.safetensors", args.mb * 1_000_000)

            proc = psutil.Process(server.pid)
            # warm-up: the first upload imports and allocates what every later one reuses
            client.submit(recipe, model=tmp / "small.safetensors")
            time.sleep(0.5)
            before = proc.memory_info().rss
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM to current RSS
            samples, stop = [], threading.Event()

            def sample():
                while not stop.is_set():
                    samples.append(proc.memory_info().rss)
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t = time.perf_counter()
            job = client.submit(recipe)  # model.safetensors and eval.npz beside the recipe
            seconds = time.perf_counter() - t
            stop.set()
            sampler.join()
            peak_hwm = vm_hwm_kb(server.pid) * 1024
            stored = next((tmp / "data").rglob("inputs/model.safetensors")).stat().st_size
        finally:
            server.terminate()
            server.wait(timeout=30)

    result = {
        "upload_mb": args.mb, "stored_bytes": stored, "job_state": job["state"],
        "rss_before_mb": round(before / 1e6, 1),
        "rss_peak_mb": round(max(peak_hwm, *samples) / 1e6, 1),
        "rss_increase_mb": round((max(peak_hwm, *samples) - before) / 1e6, 1),
        "rss_increase_sampled_mb": round((max(samples) - before) / 1e6, 1),
        "upload_seconds": round(seconds, 2),
        "throughput_mb_s": round(args.mb / seconds, 1),
        "limit_mb": args.limit_mb, "cpus": os.cpu_count(),
    }
    result["passed"] = result["rss_increase_mb"] <= args.limit_mb
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "upload_memory.json").write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
