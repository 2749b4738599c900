"""A campaign in every placement: each concept delivered at each placement's exact pixels,
format and byte limit, through the emulator and a real S3 server."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from batch_runs import objects, run
from PIL import Image, ImageChops, ImageStat
from prefect_aws import S3Bucket

from prefect_gpt_image import (
    OpenAICredentials,
    Placement,
    RapidAPICredentials,
    RunReport,
    StoredImage,
    generate_images,
)
from prefect_gpt_image._renditions import decoded as rendition_source
from prefect_gpt_image._renditions import render, smallest_bytes
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.placement_table import PRESETS
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

CAMPAIGN = [
    "meta-feed-square",  # 1:1
    "meta-feed-portrait",  # 4:5
    "meta-reels",  # 9:16, with a safe zone
    "meta-link",  # 1.91:1
    "display-medium-rectangle",  # 300x250, under 150 KB
    "display-leaderboard",  # 728x90: no model makes 8:1
]
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def concepts(tag: str = "") -> list[str]:
    tag = tag or uuid.uuid4().hex[:6]
    return [
        f"a ceramic mug of coffee on an oak table, {tag}",
        f"a linen tote bag on a sunny beach, {tag}",
        f"a steel water bottle on a mountain trail, {tag}",
    ]


def campaign(
    route: OpenAICredentials | RapidAPICredentials,
    bucket: S3Bucket,
    prompts: list[str],
    **options: Any,
) -> RunReport:
    report: RunReport = generate_images(
        prompts, bucket=bucket, credentials=route, placements=CAMPAIGN, **options
    )
    return report


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def renditions(report: RunReport) -> list[StoredImage]:
    return [image for image in report.images if image.placement is not None]


def masters(report: RunReport) -> list[StoredImage]:
    return [image for image in report.images if image.placement is None]


def edit_calls(api: GptImageEmulator) -> list[Any]:
    return [call for call in api.calls if call.status == 200 and "edits" in call.path]


def assert_delivered(report: RunReport, s3: LocalS3Server, bucket: S3Bucket) -> None:
    """Every rendition in the bucket has exactly its placement's pixels, its format and
    size limit, and metadata naming its placement and master."""
    stored = objects(s3, bucket)
    client = s3.boto3_client()
    by_sha = {image.sha256: image for image in masters(report)}
    for rendition in renditions(report):
        placement = PRESETS[rendition.placement or ""]
        data = stored[rendition.key]
        image = decoded(data)
        assert image.size == (placement.width, placement.height), rendition.key
        if placement.output_format is not None:
            assert MEDIA_TYPES[image.format or ""] == f"image/{placement.output_format}"
        assert MEDIA_TYPES[image.format or ""] == rendition.media_type
        if placement.max_bytes is not None:
            assert len(data) <= placement.max_bytes
        assert f"-{placement.name}-{placement.size}-" in rendition.key
        stored_head = client.head_object(Bucket=bucket.bucket_name, Key=rendition.key)
        head = {name.lower(): value for name, value in stored_head["Metadata"].items()}
        assert head["placement"] == placement.name
        assert (head["width"], head["height"]) == (str(placement.width), str(placement.height))
        assert head["master-sha256"] == rendition.source_sha256
        assert rendition.source_sha256 in by_sha


def master_box(
    master: tuple[int, int], canvas: tuple[int, int] | None, out: tuple[int, int]
) -> tuple[float, float]:
    """The size the master's picture takes in a rendition of `out` pixels: cut to cover it,
    or first fitted inside an extension's `canvas`, which is then cut to cover it."""
    width, height = master
    if canvas is not None:
        fit = min(canvas[0] / width, canvas[1] / height)
        width, height = width * fit, height * fit
        cover = max(out[0] / canvas[0], out[1] / canvas[1])
    else:
        cover = max(out[0] / width, out[1] / height)
    return width * cover, height * cover


