"""The upload task on its own, as data engineers compose it into their flows."""

from __future__ import annotations

import hashlib
import io
import time
from datetime import datetime, timezone

import pytest
from PIL import Image
from prefect import flow, unmapped
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters
from pydantic import SecretStr

from prefect_gpt_image import (
    GeneratedImage,
    ImageRequest,
    RapidAPICredentials,
    StoredImage,
    generate_image,
    upload_image,
)
from prefect_gpt_image.errors import StorageError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def an_image(prompt: str = "a lone lighthouse") -> GeneratedImage:

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, "PNG")
    data = buffer.getvalue()
    return GeneratedImage(
        data=data,
        media_type="image/png",
        sha256=hashlib.sha256(data).hexdigest(),
        width=64,
        height=48,
        request=ImageRequest(prompt=prompt),
        model="gpt-image-1.5",
        generated_at=datetime.now(timezone.utc),
    )


@flow
def store(image: GeneratedImage, bucket: S3Bucket, prefix: str = "") -> StoredImage:
    return upload_image(image, bucket, prefix)


def test_composed_in_a_users_flow(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    @flow
    def my_flow(prompts: list[str]) -> list[StoredImage]:
        images = generate_image.map(prompts, credentials=unmapped(credentials))
        return upload_image.map(images, bucket=unmapped(bucket), prefix="mine").result()

    stored = my_flow(["a mapped marmot", "a mapped mole"])

    assert [s.prompt for s in stored] == ["a mapped marmot", "a mapped mole"]
    for item in stored:
        body = s3_server.object_path(bucket.bucket_name, item.key).read_bytes()
        assert body == api.served[item.sha256]
        assert item.key.startswith("mine/a-mapped-m")


def test_key_format_and_record(bucket: S3Bucket, s3_server: LocalS3Server) -> None:
    image = an_image("A Lone Lighthouse, at night!")
    bucket_with_folder = bucket.model_copy(update={"bucket_folder": "creatives"})
    stored = store(image, bucket_with_folder, "2026/q1")

    assert stored.key == f"creatives/2026/q1/a-lone-lighthouse-at-night-{image.sha256[:12]}.png"
    assert stored.uri == f"s3://{bucket.bucket_name}/{stored.key}"
    assert (stored.size, stored.width, stored.height) == (len(image.data), 64, 48)
    assert s3_server.object_path(bucket.bucket_name, stored.key).read_bytes() == image.data


def test_missing_bucket_is_a_clear_error_not_a_retry_storm(s3_server: LocalS3Server) -> None:
    missing = S3Bucket(bucket_name="test-never-created", credentials=s3_server.aws_credentials())

    started = time.monotonic()
    state = store(an_image(), missing, return_state=True)

    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StorageError)
    assert "'test-never-created' does not exist" in str(exc)
    assert time.monotonic() - started < 10


def test_wrong_secret_is_a_clear_error_not_a_retry_storm(
    bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    wrong = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=SecretStr("not-the-secret"),
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(
            endpoint_url=s3_server.endpoint_url, config={"s3": {"addressing_style": "path"}}
        ),
    )
    started = time.monotonic()
    state = store(an_image(), bucket.model_copy(update={"credentials": wrong}), return_state=True)

    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, StorageError)
    assert "refused the credentials" in str(exc)
    assert "not-the-secret" not in str(exc)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("prefix", ["../up", "a/../../b", "with space", "tab\there"])
def test_unsafe_prefix_is_refused(prefix: str, bucket: S3Bucket) -> None:
    state = store(an_image(), bucket, prefix, return_state=True)
    assert "is not a safe S3 folder" in str(state.result(raise_on_failure=False))
