"""Starts `python app.py` on the tiny model and a free local port, for the API and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from specstream.adapter import save_adapter

from .conftest import random_adapter

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2)
            return
        time.sleep(0.3)
    raise RuntimeError(f"the app did not serve {url} within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_app(tiny_dir: Path, tiny_base, folder: Path):
    """Yields the URL of the app serving the tiny model with a random (so sometimes accepting) adapter."""
    adapter = save_adapter(random_adapter(tiny_base, 0), folder / "adapter")
    port = free_port()
    env = os.environ | {
        "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
        "SPECSTREAM_MODEL": str(tiny_dir), "SPECSTREAM_ADAPTER": str(adapter), "SPECSTREAM_DEVICE": "cpu",
        "SPECSTREAM_DTYPE": "float64", "OMP_NUM_THREADS": "1",
    }
    log = folder / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
