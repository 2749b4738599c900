"""Edits as a marketing team runs them: product photos in a bucket placed in campaign
scenes, each photo sent as it is, each edit paid for once, bad inputs refused before any
call."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect_aws import S3Bucket

from prefect_gpt_image import (
    ImageRequest,
    OpenAICredentials,
    RapidAPICredentials,
    generate_image,
    generate_images,
)
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

SCENES = ["the product on a sunlit oak table", "the product on a marble counter"]


def photo(
    colour: str | tuple[int, ...], size: tuple[int, int] = (96, 64), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def put(s3_server: LocalS3Server, bucket: S3Bucket, key: str, data: bytes) -> str:
    s3_server.boto3_client().put_object(Bucket=bucket.bucket_name, Key=key, Body=data)
    return f"s3://{bucket.bucket_name}/{key}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def edits_at(api: GptImageEmulator) -> list[Any]:
    return [call for call in api.calls if call.path.endswith("/images/edits")]


@pytest.fixture
def photos(s3_server: LocalS3Server, bucket: S3Bucket) -> dict[str, bytes]:
    made = {"mug": photo("teal"), "vase": photo("orange"), "lamp": photo("navy")}
    for name, data in made.items():
        put(s3_server, bucket, f"products/{name}.png", data)
    return made


def test_three_photos_in_two_scenes_are_six_objects_each_sent_as_it_is(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    photos: dict[str, bytes],
) -> None:
    report = generate_images(
        SCENES,
        edit={"images": f"s3://{bucket.bucket_name}/products/"},
        bucket=bucket,
        credentials=openai_credentials,
        prefix="scenes",
    )

    assert len(report.images) == 6 and not report.failures
    calls = edits_at(api)
    assert len(calls) == api.billed == 6
    sent = sorted((call.inputs[0], call.prompt) for call in calls)
    assert sent == sorted((sha(data), scene) for data in photos.values() for scene in SCENES)
    for stored in report.images:
        name = stored.key.split("/")[-1]
        assert name.startswith(("mug-", "vase-", "lamp-")), name
        source = stored.inputs[0]
        assert source.uri == f"s3://{bucket.bucket_name}/products/{name.split('-')[0]}.png"
        assert source.sha256 == sha(photos[name.split("-")[0]])
        data = s3_server.object_path(bucket.bucket_name, stored.key).read_bytes()
        assert sha(data) == stored.sha256
    manifest = s3_server.object_path(bucket.bucket_name, report.manifest_key or "").read_text()
    rows = [json.loads(line) for line in manifest.splitlines()]
    assert {row["inputs"][0]["sha256"] for row in rows} == {sha(d) for d in photos.values()}
    assert all("data" not in row["inputs"][0] for row in rows)

    again = generate_images(
        SCENES,
        edit={"images": f"s3://{bucket.bucket_name}/products/"},
        bucket=bucket,
        credentials=openai_credentials,
        prefix="scenes",
    )
    assert (again.generated, again.from_cache, len(edits_at(api))) == (0, 6, 6)

    retouched = photo("darkcyan")
    put(s3_server, bucket, "products/mug.png", retouched)
    third = generate_images(
        SCENES,
        edit={"images": f"s3://{bucket.bucket_name}/products/"},
        bucket=bucket,
        credentials=openai_credentials,
        prefix="scenes",
    )
    assert (third.generated, third.from_cache) == (2, 4)
    assert {call.inputs[0] for call in edits_at(api)[6:]} == {sha(retouched)}


def test_the_same_photo_under_another_name_is_not_paid_for_twice(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    data = photo("teal")
    first = put(s3_server, bucket, "a/mug.png", data)
    second = put(s3_server, bucket, "b/mug-copy.png", data)

    generate_images(
        SCENES[:1], edit={"images": [first]}, bucket=bucket, credentials=openai_credentials
    )
    report = generate_images(
        SCENES[:1], edit={"images": [second]}, bucket=bucket, credentials=openai_credentials
    )

    assert (len(edits_at(api)), report.from_cache) == (1, 1)


def test_a_mask_of_the_wrong_size_is_refused_before_any_call(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    mask = tmp_path / "mask.png"
    mask.write_bytes(photo((0, 0, 0, 0), size=(32, 32), mode="RGBA"))

    with pytest.raises(InvalidRequestError) as refused:
        generate_images(
            SCENES,
            edit={"images": f"s3://{bucket.bucket_name}/products/", "mask": str(mask)},
            bucket=bucket,
            credentials=openai_credentials,
        )

    assert "mask" in str(refused.value)
    assert api.calls == []


def test_a_missing_photo_fails_its_own_rows_and_no_others(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    photos: dict[str, bytes],
) -> None:
    given = [f"s3://{bucket.bucket_name}/products/{name}.png" for name in ("mug", "gone")]

    with pytest.raises(RunFailedError) as failed:
        generate_images(
            SCENES, edit={"images": given}, bucket=bucket, credentials=openai_credentials
        )

    report = failed.value.report
    assert len(report.images) == 2 and len(edits_at(api)) == 2
    assert len(report.failures) == 2
    for failure in report.failures:
        assert failure.stage == "check"
        assert f"s3://{bucket.bucket_name}/products/gone.png" in failure.error


def test_an_edit_run_with_no_route_that_edits_is_refused_before_any_call(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    photos: dict[str, bytes],
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        generate_images(
            SCENES,
            edit={"images": f"s3://{bucket.bucket_name}/products/"},
            bucket=bucket,
            credentials=credentials,
        )

    assert "No route given can edit images" in str(refused.value)
    assert api.calls == []


def test_edits_skip_routes_that_cannot_edit(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    model_route: Callable[..., OpenAICredentials],
    tmp_path: Path,
) -> None:
    source = tmp_path / "mug.png"
    source.write_bytes(photo("teal"))
    openai_credentials = model_route("gpt-image-2.5-sunburst")  # takes input_fidelity

    image = generate_image(
        ImageRequest(prompt=SCENES[0], images=[source], input_fidelity="high"),
        credentials=[credentials, openai_credentials],
    )

    (call,) = api.calls
    assert call.path.endswith("/images/edits")
    assert call.inputs == [sha(source.read_bytes())]
    assert image.request.inputs[0].uri == source.as_uri()
    assert image.route == openai_credentials.route_name


def test_a_prompt_file_names_each_rows_photo_beside_it(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mug.png").write_bytes(photo("teal"))
    (tmp_path / "photos" / "vase.png").write_bytes(photo("orange"))
    prompts = tmp_path / "scenes.csv"
    prompts.write_text(
        "prompt,image\n"
        "the mug on an oak table,photos/mug.png\n"
        "the vase on a marble counter,photos/vase.png\n"
    )

    report = generate_images(str(prompts), bucket=bucket, credentials=openai_credentials)

    assert len(report.images) == 2
    assert sorted(call.inputs[0] for call in edits_at(api)) == sorted(
        sha(p.read_bytes()) for p in (tmp_path / "photos").iterdir()
    )


def test_an_edit_costs_its_generation_and_its_image_input_tokens(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    source = tmp_path / "mug.png"
    source.write_bytes(photo("teal"))

    report = generate_images(
        SCENES[:1], edit={"images": [str(source)]}, bucket=bucket, credentials=openai_credentials
    )

    (call,) = edits_at(api)
    usage = call.usage
    assert usage["input_tokens_details"]["image_tokens"] > 0
    prices = openai_credentials.model_spec().token_prices
    assert prices is not None
    expected = (
        usage["input_tokens_details"]["text_tokens"] * prices.text_input
        + usage["input_tokens_details"]["image_tokens"] * prices.image_input
        + usage["output_tokens"] * prices.image_output
    ) / 1e6
    assert report.cost_usd == pytest.approx(expected, abs=1e-6)


def test_the_runs_table_names_each_edits_input_and_its_sha256(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    source = tmp_path / "mug.png"
    source.write_bytes(photo("teal"))

    state = generate_images(
        SCENES[:1],
        edit={"images": [str(source)]},
        bucket=bucket,
        credentials=openai_credentials,
        return_state=True,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                key=ArtifactFilterKey(any_=["gpt-image-run"]),
            )
        )
    (table,) = artifacts
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["inputs"] == f"{source.as_uri()} sha256:{sha(source.read_bytes())}"
