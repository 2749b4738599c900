"""End to end, as a user meets the product: a real Prefect server, the blocks registered and
saved, `deployments/prefect.yaml` deployed to a process work pool, a worker, a run started
with custom parameters, the images in S3, the artifacts in the API, and the gallery in a
browser.

Slower than the rest (a minute or more), marked `e2e`: a scenario (`pytest -m scenario`).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr

from prefect_gpt_image import BatchOptions, OpenAICredentials, PromptTemplate, RapidAPICredentials
from prefect_gpt_image._images import inspect_image
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server, prefect_server
from prefect_gpt_image.testing.local_prefect import stop_process

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1400,900",
]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on loopback, and the environment that points at it."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as env:
        yield env["PREFECT_API_URL"], env


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium; installed here on a machine that has apt and runs as root (CI)."""
    if found := shutil.which("chromium"):
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's chromium package (apt-get install chromium)")
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"],
        check=True,
        capture_output=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("chromium") or pytest.fail("chromium did not install")


def prefect(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(BIN / "prefect"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_scheduled_deployment_runs_from_a_worker_and_shows_its_gallery(
    server: tuple[str, dict[str, str]],
    chromium: str,
    api: GptImageEmulator,
    api_key: str,
    s3_server: LocalS3Server,
    tmp_path: Path,
) -> None:
    api_url, env = server
    bucket_name = "e2e-creatives"

    # A newcomer's steps: register the block types, save the blocks, deploy, start a worker.
    registered = prefect(["block", "register", "-m", "prefect_gpt_image"], env)
    assert "RapidAPI Credentials" in registered and "OpenAI Image Credentials" in registered
    with temporary_settings({PREFECT_API_URL: api_url}):
        # RapidAPI's route has retired its model (its host is gone): the deployment's second
        # route, OpenAI's protocol, makes the images.
        RapidAPICredentials(
            api_key=SecretStr(api_key), base_url=api.base_url, api_host="retired.p.rapidapi.com"
        ).save("gpt-image-credentials", overwrite=True)
        OpenAICredentials(
            api_key=SecretStr(api_key), base_url=api.openai_base_url, model="gpt-image-2"
        ).save("openai-gpt-image", overwrite=True)
        s3_server.bucket_block(bucket_name).save("creatives-bucket", overwrite=True)
    prefect(["work-pool", "create", "creatives", "--type", "process"], env)
    deployed = prefect(
        ["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env
    )
    assert "generate-images/weekly-creatives" in deployed
    weekly = httpx.get(f"{api_url}/deployments/name/generate-images/weekly-creatives").json()
    # Sent on Monday morning through the Batch API, and collected every 15 minutes after.
    crons = sorted(schedule["schedule"]["cron"] for schedule in weekly["schedules"])
    assert crons == ["*/15 0-6 * * 2", "*/15 6-23 * * 1"]
    sent = BatchOptions.model_validate(weekly["parameters"]["batch"])
    assert (sent.enabled, sent.wait_minutes) == (True, 0)
    assert weekly["parameters"]["max_cost_usd"] == 50
    # The run form: a section per option group, a size checked as WIDTHxHEIGHT, a quality to
    # pick, block pickers, numbers with bounds.
    schema = weekly["parameter_openapi_schema"]
    form, sections = schema["properties"], schema["definitions"]
    assert form["image"]["$ref"] == "#/definitions/ImageOptions"
    image = sections["ImageOptions"]["properties"]
    assert (image["size"]["type"], image["size"]["default"]) == ("string", "1024x1024")
    assert re.fullmatch(image["size"]["pattern"], "1536x1024")
    assert not re.fullmatch(image["size"]["pattern"], "1536 by 1024")
    assert image["quality"]["enum"] == ["low", "medium", "high", "xhigh", "max", "auto"]
    assert {"$ref": "#/definitions/RapidAPICredentials"} in form["credentials"]["anyOf"]
    assert {"$ref": "#/definitions/OpenAICredentials"} in form["credentials"]["anyOf"]
    assert {"$ref": "#/definitions/S3Bucket"} in form["bucket"]["anyOf"]
    assert form["limits"]["$ref"] == "#/definitions/ApiLimits"
    concurrency = sections["ApiLimits"]["properties"]["max_concurrency"]
    assert (concurrency["minimum"], concurrency["maximum"]) == (1, 256)
    # product-shots' template, with this run's own products: a run's `prompts` replaces the
    # deployment's whole, so it restates the template.
    shots = httpx.get(f"{api_url}/deployments/name/generate-images/product-shots").json()
    template = PromptTemplate.model_validate(shots["parameters"]["prompts"]).template

    with process_worker(env, tmp_path / "worker.log"):
        variables = {
            "product": ["teapot", "lamp"],
            "background": ["linen"],
            "style": ["soft light"],
        }
        started = prefect(
            [
                "deployment",
                "run",
                "generate-images/product-shots",
                "--param",
                "prefix=e2e",
                "--params",
                json.dumps(
                    {
                        "prompts": {"template": template, "variables": variables},
                        "image": {"size": "1536x1024"},
                    }
                ),
            ],
            env,
        )
        match = re.search(r"UUID: ([0-9a-f-]{36})", started)
        assert match, started
        flow_run = wait_for_final_state(api_url, match.group(1))

    assert flow_run["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]

    # The images are in the bucket, byte for byte what the API served.
    folder = s3_server.object_path(bucket_name, "e2e")
    images = sorted(p for p in folder.iterdir() if p.suffix == ".png")
    assert [p.name.rsplit("-", 1)[0] for p in images] == [
        "lamp-linen-soft-light",
        "teapot-linen-soft-light",
    ]
    assert {p.read_bytes() for p in images} == set(api.served.values())
    assert [(c.status, c.model) for c in api.calls if c.status == 200] == [(200, "gpt-image-2")] * 2
    sizes = {(info.width, info.height) for info in map(inspect_image, map(Path.read_bytes, images))}
    assert sizes == {(1536, 1024)}

    # The artifacts are in the API.
    artifacts = httpx.post(
        f"{api_url}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}},
    ).json()
    by_type = {artifact["type"]: artifact for artifact in artifacts}
    table = json.loads(by_type["table"]["data"])
    assert [(row["status"], row["model"]) for row in table] == [("stored", "gpt-image-2")] * 2
    assert by_type["progress"]["data"] == 100.0
    gallery_id = by_type["markdown"]["id"]

    # And a browser shows the gallery: the page renders the thumbnails.
    page = f"http://127.0.0.1:{api_url.split(':')[2].split('/')[0]}/artifacts/artifact/{gallery_id}"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", page],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rendered = [html.unescape(src) for src in re.findall(r'<img src="([^"]+)"', dom)]
    assert len(rendered) == 2 and all("/e2e/" in src for src in rendered), dom[-3000:]
    screenshot = tmp_path / "gallery.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'chrome'}",
            f"--screenshot={screenshot}",
            page,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert screenshot.stat().st_size > 20_000  # a page with pictures, not a blank one


@contextmanager
def process_worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect worker start --pool creatives`, its output in `log`, stopped on exit."""
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "creatives"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield worker
        finally:
            stop_process(worker)


def api_get(url: str) -> Any:
    """GET from the Prefect server's API, as its own client does: a busy server's 503
    (its database locked for a moment) is asked again."""
    for _ in range(20):
        answer = httpx.get(url, timeout=30)
        if answer.status_code != 503:
            answer.raise_for_status()
            return answer.json()
        time.sleep(0.5)
    answer.raise_for_status()


def wait_for_final_state(api_url: str, flow_run_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run: dict[str, Any] = api_get(f"{api_url}/flow_runs/{flow_run_id}")
        if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return flow_run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s")
