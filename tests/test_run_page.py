"""What a run shows in Prefect, and campaigns built from a template."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect_aws import S3Bucket

from prefect_gpt_image import PromptTemplate, RapidAPICredentials, generate_images
from prefect_gpt_image.testing import GptImageEmulator


def artifacts_of(flow_run_id: Any) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.type: artifact for artifact in artifacts}


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
