"""What a run shows in Prefect (its artifacts and its log), and campaigns built from a
template."""

from __future__ import annotations

import html
import json
import logging
import re
from typing import Any

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Log
from prefect.logging.handlers import APILogHandler
from prefect_aws import S3Bucket

from prefect_gpt_image import (
    OpenAICredentials,
    PromptTemplate,
    RapidAPICredentials,
    generate_images,
)
from prefect_gpt_image._ledger import FAILURES_LISTED
from prefect_gpt_image._run_story import tell_outcome
from prefect_gpt_image.models import PromptFailure, RunReport
from prefect_gpt_image.testing import GptImageEmulator


def artifacts_of(flow_run_id: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.type: artifact for artifact in artifacts}


def logs_of(flow_run_id: Any) -> list[Log]:
    """The flow run's log as the UI shows it: every line its flow and tasks sent to the API."""
    APILogHandler().flush()  # the lines still queued in this process
    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )


def messages(logs: list[Log], level: int, containing: str = "") -> list[str]:
    return [log.message for log in logs if log.level == level and containing in log.message]


PREFECT_OWN = ("Finished in state", "Beginning ", "Created task run", "Executing ")
"""How Prefect's engine starts its own lines in a run's log (one per task run, at INFO)."""


def test_run_page_has_a_table_a_gallery_and_progress(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = ["a tabled toucan", "a tabled toucan", "[reject] a refused tapir", "a tabled tiger"]
    state = generate_images(
        prompts, bucket=bucket, credentials=credentials, allow_failures=1, return_state=True
    )
    artifacts = artifacts_of(state.state_details.flow_run_id)

    table = json.loads(artifacts["table"].data)
    assert [row["prompt"] for row in table] == prompts
    assert [row["status"] for row in table] == ["stored", "stored", "failed", "stored"]
    assert [row["cost_usd"] for row in table] == [0.03, 0.0, 0.0, 0.03]
    assert "refused the prompt" in table[2]["error"]
    assert table[0]["object"] == table[1]["object"]
    assert artifacts["table"].key == "gpt-image-run"

    # Every link in the gallery opens the image the API served.
    gallery = artifacts["markdown"].data
    assert gallery.startswith("## 3 stored, 1 failed; 2 generated")
    links = {html.unescape(url) for url in re.findall(r'<img src="([^"]+)"', gallery)}
    assert len(links) == 2
    for link in links:
        assert httpx.get(link).content in api.served.values()

    assert artifacts["progress"].data == 100.0


def test_links_use_a_public_base_url(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    state = generate_images(
        ["a public puffin"],
        bucket=bucket,
        credentials=credentials,
        links={"public_base_url": "https://cdn.example.com/creatives/"},
        return_state=True,
    )
    (row,) = json.loads(artifacts_of(state.state_details.flow_run_id)["table"].data)
    assert row["link"].startswith("https://cdn.example.com/creatives/a-public-puffin-")


def test_a_template_times_its_variables(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    report = generate_images(
        PromptTemplate(
            template="a {product} on a {background} background, {style}",
            variables={
                "product": ["mug", "vase"],
                "background": ["marble", "oak"],
                "style": ["flat"],
            },
        ),
        bucket=bucket,
        credentials=credentials,
        prefix="templated",
    )

    assert [image.name for image in report.images] == [
        "mug marble flat",
        "mug oak flat",
        "vase marble flat",
        "vase oak flat",
    ]
    assert report.images[1].prompt == "a mug on a oak background, flat"
    assert report.images[1].key.startswith("templated/mug-oak-flat-")
    assert len(api.calls) == 4


def test_the_run_log_tells_what_the_run_did(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = [f"a logged lynx #{n}" for n in range(9)] + ["a logged lynx #0"]
    prompts += ["[reject] a refused rhino", "[reject] a refused ram"]
    state = generate_images(
        prompts, bucket=bucket, credentials=credentials, allow_failures=2, return_state=True
    )
    report = state.result()
    logs = logs_of(state.state_details.flow_run_id)

    info = messages(logs, logging.INFO)
    plan = "12 prompts, 11 distinct: 0 from the cache, 11 new (at most $"
    assert any(plan in line for line in info), info
    assert any(f"Route: {credentials.route_name} ({credentials.model})" in line for line in info)
    outcome = messages(logs, logging.INFO, report.summary())
    assert len(outcome) == 1 and str(report.manifest_uri) in outcome[0]
    failures = messages(logs, logging.WARNING, "Failed: ")
    assert sorted(failures) == sorted(
        f"Failed: {failure.prompt!r}: {failure.error}" for failure in report.failures
    )
    assert len(failures) == 2 and "refused the prompt" in failures[0]
    # Per-image lines are DEBUG: 12 prompts make a handful of INFO lines, not one each.
    ours = [line for line in info if not line.startswith(PREFECT_OWN)]
    assert len(ours) < 10, ours

    # Again: what the cache holds is counted as such, and only the refused two are new.
    again = generate_images(
        prompts, bucket=bucket, credentials=credentials, allow_failures=2, return_state=True
    )
    plan = "12 prompts, 11 distinct: 9 from the cache, 2 new (at most $0.06)"
    assert any(
        plan in line for line in messages(logs_of(again.state_details.flow_run_id), logging.INFO)
    )


def test_a_dropped_route_is_logged_once(
    api: GptImageEmulator, api_key: str, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    api.models.pop("gpt-image-1.5", None)  # retired: it answers 404 model_not_found
    retired = OpenAICredentials(
        api_key=api_key, base_url=api.openai_base_url, model="gpt-image-1.5", timeout_seconds=10
    )
    state = generate_images(
        [f"a dropped dodo #{n}" for n in range(8)],
        bucket=bucket,
        credentials=[retired, openai_credentials],
        limits={"max_concurrency": 4},
        return_state=True,
    )
    assert state.is_completed()
    assert any(call.model == "gpt-image-1.5" for call in api.calls)
    logs = logs_of(state.state_details.flow_run_id)

    name = retired.route_name
    routes = f"Routes: {name} (gpt-image-1.5), then {name} ({openai_credentials.model})"
    assert any(routes in line for line in messages(logs, logging.INFO)), logs
    (dropped,) = [log for log in logs if "Dropped the route" in log.message]
    assert dropped.level == logging.WARNING
    assert dropped.message.startswith(f"Dropped the route {name} (gpt-image-1.5)")
    assert "model_not_found" in dropped.message
    assert api_key not in "".join(log.message for log in logs)


def test_a_long_list_of_failures_is_cut_short(caplog: pytest.LogCaptureFixture) -> None:
    failures = [
        PromptFailure(prompt=f"a failed ferret #{n}", error="boom", error_type="E", stage="upload")
        for n in range(FAILURES_LISTED + 5)
    ]
    report = RunReport(failures=failures, manifest_uri="s3://runs/manifest.jsonl")
    with caplog.at_level(logging.INFO, logger="run-story"):
        tell_outcome(logging.getLogger("run-story"), report)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == FAILURES_LISTED + 1
    assert warnings[0] == "Failed: 'a failed ferret #0': boom"
    assert warnings[-1] == "... and 5 more failed, listed in s3://runs/manifest.jsonl"
