"""A real `prefect server start` on loopback, for end-to-end tests and benchmarks.

The test harness runs Prefect's API in-process; deployments, workers and the UI need the
real server, started as users start it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

__all__ = ["prefect_server", "stop_process"]

START_TIMEOUT = 180.0
"""A new database takes about 20 s to migrate on a small machine."""


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """Start `prefect server start` on a free loopback port, with `home` as its
    PREFECT_HOME; yield the environment that points a process at it (the API for clients
    and for the UI), and stop the server on exit. Its log is `home/server.log`."""
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    prefect = Path(sys.executable).parent / "prefect"
    with (home / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_healthy(api_url, process, home / "server.log")
            yield env
        finally:
            stop_process(process, timeout=30)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process this code started, by its pid: SIGTERM, then SIGKILL after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_healthy(api_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
