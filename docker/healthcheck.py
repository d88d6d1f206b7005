"""The images' HEALTHCHECK: healthy while the container does its job.

HEALTHCHECK_URL set (the API; a worker running `compress serve`): that URL answers 2xx (the
service's /readyz: the database answers). Otherwise (a Ray node): the raylet process runs, and
the GCS address the node joined (RAY_ADDRESS, or the head's own port) accepts connections.
Standard library only: it runs every 15-30 s and must cost nothing.
"""

import os
import socket
import sys
import urllib.request
from pathlib import Path


def raylet_running() -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"/raylet" in cmdline.read_bytes().split(b"\0")[0]:
                return True
        except OSError:
            continue
    return False


def main() -> int:
    url = os.environ.get("HEALTHCHECK_URL")
    if url:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 0 if 200 <= resp.status < 300 else 1
    if not raylet_running():
        print("no raylet process", file=sys.stderr)
        return 1
    host, _, port = os.environ.get("RAY_GCS_ADDRESS", "127.0.0.1:6380").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5):
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
