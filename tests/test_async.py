"""The async twins, as a data engineer awaits them in an async flow: the same calls, the
same retries, and one cache shared with the sync tasks."""

from __future__ import annotations

import asyncio

from prefect import flow
from prefect_aws import S3Bucket

from prefect_gpt_image import (
    AsyncGenerationClient,
    GeneratedImage,
    ImageRequest,
    RapidAPICredentials,
    StoredImage,
    agenerate_image,
    aupload_image,
    generate_image,
)
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server


def test_an_async_flow_generates_and_stores_with_the_twins(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    @flow
    async def campaign(prompts: list[str]) -> list[StoredImage]:
        images = await asyncio.gather(
            *(agenerate_image(prompt, credentials=credentials) for prompt in prompts)
        )
        return list(
            await asyncio.gather(*(aupload_image(image, bucket, "async") for image in images))
        )

    stored = asyncio.run(campaign(["a red kite", "a blue kite", "a green kite"]))

    assert api.billed == 3
    assert sorted(s.prompt for s in stored) == ["a blue kite", "a green kite", "a red kite"]
    for record in stored:
        assert record.key.startswith("async/")
        data = s3_server.object_path(bucket.bucket_name, record.key).read_bytes()
        assert data == api.served[record.sha256]


def test_the_twins_share_one_cache(api: GptImageEmulator, credentials: RapidAPICredentials) -> None:
    request = ImageRequest(prompt="a paper boat on a pond")

    @flow
    async def first() -> GeneratedImage:
        return await agenerate_image(request, credentials=credentials)

    @flow
    def second() -> GeneratedImage:
        return generate_image(request, credentials=credentials)

    made = asyncio.run(first())
    again = second()

    assert api.billed == 1
    assert again.sha256 == made.sha256


def test_the_async_twin_retries_as_the_sync_task_does(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    api.add_fault(Fault.server_error(503))

    @flow
    async def one() -> GeneratedImage:
        return await agenerate_image.with_options(retry_delay_seconds=0)(
            "a lighthouse at dusk", credentials=credentials
        )

    image = asyncio.run(one())

    assert ([call.status for call in api.calls], api.billed) == ([503, 200], 1)
    assert image.paid_calls == 1


def test_a_blocks_async_client_generates(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    client = credentials.get_async_client()
    assert isinstance(client, AsyncGenerationClient)

    image = asyncio.run(client.generate(ImageRequest(prompt="a quiet harbour")))

    assert api.billed == 1
    assert image.request.prompt == "a quiet harbour"
    assert image.cost_usd == 0.03
