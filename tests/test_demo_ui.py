"""`prefect-gpt-image demo --ui` as a newcomer runs it: a real Prefect server, the address
of the run's page, and the servers up until Ctrl-C."""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

COMMAND = str(Path(sys.executable).parent / "prefect-gpt-image")
RUN_PAGE = re.compile(r"(http://127\.0\.0\.1:\d+)/runs/flow-run/([0-9a-f-]{36})")

pytestmark = pytest.mark.e2e


def test_demo_ui_prints_the_run_page_and_keeps_it_up_until_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAPIDAPI_"))}
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        # A session of its own: should the test fail, the demo's servers go with it.
        demo = subprocess.Popen(
            [COMMAND, "demo", "--ui", "--dir", str(tmp_path / "demo")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:  # up to the prompt to press Ctrl-C, or the demo's end
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        output = "".join(lines)
        found = RUN_PAGE.search(output)
        assert found, f"{output}\n{errors.read_text()}"
        ui_url, run_id = found.groups()
        api_url = f"{ui_url}/api"

        flow_run = httpx.get(f"{api_url}/flow_runs/{run_id}").json()
        assert flow_run["state_type"] == "COMPLETED"
        assert flow_run["parameters"]["prefix"] == "spring-campaign"
        artifacts = _artifacts(api_url, run_id)
        table = json.loads(artifacts["gpt-image-run"]["data"])
        assert artifacts["gpt-image-run"]["type"] == "table"
        assert [row["status"] for row in table] == ["stored"] * 12
        gallery = artifacts["gpt-image-gallery"]
        assert gallery["type"] == "markdown"
        assert gallery["data"].startswith("## 12 stored, 0 failed; 11 generated")

        # The run's log tells what it did, each thing once; the console showed warnings only.
        story = _log_of(api_url, run_id, until="12 stored, 0 failed")
        assert any(line.startswith("12 prompts, 11 distinct: 0 from the cache") for line in story)
        assert any(line.startswith("Routes: ") for line in story), story
        assert sum(line.startswith("Dropped the route") for line in story) == 1, story

        # While the demo waits, the page opens in a browser, and so do the gallery's images.
        page = httpx.get(found.group(0), headers={"Accept": "text/html"})
        assert page.status_code == 200 and "<html" in page.text.lower()
        links = [html.unescape(url) for url in re.findall(r'<img src="([^"]+)"', gallery["data"])]
        assert len(links) == 11
        assert httpx.get(links[0]).content.startswith(b"\x89PNG")

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, errors.read_text()
        assert "Traceback" not in errors.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{api_url}/health", timeout=2)
    finally:
        if demo.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()


def _artifacts(api_url: str, flow_run_id: str) -> dict[str, dict[str, Any]]:
    """The flow run's artifacts that have a key, by key."""
    response = httpx.post(
        f"{api_url}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
    )
    response.raise_for_status()
    return {artifact["key"]: artifact for artifact in response.json() if artifact["key"]}


def _log_of(api_url: str, flow_run_id: str, *, until: str) -> list[str]:
    """The messages of the flow run's log, once one contains `until`: the demo's process
    sends its lines in batches, every two seconds."""
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(
            f"{api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        response.raise_for_status()
        messages = [log["message"] for log in response.json()]
        if any(until in message for message in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)
