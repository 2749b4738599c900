"""Storage problems are found before anything is paid for, and a manifest S3 refuses at the
end still leaves the report, the artifacts and a local copy; a request a model cannot take
is refused (or routed to one that can) before anything is paid."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from PIL import Image
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters
from pydantic import SecretStr

from prefect_gpt_image import (
    ImageRequest,
    OpenAICredentials,
    RapidAPICredentials,
    _progress,
    generate_images,
)
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError, StorageError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def test_a_missing_bucket_is_found_before_any_paid_call(
    api: GptImageEmulator, credentials: RapidAPICredentials, s3_server: LocalS3Server
) -> None:
    missing = S3Bucket(bucket_name="never-created-bucket", credentials=s3_server.aws_credentials())

    with pytest.raises(StorageError, match="'never-created-bucket' does not exist"):
        generate_images(["a doomed dove"], bucket=missing, credentials=credentials)

    assert api.calls == []


def test_a_wrong_s3_secret_is_found_before_any_paid_call(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    assert isinstance(bucket.credentials, AwsCredentials)
    wrong = bucket.credentials.model_copy(
        update={"aws_secret_access_key": SecretStr("not-the-secret")}
    )

    with pytest.raises(StorageError, match="refused the credentials"):
        generate_images(
            ["a refused rook"],
            bucket=bucket.model_copy(update={"credentials": wrong}),
            credentials=credentials,
        )

    assert api.calls == []


def test_a_prefix_whose_keys_would_pass_s3s_limit_is_refused_before_paying(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    deep = "/".join(["campaign-2026-spring-hero-banners"] * 28)  # 951 bytes

    with pytest.raises(InvalidRequestError, match="over S3's 1024"):
        generate_images(["a deep dipper"], bucket=bucket, credentials=credentials, prefix=deep)

    assert api.calls == []


def test_an_unreachable_cache_storage_is_found_before_any_paid_call(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    nowhere = AwsCredentials(
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(
            endpoint_url=f"http://127.0.0.1:{closed}", config={"retries": {"max_attempts": 1}}
        ),
    )
    cache = S3Bucket(bucket_name="cache-nowhere", credentials=nowhere)
    cache.save(f"cache-nowhere-{uuid.uuid4().hex[:6]}")

    with pytest.raises(StorageError):
        generate_images(
            ["a cacheless crane"], bucket=bucket, credentials=credentials, cache={"storage": cache}
        )

    assert api.calls == []


def test_a_manifest_s3_refuses_at_the_end_is_kept_locally(
    api: GptImageEmulator, credentials: RapidAPICredentials, tmp_path: Path
) -> None:
    with LocalS3Server(tmp_path / "s3") as s3:
        bucket = s3.bucket_block("short-lived")

        def stop_s3_once_every_image_is_stored(done: int, total: int) -> None:
            if done == total:  # the manifest comes next
                s3.stop()

        stop_listening = _progress.subscribe(stop_s3_once_every_image_is_stored)
        try:
            report = generate_images(["a vanishing vole"], bucket=bucket, credentials=credentials)
        finally:
            stop_listening()

    assert len(report.images) == 1 and report.manifest_key is None
    manifest = Path((report.manifest_uri or "").removeprefix("file://"))
    assert manifest.name.startswith("manifest-") and '"status": "stored"' in manifest.read_text()


def test_a_paid_image_is_kept_when_the_s3_cache_goes_down(
    api: GptImageEmulator, credentials: RapidAPICredentials, tmp_path: Path
) -> None:
    """The README's multi-worker setup, with its S3 down mid-run: the images and the cache
    are both refused, the images are kept in local result storage, and the next run stores
    them without paying again."""
    prompts = ["a kept kestrel", "a kept kite"]
    api.latency = 1.0
    with LocalS3Server(tmp_path / "s3") as s3:
        bucket = s3.bucket_block("kept-images")
        cache = s3.bucket_block("kept-cache")
        cache.save(f"kept-cache-{uuid.uuid4().hex[:6]}")

        def stop_s3_once_the_api_is_called() -> None:
            while api.peak_concurrency == 0:  # a generation has started: S3 was checked
                time.sleep(0.01)
            s3.stop()

        stopper = threading.Thread(target=stop_s3_once_the_api_is_called, daemon=True)
        stopper.start()
        with pytest.raises(RunFailedError):
            generate_images(
                prompts, bucket=bucket, credentials=credentials, cache={"storage": cache}
            )
        stopper.join()
        assert api.billed == 2

        s3.start()
        report = generate_images(
            prompts, bucket=bucket, credentials=credentials, cache={"storage": cache}
        )

        assert api.billed == 2
        assert (report.generated, report.from_cache) == (0, 2)
        for image in report.images:
            assert s3.object_path("kept-images", image.key).read_bytes() == api.served[image.sha256]


# -- what each model after gpt-image-1.5 takes -------------------------------------------------

ModelRoute = Callable[..., OpenAICredentials]


def a_photo(tmp_path: Path) -> Path:
    path = tmp_path / "mug.png"
    Image.new("RGB", (64, 48), "teal").save(path)
    return path


def test_a_size_under_the_pixel_minimum_is_refused_before_paying(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket
) -> None:
    route = model_route("gpt-image-2")

    with pytest.raises(InvalidRequestError, match=r"512x512 .*at least 655,360 pixels"):
        generate_images(
            ["a small snipe"], bucket=bucket, credentials=route, image={"size": "512x512"}
        )

    assert api.calls == []
    report = generate_images(
        ["a least snipe"], bucket=bucket, credentials=route, image={"size": "1024x640"}
    )
    assert (report.images[0].width, report.images[0].height) == (1024, 640)


def test_xhigh_and_max_are_taken_by_gpt_image_2_5_only(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket
) -> None:
    with pytest.raises(InvalidRequestError, match="has no 'xhigh' quality: use low, medium"):
        generate_images(
            ["a fine finch"],
            bucket=bucket,
            credentials=model_route("gpt-image-2"),
            image={"quality": "xhigh"},
        )
    assert api.calls == []

    flare = model_route("gpt-image-2.5-flare")
    report = generate_images(
        [ImageRequest(prompt="a finer finch", quality="xhigh"), "a finest finch"],
        bucket=bucket,
        credentials=flare,
        image={"quality": "max"},
    )
    assert len(report.images) == 2
    assert sorted(call.body["quality"] for call in api.calls) == ["max", "xhigh"]


def test_complexity_is_sent_to_gpt_image_2_6_and_refused_elsewhere(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket
) -> None:
    busy = ImageRequest(prompt="a busy market of starlings", complexity="low")
    with pytest.raises(InvalidRequestError, match="has no complexity setting"):
        generate_images([busy], bucket=bucket, credentials=model_route("gpt-image-2.5-flare"))
    assert api.calls == []

    generate_images([busy], bucket=bucket, credentials=model_route("gpt-image-2.6-flare"))
    (call,) = api.calls
    assert (call.status, call.body["complexity"]) == (200, "low")


def test_input_fidelity_is_refused_on_gpt_image_2_or_routed_to_a_model_that_takes_it(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket, tmp_path: Path
) -> None:
    photo = a_photo(tmp_path)
    faithful = ImageRequest(prompt="the mug on oak", images=[photo], input_fidelity="high")
    gpt_image_2 = model_route("gpt-image-2")

    with pytest.raises(InvalidRequestError, match="does not take input_fidelity"):
        generate_images([faithful], bucket=bucket, credentials=gpt_image_2)
    assert api.calls == []

    sunburst = model_route("gpt-image-2.5-sunburst")
    generate_images([faithful], bucket=bucket, credentials=[gpt_image_2, sunburst])
    (call,) = api.calls
    assert (call.model, call.input_fidelity) == (sunburst.model, "high")

    # Where a gateway takes it, the block says so.
    api.reset()
    taking = model_route("gpt-image-2", input_fidelity=True)
    generate_images([faithful], bucket=bucket, credentials=taking)
    assert [call.model for call in api.calls] == [taking.model]


def test_transparent_backgrounds_are_refused_on_gpt_image_2_unless_the_block_says_so(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket
) -> None:
    clear = ImageRequest(prompt="a clear crane", background="transparent")
    with pytest.raises(InvalidRequestError, match="makes no transparent backgrounds"):
        generate_images([clear], bucket=bucket, credentials=model_route("gpt-image-2"))
    assert api.calls == []

    preview = model_route("gpt-image-2", transparent_formats=["png", "webp"])
    generate_images([clear], bucket=bucket, credentials=preview)
    (call,) = api.calls
    assert (call.status, call.body["background"]) == (200, "transparent")


def test_a_batch_run_of_a_model_the_batch_api_may_not_take_is_refused_before_sending(
    api: GptImageEmulator, model_route: ModelRoute, bucket: S3Bucket, api_key: str
) -> None:
    flare = model_route("gpt-image-2.5-flare")

    with pytest.raises(InvalidRequestError) as refused:
        generate_images(["a batched bittern"], bucket=bucket, credentials=flare, batch={})

    message = str(refused.value)
    assert f"cannot send {flare.model}" in message and "It takes gpt-image-2" in message
    assert '"batch_api": true' in message  # how a block says the provider takes it
    assert api.calls == [] and api.batches == [] and api.batch_calls == []
    with openai.OpenAI(base_url=api.openai_base_url, api_key=api_key, max_retries=0) as sdk:
        assert sdk.files.list().data == []  # not even the input file was uploaded
