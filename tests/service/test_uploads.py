"""Uploads stream to disk: a 500 MB checkpoint leaves the server's memory flat."""

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from bench.service_upload_memory import vm_hwm_kb, write_safetensors
from compress.errors import ModelLoadError
from service.client import Client
from service.uploads import check_safetensors
from tests.service.conftest import live_server, make_settings


def test_500mb_upload_raises_resident_memory_by_less_than_50mb(tmp_path):
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", workers=0)
    with live_server(settings) as url:
        upload_and_measure(tmp_path, Client(url, "token-a", timeout=600), settings)


def upload_and_measure(tmp_path, client, settings):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "model": {"source": "timm", "name": "test_vit",
                                "weights": "model.safetensors"},
        "evaluation": {"path": "eval.npz", "latency": {"enabled": False}}}))
    np.savez(tmp_path / "eval.npz", x=np.zeros((2, 3, 224, 224), np.float32))
    write_safetensors(tmp_path / "model.safetensors", 1 << 20)
    client.submit(recipe)  # warm-up: lazy imports and first allocations
    write_safetensors(tmp_path / "model.safetensors", 500_000_000)

    me = psutil.Process()
    time.sleep(0.2)
    before = me.memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS restarts from here
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(me.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    job = client.submit(recipe)
    stop.set()
    sampler.join()
    # the server runs in this process (a uvicorn thread), so this counts client and server
    increase = max(vm_hwm_kb(me.pid) * 1024, *samples) - before
    assert increase < 50e6, f"RSS rose by {increase / 1e6:.0f} MB"
    stored = next(settings.data_dir.rglob(f"{job['id']}/inputs/model.safetensors"))
    assert stored.stat().st_size == (tmp_path / "model.safetensors").stat().st_size
    client.close()


def test_safetensors_header_check(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, 1024)
    check_safetensors(good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="bad header length"):
        check_safetensors(bad)
    bad.write_bytes((4).to_bytes(8, "little") + b"nope" + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="not JSON"):
        check_safetensors(bad)
