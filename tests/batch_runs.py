"""What the Batch API's tests share: a run through the Batch API, what it billed at the
emulator, and what it stored in the bucket."""

from __future__ import annotations

from typing import Any

from prefect_aws import S3Bucket

from prefect_gpt_image import BatchOptions, OpenAICredentials, generate_images
from prefect_gpt_image._billing import call_cost
from prefect_gpt_image._responses import usage_of
from prefect_gpt_image.models import ImageRequest, RunReport
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def run(
    route: OpenAICredentials,
    bucket: S3Bucket,
    texts: list[str],
    *,
    batch: dict[str, Any] | None = None,
    **options: Any,
) -> RunReport:
    """`generate_images` through the Batch API, waiting up to two minutes for its batches;
    `batch` sets the other fields of its `BatchOptions` (`{"enabled": False}`: synchronous)."""
    batch_options = BatchOptions(**{"wait_minutes": 2, **(batch or {})})
    report: RunReport = generate_images(
        texts, bucket=bucket, credentials=route, batch=batch_options, **options
    )
    return report


def batch_calls_cost(route: OpenAICredentials, api: GptImageEmulator, *, batch: bool) -> float:
    """What the emulator's batch answers cost by their usage: at the batch price, or as
    synchronous calls."""
    spec, request = route.model_spec(), ImageRequest(prompt="priced by usage")
    return sum(
        call_cost(spec, request, call.n, usage_of({"usage": call.usage}), batch=batch)
        for call in api.batch_calls
        if call.usage is not None
    )


def objects(s3: LocalS3Server, bucket: S3Bucket) -> dict[str, bytes]:
    """The images in `bucket`, by key (the manifest left out)."""
    client = s3.boto3_client()
    listed = client.list_objects_v2(Bucket=bucket.bucket_name).get("Contents", [])
    return {
        item["Key"]: client.get_object(Bucket=bucket.bucket_name, Key=item["Key"])["Body"].read()
        for item in listed
        if not item["Key"].endswith(".jsonl")
    }