def centre_difference(
    master: bytes, rendition: bytes, canvas: tuple[int, int] | None = None
) -> float:
    """Mean absolute difference, per channel, between the middle of a rendition and the
    same part of its master, the master resized to where its picture sits in the rendition."""
    source, made = decoded(master).convert("RGB"), decoded(rendition).convert("RGB")
    box_w, box_h = master_box(source.size, canvas, made.size)
    scaled = source.resize((max(1, round(box_w)), max(1, round(box_h))), Image.Resampling.BILINEAR)
    # The middle half of what both show.
    shown_w, shown_h = min(made.width, scaled.width), min(made.height, scaled.height)
    crop_w, crop_h = max(1, shown_w // 2), max(1, shown_h // 2)
    here = made.crop(_centred(made.size, crop_w, crop_h))
    there = scaled.crop(_centred(scaled.size, crop_w, crop_h))
    return sum(ImageStat.Stat(ImageChops.difference(here, there)).mean) / 3


def _centred(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return left, top, left + width, top + height


def test_crop_delivers_every_placement_from_one_paid_image_per_prompt(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = concepts()

    report = campaign(openai_credentials, bucket, prompts)

    assert api.billed == 3 and report.generated == 3 and not report.failures
    assert len(masters(report)) == 3 and len(renditions(report)) == 18
    assert_delivered(report, s3_server, bucket)
    stored = objects(s3_server, bucket)
    assert len(stored) == 21
    by_sha = {image.sha256: image for image in masters(report)}
    for rendition in renditions(report):  # the same creative: the master's middle
        master = stored[by_sha[rendition.source_sha256 or ""].key]
        assert centre_difference(master, stored[rendition.key]) < 12, rendition.key
    leaderboard = [r for r in renditions(report) if r.placement == "display-leaderboard"]
    assert all((r.cropped or 0) > 0.5 for r in leaderboard)  # the report says how much

    again = campaign(openai_credentials, bucket, prompts)

    assert api.billed == 3 and again.cost_usd == 0 and again.generated == 0
    assert {i.key for i in again.images} == {i.key for i in report.images}
    assert len(objects(s3_server, bucket)) == 21

    seventh = generate_images(
        prompts,
        bucket=bucket,
        credentials=openai_credentials,
        placements=[*CAMPAIGN, "linkedin-square"],
    )

    assert api.billed == 3 and seventh.cost_usd == 0
    added = [r for r in renditions(seventh) if r.placement == "linkedin-square"]
    assert len(added) == 3
    assert all(decoded(objects(s3_server, bucket)[r.key]).size == (1200, 1200) for r in added)


def test_the_manifest_groups_each_masters_renditions_under_it(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    report = generate_images(
        concepts()[:2],
        bucket=bucket,
        credentials=openai_credentials,
        placements=["meta-feed-square", "300x250"],
    )

    assert report.manifest_key is not None
    body = s3_server.boto3_client().get_object(Bucket=bucket.bucket_name, Key=report.manifest_key)
    lines = [json.loads(line) for line in body["Body"].read().decode().splitlines()]
    assert [line["placement"] for line in lines] == [None, "meta-feed-square", "300x250"] * 2
    assert [line["index"] for line in lines] == [0, 0, 0, 1, 1, 1]
    for master, *its in (lines[:3], lines[3:]):
        assert all(line["source_sha256"] == master["sha256"] for line in its)


def test_extend_pays_one_edit_per_prompt_and_distinct_aspect_and_keeps_the_master(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = concepts()

    report = campaign(openai_credentials, bucket, prompts, adapt="extend")

    # The master takes the lead placement's aspect (square); the others are 4:5, 9:16,
    # 1.91:1, 6:5 and, for 728x90, the widest the model makes (3:1): five edits a prompt.
    edits = edit_calls(api)
    assert len(edits) == 15 and api.billed == 18 and report.generated == 18
    assert not report.failures
    assert_delivered(report, s3_server, bucket)
    stored = objects(s3_server, bucket)
    canvases = {(call.prompt.split("\n")[0]): [] for call in edits}
    for call in edits:
        canvases[call.prompt.split("\n")[0]].append((call.width, call.height))
    by_sha = {image.sha256: image for image in masters(report)}
    for rendition in renditions(report):
        master = by_sha[rendition.source_sha256 or ""]
        placement = PRESETS[rendition.placement or ""]
        if placement.aspect == pytest.approx(master.width / master.height, rel=0.02):
            canvas = None
        else:  # the edit whose canvas has the placement's aspect, or the widest there is
            canvas = min(
                canvases[master.prompt],
                key=lambda size: abs(size[0] / size[1] - min(placement.aspect, 3)),
            )
        difference = centre_difference(stored[master.key], stored[rendition.key], canvas)
        assert difference < 12, (rendition.key, difference)

    again = campaign(openai_credentials, bucket, prompts, adapt="extend")

    assert api.billed == 18 and again.cost_usd == 0


def test_generate_pays_one_image_per_prompt_and_distinct_aspect(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    report = campaign(openai_credentials, bucket, concepts(), adapt="generate")

    # Six distinct aspects, 728x90's being the widest the model makes.
    assert api.billed == 18 and not edit_calls(api) and not report.failures
    assert_delivered(report, s3_server, bucket)
    reels = [call for call in api.calls if call.height > call.width * 1.5]
    assert len(reels) == 3
    assert all("free of text and logos" in call.prompt for call in reels)  # its safe zone


def test_what_cannot_be_delivered_is_refused_before_anything_is_paid(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    def refused(**options: Any) -> str:
        with pytest.raises(InvalidRequestError) as caught:
            generate_images(concepts(), bucket=bucket, credentials=openai_credentials, **options)
        return str(caught.value)

    unknown = refused(placements=["meta-feed-sqaure"])
    assert "meta-feed-sqaure" in unknown and "meta-feed-square" in unknown
    tiny = refused(placements=[Placement(name="tiny-link", width=1200, height=628, max_bytes=1000)])
    assert "tiny-link" in tiny and "1,000 bytes" in tiny
    assert "n to 1" in refused(placements=["meta-feed-square"], image={"n": 2})
    with pytest.raises(InvalidRequestError, match="edit"):
        generate_images(
            concepts(), bucket=bucket, credentials=credentials, placements=CAMPAIGN, adapt="extend"
        )
    assert api.calls == []


def test_a_rendition_that_cannot_meet_its_limit_fails_alone(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    # Just above what a blank image needs: the emulator's banded pictures need more.
    floor = smallest_bytes(1200, 628, "jpeg")
    tight = Placement(
        name="tight-link", width=1200, height=628, output_format="jpeg", max_bytes=floor + 50
    )

    with pytest.raises(RunFailedError) as caught:
        generate_images(
            concepts()[:1],
            bucket=bucket,
            credentials=openai_credentials,
            placements=["meta-feed-square", tight],
        )

    report = caught.value.report
    assert api.billed == 1
    assert [image.placement for image in report.images] == [None, "meta-feed-square"]
    [failure] = report.failures
    assert failure.placement == "tight-link" and f"{floor + 50:,} bytes" in failure.error
    assert "tight-link" in str(caught.value)
    assert len(objects(s3_server, bucket)) == 2


def test_through_the_batch_api_renditions_are_made_as_masters_are_collected(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    report = run(openai_credentials, bucket, concepts(), placements=CAMPAIGN)

    assert batch_api.calls == [] and len(batch_api.batch_calls) == 3
    assert len(renditions(report)) == 18 and not report.failures
    assert_delivered(report, s3_server, bucket)


def test_extend_through_the_batch_api_sends_its_edits_at_once(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    report = run(
        openai_credentials,
        bucket,
        concepts()[:1],
        placements=["meta-feed-square", "meta-link", "linkedin-landscape"],
        adapt="extend",
    )

    # 1200x628 and 1200x627 are one shape: one edit serves both.
    assert len(batch_api.batch_calls) == 1 and len(edit_calls(batch_api)) == 1
    assert len(renditions(report)) == 3 and not report.failures
    assert_delivered(report, s3_server, bucket)


def test_a_prompt_files_focus_point_moves_the_cut(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    tmp_path: Path,
) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f'prompt,focus\n"{concepts()[0]}","0,0"\n', "utf-8")
    link = PRESETS["meta-link"]

    report = generate_images(
        str(prompts), bucket=bucket, credentials=openai_credentials, placements=[link.name]
    )

    master, rendition = report.images
    stored = objects(s3_server, bucket)
    picture = rendition_source(stored[master.key])
    assert stored[rendition.key] == render(picture, link, (0.0, 0.0)).data  # the top left
    assert stored[rendition.key] != render(picture, link).data  # not the centre
