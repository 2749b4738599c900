"""Review from a deployment, as a marketing team runs it: a real Prefect server, the
`campaign-review` deployment of `deployments/prefect.yaml` on a process worker, the
automation of `deployments/review_automation.py` sending its notification to a webhook on
loopback, the run suspended while it waits (no flow-run process held), resumed through
Prefect's API, and nothing paid twice. The review form and the gallery are checked in
headless Chromium (`UPDATE_SCREENSHOTS=1` writes `docs/review-form.png`).

A scenario (`pytest -m scenario`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from PIL import Image
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_events import events_of
from pydantic import SecretStr
from test_end_to_end import api_get, chromium, prefect, process_worker, server, wait_for_final_state
from test_run_form import Browser

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image._events import IMAGES_PUBLISHED, REVIEW_REQUESTED
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

__all__ = ["chromium", "server"]  # fixtures

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCREENSHOT = REPO / "docs" / "review-form.png"
README_HEIGHT = 1900
"""The screenshot's pixels down to the end of the review dialog."""
BUCKET = "e2e-review"
OPEN_THE_FORM = """new Promise((done, fail) => {
  const start = Date.now();
  const tick = () => {
    const resume = [...document.querySelectorAll('button')]
      .find((b) => b.textContent.trim() === 'Resume');
    if (resume && !document.querySelector('[role=dialog]')) resume.click();
    const dialog = document.querySelector('[role=dialog]');
    if (dialog && dialog.innerText.includes('Approved')) {
      setTimeout(() => done(dialog.innerText), 1500);
    } else if (Date.now() - start > 60000) {
      fail(new Error('no review form: ' + document.body.innerText.slice(0, 2000)));
    } else {
      setTimeout(tick, 300);
    }
  };
  tick();
})"""


class Webhook:
    """An HTTP server on loopback that keeps what is posted to it: the notifications."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(self.rfile.read(length).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def keys(s3: LocalS3Server) -> list[str]:
    listed = s3.boto3_client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return [item["Key"] for item in listed]


def wait_for_state(api_url: str, flow_run_id: str, name: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api_get(f"{api_url}/flow_runs/{flow_run_id}")["state"]
        if state["name"] == name:
            return
        assert state["type"] not in ("COMPLETED", "FAILED", "CRASHED"), state
        time.sleep(0.5)
    raise AssertionError(f"the run is not {name}")


def test_a_deployed_run_is_suspended_for_review_and_pays_nothing_twice_on_resume(
    server: tuple[str, dict[str, str]],
    chromium: str,
    api: GptImageEmulator,
    api_key: str,
    s3_server: LocalS3Server,
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    api_url, env = server
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect(["block", "register", "-m", "prefect_gpt_image"], env)
    with temporary_settings({PREFECT_API_URL: api_url}):
        OpenAICredentials(
            api_key=SecretStr(api_key), base_url=api.openai_base_url, model="gpt-image-2"
        ).save("openai-gpt-image", overwrite=True)
        s3_server.bucket_block(BUCKET).save("creatives-bucket", overwrite=True)
        CustomWebhookNotificationBlock(
            name="reviewers", url=webhook.url, json_data={"text": "{{body}}"}
        ).save("review-hook", overwrite=True)
    created = subprocess.run(
        [
            sys.executable,
            "deployments/review_automation.py",
            "--block",
            "custom-webhook/review-hook",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr[-3000:]
    prefect(["work-pool", "create", "creatives", "--type", "process"], env)
    prefect(
        [
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "--name",
            "campaign-review",
        ],
        env,
    )

    with process_worker(env, tmp_path / "worker.log") as worker:
        prompts = ["a ceramic mug on an oak table", "a linen tote bag on a beach"]
        started = prefect(
            [
                "deployment",
                "run",
                "generate-images/campaign-review",
                "--params",
                json.dumps({"prompts": prompts, "placements": ["meta-feed-square"]}),
            ],
            env,
        )
        match = re.search(r"UUID: ([0-9a-f-]{36})", started)
        assert match, started
        run_id = match.group(1)
        wait_for_state(api_url, run_id, "Suspended")

        # Suspended: the flow run's process has ended; the worker holds nothing.
        time.sleep(2)
        assert children(worker.pid) == [], (tmp_path / "worker.log").read_text()[-3000:]
        assert api.billed == 2
        masters = sorted(
            key.rsplit("/", 1)[-1]
            for key in keys(s3_server)
            if key.endswith(".png") and "-meta-" not in key
        )
        assert len(masters) == 2

        # The form, from Prefect's API: every image approved to start with.
        form = api_get(f"{api_url}/flow_runs/{run_id}/input/suspended-review-1-0-schema")
        assert sorted(form["properties"]["approved"]["default"]) == masters

        # The reviewers were told, once, with the figures, through the automation.
        deadline = time.monotonic() + 90
        while not webhook.bodies and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(webhook.bodies) == 1, webhook.bodies
        assert "2 image(s) and 2 rendition(s)" in webhook.bodies[0]

        # The review form and the gallery, in a browser.
        ui = api_url.removesuffix("/api")
        update = os.environ.get("UPDATE_SCREENSHOTS") == "1"
        shot = SCREENSHOT if update else tmp_path / "review-form.png"
        with Browser(chromium, tmp_path / "browser") as browser:
            text = browser.run(f"{ui}/runs/flow-run/{run_id}", OPEN_THE_FORM, screenshot=shot)[0]
        assert "Approved" in text and "Rejected" in text and masters[0] in text
        with Image.open(shot) as page:
            assert page.size[0] >= 1000
            if update:  # the page down to the end of the dialog, for the README
                page.crop((0, 0, page.size[0], min(page.size[1], README_HEIGHT))).save(shot)

        # Approve one; drop the other.
        # Through Prefect's client, as a reviewer's script would: it retries a busy server.
        with temporary_settings({PREFECT_API_URL: api_url}):
            resume_flow_run(
                UUID(run_id),
                run_input={"approved": [masters[0]], "rejected": {masters[1]: ""}},
            )
        flow_run = wait_for_final_state(api_url, run_id)

    log = (tmp_path / "worker.log").read_text()[-3000:]
    assert flow_run["state"]["type"] == "COMPLETED", log
    # Run again from the top on resume, and every image came from the cache.
    assert api.billed == 2
    published = sorted(k for k in keys(s3_server) if "/published/" in k)
    assert len(published) == 2 and published[0].endswith(masters[0])
    assert all(masters[1] not in key for key in published)
    assert len(events_of(REVIEW_REQUESTED, run_id, api_url)) == 1
    announced = events_of(IMAGES_PUBLISHED, run_id, api_url)
    assert len(announced) == 1 and announced[0]["payload"]["published"] == 2
