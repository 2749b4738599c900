"""A route is named without the `user:password@` a base URL may carry (a gateway behind
basic auth): the password reaches neither the manifest, the objects' metadata, the logs,
the report, the run's artifacts nor an error."""

from __future__ import annotations

import logging
import socket

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect_aws import S3Bucket

from prefect_gpt_image import ImageRequest, OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image.errors import APIConnectionError
from prefect_gpt_image.models import RunReport
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

PASSWORD = "gw-pass-8c1e77d2"
"""Distinctive, so that a test can search everything written for it."""


def with_password(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://gw-user:{PASSWORD}@{rest}"


@pytest.mark.parametrize(
    ("route", "name"),
    [
        (
            OpenAICredentials(
                api_key="k", base_url=with_password("https://gw.example.com:8443/v1")
            ),
            "gw.example.com:8443",
        ),
        (
            OpenAICredentials(api_key="k", base_url=with_password("http://[::1]:4000/v1")),
            "[::1]:4000",
        ),
        (
            RapidAPICredentials(api_key="k", base_url=with_password("https://proxy.example.com")),
            "proxy.example.com",
        ),
        # A password holding an unescaped "@": everything before the host goes.
        (
            OpenAICredentials(api_key="k", base_url="https://u:p@ss@gw.example.com/v1"),
            "gw.example.com",
        ),
    ],
)
def test_a_route_is_named_by_its_host_without_userinfo(
    route: OpenAICredentials | RapidAPICredentials, name: str
) -> None:
    assert route.route_name == name
    assert PASSWORD not in route.shown_url and "u:p@ss" not in route.shown_url


def test_an_unreachable_route_is_named_without_its_password() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    route = OpenAICredentials(
        api_key="k", base_url=with_password(f"http://127.0.0.1:{port}/v1"), model="gpt-image-2"
    )

    with pytest.raises(APIConnectionError) as raised:
        route.get_client().generate(ImageRequest(prompt="a fox", quality="low"))

    assert f"Could not reach http://127.0.0.1:{port}/v1/images/generations" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_a_gateway_password_in_the_base_url_is_written_nowhere(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = openai_credentials.model_copy(
        update={"base_url": with_password(api.openai_base_url), "auth_header": "api-key"}
    )
    assert route.route_name == api.openai_base_url.split("/")[2]

    with caplog.at_level(logging.DEBUG):
        state = generate_images(
            ["a fox at dawn", "a hare at dusk"],
            bucket=bucket,
            credentials=route,
            return_state=True,
        )
    report: RunReport = state.result()

    assert len(report.images) == 2 and len(api.calls) == 2
    # Every log line of Prefect's and this package's. (httpx's own INFO line, off unless a
    # user turns it on, shows the URL as the block gives it.)
    logs = "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("prefect")
    )
    written = [report.model_dump_json(), logs]
    client = s3_server.boto3_client()
    assert report.manifest_key
    manifest = client.get_object(Bucket=bucket.bucket_name, Key=report.manifest_key)
    written.append(manifest["Body"].read().decode())
    for image in report.images:
        assert image.route == route.route_name
        metadata = client.head_object(Bucket=bucket.bucket_name, Key=image.key)["Metadata"]
        assert {k.lower(): v for k, v in metadata.items()}["route"] == route.route_name
        written.append(repr(metadata))
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    written += [str(artifact.data) for artifact in artifacts]
    assert "POST http://127.0.0.1" in logs  # the logs were captured, down to DEBUG
    for text in written:
        assert PASSWORD not in text
